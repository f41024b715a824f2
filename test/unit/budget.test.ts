/** The budget planner on hand-made cases, and the fair split and limit helpers. */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  autoMaxConnections, budgetConditions, deadPeerSeconds, departureHoldAdvice, grantTableOf, loginConnectionCap, fairShares, planBudgets, reservedConnections, resolveLimit, serverKey, sharedLimit,
  type BudgetInput, type ConnectionInput, type GrantTable, type MemberState, type PodInput, type ShareUnit,
} from '../../src/core/budget/index.ts';

function pod(name: string, consumer = 'web', extra: Partial<PodInput> = {}): PodInput {
  return { namespace: 'shop', name, uid: `uid-${name}`, connection: 'orders', consumer, phase: 'Running', terminating: false, ready: true, ...extra };
}

/** A PoolMember whose grant the sidecar has acknowledged. */
function member(name: string, connections: number, generation = 1, extra: Partial<MemberState> = {}): MemberState {
  return {
    namespace: 'shop', name, podUid: `uid-${name}`, grant: { connections, generation },
    acknowledgement: { generation, connections, held: connections, drained: false }, ...extra,
  };
}

function orders(consumers: ConnectionInput['consumers'], budgetStrategy: ConnectionInput['budgetStrategy'] = 'Dynamic'): ConnectionInput {
  return { namespace: 'shop', name: 'orders', budgetStrategy, consumers };
}

const web = { name: 'web', weight: 1, minPerPod: 1, processesPerPod: 2 };

function grantsOf(input: BudgetInput): Record<string, number> {
  return Object.fromEntries(planBudgets(input).grants.map((g) => [g.name, g.grant.connections]));
}

describe('budget planner', function () {
  it('starts a table created again past the last generation written before, which a sidecar may have read without answering', function () {
    const onOld = (name: string): MemberState => member(name, 5, 6, { tableFrom: 2, acknowledgement: { generation: 6, tableGeneration: 6, connections: 5, held: 5, drained: false } });
    const input: BudgetInput = { limit: 10, connections: [orders([web])], pods: [pod('a', 'web', { readsTables: true }), pod('b', 'web', { readsTables: true })], members: [onOld('a'), onOld('b')] };
    const without = planBudgets(input).tables[0]!;
    assert.equal(without.table.generation, 7, 'past what the sidecars reported');
    const floored = planBudgets({ ...input, tableGenerationFloors: new Map([['shop/orders', 9]]) }).tables[0]!;
    assert.ok(floored.changed);
    assert.equal(floored.table.generation, 10, 'past the last table written, 9, which no sidecar reported yet');
  });

  it('creates the PoolMember of a pod whose sidecar reads tables on the table at 0, and grows it in the table once its sidecar has answered', function () {
    const table = { generation: 4, perPod: 5, recordsChanges: true, exceptions: [] };
    const tables = [{ namespace: 'shop', connection: 'orders', table }];
    const b = pod('b', 'web', { readsTables: true });
    const first = planBudgets({ limit: 10, connections: [orders([web])], pods: [pod('a'), b], members: [member('a', 5, 4, { tableFrom: 1, acknowledgement: { generation: 4, tableGeneration: 4, connections: 5, held: 5, drained: false } })], tables });
    const created = first.grants.find((g) => g.name === 'b')!;
    assert.deepEqual([created.changed, created.table, created.tableFrom, created.grant.connections], [true, true, 5, 0], 'created on the table from the next generation, at 0');
    const written = first.tables[0]!;
    assert.equal(written.changed, true);
    assert.equal(written.table.generation, 5);
    assert.deepEqual(written.table.exceptions.map((e) => [e.connections, e.pods, e.since]), [[0, ['b'], undefined]], 'the table lists it at 0 from that generation');
    assert.equal(first.grants.find((g) => g.name === 'a')!.grant.connections, 5, 'a keeps its 5');
    // Its sidecar has not answered: not grown, and nothing is written for it.
    const silentMember = { namespace: 'shop', name: 'b', podUid: 'uid-b', grant: { connections: 0, generation: 0 }, tableFrom: 5 };
    const after = { ...table, generation: 5, exceptions: written.table.exceptions };
    const a = member('a', 5, 5, { tableFrom: 1, acknowledgement: { generation: 5, tableGeneration: 5, connections: 5, held: 5, drained: false } });
    const silent = planBudgets({ limit: 10, connections: [orders([web])], pods: [pod('a'), b], members: [a, silentMember], tables: [{ namespace: 'shop', connection: 'orders', table: after }] });
    assert.equal(silent.grants.find((g) => g.name === 'b')!.grant.connections, 0);
    assert.equal(silent.grants.find((g) => g.name === 'b')!.changed, false);
    assert.equal(silent.grants.find((g) => g.name === 'b')!.waitingFor, 'acknowledgement', 'it waits for its sidecar (the 5 it will get are free), so its answer wakes the controller');
    const answered = planBudgets({ limit: 10, connections: [orders([web])], pods: [pod('a'), b], members: [a, { ...silentMember, acknowledgement: { generation: 5, tableGeneration: 5, connections: 0, held: 0, drained: false } }], tables: [{ namespace: 'shop', connection: 'orders', table: after }] });
    assert.deepEqual(answered.tables[0]!.table.perPod, 5, 'grown in the table, one write for the connection');
    assert.equal(answered.grants.find((g) => g.name === 'b')!.changed, false, 'no PoolMember write');
  });

  it('starts a table created again past every generation its sidecars reported, so their old statuses acknowledge nothing in it', function () {
    // The DatabaseConnection was deleted and applied again: its old table is gone; the sidecars last reported generation 11.
    const reported = (name: string): MemberState => member(name, 5, 11, { tableFrom: 3, acknowledgement: { generation: 11, tableGeneration: 11, connections: 5, held: 5, drained: false } });
    const plan = planBudgets({ limit: 8, connections: [orders([web])], pods: [pod('a'), pod('b')], members: [reported('a'), reported('b')], tables: [] });
    assert.equal(plan.tables[0]!.table.generation, 12);
    // The halved limit is a shrink in flight, not acknowledged by the status of generation 11.
    assert.deepEqual(plan.tables[0]!.table.perPodSince, 12);
    assert.equal(plan.allocated, 10, 'both still counted at what they hold until they acknowledge');
  });

  it('creates a new pod\'s PoolMember at 0, then grants its share from free capacity once its sidecar has reported', function () {
    const first = planBudgets({ limit: 10, connections: [orders([web])], pods: [pod('a')], members: [] });
    assert.deepEqual(first.grants.map((g) => [g.grant, g.changed, g.target]), [[{ connections: 0, generation: 0 }, true, 10]]);
    const silent = planBudgets({ limit: 10, connections: [orders([web])], pods: [pod('a')], members: [member('a', 0, 0, { acknowledgement: undefined })] });
    assert.deepEqual([silent.grants[0]!.grant, silent.grants[0]!.waitingFor], [{ connections: 0, generation: 0 }, 'acknowledgement'], 'no grant before the sidecar answers');
    const second = planBudgets({ limit: 10, connections: [orders([web])], pods: [pod('a')], members: [member('a', 0, 0)] });
    assert.deepEqual(second.grants[0]!.grant, { connections: 10, generation: 1 });
    assert.equal(second.allocated, 10);
    assert.deepEqual(second.connections[0]!.consumers, [{ name: 'web', pods: 1, perPodBudget: 10, perProcessBudget: 5 }]);
  });

  it('shrinks before it grows: a surge pod waits until the shrink is acknowledged', function () {
    const pods = [pod('a'), pod('b'), pod('c')];
    const input: BudgetInput = { limit: 10, connections: [orders([web])], pods, members: [member('a', 5), member('b', 5), member('c', 0, 0)] };
    const plan = planBudgets(input);
    assert.deepEqual(grantsOf(input), { a: 4, b: 3, c: 0 }, 'remainder to the first pod by name; c waits');
    assert.equal(plan.allocated, 10, 'shrinks free nothing until acknowledged');
    assert.equal(plan.grants[2]!.waitingFor, 'capacity');
    // The sidecars acknowledge the shrinks.
    const acked = { ...input, members: [member('a', 4, 2), member('b', 3, 2), member('c', 0, 0)] };
    assert.deepEqual(grantsOf(acked), { a: 4, b: 3, c: 3 });
  });

  it('keeps a grant whose acknowledgement is missing (one change in flight per pod)', function () {
    const unacked: MemberState = { ...member('a', 8, 2), acknowledgement: { generation: 1, connections: 2, held: 2, drained: false } };
    const plan = planBudgets({ limit: 8, connections: [orders([web])], pods: [pod('a'), pod('b')], members: [unacked, member('b', 0, 0)] });
    assert.deepEqual(plan.grants.map((g) => [g.name, g.grant.connections, g.waitingFor]), [['a', 8, 'acknowledgement'], ['b', 0, 'capacity']]);
  });

  it('keeps a terminating pod\'s reservation until it drains, and asks it to drain', function () {
    const pods = [pod('a', 'web', { terminating: true }), pod('b')];
    const holding = planBudgets({ limit: 10, connections: [orders([web])], pods, members: [member('a', 6), member('b', 4)] });
    assert.deepEqual(holding.grants.map((g) => [g.name, g.grant.connections, g.drain]), [['a', 0, true], ['b', 4, false]]);
    assert.equal(holding.allocated, 10);
    const drained = member('a', 0, 2, { acknowledgement: { generation: 1, connections: 0, held: 0, drained: true } });
    assert.deepEqual(grantsOf({ limit: 10, connections: [orders([web])], pods, members: [drained, member('b', 4)] }), { a: 0, b: 10 });
  });

  it('releases the reservation of a pod that is gone, or replaced by a new pod of the same name', function () {
    const plan = planBudgets({ limit: 10, connections: [orders([web])], pods: [pod('b')], members: [member('a', 10), member('b', 0, 0)] });
    assert.deepEqual(plan.orphans, [{ namespace: 'shop', name: 'a' }]);
    assert.equal(plan.grants[0]!.grant.connections, 10);
    const replaced = planBudgets({ limit: 10, connections: [orders([web])], pods: [pod('a', 'web', { uid: 'new' })], members: [member('a', 10, 4)] });
    assert.deepEqual(replaced.grants[0]!.grant, { connections: 0, generation: 5 }, 'generations continue for the new pod');
    assert.ok(replaced.grants[0]!.changed);
  });

  it('counts a pod on a table that left without a drain for the departure hold, recorded in its table, then releases it', function () {
    const now = Date.parse('2026-12-03T10:00:00Z');
    const connection = { ...orders([web]), departureHoldSeconds: 60 };
    const table = { generation: 3, perPod: 5, recordsChanges: true, exceptions: [] };
    const tables = [{ namespace: 'shop', connection: 'orders', table }];
    const onTable = (name: string, extra: Record<string, unknown> = {}): ReturnType<typeof member> => ({ ...member(name, 0, 0), connection: 'orders', tableFrom: 1, acknowledgement: { generation: 3, tableGeneration: 3, connections: 5, held: 5, drained: false }, ...extra });
    // a's pod is gone (its node lost, the pod force-deleted): its 5 stay counted, b does not grow into them.
    const left = planBudgets({ limit: 10, now, connections: [connection], pods: [pod('b')], members: [onTable('a'), onTable('b')], tables });
    const recorded = left.tables[0]!.table;
    assert.deepEqual(recorded.departed, [{ pod: 'a', uid: 'uid-a', connections: 5, until: '2026-12-03T10:01:00.000Z' }]);
    assert.equal(left.allocated, 10);
    assert.equal(left.connections[0]!.departed, 5);
    assert.equal(left.nextDepartureExpiry, now + 60_000);
    assert.equal(left.grants[0]!.grant.connections, 5, 'b waits: the departed pod may still hold 5');
    // Its PoolMember gone (deleted, or taken by the garbage collector), the record still counts until it expires.
    const later = planBudgets({ limit: 10, now: now + 30_000, connections: [connection], pods: [pod('b')], members: [onTable('b')], tables: [{ namespace: 'shop', connection: 'orders', table: recorded }] });
    assert.equal(later.grants[0]!.grant.connections, 5);
    assert.equal(later.tables[0]!.changed, false, 'nothing to write meanwhile');
    const expired = planBudgets({ limit: 10, now: now + 60_000, connections: [connection], pods: [pod('b')], members: [onTable('b')], tables: [{ namespace: 'shop', connection: 'orders', table: recorded }] });
    assert.equal(expired.tables[0]!.table.departed, undefined);
    assert.equal(expired.grants[0]!.grant.connections, 10);
    // A pod that reported its drain, or a connection without a hold, is released at once.
    const drained = onTable('a', { acknowledgement: { generation: 3, tableGeneration: 3, connections: 0, held: 0, drained: true } });
    assert.equal(planBudgets({ limit: 10, now, connections: [connection], pods: [pod('b')], members: [drained, onTable('b')], tables }).grants[0]!.grant.connections, 10);
    assert.equal(planBudgets({ limit: 10, now, connections: [orders([web])], pods: [pod('b')], members: [onTable('a'), onTable('b')], tables }).grants[0]!.grant.connections, 10);
    // Recorded from a view that missed the drain (the cache showed the pod gone first): the drain, once seen, ends
    // the record, whether on its PoolMember still there or as the last state of one since taken with its pod.
    const drainSeen = planBudgets({ limit: 10, now: now + 5_000, connections: [connection], pods: [pod('b')], members: [drained, onTable('b')], tables: [{ namespace: 'shop', connection: 'orders', table: recorded }] });
    assert.equal(drainSeen.tables[0]!.table.departed, undefined);
    assert.equal(drainSeen.grants.find((g) => g.name === 'b')!.grant.connections, 10);
    const drainedGone = planBudgets({ limit: 10, now: now + 5_000, connections: [connection], pods: [pod('b')], members: [onTable('b')], tables: [{ namespace: 'shop', connection: 'orders', table: recorded }], drainedPodUids: new Set(['uid-a']) });
    assert.equal(drainedGone.tables[0]!.table.departed, undefined);
    assert.equal(drainedGone.grants[0]!.grant.connections, 10);
    // A terminating pod listed by name, whose pod and PoolMember were both gone from the view that planned it: recorded by
    // name only; its drain, seen later as the last state of its PoolMember, ends the record by name, or prevents it.
    const listed = { generation: 4, perPod: 5, recordsChanges: true, exceptions: [{ pods: ['a'], connections: 5, drain: true }] };
    const byName = planBudgets({ limit: 10, now, connections: [connection], pods: [pod('b')], members: [onTable('b')], tables: [{ namespace: 'shop', connection: 'orders', table: listed }] });
    assert.deepEqual(byName.tables[0]!.table.departed?.map((d) => [d.pod, d.uid, d.connections]), [['a', '', 5]]);
    const nameSeen = planBudgets({ limit: 10, now: now + 1_000, connections: [connection], pods: [pod('b')], members: [onTable('b')], tables: [{ namespace: 'shop', connection: 'orders', table: byName.tables[0]!.table }], drainedPodNames: new Set(['shop/a']) });
    assert.equal(nameSeen.tables[0]!.table.departed, undefined);
    assert.equal(nameSeen.grants[0]!.grant.connections, 10);
    const neverRecorded = planBudgets({ limit: 10, now, connections: [connection], pods: [pod('b')], members: [onTable('b')], tables: [{ namespace: 'shop', connection: 'orders', table: listed }], drainedPodNames: new Set(['shop/a']) });
    assert.equal(neverRecorded.tables[0]!.table.departed, undefined);
    // A pod that finished (Failed: its node gone, marked by the pod garbage collector) without a drain is held the same way.
    const failed = planBudgets({ limit: 10, now, connections: [connection], pods: [pod('a', 'web', { phase: 'Failed' }), pod('b')], members: [onTable('a'), onTable('b')], tables });
    assert.deepEqual(failed.tables[0]!.table.departed?.map((d) => [d.pod, d.connections]), [['a', 5]]);
    assert.equal(failed.grants.find((g) => g.name === 'b')!.grant.connections, 5);
  });

  describe('pods that leave a table\'s default unseen', function () {
    const now = Date.parse('2026-12-03T10:00:00Z');
    const connection = { ...orders([web]), departureHoldSeconds: 60 };
    const onTable = (name: string, connections = 5, extra: Partial<MemberState> = {}): MemberState => ({ ...member(name, 0, 0), connection: 'orders', tableFrom: 1, acknowledgement: { generation: 5, tableGeneration: 5, connections, held: connections, drained: false }, ...extra });
    const tableWith = (table: GrantTable): BudgetInput['tables'] => [{ namespace: 'shop', connection: 'orders', table }];
    // a and b on the default at 5 each; the table counts them.
    const counted: GrantTable = { generation: 5, perPod: 5, recordsChanges: true, perPodPods: 2, exceptions: [] };

    it('holds what the pods the table\'s default counted, and no PoolMember accounts for, may still hold, from when it notices them gone, for the departure hold', function () {
      // a was force-deleted from Running and its PoolMember collected while no controller ran: nothing names it.
      const noticed = planBudgets({ limit: 10, now, connections: [connection], pods: [pod('b')], members: [onTable('b')], tables: tableWith(counted) });
      const table = noticed.tables[0]!.table;
      assert.deepEqual(table.departed, [{ pod: '(1 pod of the default at generation 5)', uid: '', connections: 5, until: '2026-12-03T10:01:00.000Z' }]);
      assert.equal(table.perPodPods, 1, 'the new table counts only b');
      assert.equal(noticed.grants[0]!.target, 10);
      assert.equal(noticed.grants[0]!.grant.connections, 5, 'b does not grow into what a\'s backends may still hold');
      assert.equal(noticed.allocated, 10);
      assert.equal(noticed.nextDepartureExpiry, now + 60_000);
      // The record holds them from then on; the table's count no longer includes them, so they are held once.
      const later = planBudgets({ limit: 10, now: now + 30_000, connections: [connection], pods: [pod('b')], members: [onTable('b')], tables: tableWith(table) });
      assert.equal(later.tables[0]!.changed, false);
      assert.equal(later.grants[0]!.grant.connections, 5);
      const expired = planBudgets({ limit: 10, now: now + 60_000, connections: [connection], pods: [pod('b')], members: [onTable('b')], tables: tableWith(table) });
      assert.equal(expired.tables[0]!.table.departed, undefined);
      assert.equal(expired.grants[0]!.grant.connections, 10);
      // Without it, b would have grown at once.
      const uncounted = { ...counted, perPodPods: undefined };
      assert.equal(planBudgets({ limit: 10, now, connections: [connection], pods: [pod('b')], members: [onTable('b')], tables: tableWith(uncounted) }).grants[0]!.grant.connections, 10);
    });

    it('holds what a shrink of the default in flight releases for each of them', function () {
      const shrinking: GrantTable = { ...counted, perPod: 3, perPodSince: 5, perPodReleasing: 5 };
      const plan = planBudgets({ limit: 10, now, connections: [connection], pods: [pod('b')], members: [onTable('b', 3)], tables: tableWith(shrinking) });
      assert.deepEqual(plan.tables[0]!.table.departed?.map((d) => [d.pod, d.connections]), [['(1 pod of the default at generation 5)', 5]]);
    });

    it('takes a new pod of the same name (a StatefulSet\'s) for no pod of the default: only the controller puts a pod there', function () {
      const plan = planBudgets({ limit: 10, now, connections: [connection], pods: [pod('a', 'web', { uid: 'uid-a2', readsTables: true }), pod('b')], members: [onTable('b')], tables: tableWith(counted) });
      const table = plan.tables[0]!.table;
      assert.deepEqual(table.departed?.map((d) => [d.pod, d.uid, d.connections]), [['(1 pod of the default at generation 5)', '', 5]]);
      assert.deepEqual(table.exceptions.map((e) => [e.connections, e.pods]), [[0, ['a']]], 'the new a starts at 0, listed by name');
      assert.equal(table.perPodPods, 1);
    });

    it('counts a pod whose PoolMember is still there as before: by its PoolMember, recorded with its UID, not again as unseen', function () {
      const plan = planBudgets({ limit: 10, now, connections: [connection], pods: [pod('b')], members: [onTable('a'), onTable('b')], tables: tableWith(counted) });
      assert.deepEqual(plan.tables[0]!.table.departed?.map((d) => [d.pod, d.uid, d.connections]), [['a', 'uid-a', 5]]);
      assert.equal(plan.allocated, 10);
    });

    it('lists a PoolMember that outlives its pod by name, so that the default covers exactly the pods it counts and the PoolMember\'s going is no departure; the name goes with the next write, not one of its own', function () {
      // a drained and its pod is gone; its PoolMember waits for the garbage collector.
      const drained = onTable('a', 0, { acknowledgement: { generation: 5, tableGeneration: 5, connections: 0, held: 0, drained: true } });
      const first = planBudgets({ limit: 10, now, connections: [connection], pods: [pod('b')], members: [drained, onTable('b')], tables: tableWith(counted) });
      const table = first.tables[0]!.table;
      assert.equal(table.departed, undefined, 'a drained: nothing held');
      assert.deepEqual(table.exceptions.map((e) => [e.connections, e.drain, e.pods]), [[0, true, ['a']]]);
      assert.equal(table.perPodPods, 1);
      // The PoolMember collected: b alone is on the default, as the table says; nothing is held. Dropping
      // a's name alone is no reason to write the table: it goes with the next write.
      const acknowledged = onTable('b', 10, { acknowledgement: { generation: 6, tableGeneration: 6, connections: 10, held: 10, drained: false } });
      const after = planBudgets({ limit: 10, now: now + 1_000, connections: [connection], pods: [pod('b')], members: [acknowledged], tables: tableWith({ ...table, generation: 6 }) });
      assert.equal(after.tables[0]!.changed, false, 'no write for the name alone');
      assert.equal(after.tables[0]!.table.departed, undefined);
      assert.deepEqual(after.tables[0]!.table.exceptions.map((e) => [e.connections, e.drain, e.pods]), [[0, true, ['a']]]);
      // A new pod joins: the table is written for it, and a's name goes with that write.
      const next = planBudgets({ limit: 10, now: now + 2_000, connections: [connection], pods: [pod('b'), pod('c', 'web', { uid: 'uid-c', readsTables: true })], members: [acknowledged], tables: tableWith({ ...table, generation: 6 }) });
      assert.equal(next.tables[0]!.changed, true);
      assert.deepEqual(next.tables[0]!.table.exceptions.filter((e) => e.pods.includes('a')), [], 'unlisted with the next write');
    });

    it('reads a count only from the write that set it: a table written since by an older controller says nothing', function () {
      const spec = { generation: 6, perPod: 5, recordsChanges: true, perPodPods: 2, perPodPodsGeneration: 5, exceptions: [] };
      assert.equal(grantTableOf(spec).perPodPods, undefined);
      assert.equal(grantTableOf({ ...spec, perPodPodsGeneration: 6 }).perPodPods, 2);
      assert.equal(planBudgets({ limit: 10, now, connections: [connection], pods: [pod('b')], members: [onTable('b')], tables: tableWith(grantTableOf(spec)) }).grants[0]!.grant.connections, 10, 'as before: nothing held');
    });

    it('holds nothing for a connection without a departure hold', function () {
      assert.equal(planBudgets({ limit: 10, now, connections: [orders([web])], pods: [pod('b')], members: [onTable('b')], tables: tableWith(counted) }).grants[0]!.grant.connections, 10);
    });
  });

  it('warns when PostgreSQL keeps a dead peer\'s connections longer than the departure hold, naming the settings that shorten it', function () {
    const kernel = { idle: 7200, interval: 75, count: 9, userTimeoutMs: 0 };
    assert.equal(deadPeerSeconds(kernel), 7875);
    assert.equal(deadPeerSeconds({ idle: 0, interval: 0, count: 0, userTimeoutMs: 0 }), undefined, 'a Unix socket: nothing to judge');
    const advice = departureHoldAdvice(kernel, 60, 'app');
    assert.match(advice ?? '', /after about 7875 s .* longer than departureHoldSeconds 60/);
    assert.match(advice ?? '', /ALTER ROLE app SET tcp_keepalives_idle = 20; ALTER ROLE app SET tcp_keepalives_interval = 6; ALTER ROLE app SET tcp_keepalives_count = 3; ALTER ROLE app SET tcp_user_timeout = 38000;/);
    // What it advises is within the hold.
    assert.equal(departureHoldAdvice({ idle: 20, interval: 6, count: 3, userTimeoutMs: 38000 }, 60, 'app'), undefined);
    assert.equal(departureHoldAdvice(kernel, 0, 'app'), undefined, 'no hold: nothing to warn about');
    assert.match(departureHoldAdvice(kernel, 60, 'Odd"Role') ?? '', /ALTER ROLE "Odd""Role" SET/);
  });

  it('splits by weight and respects maxPerPod', function () {
    const connection = orders([
      { name: 'web', weight: 2, minPerPod: 1, processesPerPod: 4 },
      { name: 'worker', weight: 1, minPerPod: 0, maxPerPod: 2, processesPerPod: 1 },
      { name: 'batch', weight: 1, minPerPod: 0, processesPerPod: 1 },
    ]);
    const pods = [pod('w1'), pod('w2'), pod('k1', 'worker'), pod('b1', 'batch')];
    const members = pods.map((p) => member(p.name, 0, 0));
    const plan = planBudgets({ limit: 20, connections: [connection], pods, members });
    assert.deepEqual(Object.fromEntries(plan.grants.map((g) => [g.name, g.target])), { b1: 4, k1: 2, w1: 7, w2: 7 });
    assert.equal(plan.connections[0]!.perPodBudget, 'web=7 worker=2 batch=4');
  });

  it('flags oversubscription with the numbers and never grants beyond the limit', function () {
    const pods = Array.from({ length: 12 }, (_, i) => pod(`p${String(i).padStart(2, '0')}`));
    const plan = planBudgets({
      limit: 50, connections: [orders([{ ...web, minPerPod: 5 }])], pods, members: pods.map((p) => member(p.name, 0, 0)),
    });
    assert.equal(plan.oversubscription?.message, 'shop/orders web: 12 pods x minPerPod 5 = 60 > limit 50');
    assert.equal(plan.allocated, 50);
    assert.ok(plan.grants.every((g) => g.grant.connections <= 5));
    assert.deepEqual(budgetConditions(plan, plan.connections[0]!).map((c) => [c.type, c.status, c.reason]), [['Ready', 'False', 'Rebalancing'], ['Oversubscribed', 'True', 'MinimumsExceedLimit']]);
    assert.equal(budgetConditions(plan, plan.connections[0]!)[1]!.message, plan.oversubscription?.message);
  });

  it('shares one limit across DatabaseConnections of several namespaces', function () {
    const other: ConnectionInput = { namespace: 'billing', name: 'ledger', budgetStrategy: 'Dynamic', consumers: [web] };
    const pods = [pod('a'), { ...pod('x'), namespace: 'billing', connection: 'ledger', uid: 'uid-x' }];
    const members = [member('a', 0, 0), { ...member('x', 0, 0), namespace: 'billing' }];
    const plan = planBudgets({ limit: 9, connections: [orders([web]), other], pods, members });
    assert.deepEqual(plan.connections.map((c) => [c.namespace, c.allocated]), [['shop', 4], ['billing', 5]]);
    assert.equal(plan.allocated, 9);
  });

  it('keeps connections sharing a CONNECTION LIMIT within it together, and gives what it leaves of the limit to the others', function () {
    const capped = (namespace: string, name: string): ConnectionInput => ({ namespace, name, budgetStrategy: 'Dynamic', consumers: [web], caps: [{ key: 'role app', limit: 5 }] });
    const free: ConnectionInput = { namespace: 'other', name: 'free', budgetStrategy: 'Dynamic', consumers: [web] };
    const podIn = (namespace: string, connection: string, name: string): PodInput => ({ ...pod(name), namespace, connection, uid: `uid-${name}` });
    const memberIn = (namespace: string, name: string): MemberState => ({ ...member(name, 0, 0), namespace });
    const pods = [podIn('shop', 'orders', 'a'), podIn('shop', 'orders', 'b'), podIn('billing', 'ledger', 'c'), podIn('other', 'free', 'd')];
    const members = [memberIn('shop', 'a'), memberIn('shop', 'b'), memberIn('billing', 'c'), memberIn('other', 'd')];
    const plan = planBudgets({ limit: 30, connections: [capped('shop', 'orders'), capped('billing', 'ledger'), free], pods, members });
    assert.deepEqual(Object.fromEntries(plan.grants.map((g) => [g.name, g.grant.connections])), { a: 2, b: 1, c: 2, d: 25 });
    assert.equal(plan.oversubscription, undefined);
    // Grows take only what the cap has free: while a and b still hold 5, c waits for their shrinks, though the limit has room.
    const full = planBudgets({ limit: 30, connections: [capped('shop', 'orders'), capped('billing', 'ledger'), free], pods, members: [{ ...member('a', 3), namespace: 'shop' }, { ...member('b', 2), namespace: 'shop' }, memberIn('billing', 'c'), memberIn('other', 'd')] });
    assert.deepEqual(Object.fromEntries(full.grants.map((g) => [g.name, [g.grant.connections, g.target]])), { a: [2, 2], b: [1, 1], c: [0, 2], d: [25, 25] });
  });

  it('reports minimums above a CONNECTION LIMIT as oversubscription naming it, and grants only up to it', function () {
    const capped: ConnectionInput = { ...orders([{ ...web, minPerPod: 3 }]), caps: [{ key: 'database shop', limit: 5 }] };
    const plan = planBudgets({ limit: 30, connections: [capped], pods: [pod('a'), pod('b')], members: [member('a', 0, 0), member('b', 0, 0)] });
    assert.equal(plan.oversubscription?.cap, 'database shop');
    assert.match(plan.oversubscription?.message ?? '', /2 pods x minPerPod 3 = 6 > limit 5 \(the CONNECTION LIMIT of database shop\)/);
    assert.ok(plan.grants.reduce((a, g) => a + g.grant.connections, 0) <= 5);
  });

  it('MaxReplicas reserves for maxReplicas pods and does not rebalance when pods come and go', function () {
    const connection = orders([{ ...web, maxReplicas: 4 }], 'MaxReplicas');
    const one = planBudgets({ limit: 20, connections: [connection], pods: [pod('a')], members: [member('a', 0, 0)] });
    assert.equal(one.grants[0]!.grant.connections, 5);
    const pods = [pod('a'), pod('b'), pod('c')];
    const three = planBudgets({ limit: 20, connections: [connection], pods, members: [member('a', 5), member('b', 0, 0), member('c', 0, 0)] });
    assert.deepEqual(three.grants.map((g) => g.grant.connections), [5, 5, 5]);
    assert.equal(three.connections[0]!.consumers[0]!.perPodBudget, 5);
  });

  it('withdraws the grant of a pod whose consumer is gone', function () {
    const plan = planBudgets({ limit: 10, connections: [orders([web])], pods: [pod('a', 'removed')], members: [member('a', 6)] });
    assert.deepEqual([plan.grants[0]!.grant.connections, plan.grants[0]!.drain, plan.allocated], [0, true, 6]);
  });

  it('is settled once every grant equals its target and is acknowledged', function () {
    const pods = [pod('a'), pod('b')];
    const settled = planBudgets({ limit: 10, connections: [orders([web])], pods, members: [member('a', 5), member('b', 5)] });
    assert.ok(settled.settled);
    assert.deepEqual(budgetConditions(settled, settled.connections[0]!).map((c) => [c.type, c.status]), [['Ready', 'True'], ['Oversubscribed', 'False']]);
    assert.ok(!planBudgets({ limit: 10, connections: [orders([web])], pods, members: [member('a', 6), member('b', 4)] }).settled);
  });

  it('does not depend on the order of its input', function () {
    const pods = ['d', 'a', 'c', 'b'].map((n) => pod(n));
    const members = pods.map((p, i) => member(p.name, i + 1));
    const input = { limit: 11, connections: [orders([web])], pods, members };
    fc.assert(fc.property(fc.shuffledSubarray(pods, { minLength: 4 }), fc.shuffledSubarray(members, { minLength: 4 }), (p, m) => {
      assert.deepEqual(planBudgets({ ...input, pods: p, members: m }), planBudgets(input));
    }), { numRuns: 30 });
  });
});

describe('fair shares', function () {
  const units = fc.array(fc.record({
    weight: fc.integer({ min: 1, max: 5 }), low: fc.integer({ min: 0, max: 4 }), extra: fc.option(fc.integer({ min: 0, max: 6 }), { nil: undefined }), takesRemainder: fc.boolean(),
  }), { maxLength: 12 }).map((raw) => raw.map((u, i): ShareUnit => ({
    key: `u${String(i).padStart(2, '0')}`, weight: u.weight, low: u.low, high: u.extra === undefined ? Infinity : u.low + u.extra, takesRemainder: u.takesRemainder,
  })));

  it('property: within bounds, never above capacity, and no unit could give one to another to get fairer', function () {
    fc.assert(fc.property(units, fc.integer({ min: 0, max: 80 }), (list, extraCapacity) => {
      const capacity = list.reduce((s, u) => s + u.low, 0) + extraCapacity;
      const shares = fairShares(list, capacity);
      let sum = 0;
      for (const u of list) {
        const x = shares.get(u.key)!;
        sum += x;
        assert.ok(x >= u.low && x <= u.high, `${u.key}=${x} outside [${u.low}, ${u.high}]`);
      }
      assert.ok(sum <= capacity);
      if (list.every((u) => u.takesRemainder)) assert.equal(sum, Math.min(capacity, list.reduce((s, u) => s + u.high, 0)));
      for (const a of list) {
        for (const b of list) {
          const xa = shares.get(a.key)!;
          const xb = shares.get(b.key)!;
          if (xa > a.low && xb < b.high && b.takesRemainder) assert.ok((xa - 1) / a.weight <= (xb + 1) / b.weight + 1e-9, `${a.key}=${xa} (w${a.weight}) vs ${b.key}=${xb} (w${b.weight})`);
        }
      }
    }), { numRuns: 300 });
  });

  it('gives remainders by key when weights are equal', function () {
    const list = ['c', 'a', 'b'].map((key): ShareUnit => ({ key, weight: 1, low: 0, high: Infinity, takesRemainder: true }));
    assert.deepEqual([...fairShares(list, 8)].sort(), [['a', 3], ['b', 3], ['c', 2]]);
  });
});

describe('limits', function () {
  it('reads auto as max_connections minus reserved slots', function () {
    assert.equal(autoMaxConnections({ maxConnections: 100, superuserReservedConnections: 3 }), 97);
    assert.equal(autoMaxConnections({ maxConnections: 100, superuserReservedConnections: 3, reservedConnections: 2 }), 95);
  });

  it('takes the strictest CONNECTION LIMIT of the login\'s role and database; none when both are unset', function () {
    const server = { maxConnections: 100, superuserReservedConnections: 3 };
    assert.equal(loginConnectionCap(server), undefined);
    assert.deepEqual(loginConnectionCap({ ...server, roleConnectionLimit: 20 }), { limit: 20, of: 'role' });
    assert.deepEqual(loginConnectionCap({ ...server, roleConnectionLimit: 20, databaseConnectionLimit: 8 }), { limit: 8, of: 'database' });
    assert.deepEqual(loginConnectionCap({ ...server, roleConnectionLimit: 0, databaseConnectionLimit: 8 }), { limit: 0, of: 'role' });
    // -1 is PostgreSQL's "no limit".
    assert.equal(loginConnectionCap({ ...server, roleConnectionLimit: -1, databaseConnectionLimit: -1 }), undefined);
  });

  it('resolves reserve as an integer or a percent rounded up', function () {
    assert.deepEqual(resolveLimit(100, '15%'), { discovered: 100, reserve: 15, effective: 85 });
    assert.deepEqual(resolveLimit(57, '15%'), { discovered: 57, reserve: 9, effective: 48 });
    assert.deepEqual(resolveLimit(10, 20), { discovered: 10, reserve: 10, effective: 0 });
    assert.equal(reservedConnections(60, '0%'), 0);
    assert.throws(() => reservedConnections(60, 'lots'), /reserve/);
  });

  it('identifies a server by host (case-insensitive) and port', function () {
    assert.equal(serverKey({ host: 'DB.Example.', port: 5432 }), 'db.example:5432');
    assert.equal(serverKey({ host: '::1', port: 5432 }), '[::1]:5432');
    assert.equal(sharedLimit([85, 40]), 40);
    assert.equal(sharedLimit([]), 0);
  });
});
