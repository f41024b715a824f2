/**
 * Grant tables: one object per DatabaseConnection that carries the grant of
 * every pod whose sidecar reads tables, as a per-pod default plus the pods that
 * differ from it, grouped by grant. One write reaches every pod; each sidecar
 * derives its own grant. Pure: data in, data out.
 */

/** Pods that share a grant different from the table's default. */
export interface GrantException {
  connections: number;
  /** The pods are asked to give everything back (after their drain grace). */
  drain?: boolean | undefined;
  /** Pod (and PoolMember) names, sorted. */
  pods: string[];
}

/** A grant table (PoolGrant spec without its connection name). */
export interface GrantTable {
  /** Increases with every change of the table. */
  generation: number;
  /** The grant of every pod of the table not listed in `exceptions`. */
  perPod: number;
  /** Sorted by connections, then drain. */
  exceptions: GrantException[];
}

/** One pod's entry before encoding. */
export interface TableEntry {
  name: string;
  connections: number;
  drain: boolean;
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
  for (const e of table.exceptions) {
    // Sorted: a binary search keeps deriving O(log n) for the sidecar too.
    let lo = 0;
    let hi = e.pods.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const name = e.pods[mid]!;
      if (name === pod) return { connections: e.connections, generation: table.generation, drain: e.drain === true };
      if (name < pod) lo = mid + 1;
      else hi = mid - 1;
    }
  }
  return { connections: table.perPod, generation: table.generation, drain: false };
}

/**
 * Encodes per-pod grants as a table: the default is the most common grant
 * among pods not draining (ties: the larger), every other pod is an exception.
 * The same entries always give the same table, so an unchanged plan compares
 * equal and is not written.
 */
export function encodeGrantTable(entries: readonly TableEntry[], generation: number): GrantTable {
  const counts = new Map<number, number>();
  for (const e of entries) if (!e.drain) counts.set(e.connections, (counts.get(e.connections) ?? 0) + 1);
  let perPod = 0;
  let best = 0;
  for (const [connections, count] of counts) {
    if (count > best || (count === best && connections > perPod)) {
      perPod = connections;
      best = count;
    }
  }
  const groups = new Map<string, GrantException>();
  for (const e of entries) {
    if (!e.drain && e.connections === perPod) continue;
    const k = `${e.connections}/${e.drain}`;
    const group = groups.get(k) ?? { connections: e.connections, ...(e.drain ? { drain: true } : {}), pods: [] };
    groups.set(k, group);
    group.pods.push(e.name);
  }
  const exceptions = [...groups.values()].sort((a, b) => a.connections - b.connections || Number(a.drain === true) - Number(b.drain === true));
  for (const e of exceptions) e.pods.sort();
  return { generation, perPod, exceptions };
}

/**
 * The grant in force for a PoolMember: derived from its connection's table
 * once that table covers it (`tableFrom <= table.generation`), else its own
 * spec.grant. What the planner, and anyone summing reservations, must count.
 */
export function memberGrantInForce(member: { name: string; grant: { connections: number; generation: number }; tableFrom?: number | undefined }, table: GrantTable | undefined): { connections: number; generation: number; fromTable: boolean } {
  if (member.tableFrom !== undefined && table !== undefined && table.generation >= member.tableFrom) {
    return { connections: deriveGrant(table, member.name).connections, generation: table.generation, fromTable: true };
  }
  return { ...member.grant, fromTable: false };
}

/** The table's content without its generation, for comparing two tables. */
export function tableContent(table: GrantTable): string {
  return JSON.stringify([table.perPod, table.exceptions.map((e) => [e.connections, e.drain === true, e.pods])]);
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

/**
 * How long a sidecar may go without renewing its status before it counts as
 * unresponsive: three heartbeats, and never less than `minimumMs`.
 */
export function heartbeatTimeoutMs(heartbeatSeconds: number | undefined, minimumMs: number): number {
  return Math.max(minimumMs, 3 * (heartbeatSeconds ?? BASE_HEARTBEAT_SECONDS) * 1000);
}
