/**
 * PgBouncer from Debian in front of the throwaway PostgreSQL, the reference
 * pooler that benchmarks compare the sidecar with.
 */
import { chownSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import { ManagedProcess, freePort, waitUntil, type PidRegistry } from './process.ts';
import { APP_DATABASE, type PostgresServer } from './postgres.ts';
import { commandOutput, requireBinary, serviceAccount } from './system.ts';

/** Pool settings that a benchmark may choose. */
export interface PgBouncerOptions {
  poolMode: 'session' | 'transaction';
  defaultPoolSize: number;
}

/** A running PgBouncer. */
export class PgBouncerServer {
  readonly host = '127.0.0.1';
  readonly port: number;
  private readonly postgres: PostgresServer;
  private readonly binary: string;
  private readonly process: ManagedProcess;

  private constructor(port: number, postgres: PostgresServer, binary: string, child: ManagedProcess) {
    this.port = port;
    this.postgres = postgres;
    this.binary = binary;
    this.process = child;
  }

  /** Writes the config and auth file and starts PgBouncer in the foreground. */
  static async start(runDir: string, registry: PidRegistry, postgres: PostgresServer, options: PgBouncerOptions = { poolMode: 'transaction', defaultPoolSize: 20 }): Promise<PgBouncerServer> {
    const binary = requireBinary('pgbouncer', 'pgbouncer', ['/usr/sbin/pgbouncer']);
    const account = serviceAccount();
    const dir = join(runDir, options.poolMode === 'transaction' ? 'pgbouncer' : `pgbouncer-${options.poolMode}`);
    mkdirSync(dir, { recursive: true });
    const port = await freePort();
    const authFile = join(dir, 'userlist.txt');
    const quote = (s: string): string => `"${s.replace(/"/g, '""')}"`;
    writeFileSync(authFile, `${quote(postgres.app.user)} ${quote(postgres.app.password)}\n`, { mode: 0o600 });
    const config = join(dir, 'pgbouncer.ini');
    writeFileSync(config, [
      '[databases]',
      `${APP_DATABASE} = host=${postgres.host} port=${postgres.port} dbname=${APP_DATABASE}`,
      '',
      '[pgbouncer]',
      `listen_addr = 127.0.0.1`,
      `listen_port = ${port}`,
      "unix_socket_dir =",
      'auth_type = scram-sha-256',
      `auth_file = ${authFile}`,
      `pool_mode = ${options.poolMode}`,
      `default_pool_size = ${options.defaultPoolSize}`,
      'max_client_conn = 2000',
      'ignore_startup_parameters = extra_float_digits',
      `logfile = ${join(dir, 'pgbouncer-internal.log')}`,
      'admin_users = ',
      '',
    ].join('\n'));
    if (account) {
      for (const path of [dir, authFile, config]) chownSync(path, account.uid, account.gid);
    }
    const child = ManagedProcess.start({
      name: 'pgbouncer',
      command: binary,
      args: [config],
      logFile: join(dir, 'pgbouncer.log'),
      ...(account ? { uid: account.uid, gid: account.gid } : {}),
    }, registry);
    const server = new PgBouncerServer(port, postgres, binary, child);
    await waitUntil('pgbouncer', () => server.healthy(), { timeoutMs: 15_000, process: child });
    return server;
  }

  /** False once the process has exited (PgBouncer 1.18 ends itself on some clients: see environment.ts). */
  get running(): boolean {
    return this.process.running;
  }

  /** node-postgres settings for the application role through PgBouncer. */
  clientConfig(): pg.ClientConfig {
    return { host: this.host, port: this.port, user: this.postgres.app.user, password: this.postgres.app.password, database: APP_DATABASE };
  }

  /** `PgBouncer 1.x.y`. */
  version(): string {
    return commandOutput(this.binary, ['--version']).split('\n')[0] ?? 'unknown';
  }

  /** True if `SELECT 1` works through the pooler. */
  async healthy(): Promise<boolean> {
    const client = new pg.Client(this.clientConfig());
    await client.connect();
    try {
      const res = await client.query<{ ok: number }>('SELECT 1 AS ok');
      return res.rows[0]?.ok === 1;
    } finally {
      await client.end();
    }
  }

  /** Stops PgBouncer. */
  stop(): Promise<void> {
    return this.process.stop(3000);
  }
}
