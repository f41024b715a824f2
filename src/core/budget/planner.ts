/**
 * The budget planner: from one server's limit, its DatabaseConnections, their
 * pods and the PoolMembers in force, the next grants. Stateless: a controller
 * restart re-runs it on the persisted PoolMembers and gets the same answer.
 * docs/budget.md explains the algorithm.
 */
import { fairShares, type ShareUnit } from './fair-share.ts';
import { defaultHolding, departedCounts, deriveEntry, encodeGrantTable, memberGrantInForce, tableAccount, tableContent, unlistedDeparted, type DepartedPod, type GrantTable, type TableEntry } from './grant-table.ts';
import type {
  BudgetInput, BudgetPlan, ConnectionInput, ConnectionSummary, ConsumerInput, ConsumerSummary, GrantInForce, GrantWait,
  MemberState, ObjectKey, Oversubscription, PlannedTable, PodGrant, PodInput,
} from './types.ts';

/** live: draws a share. leaving: terminating or without a consumer, gives everything back. finished: Succeeded/Failed, holds nothing. */
type PodRole = 'live' | 'leaving' | 'finished';

/** A consumer with the connection it belongs to. */
interface ConsumerContext {
  key: string;
  connection: ConnectionInput;
  consumer: ConsumerInput;
  /** Pods it is budgeted for: live pods, or at least maxReplicas under MaxReplicas. */
  slots: number;
  fixedSlots: boolean;
}

/** A pod joined with its PoolMember, and what it may hold right now. */
interface PodState {
  pod: PodInput;
  key: string;
  role: PodRole;
  consumer?: ConsumerContext | undefined;
  grant: GrantInForce;
  /** The grant must be written even if unchanged (no PoolMember yet, or one left by a previous pod of that name). */
  mustWrite: boolean;
  /** The sidecar has acknowledged the grant in force: nothing is in flight. */
  acknowledged: boolean;
  reservation: number;
  /** Its grant goes into the connection's table (its PoolMember has spec.tableFrom). */
  onTable: boolean;
  /** Its PoolMember's tableFrom is beyond the table in force: the table must be written to cover it. */
  tablePending: boolean;
  tableFrom?: number | undefined;
  /** The table generation its sidecar last reported deriving its grant from. */
  reportedTableGeneration?: number | undefined;
  /** The table generation whose change the pod has yet to acknowledge (from its table entry, or its switch onto the table). */
  since?: number | undefined;
  /** Its PoolMember exists but its sidecar has never reported: it is not grown until it answers. */
  silent: boolean;
  /** A finished pod whose sidecar never reported a drain: what it may still have held (0 otherwise). */
  leftHolding: number;
}

function podKey(o: ObjectKey): string {
  return `${o.namespace}/${o.name}`;
}

function consumerKey(namespace: string, connection: string, consumer: string): string {
  return `${namespace}/${connection}/${consumer}`;
}

function byKey<T extends { key: string }>(a: T, b: T): number {
  return a.key < b.key ? -1 : a.key > b.key ? 1 : 0;
}

/** Step 1: index consumers by namespace/connection/consumer and count the slots each is budgeted for. */
function indexConsumers(connections: readonly ConnectionInput[], pods: readonly PodInput[]): Map<string, ConsumerContext> {
  const livePods = new Map<string, number>();
  for (const pod of pods) {
    if (pod.consumer === undefined || pod.terminating || pod.phase === 'Succeeded' || pod.phase === 'Failed') continue;
    const key = consumerKey(pod.namespace, pod.connection, pod.consumer);
    livePods.set(key, (livePods.get(key) ?? 0) + 1);
  }
  const index = new Map<string, ConsumerContext>();
  for (const connection of connections) {
    for (const consumer of connection.consumers) {
      const key = consumerKey(connection.namespace, connection.name, consumer.name);
      const live = livePods.get(key) ?? 0;
      const fixedSlots = connection.budgetStrategy === 'MaxReplicas' && consumer.maxReplicas !== undefined;
      // A rollout's surge pods may exceed maxReplicas for a while; they are budgeted too.
      const slots = fixedSlots ? Math.max(consumer.maxReplicas ?? 0, live) : live;
      index.set(key, { key, connection, consumer, slots, fixedSlots });
    }
  }
  return index;
}

/**
 * Step 2: join pods with their PoolMembers. A PoolMember whose pod is gone (or
 * whose owner UID belongs to an earlier pod of the same name) is an orphan:
 * its pod no longer exists, so its reservation is released.
 */
function joinPodsWithMembers(pods: readonly PodInput[], members: readonly MemberState[], consumers: Map<string, ConsumerContext>, tables: ReadonlyMap<string, GrantTable>): { states: PodState[]; orphans: ObjectKey[] } {
  // Joined by pod UID (strings the caches keep, hashed once), by name only for pods without a
  // PoolMember of their own: a PoolMember is named after its pod, and may be an earlier pod's.
  const membersByUid = new Map(members.map((m) => [m.podUid, m]));
  let membersByName: Map<string, MemberState> | undefined;
  const podUids = new Set<string>();
  const states: PodState[] = [];
  const orphans: ObjectKey[] = [];
  for (const pod of pods) {
    const key = podKey(pod);
    podUids.add(pod.uid);
    const own = membersByUid.get(pod.uid);
    const found = own !== undefined && own.namespace === pod.namespace && own.name === pod.name ? own : (membersByName ??= new Map(members.map((m) => [podKey(m), m]))).get(key);
    const member = found?.podUid === pod.uid ? found : undefined;
    if (found && !member) orphans.push({ namespace: found.namespace, name: found.name });
    const consumer = pod.consumer === undefined ? undefined : consumers.get(consumerKey(pod.namespace, pod.connection, pod.consumer));
    const role: PodRole = pod.phase === 'Succeeded' || pod.phase === 'Failed' ? 'finished' : pod.terminating || !consumer ? 'leaving' : 'live';
    // A replaced pod's PoolMember continues its generations so a sidecar watching by name never sees one go back.
    let grant = member?.grant ?? { connections: 0, generation: found ? found.grant.generation + 1 : 0 };
    const ack = member?.acknowledgement;
    // A sidecar that has not reported yet has acknowledged nothing: its pod is not grown until it
    // answers (and says which protocol it speaks), so a first grant is written once, not twice.
    let acknowledged = ack ? ack.generation >= grant.generation : grant.connections === 0 && !member;
    // A pod whose sidecar reads tables gets its first PoolMember on the table (at 0): no switch later.
    const createdOnTable = !found && pod.readsTables === true;
    const tableFrom = createdOnTable ? (tables.get(`${pod.namespace}/${pod.connection}`)?.generation ?? 0) + 1 : member?.tableFrom;
    const table = tableFrom === undefined ? undefined : tables.get(`${pod.namespace}/${pod.connection}`);
    const inForce = member ? memberGrantInForce(member, table) : undefined;
    const drainedAway = pod.terminating && ack?.drained === true;
    let reservation = Math.max(grant.connections, ack?.connections ?? 0, ack?.held ?? 0);
    let since: number | undefined;
    if (tableFrom !== undefined && table !== undefined && inForce?.fromTable === true && inForce.entry) {
      grant = { connections: inForce.connections, generation: inForce.generation };
      ({ acknowledged, reservation } = tableAccount(inForce.entry, table, tableFrom, ack));
      since = acknowledged ? undefined : (inForce.entry.since ?? tableFrom);
    } else if (tableFrom !== undefined) {
      // Switched onto a table that does not cover it yet: the switch is in flight until the sidecar acknowledges from the table.
      since = tableFrom;
    }
    const leftHolding = role === 'finished' && ack?.drained !== true ? reservation : 0;
    if (role === 'finished' || drainedAway) reservation = 0;
    const onTable = tableFrom !== undefined;
    const tablePending = onTable && (table === undefined || table.generation < tableFrom);
    states.push({ pod, key, role, consumer: role === 'live' ? consumer : undefined, grant, mustWrite: !member, acknowledged, reservation, onTable, tablePending, tableFrom, reportedTableGeneration: ack?.tableGeneration, since, silent: member !== undefined && ack === undefined, leftHolding });
  }
  // PoolMembers of no pod here: those of a pod now gone (a pod of the same name was handled above).
  let podKeys: Set<string> | undefined;
  for (const m of members) {
    if (podUids.has(m.podUid)) continue;
    if (!(podKeys ??= new Set(pods.map((p) => podKey(p)))).has(podKey(m))) orphans.push({ namespace: m.namespace, name: m.name });
  }
  return { states: states.sort(byKey), orphans };
}

/**
 * The PoolMembers on tables, by `namespace/connection` of their table: their
 * own connection, else (a PoolMember this controller created that its cache
 * has yet to show) their pod's.
 */
function tableMembersByConnection(input: BudgetInput): Map<string, MemberState[]> {
  let podConnection: Map<string, string> | undefined;
  const out = new Map<string, MemberState[]>();
  for (const m of input.members) {
    if (m.tableFrom === undefined) continue;
    const connection = m.connection ?? (podConnection ??= new Map(input.pods.map((p) => [p.uid, p.connection]))).get(m.podUid);
    if (connection === undefined) continue;
    const k = `${m.namespace}/${connection}`;
    const list = out.get(k);
    if (list) list.push(m);
    else out.set(k, [m]);
  }
  return out;
}

/** What pods that left a table's default unseen may still hold: how many, and their connections. */
export interface UnlistedDepartures {
  pods: number;
  connections: number;
  /** The generation of the table whose default covered them. */
  generation: number;
}

/**
 * Per table (`namespace/connection`), the pods on its default that left
 * without any controller seeing them go (`unlistedDeparted`: force-deleted
 * and their PoolMember collected while none ran), at what the default may
 * hold each. Only for connections that hold departures, and only with
 * `input.now`, as the planner holds them; `members` as tableMembersByConnection gives them.
 */
export function unlistedDepartures(input: BudgetInput, members: ReadonlyMap<string, readonly MemberState[]> = tableMembersByConnection(input)): Map<string, UnlistedDepartures> {
  const out = new Map<string, UnlistedDepartures>();
  if (input.now === undefined) return out;
  const holds = new Set(input.connections.filter((c) => (c.departureHoldSeconds ?? 0) > 0).map((c) => `${c.namespace}/${c.name}`));
  for (const t of input.tables ?? []) {
    const k = `${t.namespace}/${t.connection}`;
    const each = defaultHolding(t.table);
    if (!holds.has(k) || each === 0 || t.table.perPodPods === undefined) continue;
    const pods = unlistedDeparted(t.table, members.get(k) ?? []);
    if (pods > 0) out.set(k, { pods, connections: pods * each, generation: t.table.generation });
  }
  return out;
}

/**
 * The name of the departed record that holds pods gone unseen from the
 * default of table generation `generation`: not a pod name (those have no
 * spaces or parentheses), one per generation.
 */
export function unlistedRecordName(pods: number, generation: number): string {
  return `(${pods} ${pods === 1 ? 'pod' : 'pods'} of the default at generation ${generation})`;
}

/** Whether a departed record is one unlistedRecordName named (pods gone unseen), not a pod's own. */
export function isUnlistedRecord(record: { pod: string; uid: string }): boolean {
  return record.uid === '' && record.pod.startsWith('(');
}

/** Each table's departed pods after this pass, and what they hold, by `namespace/connection`. */
interface Departures {
  lists: Map<string, DepartedPod[]>;
  held: Map<string, number>;
}

/**
 * Step 2b: pods that left without their sidecar reporting a drain. PostgreSQL
 * ends the backends of a peer that vanished (a lost node, a killed sidecar
 * in a statement) only once it notices, so what such a pod may hold stays
 * counted for its connection's `departureHoldSeconds`, recorded in its table
 * (the one durable record that outlives the pod and its PoolMember): the
 * table's departed pods still counting, plus pods that finished without a
 * drain, PoolMembers whose pod is gone and pods the table lists by name that
 * are gone. A departure is recorded in the same table write that drops the
 * pod's grant, so what is durable never counts less than what may be held.
 */
function planDepartures(input: BudgetInput, states: readonly PodState[], tables: ReadonlyMap<string, GrantTable>, tableMembers: ReadonlyMap<string, readonly MemberState[]>): Departures {
  const lists = new Map<string, DepartedPod[]>();
  const held = new Map<string, number>();
  const now = input.now;
  if (now === undefined) return { lists, held };
  // Per connection, the records by pod name: once per pod, a known UID being the pod and a name
  // alone standing for whichever pod of that name left.
  const recorded = new Map<string, Map<string, DepartedPod[]>>();
  const add = (connection: string, d: DepartedPod): void => {
    let byName = recorded.get(connection);
    if (!byName) {
      byName = new Map();
      recorded.set(connection, byName);
      lists.set(connection, []);
    }
    const same = byName.get(d.pod);
    if (same?.some((x) => x.uid === d.uid || x.uid === '' || d.uid === '')) return;
    if (same) same.push(d);
    else byName.set(d.pod, [d]);
    lists.get(connection)!.push(d);
  };
  // Built only when needed: at thousands of pods these are most of this step's work. A
  // PoolMember is named after its pod, so its owner's UID among the pods' says its pod is there.
  let podUids: Set<string> | undefined;
  const podThere = (m: MemberState): boolean => (podUids ??= new Set(input.pods.map((p) => p.uid))).has(m.podUid);
  let orphanUids: Set<string> | undefined;
  const isOrphan = (uid: string): boolean => (orphanUids ??= new Set(input.members.filter((m) => !podThere(m)).map((m) => m.podUid))).has(uid);
  let names: Set<string> | undefined;
  const podOrMemberNamed = (key: string): boolean => (names ??= new Set([...input.pods.map((p) => podKey(p)), ...input.members.map((m) => podKey(m))])).has(key);
  // A record made from a view that missed the pod's drain goes once the drain is seen: the sidecar
  // closed what it held, as a pod seen drained before it went never gets one.
  let drainedUids: Set<string> | undefined;
  const drained = (uid: string): boolean => uid !== '' && (input.drainedPodUids?.has(uid) === true
    || (drainedUids ??= new Set(input.members.filter((m) => m.acknowledgement?.drained === true).map((m) => m.podUid))).has(uid));
  // Kept first, so a pod already recorded keeps its first `until`. A record past its `until` counts
  // nothing but stays while the pod's PoolMember does, so that the PoolMember is not recorded again.
  // A record by name only (a listed terminating pod whose pod and PoolMember were both gone from its view): its drain by name.
  const drainedByName = (k: string, pod: string): boolean => input.drainedPodNames?.has(`${k.slice(0, k.indexOf('/'))}/${pod}`) === true;
  for (const [k, table] of tables) {
    for (const d of table.departed ?? []) if (!drained(d.uid) && !(d.uid === '' && drainedByName(k, d.pod)) && (departedCounts(d, now) || (d.uid !== '' && isOrphan(d.uid)))) add(k, d);
  }
  // Until when a pod leaving a connection now stays counted; none for a connection that holds nothing.
  const untils = new Map<string, string>();
  for (const c of input.connections) {
    const ms = Math.max(0, c.departureHoldSeconds ?? 0) * 1000;
    if (ms > 0) untils.set(`${c.namespace}/${c.name}`, new Date(now + ms).toISOString());
  }
  if (untils.size > 0) {
    for (const s of states) {
      if (s.leftHolding <= 0 || !s.onTable) continue;
      const k = `${s.pod.namespace}/${s.pod.connection}`;
      const until = untils.get(k);
      if (until !== undefined) add(k, { pod: s.pod.name, uid: s.pod.uid, connections: s.leftHolding, until });
    }
    for (const m of input.members) {
      // Pods on tables only: a sidecar that reads its PoolMember alone is released at once, as before tables.
      if (m.connection === undefined || m.tableFrom === undefined || m.acknowledgement?.drained === true) continue;
      const k = `${m.namespace}/${m.connection}`;
      const until = untils.get(k);
      if (until === undefined || podThere(m)) continue;
      const table = tables.get(k);
      const inForce = memberGrantInForce(m, table);
      const ack = m.acknowledgement;
      const holding = inForce.fromTable && inForce.entry && table && m.tableFrom !== undefined
        ? tableAccount(inForce.entry, table, m.tableFrom, ack).reservation
        : Math.max(inForce.connections, ack?.connections ?? 0, ack?.held ?? 0);
      // Recorded even at 0: once the pod's entry is gone from the table, deriving it again would give the
      // table's default, which a later table may raise; the record says what the pod held when it left.
      add(k, { pod: m.name, uid: m.podUid, connections: holding, until });
    }
    for (const [k, table] of tables) {
      const until = untils.get(k);
      if (until === undefined) continue;
      const namespace = k.slice(0, k.indexOf('/'));
      for (const e of table.exceptions) {
        for (const name of e.pods) {
          // A pod whose PoolMember is still there is judged by it (above): it may have reported its drain.
          const key = `${namespace}/${name}`;
          if (podOrMemberNamed(key)) continue;
          const entry = deriveEntry(table, name);
          const holding = Math.max(entry.connections, entry.releasing ?? 0);
          if (holding > 0 && !drainedByName(k, name)) add(k, { pod: name, uid: '', connections: holding, until });
        }
      }
    }
    // Pods that left a table's default unseen (no PoolMember, no name): its count of them says how
    // many. Held from now: when they went is not known, only that it was after the table was written.
    for (const [k, gone] of unlistedDepartures(input, tableMembers)) {
      const until = untils.get(k);
      if (until !== undefined) add(k, { pod: unlistedRecordName(gone.pods, gone.generation), uid: '', connections: gone.connections, until });
    }
  }
  for (const [k, list] of lists) {
    list.sort((a, b) => (a.pod < b.pod ? -1 : a.pod > b.pod ? 1 : a.uid < b.uid ? -1 : a.uid > b.uid ? 1 : 0));
    held.set(k, list.reduce((sum, d) => sum + (departedCounts(d, now) ? d.connections : 0), 0));
  }
  return { lists, held };
}

/**
 * Step 3: every live pod's fair share of the limit. Minimums first; when they
 * do not fit, the limit is split by weight up to each pod's minimum, and the
 * oversubscription is reported with its numbers.
 */
function fairTargets(states: readonly PodState[], consumers: Map<string, ConsumerContext>, limit: number, caps: readonly CapGroup[]): { targets: Map<string, number>; slotShares: Map<string, number>; oversubscription?: Oversubscription } {
  const livePods = new Map<string, PodState[]>();
  for (const s of states) {
    if (s.role !== 'live' || !s.consumer) continue;
    const list = livePods.get(s.consumer.key);
    if (list) list.push(s);
    else livePods.set(s.consumer.key, [s]);
  }
  const required = [...consumers.values()].reduce((sum, c) => sum + c.slots * c.consumer.minPerPod, 0);
  const oversubscribed = required > limit;
  const units: ShareUnit[] = [];
  const unitConnection = new Map<string, string>();
  for (const c of consumers.values()) {
    const { weight, minPerPod, maxPerPod } = c.consumer;
    const high = oversubscribed ? minPerPod : (maxPerPod ?? Infinity);
    const low = oversubscribed ? 0 : minPerPod;
    const connection = connectionKey(c.connection);
    const add = (unit: ShareUnit): void => {
      units.push(unit);
      unitConnection.set(unit.key, connection);
    };
    if (c.fixedSlots) {
      for (let i = 0; i < c.slots; i += 1) add({ key: `${c.key}#${String(i).padStart(6, '0')}`, weight, low, high, takesRemainder: false });
    } else {
      for (const s of livePods.get(c.key) ?? []) add({ key: s.key, weight, low, high, takesRemainder: true });
    }
  }
  const shares = sharesWithinCaps(units, limit, caps, unitConnection);
  const targets = new Map<string, number>();
  const slotShares = new Map<string, number>();
  for (const c of consumers.values()) {
    // MaxReplicas slots all get the same share: a pod's budget never depends on how many of its siblings run.
    const slotShare = c.fixedSlots ? (shares.get(`${c.key}#${String(0).padStart(6, '0')}`) ?? 0) : undefined;
    for (const s of livePods.get(c.key) ?? []) targets.set(s.key, slotShare ?? shares.get(s.key) ?? 0);
    if (slotShare !== undefined) slotShares.set(c.key, slotShare);
  }
  return { targets, slotShares, oversubscription: oversubscribed ? describeOversubscription(consumers, required, limit) : capOversubscription(consumers, caps) };
}

/** The first cap whose connections' minimums do not fit it, described as for the limit. */
function capOversubscription(consumers: Map<string, ConsumerContext>, caps: readonly CapGroup[]): Oversubscription | undefined {
  for (const g of caps) {
    const mine = new Map([...consumers].filter(([, c]) => g.connections.has(connectionKey(c.connection))));
    const required = [...mine.values()].reduce((sum, c) => sum + c.slots * c.consumer.minPerPod, 0);
    if (required > g.limit) {
      const described = describeOversubscription(mine, required, g.limit);
      return { ...described, cap: g.key, message: `${described.message} (the CONNECTION LIMIT of ${g.key})` };
    }
  }
  return undefined;
}

/** The connections that share one cap, and the strictest limit any of them gives it. */
interface CapGroup {
  key: string;
  limit: number;
  /** `namespace/name` of each connection in the group. */
  connections: Set<string>;
}

function connectionKey(c: { namespace: string; name?: string; connection?: string }): string {
  return `${c.namespace}/${c.connection ?? c.name ?? ''}`;
}

/** The caps of `connections`, grouped by key. */
function capGroups(connections: readonly ConnectionInput[]): CapGroup[] {
  const groups = new Map<string, CapGroup>();
  for (const c of connections) {
    for (const cap of c.caps ?? []) {
      const limit = Math.max(0, Math.floor(cap.limit));
      const group = groups.get(cap.key);
      if (group) {
        group.limit = Math.min(group.limit, limit);
        group.connections.add(connectionKey(c));
      } else {
        groups.set(cap.key, { key: cap.key, limit, connections: new Set([connectionKey(c)]) });
      }
    }
  }
  return [...groups.values()].sort(byKey);
}

/**
 * The fair split of `limit` with no cap's units together above the cap:
 * a group over its cap is split within the cap alone (by weight, minimums
 * first as for the limit), its units are held to that, and the rest of the
 * limit goes round again to everyone else. Each round holds at least one more
 * group, so it ends within one round per group.
 */
function sharesWithinCaps(units: readonly ShareUnit[], limit: number, caps: readonly CapGroup[], unitConnection: ReadonlyMap<string, string>): Map<string, number> {
  let current = [...units];
  let shares = fairShares(current, limit);
  for (let round = 0; round <= caps.length; round += 1) {
    const over = caps.filter((g) => current.reduce((sum, u) => sum + (g.connections.has(unitConnection.get(u.key) ?? '') ? (shares.get(u.key) ?? 0) : 0), 0) > g.limit);
    if (over.length === 0) return shares;
    const held = new Map<string, number>();
    for (const g of over) {
      const inGroup = current.filter((u) => g.connections.has(unitConnection.get(u.key) ?? ''));
      for (const [key, share] of splitWithin(inGroup, g.limit)) held.set(key, Math.min(share, held.get(key) ?? Infinity));
    }
    current = current.map((u) => {
      const high = held.get(u.key);
      return high === undefined || high >= u.high ? u : { ...u, low: Math.min(u.low, high), high };
    });
    shares = fairShares(current, limit);
  }
  return shares;
}

/** Splits `capacity` among `units`: by weight above their minimums, or up to their minimums when those do not fit. */
function splitWithin(units: readonly ShareUnit[], capacity: number): Map<string, number> {
  const required = units.reduce((sum, u) => sum + u.low, 0);
  return fairShares(required > capacity ? units.map((u) => ({ ...u, low: 0, high: u.low })) : units, capacity);
}

function describeOversubscription(consumers: Map<string, ConsumerContext>, required: number, limit: number): Oversubscription {
  const parts = [...consumers.values()]
    .filter((c) => c.slots * c.consumer.minPerPod > 0)
    .map((c) => `${c.connection.namespace}/${c.connection.name} ${c.consumer.name}: ${c.slots} pods${c.fixedSlots ? ' (maxReplicas)' : ''} x minPerPod ${c.consumer.minPerPod} = ${c.slots * c.consumer.minPerPod}`);
  const message = parts.length === 1 ? `${parts[0]} > limit ${limit}` : `${parts.join('; ')}; total ${required} > limit ${limit}`;
  return { required, limit, message };
}

/**
 * Step 4: move grants toward their targets without ever exceeding the limit.
 * One change in flight per pod: a grant whose acknowledgement has not arrived
 * stays as it is. Shrinks are issued at once but free nothing until
 * acknowledged (the reservation stays max(grant, acknowledged)). Grows take
 * only capacity that is free now: minimums first, then the rest, in key order.
 */
function stepTowardTargets(states: readonly PodState[], targets: Map<string, number>, limit: number, caps: readonly CapGroup[], departed: ReadonlyMap<string, number>): Map<string, GrantInForce> {
  const next = new Map<string, GrantInForce>();
  const targetOf = (s: PodState): number => (s.role === 'live' ? (targets.get(s.key) ?? 0) : 0);
  for (const s of states) {
    const target = targetOf(s);
    // A table pod that holds nothing any more (drained, finished) is written down to 0 with the
    // next table: the table, not an acknowledgement a new leader may never see, then says so.
    const shrink = s.grant.connections > target && ((s.acknowledged && s.reservation > 0) || (s.onTable && s.reservation === 0));
    next.set(s.key, shrink ? { connections: target, generation: s.grant.generation + 1 } : s.grant);
  }
  // Departed pods' reservations count as held: by the limit, and by every cap of their connection.
  const departedTotal = [...departed.values()].reduce((sum, n) => sum + n, 0);
  let free = limit - states.reduce((sum, s) => sum + s.reservation, 0) - departedTotal;
  // A pod without its PoolMember yet starts at 0 (docs/protocol.md rule 1); it grows on the next pass.
  // A pod whose sidecar has not answered yet (still Pending, say) is not grown: nothing is held for a sidecar that may never come.
  const growable = states.filter((s) => s.role === 'live' && s.acknowledged && !s.mustWrite && !s.silent && s.grant.connections < targetOf(s));
  const reservations = new Map(states.map((s) => [s.key, s.reservation]));
  // A cap is free by what its group's pods do not reserve, exactly as the limit is.
  const capFree = new Map(caps.map((g) => [g.key, g.limit - states.reduce((sum, s) => sum + (g.connections.has(connectionKey(s.pod)) ? s.reservation : 0), 0)
    - [...departed].reduce((sum, [k, n]) => sum + (g.connections.has(k) ? n : 0), 0)]));
  const capsOf = (s: PodState): CapGroup[] => caps.filter((g) => g.connections.has(connectionKey(s.pod)));
  const raise = (s: PodState, upTo: number): void => {
    const current = next.get(s.key) ?? s.grant;
    const reserved = reservations.get(s.key) ?? 0;
    const wanted = Math.min(upTo, targetOf(s));
    if (wanted <= current.connections) return;
    const mine = capsOf(s);
    const room = mine.reduce((low, g) => Math.min(low, capFree.get(g.key) ?? 0), free);
    const granted = Math.min(wanted, reserved + Math.max(0, room));
    if (granted <= current.connections) return;
    free -= Math.max(0, granted - reserved);
    for (const g of mine) capFree.set(g.key, (capFree.get(g.key) ?? 0) - Math.max(0, granted - reserved));
    reservations.set(s.key, Math.max(reserved, granted));
    next.set(s.key, { connections: granted, generation: s.grant.generation + 1 });
  };
  for (const s of growable) raise(s, s.consumer?.consumer.minPerPod ?? 0);
  for (const s of growable) raise(s, Infinity);
  return next;
}

function waitOf(s: PodState, grant: GrantInForce, target: number): GrantWait {
  const changed = grant.generation !== s.grant.generation;
  if (!s.acknowledged || changed || s.mustWrite) return 'acknowledgement';
  if (grant.connections === target) return 'none';
  // A pod whose sidecar has not answered yet is grown once it does.
  return s.silent ? 'acknowledgement' : 'capacity';
}

/** Step 5: the per-pod grants, per-connection summaries and totals. */
function summarize(
  input: BudgetInput, states: readonly PodState[], consumers: Map<string, ConsumerContext>,
  targets: Map<string, number>, slotShares: Map<string, number>, next: Map<string, GrantInForce>, departed: ReadonlyMap<string, number>,
): Pick<BudgetPlan, 'grants' | 'connections' | 'allocated' | 'settled'> {
  const grants: PodGrant[] = states.map((s) => {
    const grant = next.get(s.key) ?? s.grant;
    const target = s.role === 'live' ? (targets.get(s.key) ?? 0) : 0;
    const reservation = s.reservation === 0 && s.role !== 'live' ? 0 : Math.max(s.reservation, grant.connections);
    return {
      namespace: s.pod.namespace, name: s.pod.name, podUid: s.pod.uid, connection: s.pod.connection, consumer: s.pod.consumer,
      grant, changed: s.mustWrite || (!s.onTable && grant !== s.grant), table: s.onTable, ...(s.mustWrite && s.onTable ? { tableFrom: s.tableFrom } : {}), drain: s.role !== 'live', target, reservation,
      waitingFor: s.role === 'live' ? waitOf(s, grant, target) : reservation === 0 ? 'none' : 'acknowledgement',
    };
  });
  // One pass over the grants, tallied per connection and per consumer: the summaries cost O(pods), not O(pods x connections).
  const tallies = new Map<string, { allocated: number; live: number; waiting: number }>();
  const consumerTallies = new Map<string, { pods: number; minTarget: number }>();
  for (const g of grants) {
    const connectionKey = `${g.namespace}/${g.connection}`;
    const tally = tallies.get(connectionKey) ?? { allocated: 0, live: 0, waiting: 0 };
    tallies.set(connectionKey, tally);
    tally.allocated += g.reservation;
    if (g.drain) continue;
    tally.live += 1;
    if (g.waitingFor !== 'none') tally.waiting += 1;
    if (g.consumer === undefined) continue;
    const key = consumerKey(g.namespace, g.connection, g.consumer);
    const consumerTally = consumerTallies.get(key);
    if (consumerTally) {
      consumerTally.pods += 1;
      consumerTally.minTarget = Math.min(consumerTally.minTarget, g.target);
    } else {
      consumerTallies.set(key, { pods: 1, minTarget: g.target });
    }
  }
  const connections: ConnectionSummary[] = input.connections.map((connection) => {
    const tally = tallies.get(`${connection.namespace}/${connection.name}`) ?? { allocated: 0, live: 0, waiting: 0 };
    const consumerSummaries: ConsumerSummary[] = connection.consumers.map((consumer) => {
      const key = consumerKey(connection.namespace, connection.name, consumer.name);
      const context = consumers.get(key);
      const pods = consumerTallies.get(key) ?? { pods: 0, minTarget: 0 };
      const perPodBudget = context && slotShares.has(context.key) ? (slotShares.get(context.key) ?? 0) : pods.minTarget;
      return { name: consumer.name, pods: pods.pods, perPodBudget, perProcessBudget: Math.floor(perPodBudget / consumer.processesPerPod) };
    });
    const held = departed.get(`${connection.namespace}/${connection.name}`) ?? 0;
    return {
      namespace: connection.namespace, name: connection.name, pods: tally.live,
      allocated: tally.allocated + held,
      ...(held > 0 ? { departed: held } : {}),
      consumers: consumerSummaries,
      perPodBudget: consumerSummaries.map((c) => `${c.name}=${c.perPodBudget}`).join(' '),
      podsWaiting: tally.waiting,
    };
  });
  return {
    grants, connections,
    allocated: grants.reduce((sum, g) => sum + g.reservation, 0) + [...departed.values()].reduce((sum, n) => sum + n, 0),
    settled: grants.every((g) => g.waitingFor === 'none'),
  };
}

/**
 * Step 6: the grant table of each connection with pods on tables. Written
 * when its content changes or when a pod has just been put on it (its
 * tableFrom is beyond the table in force); one new generation for all.
 * Every planned grant of one table may land in one write: a shrink frees
 * nothing until acknowledged and a grow takes only what was free before,
 * counting acknowledgements the same write records. A table that grows also
 * carries its `releases` (see PlannedTable), for when another table's grows
 * must wait for what this one records.
 */
function planTables(states: readonly PodState[], next: Map<string, GrantInForce>, tables: ReadonlyMap<string, GrantTable>, departed: ReadonlyMap<string, readonly DepartedPod[]>, floors: ReadonlyMap<string, number> | undefined, tableMembers: ReadonlyMap<string, readonly MemberState[]>): { planned: PlannedTable[]; generations: Map<string, number> } {
  const byConnection = new Map<string, { namespace: string; connection: string; pods: PodState[]; pending: number; reported: number }>();
  // Every table in force is planned, even with none of its pods left: it still lists pods that left
  // (by name, or as departed), and a pod that left must not stay listed once its PoolMember is gone.
  for (const k of new Set([...tables.keys(), ...departed.keys()])) {
    const slash = k.indexOf('/');
    byConnection.set(k, { namespace: k.slice(0, slash), connection: k.slice(slash + 1), pods: [], pending: 0, reported: 0 });
  }
  for (const s of states) {
    if (!s.onTable) continue;
    const k = `${s.pod.namespace}/${s.pod.connection}`;
    const group = byConnection.get(k) ?? { namespace: s.pod.namespace, connection: s.pod.connection, pods: [], pending: 0, reported: 0 };
    byConnection.set(k, group);
    group.pods.push(s);
    if (s.tablePending) group.pending = Math.max(group.pending, s.tableFrom ?? 1);
    group.reported = Math.max(group.reported, s.reportedTableGeneration ?? 0);
  }
  const planned: PlannedTable[] = [];
  const generations = new Map<string, number>();
  for (const [k, group] of byConnection) {
    const current = tables.get(k);
    // Past every generation a sidecar reported: a table created again (its DatabaseConnection deleted and
    // re-created) must not start below them, or their old statuses would acknowledge its changes.
    // And past the last table written for it, which a sidecar may have read without answering yet.
    const nextGeneration = Math.max((current?.generation ?? 0) + 1, group.pending, group.reported + 1, (floors?.get(k) ?? 0) + 1);
    const grown = (s: PodState): boolean => (next.get(s.key) ?? s.grant).connections > s.grant.connections;
    const grows = group.pods.some(grown);
    const gone = departed.get(k) ?? [];
    const withDeparted = (t: GrantTable): GrantTable => (gone.length > 0 ? { ...t, departed: [...gone] } : t);
    const unplanned = unplannedMembers(group.pods, tableMembers.get(k) ?? [], gone);
    const releasesDraft = grows ? withDeparted(encodeGrantTable([...group.pods.map((s) => tableEntry(s, grown(s) ? s.grant : (next.get(s.key) ?? s.grant), nextGeneration)), ...unplanned], nextGeneration)) : undefined;
    const releases = releasesDraft && current !== undefined && (group.pending > 0 || tableContent(releasesDraft) !== tableContent(current)) ? releasesDraft : undefined;
    const finalGeneration = releases ? nextGeneration + 1 : nextGeneration;
    // A grown pod's change is acknowledged from the final table on; the others' from the first.
    const entries = [...group.pods.map((s) => tableEntry(s, next.get(s.key) ?? s.grant, grown(s) ? finalGeneration : nextGeneration)), ...unplanned];
    let draft = withDeparted(encodeGrantTable(entries, current?.generation ?? 0));
    let changed = current === undefined || group.pending > 0 || tableContent(draft) !== tableContent(current);
    if (changed && current !== undefined && group.pending === 0) {
      // Names of pods gone with their PoolMembers that the table still lists at 0 to drain: dropping
      // them is no reason of its own to write the table (a write reaches every sidecar of the
      // connection, and the garbage collector takes PoolMembers one by one); they go with the next.
      const lingering = lingeringEntries(current, group.pods, unplanned);
      const kept = lingering.length > 0 ? withDeparted(encodeGrantTable([...entries, ...lingering], current.generation)) : undefined;
      if (kept !== undefined && tableContent(kept) === tableContent(current)) {
        draft = kept;
        changed = false;
      }
    }
    const generation = changed ? finalGeneration : (current?.generation ?? 0);
    generations.set(k, generation);
    planned.push({ namespace: group.namespace, connection: group.connection, table: { ...draft, generation }, changed, grows: changed && grows, ...(changed && releases ? { releases } : {}) });
  }
  return { planned, generations };
}

/**
 * The PoolMembers on a table whose pod is not one of its planned pods (gone,
 * replaced by a new pod of that name, moved to another connection) and whose
 * departure is not recorded (it drained, or its connection holds none): listed
 * by name at 0 with `drain`, so that the table's default covers exactly the
 * pods it counts (`perPodPods`) and a PoolMember that outlives its pod is never
 * taken for one still on the default. Listed while the PoolMember exists.
 */
function unplannedMembers(pods: readonly PodState[], members: readonly MemberState[], departed: readonly DepartedPod[]): TableEntry[] {
  if (members.length === 0) return [];
  const planned = new Set(pods.map((s) => s.pod.name));
  if (members.every((m) => planned.has(m.name))) return [];
  // Recorded by UID, as unlistedDeparted reads it back.
  const recorded = new Set(departed.map((d) => d.uid).filter((uid) => uid !== ''));
  const out = new Map<string, TableEntry>();
  for (const m of members) {
    if (planned.has(m.name) || recorded.has(m.podUid)) continue;
    out.set(m.name, { name: m.name, connections: 0, drain: true });
  }
  return [...out.values()];
}

/**
 * The names `table` lists at 0 to drain, with no change in flight, that are
 * neither a pod planned on it nor a PoolMember listed by unplannedMembers:
 * pods gone with their PoolMembers.
 */
function lingeringEntries(table: GrantTable, pods: readonly PodState[], unplanned: readonly TableEntry[]): TableEntry[] {
  let known: Set<string> | undefined;
  const out: TableEntry[] = [];
  for (const e of table.exceptions) {
    if (e.connections !== 0 || e.drain !== true || e.since !== undefined || e.releasing !== undefined) continue;
    known ??= new Set([...pods.map((s) => s.pod.name), ...unplanned.map((u) => u.name)]);
    for (const name of e.pods) if (!known.has(name)) out.push({ name, connections: 0, drain: true });
  }
  return out;
}

/**
 * A pod's table entry: its next grant, and the change in flight the table
 * must record so that a controller that starts over counts what the sidecar
 * may still hold without needing acknowledgements only this one received.
 * A change made now is acknowledged from the new generation on; a shrink may
 * hold what was reserved before it until then.
 */
function tableEntry(s: PodState, grant: GrantInForce, nextGeneration: number): TableEntry {
  const entry: TableEntry = { name: s.pod.name, connections: grant.connections, drain: s.role !== 'live' };
  const since = grant !== s.grant ? nextGeneration : s.acknowledged ? undefined : s.since;
  if (since === undefined) return entry;
  return { ...entry, since, ...(s.reservation > grant.connections ? { releasing: s.reservation } : {}) };
}

/**
 * Plans the grants of every pod on one database server. Pass ALL
 * DatabaseConnections with that host:port (any namespace): they share
 * `input.limit`. `input.members` must include the grants this controller has
 * written, even if its cache has not seen them yet.
 */
export function planBudgets(input: BudgetInput): BudgetPlan {
  const limit = Math.max(0, Math.floor(input.limit));
  const consumers = indexConsumers(input.connections, input.pods);
  const tables = new Map((input.tables ?? []).map((t) => [`${t.namespace}/${t.connection}`, t.table]));
  const { states, orphans } = joinPodsWithMembers(input.pods, input.members, consumers, tables);
  const tableMembers = tableMembersByConnection(input);
  const departures = planDepartures(input, states, tables, tableMembers);
  const caps = capGroups(input.connections);
  const { targets, slotShares, oversubscription } = fairTargets(states, consumers, limit, caps);
  const next = stepTowardTargets(states, targets, limit, caps, departures.held);
  const planned = planTables(states, next, tables, departures.lists, input.tableGenerationFloors, tableMembers);
  // A pod on a table whose grant changes gets the table's new generation.
  for (const s of states) {
    const grant = next.get(s.key);
    const generation = planned.generations.get(`${s.pod.namespace}/${s.pod.connection}`);
    if (s.onTable && grant && grant !== s.grant && generation !== undefined) next.set(s.key, { connections: grant.connections, generation });
  }
  let nextDepartureExpiry: number | undefined;
  for (const list of departures.lists.values()) {
    for (const d of list) {
      const until = Date.parse(d.until);
      if (!Number.isNaN(until) && until > (input.now ?? 0) && (nextDepartureExpiry === undefined || until < nextDepartureExpiry)) nextDepartureExpiry = until;
    }
  }
  return {
    limit, ...summarize(input, states, consumers, targets, slotShares, next, departures.held), oversubscription, orphans, tables: planned.planned,
    ...(nextDepartureExpiry === undefined ? {} : { nextDepartureExpiry }),
  };
}
