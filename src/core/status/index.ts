/**
 * `kubectl poolkeeper status`: from DatabaseConnections, PoolMembers and
 * pods as the API server returns them, a report per database server (its
 * limit and who set it, each connection and consumer, each pod's budget,
 * what it holds and who waits) and, when the minimums do not fit, what to
 * change, with numbers. Pure: objects in, a report and its text out.
 *
 * Fields are read defensively (unknown in, checked on the way): the
 * PoolMember's shape and where grants live may change, and an older or newer
 * controller may write fields this version does not know.
 */
import { deriveEntry, grantTableOf, tableAccount, type GrantTableSpec } from '../budget/grant-table.ts';
import { consumerSelects } from '../inject/consumer.ts';
import type { ConsumerSpec } from '../inject/model.ts';

/** Objects as listed from the API server (any shape; only known fields are read). */
export interface StatusObjects {
  connections: readonly unknown[];
  members: readonly unknown[];
  pods: readonly unknown[];
  /** PoolGrants (grant tables): the grant of a pod on a table, and whether the controller has seen it acknowledged. */
  grants?: readonly unknown[] | undefined;
}

/** One consumer of a DatabaseConnection. */
export interface ConsumerRow {
  name: string;
  pods: number;
  minPerPod: number;
  maxPerPod: number | undefined;
  processesPerPod: number;
  weight: number;
  perPodBudget: number | undefined;
  perProcessBudget: number | undefined;
}

/** One pod drawing on a DatabaseConnection. */
export interface PodRow {
  name: string;
  consumer: string;
  /** Connections the controller grants now (undefined: not known yet). */
  grant: number | undefined;
  held: number | undefined;
  waiting: number | undefined;
  state: string;
}

/** One DatabaseConnection. */
export interface ConnectionRow {
  namespace: string;
  name: string;
  ready: string;
  reason: string;
  allocated: number | undefined;
  consumers: ConsumerRow[];
  pods: PodRow[];
  /** Messages of conditions that need attention (Oversubscribed, Degraded, LimitConflict...). */
  problems: string[];
}

/** What the minimums need beyond the limit, and ways out. */
export interface Oversubscription {
  needed: number;
  limit: number;
  excess: number;
  advice: string[];
}

/** One database server and everything drawing on it. */
export interface ServerReport {
  server: string;
  limit: number | undefined;
  discovered: number | undefined;
  reserve: number | undefined;
  /** Who set the limit, in words. */
  limitSetBy: string;
  allocated: number;
  connections: ConnectionRow[];
  oversubscription: Oversubscription | undefined;
}

/** The whole report. */
export interface StatusReport {
  servers: ServerReport[];
}


type Obj = Record<string, unknown>;

function obj(value: unknown): Obj {
  return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Obj) : {};
}

function list(value: unknown): unknown[] {
  return Array.isArray(value) ? value : [];
}

function str(value: unknown): string | undefined {
  return typeof value === 'string' ? value : undefined;
}

function num(value: unknown): number | undefined {
  return typeof value === 'number' && Number.isFinite(value) ? value : undefined;
}

function meta(o: unknown): { namespace: string; name: string } {
  const m = obj(obj(o).metadata);
  return { namespace: str(m.namespace) ?? '', name: str(m.name) ?? '' };
}

function condition(conditions: unknown, type: string): { status: string; reason: string; message: string } | undefined {
  const found = list(conditions).map(obj).find((c) => c.type === type);
  return found ? { status: str(found.status) ?? 'Unknown', reason: str(found.reason) ?? '', message: str(found.message) ?? '' } : undefined;
}

/** Who set the server's limit, from what the controller wrote into this DatabaseConnection. */
function limitSetBy(connection: unknown): string {
  const { namespace, name } = meta(connection);
  const spec = obj(obj(connection).spec);
  const status = obj(obj(connection).status);
  const limit = obj(status.limit);
  // A controller that records the source names it; prefer its words.
  for (const key of ['setBy', 'source', 'server']) {
    const value = str(limit[key]);
    if (value) return value;
  }
  const serverRef = str(obj(spec.serverRef).name);
  if (serverRef) return `DatabaseServer ${serverRef}`;
  const max = str(spec.maxConnections) ?? num(spec.maxConnections);
  const own = `${max === undefined || max === 'auto' ? 'maxConnections auto (read from the server)' : `maxConnections ${max}`}, reserve ${str(spec.reserve) ?? num(spec.reserve) ?? '15%'}`;
  const conflict = condition(status.conditions, 'LimitConflict');
  if (conflict?.status === 'True') {
    const setter = /set by DatabaseConnection ([^\s,;]+)/.exec(conflict.message)?.[1];
    return setter ? `DatabaseConnection ${setter.replace(/[.,]$/, '')} (the first on this server; ${namespace}/${name} asks for other values)` : `another DatabaseConnection (${conflict.message})`;
  }
  const exceeds = condition(status.conditions, 'LimitExceedsServer');
  const capped = exceeds?.status === 'True' ? '; capped at what the server allows' : '';
  const shared = num(limit.shared) ?? 1;
  return shared > 1 ? `DatabaseConnection ${namespace}/${name}, the first of ${shared} on this server: ${own}${capped}` : `DatabaseConnection ${namespace}/${name}: ${own}${capped}`;
}

function serverKey(connection: unknown): string {
  const spec = obj(obj(connection).spec);
  const serverRef = str(obj(spec.serverRef).name);
  const database = obj(spec.database);
  const address = `${str(database.host) ?? '?'}:${num(database.port) ?? 5432}`;
  return serverRef ? `${address} (DatabaseServer ${serverRef})` : address;
}

/**
 * The pod's grant from its connection's grant table, if the table covers it,
 * and whether it is acknowledged: by the table (a change without `since` is
 * one the controller has seen acknowledged, possibly over the channel,
 * before the sidecar's next status write) or by the PoolMember status.
 */
function tableGrant(member: Obj, grant: Obj | undefined): { connections: number; acknowledged: boolean } | undefined {
  const tableFrom = num(obj(member.spec).tableFrom);
  const spec = grant ? obj(grant.spec) : undefined;
  const generation = spec ? num(spec.generation) : undefined;
  if (tableFrom === undefined || !spec || generation === undefined || generation < tableFrom) return undefined;
  const table = grantTableOf({ ...(spec as unknown as GrantTableSpec), generation, perPod: num(spec.perPod) ?? 0 });
  const entry = deriveEntry(table, meta(member).name);
  const status = obj(member.status);
  const ack = num(status.acknowledgedGeneration) === undefined ? undefined : { tableGeneration: num(status.tableGeneration), connections: num(status.acknowledgedConnections) ?? 0, held: num(status.heldConnections) ?? 0 };
  return { connections: entry.connections, acknowledged: tableAccount(entry, table, tableFrom, ack).acknowledged };
}

/** The pod's state as its PoolMember, its grant table and pod object tell it. */
function podState(pod: Obj, member: Obj, onTable: { acknowledged: boolean } | undefined): string {
  const status = obj(member.status);
  if (obj(pod.metadata).deletionTimestamp) return status.drained === true ? 'terminating, drained' : 'terminating';
  if (status.draining === true) return 'draining';
  const spec = obj(member.spec);
  const generation = num(obj(spec.grant).generation);
  const acknowledged = num(status.acknowledgedGeneration);
  if (Object.keys(member).length === 0) return 'no PoolMember yet';
  if (acknowledged === undefined) return 'sidecar not reporting';
  // Its own report, written when it changes: the DatabaseConnection's Degraded message has the cause.
  const reach = Array.isArray(status.conditions) ? (status.conditions as unknown[]).map(obj).find((c) => c.type === 'DatabaseReachable') : undefined;
  if (reach?.status === 'False') return `cannot reach the database (${str(reach.reason) ?? 'unknown'})`;
  if (onTable) return onTable.acknowledged ? 'ok' : 'grant not acknowledged yet';
  if (generation !== undefined && acknowledged < generation) return 'grant not acknowledged yet';
  return 'ok';
}

/** Clients waiting for a server connection at the sidecar's last status write (it sends the number with every heartbeat). */
function waitingClients(member: Obj): number | undefined {
  const status = obj(member.status);
  return num(status.waitingClients);
}

/** Builds the report. */
export function buildStatusReport(objects: StatusObjects): StatusReport {
  const membersByKey = new Map(objects.members.map((m) => [`${meta(m).namespace}/${meta(m).name}`, obj(m)]));
  const grantsByKey = new Map((objects.grants ?? []).map((g) => [`${meta(g).namespace}/${meta(g).name}`, obj(g)]));
  const podsByConnection = new Map<string, Obj[]>();
  for (const pod of objects.pods.map(obj)) {
    const connection = str(obj(obj(pod.metadata).labels)['poolkeeper.dev/connection']);
    if (!connection) continue;
    const phase = str(obj(pod.status).phase);
    if (phase === 'Succeeded' || phase === 'Failed') continue;
    const key = `${meta(pod).namespace}/${connection}`;
    podsByConnection.set(key, [...(podsByConnection.get(key) ?? []), pod]);
  }

  const servers = new Map<string, { connections: unknown[] }>();
  for (const connection of objects.connections) {
    const key = serverKey(connection);
    servers.set(key, { connections: [...(servers.get(key)?.connections ?? []), connection] });
  }

  const reports: ServerReport[] = [];
  for (const [server, { connections }] of [...servers.entries()].sort(([a], [b]) => a.localeCompare(b))) {
    connections.sort((a, b) => `${meta(a).namespace}/${meta(a).name}`.localeCompare(`${meta(b).namespace}/${meta(b).name}`));
    const limits = connections.map((c) => obj(obj(obj(c).status).limit));
    const effective = limits.map((l) => num(l.effective)).filter((n): n is number => n !== undefined);
    const limit = effective.length > 0 ? Math.min(...effective) : undefined;
    // The one that says it sets the limit, else one whose conflict names the setter, else one at the limit.
    const conflicting = connections.find((c) => condition(obj(obj(c).status).conditions, 'LimitConflict')?.status === 'True');
    const named = conflicting ? /set by DatabaseConnection ([^\s,;]+)/.exec(condition(obj(obj(conflicting).status).conditions, 'LimitConflict')?.message ?? '')?.[1]?.replace(/[.,]$/, '') : undefined;
    const setter = connections.find((c) => condition(obj(obj(c).status).conditions, 'LimitConflict')?.reason === 'SetsLimit')
      ?? connections.find((c) => `${meta(c).namespace}/${meta(c).name}` === named)
      ?? conflicting
      ?? connections[limits.findIndex((l) => num(l.effective) === limit)] ?? connections[0];
    const setterLimit = obj(obj(obj(setter).status).limit);
    const rows = connections.map((c) => connectionRow(c, podsByConnection, membersByKey, grantsByKey));
    const allocated = rows.reduce((sum, r) => sum + (r.allocated ?? 0), 0);
    reports.push({
      server,
      limit,
      discovered: num(setterLimit.discovered),
      reserve: num(setterLimit.reserve),
      limitSetBy: limit === undefined ? 'not known yet (the controller has not read the server\'s limit)' : limitSetBy(setter),
      allocated,
      connections: rows,
      oversubscription: limit === undefined ? undefined : oversubscription(rows, limit),
    });
  }
  return { servers: reports };
}

/** consumerSelects on objects of unknown shape: a malformed consumer selects nothing. */
function selects(consumer: Obj, pod: Obj): boolean {
  if (consumer.workloadRef === undefined && consumer.selector === undefined) return false;
  try {
    return consumerSelects(consumer as unknown as ConsumerSpec, pod);
  } catch {
    return false;
  }
}

function connectionRow(connection: unknown, podsByConnection: Map<string, Obj[]>, membersByKey: Map<string, Obj>, grantsByKey: Map<string, Obj>): ConnectionRow {
  const { namespace, name } = meta(connection);
  const spec = obj(obj(connection).spec);
  const status = obj(obj(connection).status);
  const statusConsumers = new Map(list(status.consumers).map(obj).map((c) => [str(c.name) ?? '', c]));
  const pods = podsByConnection.get(`${namespace}/${name}`) ?? [];
  const specConsumers = list(spec.consumers).map(obj);
  /** The webhook's annotation, else the first consumer that selects the pod (pods admitted without the webhook). */
  const consumerOf = (pod: Obj): string => str(obj(obj(pod.metadata).annotations)['poolkeeper.dev/consumer'])
    ?? str(specConsumers.find((c) => selects(c, pod))?.name) ?? '-';
  const consumers: ConsumerRow[] = list(spec.consumers).map(obj).map((c) => {
    const consumerName = str(c.name) ?? '';
    const s = statusConsumers.get(consumerName) ?? {};
    return {
      name: consumerName,
      pods: num(s.pods) ?? pods.filter((p) => consumerOf(p) === consumerName).length,
      minPerPod: num(c.minPerPod) ?? 1,
      maxPerPod: num(c.maxPerPod),
      processesPerPod: num(c.processesPerPod) ?? 1,
      weight: num(c.weight) ?? 1,
      perPodBudget: num(s.perPodBudget),
      perProcessBudget: num(s.perProcessBudget),
    };
  });
  const podRows: PodRow[] = pods.map((pod) => {
    const podName = meta(pod).name;
    const member = membersByKey.get(`${namespace}/${podName}`) ?? {};
    const memberStatus = obj(member.status);
    const onTable = tableGrant(member, grantsByKey.get(`${namespace}/${name}`));
    return {
      name: podName,
      consumer: consumerOf(pod),
      // A member whose grants come from a grant table (spec.tableFrom) keeps a stale spec.grant: the table's is the grant then.
      grant: onTable?.connections ?? (num(obj(member.spec).tableFrom) !== undefined ? num(memberStatus.acknowledgedConnections) : num(obj(obj(member.spec).grant).connections) ?? num(memberStatus.acknowledgedConnections)),
      held: num(memberStatus.heldConnections),
      waiting: waitingClients(member),
      state: podState(pod, member, onTable),
    };
  }).sort((a, b) => a.name.localeCompare(b.name));
  const ready = condition(status.conditions, 'Ready');
  const problems: string[] = [];
  for (const type of ['Oversubscribed', 'Degraded', 'LimitConflict', 'LimitExceedsServer', 'PoolerInFront']) {
    const c = condition(status.conditions, type);
    // A pooler in session mode serves as PostgreSQL does: only one that pools by transaction is a problem.
    if (c?.status === 'True' && c.message && (type !== 'PoolerInFront' || c.reason === 'TransactionPooler')) problems.push(`${type}: ${c.message}`);
  }
  if (ready?.status === 'False' && ready.message && !problems.some((p) => p.includes(ready.message))) problems.push(`Ready=False (${ready.reason}): ${ready.message}`);
  return { namespace, name, ready: ready?.status ?? 'Unknown', reason: ready?.reason ?? '', allocated: num(status.allocated), consumers, pods: podRows, problems };
}

/**
 * Whether the minimums of every pod on the server fit the limit, and if not,
 * three ways out with numbers: raise the limit, scale a consumer down, or
 * lower its minPerPod (never below its processesPerPod without saying so).
 */
export function oversubscription(rows: readonly ConnectionRow[], limit: number): Oversubscription | undefined {
  const consumers = rows.flatMap((r) => r.consumers.map((c) => ({ ...c, connection: `${r.namespace}/${r.name}` })));
  const needed = consumers.reduce((sum, c) => sum + c.pods * c.minPerPod, 0);
  if (needed <= limit) return undefined;
  const excess = needed - limit;
  const advice = [`raise the limit by ${excess} to ${needed}: max_connections (or a numeric maxConnections) up by at least ${excess}, plus what the reserve takes of it`];
  for (const c of consumers.filter((x) => x.pods > 0 && x.minPerPod > 0).sort((a, b) => b.pods * b.minPerPod - a.pods * a.minPerPod)) {
    const fewer = Math.ceil(excess / c.minPerPod);
    if (fewer < c.pods) advice.push(`scale ${c.connection} consumer ${c.name} from ${c.pods} to ${c.pods - fewer} pods (${c.minPerPod} each)`);
    const others = needed - c.pods * c.minPerPod;
    const lowered = Math.floor((limit - others) / c.pods);
    if (lowered >= 0 && lowered < c.minPerPod) {
      const warning = lowered < c.processesPerPod ? `, below its processesPerPod ${c.processesPerPod}: some processes would wait for each other` : '';
      advice.push(`lower ${c.connection} consumer ${c.name}'s minPerPod from ${c.minPerPod} to ${lowered} (${c.pods} pods)${warning}`);
    }
  }
  return { needed, limit, excess, advice };
}

function cell(value: number | string | undefined): string {
  return value === undefined ? '-' : String(value);
}

function table(header: readonly string[], rows: readonly (readonly string[])[], indent: string): string[] {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (r: readonly string[]): string => `${indent}${r.map((v, i) => (i === r.length - 1 ? v : v.padEnd(widths[i]! + 2))).join('')}`.trimEnd();
  return [line(header), ...rows.map(line)];
}

/** The report as text for a terminal. */
export function formatStatusReport(report: StatusReport): string {
  if (report.servers.length === 0) return 'No DatabaseConnections found.\n';
  const out: string[] = [];
  for (const server of report.servers) {
    const limit = server.limit === undefined
      ? 'limit unknown'
      : `limit ${server.limit}${server.discovered !== undefined && server.reserve !== undefined ? ` (${server.discovered} - reserve ${server.reserve})` : ''}`;
    out.push(`SERVER ${server.server}   ${limit}   allocated ${server.allocated}${server.limit === undefined ? '' : `/${server.limit}`}`);
    out.push(`  limit set by ${server.limitSetBy}`);
    for (const c of server.connections) {
      out.push('');
      out.push(`  ${c.namespace}/${c.name}   Ready=${c.ready}${c.reason ? ` (${c.reason})` : ''}   allocated ${cell(c.allocated)}`);
      out.push(...table(['CONSUMER', 'PODS', 'MIN/POD', 'MAX/POD', 'PROCESSES', 'WEIGHT', 'BUDGET/POD', 'PER PROCESS'],
        c.consumers.map((k) => [k.name, String(k.pods), String(k.minPerPod), cell(k.maxPerPod), String(k.processesPerPod), String(k.weight), cell(k.perPodBudget), cell(k.perProcessBudget)]), '    '));
      if (c.pods.length > 0) {
        out.push('');
        out.push(...table(['POD', 'CONSUMER', 'GRANT', 'HELD', 'WAITING', 'STATE'], c.pods.map((p) => [p.name, p.consumer, cell(p.grant), cell(p.held), cell(p.waiting), p.state]), '    '));
      }
      for (const problem of c.problems) out.push(`    ! ${problem}`);
    }
    if (server.oversubscription) {
      const o = server.oversubscription;
      out.push('');
      out.push(`  OVERSUBSCRIBED: the pods' minimums need ${o.needed} connections, the limit is ${o.limit} (${o.excess} short). PostgreSQL still never gets more than ${o.limit}, but pods get less than their minPerPod. Any one of:`);
      for (const a of o.advice) out.push(`    - ${a}`);
    }
    out.push('');
  }
  return `${out.join('\n').trimEnd()}\n`;
}
