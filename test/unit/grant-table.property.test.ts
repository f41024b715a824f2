/**
 * The grant-table protocol against a simulated fleet: the controller writes one
 * table per DatabaseConnection, sidecars that read tables are switched onto them
 * and derive their own grants, older sidecars keep reading their PoolMember's
 * grant. Random scale-ups, rollouts, deletions, failures, limit changes,
 * reconciles that crash after any write, acknowledgements that arrive late, twice
 * or never, over the PoolMember or over the channel to the leader (whose memory
 * a leader change loses), pods lost with their node whose backends PostgreSQL
 * keeps until its keepalives give up on them (the connections' departure hold).
 * Safety after every step, counted from what is durable only and held by
 * sidecars and lost backends alike; convergence once the fleet is left alone.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  defaultHolding, departedHeld, deriveEntry, deriveGrant, encodeGrantTable, laterAcknowledgement, memberGrantInForce, planBudgets, tableAccount, tableWriteWaves, unlistedDeparted,
  type Acknowledgement, type BudgetPlan, type ConnectionInput, type GrantTable, type MemberState, type PodInput,
} from '../../src/core/budget/index.ts';

interface Sidecar {
  /** Reads grant tables (a sidecar of this version) or only its PoolMember (an older one). */
  readsTables: boolean;
  allowed: number;
  held: number;
  /** The source and generation of the grant it applied last ("m7", "t3"). */
  seen: string;
  /** Generation and table generation of the grant it applied. */
  applied: { generation: number; tableGeneration?: number | undefined };
  pendingAck?: { generation: number; connections: number; tableGeneration?: number | undefined } | undefined;
  responsive: boolean;
  drained: boolean;
}

interface SimPod { pod: PodInput; sidecar: Sidecar }

interface World {
  limit: number;
  /** What the counted total must stay under: the limit, or while a lowered limit is being reached, the lowest total since. */
  ceiling: number;
  /**
   * What sidecars and lost backends may hold: the ceiling, except that a pod gone without a trace
   * may leave what is durable counting more than it held (a shrink it acknowledged that no table
   * recorded yet), which raises the ceiling of what is counted but not this.
   */
  heldCeiling?: number;
  connections: ConnectionInput[];
  pods: SimPod[];
  members: Map<string, MemberState>;
  /** Grant tables by "namespace/connection". */
  tables: Map<string, GrantTable>;
  /** Acknowledgements the leader received over the channel, by pod uid: lost when the leader changes. */
  channel: Map<string, Acknowledgement>;
  serial: number;
  /** The controller's clock (ms). */
  now: number;
  /** Backends of lost pods that PostgreSQL still holds, until it notices (at most the departure hold after the loss). */
  lostBackends: Array<{ connections: number; until: number }>;
  /** What pods on tables counted when they finished or went, by uid: counted until a table records their departure. */
  left: Map<string, number>;
}

/** Every connection's departure hold in these worlds: how long PostgreSQL keeps a lost pod's backends at most. */
const HOLD_SECONDS = 30;

type Operation =
  | { kind: 'scaleUp'; consumer: number; old: boolean; annotated?: boolean }
  | { kind: 'rollout'; consumer: number }
  | { kind: 'terminate' | 'gone' | 'fail' | 'sync' | 'release' | 'deliverAck' | 'channelAck' | 'loseAck' | 'hang' | 'wake' | 'drain' | 'vanish'; pod: number }
  | { kind: 'newLeader' }
  | { kind: 'use'; pod: number; connections: number }
  | { kind: 'reconcile'; writes: number; reverse?: boolean }
  | { kind: 'limit'; limit: number }
  | { kind: 'tick'; busy: boolean; channel?: boolean }
  | { kind: 'lost'; pod: number; finished: boolean }
  | { kind: 'vanish'; pod: number }
  | { kind: 'advance'; seconds: number };

const keyOf = (o: { namespace: string; name: string }): string => `${o.namespace}/${o.name}`;

/** `annotated`: the injector said the sidecar reads tables, so its PoolMember is created on the table. */
function addPod(world: World, consumerIndex: number, readsTables: boolean, annotated = false): void {
  const consumers = world.connections.flatMap((c) => c.consumers.map((k) => ({ namespace: c.namespace, connection: c.name, name: k.name })));
  const consumer = consumers[consumerIndex % consumers.length]!;
  world.serial += 1;
  world.pods.push({
    pod: { namespace: consumer.namespace, name: `${consumer.name}-${String(world.serial).padStart(3, '0')}`, uid: `uid-${world.serial}`, connection: consumer.connection, consumer: consumer.name, phase: 'Running', terminating: false, ready: true, ...(readsTables && annotated ? { readsTables: true } : {}) },
    sidecar: { readsTables, allowed: 0, held: 0, seen: '', applied: { generation: -1 }, responsive: true, drained: false },
  });
}

function tableOf(world: World, p: PodInput): GrantTable | undefined {
  return world.tables.get(`${p.namespace}/${p.connection}`);
}

function plan(world: World): BudgetPlan {
  const tables = [...world.tables].map(([k, table]) => ({ namespace: k.split('/')[0]!, connection: k.split('/')[1]!, table }));
  // The leader plans with the later of each pod's PoolMember acknowledgement and the one it received over the channel.
  // As the controller's input does: a drain reported on the PoolMember stands whatever the channel says.
  const merged = (m: MemberState): Acknowledgement | undefined => {
    const later = laterAcknowledgement(m.acknowledgement, world.channel.get(m.podUid));
    return later && m.acknowledgement?.drained ? { ...later, drained: true } : later;
  };
  const members = [...world.members.values()].map((m) => (m.tableFrom === undefined ? m : { ...m, acknowledgement: merged(m) }));
  return planBudgets({ limit: world.limit, connections: world.connections, pods: world.pods.map((p) => p.pod), members, tables, now: world.now });
}

/**
 * The controller: switch members whose sidecar reads tables, plan, write the
 * tables (wave by wave, the writes of a wave landing in either order) then the
 * members' grants; a crash after `writes` writes loses the rest.
 */
function reconcile(world: World, writes: number, reverse = false): BudgetPlan {
  let budget = writes;
  for (const p of world.pods) {
    const m = world.members.get(keyOf(p.pod));
    if (!m || m.podUid !== p.pod.uid || m.tableFrom !== undefined || m.acknowledgement?.tableGeneration === undefined || budget <= 0) continue;
    budget -= 1;
    world.members.set(keyOf(m), { ...m, tableFrom: (tableOf(world, p.pod)?.generation ?? 0) + 1 });
  }
  const result = plan(world);
  for (const wave of tableWriteWaves(result.tables)) {
    for (const t of reverse ? [...wave].reverse() : wave) {
      if (budget <= 0) continue;
      budget -= 1;
      world.tables.set(`${t.namespace}/${t.connection}`, t.table);
      for (const d of t.table.departed ?? []) for (const [uid, m] of [...world.members].map(([, x]) => [x.podUid, x] as const)) if (uid === d.uid || (d.uid === '' && m.name === d.pod)) world.left.delete(uid);
      // The leader may stop after any write: what is durable must hold at each.
      checkSafety(world, `after writing table ${t.namespace}/${t.connection} generation ${t.table.generation}`);
    }
  }
  for (const grant of result.grants) {
    if (!grant.changed || budget <= 0) continue;
    budget -= 1;
    const previous = world.members.get(keyOf(grant));
    const sameOwner = previous?.podUid === grant.podUid;
    // A new pod under an old name starts over: not on the table until its own sidecar says it reads one.
    world.members.set(keyOf(grant), { namespace: grant.namespace, name: grant.name, podUid: grant.podUid, connection: grant.connection, grant: grant.grant, acknowledgement: sameOwner ? previous?.acknowledgement : undefined, tableFrom: sameOwner ? previous?.tableFrom : grant.tableFrom });
  }
  // The reconciler deletes orphans last, one write each, once every earlier write has landed.
  for (const orphan of result.orphans) {
    if (world.pods.some((p) => keyOf(p.pod) === keyOf(orphan)) || budget <= 0) continue;
    budget -= 1;
    world.left.delete(world.members.get(keyOf(orphan))?.podUid ?? '');
    world.members.delete(keyOf(orphan));
  }
  return result;
}

/** What the pod's sidecar reads: the table once its PoolMember says the table covers it (and it reads tables), else its PoolMember. */
function sync(world: World, p: SimPod): void {
  const s = p.sidecar;
  const m = world.members.get(keyOf(p.pod));
  if (!m || m.podUid !== p.pod.uid || !s.responsive || s.drained) return;
  const table = tableOf(world, p.pod);
  const onTable = s.readsTables && m.tableFrom !== undefined && table !== undefined && table.generation >= m.tableFrom;
  const grant = onTable ? deriveGrant(table, p.pod.name) : { ...m.grant, drain: false };
  const seen = `${onTable ? 't' : 'm'}${grant.generation}`;
  if (seen !== s.seen) {
    // A table write that leaves this pod's number alone needs no new acknowledgement.
    const same = onTable && s.seen.startsWith('t') && grant.connections === s.allowed;
    s.seen = seen;
    s.allowed = grant.connections;
    if (!same) s.applied = { generation: grant.generation, ...(s.readsTables ? { tableGeneration: onTable ? grant.generation : 0 } : {}) };
  }
  const ack = m.acknowledgement;
  const reported = ack?.generation === s.applied.generation && ack.tableGeneration === s.applied.tableGeneration && ack.connections === s.allowed;
  if (!reported && s.held <= s.allowed) s.pendingAck = { ...s.applied, connections: s.allowed };
}

function apply(world: World, op: Operation): void {
  const p = 'pod' in op && world.pods.length > 0 ? world.pods[op.pod % world.pods.length] : undefined;
  const member = p ? world.members.get(keyOf(p.pod)) : undefined;
  const alive = p !== undefined && p.pod.phase !== 'Failed';
  switch (op.kind) {
    case 'scaleUp': addPod(world, op.consumer, !op.old, op.annotated); break;
    case 'rollout': {
      addPod(world, op.consumer, true, op.consumer % 2 === 0);
      const surge = world.pods.at(-1)!;
      const old = world.pods.find((q) => q.pod.consumer === surge.pod.consumer && q !== surge && !q.pod.terminating);
      if (old) old.pod.terminating = true;
      break;
    }
    case 'terminate': if (p) p.pod.terminating = true; break;
    case 'gone': if (p && (p.pod.terminating || !alive)) leave(world, p), world.pods.splice(world.pods.indexOf(p), 1); break;
    case 'fail': if (p && alive) Object.assign(p.sidecar, { held: 0, allowed: 0, responsive: false }), p.pod.phase = 'Failed'; break;
    case 'reconcile': reconcile(world, op.writes, op.reverse); break;
    case 'limit': {
      // A lowered limit is reached as shrinks are acknowledged: until then the total may only fall.
      world.ceiling = Math.max(op.limit, countedTotal(world));
      world.heldCeiling = world.ceiling;
      world.limit = op.limit;
      break;
    }
    case 'sync': if (p && alive) sync(world, p); break;
    case 'use': if (p && alive && p.sidecar.responsive && !p.sidecar.drained) p.sidecar.held = Math.min(p.sidecar.allowed, Math.max(p.sidecar.held, op.connections)); break;
    case 'release': if (p && alive && p.sidecar.held > 0) { p.sidecar.held -= 1; sync(world, p); } break;
    case 'deliverAck':
      if (p && alive && member && member.podUid === p.pod.uid && p.sidecar.pendingAck && p.sidecar.responsive) {
        member.acknowledgement = { ...p.sidecar.pendingAck, held: p.sidecar.held, drained: p.sidecar.drained };
        p.sidecar.pendingAck = undefined;
      }
      break;
    case 'tick':
      for (let i = 0; i < world.pods.length; i += 1) {
        apply(world, { kind: 'sync', pod: i });
        if (op.busy) apply(world, { kind: 'use', pod: i, connections: Infinity });
        apply(world, { kind: op.channel === true ? 'channelAck' : 'deliverAck', pod: i });
      }
      break;
    case 'channelAck':
      // The leader hears it at once; the PoolMember gets it later (deliverAck), or never. Only a grant
      // from a table is acknowledged there (the table names the leader to send it to).
      if (p && alive && member && member.podUid === p.pod.uid && p.sidecar.pendingAck && (p.sidecar.pendingAck.tableGeneration ?? 0) > 0 && p.sidecar.responsive) {
        world.channel.set(p.pod.uid, { ...p.sidecar.pendingAck, held: p.sidecar.held, drained: p.sidecar.drained });
      }
      break;
    case 'newLeader': world.channel.clear(); break;
    case 'lost':
      // The node is gone: its sidecar neither drains nor answers, and PostgreSQL keeps its backends until its
      // keepalives give up. The pod is force-deleted (its PoolMember left for the controller) or marked Failed.
      if (p && alive) {
        if (!op.finished) leave(world, p);
        // Only pods on tables are held after they go (a sidecar that reads only its PoolMember is released at
        // once, as before tables): the backends of others are modelled as closed with their sidecar.
        if (member?.tableFrom !== undefined && member.podUid === p.pod.uid) world.lostBackends.push({ connections: p.sidecar.held, until: world.now + HOLD_SECONDS * 1000 });
        Object.assign(p.sidecar, { held: 0, allowed: 0, responsive: false, pendingAck: undefined });
        if (op.finished) p.pod.phase = 'Failed';
        else world.pods.splice(world.pods.indexOf(p), 1);
      }
      break;
    case 'vanish':
      // While no controller runs: the pod is force-deleted straight from running (its node lost) and the
      // garbage collector takes its PoolMember, so the controller that starts next never sees either.
      // PostgreSQL keeps its backends as for 'lost'; the new leader heard nothing over the channel.
      if (p && alive) {
        const table = tableOf(world, p.pod);
        const covered = member?.podUid === p.pod.uid && member.tableFrom !== undefined && table !== undefined && table.generation >= member.tableFrom;
        // A pod not yet covered by its table reads its PoolMember's grant: released at once, as before tables.
        if (covered) world.lostBackends.push({ connections: p.sidecar.held, until: world.now + HOLD_SECONDS * 1000 });
        if (member?.podUid === p.pod.uid) world.members.delete(keyOf(p.pod));
        world.pods.splice(world.pods.indexOf(p), 1);
        world.channel.clear();
        // Its table entry alone now says what it may hold: a shrink in flight counts what it releases.
        world.ceiling = Math.max(world.ceiling, countedTotal(world));
      }
      break;
    case 'advance':
      world.now += op.seconds * 1000;
      world.lostBackends = world.lostBackends.filter((b) => b.until > world.now);
      break;
    case 'loseAck': if (p) p.sidecar.pendingAck = undefined; break;
    case 'hang': if (p) p.sidecar.responsive = false; break;
    case 'wake': if (p && alive) p.sidecar.responsive = true; break;
    case 'drain':
      if (p && alive && p.pod.terminating && p.sidecar.responsive && member && member.podUid === p.pod.uid) {
        Object.assign(p.sidecar, { held: 0, allowed: 0, drained: true, pendingAck: undefined });
        member.acknowledgement = { generation: member.acknowledgement?.generation ?? 0, tableGeneration: member.acknowledgement?.tableGeneration, connections: 0, held: 0, drained: true };
      }
      break;
  }
}

/**
 * What a pod may hold by what is durable (tables and PoolMembers, never the
 * leader's memory): on a table, the table's count; else max(grant,
 * acknowledged); 0 for pods failed or drained on termination.
 */
function countedFor(world: World, p: SimPod): number {
  const m = world.members.get(keyOf(p.pod));
  if (!m || m.podUid !== p.pod.uid) return 0;
  // A failed pod on a table counts by its entry until the table records its departure (then the record counts).
  if (p.pod.phase === 'Failed') {
    const recorded = [...world.tables.values()].some((t) => (t.departed ?? []).some((d) => d.uid === m.podUid));
    return m.tableFrom === undefined || m.acknowledgement?.drained || recorded ? 0 : countedMember(world, m, tableOf(world, p.pod));
  }
  if (p.pod.terminating && m.acknowledgement?.drained) return 0;
  return countedMember(world, m, tableOf(world, p.pod));
}

function countedMember(_world: World, m: MemberState, table: GrantTable | undefined): number {
  const inForce = memberGrantInForce(m, table);
  if (inForce.fromTable && inForce.entry && table) return tableAccount(inForce.entry, table, m.tableFrom ?? 0, m.acknowledgement).reservation;
  return Math.max(inForce.connections, m.acknowledgement?.connections ?? 0);
}

/** Notes what a pod on a table counts as it goes (once): its table entry means nothing once the pod is gone from it. */
function leave(world: World, p: SimPod): void {
  const m = world.members.get(keyOf(p.pod));
  if (m && m.podUid === p.pod.uid && m.tableFrom !== undefined && !world.left.has(m.podUid)) world.left.set(m.podUid, countedFor(world, p));
}

/**
 * A pod on a table that finished or is gone without a drain: what it counted
 * as it left, until a table records its departure (then that record counts);
 * nothing for a sidecar that reads only its PoolMember (released at once, as
 * before tables) or after a drain.
 */
function countedGone(world: World, m: MemberState): number {
  if (m.acknowledgement?.drained) return 0;
  return world.left.get(m.podUid) ?? 0;
}

function countedTotal(world: World): number {
  let departed = 0;
  for (const [k, table] of world.tables) {
    departed += departedHeld(table, world.now);
    // Pods gone from its default without a trace but the table's count of them (a 'vanish'): what is
    // durable says they were there, so they are counted until a table records them.
    const members = [...world.members.values()].filter((m) => `${m.namespace}/${m.connection}` === k);
    departed += unlistedDeparted(table, members) * defaultHolding(table);
    // Pods listed by name that are gone with their PoolMember: their entry counts until a table records them.
    const namespace = k.slice(0, k.indexOf('/'));
    for (const e of table.exceptions) {
      for (const name of e.pods) {
        const there = world.members.has(`${namespace}/${name}`) || world.pods.some((p) => keyOf(p.pod) === `${namespace}/${name}`);
        if (!there && !(table.departed ?? []).some((d) => d.pod === name)) departed += Math.max(e.connections, e.releasing ?? 0);
      }
    }
  }
  const present = new Set(world.pods.map((p) => keyOf(p.pod)));
  let orphans = 0;
  for (const m of world.members.values()) if (!present.has(keyOf(m))) orphans += countedGone(world, m);
  return world.pods.reduce((sum, p) => sum + countedFor(world, p), 0) + departed + orphans;
}

function checkSafety(world: World, step: string): void {
  const counted = countedTotal(world);
  world.ceiling = Math.max(world.limit, Math.min(world.ceiling, counted));
  world.heldCeiling = Math.max(world.limit, Math.min(world.heldCeiling ?? world.ceiling, world.ceiling));
  assert.ok(counted <= world.ceiling, `${step}: counted ${counted} > ${world.ceiling} (limit ${world.limit})`);
  const held = world.pods.reduce((sum, p) => sum + p.sidecar.held, 0) + world.lostBackends.reduce((sum, b) => sum + b.connections, 0);
  assert.ok(held <= world.heldCeiling, `${step}: sidecars and lost pods' backends hold ${held} > ${world.heldCeiling}`);
  for (const p of world.pods) {
    assert.ok(p.sidecar.allowed <= countedFor(world, p) || p.sidecar.drained || p.pod.phase === 'Failed', `${step}: ${p.pod.name} may hold ${p.sidecar.allowed}, counted ${countedFor(world, p)}`);
  }
}

/** Leave the fleet alone: sidecars answer, terminating pods go; reconcile until settled. */
function settle(world: World): BudgetPlan {
  for (const p of world.pods) if (p.pod.phase !== 'Failed') p.sidecar.responsive = true;
  // They go as 'gone' takes a pod: what each counted is remembered until a table records its departure.
  for (const p of world.pods) if (p.pod.terminating || p.pod.phase === 'Failed') leave(world, p);
  world.pods = world.pods.filter((p) => !p.pod.terminating && p.pod.phase !== 'Failed');
  // Pods that left without a drain are counted for the departure hold, then released.
  reconcile(world, Infinity);
  apply(world, { kind: 'advance', seconds: 2 * HOLD_SECONDS });
  let result = reconcile(world, Infinity);
  // At least a few rounds: a sidecar that never reported is switched onto the table only after it does.
  for (let round = 0; round < 16 && (round < 3 || !(result.settled && result.tables.every((t) => !t.changed))); round += 1) {
    for (const [i, p] of world.pods.entries()) {
      sync(world, p);
      p.sidecar.held = Math.min(p.sidecar.held, p.sidecar.allowed);
      sync(world, p);
      apply(world, { kind: 'deliverAck', pod: i });
      checkSafety(world, `settle round ${round}`);
    }
    result = reconcile(world, Infinity);
    checkSafety(world, `settle round ${round} reconcile`);
  }
  return result;
}

const worldArbOf = (shape: { minConnections: number; maxConnections: number }): fc.Arbitrary<World> => fc.record({
  limit: fc.integer({ min: 0, max: 60 }),
  connections: fc.array(fc.array(fc.record({ weight: fc.integer({ min: 1, max: 3 }), minPerPod: fc.integer({ min: 0, max: 3 }) }), { minLength: 1, maxLength: 2 }), { minLength: shape.minConnections, maxLength: shape.maxConnections }),
  initialPods: fc.array(fc.record({ consumer: fc.nat(3), old: fc.boolean(), annotated: fc.boolean() }), { maxLength: 10 }),
}).map(({ limit, connections, initialPods }): World => {
  const world: World = {
    limit, ceiling: limit,
    connections: connections.map((consumers, i) => ({ namespace: `ns${i}`, name: `db${i}`, budgetStrategy: 'Dynamic', departureHoldSeconds: HOLD_SECONDS, consumers: consumers.map((k, j) => ({ name: `c${i}${j}`, ...k, processesPerPod: 1 })) })),
    pods: [], members: new Map(), tables: new Map(), channel: new Map(), serial: 0, now: 1_800_000_000_000, lostBackends: [], left: new Map(),
  };
  for (const p of initialPods) addPod(world, p.consumer, !p.old, p.annotated);
  return world;
});
const worldArb = worldArbOf({ minConnections: 1, maxConnections: 2 });
/** Several DatabaseConnections on one server: capacity moves between tables. */
const sharedServerArb = worldArbOf({ minConnections: 2, maxConnections: 3 });

const pod = fc.nat(20);
const operationArb: fc.Arbitrary<Operation> = fc.oneof(
  { weight: 2, arbitrary: fc.record({ consumer: fc.nat(5), old: fc.boolean(), annotated: fc.boolean() }).map((o) => ({ kind: 'scaleUp' as const, ...o })) },
  { weight: 1, arbitrary: fc.nat(5).map((consumer) => ({ kind: 'rollout' as const, consumer })) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 60 }).map((limit) => ({ kind: 'limit' as const, limit })) },
  { weight: 6, arbitrary: fc.record({ writes: fc.oneof(fc.constant(Infinity), fc.nat(3)), reverse: fc.boolean() }).map((o) => ({ kind: 'reconcile' as const, ...o })) },
  { weight: 4, arbitrary: fc.record({ pod, connections: fc.nat(30) }).map((o) => ({ kind: 'use' as const, ...o })) },
  { weight: 4, arbitrary: fc.record({ busy: fc.boolean(), channel: fc.boolean() }).map((o) => ({ kind: 'tick' as const, ...o })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'newLeader' as const }) },
  { weight: 2, arbitrary: fc.record({ pod, finished: fc.boolean() }).map((o) => ({ kind: 'lost' as const, ...o })) },
  { weight: 2, arbitrary: fc.integer({ min: 1, max: 20 }).map((seconds) => ({ kind: 'advance' as const, seconds })) },
  ...([['terminate', 1], ['gone', 1], ['fail', 1], ['sync', 6], ['release', 3], ['deliverAck', 3], ['channelAck', 5], ['loseAck', 1], ['hang', 1], ['wake', 1], ['drain', 2], ['vanish', 1]] as const)
    .map(([kind, weight]) => ({ weight, arbitrary: pod.map((i) => ({ kind, pod: i })) })),
);

/** Capacity moving between tables: pods come and go, and acknowledge over the channel between frequent passes. */
const sharedServerOperationArb: fc.Arbitrary<Operation> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ consumer: fc.nat(5), old: fc.constant(false), annotated: fc.boolean() }).map((o) => ({ kind: 'scaleUp' as const, ...o })) },
  { weight: 1, arbitrary: fc.nat(5).map((consumer) => ({ kind: 'rollout' as const, consumer })) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 30 }).map((limit) => ({ kind: 'limit' as const, limit })) },
  { weight: 8, arbitrary: fc.record({ writes: fc.oneof(fc.constant(Infinity), fc.nat(3)), reverse: fc.boolean() }).map((o) => ({ kind: 'reconcile' as const, ...o })) },
  { weight: 6, arbitrary: fc.record({ busy: fc.boolean(), channel: fc.oneof(fc.constant(true), fc.constant(true), fc.constant(false)) }).map((o) => ({ kind: 'tick' as const, ...o })) },
  { weight: 1, arbitrary: fc.record({ pod, finished: fc.boolean() }).map((o) => ({ kind: 'lost' as const, ...o })) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 20 }).map((seconds) => ({ kind: 'advance' as const, seconds })) },
  ...([['terminate', 2], ['gone', 2], ['release', 2], ['channelAck', 2], ['drain', 1], ['vanish', 1], ['newLeader', 0]] as const)
    .filter(([, weight]) => weight > 0).map(([kind, weight]) => ({ weight, arbitrary: pod.map((i) => ({ kind, pod: i })) })),
);

describe('grant tables on a simulated fleet (property)', function () {
  // Thousands of simulated passes: seconds on a quiet machine, more next to a busy one.
  this.timeout(120_000);
  /** Random worlds and operations, safety checked after every step (and every table write within a reconcile). */
  const safetyProperty = (worlds: fc.Arbitrary<World>, operations: fc.Arbitrary<Operation>): fc.IPropertyWithHooks<[World, Operation[]]> =>
    fc.property(worlds, fc.array(operations, { minLength: 20, maxLength: 150 }), (generated, steps) => {
      // fast-check replays a value while shrinking: each run mutates its own copy.
      const world = structuredClone(generated);
      for (const [i, op] of steps.entries()) {
        apply(world, op);
        checkSafety(world, `step ${i} ${JSON.stringify(op)}`);
      }
    });

  it('safety: what is counted and what sidecars hold stay within the limit (or shrink toward a lowered one)', function () {
    fc.assert(safetyProperty(worldArb, operationArb), { numRuns: 300 });
  });

  it('safety with several tables on one server: a table grows only with what is durably released', function () {
    fc.assert(safetyProperty(sharedServerArb, sharedServerOperationArb), { numRuns: 1200 });
  });

  it('progress: left alone, every pod reaches its target, acknowledged, old and new sidecars alike; nothing more is written', function () {
    fc.assert(fc.property(worldArb, fc.array(operationArb, { minLength: 10, maxLength: 100 }), (generated, operations) => {
      // fast-check replays a value while shrinking: each run mutates its own copy.
      const world = structuredClone(generated);
      for (const op of operations) apply(world, op);
      const result = settle(world);
      assert.ok(result.settled, `not settled: ${JSON.stringify(result.grants.filter((g) => g.waitingFor !== 'none'))}`);
      for (const g of result.grants) {
        assert.equal(g.grant.connections, g.target, `${g.name} at its target`);
        const p = world.pods.find((q) => q.pod.name === g.name)!;
        assert.equal(p.sidecar.allowed, g.target, `${g.name}'s sidecar applies it`);
        assert.equal(g.table, p.sidecar.readsTables, `${g.name} is on the table exactly when its sidecar reads tables: ${JSON.stringify({ m: world.members.get(keyOf(g)), s: p.sidecar, t: tableOf(world, p.pod) })}`);
      }
      const again = reconcile(world, Infinity);
      assert.ok(again.grants.every((g) => !g.changed) && again.tables.every((t) => !t.changed), 'a settled fleet writes nothing');
    }), { numRuns: 200 });
  });

  it('a grow in one table waits for what another table releases: every order of a pass\'s table writes keeps the limit', function () {
    // Two connections share 12: a has 2 pods at 3, b 2 pods at 3. Two more pods for b
    // shift 2 from a to b. a's pods stay busy at 3 while b's new pods join b's table
    // with what b's own pods gave back; then a's pods acknowledge over the channel,
    // and one pass records that in a's table and grows b's new pods with what it freed.
    const world: World = {
      limit: 12, ceiling: 12,
      connections: ['a', 'b'].map((n) => ({ namespace: n, name: n, budgetStrategy: 'Dynamic' as const, consumers: [{ name: n, weight: 1, minPerPod: 0, processesPerPod: 1 }] })),
      pods: [], members: new Map(), tables: new Map(), channel: new Map(), serial: 0, now: 1_800_000_000_000, lostBackends: [], left: new Map(),
    };
    for (const c of [0, 0, 1, 1]) addPod(world, c, true);
    settle(world);
    assert.deepEqual(world.pods.map((p) => p.sidecar.allowed), [3, 3, 3, 3]);
    addPod(world, 1, true);
    addPod(world, 1, true);
    let sawWaves = false;
    for (let round = 0; round < 12; round += 1) {
      for (const reverse of [false, true]) {
        // Every prefix of the pass's writes, in both orders, on a copy of the world.
        for (let writes = 1; writes <= 3; writes += 1) reconcile(structuredClone(world), writes, reverse);
      }
      sawWaves ||= tableWriteWaves(plan(world).tables).length > 1;
      reconcile(world, Infinity);
      // Pods on a table acknowledge over the channel only; new pods report on their PoolMembers and are put on b's table.
      for (const [i, p] of world.pods.entries()) {
        if (p.pod.connection === 'a' && round < 4) continue;
        apply(world, { kind: 'sync', pod: i });
        apply(world, { kind: 'use', pod: i, connections: Infinity });
        apply(world, { kind: world.members.get(keyOf(p.pod))?.tableFrom === undefined ? 'deliverAck' : 'channelAck', pod: i });
      }
      checkSafety(world, `round ${round}`);
    }
    assert.ok(sawWaves, 'some pass wrote its tables in two waves');
    assert.deepEqual(world.pods.map((p) => p.sidecar.allowed), [2, 2, 2, 2, 2, 2]);
  });

  it('one table write carries every pod\'s grant and change in flight: encode then derive gives each pod its entry', function () {
    const inFlight = fc.option(fc.record({ since: fc.integer({ min: 1, max: 9 }), releasing: fc.option(fc.integer({ min: 1, max: 8 }), { nil: undefined }) }), { nil: undefined });
    fc.assert(fc.property(fc.uniqueArray(fc.record({ name: fc.stringMatching(/^[a-z]{1,6}$/), connections: fc.nat(5), drain: fc.boolean(), change: inFlight }), { selector: (e) => e.name, maxLength: 40 }), (drafts) => {
      const entries = drafts.map(({ change, ...e }) => ({ ...e, ...(change ? { since: change.since, ...(change.releasing === undefined ? {} : { releasing: change.releasing }) } : {}) }));
      const table = encodeGrantTable(entries, 7);
      for (const e of entries) {
        assert.deepEqual(deriveGrant(table, e.name), { connections: e.connections, generation: 7, drain: e.drain });
        const { name: _name, ...expected } = e;
        assert.deepEqual(deriveEntry(table, e.name), expected);
      }
      const key = (e: { connections: number; since?: number | undefined; releasing?: number | undefined }): string => `${e.connections}/${e.since}/${e.releasing}`;
      const listed = table.exceptions.reduce((n, x) => n + x.pods.length, 0);
      assert.ok(listed <= entries.length - Math.max(0, ...[...new Set(entries.map(key))].map((k) => entries.filter((e) => !e.drain && key(e) === k).length)), 'only pods off the most common entry are listed');
    }), { numRuns: 200 });
  });
});
