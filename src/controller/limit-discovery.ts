/**
 * `maxConnections: auto`: asks the server for `max_connections`,
 * `superuser_reserved_connections` and (PostgreSQL 16+) `reserved_connections`,
 * logging in with the DatabaseConnection's credentials. Answers are cached
 * per server so a rebalance does not open a connection each time.
 */
import pg from 'pg';
import type { Logger } from 'pino';
import type { ServerSettings } from '../core/budget/index.ts';

/** Where and as whom to ask. */
export interface DiscoveryTarget {
  serverKey: string;
  host: string;
  port: number;
  dbname: string;
  sslMode: string;
  username: string;
  password: string;
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
  private readonly cacheMs: number;
  private readonly connectTimeoutMs: number;
  private readonly logger: Logger;

  constructor(options: LimitDiscoveryOptions) {
    this.cacheMs = options.cacheMs ?? 60_000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 5_000;
    this.logger = options.logger;
  }

  /** The server's settings, from cache when fresh. */
  async discover(target: DiscoveryTarget, now = Date.now()): Promise<ServerSettings> {
    const cached = this.cache.get(target.serverKey);
    if (cached && now - cached.at < this.cacheMs) return cached.settings;
    const ssl = target.sslMode === 'disable' || target.sslMode === 'allow' || target.sslMode === 'prefer'
      ? false
      : { rejectUnauthorized: target.sslMode === 'verify-ca' || target.sslMode === 'verify-full' };
    const client = new pg.Client({
      host: target.host, port: target.port, database: target.dbname, user: target.username, password: target.password,
      ssl, connectionTimeoutMillis: this.connectTimeoutMs, application_name: 'poolkeeper-controller',
    });
    await client.connect();
    try {
      const rows = (await client.query<{ name: string; setting: string }>(
        "SELECT name, setting FROM pg_settings WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections')",
      )).rows;
      const value = (name: string): number | undefined => {
        const row = rows.find((r) => r.name === name);
        return row ? Number(row.setting) : undefined;
      };
      const settings: ServerSettings = {
        maxConnections: value('max_connections') ?? 0,
        superuserReservedConnections: value('superuser_reserved_connections') ?? 0,
        reservedConnections: value('reserved_connections'),
      };
      this.cache.set(target.serverKey, { at: now, settings });
      this.logger.info({ server: target.serverKey, ...settings }, 'discovered server connection limit');
      return settings;
    } finally {
      await client.end().catch(() => undefined);
    }
  }

  /** Drops a cached answer (e.g. after the spec changed). */
  forget(serverKey: string): void {
    this.cache.delete(serverKey);
  }
}
