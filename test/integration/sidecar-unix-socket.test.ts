/**
 * The sidecar's Unix-domain socket (listenSocketDir): libpq clients given the
 * directory as their host reach it, in transaction mode, next to the
 * loopback TCP listener; a socket file left by an earlier run is replaced,
 * and the file is writable by any user (application containers run as
 * their own UIDs).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { testEnvironment } from '../support/hooks.ts';
import { Sidecar, StaticCredentialsSource } from '../../src/sidecar/index.ts';
import { credentialsGeneration } from '../../src/core/credentials.ts';
import { nativeIoDeps } from '../support/sidecar-fixture.ts';

const env = testEnvironment();

function run(command: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { timeout: 60_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${command} ${args.join(' ')}: ${stderr || err.message}`));
      else resolve(stdout);
    });
  });
}

describe('sidecar Unix-domain socket', () => {
  let sidecar: Sidecar;
  let dir: string;
  let port: number;
  let socketPath: string | undefined;

  before(async () => {
    const postgres = await env.postgres();
    dir = mkdtempSync(join(tmpdir(), 'poolkeeper-socket-'));
    chmodSync(dir, 0o755);
    // What a sidecar that died without cleaning up leaves in the shared volume, for a port we pick ourselves.
    const probe = new Sidecar(settingsFor(postgres, dir, 0));
    port = (await probe.start()).port;
    await probe.close();
    writeFileSync(join(dir, `.s.PGSQL.${port}`), 'stale');
    sidecar = new Sidecar(settingsFor(postgres, dir, port));
    ({ socketPath } = await sidecar.start());
    sidecar.setGrant(2, 1);
  });

  after(async () => {
    await sidecar.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('listens on <dir>/.s.PGSQL.<port>, replacing a stale file, writable by anyone', () => {
    assert.equal(socketPath, join(dir, `.s.PGSQL.${port}`));
    const stat = statSync(socketPath);
    assert.ok(stat.isSocket(), 'a socket, not the stale regular file');
    assert.equal(stat.mode & 0o777, 0o777);
  });

  it('serves psql and pgbench over the socket, and TCP still', async () => {
    const psql = (host: string, sql: string): Promise<string> => run('/usr/bin/psql', ['-h', host, '-p', String(port), '-U', 'app', '-d', 'app', '-X', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-c', sql]);
    assert.equal((await psql(dir, 'SELECT 40 + 2')).trim(), '42');
    assert.equal((await psql('127.0.0.1', 'SELECT 40 + 2')).trim(), '42');
    const table = `unix_${Date.now().toString(36)}`;
    await psql(dir, `CREATE TABLE ${table} (n int)`);
    try {
      await psql(dir, `BEGIN; INSERT INTO ${table} VALUES (1), (2); COMMIT;`);
      assert.equal((await psql(dir, `SELECT sum(n) FROM ${table}`)).trim(), '3');
      const script = join(dir, 'bench.sql');
      writeFileSync(script, `\\set n random(1, 100)\nSELECT :n;\nINSERT INTO ${table} VALUES (:n);\n`);
      const output = await run('/usr/bin/pgbench', ['-h', dir, '-p', String(port), '-U', 'app', '-n', '-M', 'prepared', '-f', script, '-c', '4', '-t', '50', 'app']);
      assert.match(output, /number of transactions actually processed: 200\/200/);
      assert.equal((await psql(dir, `SELECT count(*) FROM ${table}`)).trim(), '202');
    } finally {
      await psql(dir, `DROP TABLE ${table}`);
    }
  });

  it('serves node-postgres given the directory as host (extended protocol, named statements)', async () => {
    const client = new pg.Client({ host: dir, port, user: 'app', database: 'app' });
    await client.connect();
    try {
      for (let i = 0; i < 3; i += 1) {
        const res = await client.query<{ n: number }>({ name: 'unix-add', text: 'SELECT $1::int + 1 AS n', values: [i] });
        assert.equal(res.rows[0]?.n, i + 1);
      }
    } finally {
      await client.end();
    }
  });

  it('removes the socket file when it closes', async () => {
    const postgres = await env.postgres();
    const other = mkdtempSync(join(tmpdir(), 'poolkeeper-socket-'));
    const second = new Sidecar(settingsFor(postgres, other, 0));
    const started = await second.start();
    assert.ok(started.socketPath !== undefined && existsSync(started.socketPath));
    await second.close();
    assert.equal(existsSync(started.socketPath), false);
    rmSync(other, { recursive: true, force: true });
  });
});

function settingsFor(postgres: { host: string; port: number; app: { user: string; password: string } }, dir: string, listenPort: number): ConstructorParameters<typeof Sidecar>[0] {
  const { app } = postgres;
  return {
    settings: {
      listenHost: '127.0.0.1', listenPort, listenSocketDir: dir,
      database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable' },
      pool: { mode: 'transaction', poolTimeout: 10, poolRecycle: 3600, poolPrePing: true, idleTimeout: 600 },
      drainTimeout: 1,
    },
    credentials: new StaticCredentialsSource({ username: app.user, password: app.password, generation: credentialsGeneration({ username: app.user, password: app.password }) }),
    logger: pino({ level: 'silent' }),
    metrics: new Registry(),
    ...nativeIoDeps(),
  };
}
