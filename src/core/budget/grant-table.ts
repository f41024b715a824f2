/**
 * Grant tables: one object per DatabaseConnection that carries the grant of
 * every pod whose sidecar reads tables, as a per-pod default plus the pods that
 * differ from it, grouped by grant. One write reaches every pod; each sidecar
 * derives its own grant. Pure: data in, data out.
 */

/**
 * A change in flight, as the table records it: the pods have not yet
 * acknowledged the grant set by table generation `since`, and may still hold
 * `releasing` (a shrink) until they do. The table is the controller's ledger:
 * a change it writes without these fields is one whose acknowledgement it has
 * seen, from the PoolMember or over the acknowledgement channel, so a new
 * leader needs no acknowledgement that only its predecessor received.
 */
export interface ChangeInFlight {
  /** The table generation that set the grant; the pods acknowledge it with a table generation >= this. */
  since?: number | undefined;
  /** What the pods may hold until they acknowledge: the grant they had before a shrink. */
  releasing?: number | undefined;
}

/** Pods that share a grant (and change in flight) different from the table's default. */
export interface GrantException extends ChangeInFlight {
  connections: number;
  /** The pods are asked to give everything back (after their drain grace). */
  drain?: boolean | undefined;
  /** Pod (and PoolMember) names, sorted. */
  pods: string[];
}

/**
 * A pod that left (deleted, or finished) without its sidecar having reported
 * a drain: PostgreSQL may still hold its backends (a lost node's connections
 * end only when the server notices its peer is gone), so what it may hold
 * stays counted against the limit until `until`.
 */
export interface DepartedPod {
  /** The pod's (and its PoolMember's) name. */
  pod: string;
  /** The pod's UID; '' when only its name was known (a table lists pods by name). */
  uid: string;
  /** What it may still hold: its reservation when it left. */
  connections: number;
  /** RFC 3339: counted until then. */
  until: string;
}

/** A grant table (PoolGrant spec without its connection name). */
export interface GrantTable {
  /** Increases with every change of the table. */
  generation: number;
  /** The grant of every pod of the table not listed in `exceptions`. */
  perPod: number;
  /** The change in flight of every pod not listed in `exceptions`. */
  perPodSince?: number | undefined;
  perPodReleasing?: number | undefined;
  /**
   * The table records changes in flight (`since`, `releasing`). Tables
   * written by controllers before it did not: their pods are counted by
   * their PoolMember acknowledgements, as then.
   */
  recordsChanges?: boolean | undefined;
  /**
   * How many pods the default covered when the table was written: the live
   * pods on it not listed in `exceptions`. Only a controller moves a pod onto
   * the default (a PoolMember's `tableFrom` is its to write), and every other
   * PoolMember on the table is listed by name or recorded in `departed`, so a
   * later pass that finds fewer such PoolMembers knows that pods left unseen
   * (see `unlistedDeparted`). Absent in tables of older controllers: unknown.
   */
  perPodPods?: number | undefined;
  /** Sorted by connections, then drain, then change in flight. */
  exceptions: GrantException[];
  /** Pods gone without a drain, still counted (sorted by pod, then uid); no sidecar derives a grant from them. */
  departed?: DepartedPod[] | undefined;
}

/** One pod's entry before encoding. */
export interface TableEntry extends ChangeInFlight {
  name: string;
  connections: number;
  drain: boolean;
}

/** A pod's entry as a table holds it. */
export interface DerivedEntry extends ChangeInFlight {
  connections: number;
  drain: boolean;
}

/** PoolGrant spec fields, as the API returns them (optional lists may be absent). */
export interface GrantTableSpec {
  generation: number;
  perPod: number;
  perPodSince?: number | undefined;
  perPodReleasing?: number | undefined;
  recordsChanges?: boolean | undefined;
  perPodPods?: number | undefined;
  /** The generation whose write set `perPodPods`: a table written since by a controller that does not count them says nothing about them. */
  perPodPodsGeneration?: number | undefined;
  exceptions?: ReadonlyArray<{ connections: number; drain?: boolean | undefined; since?: number | undefined; releasing?: number | undefined; pods?: readonly string[] | undefined }> | undefined;
  departed?: ReadonlyArray<{ pod: string; uid?: string | undefined; connections: number; until: string }> | undefined;
}

/** The table a PoolGrant spec carries (the one conversion every reader uses). */
export function grantTableOf(spec: GrantTableSpec): GrantTable {
  return {
    generation: spec.generation,
    perPod: spec.perPod,
    ...(spec.perPodSince === undefined ? {} : { perPodSince: spec.perPodSince }),
    ...(spec.perPodReleasing === undefined ? {} : { perPodReleasing: spec.perPodReleasing }),
    ...(spec.recordsChanges ? { recordsChanges: true } : {}),
    ...(spec.perPodPods !== undefined && spec.perPodPodsGeneration === spec.generation ? { perPodPods: spec.perPodPods } : {}),
    exceptions: (spec.exceptions ?? []).map((e) => ({
      connections: e.connections,
      ...(e.drain ? { drain: true } : {}),
      ...(e.since === undefined ? {} : { since: e.since }),
      ...(e.releasing === undefined ? {} : { releasing: e.releasing }),
      pods: [...(e.pods ?? [])],
    })),
    ...(spec.departed !== undefined && spec.departed.length > 0 ? { departed: spec.departed.map((d) => ({ pod: d.pod, uid: d.uid ?? '', connections: d.connections, until: d.until })) } : {}),
  };
}

/** What the table's departed pods may still hold at `now` (ms since the epoch): those whose `until` has not passed. */
export function departedHeld(table: Pick<GrantTable, 'departed'> | undefined, now: number): number {
  let sum = 0;
  for (const d of table?.departed ?? []) if (departedCounts(d, now)) sum += d.connections;
  return sum;
}

/** A departed pod still counts at `now`: its `until` has not passed (an unreadable time counts: safe). */
export function departedCounts(d: DepartedPod, now: number): boolean {
  const until = Date.parse(d.until);
  return Number.isNaN(until) || until > now;
}

/** A PoolMember as far as `unlistedDeparted` needs it. */
export interface TableMember {
  name: string;
  podUid: string;
  tableFrom?: number | undefined;
}

/**
 * How many of the pods on `table`'s default when it was written have left
 * without any trace but the count: `perPodPods` less the PoolMembers that
 * still derive the default from it (their `tableFrom` reached, their name not
 * listed, their pod not recorded in `departed`). Such a pod was force-deleted
 * (or drained and deleted) and its PoolMember collected while no controller
 * saw it go, so it may still hold what the default grants until PostgreSQL
 * notices; `members` are the PoolMembers of the table's connection. 0 when
 * the table does not say how many pods its default covered.
 */
export function unlistedDeparted(table: GrantTable, members: Iterable<TableMember>): number {
  if (table.perPodPods === undefined || table.perPodPods === 0) return 0;
  const listed = new Set<string>();
  for (const e of table.exceptions) for (const name of e.pods) listed.add(name);
  const recorded = new Set<string>();
  for (const d of table.departed ?? []) if (d.uid !== '') recorded.add(d.uid);
  // By name: two PoolMembers of one name (a new pod's and the last state of the one before) are one pod of the default.
  const onDefault = new Set<string>();
  for (const m of members) {
    if (m.tableFrom !== undefined && m.tableFrom <= table.generation && !listed.has(m.name) && !recorded.has(m.podUid)) onDefault.add(m.name);
  }
  return Math.max(0, table.perPodPods - onDefault.size);
}

/** What one pod on `table`'s default may hold: its grant, or what a shrink in flight releases. */
export function defaultHolding(table: GrantTable): number {
  return Math.max(table.perPod, table.perPodReleasing ?? 0);
}

/** What a pod's sidecar derives from a table. */
export interface DerivedGrant {
  connections: number;
  generation: number;
  drain: boolean;
}

/**
 * The pod's grant under `table`. Only pods whose PoolMember says the table
 * applies to them (spec.tableFrom <= table.generation) may use it: anything
 * else would let a pod the controller has not planned take the default.
 */
export function deriveGrant(table: GrantTable, pod: string): DerivedGrant {
  const entry = deriveEntry(table, pod);
  return { connections: entry.connections, generation: table.generation, drain: entry.drain };
}

/** The pod's whole entry under `table`: its grant and the change in flight the table records for it. */
export function deriveEntry(table: GrantTable, pod: string): DerivedEntry {
  for (const e of table.exceptions) {
    // Sorted: a binary search keeps deriving O(log n) for the sidecar too.
    let lo = 0;
    let hi = e.pods.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const name = e.pods[mid]!;
      if (name === pod) return { connections: e.connections, drain: e.drain === true, ...inFlight(e) };
      if (name < pod) lo = mid + 1;
      else hi = mid - 1;
    }
  }
  return { connections: table.perPod, drain: false, ...inFlight({ since: table.perPodSince, releasing: table.perPodReleasing }) };
}

function inFlight(change: ChangeInFlight): ChangeInFlight {
  return { ...(change.since === undefined ? {} : { since: change.since }), ...(change.releasing === undefined ? {} : { releasing: change.releasing }) };
}

function entryKey(e: { connections: number; since?: number | undefined; releasing?: number | undefined }): string {
  return `${e.connections}/${e.since ?? ''}/${e.releasing ?? ''}`;
}

/**
 * Encodes per-pod grants as a table: the default is the most common entry
 * (grant and change in flight) among pods not draining (ties: the larger
 * grant), every other pod is an exception. The same entries always give the
 * same table, so an unchanged plan compares equal and is not written.
 */
export function encodeGrantTable(entries: readonly TableEntry[], generation: number): GrantTable {
  const counts = new Map<string, { count: number; entry: TableEntry }>();
  for (const e of entries) {
    if (e.drain) continue;
    const k = entryKey(e);
    const c = counts.get(k);
    if (c) c.count += 1;
    else counts.set(k, { count: 1, entry: e });
  }
  let best: { count: number; entry: TableEntry } | undefined;
  for (const c of counts.values()) {
    if (!best || c.count > best.count || (c.count === best.count && compareEntries(c.entry, best.entry) > 0)) best = c;
  }
  const defaultKey = best ? entryKey(best.entry) : entryKey({ connections: 0 });
  const groups = new Map<string, GrantException>();
  for (const e of entries) {
    if (!e.drain && entryKey(e) === defaultKey) continue;
    const k = `${entryKey(e)}/${e.drain}`;
    const group = groups.get(k) ?? { connections: e.connections, ...(e.drain ? { drain: true } : {}), ...inFlight(e), pods: [] };
    groups.set(k, group);
    group.pods.push(e.name);
  }
  const exceptions = [...groups.values()].sort((a, b) => a.connections - b.connections || Number(a.drain === true) - Number(b.drain === true) || compareEntries(a, b));
  for (const e of exceptions) e.pods.sort();
  const perPod = best?.entry;
  return {
    generation,
    perPod: perPod?.connections ?? 0,
    ...(perPod?.since === undefined ? {} : { perPodSince: perPod.since }),
    ...(perPod?.releasing === undefined ? {} : { perPodReleasing: perPod.releasing }),
    recordsChanges: true,
    perPodPods: best?.count ?? 0,
    exceptions,
  };
}

/** Orders entries by grant, then by change in flight (none first). */
function compareEntries(a: ChangeInFlight & { connections: number }, b: ChangeInFlight & { connections: number }): number {
  return a.connections - b.connections || (a.since ?? -1) - (b.since ?? -1) || (a.releasing ?? -1) - (b.releasing ?? -1);
}

/**
 * The grant in force for a PoolMember: derived from its connection's table
 * once that table covers it (`tableFrom <= table.generation`), else its own
 * spec.grant. What the planner, and anyone summing reservations, must count.
 */
export function memberGrantInForce(member: { name: string; grant: { connections: number; generation: number }; tableFrom?: number | undefined }, table: GrantTable | undefined): { connections: number; generation: number; fromTable: boolean; entry?: DerivedEntry | undefined } {
  if (member.tableFrom !== undefined && table !== undefined && table.generation >= member.tableFrom) {
    const entry = deriveEntry(table, member.name);
    return { connections: entry.connections, generation: table.generation, fromTable: true, entry };
  }
  return { ...member.grant, fromTable: false };
}

/** A sidecar's acknowledgement as far as a table pod's count needs it. */
export interface TableAcknowledgement {
  tableGeneration?: number | undefined;
  connections: number;
  held: number;
}

/**
 * Whether a pod on a table has acknowledged its grant, and what it may hold
 * meanwhile. The protocol's counting rule, shared by the planner and by
 * anyone checking its invariant.
 *
 * A table that records changes in flight is the ledger: an entry without
 * `since` is acknowledged (its writer saw the acknowledgement), one with it
 * is acknowledged by a table generation >= `since` and the same number, and
 * until then counts `releasing` too. A sidecar never holds more than the
 * larger of its grant and the grant it acknowledged before (one change in
 * flight per pod), and it acknowledges a shrink only once it holds no more.
 * Older tables: acknowledged by the same number from a table that covers the
 * pod, counted at the larger of grant, acknowledged and held.
 */
export function tableAccount(entry: DerivedEntry, table: Pick<GrantTable, 'recordsChanges'>, tableFrom: number, ack: TableAcknowledgement | undefined): { acknowledged: boolean; reservation: number } {
  const g = entry.connections;
  if (table.recordsChanges !== true) {
    const acknowledged = ack ? ack.tableGeneration !== undefined && ack.tableGeneration >= tableFrom && ack.connections === g : g === 0;
    return { acknowledged, reservation: Math.max(g, ack?.connections ?? 0, ack?.held ?? 0) };
  }
  const since = entry.since;
  const acknowledged = since === undefined || (ack !== undefined && ack.tableGeneration !== undefined && ack.tableGeneration >= Math.max(since, tableFrom) && ack.connections === g && ack.held <= g);
  return { acknowledged, reservation: acknowledged ? g : Math.max(g, entry.releasing ?? 0) };
}

/** One table write of a wave: the table to write for a connection. */
export interface TableWrite {
  namespace: string;
  connection: string;
  table: GrantTable;
}

/**
 * The order in which a pass writes the tables of one server: every write of
 * a wave may land in any order, and each wave only once the one before it
 * has. A table's own grows may use what the same write records as released
 * (one write is atomic), but not what another table records: so when more
 * than one table grows, each first writes what it releases, and the grows
 * come in a second wave. What is durable then never counts more than the
 * limit, whichever writes of a wave land and whenever the writer stops.
 */
export function tableWriteWaves(tables: ReadonlyArray<{ namespace: string; connection: string; table: GrantTable; changed: boolean; grows: boolean; releases?: GrantTable | undefined }>): TableWrite[][] {
  const changed = tables.filter((t) => t.changed);
  const growing = changed.filter((t) => t.grows);
  const write = (t: { namespace: string; connection: string }, table: GrantTable): TableWrite => ({ namespace: t.namespace, connection: t.connection, table });
  const first = changed.filter((t) => !t.grows).map((t) => write(t, t.table));
  if (growing.length > 1) for (const t of growing) if (t.releases) first.push(write(t, t.releases));
  const second = growing.map((t) => write(t, t.table));
  return [first, second].filter((wave) => wave.length > 0);
}

/** The table's content without its generation, for comparing two tables. */
export function tableContent(table: GrantTable): string {
  return JSON.stringify([table.perPod, table.perPodSince ?? null, table.perPodReleasing ?? null, table.recordsChanges === true, table.perPodPods ?? null, table.exceptions.map((e) => [e.connections, e.drain === true, e.since ?? null, e.releasing ?? null, e.pods]), (table.departed ?? []).map((d) => [d.pod, d.uid, d.connections, d.until])]);
}

/** The heartbeat of a small fleet: a sidecar renews its status every 10 s. */
export const BASE_HEARTBEAT_SECONDS = 10;
/** Most heartbeat status writes per second one connection's sidecars make together. */
export const HEARTBEAT_WRITES_PER_SECOND = 20;
/** Longest heartbeat interval. */
export const MAX_HEARTBEAT_SECONDS = 640;

/**
 * How often each of `pods` sidecars renews its status: 10 s up to 200 pods,
 * then doubled with every doubling of pods (at most 640 s), so the
 * connection's heartbeats stay at or under 20 status writes a second (at
 * 10,000 pods a 10 s heartbeat would be 1,000 writes a second, more than an
 * API server on two cores completes). Powers of two: a fleet scaling within
 * a factor of two changes it at most once.
 */
export function heartbeatSecondsFor(pods: number): number {
  let seconds = BASE_HEARTBEAT_SECONDS;
  while (seconds < MAX_HEARTBEAT_SECONDS && pods / seconds > HEARTBEAT_WRITES_PER_SECOND) seconds *= 2;
  return seconds;
}

/** How the sidecars of one table pace their status writes. */
export interface SidecarPacing {
  /** heartbeatSecondsFor the table's pods. */
  heartbeatSeconds: number;
  /**
   * After an acknowledgement the controller took over the channel, the
   * sidecar writes it into its status at a random point of this many
   * seconds: the table's pods / 20 (at least 1, at most a heartbeat), so that
   * `kubectl get pm` catches up within a second in a small fleet and the
   * writes stay at or under 20 a second in a large one.
   */
  statusDelaySeconds: number;
}

/** The pacing of a table with `pods` pods. */
export function sidecarPacingFor(pods: number): SidecarPacing {
  const heartbeatSeconds = heartbeatSecondsFor(pods);
  return { heartbeatSeconds, statusDelaySeconds: Math.min(heartbeatSeconds, Math.max(1, Math.ceil(pods / HEARTBEAT_WRITES_PER_SECOND))) };
}

/**
 * How long a sidecar may go without renewing its status before it counts as
 * unresponsive: three heartbeats, and never less than `minimumMs`.
 */
export function heartbeatTimeoutMs(heartbeatSeconds: number | undefined, minimumMs: number): number {
  return Math.max(minimumMs, 3 * (heartbeatSeconds ?? BASE_HEARTBEAT_SECONDS) * 1000);
}
