/**
 * Reconciles one database server: resolves its limit, plans every pod's
 * grant with the pure planner, writes PoolMembers (shrinks first), and
 * reports status, conditions, Events and metrics on each DatabaseConnection.
 * Level-triggered: it reads only caches and recomputes everything each time.
 */
import { createHash } from 'node:crypto';
import { steadyNow } from '../ops/clock.ts';
import type { Logger } from 'pino';
import { API_GROUP, API_VERSION, CONNECTION_LABEL, DATABASE_REACHABLE, DEFAULT_MAX_CONNECTIONS, DEFAULT_RESERVE, memberPodUid, type DatabaseConnection, type DatabaseServer, type PoolMember, type PoolMemberSpecInput } from '../api/index.ts';
import { budgetConditions, planBudgets, resolveLimit, autoMaxConnections, departureHoldAdvice, deriveEntry, loginConnectionCap, loginConnectionCaps, connectionCaps, sidecarPacingFor, heartbeatTimeoutMs, type SidecarPacing, type BudgetInput, type BudgetPlan, type PodGrant, type PlannedTable, isUnlistedRecord, type ConnectionCap, type GrantTable, type LoginCap, type ServerSettings } from '../core/budget/index.ts';
import { decideOwnedLimit, decideServerLimit, namespaceDemands, namespaceShares, ownedServerKey, planWithShares, ruleFor, type NamespaceRule } from '../core/tenancy/index.ts';
import { connectionConditions, sidecarReachabilityCondition, limitMismatchCondition, loginCapCondition, oversubscriptionAdvice, poolerCondition, type ConsumerDemand, type ConsumerFacts, type SidecarReachabilityFacts, type Verification, type VerificationFailure } from '../core/conditions/connection.ts';
import { conditionsEqual, findCondition, setConditions, type Condition, type ConditionUpdate } from '../core/conditions/index.ts';
import { redactSecrets } from '../core/conditions/redact.ts';
import { credentialsGeneration } from '../core/credentials.ts';
import { describeApiError } from '../kube/backoff.ts';
import type { EventRecorder } from '../kube/events.ts';
import { isStatus, type KubeHttp } from '../kube/http.ts';
import type { Informer, KubeObject } from '../kube/informer.ts';
import type { ProcessResult } from '../kube/workqueue.ts';
import { podNeedsRepair, type PodLike } from '../core/inject/index.ts';
import { resolveConsumer } from '../core/inject/consumer.ts';
import type { MissingSidecarRepairer } from '../webhook/repair.ts';
import type { DiscoveryTarget, LimitDiscovery } from './limit-discovery.ts';
import { ServerWatch } from './server-watch.ts';
import { SidecarAccess } from './sidecar-access.ts';
import { ConnectionVerifier, type VerifierOptions } from './verifier.ts';
import { ServerDirectory } from './server-directory.ts';
import type { ControllerMetrics } from './metrics.ts';
import { forEachBounded } from './bounded.ts';
import type { PoolGrant } from '../api/poolgrant.ts';
import { GrantTableWriter } from './grant-tables.ts';
import type { AcknowledgementLedger } from './acknowledgements.ts';
import { buildBudgetInput, DEFAULT_DEPARTURE_HOLD_SECONDS, podConnectionKey, type PodObject, type WorkloadScale, type WrittenGrant } from './plan-input.ts';

/** A Secret as the cache holds it. */
export interface SecretObject extends KubeObject {
  data?: Record<string, string>;
}

/** A Deployment or StatefulSet, as far as budgets care. */
export interface WorkloadObject extends KubeObject {
  spec?: { replicas?: number; template?: { metadata?: { labels?: Record<string, string> } } };
}

/** A Namespace, as far as DatabaseServer allocations care (its labels). */
export type NamespaceObject = KubeObject;

/** A HorizontalPodAutoscaler (autoscaling/v2). */
export interface HpaObject extends KubeObject {
  spec?: { maxReplicas?: number; scaleTargetRef?: { kind: string; name: string } };
}

/** The informers the reconciler reads. */
export interface ControllerCaches {
  connections: Informer<DatabaseConnection & KubeObject>;
  pods: Informer<PodObject & KubeObject>;
  members: Informer<PoolMember & KubeObject>;
  secrets: Informer<SecretObject>;
  deployments: Informer<WorkloadObject>;
  statefulSets: Informer<WorkloadObject>;
  hpas: Informer<HpaObject>;
  /** PoolGrants (grant tables); absent: every pod keeps its grant on its PoolMember. */
  grants?: Informer<PoolGrant & KubeObject>;
  servers: Informer<DatabaseServer & KubeObject>;
  namespaces: Informer<NamespaceObject>;
}

/** What the reconciler needs. */
export interface ReconcilerDeps {
  http: KubeHttp;
  caches: ControllerCaches;
  discovery: LimitDiscovery;
  events: EventRecorder;
  metrics: ControllerMetrics;
  logger: Logger;
  now?: () => Date;
  /** Resync period of a settled server (limit re-discovery, drift). */
  resyncMs?: number;
  /** How soon to look again while grants wait for acknowledgements. */
  pendingRequeueMs?: number;
  /** Evicts (or reports) opted-in pods that came up without the sidecar; absent: not checked. */
  repairer?: MissingSidecarRepairer;
  /** How long a pod may lack its sidecar before it counts as missing it. */
  repairGraceSeconds?: number;
  /** Bind the ClusterRole `poolkeeper-sidecar` to the ServiceAccounts of opted-in pods, per namespace. */
  manageSidecarAccess?: boolean;
  /** A sidecar whose PoolMember status has not been written for this long is reported unresponsive; unset: three heartbeats of its table, at least 60 s. */
  heartbeatTimeoutMs?: number;
  /**
   * When this replica saw `member`'s heartbeat change, by its own clock (ms);
   * undefined: not seen yet. Absent: the heartbeat's own timestamp is used,
   * which a node clock that is off makes wrong.
   */
  heardAt?: (member: PoolMember) => number | undefined;
  /** Server identity; absent: one with the system resolver. */
  directory?: ServerDirectory;
  /** Timings of the per-connection login check. */
  verifier?: VerifierOptions;
  /** False once this replica may no longer write grants (it lost the Lease or is stopping); absent: always. */
  mayWrite?: () => boolean;
  /**
   * Acknowledgements received over the channel (docs/protocol.md), and the
   * address the grant tables tell sidecars to send them to; absent: PoolMember
   * status only.
   */
  acknowledgements?: { ledger: AcknowledgementLedger; acknowledgeTo: () => string | undefined } | undefined;
  /** Asks for a reconcile of `server` (a login check that ran in the background changed its answer); absent: the next resync sees it. */
  wake?: (server: string) => void;
}

/** A PoolMember write a pass has to make, with the fingerprint of the spec it writes. */
interface GrantWrite {
  grant: PodGrant;
  connection: DatabaseConnection;
  existing: PoolMember | undefined;
  credentials: CredentialsLookup | undefined;
  fingerprint: string;
  ownerChanged: boolean;
}

/** A grant write found its PoolMember changed since the cache showed it (another writer, or the cache behind). */
export class GrantConflictError extends Error {
  constructor(member: string) {
    super(`PoolMember ${member} changed since it was read; replanning`);
    this.name = 'GrantConflictError';
  }
}

/** Thrown instead of writing a grant when this replica no longer leads. */
/**
 * Thrown at the end of a pass in which some DatabaseConnections' status could not be
 * written (an admission policy, a quota, an API error): the others were written, and
 * the work queue retries the server with its backoff.
 */
export class StatusWriteError extends Error {
  constructor(failures: ReadonlyArray<{ connection: string; error: string }>) {
    const first = failures[0];
    super(`status of ${failures.length} DatabaseConnection(s) not written: ${first?.connection}: ${first?.error}${failures.length > 1 ? ', ...' : ''}`);
    this.name = 'StatusWriteError';
  }
}

export class NotLeaderError extends Error {
  constructor() {
    super('not the leader any more; grant write skipped');
    this.name = 'NotLeaderError';
  }
}

const MEMBERS = `/apis/${API_GROUP}/${API_VERSION}`;

/** How long a sidecar may go without writing its PoolMember status before it counts as unresponsive, unless configured. */
export const DEFAULT_HEARTBEAT_TIMEOUT_MS = 60_000;

/** While grants move, a DatabaseConnection's status is written at most this often (unless a condition changes). */
const STATUS_COALESCE_MS = 1_000;

/** How long a pod seen deleted is remembered (podDeleted): its PoolMember is collected well within it. */
const DELETED_POD_MEMORY_MS = 10 * 60_000;

/** PoolMember writes in flight at once: the API client's own connection cap (KubeHttp's default). */
const GRANT_WRITE_CONCURRENCY = 32;

function key(object: { metadata: { namespace?: string; name?: string } }): string {
  return `${object.metadata.namespace ?? ''}/${object.metadata.name ?? ''}`;
}

/** Decoded credentials and their generation, or why there are none. */
type CredentialsLookup = { ok: true; username: string; password: string; generation: string } | { ok: false; reason: 'SecretMissing' | 'SecretKeyMissing'; message: string };

/** One connection's login check and limit before sharing. */
interface Resolved {
  credentials: CredentialsLookup;
  verification: Verification;
  degraded?: ConditionUpdate | undefined;
  mismatch: ConditionUpdate;
  /** PoolerInFront, from this connection's own login; absent until one succeeded. */
  pooler?: ConditionUpdate;
  /** LimitConflict: whether this connection's own limit is the one the server gets. */
  conflict?: ConditionUpdate;
  /** Ready=False because the connection may not draw on its server (DatabaseServer allocations, wrong address). */
  refused?: ConditionUpdate;
  /** Values to keep out of status and Events. */
  secrets: string[];
  discovered?: number;
  reserve?: number;
  effective?: number;
  /** The CONNECTION LIMITs of its login (role, database), before any reserve. */
  loginCaps?: LoginCap[];
}

/** Ready reasons that get an Event when they start. */
const NOT_SERVING_EVENTS = new Set(['NotAllowed', 'AddressNotOfServer', 'ServerNotFound', 'SecretMissing', 'SecretKeyMissing', 'CaSecretMissing', 'SshKeySecretMissing', 'CredentialsRejected', 'DatabaseNotFound', 'ConnectionFailed', 'PodsWithoutConsumer', 'WorkloadNotOptedIn', 'SidecarsCannotConnect']);

/** The reconciler of database servers. */
export class ServerReconciler {
  private readonly planMs = new Map<string, number>();

  /** Per server, the pods (by UID) whose acknowledgement its last plan, written in full, waits for. */
  private readonly awaiting = new Map<string, Set<string>>();

  /**
   * The pods whose acknowledgement the last reconcile of `server` waits for
   * (a new Set the caller may change); undefined when that reconcile did not
   * write a whole plan.
   */
  awaitedAcknowledgements(server: string): Set<string> | undefined {
    const waiting = this.awaiting.get(server);
    return waiting && new Set(waiting);
  }

  /** How long the last plan of `server` took (reading the caches and planning), in ms. */
  lastPlanMs(server: string): number | undefined {
    return this.planMs.get(server);
  }

  private readonly deps: ReconcilerDeps;
  private readonly written = new Map<string, WrittenGrant>();
  /** resourceVersion, grant generation and normalised spec of the PoolMember this replica last wrote, by pod uid. */
  private readonly writtenVersions = new Map<string, { generation: number; resourceVersion: string; spec: string }>();
  private readonly unsettledSince = new Map<string, number>();
  /** PoolMembers on tables seen on earlier passes, by pod UID, and since when both they and their pod are gone (withGoneMembers). */
  private readonly seenMembers = new Map<string, { member: PoolMember; goneAt?: number; final?: boolean }>();
  /** PoolMembers this replica created, by `namespace/name`, until its cache shows them. */
  private readonly created = new Map<string, PoolMember>();
  /**
   * Pods seen deleted whose PoolMember the garbage collector takes (podDeleted),
   * by UID, with when (ms): kept a while after, since a pass may still hold an
   * older snapshot with the PoolMember in it.
   */
  private readonly deletedPods = new Map<string, number>();
  /**
   * Pods whose PoolMember was deleted saying drained (its last state), by UID, with when:
   * a departure recorded from an older view of that PoolMember is dropped (BudgetInput.drainedPodUids).
   * Remembered for DELETED_POD_MEMORY_MS, longer than a departure is held by default.
   */
  private readonly drainedGone = new Map<string, number>();
  /** The same pods by `namespace/name` (BudgetInput.drainedPodNames). */
  private readonly drainedGoneNames = new Map<string, number>();
  /** The DepartureHoldShort warning last recorded per DatabaseConnection (recorded again only when it changes). */
  private readonly holdWarnings = new Map<string, string>();
  /** When each DatabaseConnection's status was last written (ms), to coalesce writes while grants move. */
  private readonly statusWrittenAt = new Map<string, number>();
  private readonly now: () => Date;
  private readonly sidecarAccess: SidecarAccess | undefined;
  /** Grant tables: PoolMembers switched onto them, and one PoolGrant write per connection per rebalance. */
  private readonly tables: GrantTableWriter;
  private readonly verifier: ConnectionVerifier;
  /** An idle login per server: when it ends, the server's limit is read again at once. */
  private readonly watch: ServerWatch;
  /** The server key of each connection (equivalent addresses are one server). */
  readonly directory: ServerDirectory;
  private refreshing: Promise<Array<{ before: string; after: string }>> | undefined;
  private refreshQueued: Promise<Array<{ before: string; after: string }>> | undefined;

  constructor(deps: ReconcilerDeps) {
    this.deps = deps;
    this.now = deps.now ?? (() => new Date(steadyNow()));
    this.sidecarAccess = deps.manageSidecarAccess ? new SidecarAccess(deps.http, deps.logger) : undefined;
    this.tables = new GrantTableWriter({ http: deps.http, grants: deps.caches.grants, logger: deps.logger, assertMayWrite: () => this.assertMayWrite(), conflict: (what) => new GrantConflictError(what), acknowledgeTo: deps.acknowledgements?.acknowledgeTo });
    this.verifier = new ConnectionVerifier(deps.discovery, deps.verifier, (connectionKey) => {
      const slash = connectionKey.indexOf('/');
      const connection = deps.caches.connections.get(connectionKey.slice(0, slash), connectionKey.slice(slash + 1));
      if (connection) deps.wake?.(this.directory.keyOf(connection));
    });
    this.directory = deps.directory ?? new ServerDirectory();
    this.watch = new ServerWatch({
      hold: (target) => deps.discovery.hold(target),
      onLost: (server) => {
        this.verifier.expire(deps.caches.connections.list().filter((c) => this.directory.keyOf(c) === server).map(key));
        deps.wake?.(server);
      },
      logger: deps.logger,
    });
  }

  /** Releases what the reconciler holds open (its logins watching the servers): call once its work has stopped. */
  async release(): Promise<void> {
    await this.watch.releaseAll();
  }

  /**
   * Re-resolves the connections' addresses (one refresh at a time; callers
   * share it) and returns the connections whose server key changed.
   */
  refreshDirectory(): Promise<Array<{ before: string; after: string }>> {
    // A refresh already running may have listed the connections before the caller's change: queue one more.
    if (this.refreshing) {
      this.refreshQueued ??= this.refreshing.catch(() => []).then(() => {
        this.refreshQueued = undefined;
        return this.runRefresh();
      });
      return this.refreshQueued;
    }
    return this.runRefresh();
  }

  private runRefresh(): Promise<Array<{ before: string; after: string }>> {
    const running = this.directory.refresh(this.deps.caches.connections.list(), this.deps.caches.servers.list()).finally(() => {
      if (this.refreshing === running) this.refreshing = undefined;
    });
    this.refreshing = running;
    return running;
  }

  /** The server key a DatabaseServer owns. */
  ownedKey(name: string): string {
    return ownedKey(name);
  }

  /** The server key of every live DatabaseConnection in the cache, and of every DatabaseServer. */
  serverKeys(): string[] {
    const owned = this.deps.caches.servers.list().map((s) => ownedKey(s.metadata.name ?? ''));
    return [...new Set([...this.deps.caches.connections.list().map((c) => this.directory.keyOf(c)), ...owned])];
  }

  private credentials(connection: DatabaseConnection): CredentialsLookup {
    const ref = connection.spec.database.credentialsSecretRef;
    const secret = this.deps.caches.secrets.get(connection.metadata.namespace, ref.name);
    if (!secret) return { ok: false, reason: 'SecretMissing', message: `credentials Secret ${ref.name} not found in namespace ${connection.metadata.namespace ?? ''}` };
    const decode = (k: string): string | undefined => (secret.data?.[k] === undefined ? undefined : Buffer.from(secret.data[k], 'base64').toString('utf8'));
    const username = decode(ref.usernameKey);
    const password = decode(ref.passwordKey);
    if (username === undefined || password === undefined) {
      return { ok: false, reason: 'SecretKeyMissing', message: `Secret ${ref.name} lacks key ${username === undefined ? ref.usernameKey : ref.passwordKey}` };
    }
    // The sidecar sees the two keys mounted as files `username` and `password`.
    return { ok: true, username, password, generation: credentialsGeneration({ username, password }) };
  }

  /**
   * Where and as whom the login check of `connection` goes, and a fingerprint
   * of all of it, or which Secret is missing.
   */
  private target(connection: DatabaseConnection, credentials: CredentialsLookup, server: string): { ok: true; target: DiscoveryTarget; fingerprint: string } | { ok: false; reason: VerificationFailure; message: string } {
    if (!credentials.ok) return { ok: false, reason: credentials.reason, message: credentials.message };
    const tunnelSpec = connection.spec.sshTunnel;
    let tunnel: DiscoveryTarget['tunnel'];
    if (tunnelSpec) {
      const keySecret = this.deps.caches.secrets.get(connection.metadata.namespace, tunnelSpec.privateKeySecretRef.name);
      const keyData = keySecret?.data?.[tunnelSpec.privateKeySecretRef.key];
      if (keyData === undefined) {
        return { ok: false, reason: 'SshKeySecretMissing', message: `Secret ${tunnelSpec.privateKeySecretRef.name} with key ${tunnelSpec.privateKeySecretRef.key} not found` };
      }
      tunnel = { host: tunnelSpec.host, port: tunnelSpec.port, user: tunnelSpec.user, hostKey: tunnelSpec.hostKey, privateKey: Buffer.from(keyData, 'base64').toString('utf8') };
    }
    const caRef = connection.spec.database.caSecretRef;
    let caPem: string | undefined;
    if (caRef) {
      const caData = this.deps.caches.secrets.get(connection.metadata.namespace, caRef.name)?.data?.[caRef.key];
      if (caData === undefined) return { ok: false, reason: 'CaSecretMissing', message: `Secret ${caRef.name} with key ${caRef.key} not found` };
      caPem = Buffer.from(caData, 'base64').toString('utf8');
    }
    const db = connection.spec.database;
    const target: DiscoveryTarget = { serverKey: server, host: db.host, port: db.port, dbname: db.dbname, sslMode: db.sslMode, channelBinding: db.channelBinding ?? 'prefer', username: credentials.username, password: credentials.password, ...(tunnel ? { tunnel } : {}), ...(caPem ? { caPem } : {}) };
    const fingerprint = createHash('sha256').update(JSON.stringify([credentials.generation, db.host, db.port, db.dbname, db.sslMode, db.channelBinding ?? 'prefer', tunnelSpec ?? null, tunnel?.privateKey ?? null, caPem ?? null])).digest('hex');
    return { ok: true, target, fingerprint };
  }

  /** Checks every connection's login (concurrently) and derives each one's limit before sharing. */
  private async resolve(connections: readonly DatabaseConnection[], server: string): Promise<{ resolved: Map<string, Resolved>; serverValue: number | undefined; watchWith: { fingerprint: string; target: DiscoveryTarget } | undefined }> {
    const checked = await Promise.all(connections.map(async (connection) => {
      const credentials = this.credentials(connection);
      const target = this.target(connection, credentials, server);
      if (!target.ok) return { connection, credentials, verification: { state: 'failed', reason: target.reason, message: target.message } as Verification, settings: undefined };
      const result = await this.verifier.check(key(connection), target.fingerprint, target.target);
      return { connection, credentials, verification: result.verification, settings: result.settings, watch: result.verification.state === 'ok' ? target : undefined };
    }));
    // One login per server can watch it, with the credentials of the first connection whose check succeeded.
    const watchWith = checked.find((c) => c.watch !== undefined)?.watch;
    // The server's own answer, from whichever connection could log in.
    const settings = checked.find((c) => c.settings)?.settings;
    const serverValue = settings ? autoMaxConnections(settings) : undefined;
    const resolved = new Map<string, Resolved>();
    for (const { connection, credentials, verification, settings: login } of checked) {
      const max = connection.spec.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
      const previous = connection.status?.limit?.discovered;
      const failure = verification.state === 'failed' ? verification : undefined;
      const failureDegraded: ConditionUpdate | undefined = failure ? { type: 'Degraded', status: 'True', reason: failure.reason, message: failure.message } : undefined;
      let value: number | undefined;
      let degraded = failureDegraded;
      if (typeof max === 'number') value = serverValue === undefined ? max : Math.min(max, serverValue);
      else if (serverValue !== undefined) value = serverValue;
      else {
        value = previous;
        const why = failure?.message ?? 'no DatabaseConnection on this server could log in';
        degraded = { type: 'Degraded', status: 'True', reason: 'LimitDiscoveryFailed', message: `SHOW max_connections failed: ${why}${previous === undefined ? '' : `; using the last known ${previous}`}` };
      }
      let mismatch = limitMismatchCondition(max, settings && serverValue !== undefined ? { maxConnections: settings.maxConnections, superuserReserved: settings.superuserReservedConnections, reserved: settings.reservedConnections, available: serverValue } : undefined);
      // This login's own CONNECTION LIMIT (role or database) binds below the server's: the planner
      // keeps every connection of that role (or database) on the server within it, together.
      const cap = login ? loginConnectionCap(login) : undefined;
      if (cap && value !== undefined && cap.limit < value) {
        mismatch = loginCapCondition(cap, credentials.ok ? credentials.username : '', connection.spec.database.dbname, value);
      }
      this.warnIfHoldShort(connection, login, credentials.ok ? credentials.username : '', credentials.ok ? [credentials.password] : []);
      const address = `${connection.spec.database.host}:${connection.spec.database.port}`;
      const base = { credentials, verification, degraded, mismatch, secrets: credentials.ok ? [credentials.password] : [], ...(login ? { loginCaps: loginConnectionCaps(login), pooler: poolerCondition(login.pooler, address) } : {}) };
      if (value === undefined) {
        resolved.set(key(connection), base);
        continue;
      }
      const limit = resolveLimit(value, connection.spec.reserve ?? DEFAULT_RESERVE);
      resolved.set(key(connection), { ...base, discovered: limit.discovered, reserve: limit.reserve, effective: limit.effective });
    }
    this.verifier.retain(new Set(this.deps.caches.connections.list().map(key)));
    return { resolved, serverValue, watchWith };
  }

  /**
   * A Warning Event, once per finding, when PostgreSQL would keep a lost
   * pod's connections longer than the connection's departureHoldSeconds (the
   * login's keepalives, as the controller's own session of that role sees
   * them). Through a bastion PostgreSQL's peer is the bastion: not judged.
   */
  private warnIfHoldShort(connection: DatabaseConnection, login: ServerSettings | undefined, role: string, secrets: readonly string[]): void {
    if (!login || connection.spec.sshTunnel) return;
    const hold = connection.spec.departureHoldSeconds ?? DEFAULT_DEPARTURE_HOLD_SECONDS;
    const found = departureHoldAdvice(login.keepalives, hold, role || 'app');
    const advice = found === undefined ? undefined : redactSecrets(found, secrets);
    const k = key(connection);
    if (advice === undefined) {
      this.holdWarnings.delete(k);
      return;
    }
    if (this.holdWarnings.get(k) === advice) return;
    this.holdWarnings.set(k, advice);
    void this.deps.events.record(connection, 'Warning', 'DepartureHoldShort', advice);
  }

  /** Reconciles the server `server` (a serverKey). */
  async reconcile(server: string): Promise<ProcessResult> {
    const started = process.hrtime.bigint();
    let result = 'ok';
    try {
      return await this.reconcileServer(server);
    } catch (err) {
      result = 'error';
      this.deps.metrics.reconcileErrors.inc({ reason: err instanceof Error ? err.name : 'unknown' });
      // Expected in a race: replan from the cache once it has caught up, without the error backoff.
      if (err instanceof GrantConflictError) {
        this.deps.logger.debug({ server, error: err.message }, 'grant write conflict');
        return { requeueAfterMs: 200 };
      }
      if (err instanceof NotLeaderError) return;
      throw err;
    } finally {
      this.deps.metrics.reconcileDuration.observe({ result }, Number(process.hrtime.bigint() - started) / 1e9);
    }
  }

  private async reconcileServer(server: string): Promise<ProcessResult> {
    const { caches, logger } = this.deps;
    this.awaiting.delete(server);
    // Which connections are on this server depends on what their hosts resolve to now.
    await this.refreshDirectory();
    const connections = caches.connections.list().filter((c) => this.directory.keyOf(c) === server && !c.metadata.deletionTimestamp);
    const ownerName = this.directory.ownerOf(server);
    const owner = ownerName === undefined ? undefined : caches.servers.get(undefined, ownerName);
    if (connections.length === 0) {
      this.watch.drop(server);
      this.deps.metrics.serverLimit.remove({ server });
      this.deps.metrics.serverAllocated.remove({ server });
      this.unsettledSince.delete(server);
      if (owner) await this.writeServerStatus(owner, { limit: undefined, allocated: 0, connections: 0, namespaces: [], overcommitted: false });
      return;
    }
    const { resolved, serverValue, watchWith } = await this.resolve(connections, server);
    // The server's limit: its DatabaseServer's, else the first DatabaseConnection's (docs/tenancy.md).
    let ownedLimit: { discovered: number; reserve: number; effective: number } | undefined;
    let limit: number | undefined;
    /** The reserve of that limit. */
    let reserve: number | undefined;
    const missingServer = ownerName === undefined ? connections.find((c) => c.spec.serverRef)?.spec.serverRef?.name : undefined;
    if (owner) {
      const decision = decideOwnedLimit({
        server: ownerName ?? '', maxConnections: owner.spec.maxConnections, reserve: owner.spec.reserve, serverValue,
        previousDiscovered: owner.status?.limit?.discovered,
        connections: connections.map((c) => ({ id: key(c), namespace: c.metadata.namespace ?? '', ref: c.spec.serverRef?.name })),
        mismatched: this.directory.mismatchedConnections,
      });
      for (const c of connections) {
        const r = resolved.get(key(c));
        if (!r) continue;
        const conflict = decision.conditions.get(key(c));
        if (conflict) r.conflict = conflict;
        const refused = decision.refused.get(key(c));
        if (refused) r.refused = refused;
      }
      ownedLimit = decision.limit;
      limit = ownedLimit?.effective;
      reserve = ownedLimit?.reserve;
    } else if (missingServer !== undefined) {
      // A serverRef to nothing: its pods draw nothing until the DatabaseServer exists.
      for (const c of connections) {
        const r = resolved.get(key(c));
        if (r) r.refused = { type: 'Ready', status: 'False', reason: 'ServerNotFound', message: `DatabaseServer ${missingServer} (spec.serverRef) does not exist: this connection's pods get no connections until it does` };
      }
      limit = 0;
    } else {
      const decision = decideServerLimit(connections.map((c) => {
        const r = resolved.get(key(c));
        const created = c.metadata.creationTimestamp ? new Date(c.metadata.creationTimestamp).toISOString() : '';
        return { id: key(c), created, effective: r?.effective, discovered: r?.discovered, reserve: r?.reserve };
      }));
      for (const [id, condition] of decision.conditions) {
        const r = resolved.get(id);
        if (r) r.conflict = condition;
      }
      limit = decision.limit;
      reserve = decision.owner === undefined ? undefined : resolved.get(decision.owner)?.reserve;
    }
    // The login that watches the server takes a slot of the reserve: none is held without one.
    if (watchWith && limit !== undefined && (reserve ?? 0) >= 1) this.watch.ensure(server, watchWith.fingerprint, watchWith.target);
    else this.watch.drop(server);
    if (limit === undefined) {
      // Without any limit, granting anything could exceed the server: hold everything as it is.
      const failures = await this.eachStatus(connections, (connection) => this.writeStatus(connection, undefined, undefined, resolved.get(key(connection))));
      if (owner) await this.writeServerStatus(owner, { limit: undefined, allocated: 0, connections: connections.length, namespaces: [], overcommitted: false });
      if (failures.length > 0) throw new StatusWriteError(failures);
      return { requeueAfterMs: 10_000 };
    }
    const planStarted = performance.now();
    const connectionKeys = new Set(connections.map(key));
    const pods = caches.pods.list().filter((p) => {
      const k = podConnectionKey(p);
      return k !== undefined && connectionKeys.has(k);
    });
    const cached = caches.members.list().filter((m) => connectionKeys.has(`${m.metadata.namespace ?? ''}/${m.spec.connection}`));
    this.pruneWritten(cached);
    const tableByKey = new Map(this.tables.tablesInForce(connections).map((t) => [`${t.namespace}/${t.connection}`, t.table]));
    const members = await this.freshDepartures(this.withGoneMembers(cached, pods, connections, tableByKey), pods, tableByKey);
    const livePodUids = new Set(pods.filter((p) => !p.metadata?.deletionTimestamp && p.status?.phase !== 'Succeeded' && p.status?.phase !== 'Failed').map((p) => p.metadata?.uid ?? ''));
    this.tables.retain(new Set(pods.map((p) => p.metadata?.uid ?? '')));
    const beforeSwitch = performance.now();
    await this.tables.switchMembers(members, livePodUids);
    const leftTables = await this.tables.leaveTables(members, livePodUids);
    const afterSwitch = performance.now();
    const ledger = this.deps.acknowledgements?.ledger;
    const caps = (c: DatabaseConnection): ConnectionCap[] => {
      const r = resolved.get(key(c));
      if (!r?.loginCaps || !r.credentials.ok) return [];
      return connectionCaps(r.loginCaps, { role: r.credentials.username, database: c.spec.database.dbname }, owner ? owner.spec.reserve : (c.spec.reserve ?? DEFAULT_RESERVE));
    };
    const input = buildBudgetInput({ limit, connections, pods, members, workloads: this.workloads(), written: this.written, tables: this.tables.tablesInForce(connections), tableGenerationFloors: this.tables.generationFloors(connections), tablesEnabled: this.tables.enabled, tableFrom: (m) => this.tables.tableFrom(m), caps, now: this.now().getTime(), drainedPodUids: this.drainedGone, drainedPodNames: this.drainedGoneNames, ...(ledger ? { channel: (uid: string) => ledger.get(uid) } : {}) });
    const tenancy = owner ? this.planOwned(owner, input, connections, resolved) : undefined;
    const plan = tenancy?.plan ?? planBudgets(missingServer === undefined ? input : withdrawPods(input, () => true));
    // The CPU of reading and planning, not the switch's writes.
    this.planMs.set(server, beforeSwitch - planStarted + performance.now() - afterSwitch);

    this.reportDepartures(plan.tables, input, connections);
    // One write per connection carries every switched pod's grant, shrinks and grows alike.
    await this.tables.writeTables(plan.tables, connections, this.pacing(pods));
    await this.applyGrants(plan, connections, members, resolved);
    await this.deleteOrphans(plan, members);
    // What the controller waits for now: the last of these answers wakes the next pass (ReconcileSchedule).
    this.awaiting.set(server, new Set(plan.grants.filter((g) => g.waitingFor === 'acknowledgement').map((g) => g.podUid)));
    await this.sidecarAccess?.ensure(pods);
    const missingSidecar = await this.repairMissingSidecars(pods);
    const silent = this.unresponsiveSidecars(pods, members);
    const names = (list: string[]): string => `${list.slice(0, 5).join(', ')}${list.length > 5 ? ', ...' : ''}`;
    const advice = plan.oversubscription && plan.oversubscription.cap === undefined && !tenancy ? oversubscriptionAdvice(plan.limit, this.demands(plan, connections)) : '';
    const failures = await this.eachStatus(connections, async (connection) => {
      const r = resolved.get(key(connection));
      const namespace = connection.metadata.namespace ?? '';
      // Under a DatabaseServer each namespace is planned within its share: its own plan says what its pods get.
      const statusPlan = tenancy?.byNamespace.get(namespace) ?? plan;
      const statusAdvice = tenancy && statusPlan.oversubscription && statusPlan.oversubscription.cap === undefined ? `${oversubscriptionAdvice(statusPlan.limit, this.demands(statusPlan, connections.filter((c) => c.metadata.namespace === namespace)))} ${tenancy.shareAdvice.get(namespace) ?? ''}`.trim() : advice;
      const missing = missingSidecar.filter((p) => podConnectionKey(p) === key(connection)).map((p) => p.metadata?.name ?? '');
      const unresponsive = silent.filter((m) => m.spec.connection === connection.metadata.name && m.metadata.namespace === connection.metadata.namespace).map((m) => m.metadata.name ?? '');
      this.deps.metrics.unresponsiveSidecars.set({ namespace: connection.metadata.namespace ?? '', connection: connection.metadata.name ?? '' }, unresponsive.length);
      const reachability = this.sidecarReachability(connection, members, livePodUids, silent);
      const degraded = r?.degraded
        ?? sidecarReachabilityCondition(reachability)
        ?? (missing.length > 0 ? {
          type: 'Degraded', status: 'True' as const, reason: 'SidecarMissing',
          message: `${missing.length} pod(s) opted in but run without the sidecar (the webhook was unavailable when they were created): ${names(missing)}`,
        } : undefined)
        ?? (unresponsive.length > 0 ? {
          type: 'Degraded', status: 'True' as const, reason: 'SidecarUnresponsive',
          message: `${unresponsive.length} sidecar(s) stopped reporting; their reservations stay counted until they answer or their pods go: ${names(unresponsive)}`,
        } : undefined);
      const leaving = leftTables.filter((m) => m.spec.connection === connection.metadata.name && m.metadata.namespace === namespace);
      if (leaving.length > 0) {
        const versions = [...new Set(leaving.map((m) => m.status?.sidecarVersion ?? 'unknown'))].join(', ');
        void this.deps.events.record(connection, 'Warning', 'SidecarReadsNoTable', `${leaving.length} sidecar(s) do not read the grant table (sidecar version ${versions}: an earlier image, or a ServiceAccount that may not get, list and watch poolgrants); their grants are written to their PoolMembers instead: ${names(leaving.map((m) => m.metadata.name ?? ''))}`);
      }
      const statusLimit = ownedLimit ? { ...ownedLimit, shared: connections.length } : r && r.discovered !== undefined ? { discovered: r.discovered, reserve: r.reserve ?? 0, effective: limit, shared: connections.length } : undefined;
      await this.writeStatus(connection, statusPlan, statusLimit, r, degraded, pods, statusAdvice, reachability);
    });
    if (owner && tenancy) await this.writeServerStatus(owner, { limit: ownedLimit, allocated: plan.allocated, connections: connections.length, namespaces: tenancy.namespaces, overcommitted: tenancy.overcommitted });
    this.recordMetrics(server, plan, connections);
    if (failures.length > 0) throw new StatusWriteError(failures);
    // A departed pod stops counting at a time, not on an event: plan again then.
    const untilDeparture = plan.nextDepartureExpiry === undefined ? Infinity : Math.max(100, plan.nextDepartureExpiry - this.now().getTime() + 50);
    // A failed login check is tried again then (in the background: a changed answer wakes the server).
    const untilRecheck = [...resolved.values()].some((r) => r.verification.state === 'failed') ? this.verifier.retryFailedMs : Infinity;
    if (!plan.settled) return { requeueAfterMs: Math.min(this.deps.pendingRequeueMs ?? 2_000, untilDeparture, untilRecheck) };
    logger.debug({ server, limit, allocated: plan.allocated }, 'server settled');
    // A sidecar going silent produces no event: look again within the heartbeat timeout.
    return { requeueAfterMs: Math.min(this.deps.resyncMs ?? 60_000, this.heartbeatTimeoutMs(), untilDeparture, untilRecheck) };
  }

  /**
   * Plans a server a DatabaseServer owns: each namespace within its share
   * (src/core/tenancy/allocation.ts). Pods of connections that may not draw
   * (namespace not allowed, address not of the server) give everything back.
   */
  private planOwned(owner: DatabaseServer, input: BudgetInput, connections: readonly DatabaseConnection[], resolved: Map<string, Resolved>): {
    plan: BudgetPlan; byNamespace: Map<string, BudgetPlan>; overcommitted: boolean; shareAdvice: Map<string, string>;
    namespaces: Array<{ namespace: string; share: number; allocated: number; pods: number; allocation: string }>;
  } {
    const ownerName = owner.metadata.name ?? '';
    const rules = new Map<string, NamespaceRule>();
    for (const c of connections) {
      const ns = c.metadata.namespace ?? '';
      if (!rules.has(ns)) rules.set(ns, ruleFor(ns, this.deps.caches.namespaces.get(undefined, ns)?.metadata?.labels ?? {}, owner.spec.allocations ?? [], owner.spec.defaultAllocation));
      const rule = rules.get(ns);
      const r = resolved.get(key(c));
      if (rule && !rule.allowed && r && !r.refused) {
        r.refused = { type: 'Ready', status: 'False', reason: 'NotAllowed', message: `namespace ${ns} may not draw on DatabaseServer ${ownerName}: no allocation selects it and its defaultAllocation is None; its pods get no connections. Ask the DatabaseServer's owner for an allocation` };
      }
    }
    const refused = new Set(connections.filter((c) => resolved.get(key(c))?.refused).map(key));
    const effective = refused.size === 0 ? input : withdrawPods(input, (pod) => refused.has(`${pod.namespace}/${pod.connection}`));
    const { shares, overcommitted } = namespaceShares(input.limit, namespaceDemands(effective, rules));
    const planned = planWithShares(effective, shares);
    const shareAdvice = new Map<string, string>();
    const namespaces = [...rules.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([namespace, rule]) => {
      const nsPlan = planned.byNamespace.get(namespace);
      const share = shares.get(namespace) ?? 0;
      const cap = rule.allowed && rule.max !== undefined ? `, max ${rule.max}` : '';
      shareAdvice.set(namespace, `Namespace ${namespace} draws at most ${share} of DatabaseServer ${ownerName}'s limit ${input.limit} (${rule.source}${cap}): ask its owner to raise the allocation, or lower minPerPod or the replicas.`);
      return {
        namespace, share,
        allocated: nsPlan?.allocated ?? 0,
        pods: nsPlan?.connections.reduce((a, c) => a + c.pods, 0) ?? 0,
        allocation: rule.source,
      };
    });
    return { plan: planned.plan, byNamespace: planned.byNamespace, overcommitted, shareAdvice, namespaces };
  }

  /** Writes a DatabaseServer's status (skipped when nothing changed). */
  private async writeServerStatus(server: DatabaseServer, facts: {
    limit: { discovered: number; reserve: number; effective: number } | undefined; allocated: number; connections: number; overcommitted: boolean;
    namespaces: Array<{ namespace: string; share: number; allocated: number; pods: number; allocation: string }>;
  }): Promise<void> {
    const name = server.metadata.name ?? '';
    const shadowedBy = this.directory.shadowedServers.get(name);
    const guaranteed = (server.spec.allocations ?? []).reduce((a, x) => a + (x.guaranteed ?? 0) * (x.namespaces?.length ?? 1), 0);
    const updates: ConditionUpdate[] = [
      shadowedBy !== undefined
        ? { type: 'Ready', status: 'False', reason: 'AddressConflict', message: `an address of this DatabaseServer is also an address of the older DatabaseServer ${shadowedBy}, which owns the server; give each server its own addresses` }
        : facts.limit
          ? { type: 'Ready', status: 'True', reason: 'LimitKnown', message: `limit ${facts.limit.effective} (maxConnections ${facts.limit.discovered} - reserve ${facts.limit.reserve}); ${facts.allocated} allocated to ${facts.connections} DatabaseConnection(s)` }
          : { type: 'Ready', status: 'False', reason: 'LimitUnknown', message: facts.connections === 0 ? 'no DatabaseConnection refers to this server yet; "auto" is read through their logins' : 'no DatabaseConnection on this server could log in to read max_connections' },
      facts.overcommitted && facts.limit
        ? { type: 'Overcommitted', status: 'True', reason: 'GuaranteesExceedLimit', message: `the allocations guarantee ${guaranteed} connections but the limit is ${facts.limit.effective}: guarantees are scaled down in proportion` }
        : { type: 'Overcommitted', status: 'False', reason: 'WithinLimit', message: 'the guarantees fit within the limit' },
    ];
    const generation = server.metadata.generation ?? 0;
    const previous = server.status;
    const conditions = setConditions(previous?.conditions, updates, generation, this.now());
    const status: NonNullable<DatabaseServer['status']> = {
      observedGeneration: generation,
      conditions,
      ...(facts.limit ? { limit: facts.limit } : previous?.limit ? { limit: previous.limit } : {}),
      allocated: facts.allocated,
      connections: facts.connections,
      namespaces: facts.namespaces,
    };
    if (canonicalJson(status) === canonicalJson(previous) && conditionsEqual(previous?.conditions, conditions)) return;
    if (findCondition(conditions, 'Overcommitted')?.status === 'True' && findCondition(previous?.conditions, 'Overcommitted')?.status !== 'True') {
      void this.deps.events.record(server, 'Warning', 'Overcommitted', findCondition(conditions, 'Overcommitted')?.message ?? '');
    }
    try {
      await this.deps.http.patch(`${MEMBERS}/databaseservers/${name}/status`, { status });
    } catch (err) {
      if (!isStatus(err, 404)) throw err;
    }
  }

  private heartbeatTimeoutMs(): number {
    return this.deps.heartbeatTimeoutMs ?? DEFAULT_HEARTBEAT_TIMEOUT_MS;
  }

  /**
   * What the sidecars of `connection`'s live pods report about reaching its
   * database (their PoolMembers' DatabaseReachable condition); unresponsive
   * ones are left out, as what they last said may be old.
   */
  private sidecarReachability(connection: DatabaseConnection, members: readonly PoolMember[], livePodUids: ReadonlySet<string>, silent: readonly PoolMember[]): SidecarReachabilityFacts {
    const quiet = new Set(silent);
    let sidecars = 0;
    const unreachable: SidecarReachabilityFacts['unreachable'][number][] = [];
    for (const m of members) {
      if (m.spec.connection !== connection.metadata.name || m.metadata.namespace !== connection.metadata.namespace || quiet.has(m) || !livePodUids.has(memberPodUid(m))) continue;
      sidecars += 1;
      const c = findCondition(m.status?.conditions, DATABASE_REACHABLE);
      if (c?.status === 'False') unreachable.push({ pod: m.metadata.name ?? '', cause: c.message });
    }
    return { sidecars, unreachable };
  }

  /** PoolMembers of live pods whose sidecar has not written status within the heartbeat timeout. */
  private unresponsiveSidecars(pods: readonly (PodObject & KubeObject)[], members: readonly PoolMember[]): PoolMember[] {
    const now = this.now().getTime();
    const live = new Set(pods.filter((p) => !p.metadata?.deletionTimestamp && p.status?.phase !== 'Succeeded' && p.status?.phase !== 'Failed').map((p) => p.metadata?.uid));
    // The same for every PoolMember of a connection, on a table or not: by namespace, connection
    // and table, looked up with the PoolMember's own strings.
    const timeouts = new Map<string, Map<string, [number | undefined, number | undefined]>>();
    const timeoutOf = (m: PoolMember): number => {
      const namespace = m.metadata.namespace ?? '';
      let inNamespace = timeouts.get(namespace);
      if (!inNamespace) timeouts.set(namespace, (inNamespace = new Map<string, [number | undefined, number | undefined]>()));
      let pair = inNamespace.get(m.spec.connection);
      if (!pair) inNamespace.set(m.spec.connection, (pair = [undefined, undefined]));
      const slot = m.spec.tableFrom === undefined ? 0 : 1;
      return (pair[slot] ??= this.memberHeartbeatTimeoutMs(m));
    };
    return members.filter((m) => {
      if (!live.has(memberPodUid(m))) return false;
      const heard = this.deps.heardAt?.(m);
      if (heard !== undefined) return now - heard > timeoutOf(m);
      const last = m.status?.heartbeatTime ?? m.metadata.creationTimestamp;
      return last !== undefined && now - new Date(last).getTime() > timeoutOf(m);
    });
  }

  /** Per connection (`namespace/name`), the pacing its table tells the sidecars: slower for more pods. */
  private pacing(pods: readonly (PodObject & KubeObject)[]): Map<string, SidecarPacing> {
    const counts = new Map<string, number>();
    for (const p of pods) {
      const k = podConnectionKey(p);
      if (k !== undefined) counts.set(k, (counts.get(k) ?? 0) + 1);
    }
    return new Map([...counts].map(([k, n]) => [k, sidecarPacingFor(n)]));
  }

  /**
   * How long `member`'s sidecar may stay silent before it counts as
   * unresponsive: three of the heartbeats its table asks for, at least the
   * default timeout; a sidecar not on a table beats at the base interval.
   */
  memberHeartbeatTimeoutMs(member: PoolMember): number {
    // A timeout set explicitly (tests, a short-lived cluster) is taken as it is.
    if (this.deps.heartbeatTimeoutMs !== undefined) return this.deps.heartbeatTimeoutMs;
    const seconds = member.spec.tableFrom === undefined ? undefined : this.tables.heartbeatSeconds(member.metadata.namespace ?? '', member.spec.connection);
    return heartbeatTimeoutMs(seconds, this.heartbeatTimeoutMs());
  }

  /** Pods that opted in but lack the sidecar; the repairer evicts or reports them. */
  private async repairMissingSidecars(pods: readonly (PodObject & KubeObject)[]): Promise<Array<PodObject & KubeObject>> {
    const { repairer } = this.deps;
    if (!repairer) return [];
    const now = this.now();
    const options = { gracePeriodSeconds: this.deps.repairGraceSeconds ?? 60 };
    const missing = pods.filter((p) => podNeedsRepair(p as PodLike, now, options));
    if (missing.length > 0) await repairer.repairPods(missing as Parameters<MissingSidecarRepairer['repairPods']>[0], now);
    return missing;
  }

  private workloads(): WorkloadScale[] {
    const { deployments, statefulSets, hpas } = this.deps.caches;
    const hpaList = hpas.list();
    const scale = (kind: 'Deployment' | 'StatefulSet', w: WorkloadObject): WorkloadScale => {
      const hpa = hpaList.find((h) => h.metadata?.namespace === w.metadata?.namespace && h.spec?.scaleTargetRef?.kind === kind && h.spec.scaleTargetRef.name === w.metadata?.name);
      return { namespace: w.metadata?.namespace ?? '', kind, name: w.metadata?.name ?? '', replicas: w.spec?.replicas ?? 1, hpaMaxReplicas: hpa?.spec?.maxReplicas };
    };
    return [...deployments.list().map((d) => scale('Deployment', d)), ...statefulSets.list().map((s) => scale('StatefulSet', s))];
  }

  /**
   * Reports each new departure record, since the share it holds is otherwise
   * unexplained until the hold ends: a pod that left without a drain its
   * controller saw is logged (and so is the end of a record once the drain
   * is seen after all); pods gone from a table's default unseen (a pod
   * force-deleted with its PoolMember while no controller ran) get a warning
   * log and a Warning Event on their DatabaseConnection.
   */
  private reportDepartures(planned: readonly PlannedTable[], input: BudgetInput, connections: readonly DatabaseConnection[]): void {
    for (const t of planned) {
      if (!t.changed) continue;
      const previous = input.tables?.find((c) => c.namespace === t.namespace && c.connection === t.connection)?.table.departed ?? [];
      const before = new Set(previous.map((x) => x.pod));
      const after = new Set((t.table.departed ?? []).map((x) => x.pod));
      // A record made from a view that missed the drain ends once the drain is seen (often within the second, on a loaded API server).
      for (const d of previous) {
        if (!after.has(d.pod) && !isUnlistedRecord(d) && Date.parse(d.until) > (input.now ?? 0)) this.deps.logger.info({ connection: `${t.namespace}/${t.connection}`, pod: d.pod }, 'departure record ended before its hold: the pod\'s drain was seen');
      }
      for (const d of t.table.departed ?? []) {
        if (before.has(d.pod)) continue;
        if (!isUnlistedRecord(d)) {
          this.deps.logger.info({ connection: `${t.namespace}/${t.connection}`, pod: d.pod, uid: d.uid, connections: d.connections, until: d.until }, 'pod left without a drain this controller saw: its connections are held for the departure hold');
          continue;
        }
        const message = `${d.pod.slice(1, -1)} left without a PoolMember or a trace this controller saw (force-deleted while no controller ran?): their ${d.connections} connections are held until ${d.until}`;
        this.deps.logger.warn({ connection: `${t.namespace}/${t.connection}`, record: d.pod, connections: d.connections, until: d.until }, 'pods left the grant table\'s default unseen: their share is held for the departure hold');
        const connection = connections.find((c) => c.metadata.namespace === t.namespace && c.metadata.name === t.connection);
        if (connection) void this.deps.events.record(connection, 'Warning', 'PodsLeftUnseen', message);
      }
    }
  }

  /**
   * `members` plus the PoolMembers on tables this replica saw on an earlier
   * pass, their pod running, or saw deleted (memberDeleted: their last state),
   * whose pod is gone and whose PoolMember is gone too: the garbage collector takes a PoolMember with its pod (force-deleted
   * straight from running), possibly before any pass saw the pod go, and a
   * pod on its table's default grant is not listed by name.
   * Planned once more as orphans, they get their departure recorded
   * (docs/budget.md), or, drained, their name listed; forgotten once a table
   * records either, or after the hold.
   */
  private withGoneMembers(members: readonly PoolMember[], pods: readonly (PodObject & KubeObject)[], connections: readonly DatabaseConnection[], tables: ReadonlyMap<string, GrantTable>): PoolMember[] {
    const now = this.now().getTime();
    const present = new Set(members.map(memberPodUid));
    const podUids = new Set(pods.map((p) => p.metadata?.uid ?? ''));
    const byKey = new Map(connections.map((c) => [key(c), c]));
    // Only pods last seen running: a pod seen terminating or finished is listed by name in its table
    // (with what it may hold, or 0 once its drain was seen), and an older snapshot of its PoolMember
    // would miss the drain it reported since.
    const live = new Set(pods.filter((p) => !p.metadata?.deletionTimestamp && p.status?.phase !== 'Succeeded' && p.status?.phase !== 'Failed').map((p) => p.metadata?.uid ?? ''));
    for (const m of members) {
      const uid = memberPodUid(m);
      const seen = this.seenMembers.get(uid);
      if (uid === '' || seen?.final === true) continue;
      if (live.has(uid) && this.tables.tableFrom(m) !== undefined) {
        if (seen?.member !== m || seen.goneAt !== undefined) this.seenMembers.set(uid, { member: m });
      } else if (podUids.has(uid)) this.seenMembers.delete(uid);
    }
    const out = [...members];
    for (const [uid, entry] of this.seenMembers) {
      // Most of them, every pass: the pod or its PoolMember is still there.
      if (present.has(uid) || podUids.has(uid)) continue;
      const k = `${entry.member.metadata.namespace ?? ''}/${entry.member.spec.connection}`;
      if (!this.deps.caches.connections.get(entry.member.metadata.namespace ?? '', entry.member.spec.connection)) {
        this.seenMembers.delete(uid);
        continue;
      }
      const connection = byKey.get(k);
      if (!connection) continue;
      entry.goneAt ??= now;
      const hold = (connection.spec.departureHoldSeconds ?? DEFAULT_DEPARTURE_HOLD_SECONDS) * 1000;
      const table = tables.get(k);
      const recorded = table?.departed?.some((d) => d.uid === uid) === true;
      // A drained pod's PoolMember is listed by name while it is planned (so that it is never taken for a pod
      // on the default): once its table lists it, planning it again would only keep the name listed.
      const name = entry.member.metadata.name ?? '';
      const listed = entry.member.status?.drained === true && table !== undefined && table.exceptions.some((e) => e.pods.includes(name));
      if (recorded || listed || hold === 0 || now - entry.goneAt > hold + 60_000) {
        this.seenMembers.delete(uid);
        continue;
      }
      out.push(entry.member);
    }
    return out;
  }

  /**
   * A pod was deleted (the API server removed the object; its last state has
   * a deletionTimestamp): the garbage collector takes its PoolMember, which
   * deleteOrphans then leaves alone. Remembered for DELETED_POD_MEMORY_MS.
   */
  podDeleted(pod: PodObject & KubeObject): void {
    const uid = pod.metadata?.uid;
    if (!uid || !pod.metadata?.deletionTimestamp) return;
    const member = this.deps.caches.members.get(pod.metadata.namespace, pod.metadata.name ?? '');
    if (member && memberPodUid(member) === uid) this.deletedPods.set(uid, this.now().getTime());
    // The collector has long taken those seen before (it deletes at least 20 a second).
    for (const [seen, at] of this.deletedPods) {
      if (this.now().getTime() - at < DELETED_POD_MEMORY_MS) break;
      this.deletedPods.delete(seen);
    }
  }

  /**
   * A PoolMember was deleted (with its pod, by the garbage collector): its
   * last state, drained or not, is what a departure of its pod is judged by
   * (withGoneMembers), fresher than any pass's snapshot. Returns whether
   * the server needs a reconcile: not for the garbage collector following a
   * pod seen deleted (podDeleted), unless its table records the pod's
   * departure, which may go with the PoolMember.
   */
  memberDeleted(member: PoolMember): boolean {
    const uid = memberPodUid(member);
    const collected = this.deletedPods.has(uid);
    if (uid !== '' && member.status?.drained === true) {
      const now = this.now().getTime();
      this.drainedGone.set(uid, now);
      this.drainedGoneNames.set(`${member.metadata.namespace ?? ''}/${member.metadata.name ?? ''}`, now);
      for (const memory of [this.drainedGone, this.drainedGoneNames]) {
        for (const [seen, at] of memory) {
          if (now - at < DELETED_POD_MEMORY_MS) break;
          memory.delete(seen);
        }
      }
    }
    this.created.delete(key(member));
    if (uid !== '' && this.tables.tableFrom(member) !== undefined) this.seenMembers.set(uid, { member, final: true });
    // A departure its table records is kept while the PoolMember exists: now it may go, or (drained after all)
    // end. The table as this replica last wrote it: the record may not be in the cache yet, and without this
    // pass nothing else may come to replan the server before the hold runs out.
    const recorded = this.tables.tableInForce(member.metadata.namespace ?? '', member.spec.connection)?.departed?.some((d) => d.uid === uid) === true;
    return !collected || recorded;
  }

  /**
   * `members` with the PoolMembers of pods that left (gone or finished)
   * without a drain in the cache read again from the API server: a sidecar
   * writes its drained status and waits for it before it exits, but this
   * replica's PoolMember cache may show the pod gone before that status, and
   * a departure recorded from the older one would hold a drained pod's
   * connections for the whole hold.
   */
  private async freshDepartures(members: PoolMember[], pods: readonly (PodObject & KubeObject)[], tables: ReadonlyMap<string, GrantTable>): Promise<PoolMember[]> {
    const present = new Map(pods.map((p) => [p.metadata?.uid ?? '', p]));
    const leftHolding = (m: PoolMember): boolean => {
      const pod = present.get(memberPodUid(m));
      if (pod !== undefined && pod.status?.phase !== 'Succeeded' && pod.status?.phase !== 'Failed') return false;
      // Until its departure is recorded (a gone pod's PoolMember may stay until the garbage
      // collector takes it), or a finished pod's table entry is down to 0.
      const table = tables.get(`${m.metadata.namespace ?? ''}/${m.spec.connection}`);
      if (table !== undefined && (table.departed ?? []).some((d) => d.uid === memberPodUid(m))) return false;
      if (pod === undefined) return true;
      if (table === undefined) return false;
      const entry = deriveEntry(table, m.metadata.name ?? '');
      return Math.max(entry.connections, entry.releasing ?? 0) > 0;
    };
    // Only where a departure would be held: with departureHoldSeconds 0 it is released at once anyway.
    const holds = (m: PoolMember): boolean => (this.deps.caches.connections.get(m.metadata.namespace ?? '', m.spec.connection)?.spec.departureHoldSeconds ?? DEFAULT_DEPARTURE_HOLD_SECONDS) > 0;
    const stale: Array<{ m: PoolMember; i: number }> = [];
    members.forEach((m, i) => {
      if (this.tables.tableFrom(m) !== undefined && m.status?.drained !== true && holds(m) && leftHolding(m)) stale.push({ m, i });
    });
    if (stale.length === 0) return members;
    const out = [...members];
    await forEachBounded(stale, GRANT_WRITE_CONCURRENCY, async ({ m, i }) => {
      try {
        const fresh = await this.deps.http.get<PoolMember>(`${MEMBERS}/namespaces/${m.metadata.namespace ?? ''}/poolmembers/${m.metadata.name ?? ''}`);
        if (memberPodUid(fresh) === memberPodUid(m)) out[i] = fresh;
      } catch (err) {
        // Gone (collected with its pod): what the cache last showed is all there is.
        if (!isStatus(err, 404)) throw err;
      }
    });
    return out;
  }

  /** A PoolMember this replica created that its cache has yet to show, if any. */
  createdMember(namespace: string, name: string): PoolMember | undefined {
    return this.created.get(`${namespace}/${name}`);
  }

  private pruneWritten(members: readonly PoolMember[]): void {
    for (const member of members) {
      const uid = memberPodUid(member);
      if (this.created.size > 0) this.created.delete(key(member));
      const written = uid ? this.written.get(uid) : undefined;
      if (uid && written && member.spec.grant.generation >= written.generation) this.written.delete(uid);
      const version = uid ? this.writtenVersions.get(uid) : undefined;
      if (uid && version && member.spec.grant.generation >= version.generation) this.writtenVersions.delete(uid);
    }
  }

  private memberSpec(connection: DatabaseConnection, grant: PodGrant, credentials: CredentialsLookup | undefined): PoolMemberSpecInput {
    const db = connection.spec.database;
    const consumer = connection.spec.consumers.find((c) => c.name === grant.consumer);
    const spec: PoolMemberSpecInput = {
      connection: connection.metadata.name ?? '',
      grant: grant.grant,
      processesPerPod: consumer?.processesPerPod ?? 1,
      database: { host: db.host, port: db.port, dbname: db.dbname, sslMode: db.sslMode, ...(db.channelBinding !== undefined && db.channelBinding !== 'prefer' ? { channelBinding: db.channelBinding } : {}) },
      pool: { ...connection.spec.pool },
      drain: grant.drain,
    };
    if (credentials?.ok) spec.credentialsGeneration = credentials.generation;
    const tunnel = connection.spec.sshTunnel;
    if (tunnel) spec.sshTunnel = { host: tunnel.host, port: tunnel.port, user: tunnel.user, hostKey: tunnel.hostKey };
    return spec;
  }

  private async applyGrants(plan: BudgetPlan, connections: readonly DatabaseConnection[], members: readonly PoolMember[], resolved: Map<string, { credentials: CredentialsLookup }>): Promise<void> {
    // Per connection (namespace, then name): the connection, its credentials, and the settings
    // fingerprint of each consumer's PoolMembers, worked out once per pass.
    type Target = { connection: DatabaseConnection; credentials: CredentialsLookup | undefined; settings: Map<string | undefined, string> };
    const byConnection = new Map<string, Map<string, Target>>();
    for (const c of connections) {
      const inNamespace = byConnection.get(c.metadata.namespace ?? '') ?? new Map<string, Target>();
      byConnection.set(c.metadata.namespace ?? '', inNamespace);
      inNamespace.set(c.metadata.name ?? '', { connection: c, credentials: resolved.get(key(c))?.credentials, settings: new Map() });
    }
    // By pod UID, and by name only for the rest (a PoolMember left by an earlier pod of the same name).
    const memberByUid = new Map(members.map((m) => [memberPodUid(m), m]));
    let memberByName: Map<string, PoolMember> | undefined;
    const memberOf = (g: PodGrant): PoolMember | undefined => memberByUid.get(g.podUid) ?? (memberByName ??= new Map(members.map((m) => [key(m), m]))).get(`${g.namespace}/${g.name}`);
    // Any subset of one plan's writes keeps the limit: a shrink frees nothing until it is
    // acknowledged (the planner counts max(granted, acknowledged, held)), and a grow takes
    // only capacity free against the reservations before this plan, in which every
    // shrinking pod still counts at its old grant. So the writes of a group may land in any
    // order. Shrinks still go out first, as a group, so that their acknowledgements (which
    // the next pass's grows wait for) start as early as possible and safety does not rest
    // on the planner alone; the cost is one round trip.
    const shrinks: GrantWrite[] = [];
    const grows: GrantWrite[] = [];
    for (const planned of plan.grants) {
      const target = byConnection.get(planned.namespace)?.get(planned.connection);
      if (!target) continue;
      const { connection, credentials } = target;
      const member = memberOf(planned);
      if (planned.table && !member && planned.tableFrom === undefined) continue;
      let settings = target.settings.get(planned.consumer);
      if (settings === undefined) {
        settings = settingsFingerprint(this.memberSpec(connection, planned, credentials));
        target.settings.set(planned.consumer, settings);
      }
      // A pod on a table keeps the grant its PoolMember had when it was switched (or created there): only the settings may still be written.
      const onTable = planned.table && member !== undefined;
      const due = this.grantWriteDue(planned.podUid, onTable ? member.spec.grant : planned.grant, onTable ? (member.spec.drain ?? false) : planned.drain, !onTable && planned.changed, member, settings);
      if (!due) continue;
      const grant = onTable ? { ...planned, grant: member.spec.grant, drain: member.spec.drain ?? false, changed: false } : planned;
      const write = { grant, connection, existing: member, credentials, ...due };
      (planned.grant.connections - (member?.spec.grant.connections ?? 0) > 0 ? grows : shrinks).push(write);
    }
    await forEachBounded(shrinks, GRANT_WRITE_CONCURRENCY, (w) => this.writeGrant(w));
    await forEachBounded(grows, GRANT_WRITE_CONCURRENCY, (w) => this.writeGrant(w));
  }

  /**
   * Whether a pod's PoolMember must be written: its spec (fingerprinted with
   * `settings`, the settingsFingerprint of what would be written) differs from
   * what the cache shows and from what this replica last wrote, or it belongs
   * to an earlier pod of the same name.
   */
  private grantWriteDue(podUid: string, grant: PodGrant['grant'], drain: boolean, changed: boolean, existing: PoolMember | undefined, settings: string): { fingerprint: string; ownerChanged: boolean } | undefined {
    const fingerprint = specFingerprint(grant, drain, settings);
    // Kept until the cache shows this generation: a reconcile from a cache that is behind
    // our own write would otherwise write the same spec again (or create it twice).
    if (this.writtenVersions.get(podUid)?.spec === fingerprint) return undefined;
    const ownerChanged = existing !== undefined && memberPodUid(existing) !== podUid;
    // The common case, every reconcile for every pod on a table: nothing to write.
    if (existing !== undefined && !ownerChanged && !changed && specFingerprint(existing.spec.grant, existing.spec.drain ?? false, settingsFingerprint(existing.spec)) === fingerprint) return undefined;
    return { fingerprint, ownerChanged };
  }

  /** Writes one pod's PoolMember (grantWriteDue said it must be). */
  private async writeGrant({ grant, connection, existing, credentials, fingerprint, ownerChanged }: GrantWrite): Promise<void> {
    const ours = this.writtenVersions.get(grant.podUid);
    const spec = this.memberSpec(connection, grant, credentials);
    const path = `${MEMBERS}/namespaces/${grant.namespace}/poolmembers`;
    const ownerReferences = [{ apiVersion: 'v1', kind: 'Pod', name: grant.name, uid: grant.podUid, controller: true, blockOwnerDeletion: false }];
    let written: PoolMember | undefined;
    if (!existing && !ours) {
      this.assertMayWrite();
      // Created on the table: the table written before this (same pass) lists the pod at 0 from tableFrom on.
      const onTable = grant.tableFrom === undefined ? {} : { tableFrom: grant.tableFrom, acknowledgementKey: this.tables.newAcknowledgementKey() };
      try {
        written = await this.deps.http.create<PoolMember>(path, { apiVersion: `${API_GROUP}/${API_VERSION}`, kind: 'PoolMember', metadata: { name: grant.name, namespace: grant.namespace, labels: { [CONNECTION_LABEL]: grant.connection }, ownerReferences }, spec: { ...spec, ...onTable } });
        // Its sidecar may answer over the channel before this replica's cache shows it.
        if (!this.deps.caches.members.get(grant.namespace, grant.name)) this.created.set(`${grant.namespace}/${grant.name}`, written);
      } catch (err) {
        // Someone else created it: the cache will show it, and the next reconcile plans with it.
        if (isStatus(err, 409)) throw new GrantConflictError(`${grant.namespace}/${grant.name}`);
        throw err;
      }
    } else {
      // Not in the cache yet but created by this replica: patch what it created.
      this.assertMayWrite();
      // The precondition: the PoolMember is still what this plan was computed from
      // (or what this replica last wrote), so a deposed leader's stale write fails.
      const resourceVersion = existing ? this.expectedVersion(existing) : ours?.resourceVersion;
      try {
        written = await this.deps.http.patch<PoolMember>(`${path}/${grant.name}`, { metadata: { resourceVersion, ownerReferences, labels: { [CONNECTION_LABEL]: grant.connection } }, spec: { ...spec, sshTunnel: spec.sshTunnel ?? null, credentialsGeneration: spec.credentialsGeneration ?? null, ...(ownerChanged ? { tableFrom: null } : {}) } });
        // A new pod under an old name: the old sidecar's acknowledgement is not this pod's.
        if (ownerChanged) written = await this.deps.http.patch<PoolMember>(`${path}/${grant.name}/status`, { metadata: { resourceVersion: written.metadata.resourceVersion }, status: null });
      } catch (err) {
        if (isStatus(err, 409)) throw new GrantConflictError(`${grant.namespace}/${grant.name}`);
        // Garbage-collected with its pod since the cache showed it: nothing left to grant,
        // and the other pods' writes of this pass still go out.
        if (isStatus(err, 404)) {
          // Whatever this replica wrote to it is gone too: a pod still there gets a new one.
          this.written.delete(grant.podUid);
          this.writtenVersions.delete(grant.podUid);
          this.deps.logger.debug({ member: `${grant.namespace}/${grant.name}` }, 'PoolMember gone before its grant was written');
          return;
        }
        throw err;
      }
      const before = existing?.spec.grant.connections ?? this.written.get(grant.podUid)?.connections ?? 0;
      if (grant.grant.connections !== before) this.deps.metrics.grantWrites.inc({ direction: grant.grant.connections < before ? 'shrink' : 'grow' });
    }
    const tableFrom = grant.tableFrom ?? this.written.get(grant.podUid)?.tableFrom;
    this.written.set(grant.podUid, { namespace: grant.namespace, name: grant.name, podUid: grant.podUid, connections: grant.grant.connections, generation: grant.grant.generation, ...(tableFrom === undefined ? {} : { tableFrom }) });
    if (written.metadata.resourceVersion) this.writtenVersions.set(grant.podUid, { generation: grant.grant.generation, resourceVersion: written.metadata.resourceVersion, spec: fingerprint });
  }

  private assertMayWrite(): void {
    if (this.deps.mayWrite && !this.deps.mayWrite()) throw new NotLeaderError();
  }

  /** The resourceVersion a grant write must find: the cache's, or ours if the cache has not caught up with our last write. */
  private expectedVersion(existing: PoolMember): string | undefined {
    const uid = memberPodUid(existing);
    const ours = uid ? this.writtenVersions.get(uid) : undefined;
    if (ours && ours.generation > existing.spec.grant.generation) return ours.resourceVersion;
    return existing.metadata.resourceVersion;
  }

  /**
   * Deletes the PoolMembers no pod of this server claims any more, except
   * those of pods seen deleted: their owner reference hands them to the
   * garbage collector, and deleting them here too would double the API
   * writes of a scale-down and hold up the reconcile while they land.
   */
  private async deleteOrphans(plan: BudgetPlan, members: readonly PoolMember[]): Promise<void> {
    if (plan.orphans.length === 0) return;
    const granted = new Set(plan.grants.map((g) => `${g.namespace}/${g.name}`));
    const memberByName = new Map(members.map((m) => [key(m), m]));
    const doomed: PoolMember[] = [];
    for (const orphan of plan.orphans) {
      const k = `${orphan.namespace}/${orphan.name}`;
      const member = memberByName.get(k);
      if (!granted.has(k) && member && !this.deletedPods.has(memberPodUid(member))) doomed.push(member);
    }
    await forEachBounded(doomed, GRANT_WRITE_CONCURRENCY, async (member) => {
      const k = key(member);
      // Gone from the cache since this pass read it (the collector got there first): nothing to delete.
      if (this.deps.caches.members.get(member.metadata.namespace, member.metadata.name ?? '') === undefined) return;
      this.assertMayWrite();
      try {
        await this.deps.http.delete(`${MEMBERS}/namespaces/${member.metadata.namespace ?? ''}/poolmembers/${member.metadata.name ?? ''}`, { apiVersion: 'v1', kind: 'DeleteOptions', preconditions: { resourceVersion: this.expectedVersion(member) } });
      } catch (err) {
        if (isStatus(err, 409)) throw new GrantConflictError(k);
        if (!isStatus(err, 404)) throw err;
      }
    });
  }

  /** Pods x minPerPod of every consumer on the server, for oversubscription advice. */
  private demands(plan: BudgetPlan, connections: readonly DatabaseConnection[]): ConsumerDemand[] {
    const out: ConsumerDemand[] = [];
    for (const connection of connections) {
      const summary = plan.connections.find((c) => c.namespace === connection.metadata.namespace && c.name === connection.metadata.name);
      for (const consumer of connection.spec.consumers) {
        out.push({ connection: key(connection), consumer: consumer.name, pods: summary?.consumers.find((c) => c.name === consumer.name)?.pods ?? 0, minPerPod: consumer.minPerPod });
      }
    }
    return out;
  }

  /** What the caches show of each consumer, and the opted-in pods no consumer selects. */
  private consumerFacts(connection: DatabaseConnection, plan: BudgetPlan | undefined, pods: readonly (PodObject & KubeObject)[]): { consumers: ConsumerFacts[]; podsWithoutConsumer: string[] } {
    const summary = plan?.connections.find((c) => c.namespace === connection.metadata.namespace && c.name === connection.metadata.name);
    const live = pods.filter((p) => podConnectionKey(p) === key(connection) && !p.metadata?.deletionTimestamp && p.status?.phase !== 'Succeeded' && p.status?.phase !== 'Failed');
    const counts = new Map<string, number>();
    const podsWithoutConsumer: string[] = [];
    for (const pod of live) {
      const consumer = resolveConsumer(connection, pod);
      if (consumer) counts.set(consumer.name, (counts.get(consumer.name) ?? 0) + 1);
      else podsWithoutConsumer.push(pod.metadata?.name ?? '');
    }
    const consumers = connection.spec.consumers.map((consumer): ConsumerFacts => {
      const ref = consumer.workloadRef;
      const cache = ref?.kind === 'StatefulSet' ? this.deps.caches.statefulSets : this.deps.caches.deployments;
      const workload = ref ? cache.get(connection.metadata.namespace, ref.name) : undefined;
      return {
        name: consumer.name,
        workloadRef: ref,
        workload: workload ? { replicas: workload.spec?.replicas ?? 1, templateConnection: workload.spec?.template?.metadata?.labels?.[CONNECTION_LABEL] } : undefined,
        pods: summary?.consumers.find((c) => c.name === consumer.name)?.pods ?? counts.get(consumer.name) ?? 0,
      };
    });
    return { consumers, podsWithoutConsumer };
  }

  /**
   * Runs `write` for every connection, each on its own: one whose status the API server
   * refuses must not keep the others on the same server from theirs. Returns the failures.
   */
  private async eachStatus(connections: readonly DatabaseConnection[], write: (connection: DatabaseConnection) => Promise<void>): Promise<Array<{ connection: string; error: string }>> {
    const failures: Array<{ connection: string; error: string }> = [];
    for (const connection of connections) {
      try {
        await write(connection);
      } catch (err) {
        if (err instanceof NotLeaderError) throw err;
        const name = key(connection);
        const error = describeApiError(err);
        this.statusWrittenAt.delete(name);
        this.deps.logger.warn({ connection: name, error }, 'could not write the status of a DatabaseConnection');
        failures.push({ connection: name, error });
      }
    }
    return failures;
  }

  private async writeStatus(connection: DatabaseConnection, plan: BudgetPlan | undefined, limit: { discovered: number; reserve: number; effective: number; shared: number } | undefined, resolved: Resolved | undefined, degraded?: ConditionUpdate, pods: readonly (PodObject & KubeObject)[] = [], advice = '', sidecars?: SidecarReachabilityFacts): Promise<void> {
    const summary = plan?.connections.find((c) => c.namespace === connection.metadata.namespace && c.name === connection.metadata.name);
    const budget: ConditionUpdate[] = plan && summary ? budgetConditions(plan, summary) : [{ type: 'Ready', status: 'False', reason: 'LimitUnknown', message: 'no connection limit known for this server yet' }];
    const budgetReady = budget.find((c) => c.type === 'Ready') as ConditionUpdate;
    const oversubscribed = budget.find((c) => c.type === 'Oversubscribed');
    const facts = this.consumerFacts(connection, plan, pods);
    const updates: ConditionUpdate[] = connectionConditions({
      name: connection.metadata.name ?? '',
      verification: resolved?.verification ?? { state: 'pending' },
      limitKnown: plan !== undefined,
      consumers: facts.consumers,
      podsWithoutConsumer: facts.podsWithoutConsumer,
      budgetReady,
      sidecars,
    });
    if (oversubscribed) updates.push(oversubscribed.status === 'True' && advice ? { ...oversubscribed, message: `${oversubscribed.message}. ${advice}` } : oversubscribed);
    // A connection that may not draw on its server is not Ready, whatever its budget says.
    if (resolved?.refused) {
      const at = updates.findIndex((u) => u.type === 'Ready');
      if (at >= 0) updates[at] = resolved.refused;
      else updates.push(resolved.refused);
    }
    const effectiveDegraded = degraded ?? resolved?.degraded;
    updates.push(effectiveDegraded ?? { type: 'Degraded', status: 'False', reason: 'Healthy', message: 'limit and credentials resolved' });
    if (resolved?.mismatch) updates.push(resolved.mismatch);
    if (resolved?.pooler) updates.push(resolved.pooler);
    if (resolved?.conflict) updates.push(resolved.conflict);
    // The one place status text is made: no secret value or URL password gets past it.
    const secrets = resolved?.secrets ?? [];
    const safe = updates.map((u) => ({ ...u, message: redactSecrets(u.message, secrets) }));
    const generation = connection.metadata.generation ?? 0;
    const previous = connection.status;
    const conditions = setConditions(previous?.conditions, safe, generation, this.now());
    const credentials = resolved?.credentials;
    const status: NonNullable<DatabaseConnection['status']> = {
      ...previous,
      observedGeneration: generation,
      conditions,
      ...(limit ? { limit } : {}),
      ...(summary ? { allocated: summary.allocated, pods: summary.pods, perPodBudget: summary.perPodBudget, consumers: summary.consumers } : {}),
      ...(credentials?.ok ? { credentialsGeneration: credentials.generation } : {}),
    };
    const was = (type: string): Condition | undefined => findCondition(previous?.conditions, type);
    const is = (type: string): Condition | undefined => findCondition(conditions, type);
    const event = (type: 'Normal' | 'Warning', reason: string, message: string): void => {
      void this.deps.events.record(connection, type, reason, redactSecrets(message, secrets));
    };
    const isOversubscribed = is('Oversubscribed');
    const wasOversubscribed = was('Oversubscribed');
    if (isOversubscribed?.status === 'True' && (wasOversubscribed?.status !== 'True' || wasOversubscribed.message !== isOversubscribed.message)) event('Warning', 'Oversubscribed', isOversubscribed.message);
    const isReady = is('Ready');
    const wasReady = was('Ready');
    if (isReady?.status === 'True' && wasReady?.status !== 'True' && summary) {
      event('Normal', 'Rebalanced', `per-pod budget ${summary.perPodBudget || '-'}; ${summary.allocated} of ${plan?.limit ?? 0} allocated across ${summary.pods} pods`);
    }
    // Why it cannot serve, once per reason (the Degraded Event below may say the same for Secrets).
    if (isReady?.status === 'False' && isReady.reason !== wasReady?.reason && NOT_SERVING_EVENTS.has(isReady.reason) && isReady.reason !== effectiveDegraded?.reason) event('Warning', isReady.reason, isReady.message);
    const isMatched = is('ConsumersMatched');
    if (isMatched?.status === 'False' && (was('ConsumersMatched')?.status !== 'False' || was('ConsumersMatched')?.reason !== isMatched.reason)) event('Warning', isMatched.reason, isMatched.message);
    const isConflict = is('LimitConflict');
    if (isConflict?.status === 'True' && (was('LimitConflict')?.status !== 'True' || was('LimitConflict')?.message !== isConflict.message)) event('Warning', isConflict.reason, isConflict.message);
    const isAbove = is('LimitExceedsServer');
    if (isAbove?.status === 'True' && (was('LimitExceedsServer')?.status !== 'True' || was('LimitExceedsServer')?.message !== isAbove.message)) event('Warning', isAbove.reason, isAbove.message);
    const isPooler = is('PoolerInFront');
    if (isPooler?.status === 'True' && (was('PoolerInFront')?.status !== 'True' || was('PoolerInFront')?.reason !== isPooler.reason)) event(isPooler.reason === 'TransactionPooler' ? 'Warning' : 'Normal', isPooler.reason, isPooler.message);
    const isDegraded = is('Degraded');
    if (effectiveDegraded && isDegraded && was('Degraded')?.reason !== isDegraded.reason) event('Warning', isDegraded.reason, isDegraded.message);
    // The API server returns keys in its own order: compare by content, or every reconcile writes.
    if (canonicalJson(status) === canonicalJson(previous) && conditionsEqual(previous?.conditions, conditions)) return;
    // While grants move, every acknowledgement changes the counts: at most one write a second per
    // connection unless a condition changes its status or reason. The settled state is always
    // written, and an unsettled server is reconciled again within seconds.
    const statusKey = key(connection);
    const sameVerdicts = conditions.every((c) => findCondition(previous?.conditions, c.type)?.status === c.status && findCondition(previous?.conditions, c.type)?.reason === c.reason);
    if (plan && !plan.settled && sameVerdicts && this.now().getTime() - (this.statusWrittenAt.get(statusKey) ?? 0) < STATUS_COALESCE_MS) return;
    this.statusWrittenAt.set(statusKey, this.now().getTime());
    try {
      await this.deps.http.patch(`${MEMBERS}/namespaces/${connection.metadata.namespace ?? ''}/databaseconnections/${connection.metadata.name ?? ''}/status`, { status });
    } catch (err) {
      if (!isStatus(err, 404)) throw err;
    }
  }

  private recordMetrics(server: string, plan: BudgetPlan, connections: readonly DatabaseConnection[]): void {
    const { metrics } = this.deps;
    metrics.serverLimit.set({ server }, plan.limit);
    metrics.serverAllocated.set({ server }, plan.allocated);
    for (const summary of plan.connections) {
      const labels = { namespace: summary.namespace, connection: summary.name };
      metrics.connectionAllocated.set(labels, summary.allocated);
      metrics.connectionPods.set(labels, summary.pods);
      metrics.connectionOversubscribed.set(labels, plan.oversubscription && connections.length > 0 ? 1 : 0);
      for (const consumer of summary.consumers) metrics.perPodBudget.set({ ...labels, consumer: consumer.name }, consumer.perPodBudget);
    }
    const now = this.now().getTime();
    const since = this.unsettledSince.get(server);
    if (!plan.settled && since === undefined) this.unsettledSince.set(server, now);
    if (plan.settled && since !== undefined) {
      metrics.rebalanceLatency.observe((now - since) / 1000);
      this.unsettledSince.delete(server);
    }
  }
}

/** The key of the server a DatabaseServer owns. */
function ownedKey(name: string): string {
  return ownedServerKey(name);
}

/** `input` with the pods `withdrawn` selects made consumer-less: the planner takes back everything they hold. */
function withdrawPods(input: BudgetInput, withdrawn: (pod: BudgetInput['pods'][number]) => boolean): BudgetInput {
  return { ...input, pods: input.pods.map((p) => (withdrawn(p) ? { ...p, consumer: undefined } : p)) };
}

/** JSON with object keys sorted at every level (undefined members dropped, as JSON.stringify does), for comparing content. */
function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) => {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) return v;
    const record = v as Record<string, unknown>;
    return Object.fromEntries(Object.keys(record).sort().map((k) => [k, record[k]]));
  });
}

/** Fingerprints of PoolMember settings, per spec object: the cache keeps an object until it changes. */
const settingsFingerprints = new WeakMap<object, string>();

/**
 * A PoolMember spec's settings (everything but its grant and drain) in a
 * stable order, defaults applied, as one string for change detection.
 */
function settingsFingerprint(spec: PoolMember['spec'] | PoolMemberSpecInput): string {
  let fingerprint = settingsFingerprints.get(spec);
  if (fingerprint === undefined) {
    fingerprint = JSON.stringify({
      connection: spec.connection,
      processesPerPod: spec.processesPerPod,
      credentialsGeneration: spec.credentialsGeneration ?? null,
      database: { host: spec.database.host, port: spec.database.port, dbname: spec.database.dbname, sslMode: spec.database.sslMode, channelBinding: spec.database.channelBinding ?? 'prefer' },
      sshTunnel: spec.sshTunnel ? { host: spec.sshTunnel.host, port: spec.sshTunnel.port, user: spec.sshTunnel.user, hostKey: spec.sshTunnel.hostKey } : null,
      pool: { mode: spec.pool.mode, poolTimeout: spec.pool.poolTimeout, poolRecycle: spec.pool.poolRecycle, poolPrePing: spec.pool.poolPrePing, idleTimeout: spec.pool.idleTimeout },
    });
    settingsFingerprints.set(spec, fingerprint);
  }
  return fingerprint;
}

/** A PoolMember spec for change detection: its grant, drain and settings (settingsFingerprint). */
function specFingerprint(grant: { connections: number; generation: number }, drain: boolean, settings: string): string {
  return `${grant.connections}/${grant.generation}/${drain}/${settings}`;
}
