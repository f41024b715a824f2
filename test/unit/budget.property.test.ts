/**
 * The budget planner against a simulated fleet: random sequences of scale-ups,
 * scale-downs, rollouts with surge, pod failures and deletions, controller
 * reconciles that crash half-way through their writes (a restart re-runs the
 * stateless planner on the persisted PoolMembers only), sidecars that
 * acknowledge late, partially or never. Safety is checked after every step;
 * progress once the fleet is left alone.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { planBudgets, type BudgetPlan, type ConnectionInput, type MemberState, type PodInput } from '../../src/core/budget/index.ts';

/** The pod's sidecar, as the protocol in docs/protocol.md asks it to behave. */
interface Sidecar {
  /** Most connections it lets itself hold now. */
  allowed: number;
  /** Server connections really open. */
  held: number;
  /** Highest grant generation it has seen. */
  seenGeneration: number;
  /** A status write it means to make. */
  pendingAck?: { generation: number; connections: number } | undefined;
  responsive: boolean;
  drained: boolean;
}

interface SimPod {
  pod: PodInput;
  sidecar: Sidecar;
}

interface World {
  limit: number;
  connections: ConnectionInput[];
  pods: SimPod[];
  /** PoolMembers by "namespace/name": the only state persisted between reconciles. */
  members: Map<string, MemberState>;
  serial: number;
}

type Operation =
  | { kind: 'scaleUp'; consumer: number }
  | { kind: 'terminate'; pod: number }
  | { kind: 'rollout'; consumer: number }
  | { kind: 'gone'; pod: number }
  | { kind: 'fail'; pod: number }
  | { kind: 'reconcile'; writes: number }
  | { kind: 'sync'; pod: number }
  | { kind: 'use'; pod: number; connections: number }
  | { kind: 'release'; pod: number }
  | { kind: 'deliverAck'; pod: number }
  | { kind: 'loseAck'; pod: number }
  | { kind: 'hang'; pod: number }
  | { kind: 'wake'; pod: number }
  | { kind: 'drain'; pod: number }
  | { kind: 'tick'; busy: boolean };

const keyOf = (o: { namespace: string; name: string }): string => `${o.namespace}/${o.name}`;

/** All consumers with where they live. */
function consumersOf(world: World): { namespace: string; connection: string; name: string }[] {
  return world.connections.flatMap((c) => c.consumers.map((k) => ({ namespace: c.namespace, connection: c.name, name: k.name })));
}

function addPod(world: World, consumerIndex: number): void {
  const consumers = consumersOf(world);
  const consumer = consumers[consumerIndex % consumers.length]!;
  world.serial += 1;
  const name = `${consumer.name}-${String(world.serial).padStart(3, '0')}`;
  world.pods.push({
    pod: { namespace: consumer.namespace, name, uid: `uid-${world.serial}`, connection: consumer.connection, consumer: consumer.name, phase: world.serial % 3 === 0 ? 'Pending' : 'Running', terminating: false, ready: false },
    sidecar: { allowed: 0, held: 0, seenGeneration: -1, responsive: true, drained: false },
  });
}

function podAt(world: World, index: number): SimPod | undefined {
  return world.pods.length === 0 ? undefined : world.pods[index % world.pods.length];
}

/** The controller: plan from persisted state only, write the first `writes` changed grants (a crash loses the rest). */
function reconcile(world: World, writes: number): BudgetPlan {
  const plan = planBudgets({ limit: world.limit, connections: world.connections, pods: world.pods.map((p) => p.pod), members: [...world.members.values()] });
  let written = 0;
  for (const grant of plan.grants) {
    if (!grant.changed || written >= writes) continue;
    written += 1;
    const key = keyOf(grant);
    const previous = world.members.get(key);
    if (!previous) assert.equal(grant.grant.connections, 0, 'a new pod starts at 0');
    const sameOwner = previous?.podUid === grant.podUid;
    world.members.set(key, { namespace: grant.namespace, name: grant.name, podUid: grant.podUid, grant: grant.grant, acknowledgement: sameOwner ? previous?.acknowledgement : undefined });
  }
  for (const orphan of plan.orphans) if (!world.pods.some((p) => keyOf(p.pod) === keyOf(orphan))) world.members.delete(keyOf(orphan));
  return plan;
}

/** The sidecar reads its PoolMember: a grow is adopted and acknowledged at once, a shrink once it holds no more. */
function sync(p: SimPod, member: MemberState | undefined): void {
  const s = p.sidecar;
  if (!member || !s.responsive || s.drained) return;
  const { connections, generation } = member.grant;
  if (generation > s.seenGeneration) {
    s.seenGeneration = generation;
    s.allowed = connections;
  }
  const acked = member.acknowledgement?.generation ?? -1;
  if (acked < s.seenGeneration && s.held <= s.allowed) s.pendingAck = { generation: s.seenGeneration, connections: s.allowed };
}

function apply(world: World, op: Operation): void {
  const p = 'pod' in op ? podAt(world, op.pod) : undefined;
  const member = p ? world.members.get(keyOf(p.pod)) : undefined;
  const alive = p !== undefined && p.pod.phase !== 'Failed';
  switch (op.kind) {
    case 'scaleUp': addPod(world, op.consumer); break;
    case 'rollout': {
      addPod(world, op.consumer);
      const surge = world.pods.at(-1)!;
      const old = world.pods.find((q) => q.pod.consumer === surge.pod.consumer && q.pod.connection === surge.pod.connection && q !== surge && !q.pod.terminating);
      if (old) old.pod.terminating = true;
      break;
    }
    case 'terminate': if (p) p.pod.terminating = true; break;
    // Kubernetes removes a pod after its grace period: its processes, and their connections, are gone.
    case 'gone': if (p && (p.pod.terminating || !alive)) world.pods.splice(world.pods.indexOf(p), 1); break;
    case 'fail': if (p) { p.pod.phase = 'Failed'; p.sidecar.held = 0; p.sidecar.allowed = 0; p.sidecar.responsive = false; } break;
    case 'reconcile': reconcile(world, op.writes); break;
    case 'sync': if (p && alive) sync(p, member); break;
    case 'use': if (p && alive && p.sidecar.responsive && !p.sidecar.drained) p.sidecar.held = Math.min(p.sidecar.allowed, Math.max(p.sidecar.held, op.connections)); break;
    case 'release': if (p && alive && p.sidecar.held > 0) { p.sidecar.held -= 1; sync(p, member); } break;
    case 'deliverAck':
      if (p && alive && member && p.sidecar.pendingAck && p.sidecar.responsive) {
        member.acknowledgement = { ...p.sidecar.pendingAck, held: p.sidecar.held, drained: p.sidecar.drained };
        p.sidecar.pendingAck = undefined;
      }
      break;
    // Every answering sidecar reads its grant, fills it if busy, and writes its status.
    case 'tick':
      for (let i = 0; i < world.pods.length; i += 1) {
        apply(world, { kind: 'sync', pod: i });
        if (op.busy) apply(world, { kind: 'use', pod: i, connections: Infinity });
        apply(world, { kind: 'deliverAck', pod: i });
      }
      break;
    case 'loseAck': if (p) p.sidecar.pendingAck = undefined; break;
    case 'hang': if (p) p.sidecar.responsive = false; break;
    case 'wake': if (p && alive) p.sidecar.responsive = true; break;
    // SIGTERM: the sidecar closes everything and says so.
    case 'drain':
      if (p && alive && p.pod.terminating && p.sidecar.responsive && member) {
        Object.assign(p.sidecar, { held: 0, allowed: 0, drained: true, pendingAck: undefined });
        member.acknowledgement = { generation: member.acknowledgement?.generation ?? 0, connections: 0, held: 0, drained: true };
      }
      break;
  }
}

/** What the protocol counts against the limit: max(granted, last acknowledged), except pods gone, failed or drained on termination. */
function counted(world: World, only: (p: SimPod) => boolean = () => true): number {
  let sum = 0;
  for (const p of world.pods.filter(only)) {
    const m = world.members.get(keyOf(p.pod));
    if (!m || m.podUid !== p.pod.uid || p.pod.phase === 'Failed') continue;
    if (p.pod.terminating && m.acknowledgement?.drained) continue;
    sum += Math.max(m.grant.connections, m.acknowledgement?.connections ?? 0);
  }
  return sum;
}

/** Each cap (CONNECTION LIMIT of a role or database) with its strictest limit and the connections it binds. */
function capsOf(world: World): Array<{ key: string; limit: number; connections: Set<string> }> {
  const caps = new Map<string, { key: string; limit: number; connections: Set<string> }>();
  for (const c of world.connections) {
    for (const cap of c.caps ?? []) {
      const g = caps.get(cap.key) ?? { key: cap.key, limit: cap.limit, connections: new Set<string>() };
      g.limit = Math.min(g.limit, cap.limit);
      g.connections.add(keyOf(c));
      caps.set(cap.key, g);
    }
  }
  return [...caps.values()];
}

function checkSafety(world: World, step: string): void {
  assert.ok(counted(world) <= world.limit, `${step}: counted ${counted(world)} > limit ${world.limit}`);
  const held = world.pods.reduce((sum, p) => sum + p.sidecar.held, 0);
  assert.ok(held <= world.limit, `${step}: sidecars hold ${held} > limit ${world.limit}`);
  for (const cap of capsOf(world)) {
    const bound = (p: SimPod): boolean => cap.connections.has(`${p.pod.namespace}/${p.pod.connection}`);
    const inCap = counted(world, bound);
    assert.ok(inCap <= cap.limit, `${step}: counted ${inCap} > ${cap.key}'s CONNECTION LIMIT ${cap.limit}`);
    const heldInCap = world.pods.filter(bound).reduce((sum, p) => sum + p.sidecar.held, 0);
    assert.ok(heldInCap <= cap.limit, `${step}: sidecars of ${cap.key} hold ${heldInCap} > ${cap.limit}`);
  }
  for (const p of world.pods) {
    const m = world.members.get(keyOf(p.pod));
    const covered = m && m.podUid === p.pod.uid ? Math.max(m.grant.connections, m.acknowledgement?.connections ?? 0) : 0;
    assert.ok(p.sidecar.allowed <= covered || p.sidecar.drained, `${step}: ${p.pod.name} may hold ${p.sidecar.allowed}, counted ${covered}`);
  }
}

/** Leave the fleet alone: sidecars answer, terminating pods drain and go; reconcile until nothing changes. */
function settle(world: World): BudgetPlan {
  for (const p of world.pods) if (p.pod.phase !== 'Failed') p.sidecar.responsive = true;
  world.pods = world.pods.filter((p) => !p.pod.terminating && p.pod.phase !== 'Failed');
  let plan = reconcile(world, Infinity);
  for (let round = 0; round < 12 && !plan.settled; round += 1) {
    for (const p of world.pods) {
      sync(p, world.members.get(keyOf(p.pod)));
      p.sidecar.held = Math.min(p.sidecar.held, p.sidecar.allowed); // busy connections get released
      sync(p, world.members.get(keyOf(p.pod)));
      apply(world, { kind: 'deliverAck', pod: world.pods.indexOf(p) });
      checkSafety(world, `settle round ${round}`);
    }
    plan = reconcile(world, Infinity);
    checkSafety(world, `settle round ${round} reconcile`);
  }
  return plan;
}

const consumerArb = fc.record({
  weight: fc.integer({ min: 1, max: 3 }),
  minPerPod: fc.integer({ min: 0, max: 3 }),
  maxExtra: fc.option(fc.integer({ min: 0, max: 8 }), { nil: undefined }),
  processesPerPod: fc.integer({ min: 1, max: 4 }),
  maxReplicas: fc.integer({ min: 1, max: 5 }),
});

const CAP_KEYS = ['role a', 'role b', 'database d'] as const;

/**
 * One or two DatabaseConnections (two namespaces) on the same server, each
 * logging in with a role or to a database that may have a CONNECTION LIMIT
 * of its own, shared with the other connection or not.
 */
const worldArb = fc.record({
  limit: fc.integer({ min: 0, max: 60 }),
  connections: fc.array(fc.record({
    strategy: fc.constantFrom('Dynamic' as const, 'Dynamic' as const, 'MaxReplicas' as const),
    consumers: fc.array(consumerArb, { minLength: 1, maxLength: 2 }),
    caps: fc.subarray([...CAP_KEYS]),
  }), { minLength: 1, maxLength: 2 }),
  capLimits: fc.tuple(fc.integer({ min: 0, max: 40 }), fc.integer({ min: 0, max: 40 }), fc.integer({ min: 0, max: 40 })),
  initialPods: fc.array(fc.nat(3), { maxLength: 8 }),
}).map(({ limit, connections, capLimits, initialPods }): World => {
  const world: World = {
    limit,
    connections: connections.map((c, i) => ({
      namespace: `ns${i}`, name: `db${i}`, budgetStrategy: c.strategy,
      caps: c.caps.map((key) => ({ key, limit: capLimits[CAP_KEYS.indexOf(key)]! })),
      consumers: c.consumers.map((k, j) => ({ name: `c${i}${j}`, weight: k.weight, minPerPod: k.minPerPod, maxPerPod: k.maxExtra === undefined ? undefined : k.minPerPod + k.maxExtra, processesPerPod: k.processesPerPod, maxReplicas: k.maxReplicas })),
    })),
    pods: [], members: new Map(), serial: 0,
  };
  for (const c of initialPods) addPod(world, c);
  return world;
});

const operationArb: fc.Arbitrary<Operation> = fc.oneof(
  { weight: 2, arbitrary: fc.nat(5).map((consumer) => ({ kind: 'scaleUp' as const, consumer })) },
  { weight: 1, arbitrary: fc.nat(20).map((pod) => ({ kind: 'terminate' as const, pod })) },
  { weight: 1, arbitrary: fc.nat(5).map((consumer) => ({ kind: 'rollout' as const, consumer })) },
  { weight: 1, arbitrary: fc.nat(20).map((pod) => ({ kind: 'gone' as const, pod })) },
  { weight: 1, arbitrary: fc.nat(20).map((pod) => ({ kind: 'fail' as const, pod })) },
  { weight: 5, arbitrary: fc.oneof(fc.constant(Infinity), fc.nat(3)).map((writes) => ({ kind: 'reconcile' as const, writes })) },
  { weight: 6, arbitrary: fc.nat(20).map((pod) => ({ kind: 'sync' as const, pod })) },
  { weight: 4, arbitrary: fc.record({ pod: fc.nat(20), connections: fc.nat(30) }).map((o) => ({ kind: 'use' as const, ...o })) },
  { weight: 3, arbitrary: fc.nat(20).map((pod) => ({ kind: 'release' as const, pod })) },
  { weight: 5, arbitrary: fc.nat(20).map((pod) => ({ kind: 'deliverAck' as const, pod })) },
  { weight: 1, arbitrary: fc.nat(20).map((pod) => ({ kind: 'loseAck' as const, pod })) },
  { weight: 1, arbitrary: fc.nat(20).map((pod) => ({ kind: 'hang' as const, pod })) },
  { weight: 1, arbitrary: fc.nat(20).map((pod) => ({ kind: 'wake' as const, pod })) },
  { weight: 2, arbitrary: fc.nat(20).map((pod) => ({ kind: 'drain' as const, pod })) },
  { weight: 4, arbitrary: fc.boolean().map((busy) => ({ kind: 'tick' as const, busy })) },
);

describe('budget planner on a simulated fleet (property)', function () {
  it('safety: the counted total and the connections really held never exceed the limit', function () {
    fc.assert(fc.property(worldArb, fc.array(operationArb, { minLength: 20, maxLength: 120 }), (world, operations) => {
      for (const [i, op] of operations.entries()) {
        apply(world, op);
        checkSafety(world, `step ${i} ${JSON.stringify(op)}`);
      }
    }), { numRuns: 200 });
  });

  it('progress: left alone, grants converge to the weighted fair split and every pod reaches minPerPod unless oversubscribed', function () {
    fc.assert(fc.property(worldArb, fc.array(operationArb, { minLength: 10, maxLength: 80 }), (world, operations) => {
      for (const op of operations) apply(world, op);
      const plan = settle(world);
      assert.ok(plan.settled, `not settled: ${JSON.stringify(plan.grants.filter((g) => g.waitingFor !== 'none'))}`);
      let granted = 0;
      for (const g of plan.grants) {
        assert.equal(g.grant.connections, g.target, `${g.name} at its target`);
        assert.equal(world.members.get(keyOf(g))?.acknowledgement?.connections ?? 0, g.target, `${g.name} acknowledged`);
        granted += g.grant.connections;
      }
      assert.ok(granted <= world.limit);
      const required = world.connections.flatMap((c) => c.consumers.map((k) => {
        const pods = plan.grants.filter((g) => g.namespace === c.namespace && g.consumer === k.name).length;
        return (c.budgetStrategy === 'MaxReplicas' ? Math.max(pods, k.maxReplicas ?? 0) : pods) * k.minPerPod;
      })).reduce((a, b) => a + b, 0);
      const capExceeded = capsOf(world).some((cap) => world.connections.filter((c) => cap.connections.has(keyOf(c))).flatMap((c) => c.consumers.map((k) => {
        const pods = plan.grants.filter((g) => g.namespace === c.namespace && g.consumer === k.name).length;
        return (c.budgetStrategy === 'MaxReplicas' ? Math.max(pods, k.maxReplicas ?? 0) : pods) * k.minPerPod;
      })).reduce((a, b) => a + b, 0) > cap.limit);
      assert.equal(plan.oversubscription !== undefined, required > world.limit || capExceeded, 'oversubscription flagged exactly when minimums exceed the limit or a CONNECTION LIMIT');
      for (const cap of capsOf(world)) {
        const inCap = plan.grants.filter((g) => cap.connections.has(`${g.namespace}/${g.connection}`)).reduce((a, g) => a + g.grant.connections, 0);
        assert.ok(inCap <= cap.limit, `${cap.key}: granted ${inCap} > ${cap.limit}`);
      }
      for (const c of world.connections) {
        for (const k of c.consumers) {
          const mine = plan.grants.filter((g) => g.namespace === c.namespace && g.consumer === k.name).map((g) => g.grant.connections);
          if (mine.length === 0) continue;
          if (!plan.oversubscription) assert.ok(Math.min(...mine) >= k.minPerPod, `${k.name} pods reach minPerPod ${k.minPerPod}: ${mine.join(',')}`);
          assert.ok(Math.max(...mine) - Math.min(...mine) <= 1, `${k.name} pods split evenly: ${mine.join(',')}`);
          if (k.maxPerPod !== undefined && !plan.oversubscription) assert.ok(Math.max(...mine) <= k.maxPerPod);
        }
      }
      // Nothing left on the table (MaxReplicas slots keep capacity for pods that do not exist yet).
      const allDynamic = world.connections.every((c) => c.budgetStrategy === 'Dynamic');
      const dynamicUnbounded = plan.grants.some((g) => {
        const c = world.connections.find((x) => x.namespace === g.namespace && x.name === g.connection)!;
        return c.budgetStrategy === 'Dynamic' && c.consumers.find((k) => k.name === g.consumer)?.maxPerPod === undefined;
      });
      // With CONNECTION LIMITs, what a cap leaves unused goes to the others; each capped group is at its cap or everyone's else is full.
      const uncapped = world.connections.every((c) => (c.caps ?? []).length === 0);
      if (allDynamic && dynamicUnbounded && !plan.oversubscription && uncapped) assert.equal(granted, world.limit, 'the whole limit is granted');
    }), { numRuns: 150 });
  });

  it('a rollout with surge on a full limit does not deadlock: the surge pod reaches its share while the old pods still run', function () {
    fc.assert(fc.property(fc.integer({ min: 2, max: 8 }), fc.integer({ min: 0, max: 3 }), fc.integer({ min: 0, max: 40 }), (replicas, minPerPod, spare) => {
      const limit = (replicas + 1) * minPerPod + spare;
      const world: World = { limit, connections: [{ namespace: 'ns0', name: 'db0', budgetStrategy: 'Dynamic', consumers: [{ name: 'web', weight: 1, minPerPod, processesPerPod: 1 }] }], pods: [], members: new Map(), serial: 0 };
      for (let i = 0; i < replicas; i += 1) addPod(world, 0);
      settle(world);
      for (const p of world.pods) p.sidecar.held = p.sidecar.allowed; // every old pod uses its whole share
      addPod(world, 0); // the surge pod; the old ones keep running until it is ready
      const plan = settle(world);
      const surge = plan.grants.find((g) => g.name === world.pods.at(-1)!.pod.name)!;
      assert.ok(surge.grant.connections >= minPerPod && surge.grant.connections === surge.target);
    }), { numRuns: 100 });
  });

  it('a controller restart between any two steps changes nothing: the plan depends on persisted state only', function () {
    fc.assert(fc.property(worldArb, fc.array(operationArb, { maxLength: 40 }), (world, operations) => {
      for (const op of operations) apply(world, op);
      const input = { limit: world.limit, connections: world.connections, pods: world.pods.map((p) => p.pod), members: [...world.members.values()] };
      const fresh = JSON.parse(JSON.stringify(input)) as typeof input;
      assert.deepEqual(planBudgets(fresh), planBudgets(input));
    }), { numRuns: 50 });
  });
});
