/**
 * `maxConnections: auto`: asks the server for `max_connections`,
 * `superuser_reserved_connections` and (PostgreSQL 16+) `reserved_connections`,
 * and the CONNECTION LIMIT of the login's role and database,
 * logging in with the DatabaseConnection's credentials, and whether a
 * connection pooler answers in PostgreSQL's place. Answers are cached
 * per server so a rebalance does not open a connection each time.
 */
import type { Duplex } from 'node:stream';
import { TLSSocket, type ConnectionOptions } from 'node:tls';
import pg from 'pg';
import type { Logger } from 'pino';
import { Registry } from 'prom-client';
import type { PoolerFinding, ServerSettings } from '../core/budget/index.ts';
import { chooseSaslMethod, unboundLoginRefusal, type ChannelBindingMode } from '../core/protocol/index.ts';
import { SidecarMetrics } from '../sidecar/metrics.ts';
import { SshTunnel, type TunnelSettings } from '../sidecar/tunnel.ts';
import { steadyNow } from '../ops/clock.ts';

/** Where and as whom to ask. */
export interface DiscoveryTarget {
  serverKey: string;
  host: string;
  port: number;
  dbname: string;
  sslMode: string;
  /** libpq's channel_binding (default prefer). */
  channelBinding?: ChannelBindingMode | undefined;
  username: string;
  password: string;
  /** CA of the server's certificate, for verify-ca and verify-full with a private CA. */
  caPem?: string;
  /** Reach the server through this bastion (the same host-key check as the sidecar's). */
  tunnel?: TunnelSettings;
}

/**
 * node-postgres TLS options for a libpq sslmode. `allow` is plaintext (libpq
 * tries it first); `prefer` starts with TLS and `discover` falls back.
 */
export function tlsOptions(sslMode: string, caPem?: string): ConnectionOptions | false {
  const ca = caPem ? { ca: caPem } : {};
  switch (sslMode) {
    case 'disable':
    case 'allow':
      return false;
    case 'prefer':
    case 'require':
      return { rejectUnauthorized: false };
    case 'verify-ca':
      // The chain is checked, the name is not.
      return { ...ca, rejectUnauthorized: true, checkServerIdentity: () => undefined };
    default:
      return { ...ca, rejectUnauthorized: true };
  }
}

/** The parts of node-postgres's connection that carry the authentication requests. */
interface PgConnection {
  stream: Duplex;
  on(event: 'authenticationCleartextPassword' | 'authenticationMD5Password' | 'authenticationOk', listener: () => void): void;
  on(event: 'authenticationSASL', listener: (message: { mechanisms: string[] }) => void): void;
}

/**
 * Makes a node-postgres client keep channelBinding `require` as libpq does:
 * registered before the client's own handlers, these end the connection
 * before any password goes out when the server asks for md5 or a cleartext
 * password, offers no SCRAM-SHA-256-PLUS over TLS, or lets it in without a
 * binding. Returns the refusal, if one ended the connection.
 */
export function refuseUnboundLogins(client: pg.Client, mode: ChannelBindingMode): () => Error | undefined {
  let refusal: Error | undefined;
  if (mode !== 'require') return () => undefined;
  const connection = (client as unknown as { connection: PgConnection }).connection;
  let bound = false;
  const refuse = (message: string | undefined): void => {
    if (message === undefined || refusal !== undefined) return;
    refusal = new Error(message);
    connection.stream.destroy();
  };
  connection.on('authenticationCleartextPassword', () => refuse(unboundLoginRefusal(mode, 'a cleartext password')));
  connection.on('authenticationMD5Password', () => refuse(unboundLoginRefusal(mode, 'md5')));
  connection.on('authenticationSASL', (message) => {
    const choice = chooseSaslMethod(message.mechanisms, connection.stream instanceof TLSSocket, mode);
    if ('refused' in choice) refuse(choice.refused);
    else bound = choice.mechanism === 'SCRAM-SHA-256-PLUS';
  });
  connection.on('authenticationOk', () => {
    if (!bound) refuse(unboundLoginRefusal(mode, 'no password (trust)'));
  });
  return () => refusal;
}

/** node-postgres expects a socket; an SSH channel is a Duplex that is already connected. */
export function channelAsSocket(channel: Duplex): Duplex {
  const socket = Object.assign(channel, {
    setNoDelay: () => socket,
    setKeepAlive: () => socket,
    connect: () => {
      process.nextTick(() => channel.emit('connect'));
      return socket;
    },
  });
  return socket;
}

/** An idle login kept open (LimitDiscovery.hold). */
export interface HeldLogin {
  /** Resolves when the login ended other than by close(): the server restarted, or the way to it broke. */
  lost: Promise<void>;
  close(): Promise<void>;
}

/** What a login is for: `bounded`, its statements fail after the connect timeout; `held`, kept open idle (TCP keepalives on). */
interface LoginKind {
  bounded?: boolean;
  held?: boolean;
}

/** Options of the discovery cache. */
export interface LimitDiscoveryOptions {
  /** How long an answer is reused. */
  cacheMs?: number;
  connectTimeoutMs?: number;
  logger: Logger;
}

/** Reads and caches server connection limits. */
export class LimitDiscovery {
  private readonly cache = new Map<string, { at: number; settings: ServerSettings }>();
  /** Addresses seen pooling by transaction: it is not seen every time, and a verdict that flips would rewrite status. */
  private readonly transactionPoolers = new Set<string>();
  private readonly cacheMs: number;
  private readonly connectTimeoutMs: number;
  private readonly logger: Logger;

  constructor(options: LimitDiscoveryOptions) {
    this.cacheMs = options.cacheMs ?? 60_000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 5_000;
    this.logger = options.logger;
  }

  /** The server's settings, from cache when fresh. */
  async discover(target: DiscoveryTarget, now = steadyNow()): Promise<ServerSettings> {
    const cached = this.cache.get(target.serverKey);
    if (cached && now - cached.at < this.cacheMs) return cached.settings;
    const settings = await this.check(target);
    this.cache.set(target.serverKey, { at: now, settings });
    this.logger.info({ server: target.serverKey, ...settings }, 'discovered server connection limit');
    return settings;
  }

  /**
   * Logs in as `target` says (never from cache: this is the check of one
   * DatabaseConnection's credentials and database) and reads the settings.
   * Throws the driver's error (with the server's SQLSTATE in `code`).
   */
  async check(target: DiscoveryTarget): Promise<ServerSettings> {
    const tunnel = this.openTunnel(target);
    try {
      const { client, ssl } = await this.connect(target, tunnel, {});
      return await this.read(target, client, () => this.login(target, ssl, tunnel, { bounded: true }));
    } finally {
      tunnel?.stop();
    }
  }

  /** The bastion to reach `target` through, started; undefined without one. */
  private openTunnel(target: DiscoveryTarget): SshTunnel | undefined {
    if (!target.tunnel) return undefined;
    const tunnel = new SshTunnel({ settings: target.tunnel, logger: this.logger, metrics: new SidecarMetrics(new Registry()) });
    tunnel.start();
    return tunnel;
  }

  /**
   * Logs in with libpq's sslmode semantics, `prefer` included (TLS when the
   * server offers it, plaintext when it does not); returns the client and the
   * TLS options that worked.
   */
  private async connect(target: DiscoveryTarget, tunnel: SshTunnel | undefined, kind: LoginKind): Promise<{ client: pg.Client; ssl: ConnectionOptions | false }> {
    const ssl = tlsOptions(target.sslMode, target.caPem);
    try {
      return { client: await this.login(target, ssl, tunnel, kind), ssl };
    } catch (err) {
      if (target.sslMode !== 'prefer' || !/does not support SSL/i.test(err instanceof Error ? err.message : '')) throw err;
      return { client: await this.login(target, false, tunnel, kind), ssl: false };
    }
  }

  /** Reads the settings through `client` (ended after); `another` logs in once more, to tell how a pooler pools. */
  private async read(target: DiscoveryTarget, client: pg.Client, another: () => Promise<pg.Client>): Promise<ServerSettings> {
    try {
      const rows = (await client.query<{ name: string; setting: string; pid: number }>(
        "SELECT name, setting, pg_backend_pid() AS pid FROM pg_settings WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections')",
      )).rows;
      const value = (name: string): number | undefined => {
        const row = rows.find((r) => r.name === name);
        return row ? Number(row.setting) : undefined;
      };
      // CONNECTION LIMIT of the role and of the database bind this login too (superusers are exempt; -1 is none).
      const login = (await client.query<{ rolconnlimit: number; rolsuper: boolean; datconnlimit: number; pid: number }>(
        'SELECT r.rolconnlimit, r.rolsuper, d.datconnlimit, pg_backend_pid() AS pid FROM pg_roles r CROSS JOIN pg_database d WHERE r.rolname = current_user AND d.datname = current_database()',
      )).rows[0];
      const cap = (n: number | undefined): number | undefined => (login === undefined || login.rolsuper || n === undefined || n < 0 ? undefined : n);
      // SHOW gives what the socket uses (the kernel's default when a setting is 0), with the role's settings applied.
      const alive = (await client.query<{ idle: string; interval: string; count: string; user_timeout: string; pid: number }>(
        "SELECT current_setting('tcp_keepalives_idle') AS idle, current_setting('tcp_keepalives_interval') AS interval, current_setting('tcp_keepalives_count') AS count, current_setting('tcp_user_timeout') AS user_timeout, pg_backend_pid() AS pid",
      )).rows[0];
      const keepalives = alive ? { idle: Number(alive.idle), interval: Number(alive.interval), count: Number(alive.count), userTimeoutMs: Number(alive.user_timeout) } : undefined;
      const pooler = await this.poolerFinding(target, client, [rows[0]?.pid, login?.pid, alive?.pid], another);
      return {
        maxConnections: value('max_connections') ?? 0,
        superuserReservedConnections: value('superuser_reserved_connections') ?? 0,
        reservedConnections: value('reserved_connections'),
        ...(cap(login?.rolconnlimit) === undefined ? {} : { roleConnectionLimit: cap(login?.rolconnlimit) }),
        ...(cap(login?.datconnlimit) === undefined ? {} : { databaseConnectionLimit: cap(login?.datconnlimit) }),
        ...(keepalives && Object.values(keepalives).every(Number.isFinite) ? { keepalives } : {}),
        ...(pooler ? { pooler } : {}),
      };
    } finally {
      await client.end().catch(() => undefined);
    }
  }

  /**
   * Logs in as `target` says; throws the driver's error, or the refusal of an
   * unbound login.
   */
  private async login(target: DiscoveryTarget, ssl: ConnectionOptions | false, tunnel: SshTunnel | undefined, { bounded = false, held = false }: LoginKind): Promise<pg.Client> {
    const stream = tunnel ? channelAsSocket(await tunnel.open(target.host, target.port, steadyNow() + this.connectTimeoutMs)) : undefined;
    const channelBinding = target.channelBinding ?? 'prefer';
    const client = new pg.Client({
      host: target.host, port: target.port, database: target.dbname, user: target.username, password: target.password,
      ssl, connectionTimeoutMillis: this.connectTimeoutMs, ...(bounded ? { query_timeout: this.connectTimeoutMs } : {}),
      ...(held ? { keepAlive: true, keepAliveInitialDelayMillis: 30_000 } : {}), application_name: held ? 'poolkeeper-controller-watch' : 'poolkeeper-controller',
      enableChannelBinding: channelBinding !== 'disable',
      ...(stream ? { stream: () => stream } : {}),
    });
    const unbound = refuseUnboundLogins(client, channelBinding);
    try {
      await client.connect();
    } catch (error) {
      await client.end().catch(() => undefined);
      throw unbound() ?? error;
    }
    return client;
  }

  /**
   * Whether a connection pooler answers instead of PostgreSQL: PostgreSQL
   * announces the backend that serves the connection (BackendKeyData), a
   * pooler its own key. When it does, whether it pools by transaction: the
   * login's statements (each a transaction) ran on different backends, or a
   * second login's statement ran on the backend the first one just used,
   * which a session pooler never lends to another client while the first is
   * connected (a transaction pooler such as PgBouncer lends its most recently
   * freed backend first). The second login waits at most the connect timeout:
   * a session pooler with every backend taken makes it queue.
   */
  private async poolerFinding(target: DiscoveryTarget, client: pg.Client, seen: ReadonlyArray<number | undefined>, another: () => Promise<pg.Client>): Promise<PoolerFinding | undefined> {
    const announcedPid = (client as unknown as { processID: number | null }).processID;
    const backendPids = new Set(seen.filter((pid): pid is number => typeof pid === 'number'));
    if (announcedPid === null || backendPids.size === 0 || [...backendPids].every((pid) => pid === announcedPid)) return undefined;
    const address = JSON.stringify([target.host, target.port, target.tunnel?.host ?? null, target.tunnel?.port ?? null]);
    if (!this.transactionPoolers.has(address) && (backendPids.size > 1 || await this.sharesBackend(another, [...backendPids][0]!))) this.transactionPoolers.add(address);
    return { transactionPooling: this.transactionPoolers.has(address) };
  }

  /** Whether another login's statement runs on `backendPid`, the backend the first login just used. */
  private async sharesBackend(another: () => Promise<pg.Client>, backendPid: number): Promise<boolean> {
    try {
      const second = await another();
      try {
        return (await second.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]?.pid === backendPid;
      } finally {
        await second.end().catch(() => undefined);
      }
    } catch (err) {
      this.logger.debug({ err: err instanceof Error ? err.message : String(err) }, 'a second login, to tell how the pooler pools, failed');
      return false;
    }
  }

  /**
   * A login held open, idle, as `target` says (through its bastion when it
   * has one), so that its end tells the server went away: a restart (which
   * may change max_connections), a failover, a host gone (TCP keepalives
   * after 30 s idle find a rebooted host). `lost` resolves when it ends other
   * than by `close()`.
   */
  async hold(target: DiscoveryTarget): Promise<HeldLogin> {
    const tunnel = this.openTunnel(target);
    let client: pg.Client;
    try {
      ({ client } = await this.connect(target, tunnel, { held: true }));
    } catch (err) {
      tunnel?.stop();
      throw err;
    }
    let closing = false;
    const ended = new Promise<void>((resolve) => {
      client.on('end', () => resolve());
      // An idle client's socket error is emitted, not thrown: without a listener it would end the process.
      client.on('error', () => resolve());
    });
    void ended.then(() => tunnel?.stop());
    return {
      lost: ended.then(() => {
        if (closing) return new Promise<void>(() => undefined);
        return undefined;
      }),
      close: async () => {
        closing = true;
        await client.end().catch(() => undefined);
        tunnel?.stop();
      },
    };
  }

  /** Drops a cached answer (e.g. after the spec changed). */
  forget(serverKey: string): void {
    this.cache.delete(serverKey);
  }

  /** Records settings read by `check`, so `discover` for the same server answers from them. */
  remember(serverKey: string, settings: ServerSettings, now = steadyNow()): void {
    this.cache.set(serverKey, { at: now, settings });
  }
}
