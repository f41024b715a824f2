/**
 * The pool of server connections under the grant. Invariants:
 * - held (connecting + open, closing included) never exceeds the grant when
 *   a new connection is opened; a shrink closes idle connections first and
 *   busy ones as they are released;
 * - a connection goes back to the pool only at a transaction boundary, with
 *   the current credentials, within its lifetime, and (session mode) after
 *   DISCARD ALL;
 * - waiting clients are served first come, first served, up to poolTimeout;
 * - a login refused for a reason waiting does not cure (refusal) fails the
 *   clients at once with the server's error when no usable connection is left,
 *   and while it stands at most one login is in flight.
 */
import { credentialsAdvice } from '../core/credentials.ts';
import type { Duplex } from 'node:stream';
import { serialize } from 'pg-protocol';
import type { Logger } from 'pino';
import type { ServerConnectionState } from '../core/pool-state/index.ts';
import { NO_SETTINGS, settingsSql, type ClientSettings } from '../core/protocol/index.ts';
import type { BackendRecord } from './backend-ledger.ts';
import type { SidecarMetrics } from './metrics.ts';
import { ServerConnection, type ServerConnectionUser } from './server-connection.ts';
import type { Credentials, DatabaseReachability, SidecarSettings } from './settings.ts';
import { loginUpstream, UpstreamError } from './upstream-login.ts';

/** A failure to get a server connection, with the SQLSTATE the client should see. */
export interface AcquireFailure {
  sqlState: string;
  message: string;
  detail?: string;
  hint?: string;
}

/** A client waiting for a server connection. */
export interface PoolWaiter extends ServerConnectionUser {
  /** Run-time settings the server connection must have before it is lent. */
  readonly settings: ClientSettings;
  /** Apply every setting even where the connection has it already: the client's login needs each value as the server shows it. */
  readonly checkSettings: boolean;
  /** The idle connection it must have if there is one (transaction mode: the one holding its session's sequence values). */
  readonly preferredServer?: ServerConnection | undefined;
  /** `shown`: with checkSettings, each setting's value as SHOW prints it, in the order of `settings.values`. */
  onAcquired(server: ServerConnection, shown?: readonly (string | undefined)[]): void;
  onAcquireFailed(failure: AcquireFailure): void;
}

/** Opens a byte stream to host:port (TCP, or an SSH channel), failing after `deadline` (ms). */
export type StreamOpener = (host: string, port: number, deadline: number) => Promise<Duplex>;

/** Dependencies of a Pool. */
export interface PoolDeps {
  settings: SidecarSettings;
  credentials: () => Credentials;
  openStream: StreamOpener;
  logger: Logger;
  metrics: SidecarMetrics;
  now: () => number;
  /** Called whenever something in the status may have changed. */
  changed: () => void;
  /** Why no connection can be opened right now (e.g. the SSH tunnel is down), for the client's error. */
  blockedReason?: () => string | undefined;
  /**
   * The granted server connections kept for good by clients pinned to them
   * (transaction mode), by pin reason, for the error of a client that waited
   * in vain: without it, "all busy" does not say that they will stay busy.
   */
  pinnedHolders?: () => ReadonlyMap<string, number>;
  /** Why no connection can be opened until something changes, known without a login (the bastion refused the SSH connection): clients are told at once. */
  refusedReason?: () => string | undefined;
  /** Keeps the backends held where the next sidecar in the pod finds them (BackendLedger); absent: not kept. */
  ledger?: { save(records: readonly BackendRecord[]): void };
  /** The CA server logins verify against now (a file that rotates); absent: settings.database.caPem. */
  databaseCa?: () => string;
}

interface WaitEntry {
  waiter: PoolWaiter;
  since: number;
}

const CONNECT_TIMEOUT_MS = 10_000;
/** The session advisory locks a backend holds (transaction-scoped ones are gone at a boundary). */
const ADVISORY_LOCKS_HELD_SQL = "SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()";
/** A lost backend that cannot be confirmed gone stops counting after this long with a live connection to the server. */
const UNCONFIRMED_MAX_MS = 30_000;
/** After cancelling a previous sidecar's backends, how long before a connection is opened to confirm them gone. */
const ADOPTED_PROBE_DELAY_MS = 1_000;
/** Longest wait for a pre-ping or settings check before the connection is given up. */
const CHECK_TIMEOUT_MS = 5_000;
const RETRY_MIN_MS = 100;
const RETRY_MAX_MS = 2_000;
/**
 * After a refused login, clients arriving within this long fail at once with its
 * error; the first one after it tries one login. The same spacing as the longest
 * retry backoff: the server sees no more failed logins than while clients waited,
 * and a fix on the server side (a password, a database) is seen within it. New
 * credentials end it at once.
 */
const REFUSAL_HOLD_MS = RETRY_MAX_MS;
/** Lost backends just terminated are asked about again this soon (they exit within milliseconds), at most this many times, before the connection serves clients. */
const RECHECK_DELAY_MS = 25;
const RECHECK_TRIES = 8;
/**
 * While the database counts as unreachable and no client asks for a
 * connection, one login is tried after this long plus up to as much again at
 * random (many sidecars must not try in step), so that the report clears once
 * the cause is gone even in a pod whose app has stopped trying.
 */
const UNREACHABLE_RECHECK_MS = 30_000;
/** Longest cause reported in the PoolMember status. */
const REACHABILITY_MESSAGE_MAX = 1024;

/** Server connections, the grant, and the FIFO of waiting clients. */
export class Pool {
  grant = 0;
  grantGeneration = 0;
  acknowledgedGeneration = 0;
  acknowledgedConnections = 0;
  transactions = 0;
  /** ParameterStatus values of the latest login, replayed to clients at their login. */
  serverParameters: Map<string, string> | undefined;
  private pendingGeneration: number | undefined;
  private readonly servers = new Set<ServerConnection>();
  private readonly idle: ServerConnection[] = [];
  /** Backends whose connection ended without the server closing it (a lost tunnel, a frozen network): counted until confirmed gone. */
  private unconfirmed: { processId: number; secretKey?: number; createdAt: number; lostAt: number }[] = [];
  private confirming = false;
  /** Since when the pool has had a live server connection without a break; undefined: none now. */
  private liveSince: number | undefined;
  /** No connection is opened just to confirm lost backends before this time (cancels sent to them land first). */
  private probeNotBefore = 0;
  /** Released connections waiting for a CancelRequest to be delivered before another client may have them; value: reset with DISCARD ALL. */
  private readonly parked = new Map<ServerConnection, boolean>();
  /** Oldest first; every waiter has the same poolTimeout, so deadlines come in this order too. */
  private waiters: WaitEntry[] = [];
  /**
   * Waiters out of the queue whose connection is being checked before use
   * (handOut); `cancelled` once the waiter no longer wants it (cancelWait):
   * the connection then goes to the next waiter instead.
   */
  private readonly inCheck = new Map<PoolWaiter, { cancelled: boolean }>();
  /** One timer for the oldest waiter's deadline, not one per wait (a wait per transaction when clients outnumber the grant). */
  private waitTimer: NodeJS.Timeout | undefined;
  /** Connections in state closing, kept by stateChanged so that `committed` costs nothing per release. */
  private closing = 0;
  private connecting = 0;
  /** Connections being opened, by the settings key they log in with (session mode). */
  private readonly connectingByKey = new Map<string, number>();
  private draining = false;
  private closed = false;
  private lastConnectError: string | undefined;
  /** The latest login failure that waiting does not cure (refused password, missing database, bastion host key...), until a login works, fails otherwise, or the credentials change. */
  private refusal: { failure: AcquireFailure; at: number } | undefined;
  /** Credentials generation of the latest login that worked. */
  private goodGeneration: string | undefined;
  /**
   * Until when a refusal is waited on with retries, as before (poolTimeout after
   * new credentials, or after credentials that worked were first refused): the
   * other half of a credential rotation (the server's password or the Secret) may
   * be on its way.
   */
  private graceUntil = 0;
  private retryTimer: NodeJS.Timeout | undefined;
  private consecutiveFailures = 0;
  /** The cause of the latest failed login since the latest that worked, if any. */
  private lastLoginFailure: { reason: string; message: string } | undefined;
  /** Whether the database can be reached and logged in to, as of its last change (undefined before the first login). */
  reachability: DatabaseReachability | undefined;
  /** The next login tried while the database counts as unreachable. */
  private recheckTimer: NodeJS.Timeout | undefined;
  private nextServerId = 1;
  private readonly emptyListeners: (() => void)[] = [];
  private readonly deps: PoolDeps;
  private readonly events: ConstructorParameters<typeof ServerConnection>[0]['events'];

  constructor(deps: PoolDeps) {
    this.deps = deps;
    this.events = {
      stateChanged: (_server, from, to) => {
        if (to === 'closing') this.closing += 1;
        else if (from === 'closing') this.closing -= 1;
      },
      closed: (server, serverEnded) => this.onServerClosed(server, serverEnded),
      transactionCompleted: () => {
        this.transactions += 1;
      },
      cancel: (server) => void this.sendCancel(server).catch((err: Error) => this.deps.logger.warn({ server: server.id, err: err.message }, 'cancelling the statement of a closing server connection failed')),
    };
  }

  /** Server connections that hold a backend (connecting, open or closing), and backends not yet confirmed gone. */
  get held(): number {
    return this.servers.size + this.connecting + this.unconfirmed.length;
  }

  /** Live connections not already on their way out: what a shrink must bring down to the grant. */
  private get committed(): number {
    return this.servers.size + this.connecting - this.closing;
  }

  /** Clients queued for a server connection. */
  get waiting(): number {
    return this.waiters.length;
  }

  /** Connections per state, for metrics. */
  countByState(): Record<ServerConnectionState, number> {
    const counts: Record<ServerConnectionState, number> = { connecting: this.connecting, idle: 0, active: 0, resetting: 0, closing: 0, closed: 0 };
    for (const s of this.servers) counts[s.state] += 1;
    return counts;
  }

  /** Asks for a server connection; answers through the waiter's callbacks, possibly synchronously. */
  acquire(waiter: PoolWaiter): void {
    // Draining, clients ask only while they linger (ClientSession.drainAfterAnswer); they are still served.
    if (this.closed) {
      waiter.onAcquireFailed({ sqlState: '57P01', message: 'the sidecar is shutting down and hands out no more server connections' });
      return;
    }
    // One clock read per acquire and per release: Date.now was ~1 % of the sidecar's CPU at 6 reads per transaction.
    const now = this.deps.now();
    if (this.waiters.length === 0) {
      const preferred = waiter.preferredServer;
      const server = (preferred !== undefined ? this.takeIdleServer(preferred, now) : undefined) ?? this.takeIdle(now, waiter.settings.key);
      if (server !== undefined) {
        this.handOut(server, waiter, now, now);
        return;
      }
    }
    const refused = this.standingRefusal(now);
    if (refused !== undefined) {
      this.deps.metrics.error('login-refused');
      waiter.onAcquireFailed(refused);
      return;
    }
    this.waiters.push({ waiter, since: now });
    this.armWaitTimer();
    this.serveWaiters();
  }

  /** Forgets a waiter whose client went away or whose statement was cancelled while it waited: it is handed nothing later. */
  cancelWait(waiter: PoolWaiter): void {
    const checking = this.inCheck.get(waiter);
    if (checking !== undefined) {
      checking.cancelled = true;
      this.inCheck.delete(waiter);
      return;
    }
    const index = this.waiters.findIndex((e) => e.waiter === waiter);
    if (index < 0) return;
    this.waiters.splice(index, 1);
  }

  /**
   * Takes a connection back. `reusable` is false when the client left it
   * mid-transaction or mid-protocol: such a connection is closed, never reused.
   * `reset` (session mode, or a client pinned by session state) runs DISCARD
   * ALL before another client may have it.
   */
  release(server: ServerConnection, reusable: boolean, reset: boolean = this.deps.settings.pool.mode === 'session'): void {
    server.detach();
    if (server.state !== 'active') return;
    if (server.cancelsInFlight > 0 && reusable && server.tracker.atBoundary) {
      // A cancel meant for its last client must not hit the next one's statement.
      this.parked.set(server, reset);
      return;
    }
    this.recycle(server, reusable, reset);
  }

  /**
   * A client pinned only by session advisory locks is at a boundary: asks its
   * backend whether it holds any still (one round trip, the client's messages
   * waiting). None, and `free()` still: the connection comes back to the pool
   * as a clean one (the client's carried settings are all that is on it) and
   * `done('released')`; none, but the client is no longer free to go (it sent
   * more meanwhile): `done('busy')`; some, or the question failed:
   * `done('held')`; either way it stays lent to `user`. The connection died
   * meanwhile: `done('lost')`.
   */
  checkAdvisoryLocks(server: ServerConnection, user: ServerConnectionUser, free: () => boolean, done: (outcome: 'released' | 'busy' | 'held' | 'lost') => void): void {
    server.detach();
    server.runInternal(ADVISORY_LOCKS_HELD_SQL, (result) => {
      if (server.state !== 'resetting') {
        done('lost');
        return;
      }
      const none = result.ok && result.row?.[0] === '0';
      if (none && free()) {
        this.recycle(server, true, false);
        done('released');
        return;
      }
      if (!result.ok) this.deps.logger.info({ server: server.id, err: result.error?.M }, 'could not ask a pinned client\'s backend for its advisory locks; the client stays pinned');
      server.tracker.reset();
      server.attach(user);
      done(none ? 'busy' : 'held');
    });
  }

  private recycle(server: ServerConnection, reusable: boolean, reset: boolean): void {
    const now = this.deps.now();
    const reason = this.reasonToClose(server, reusable, now);
    if (reason !== undefined) {
      if (!reusable) this.deps.metrics.error('dirty-server-discarded');
      server.close(reason);
      return;
    }
    if (reset) {
      server.runInternal('DISCARD ALL', (result) => {
        if (server.state !== 'resetting') return;
        if (result.ok) {
          server.sequenceClient = undefined;
          this.makeAvailable(server, this.deps.now());
        } else server.close('DISCARD ALL failed');
      });
      return;
    }
    this.makeAvailable(server, now);
  }

  /** Applies a grant: grows at once; shrinks by closing idle connections now and busy ones on release. */
  setGrant(connections: number, generation: number): void {
    if (!Number.isInteger(connections) || connections < 0) throw new Error(`invalid grant ${connections}`);
    this.grant = connections;
    this.grantGeneration = generation;
    this.pendingGeneration = generation;
    this.deps.logger.info({ connections, generation, held: this.held }, 'grant changed');
    this.closeIdleWhile(() => this.committed > this.grant, 'grant shrink');
    this.checkAcknowledgement();
    this.serveWaiters();
    this.deps.changed();
  }

  /** New credentials: idle connections with the old ones close now; busy ones close when released. */
  credentialsChanged(): void {
    const generation = this.deps.credentials().generation;
    this.closeIdleWhere((s) => s.credentialsGeneration !== generation, 'credentials rotated');
    this.lastConnectError = undefined;
    this.consecutiveFailures = 0;
    this.refusal = undefined;
    // Secret first, server's password after: the new credentials may be refused until the server has them.
    this.graceUntil = this.deps.now() + this.deps.settings.pool.poolTimeout * 1000;
    if (this.retryTimer) {
      clearTimeout(this.retryTimer);
      this.retryTimer = undefined;
    }
    this.serveWaiters();
    // The failure may have been these credentials': find out now, not at the next recheck.
    if (this.reachability?.reachable === false) this.recheckReachability(0);
    this.deps.changed();
  }

  /**
   * Tries one login soon while the database counts as unreachable (a new
   * bastion host key, say): the report clears as soon as the cause is gone.
   */
  recheckReachability(delayMs: number): void {
    clearTimeout(this.recheckTimer);
    this.recheckTimer = undefined;
    if (this.reachability?.reachable !== false || this.closed || this.draining) return;
    this.recheckTimer = setTimeout(() => {
      this.recheckTimer = undefined;
      if (this.reachability?.reachable !== false || this.closed || this.draining) return;
      // A login already under way, or clients waiting (their retries log in), says it too.
      if (this.connecting === 0 && this.servers.size === 0 && this.waiters.length === 0 && this.held < this.grant) void this.open();
      else this.recheckReachability(UNREACHABLE_RECHECK_MS + Math.random() * UNREACHABLE_RECHECK_MS);
    }, delayMs);
    this.recheckTimer.unref();
  }

  /** Records a change of reachability only: a login like the last one changes nothing, so the status is not rewritten. */
  private setReachability(reachable: boolean, reason: string, message: string): void {
    const previous = this.reachability;
    if (previous?.reachable === reachable && previous.reason === reason) return;
    this.reachability = { reachable, reason, message: message.slice(0, REACHABILITY_MESSAGE_MAX), since: this.deps.now() };
    if (reachable) this.deps.logger.info({ reason }, 'the database can be reached again');
    else this.deps.logger.warn({ reason, cause: this.reachability.message }, 'the database cannot be reached: reported in the PoolMember status');
    this.deps.changed();
  }

  /**
   * Something a refused login depends on changed (the SSH tunnel came up, the
   * bastion's host key changed): the next client tries a login at once rather
   * than getting the refusal again.
   */
  loginPathChanged(): void {
    if (this.refusal === undefined) return;
    this.refusal = undefined;
    this.serveWaiters();
  }

  /** The login path was refused without a login (the bastion refused the SSH connection): waiting clients are told now. */
  loginPathRefused(): void {
    const refused = this.standingRefusal(this.deps.now());
    if (refused !== undefined) this.failWaiters(refused);
  }

  /** A server connection's lifetime in ms; poolRecycle -1 (SQLAlchemy's "never") is unbounded. */
  private recycleMs(): number {
    const { poolRecycle } = this.deps.settings.pool;
    return poolRecycle < 0 ? Number.POSITIVE_INFINITY : poolRecycle * 1000;
  }

  /** Periodic upkeep: idleTimeout and poolRecycle for idle connections. */
  janitor(): void {
    const now = this.deps.now();
    const { idleTimeout } = this.deps.settings.pool;
    const recycleMs = this.recycleMs();
    this.closeIdleWhere((s) => now - s.idleSince >= idleTimeout * 1000, 'idle timeout');
    this.closeIdleWhere((s) => now - s.createdAt >= recycleMs, 'recycled (poolRecycle)');
    this.confirmLostBackends(now);
    // Waiters blocked on something that changed without an event (a tunnel back up) are retried.
    if (this.waiters.length > 0) this.serveWaiters();
  }

  /**
   * Asks PostgreSQL, on an idle connection, which lost backends still exist,
   * terminating those (they serve nobody) and forgetting the ones gone. A
   * backend's pid can be reused only after it exited, so a backend that
   * started after our connection was made is never taken for ours. A lost
   * backend is forgotten after UNCONFIRMED_MAX_MS with live connections none
   * of which was ever idle to ask on. Without a live connection (the database
   * host unreachable) it counts on: it still lives on a server that never
   * heard its connection end, and forgetting it would let the sidecar open its
   * whole grant again beside it when the host answers. The first connection
   * that logs in asks at once (open).
   */
  private confirmLostBackends(now: number): void {
    if (this.unconfirmed.length === 0 || this.confirming) return;
    const liveSince = this.liveSince;
    const expired = liveSince === undefined ? [] : this.unconfirmed.filter((u) => now - Math.max(u.lostAt, liveSince) >= UNCONFIRMED_MAX_MS);
    if (expired.length > 0) {
      this.deps.logger.warn({ backends: expired.map((u) => u.processId) }, 'lost backends never confirmed gone; no longer counted');
      this.forgetLost(expired.map((u) => u.processId));
    }
    const server = this.idle.pop();
    if (server === undefined || this.unconfirmed.length === 0) {
      if (server !== undefined) this.idle.push(server);
      return;
    }
    this.askAboutLost(server, now);
  }

  /**
   * Runs the lost backends' check (confirmLostBackends) on `server`, idle and
   * out of the idle stack; it becomes available after. Backends it had to
   * terminate are asked about again on it a moment later, so that their slots
   * are free at once rather than at the next idle moment, which under load,
   * with every other slot still counted, may be long in coming.
   */
  private askAboutLost(server: ServerConnection, now: number, attempt = 0): void {
    const values = this.unconfirmed.map((u) => `(${u.processId}, ${Math.max(0, now - u.createdAt)})`).join(', ');
    // Materialized first: the planner may otherwise call pg_terminate_backend on a row the other conditions
    // would have excluded (a pid since reused by another role's backend).
    const sql = 'WITH ours AS MATERIALIZED (SELECT a.pid FROM (VALUES ' + values + ') v(pid, age_ms) JOIN pg_catalog.pg_stat_activity a ON a.pid = v.pid '
      + "AND a.backend_start <= now() - v.age_ms * interval '1 millisecond' WHERE a.usename = current_user) "
      + 'SELECT array_agg(pid) FROM ours WHERE pg_catalog.pg_terminate_backend(pid)';
    this.confirming = true;
    const asked = this.unconfirmed.map((u) => u.processId);
    server.runInternal(sql, (result) => {
      const alive = new Set(result.ok ? (result.row?.[0] ?? '{}').replace(/[{}]/g, '').split(',').filter((p) => p !== '').map(Number) : []);
      if (result.ok) this.forgetLost(asked.filter((pid) => !alive.has(pid)));
      if (server.state !== 'resetting') {
        this.confirming = false;
        return;
      }
      if (!result.ok) {
        this.confirming = false;
        server.close('checking lost backends failed');
        return;
      }
      if (alive.size === 0 || attempt + 1 >= RECHECK_TRIES || this.closed || this.draining) {
        this.confirming = false;
        this.makeAvailable(server, this.deps.now());
        return;
      }
      // Out of the idle stack meanwhile: no client is handed it before the check is done.
      server.setState('idle');
      setTimeout(() => {
        if (server.state !== 'idle' || !this.servers.has(server)) {
          this.confirming = false;
          return;
        }
        if (this.closed || this.draining) {
          this.confirming = false;
          server.close('drain');
          return;
        }
        if (this.unconfirmed.length === 0) {
          this.confirming = false;
          this.makeAvailable(server, this.deps.now());
          return;
        }
        this.askAboutLost(server, this.deps.now(), attempt + 1);
      }, RECHECK_DELAY_MS);
    });
  }

  /**
   * Takes over the backends a previous sidecar in this pod left (from the
   * ledger): each is cancelled with its key (a cancel takes no connection
   * slot, and a backend whose statement fails finds its client gone and
   * exits) and counts as held until a live connection confirms it gone.
   */
  adoptLeftovers(records: readonly BackendRecord[]): void {
    const known = new Set([...this.servers].map((s) => s.processId).concat(this.unconfirmed.map((u) => u.processId)));
    const now = this.deps.now();
    const adopted = records.filter((r) => !known.has(r.processId));
    if (adopted.length === 0) return;
    for (const r of adopted) this.unconfirmed.push({ processId: r.processId, secretKey: r.secretKey, createdAt: r.createdAt, lostAt: now });
    this.probeNotBefore = now + ADOPTED_PROBE_DELAY_MS;
    this.deps.logger.info({ backends: adopted.map((r) => r.processId) }, 'backends left by a previous sidecar in this pod: cancelled, and counted until confirmed gone');
    for (const r of adopted) {
      void this.cancelBackend(r.processId, r.secretKey).catch((err: Error) => this.deps.logger.debug({ backend: r.processId, err: err.message }, 'cancelling a left-over backend failed'));
    }
    this.persist();
    this.deps.changed();
  }

  /** Writes the backends held (open, connecting ones once known, and unconfirmed) to the ledger. */
  private persist(): void {
    const ledger = this.deps.ledger;
    if (!ledger) return;
    const records: BackendRecord[] = [...this.servers].map((s) => ({ processId: s.processId, secretKey: s.secretKey, createdAt: s.createdAt }));
    for (const u of this.unconfirmed) records.push({ processId: u.processId, secretKey: u.secretKey ?? 0, createdAt: u.createdAt });
    ledger.save(records);
  }

  private forgetLost(processIds: number[]): void {
    if (processIds.length === 0) return;
    const gone = new Set(processIds);
    this.unconfirmed = this.unconfirmed.filter((u) => !gone.has(u.processId));
    this.deps.logger.info({ backends: processIds }, 'lost backends confirmed gone');
    this.persist();
    this.afterHeldChanged();
    this.serveWaiters();
    this.deps.changed();
  }

  /**
   * Draining: no new server connections and no grant changes. The ones open
   * still serve the clients, which each linger a moment after their last
   * transaction and are then closed (ClientSession.drain); closeAll ends them.
   */
  beginDrain(): void {
    this.draining = true;
    clearTimeout(this.recheckTimer);
    this.deps.changed();
  }

  /** Closes every connection, busy or not (end of drain, shutdown). */
  closeAll(reason: string): void {
    this.closed = true;
    this.draining = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    clearTimeout(this.recheckTimer);
    this.stopWaitTimer();
    for (const entry of this.waiters.splice(0)) {
      entry.waiter.onAcquireFailed({ sqlState: '57P01', message: 'the sidecar is shutting down' });
    }
    for (const s of [...this.servers]) s.close(reason);
    this.idle.length = 0;
  }

  /** Resolves once no connection holds a backend. */
  whenEmpty(): Promise<void> {
    if (this.held === 0) return Promise.resolve();
    return new Promise((resolve) => this.emptyListeners.push(resolve));
  }

  /**
   * Forwards a client's CancelRequest to `server`'s backend if `stillRunning()`
   * holds once the cancel connection is open (the statement it was meant for
   * has not ended meanwhile). Resolves once PostgreSQL has taken the request
   * (it closes the cancel connection after signalling the backend), or when
   * it was not sent; until then the server connection goes to no other client.
   */
  async cancelStatement(server: ServerConnection, stillRunning: () => boolean): Promise<boolean> {
    server.cancelsInFlight += 1;
    try {
      return await this.sendCancel(server, stillRunning);
    } finally {
      server.cancelsInFlight -= 1;
      const reset = this.parked.get(server);
      if (server.cancelsInFlight === 0 && reset !== undefined) {
        this.parked.delete(server);
        if (server.state === 'active') this.recycle(server, true, reset);
      }
    }
  }

  /** Sends a CancelRequest for `server`'s backend over a new stream and waits until the server closes it. */
  private sendCancel(server: ServerConnection, stillRunning: () => boolean = () => true): Promise<boolean> {
    return this.cancelBackend(server.processId, server.secretKey, stillRunning);
  }

  /** Sends a CancelRequest for backend `processId` (unless `stillRunning` says no once connected); true if sent. */
  private async cancelBackend(processId: number, secretKey: number, stillRunning: () => boolean = () => true): Promise<boolean> {
    const { host, port } = this.deps.settings.database;
    const stream = await this.deps.openStream(host, port, this.deps.now() + CONNECT_TIMEOUT_MS);
    stream.on('error', () => undefined);
    if (!stillRunning()) {
      stream.destroy();
      return false;
    }
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => stream.destroy(), CONNECT_TIMEOUT_MS);
      stream.once('close', () => {
        clearTimeout(timer);
        resolve();
      });
      stream.end(serialize.cancel(processId, secretKey));
      stream.resume();
    });
    return true;
  }

  private reasonToClose(server: ServerConnection, reusable: boolean, now: number): string | undefined {
    if (!reusable || !server.tracker.atBoundary) return 'dirty: released mid-transaction or mid-protocol';
    // A draining session-mode pool lends nothing more (each client keeps its own); in transaction mode clients still borrow.
    if (this.draining && this.deps.settings.pool.mode === 'session') return 'drain';
    if (server.credentialsGeneration !== this.deps.credentials().generation) return 'credentials rotated';
    if (this.committed > this.grant) return 'grant shrink';
    if (now - server.createdAt >= this.recycleMs()) return 'recycled (poolRecycle)';
    return undefined;
  }

  /**
   * A clean connection passes through idle: to the first waiter (session mode:
   * the first whose settings it logged in with), or into the idle stack.
   */
  private makeAvailable(server: ServerConnection, now: number): void {
    server.setState('idle');
    server.idleSince = now;
    const session = this.deps.settings.pool.mode === 'session';
    const index = session ? this.waiters.findIndex((e) => e.waiter.settings.key === server.loginSettings.key) : 0;
    const entry = index < 0 ? undefined : this.waiters[index];
    if (entry !== undefined) {
      this.waiters.splice(index, 1);
      this.handOut(server, entry.waiter, entry.since, now);
      return;
    }
    this.idle.push(server);
    // Others wait for other settings: this connection may have to make room for theirs.
    if (session && this.waiters.length > 0) this.serveWaiters();
  }

  /**
   * Most recently used idle connection that is still good (LIFO keeps fewer
   * connections warm); in session mode only one that logged in with the
   * settings `key`, so that RESET and DISCARD ALL return to the client's own
   * startup values, as on a direct connection.
   */
  /** True if `server` is idle in the pool, free to be lent. */
  isIdle(server: ServerConnection): boolean {
    return server.state === 'idle' && this.idle.includes(server);
  }

  /** `server` if it is idle and still good (see takeIdle), taken out of the idle stack. */
  private takeIdleServer(server: ServerConnection, now: number): ServerConnection | undefined {
    const index = this.idle.indexOf(server);
    if (index < 0 || server.state !== 'idle') return undefined;
    if (server.credentialsGeneration !== this.deps.credentials().generation || now - server.createdAt >= this.recycleMs()) return undefined;
    this.idle.splice(index, 1);
    return server;
  }

  private takeIdle(now: number, key: string): ServerConnection | undefined {
    const generation = this.deps.credentials().generation;
    const recycleMs = this.recycleMs();
    const session = this.deps.settings.pool.mode === 'session';
    for (let i = this.idle.length - 1; i >= 0; i--) {
      const server = this.idle[i]!;
      if (server.state === 'idle' && session && server.loginSettings.key !== key) continue;
      // Usually the last (LIFO): pop costs far less than a splice.
      if (i === this.idle.length - 1) this.idle.pop();
      else this.idle.splice(i, 1);
      if (server.state !== 'idle') continue;
      if (server.credentialsGeneration !== generation) server.close('credentials rotated');
      else if (now - server.createdAt >= recycleMs) server.close('recycled (poolRecycle)');
      else return server;
    }
    return undefined;
  }

  /**
   * Lends `server` to `waiter`, first bringing its settings to the client's
   * (which doubles as the pre-ping) or pinging it if it sat idle. A
   * connection that fails that check is closed and the client goes back to
   * the head of the queue, so it still gets a connection or its error within
   * poolTimeout; settings the server refuses fail the client with the server's
   * own error, as they would at a direct login.
   */
  private handOut(server: ServerConnection, waiter: PoolWaiter, since: number, now: number): void {
    const { poolPrePing } = this.deps.settings.pool;
    const prePingAfterMs = (this.deps.settings.prePingAfterIdle ?? 1) * 1000;
    const wanted = waiter.settings;
    // A backend that logged in with the client's settings (session mode) has them as a direct login
    // would (pg_settings.source 'client'), and reported their values at login: nothing to apply or check.
    const asLoggedIn = this.deps.settings.pool.mode === 'session' && server.loginSettings.key === wanted.key;
    const sync = !asLoggedIn && (waiter.checkSettings || server.settings.key !== wanted.key) ? settingsSql(wanted, server.settings, waiter.checkSettings) : undefined;
    const ping = poolPrePing && server.state === 'idle' && now - server.idleSince >= prePingAfterMs;
    if (sync === undefined && !ping) {
      this.give(server, waiter, since, now);
      return;
    }
    // A check the server never answers (a frozen network) must not hold the client past its poolTimeout.
    const deadline = since + this.deps.settings.pool.poolTimeout * 1000;
    const checkTimer = setTimeout(() => server.close('no answer to the check before use'), Math.max(100, Math.min(CHECK_TIMEOUT_MS, deadline - now)));
    const checking = { cancelled: false };
    this.inCheck.set(waiter, checking);
    server.runInternal(sync ?? ';', (result) => {
      clearTimeout(checkTimer);
      if (this.inCheck.get(waiter) === checking) this.inCheck.delete(waiter);
      if (checking.cancelled) {
        // The waiter went meanwhile: a connection that passed its check serves the next one.
        if (server.state !== 'resetting') return;
        if (result.ok) {
          if (sync !== undefined) server.settings = wanted;
          this.recycle(server, true, false);
          return;
        }
        this.deps.metrics.error('pre-ping');
        server.close(sync !== undefined ? 'settings check failed' : 'pre-ping failed');
        return;
      }
      if (server.state === 'resetting' && result.ok) {
        if (sync !== undefined) server.settings = wanted;
        this.give(server, waiter, since, this.deps.now(), waiter.checkSettings ? result.row : undefined);
        return;
      }
      if (server.state === 'resetting' && sync !== undefined && result.error?.C !== undefined && result.error.C !== '57P01') {
        // The server refused the client's settings: its error is the client's, as at a direct login.
        server.close('client settings refused');
        this.deps.metrics.error('client-settings');
        waiter.onAcquireFailed({ sqlState: result.error.C, message: result.error.M ?? 'invalid client setting', ...errorExtras(result.error) });
        return;
      }
      this.deps.metrics.error('pre-ping');
      this.deps.logger.info({ server: server.id, err: result.error?.M }, 'server connection failed its check before use; trying another');
      server.close(sync !== undefined ? 'settings check failed' : 'pre-ping failed');
      this.lastConnectError = `a server connection failed its check before use: ${result.error?.M ?? 'closed'}`;
      this.requeueFront(waiter, since);
    });
  }

  private give(server: ServerConnection, waiter: PoolWaiter, since: number, now: number, shown?: (string | undefined)[]): void {
    server.tracker.reset();
    server.attach(waiter);
    this.deps.metrics.waitSeconds.observe((now - since) / 1000);
    waiter.onAcquired(server, shown);
  }

  private requeueFront(waiter: PoolWaiter, since: number): void {
    if (this.closed) {
      waiter.onAcquireFailed({ sqlState: '57P01', message: 'the sidecar is shutting down' });
      return;
    }
    // It came from the head of the queue, so the order by deadline holds.
    this.waiters.unshift({ waiter, since });
    this.stopWaitTimer();
    this.armWaitTimer();
    this.serveWaiters();
  }

  /** poolTimeout changed: waiters' deadlines move, so the timer is armed again for the head. */
  poolTimeoutChanged(): void {
    this.stopWaitTimer();
    this.expireWaiters();
  }

  private armWaitTimer(): void {
    if (this.waitTimer !== undefined || this.waiters.length === 0) return;
    const deadline = this.waiters[0]!.since + this.deps.settings.pool.poolTimeout * 1000;
    this.waitTimer = setTimeout(() => {
      this.waitTimer = undefined;
      this.expireWaiters();
    }, Math.max(0, deadline - this.deps.now()));
  }

  private stopWaitTimer(): void {
    if (this.waitTimer === undefined) return;
    clearTimeout(this.waitTimer);
    this.waitTimer = undefined;
  }

  /** Fails every waiter past poolTimeout (they are at the head), then re-arms for the next one. */
  private expireWaiters(): void {
    const timeoutMs = this.deps.settings.pool.poolTimeout * 1000;
    for (;;) {
      const head = this.waiters[0];
      if (head === undefined || this.deps.now() - head.since < timeoutMs) break;
      this.waiters.shift();
      this.timeOut(head);
    }
    this.armWaitTimer();
  }

  private timeOut(entry: WaitEntry): void {
    if (this.refusal !== undefined) {
      // Waited on through a grace (a rotation half done) and still refused: the server's own error, as direct.
      this.deps.metrics.error('login-refused');
      entry.waiter.onAcquireFailed(this.refusal.failure);
      return;
    }
    this.deps.metrics.error('pool-timeout');
    const seconds = this.deps.settings.pool.poolTimeout;
    const blocked = this.deps.blockedReason?.();
    const lost = this.unconfirmed.length > 0 ? `; ${this.unconfirmed.length} backends lost with their connection still count until confirmed gone` : '';
    const why = blocked !== undefined ? `; ${blocked}` : this.lastConnectError !== undefined ? `; last connection attempt: ${this.lastConnectError}` : this.grant === 0 ? '; the grant is 0' : `; all ${this.grant} granted server connections are busy${this.pinnedHoldersText()}${lost}`;
    entry.waiter.onAcquireFailed({ sqlState: '53300', message: `no server connection available within ${seconds} s${why}` });
  }

  /** ", N of them kept by pinned clients (reason N, ...) until they disconnect", or nothing when none are. */
  private pinnedHoldersText(): string {
    const byReason = this.deps.pinnedHolders?.();
    if (byReason === undefined) return '';
    let total = 0;
    const reasons: string[] = [];
    for (const [reason, count] of byReason) {
      if (count <= 0) continue;
      total += count;
      reasons.push(`${reason} ${count}`);
    }
    if (total === 0) return '';
    return `, ${total} of them kept by clients pinned to them by session state (${reasons.join(', ')}) until those clients disconnect`;
  }

  /** Hands idle connections to waiters and opens new ones within the grant. */
  private serveWaiters(): void {
    const now = this.deps.now();
    if (this.deps.settings.pool.mode === 'session') this.serveSessionWaiters(now);
    else {
      while (this.waiters.length > 0) {
        const server = this.takeIdle(now, '');
        if (server === undefined) break;
        const entry = this.waiters.shift()!;
        this.handOut(server, entry.waiter, entry.since, now);
      }
      if (this.draining || this.retryTimer !== undefined) return;
      // While logins are refused, one at a time: a thousand clients arriving must not make a thousand logins.
      while (this.waiters.length > this.connecting && this.held < this.grant && (this.refusal === undefined || this.connecting === 0)) void this.open();
    }
    if (this.draining || this.retryTimer !== undefined) return;
    // Lost backends are confirmed gone only through a live connection: with none left, one may be
    // opened (briefly one over the grant if they do still live, as they cannot once the server is reached again).
    if (this.waiters.length > 0 && this.unconfirmed.length > 0 && this.servers.size + this.connecting === 0 && this.grant > 0 && now >= this.probeNotBefore && this.deps.blockedReason?.() === undefined) void this.open();
  }

  /**
   * Session mode: each waiter in turn gets an idle connection that logged in
   * with its settings, or one opened with them; at the grant, an idle
   * connection logged in with other settings is closed to make room.
   */
  private serveSessionWaiters(now: number): void {
    const opening = new Map(this.connectingByKey);
    let i = 0;
    while (i < this.waiters.length) {
      const entry = this.waiters[i]!;
      const { settings } = entry.waiter;
      const server = this.takeIdle(now, settings.key);
      if (server !== undefined) {
        this.waiters.splice(i, 1);
        this.handOut(server, entry.waiter, entry.since, now);
        continue;
      }
      i += 1;
      const pending = opening.get(settings.key) ?? 0;
      if (pending > 0) {
        opening.set(settings.key, pending - 1);
        continue;
      }
      if (this.draining || this.retryTimer !== undefined || (this.refusal !== undefined && this.connecting > 0)) return;
      if (this.held < this.grant) {
        void this.open(settings);
        continue;
      }
      // Runs again once the closed connection is gone (onServerClosed).
      this.closeIdleWhile(() => this.idle.length > 0 && this.held >= this.grant && this.closing === 0, 'making room for a client with other startup settings');
      return;
    }
  }

  /** Opens a server connection; `settings` (session mode) are sent in its startup packet. */
  private async open(settings: ClientSettings = NO_SETTINGS): Promise<void> {
    this.connecting += 1;
    this.connectingByKey.set(settings.key, (this.connectingByKey.get(settings.key) ?? 0) + 1);
    const credentials = this.deps.credentials();
    const { database } = this.deps.settings;
    const id = this.nextServerId++;
    let server: ServerConnection | undefined;
    let refused: AcquireFailure | undefined;
    let lasting: AcquireFailure | undefined;
    try {
      const stream = await this.deps.openStream(database.host, database.port, this.deps.now() + CONNECT_TIMEOUT_MS);
      if (stream.listenerCount('error') === 0) stream.on('error', () => undefined);
      const session = await loginUpstream({
        stream, host: database.host, dbname: database.dbname, username: credentials.username, password: credentials.password,
        sslMode: database.sslMode, channelBinding: database.channelBinding, timeoutMs: CONNECT_TIMEOUT_MS, ...caPemOf(this.deps.databaseCa?.() ?? database.caPem),
        ...(settings.key !== '' ? { settings: loginParametersOf(settings) } : {}),
      });
      server = new ServerConnection({
        id, stream: session.stream, credentialsGeneration: credentials.generation, now: this.deps.now(), processId: session.processId, secretKey: session.secretKey,
        maxMessageBytes: this.deps.settings.maxMessageBytes ?? 64 * 1024 * 1024, events: this.events, logger: this.deps.logger,
        ...(this.deps.settings.maxPreparedStatements !== undefined ? { maxPreparedStatements: this.deps.settings.maxPreparedStatements } : {}),
        loginSettings: settings, loginParameters: session.parameters,
      });
      // The values a client without settings of its own would see.
      if (settings.key === '' || this.serverParameters === undefined) this.serverParameters = session.parameters;
      this.deps.metrics.serverLogins.inc({ result: 'ok' });
      this.consecutiveFailures = 0;
      this.lastConnectError = undefined;
      this.goodGeneration = credentials.generation;
      this.lastLoginFailure = undefined;
      this.setReachability(true, 'LoggedIn', `logged in as ${credentials.username}`);
    } catch (error) {
      lasting = lastingRefusal(error, this.loginTarget());
      refused = lasting === undefined ? settingsRefused(error, settings) : undefined;
      if (refused !== undefined) this.deps.metrics.error('client-settings');
      else this.loginFailed(error, id, credentials.username);
    } finally {
      this.connecting -= 1;
      const opening = (this.connectingByKey.get(settings.key) ?? 1) - 1;
      if (opening === 0) this.connectingByKey.delete(settings.key);
      else this.connectingByKey.set(settings.key, opening);
    }
    if (refused !== undefined) {
      // The server refused the client's settings at login: its error is theirs, as at a direct login.
      for (const entry of this.waiters.filter((e) => e.waiter.settings.key === settings.key)) {
        this.cancelWait(entry.waiter);
        entry.waiter.onAcquireFailed(refused);
      }
      this.afterHeldChanged();
      this.serveWaiters();
      return;
    }
    if (server === undefined) {
      if (credentials.generation === this.deps.credentials().generation) this.noteRefusal(lasting);
      if (this.refusal !== undefined && this.refusalFailsClients(this.refusal.failure, this.deps.now())) this.failWaiters(this.refusal.failure);
      else this.scheduleRetry();
      this.afterHeldChanged();
      return;
    }
    const wasRefused = this.refusal !== undefined;
    this.refusal = undefined;
    this.servers.add(server);
    this.liveSince ??= this.deps.now();
    this.persist();
    this.deps.logger.debug({ server: id, backend: server.processId }, 'server connection opened');
    // Opened before a drain began, it still serves the clients that linger.
    if (this.closed || server.credentialsGeneration !== this.deps.credentials().generation || this.committed > this.grant) {
      server.close(this.closed ? 'drain' : 'stale on arrival');
      this.serveWaiters();
    } else if (this.unconfirmed.length > 0 && !this.confirming) {
      // Asked before any client has it: this may be the one connection opened over the grant to ask
      // (serveWaiters), and the lost backends it ends free their slots at once.
      server.setState('idle');
      server.idleSince = this.deps.now();
      this.askAboutLost(server, this.deps.now());
    } else this.makeAvailable(server, this.deps.now());
    // Logins went one at a time while refused: the other waiters' connections open now.
    if (wasRefused && this.waiters.length > 0) this.serveWaiters();
    this.deps.changed();
  }

  /**
   * Records the outcome of a failed login with the current credentials: a
   * lasting refusal stands until a login works or fails otherwise. Credentials
   * that logged in until now and are refused get one grace of poolTimeout (the
   * server's password may have changed first, and the Secret follow).
   */
  private noteRefusal(lasting: AcquireFailure | undefined): void {
    if (lasting === undefined) {
      this.refusal = undefined;
      return;
    }
    const now = this.deps.now();
    if (this.goodGeneration === this.deps.credentials().generation) {
      this.goodGeneration = undefined;
      this.graceUntil = Math.max(this.graceUntil, now + this.deps.settings.pool.poolTimeout * 1000);
    }
    this.refusal = { failure: lasting, at: now };
  }

  /**
   * What a client that would have to wait gets at once instead, if anything:
   * the latest refused login's error within REFUSAL_HOLD_MS of it, or the
   * bastion's refusal, when refusalFailsClients.
   */
  private standingRefusal(now: number): AcquireFailure | undefined {
    if (this.refusal !== undefined && now - this.refusal.at < REFUSAL_HOLD_MS) return this.refusalFailsClients(this.refusal.failure, now) ? this.refusal.failure : undefined;
    const tunnel = this.deps.refusedReason?.();
    if (tunnel === undefined) return undefined;
    const failure = tunnelRefusal(tunnel, this.loginTarget());
    return this.refusalFailsClients(failure, now) ? failure : undefined;
  }

  private loginTarget(): LoginTarget {
    const { host, port, dbname } = this.deps.settings.database;
    const { username, password } = this.deps.credentials();
    const advice = credentialsAdvice(username, password);
    return { host, port, dbname, username, ...(advice === undefined ? {} : { advice }) };
  }

  /**
   * A refusal fails clients at once only with no connection with the current
   * credentials left to lend them, and, for a refused password or role
   * (28xxx), out of the grace a rotation half done gets.
   */
  private refusalFailsClients(failure: AcquireFailure, now: number): boolean {
    if (failure.sqlState.startsWith('28') && now < this.graceUntil) return false;
    const generation = this.deps.credentials().generation;
    for (const server of this.servers) if (server.state !== 'closing' && server.state !== 'closed' && server.credentialsGeneration === generation) return false;
    return true;
  }

  /** Fails every waiting client with `failure`. */
  private failWaiters(failure: AcquireFailure): void {
    this.stopWaitTimer();
    for (const entry of this.waiters.splice(0)) {
      this.deps.metrics.error('login-refused');
      entry.waiter.onAcquireFailed(failure);
    }
  }

  /** Counts and logs a failed login (retried with backoff while clients wait). */
  private loginFailed(error: unknown, id: number, username: string): void {
    const message = error instanceof Error ? error.message : String(error);
    const kind = error instanceof UpstreamError && error.kind === 'auth' ? 'server-login' : message.includes('tunnel') ? 'tunnel' : 'server-connect';
    this.deps.metrics.serverLogins.inc({ result: kind === 'server-login' ? 'auth-failed' : 'failed' });
    this.deps.metrics.error(kind);
    this.lastConnectError = message;
    this.consecutiveFailures += 1;
    this.deps.logger.warn({ server: id, err: message, user: username }, 'server connection failed');
    // Hysteresis: while a server connection is live the database is reached, whatever one login says;
    // once the last one goes, this failure tells (onServerClosed).
    const cause = failureCause(error, this.deps.blockedReason?.());
    this.lastLoginFailure = cause;
    if (this.servers.size === 0) this.setReachability(false, cause.reason, cause.message);
    if (this.reachability?.reachable === false && this.recheckTimer === undefined) this.recheckReachability(UNREACHABLE_RECHECK_MS + Math.random() * UNREACHABLE_RECHECK_MS);
  }

  private scheduleRetry(): void {
    if (this.retryTimer !== undefined || this.draining || this.waiters.length === 0) return;
    // Exponential backoff with full jitter: many sidecars must not retry in step.
    const cap = Math.min(RETRY_MAX_MS, RETRY_MIN_MS * 2 ** Math.min(this.consecutiveFailures, 10));
    const delay = RETRY_MIN_MS / 2 + Math.random() * cap;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.serveWaiters();
    }, delay);
  }

  private onServerClosed(server: ServerConnection, serverEnded: boolean): void {
    this.servers.delete(server);
    if (this.servers.size === 0) {
      this.liveSince = undefined;
      // The last live connection gone after a login failed since the last that worked: unreachable now
      // (clients may be refused from that failure without another login, so none would tell).
      const failure = this.lastLoginFailure;
      if (failure !== undefined && !this.closed && !this.draining) {
        this.setReachability(false, failure.reason, failure.message);
        if (this.recheckTimer === undefined) this.recheckReachability(UNREACHABLE_RECHECK_MS + Math.random() * UNREACHABLE_RECHECK_MS);
      }
    }
    this.parked.delete(server);
    // A backend behind a lost tunnel may outlive a channel that ended on our side only.
    if (!serverEnded || this.deps.blockedReason?.() !== undefined) {
      this.unconfirmed.push({ processId: server.processId, secretKey: server.secretKey, createdAt: server.createdAt, lostAt: this.deps.now() });
      this.deps.logger.info({ server: server.id, backend: server.processId }, 'server connection lost without the server closing it; its backend counts until confirmed gone');
    }
    const index = this.idle.indexOf(server);
    if (index >= 0) this.idle.splice(index, 1);
    this.persist();
    this.afterHeldChanged();
    this.serveWaiters();
    this.deps.changed();
  }

  private afterHeldChanged(): void {
    this.checkAcknowledgement();
    if (this.held === 0) for (const listener of this.emptyListeners.splice(0)) listener();
  }

  private checkAcknowledgement(): void {
    if (this.pendingGeneration === undefined || this.held > this.grant) return;
    this.acknowledgedGeneration = this.pendingGeneration;
    this.acknowledgedConnections = this.grant;
    this.pendingGeneration = undefined;
    this.deps.logger.info({ generation: this.acknowledgedGeneration, connections: this.grant }, 'grant acknowledged');
    this.deps.changed();
  }

  private closeIdleWhile(condition: () => boolean, reason: string): void {
    // Oldest idle first: they are the least warm.
    while (condition() && this.idle.length > 0) {
      const server = this.idle.shift()!;
      if (server.state === 'idle') server.close(reason);
    }
  }

  private closeIdleWhere(predicate: (s: ServerConnection) => boolean, reason: string): void {
    for (const server of [...this.idle]) {
      if (server.state === 'idle' && predicate(server)) {
        this.idle.splice(this.idle.indexOf(server), 1);
        server.close(reason);
      }
    }
  }
}

/**
 * Why a login failed, as the PoolMember status reports it: the server's
 * SQLSTATE and message, the SSH tunnel's error, or the connection's.
 */
export function failureCause(error: unknown, tunnelDown: string | undefined): { reason: string; message: string } {
  const message = error instanceof Error ? error.message : String(error);
  if (error instanceof UpstreamError && error.sqlState !== undefined) return { reason: 'LoginFailed', message: `SQLSTATE ${error.sqlState}: ${error.serverFields?.M ?? message}` };
  if (error instanceof UpstreamError && error.kind === 'auth') return { reason: 'LoginFailed', message };
  if (tunnelDown !== undefined) return { reason: 'TunnelFailed', message: tunnelDown };
  if (message.startsWith('SSH tunnel')) return { reason: 'TunnelFailed', message };
  return { reason: 'ConnectionFailed', message };
}

/**
 * The startup parameters a client's settings become: all of them, except the
 * empty application_name that stands for none, so that such a client gets the
 * server's default as it would direct.
 */
function loginParametersOf(settings: ClientSettings): Map<string, string> {
  return new Map([...settings.values].filter(([name, value]) => !(name === 'application_name' && value === '')));
}

/**
 * A login that carried a client's settings and failed with an error of the
 * server's that is not about the sidecar's own role or a passing condition
 * (connection, resources, shutdown: classes 08, 53, 57, retried): the
 * client's error, as it would have got it logging in directly.
 */
function settingsRefused(error: unknown, settings: ClientSettings): AcquireFailure | undefined {
  if (settings.key === '' || !(error instanceof UpstreamError) || error.kind !== 'server' || error.sqlState === undefined) return undefined;
  if (/^(08|53|57)/.test(error.sqlState)) return undefined;
  const fields = error.serverFields;
  return { sqlState: error.sqlState, message: fields?.M ?? error.message, ...errorExtras(fields) };
}

/** Where the sidecar's own login went, for a client's error (never the password). */
interface LoginTarget {
  host: string;
  port: number;
  dbname: string;
  username: string;
  /** What looks wrong in the credentials (credentialsAdvice), for a refused password. */
  advice?: string;
}

/** What to check, by the SQLSTATE of a lasting refusal. */
const CHANNEL_BINDING_MISMATCH_HINT = 'The TLS connection does not end at the server: something between the sidecar and the server (a TLS-terminating proxy, or an interception) presents its own certificate. Reach the server directly; set spec.database.channelBinding to disable only if that proxy is trusted.';

const REFUSAL_HINTS: Readonly<Record<string, string>> = {
  '28P01': 'Check the password in the DatabaseConnection\'s credentials Secret against the role\'s password on the server; a changed Secret is used as soon as it reaches the pod.',
  '28000': 'Check the user name in the DatabaseConnection\'s credentials Secret, that the role may log in (LOGIN), and the server\'s pg_hba.conf; a changed Secret is used as soon as it reaches the pod.',
  '3D000': 'Check spec.database.dbname of the DatabaseConnection: the server has no database of that name.',
  '42501': 'Grant the role CONNECT on the database, or check spec.database.dbname of the DatabaseConnection.',
};

/**
 * A failed login that waiting does not cure, as the client should see it: the
 * server's own refusal (bad password 28P01, role or pg_hba 28000, no such
 * database 3D000, no CONNECT privilege 42501) with its SQLSTATE and message as
 * a direct login gets them, or a server certificate that does not verify or a
 * bastion that refuses the SSH connection (08001, as a client that cannot
 * establish its connection). Passing conditions (connection refused,
 * timeouts, 57P03 starting up, 53300 too many connections) are undefined:
 * those are waited on.
 */
function lastingRefusal(error: unknown, target: LoginTarget): AcquireFailure | undefined {
  if (!(error instanceof UpstreamError)) return undefined;
  const through = `through the poolkeeper sidecar: its own login to ${target.host}:${target.port} (database "${target.dbname}", user "${target.username}")`;
  if (error.sqlState !== undefined && REFUSAL_HINTS[error.sqlState] !== undefined) {
    const fields = error.serverFields;
    const ours = `Refused ${through}; no server connection is open to hand to this client.`;
    // PostgreSQL's words when the certificate the sidecar bound is not the one the server presents.
    const interception = /channel binding/i.test(fields?.M ?? '') ? CHANNEL_BINDING_MISMATCH_HINT : undefined;
    const credentials = error.sqlState === '28P01' && target.advice !== undefined ? `${target.advice[0]!.toUpperCase()}${target.advice.slice(1)}.` : undefined;
    return { sqlState: error.sqlState, message: fields?.M ?? error.message, detail: fields?.D !== undefined ? `${fields.D} ${ours}` : ours, hint: interception ?? credentials ?? REFUSAL_HINTS[error.sqlState]! };
  }
  if (error.kind === 'tls-verify') {
    return { sqlState: '08001', message: error.message, detail: `Failed ${through}.`, hint: 'Check the server\'s certificate against the CA in spec.database.caSecretRef and the sslMode of the DatabaseConnection.' };
  }
  if (error.kind === 'ssh-refused') return tunnelRefusal(error.message, target);
  if (error.kind === 'channel-binding') {
    return { sqlState: '08001', message: error.message, detail: `Failed ${through}.`, hint: 'Check spec.database.channelBinding and sslMode of the DatabaseConnection, and how the server authenticates this role (channel binding needs SCRAM over TLS).' };
  }
  return undefined;
}

/** The client's error for a bastion that refused the SSH connection (`message`: the tunnel's words). */
function tunnelRefusal(message: string, target: LoginTarget): AcquireFailure {
  return { sqlState: '08001', message, detail: `Failed through the poolkeeper sidecar: its own login to ${target.host}:${target.port} (database "${target.dbname}", user "${target.username}") goes through an SSH bastion that refused the connection.` };
}

/** DETAIL and HINT of a server's error, as a client should see them. */
function errorExtras(fields: Readonly<Record<string, string>> | undefined): { detail?: string; hint?: string } {
  return { ...(fields?.D !== undefined ? { detail: fields.D } : {}), ...(fields?.H !== undefined ? { hint: fields.H } : {}) };
}

function caPemOf(caPem: string | undefined): { caPem?: string } {
  return caPem === undefined ? {} : { caPem };
}
