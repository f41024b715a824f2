/**
 * From a server's configuration to the limit the planner divides.
 */
import type { ConnectionCap } from './types.ts';

/** PostgreSQL settings that bound ordinary logins. */
export interface ServerSettings {
  maxConnections: number;
  superuserReservedConnections: number;
  /** PostgreSQL 16+ `reserved_connections`; 0 or absent before. */
  reservedConnections?: number | undefined;
  /** The login role's CONNECTION LIMIT (`pg_roles.rolconnlimit`); absent: none, or a superuser (exempt). */
  roleConnectionLimit?: number | undefined;
  /** The database's CONNECTION LIMIT (`pg_database.datconnlimit`); absent: none, or a superuser (exempt). */
  databaseConnectionLimit?: number | undefined;
  /**
   * The login's TCP keepalive settings as its session sees them (`tcp_keepalives_idle`,
   * `_interval`, `_count`, in seconds; 0 on a Unix socket), and `tcp_user_timeout` (ms):
   * how soon PostgreSQL gives up on a peer that vanished.
   */
  keepalives?: { idle: number; interval: number; count: number; userTimeoutMs: number } | undefined;
  /**
   * Present when what answers at the address is a connection pooler, not
   * PostgreSQL itself: the backend the login was announced (BackendKeyData)
   * is not the one that ran its statements (`pg_backend_pid()`).
   */
  pooler?: PoolerFinding | undefined;
}

/** What the login saw of a connection pooler in front of the server. */
export interface PoolerFinding {
  /**
   * True once it was seen to pool by transaction: one client connection's
   * statements ran on two backends, or two client connections' on one.
   * False: not seen (session pooling, or a transaction pooler that happened
   * to keep the same backend).
   */
  transactionPooling: boolean;
}

/**
 * Seconds after which PostgreSQL drops an idle connection whose peer vanished
 * (a lost node), by its keepalives; undefined when they say nothing (a Unix
 * socket, or keepalives the kernel does not report).
 */
export function deadPeerSeconds(keepalives: ServerSettings['keepalives']): number | undefined {
  if (!keepalives || keepalives.idle <= 0 || keepalives.interval <= 0 || keepalives.count <= 0) return undefined;
  return keepalives.idle + keepalives.interval * keepalives.count;
}

/**
 * A warning when a lost pod's connections may outlive `departureHoldSeconds`
 * (its reservation would then be granted again while PostgreSQL still has
 * them), naming the settings that shorten it; undefined when the hold covers it.
 */
export function departureHoldAdvice(keepalives: ServerSettings['keepalives'], holdSeconds: number, role: string): string | undefined {
  const dead = deadPeerSeconds(keepalives);
  if (holdSeconds <= 0 || dead === undefined || dead <= holdSeconds) return undefined;
  const idle = Math.max(1, Math.floor(holdSeconds / 3));
  role = /^[a-z_][a-z0-9_$]*$/.test(role) ? role : `"${role.replaceAll('"', '""')}"`;
  const interval = Math.max(1, Math.floor((holdSeconds - idle) / 6));
  const settings = `ALTER ROLE ${role} SET tcp_keepalives_idle = ${idle}; ALTER ROLE ${role} SET tcp_keepalives_interval = ${interval}; ALTER ROLE ${role} SET tcp_keepalives_count = 3; ALTER ROLE ${role} SET tcp_user_timeout = ${(idle + interval * 3) * 1000};`;
  return `PostgreSQL drops the connections of a lost node's pods after about ${dead} s here (tcp_keepalives_idle ${keepalives!.idle} + tcp_keepalives_interval ${keepalives!.interval} x tcp_keepalives_count ${keepalives!.count}), longer than departureHoldSeconds ${holdSeconds}: until it does, they could be granted again and new pods refused with 53300. Shorten it for the role (${settings}) or raise departureHoldSeconds to ${dead}.`;
}

/**
 * The strictest CONNECTION LIMIT on the login (its role's or its
 * database's), with what sets it; undefined when neither has one. Every
 * connection of that role (or to that database) counts against it, wherever
 * it comes from, so a fleet granted more is refused with SQLSTATE 53300
 * ("too many connections for role") however far below max_connections.
 */
export function loginConnectionCap(settings: ServerSettings): LoginCap | undefined {
  return loginConnectionCaps(settings).reduce<LoginCap | undefined>((low, c) => (low === undefined || c.limit < low.limit ? c : low), undefined);
}

/** Every CONNECTION LIMIT on the login: its role's and its database's, each shared with other logins of that role or to that database. */
export function loginConnectionCaps(settings: ServerSettings): LoginCap[] {
  const caps: LoginCap[] = [];
  if (settings.roleConnectionLimit !== undefined && settings.roleConnectionLimit >= 0) caps.push({ limit: settings.roleConnectionLimit, of: 'role' });
  if (settings.databaseConnectionLimit !== undefined && settings.databaseConnectionLimit >= 0) caps.push({ limit: settings.databaseConnectionLimit, of: 'database' });
  return caps;
}

/**
 * The caps the planner keeps a connection's pods within, one per CONNECTION
 * LIMIT of its login, less the reserve (which applies to such a limit as to
 * max_connections). Keyed by role or database name, so every
 * DatabaseConnection of the same role (or database) on the server shares it.
 */
export function connectionCaps(caps: readonly LoginCap[], login: { role: string; database: string }, reserve: number | string): ConnectionCap[] {
  return caps.map((cap) => ({
    key: cap.of === 'role' ? `role ${login.role}` : `database ${login.database}`,
    limit: resolveLimit(cap.limit, reserve).effective,
  }));
}

/** A CONNECTION LIMIT that binds a login, and whether its role's or its database's. */
export interface LoginCap {
  limit: number;
  of: 'role' | 'database';
}

/** The discovered, reserved and effective limit of one DatabaseConnection (status.limit). */
export interface ResolvedLimit {
  discovered: number;
  reserve: number;
  effective: number;
}

/** Identifies a server: DatabaseConnections with the same key share one limit. */
export function serverKey(database: { host: string; port: number }): string {
  // Host names are case-insensitive; a trailing dot is the same name.
  const host = database.host.toLowerCase().replace(/\.$/, '');
  return host.includes(':') ? `[${host}]:${database.port}` : `${host}:${database.port}`;
}

/** What `maxConnections: auto` means: the slots an ordinary role can use. */
export function autoMaxConnections(settings: ServerSettings): number {
  return Math.max(0, settings.maxConnections - settings.superuserReservedConnections - (settings.reservedConnections ?? 0));
}

/** Connections kept free: an integer as is, a percent of `discovered` rounded up (keeps at least that much free). */
export function reservedConnections(discovered: number, reserve: number | string): number {
  if (typeof reserve === 'number') return Math.max(0, Math.floor(reserve));
  const percent = /^(\d{1,2})%$/.exec(reserve);
  if (!percent) throw new Error(`reserve must be an integer or a percent, got ${JSON.stringify(reserve)}`);
  return Math.ceil((discovered * Number(percent[1])) / 100);
}

/** discovered - reserve, never below 0. */
export function resolveLimit(discovered: number, reserve: number | string): ResolvedLimit {
  const reserved = Math.min(discovered, reservedConnections(discovered, reserve));
  return { discovered, reserve: reserved, effective: discovered - reserved };
}

/** The limit of a server shared by several DatabaseConnections: the strictest of their effective limits. */
export function sharedLimit(effectiveLimits: readonly number[]): number {
  return effectiveLimits.length === 0 ? 0 : Math.min(...effectiveLimits);
}
