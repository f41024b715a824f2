/**
 * The sidecar: a loopback listener, client sessions, the pool under the
 * grant, the optional SSH tunnel, the janitor and the admin server, wired
 * from what the entry point passes in.
 *
 * Client authentication is trust, restricted to loopback peers. The listener
 * binds 127.0.0.1 inside the pod's network namespace, so only containers of
 * the same pod can reach it; they share that namespace and so already share
 * one trust boundary. A per-pod password would have to be given to those
 * same containers and would add no isolation, while the real database
 * credentials stay in the sidecar's own Secret volume and never reach the
 * application. A non-loopback peer (a misconfigured listenHost) is refused.
 * The optional Unix-domain socket lives in a directory only the pod's own
 * containers mount (an emptyDir), so it is the same boundary: it is
 * world-writable inside it, as PostgreSQL's own socket is by default.
 */
import { randomInt } from 'node:crypto';
import { chmodSync, rmSync } from 'node:fs';
import { Socket, connect as netConnect, createServer, type AddressInfo, type Server } from 'node:net';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import type { Registry } from 'prom-client';
import { DEFAULT_MAX_MESSAGE_BYTES, PIN_REASONS, errorResponse, type PinReason } from '../core/protocol/index.ts';
import { AdminServer } from '../ops/admin-server.ts';
import type { BackendLedger } from './backend-ledger.ts';
import { ClientSession, type ClientSessionHost } from './client-session.ts';
import { DirectReadSocket, ReadBufferPool, adoptAcceptedSocket } from './direct-read-socket.ts';
import { adoptUnreadSocket, batchClock, socketDescriptor, type NativeSocketIo } from './native-socket.ts';
import type { ClientTls } from './client-tls.ts';
import type { CurrentText } from './mounted-file.ts';
import { SidecarMetrics } from './metrics.ts';
import { NotificationHub } from './notifications.ts';
import { Pool } from './pool.ts';
import { SERVER_KEEPALIVE, type CredentialsSource, type PoolMode, type SidecarSettings, type SidecarStatus } from './settings.ts';
import { SshTunnel } from './tunnel.ts';
import { steadyNow } from '../ops/clock.ts';

/** Constructor dependencies of the Sidecar. */
export interface SidecarDeps {
  settings: SidecarSettings;
  credentials: CredentialsSource;
  logger: Logger;
  metrics: Registry;
  /** Where the backends held are kept for the next sidecar in the pod (after a SIGKILL); absent: not kept. */
  ledger?: BackendLedger;
  /** Native socket I/O for plain TCP and Unix-domain connections (loadNativeSocketIo); absent: Node's streams. */
  nativeIo?: NativeSocketIo;
  /** Where the usernames the credentials held before are kept for the next sidecar in the pod; absent: this process only. */
  formerUsers?: { load(): string[]; save(users: readonly string[]): void };
  /** The SSH private key file for the bastion, read again when it changes; absent: settings.sshTunnel.privateKey. */
  sshPrivateKey?: CurrentText;
  /** The CA of the database server's certificate, checked for rotation at each server login; absent: settings.database.caPem. */
  databaseCa?: CurrentText;
  /** Accept TLS from apps that ask for it over TCP (selfSignedClientTls); absent: SSLRequest is answered "no", a direct TLS connection closed. */
  clientTls?: ClientTls;
}

/** True for 127.0.0.0/8, ::1 and IPv4-mapped loopback. */
export function isLoopbackAddress(address: string | undefined): boolean {
  if (address === undefined) return false;
  return address === '::1' || address.startsWith('127.') || address.startsWith('::ffff:127.');
}

const JANITOR_INTERVAL_MS = 1000;
/** Transaction-mode BackendKeyData pids start above any Linux pid (PID_MAX_LIMIT is 2^22). */
const FIRST_SYNTHETIC_PID = 2 ** 22;

/** The pooling sidecar. */
export class Sidecar implements ClientSessionHost {
  readonly pool: Pool;
  readonly metrics: SidecarMetrics;
  readonly logger: Logger;
  readonly mode: PoolMode;
  readonly maxMessageBytes: number;
  readonly loginTimeoutMs: number;
  readonly notifications: NotificationHub | undefined;
  private readonly settings: SidecarSettings;
  /** Client sockets accepted and not yet closed (logged in or not). */
  private clientSockets = 0;
  private readonly credentials: CredentialsSource;
  private readonly registry: Registry;
  private readonly tunnel: SshTunnel | undefined;
  /** Clients from their startup packet until they close. */
  private readonly sessions = new Set<ClientSession>();
  /** Logged-in clients by their BackendKeyData: process id, then secret (see register). */
  private readonly keys = new Map<number, Map<number, ClientSession>>();
  /** Client settings sets checked on the server: their values as SHOW prints them (bounded; an evicted set is checked again). */
  private readonly checkedSettings = new Map<string, ReadonlyMap<string, string>>();
  /** Read buffers of client and server sockets, reused across connections. */
  private readonly readBuffers = new ReadBufferPool();
  private readonly statusListeners = new Set<(s: SidecarStatus) => void>();
  private server: Server | undefined;
  private socketServer: Server | undefined;
  private admin: AdminServer | undefined;
  private janitorTimer: NodeJS.Timeout | undefined;
  private unsubscribeCredentials: (() => void) | undefined;
  private draining = false;
  private drained = false;
  private stopped = false;
  private statusScheduled = false;
  private lastStatus = '';
  private readonly ledger: BackendLedger | undefined;
  private readonly nativeIo: NativeSocketIo | undefined;
  private readonly clientTls: ClientTls | undefined;
  /** Usernames the credentials held earlier in this process's life (see expectedLogin). */
  private readonly formerUsers = new Set<string>();
  private readonly formerUsersStore: SidecarDeps['formerUsers'];

  constructor(deps: SidecarDeps) {
    this.nativeIo = deps.nativeIo;
    this.clientTls = deps.clientTls;
    this.formerUsersStore = deps.formerUsers;
    this.settings = deps.settings;
    this.credentials = deps.credentials;
    this.logger = deps.logger;
    this.registry = deps.metrics;
    this.mode = deps.settings.pool.mode;
    this.maxMessageBytes = deps.settings.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    this.loginTimeoutMs = (deps.settings.loginTimeout ?? 15) * 1000;
    this.metrics = new SidecarMetrics(deps.metrics);
    const tunnelSettings = deps.settings.sshTunnel;
    this.tunnel = tunnelSettings ? new SshTunnel({ settings: tunnelSettings, ...(deps.sshPrivateKey ? { privateKey: deps.sshPrivateKey } : {}), logger: deps.logger, metrics: this.metrics, onUpChange: (up) => {
      if (up) {
        this.pool.loginPathChanged();
        // The bastion answers again (a corrected host key, say): a login tells whether the database does.
        this.pool.recheckReachability(0);
      }
      this.statusChanged();
    }, onRefused: () => this.pool.loginPathRefused() }) : undefined;
    this.pool = new Pool({
      settings: deps.settings,
      credentials: () => this.credentials.current(),
      openStream: (host, port, deadline) => this.openStream(host, port, deadline),
      logger: deps.logger,
      metrics: this.metrics,
      // With native sockets, one clock reading per poll's batch of events.
      now: deps.nativeIo !== undefined ? batchClock(deps.nativeIo) : steadyNow,
      changed: () => this.statusChanged(),
      blockedReason: () => this.tunnel?.downReason(),
      refusedReason: () => this.tunnel?.refusedReason(),
      pinnedHolders: () => {
        const counts = new Map<string, number>();
        // In session mode every client keeps its server connection: pinning changes nothing there.
        if (this.mode !== 'transaction') return counts;
        for (const session of this.sessions) {
          const reason = session.pinReason;
          if (reason !== undefined && session.serverConnection !== undefined) counts.set(reason, (counts.get(reason) ?? 0) + 1);
        }
        return counts;
      },
      ...(deps.ledger ? { ledger: deps.ledger } : {}),
      ...(deps.databaseCa ? { databaseCa: () => deps.databaseCa!.current() } : {}),
    });
    this.ledger = deps.ledger;
    this.notifications = this.mode === 'transaction' ? new NotificationHub({ pool: this.pool, logger: deps.logger }) : undefined;
    this.metrics.bind({
      serverConnectionsByState: () => this.pool.countByState(),
      clientsActive: () => [...this.sessions].filter((s) => s.active).length,
      clientsWaiting: () => this.pool.waiting,
      clientsConnected: () => this.sessions.size,
      grant: () => ({ connections: this.pool.grant, generation: this.pool.grantGeneration, acknowledgedGeneration: this.pool.acknowledgedGeneration }),
      credentialsGeneration: () => this.credentials.current().generation,
      tunnelUp: () => this.tunnel?.up,
      serverReachable: () => this.pool.reachability,
      transactions: () => this.pool.transactions,
      pinnedClients: () => {
        const counts = Object.fromEntries(PIN_REASONS.map((r) => [r, 0])) as Record<PinReason, number>;
        for (const session of this.sessions) if (session.pinReason !== undefined) counts[session.pinReason] += 1;
        return counts;
      },
    });
  }

  /** Starts the tunnel, the listener, the janitor and the admin server. */
  async start(): Promise<{ port: number; adminPort?: number; socketPath?: string }> {
    // Before any client: backends a killed predecessor left count against the grant.
    if (this.ledger) this.pool.adoptLeftovers(this.ledger.load());
    this.tunnel?.start();
    let username = this.credentials.current().username;
    // An earlier sidecar of this pod may have seen the credentials name other users: the apps' PGUSER may still.
    for (const former of this.formerUsersStore?.load() ?? []) if (former !== username) this.formerUsers.add(former);
    this.unsubscribeCredentials = this.credentials.onChange((c) => {
      this.logger.info({ generation: c.generation }, 'new credentials: rotating server connections');
      // Alternating-user rotation (AWS Secrets Manager's, Vault's static roles): apps started earlier
      // still log in under the old name, from their PGUSER. They are served, as the new user.
      if (c.username !== username) {
        this.formerUsers.add(username);
        this.formerUsers.delete(c.username);
        this.formerUsersStore?.save([...this.formerUsers]);
        this.logger.info({ former: username, user: c.username }, 'the credentials name a new user: clients logging in as the former one are served as the new one');
        username = c.username;
      }
      this.pool.credentialsChanged();
    });
    this.janitorTimer = setInterval(() => this.pool.janitor(), JANITOR_INTERVAL_MS);
    this.janitorTimer.unref();
    // Paused so that accept() can move the connection to a DirectReadSocket before anything is read.
    const server = createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.accept(socket));
    this.server = server;
    const port = await new Promise<number>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.settings.listenPort, this.settings.listenHost, () => resolve((server.address() as AddressInfo).port));
    });
    const socketPath = this.settings.listenSocketDir === undefined ? undefined : await this.listenOnSocket(join(this.settings.listenSocketDir, `.s.PGSQL.${port}`));
    let adminPort: number | undefined;
    if (this.settings.admin) {
      this.admin = new AdminServer({ registry: this.registry, readiness: () => this.readiness(), healthy: () => !this.stopped });
      adminPort = await this.admin.listen(this.settings.admin.host, this.settings.admin.port);
    }
    this.logger.info({ port, socketPath, adminPort, mode: this.mode, tunnel: this.tunnel !== undefined }, 'sidecar listening');
    return { port, ...(adminPort === undefined ? {} : { adminPort }), ...(socketPath === undefined ? {} : { socketPath }) };
  }

  /** The Unix-domain listener; a socket file left by an earlier run of this container is replaced. */
  private async listenOnSocket(path: string): Promise<string> {
    rmSync(path, { force: true });
    const server = createServer({ pauseOnConnect: true }, (socket) => this.accept(socket, true));
    this.socketServer = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => resolve());
    });
    // Application containers may run as any user.
    chmodSync(path, 0o777);
    return path;
  }

  /** Applies a grant from the controller (PoolMember spec.grant). */
  setGrant(connections: number, generation: number): void {
    if (this.draining) {
      this.logger.info({ connections, generation }, 'grant ignored while draining');
      return;
    }
    this.pool.setGrant(connections, generation);
    this.notifications?.grantChanged(connections);
  }

  /**
   * Applies pool settings from a newer spec. Timeouts, lifetime and pre-ping
   * take effect at once (the pool reads them on each use); the pool mode and
   * the database target are fixed for the life of the process and are
   * reported as needing a restart.
   */
  updatePoolSettings(pool: SidecarSettings['pool']): { applied: string[]; needsRestart: string[] } {
    const current = this.settings.pool;
    const applied: string[] = [];
    const needsRestart: string[] = [];
    for (const key of ['poolTimeout', 'poolRecycle', 'poolPrePing', 'idleTimeout'] as const) {
      if (current[key] === pool[key]) continue;
      (current as Record<typeof key, number | boolean>)[key] = pool[key];
      applied.push(key);
    }
    if (applied.includes('poolTimeout')) this.pool.poolTimeoutChanged();
    if (pool.mode !== current.mode) needsRestart.push('mode');
    if (applied.length > 0) this.logger.info({ applied, pool: current }, 'pool settings updated in place');
    if (needsRestart.length > 0) this.logger.warn({ needsRestart }, 'pool settings that apply on the next restart of the pod');
    return { applied, needsRestart };
  }

  /** The bastion's host key from an updated DatabaseConnection: checked from the next SSH connection on. */
  updateTunnelHostKey(hostKey: string): void {
    this.tunnel?.setHostKey(hostKey);
    this.pool.loginPathChanged();
  }

  /** Subscribes to status changes; returns the unsubscribe function. */
  onStatus(listener: (s: SidecarStatus) => void): () => void {
    this.statusListeners.add(listener);
    return () => this.statusListeners.delete(listener);
  }

  /** Clients waiting for a server connection now. */
  get waitingClients(): number {
    return this.pool.waiting;
  }

  /** What PoolMember.status should say now. */
  status(): SidecarStatus {
    return {
      acknowledgedGeneration: this.pool.acknowledgedGeneration,
      acknowledgedConnections: this.drained ? 0 : this.pool.acknowledgedConnections,
      heldConnections: this.pool.held,
      credentialsGeneration: this.credentials.current().generation,
      draining: this.draining,
      drained: this.drained,
      ...(this.pool.reachability ? { databaseReachable: this.pool.reachability } : {}),
    };
  }

  /** Readiness for /readyz. */
  readiness(): { ready: boolean; reasons: string[] } {
    const reasons: string[] = [];
    if (this.server === undefined || !this.server.listening) reasons.push('not listening');
    if (this.draining) reasons.push('draining');
    if (this.tunnel !== undefined && !this.tunnel.up) reasons.push('SSH tunnel down');
    return { ready: reasons.length === 0, reasons };
  }

  /**
   * SIGTERM: stop accepting clients, let transactions in flight finish up to
   * drainTimeout, close server connections, report drained.
   */
  async drain(): Promise<void> {
    if (this.draining) return this.waitDrained();
    this.draining = true;
    this.logger.info({ clients: this.sessions.size, held: this.pool.held }, 'draining');
    this.statusChanged();
    this.server?.close();
    this.socketServer?.close();
    this.pool.beginDrain();
    for (const session of [...this.sessions]) session.drain();
    const deadline = steadyNow() + this.settings.drainTimeout * 1000;
    while (this.sessions.size > 0 && steadyNow() < deadline) await new Promise((r) => setTimeout(r, 50));
    for (const session of [...this.sessions]) session.forceClose();
    this.pool.closeAll('drain');
    await this.pool.whenEmpty();
    this.tunnel?.stop();
    this.drained = true;
    this.logger.info('drained');
    this.statusChanged();
  }

  /** Closes everything at once (after drain, or in tests). */
  async close(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.draining = true;
    this.server?.close();
    this.socketServer?.close();
    for (const session of [...this.sessions]) session.forceClose();
    this.pool.closeAll('shutdown');
    await Promise.race([this.pool.whenEmpty(), new Promise((r) => setTimeout(r, 3000))]);
    this.tunnel?.stop();
    if (this.janitorTimer) clearInterval(this.janitorTimer);
    this.unsubscribeCredentials?.();
    await this.admin?.close();
  }

  // ---- ClientSessionHost --------------------------------------------------

  /** The login clients must use. */
  expectedLogin(): { user: string; formerUsers: ReadonlySet<string>; database: string } {
    return { user: this.credentials.current().username, formerUsers: this.formerUsers, database: this.settings.database.dbname };
  }

  /** True once drain() began. */
  isDraining(): boolean {
    return this.draining;
  }

  /** A client that sent its startup packet: counted, drained and closed with the others from now on. */
  admit(session: ClientSession): void {
    this.sessions.add(session);
  }

  /**
   * Gives a session its BackendKeyData at the end of its login. With
   * `backend` (session mode: the server connection the client keeps for its
   * whole session) the process id is that backend's, so PQbackendPID,
   * pg_backend_pid(), a NOTIFY's sender and pg_terminate_backend agree, as
   * direct; without (transaction mode: no fixed backend) it is a random one
   * no other client of this sidecar has. The secret is always the sidecar's
   * own, never the server's: a CancelRequest comes to the sidecar, which
   * forwards the server's real key itself.
   * (A random pid is drawn above FIRST_SYNTHETIC_PID, so it names no live backend.)
   *
   * Keys are (process id, secret), as in the protocol, so two clients never
   * share one: two live backends of one server never share a pid, and one
   * backend serves one session client at a time (a released connection goes
   * to the next client only after its last one was unregistered). Should the
   * server behind the configured host change while clients of the old one
   * live (a failover), a pid can come back from the new server: then the two
   * clients still see their own backend's pid and differ by secret.
   */
  register(session: ClientSession, backend?: { readonly processId: number; readonly secretKey: number }): [number, number] {
    let processId: number;
    if (backend === undefined) {
      // Above Linux's largest pid (PID_MAX_LIMIT, 2^22): pg_terminate_backend of it can hit no backend.
      do processId = randomInt(FIRST_SYNTHETIC_PID, 2 ** 31 - 1);
      while (this.keys.has(processId));
    } else {
      processId = backend.processId;
      if (this.keys.has(processId)) this.logger.warn({ backend: processId }, 'a backend pid another client of this sidecar was given: the server behind the configured host changed');
    }
    let bySecret = this.keys.get(processId);
    if (bySecret === undefined) this.keys.set(processId, (bySecret = new Map<number, ClientSession>()));
    let secretKey: number;
    do secretKey = randomInt(-(2 ** 31), 2 ** 31 - 1);
    while (bySecret.has(secretKey) || secretKey === backend?.secretKey);
    bySecret.set(secretKey, session);
    return [processId, secretKey];
  }

  /** Forgets a closed session. */
  unregister(session: ClientSession): void {
    this.notifications?.unlisten(session, '*');
    this.sessions.delete(session);
    const key = session.backendKey;
    if (key === undefined) return;
    const bySecret = this.keys.get(key[0]);
    if (bySecret?.get(key[1]) !== session) return;
    bySecret.delete(key[1]);
    if (bySecret.size === 0) this.keys.delete(key[0]);
  }

  /**
   * Forwards a CancelRequest to the server connection running the client's
   * statement, only while that statement runs; `done` once PostgreSQL took
   * it, or at once when there is nothing to cancel or the statement still
   * waits in the sidecar (see ClientSession.cancelQueued).
   */
  cancel(processId: number, secretKey: Buffer, done: () => void): void {
    const session = secretKey.length === 4 ? this.keys.get(processId)?.get(secretKey.readInt32BE(0)) : undefined;
    if (session === undefined) {
      this.metrics.error('cancel');
      this.metrics.cancels.inc({ result: 'dropped' });
      this.logger.info('CancelRequest for an unknown session ignored');
      done();
      return;
    }
    const target = session.cancelTarget();
    if (target === undefined) {
      // Its statement still waits in the sidecar: answered now as cancelled, or cancelled once sent (cancelForwarded);
      // either way the request is taken now.
      const outcome = session.cancelQueued();
      if (outcome === 'answered') this.metrics.cancels.inc({ result: 'answered' });
      else if (outcome === 'nothing') this.metrics.cancels.inc({ result: 'dropped' });
      done();
      return;
    }
    this.forwardCancel(target, done);
  }

  /** Cancels the statement `session` has just sent (a CancelRequest came while it waited in the sidecar). */
  cancelForwarded(session: ClientSession): void {
    const target = session.cancelTarget();
    if (target === undefined) this.metrics.cancels.inc({ result: 'dropped' });
    else this.forwardCancel(target, () => undefined);
  }

  private forwardCancel(target: NonNullable<ReturnType<ClientSession['cancelTarget']>>, done: () => void): void {
    this.pool.cancelStatement(target.server, target.stillRunning).then((sent) => this.metrics.cancels.inc({ result: sent ? 'forwarded' : 'dropped' }), (err: Error) => {
      this.metrics.error('cancel');
      this.metrics.cancels.inc({ result: 'dropped' });
      this.logger.warn({ err: err.message }, 'forwarding CancelRequest failed');
    }).finally(done);
  }

  /** Values of a checked client settings set. */
  shownSettings(key: string): ReadonlyMap<string, string> | undefined {
    return this.checkedSettings.get(key);
  }

  /** Remembers a checked client settings set (the oldest is forgotten past 1,000). */
  rememberSettings(key: string, shown: ReadonlyMap<string, string>): void {
    if (this.checkedSettings.size >= 1000) this.checkedSettings.delete(this.checkedSettings.keys().next().value!);
    this.checkedSettings.set(key, shown);
  }

  /** Counts a pinned client. */
  pinned(reason: PinReason): void {
    this.metrics.pinned.inc({ reason });
  }

  /** Counts a client unpinned. */
  unpinned(reason: PinReason): void {
    this.metrics.unpinned.inc({ reason });
  }

  // ---- internals ----------------------------------------------------------

  /** A new client; `local`: it came through the Unix-domain socket (the pod's own volume). */
  private accept(socket: Socket, local = false): void {
    if (!local && !isLoopbackAddress(socket.remoteAddress)) {
      socket.resume();
      this.metrics.error('client-auth');
      this.logger.warn({ peer: socket.remoteAddress }, 'refusing a non-loopback client');
      socket.end(errorResponse({ severity: 'FATAL', code: '28000', message: 'the poolkeeper sidecar accepts loopback clients only' }));
      return;
    }
    if (this.draining) {
      socket.resume();
      socket.end(errorResponse({ severity: 'FATAL', code: '57P03', message: 'the poolkeeper sidecar is draining' }));
      return;
    }
    if (this.clientSockets >= (this.settings.maxClientConnections ?? 2000)) {
      socket.resume();
      this.metrics.error('too-many-clients');
      socket.end(errorResponse({ severity: 'FATAL', code: '53300', message: 'sorry, too many clients already', hint: 'the poolkeeper sidecar serves at most maxClientConnections clients at once' }));
      return;
    }
    // Clients copy their reads out of one shared buffer: an idle or half-open client costs no read buffer of its own.
    const io = this.nativeIo;
    const adopted = (io !== undefined ? adoptUnreadSocket(io, socket, { buffers: this.readBuffers, copyReads: true }) : undefined) ??
      adoptAcceptedSocket(socket, this.readBuffers, { copyReads: true });
    this.clientSockets += 1;
    adopted.once('close', () => (this.clientSockets -= 1));
    // As PostgreSQL: no TLS over a Unix-domain socket.
    new ClientSession(adopted, this, local || this.clientTls === undefined ? {} : { tls: this.clientTls });
  }

  private openStream(host: string, port: number, deadline: number): Promise<Duplex> {
    if (this.tunnel) return this.tunnel.open(host, port, deadline);
    return new Promise((resolve, reject) => {
      // Plaintext only: a TLS wrap must keep reading through the stream interface.
      const { sslMode } = this.settings.database;
      const plain = sslMode === 'disable' || sslMode === 'allow';
      const io = plain ? this.nativeIo : undefined;
      let socket: Socket;
      if (io !== undefined) {
        // Connected while paused, so that nothing is read before the native side takes the connection over.
        socket = new Socket().pause().setNoDelay(true);
        socket.connect({ host, port });
      } else socket = plain ? new DirectReadSocket({ buffers: this.readBuffers }).setNoDelay(true).connect({ host, port }) : netConnect({ host, port, noDelay: true });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connecting to ${host}:${port} timed out`));
      }, Math.max(1, deadline - steadyNow()));
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.off('error', onError);
        this.keepAlive(socket);
        resolve((io !== undefined ? adoptUnreadSocket(io, socket, { buffers: this.readBuffers }) : undefined) ?? socket.resume());
      });
      const onError = (err: Error): void => {
        clearTimeout(timer);
        reject(new Error(`connecting to ${host}:${port} failed: ${err.message}`));
      };
      socket.once('error', onError);
    });
  }

  /**
   * A server connection's TCP keepalives and user timeout (SERVER_KEEPALIVE):
   * set on the socket itself, so they hold for the native side's duplicate
   * and under TLS. Without the native module, Node's keepalives only (its
   * probe interval and count are libuv's: 1 s, 10).
   */
  private keepAlive(socket: Socket): void {
    const { idleSeconds, intervalSeconds, count, userTimeoutMs } = this.settings.serverKeepalive ?? SERVER_KEEPALIVE;
    const fd = socketDescriptor(socket);
    const failed = this.nativeIo !== undefined && fd !== undefined ? this.nativeIo.tcpKeepalive(fd, idleSeconds, intervalSeconds, count, userTimeoutMs) : undefined;
    if (failed === 0) return;
    if (failed !== undefined) this.logger.warn({ errno: failed }, 'setting TCP keepalives on a server connection failed; using Node\'s');
    socket.setKeepAlive(true, idleSeconds * 1000);
  }

  private waitDrained(): Promise<void> {
    return new Promise((resolve) => {
      if (this.drained) return resolve();
      const off = this.onStatus((s) => {
        if (s.drained) {
          off();
          resolve();
        }
      });
    });
  }

  /** Coalesces status changes into one notification per tick, and only when something changed. */
  private statusChanged(): void {
    if (this.statusScheduled) return;
    this.statusScheduled = true;
    queueMicrotask(() => {
      this.statusScheduled = false;
      const status = this.status();
      const key = JSON.stringify(status);
      if (key === this.lastStatus) return;
      this.lastStatus = key;
      for (const listener of this.statusListeners) listener(status);
    });
  }
}
