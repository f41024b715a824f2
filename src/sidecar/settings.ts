/**
 * What the sidecar is told: where the database is, how to reach it, how to
 * pool, and the credentials it logs in with. Durations are in seconds, as in
 * the PoolMember spec.
 */

/** TLS to the server, with libpq's sslmode meanings ('allow' is treated as plaintext first, never TLS). */
export type SslMode = 'disable' | 'allow' | 'prefer' | 'require' | 'verify-ca' | 'verify-full';

/** Pooling mode: a server connection per transaction (default) or per client session. */
export type PoolMode = 'transaction' | 'session';

/** Everything the sidecar needs to run, except credentials and the grant. */
export interface SidecarSettings {
  listenHost: string;
  /** 0 picks a free port (tests). */
  listenPort: number;
  /**
   * Also listen on a Unix-domain socket in this directory, named as libpq
   * looks for it (`.s.PGSQL.<listen port>`), so that clients given the
   * directory as their host skip loopback TCP. Omitted: TCP only.
   */
  listenSocketDir?: string;
  /** `channelBinding` as libpq's channel_binding (default prefer). */
  database: { host: string; port: number; dbname: string; sslMode: SslMode; channelBinding?: ChannelBindingMode | undefined; caPem?: string };
  sshTunnel?: {
    host: string;
    port: number;
    user: string;
    /** OpenSSH private key text. */
    privateKey: string;
    /** `ssh-ed25519 AAAA...` public key line, or a `SHA256:...` fingerprint. */
    hostKey: string;
  };
  pool: {
    mode: PoolMode;
    /** Longest a client waits for a server connection before SQLSTATE 53300. */
    poolTimeout: number;
    /** Lifetime of a server connection; older ones close when next idle. */
    poolRecycle: number;
    /** Check a connection that sat idle before handing it out. */
    poolPrePing: boolean;
    /** Idle server connections older than this (idle time) are closed. */
    idleTimeout: number;
  };
  /** Longest the drain waits for transactions in flight. */
  drainTimeout: number;
  /** Largest accepted protocol message (default 64 MiB). */
  maxMessageBytes?: number;
  /**
   * Named prepared statements each server connection keeps (transaction mode;
   * least recently used ones are closed past this; PgBouncer's max_prepared_statements plays the same role). Default 1000.
   */
  maxPreparedStatements?: number;
  /** Admin HTTP server (/metrics, /healthz, /readyz); omitted: none. Port 0 picks a free one. */
  admin?: { host: string; port: number };
  /** Idle time after which poolPrePing checks a connection (default 1 s). */
  prePingAfterIdle?: number;
  /** Seconds a new client has to send its startup packet (default 15, as PgBouncer's client_login_timeout is a bound too). */
  loginTimeout?: number;
  /** Client connections served at once; more are refused with 53300 "too many clients" (default 2,000: at about 20 KB per idle client, the sidecar stays within its 128Mi limit). */
  maxClientConnections?: number;
  /**
   * When a server connection whose database host stopped answering (powered
   * off, a cut network) is given up: TCP keepalives after `idleSeconds` of
   * silence, every `intervalSeconds`, `count` of them, and data unacknowledged
   * for `userTimeoutMs` (TCP_USER_TIMEOUT). Default SERVER_KEEPALIVE.
   */
  serverKeepalive?: ServerKeepalive;
}

/** TCP keepalive settings of server connections (see SidecarSettings.serverKeepalive). */
export interface ServerKeepalive {
  idleSeconds: number;
  intervalSeconds: number;
  count: number;
  userTimeoutMs: number;
}

/**
 * A database host that stops answering is given up within about 30 s, a
 * statement waiting on it or not: without this a statement in flight waits
 * for hours (keepalives off, or after two idle hours by the kernel's
 * defaults) or about fifteen minutes of retransmissions, and its server
 * connection is held from the pool all that time. A long statement is not
 * cut: the database host's kernel answers the probes while it runs.
 */
export const SERVER_KEEPALIVE: ServerKeepalive = { idleSeconds: 10, intervalSeconds: 5, count: 4, userTimeoutMs: 30_000 };

/** A login for the upstream server. */
export interface Credentials {
  username: string;
  password: string;
  /** credentialsGeneration() over the Secret's data. */
  generation: string;
}

/** Where the current credentials come from, and news of their change. */
export interface CredentialsSource {
  current(): Credentials;
  /** Calls `listener` on each change; returns the unsubscribe function. */
  onChange(listener: (credentials: Credentials) => void): () => void;
}

/**
 * Whether the sidecar can reach and log in to the database, as of its last
 * change: reachable after a login that succeeded, unreachable after one that
 * failed while no server connection was live.
 */
export interface DatabaseReachability {
  reachable: boolean;
  /** CamelCase: LoggedIn, LoginFailed (the server answered with an error), ConnectionFailed, TunnelFailed. */
  reason: string;
  /** The cause, for humans: SQLSTATE and the server's message, or the connection's or tunnel's error. Never a secret. */
  message: string;
  /** When it last changed (ms since the epoch). */
  since: number;
}

/** The sidecar's report for PoolMember.status. */
export interface SidecarStatus {
  acknowledgedGeneration: number;
  acknowledgedConnections: number;
  heldConnections: number;
  credentialsGeneration: string;
  draining: boolean;
  drained: boolean;
  /** Absent before the first login. */
  databaseReachable?: DatabaseReachability | undefined;
}import type { ChannelBindingMode } from '../core/protocol/index.ts';

