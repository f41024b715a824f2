/**
 * The sidecar against the real PostgreSQL and sshd: psql, pgbench and
 * node-postgres through it, in both pooling modes; the grant as a hard cap
 * under load; shrink, grow, rotation, tunnel loss, host keys, fuzzing.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { connect as netConnect, createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { testEnvironment } from '../support/hooks.ts';
import { FileCredentialsSource, Sidecar, type PoolMode, type SidecarSettings } from '../../src/sidecar/index.ts';
import type { SidecarDeps } from '../../src/sidecar/sidecar.ts';
import type { PostgresRole, PostgresServer } from '../../src/devenv/postgres.ts';
import { buildStartupMessage } from '../../src/core/protocol/index.ts';
import { nativeIoDeps } from '../support/sidecar-fixture.ts';
import { MountedFile, type CurrentText } from '../../src/sidecar/mounted-file.ts';
import { StateFile } from '../../src/sidecar/state-file.ts';
import { SshTunnel, sshPrivateKeyKind } from '../../src/sidecar/tunnel.ts';
import { steadyNow } from '../../src/ops/clock.ts';
import { stepWallClock } from '../support/wall-clock.ts';
import { SidecarMetrics } from '../../src/sidecar/metrics.ts';

const env = testEnvironment();
const logger = pino({ level: process.env.SIDECAR_TEST_LOG ?? 'silent' });

interface Running {
  sidecar: Sidecar;
  port: number;
  adminPort: number;
  registry: Registry;
  credentialsDir: string;
  credentials: FileCredentialsSource;
  client(): pg.Client;
  stop(): Promise<void>;
}

function writeCredentials(dir: string, role: PostgresRole): void {
  writeFileSync(join(dir, 'username'), role.user);
  writeFileSync(join(dir, 'password'), role.password);
}

async function startSidecar(postgres: PostgresServer, options: { mode?: PoolMode; grant?: number; role?: PostgresRole; pool?: Partial<SidecarSettings['pool']>; tunnel?: SidecarSettings['sshTunnel']; sshPrivateKey?: CurrentText; formerUsers?: SidecarDeps['formerUsers']; drainTimeout?: number; dbname?: string; databasePort?: number } = {}): Promise<Running> {
  const role = options.role ?? postgres.app;
  const credentialsDir = mkdtempSync(join(tmpdir(), 'poolkeeper-creds-'));
  writeCredentials(credentialsDir, role);
  const credentials = new FileCredentialsSource({ directory: credentialsDir, logger, pollIntervalMs: 200 });
  const registry = new Registry();
  const settings: SidecarSettings = {
    listenHost: '127.0.0.1', listenPort: 0,
    database: { host: postgres.host, port: options.databasePort ?? postgres.port, dbname: options.dbname ?? 'app', sslMode: 'prefer' },
    pool: { mode: options.mode ?? 'transaction', poolTimeout: 10, poolRecycle: 1800, poolPrePing: true, idleTimeout: 600, ...options.pool },
    drainTimeout: options.drainTimeout ?? 5,
    admin: { host: '127.0.0.1', port: 0 },
    ...(options.tunnel ? { sshTunnel: options.tunnel } : {}),
  };
  const sidecar = new Sidecar({ settings, credentials, logger, metrics: registry, ...nativeIoDeps(), ...(options.sshPrivateKey ? { sshPrivateKey: options.sshPrivateKey } : {}), ...(options.formerUsers ? { formerUsers: options.formerUsers } : {}) });
  const { port, adminPort } = await sidecar.start();
  sidecar.setGrant(options.grant ?? 5, 1);
  return {
    sidecar, port, adminPort: adminPort!, registry, credentialsDir, credentials,
    client: () => new pg.Client({ host: '127.0.0.1', port, user: role.user, database: options.dbname ?? 'app' }),
    stop: async () => {
      await sidecar.close();
      rmSync(credentialsDir, { recursive: true, force: true });
    },
  };
}

/** One client holding the sidecar's only server connection in a transaction, and another logged in behind it. */
async function grantHeld(running: Running): Promise<{ holder: pg.Client; waiter: pg.Client }> {
  const holder = running.client();
  await holder.connect();
  await holder.query('BEGIN');
  const waiter = running.client();
  waiter.on('error', () => undefined);
  await waiter.connect();
  return { holder, waiter };
}

async function withClient<T>(running: Running, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = running.client();
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

function run(command: string, args: string[], envVars: Record<string, string> = {}, input?: string): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = execFile(command, args, { env: { ...process.env, ...envVars }, timeout: 60_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${command} failed: ${err.message}\n${stderr}`));
      else resolve({ stdout, stderr });
    });
    if (input !== undefined) child.stdin?.end(input);
  });
}

/**
 * Backends of `user` started since this file began: the sidecars' (PgBouncer,
 * started by earlier test files, keeps older ones; clients' application_name
 * shows on the sidecar's backends, so it cannot tell them apart).
 */
const SIDECAR_BACKENDS = "SELECT count(*) AS n FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend' AND backend_start >= $2";
/** When the describe block that counts began (set in its before hook; files load before any test runs). */
let fileStart = new Date();
async function backendsOf(postgres: PostgresServer, user: string): Promise<number> {
  const rows = await postgres.query<{ n: string }>(SIDECAR_BACKENDS, [user, fileStart]);
  return Number(rows[0]!.n);
}

async function waitFor(what: string, predicate: () => boolean | Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await predicate()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}

describe('sidecar', function () {
  let postgres: PostgresServer;
  before(async function () {
    postgres = await env.postgres();
  });

  for (const mode of ['transaction', 'session'] as const) {
    describe(`${mode} mode`, function () {
      let running: Running;
      before(async function () {
        running = await startSidecar(postgres, { mode });
      });
      after(async function () {
        await running.stop();
      });

      it('runs simple and parameterized (extended protocol) queries from node-postgres', async function () {
        await withClient(running, async (c) => {
          assert.equal((await c.query<{ one: number }>('SELECT 1 AS one')).rows[0]!.one, 1);
          const res = await c.query<{ s: string; u: string }>('SELECT $1::text || $2::text AS s, current_user AS u', ['po', 'ol']);
          assert.deepEqual(res.rows[0], { s: 'pool', u: 'app' });
        });
      });

      it('keeps a transaction on one server connection and survives errors inside it', async function () {
        await withClient(running, async (c) => {
          await c.query('BEGIN');
          const pid1 = (await c.query<{ p: number }>('SELECT pg_backend_pid() AS p')).rows[0]!.p;
          await assert.rejects(c.query('SELECT 1/0'), /division by zero/);
          await assert.rejects(c.query('SELECT 1'), /current transaction is aborted/);
          await c.query('ROLLBACK');
          await c.query('BEGIN');
          await c.query('CREATE TEMP TABLE t (x int) ON COMMIT DROP');
          await c.query('INSERT INTO t VALUES ($1), ($2)', [1, 2]);
          const pid2 = (await c.query<{ p: number }>('SELECT pg_backend_pid() AS p')).rows[0]!.p;
          assert.equal((await c.query<{ n: string }>('SELECT count(*) AS n FROM t')).rows[0]!.n, '2');
          await c.query('COMMIT');
          assert.ok(pid1 > 0 && pid2 > 0);
        });
      });

      it('runs psql, COPY in and out, through the sidecar', async function () {
        const table = `copy_${mode}_${randomBytes(3).toString('hex')}`;
        const psql = (sql: string, input?: string) => run('/usr/bin/psql', ['-h', '127.0.0.1', '-p', String(running.port), '-U', 'app', '-d', 'app', '-X', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-c', sql], {}, input);
        await psql(`CREATE TABLE ${table} (id int, name text)`);
        await psql(`COPY ${table} FROM STDIN WITH (FORMAT csv)`, '1,one\n2,two\n3,three\n');
        const out = await psql(`COPY (SELECT * FROM ${table} ORDER BY id) TO STDOUT WITH (FORMAT csv)`);
        assert.equal(out.stdout, '1,one\n2,two\n3,three\n');
        const version = await psql('SELECT current_setting(\'server_version_num\')::int >= 150000');
        assert.equal(version.stdout.trim(), 't');
        await psql(`DROP TABLE ${table}`);
      });

      it('runs pgbench through the sidecar', async function () {
        const scale = ['-h', '127.0.0.1', '-p', String(running.port), '-U', 'app', 'app'];
        await run('/usr/bin/pgbench', ['-i', '-s', '1', '-q', ...scale]);
        // Session mode holds a server connection per client: stay within the grant of 5.
        const clients = mode === 'session' ? 4 : 8;
        const { stdout } = await run('/usr/bin/pgbench', ['-S', '-c', String(clients), '-t', '200', '-n', ...scale]);
        assert.match(stdout, new RegExp(`number of transactions actually processed: ${clients * 200}/${clients * 200}`));
      });
    });
  }
});

/** Runs `iterations` short transactions on a fresh client; returns errors seen. */
async function churn(running: Running, iterations: number, errors: Error[]): Promise<void> {
  const client = running.client();
  try {
    await client.connect();
    for (let i = 0; i < iterations; i += 1) {
      await client.query('BEGIN');
      await client.query('SELECT $1::int AS i, pg_backend_pid()', [i]);
      await client.query('COMMIT');
    }
  } catch (error) {
    errors.push(error as Error);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** Samples the backends of `user` until stopped; returns the maximum seen. */
function sampleBackends(postgres: PostgresServer, user: string): { stop(): Promise<number> } {
  let max = 0;
  let running = true;
  const loop = (async () => {
    const observer = new pg.Client(postgres.clientConfig());
    await observer.connect();
    try {
      // Bounded: at most 2000 samples.
      for (let i = 0; running && i < 2000; i += 1) {
        const rows = await observer.query<{ n: string }>(SIDECAR_BACKENDS, [user, fileStart]);
        max = Math.max(max, Number(rows.rows[0]!.n));
        await new Promise((r) => setTimeout(r, 10));
      }
    } finally {
      await observer.end();
    }
  })();
  return {
    stop: async () => {
      running = false;
      await loop;
      return max;
    },
  };
}

describe('sidecar budget and lifecycle', function () {
  before(function () {
    fileStart = new Date();
  });

  let postgres: PostgresServer;
  before(async function () {
    postgres = await env.postgres();
  });

  it('serves 200 concurrent clients on a grant of 5 (md5 login) with never more than 5 backends', async function () {
    const running = await startSidecar(postgres, { role: postgres.appMd5, grant: 5, pool: { poolTimeout: 60 } });
    try {
      const sampler = sampleBackends(postgres, 'app_md5');
      const errors: Error[] = [];
      await Promise.all(Array.from({ length: 200 }, () => churn(running, 5, errors)));
      const max = await sampler.stop();
      assert.deepEqual(errors.map((e) => e.message), []);
      assert.ok(max <= 5, `saw ${max} backends`);
      assert.ok(max >= 1, 'the sampler saw the load');
      assert.equal(running.sidecar.status().heldConnections <= 5, true);
      const metrics = await (await fetch(`http://127.0.0.1:${running.adminPort}/metrics`)).text();
      assert.match(metrics, /poolkeeper_sidecar_transactions_total \d+/);
      assert.match(metrics, /poolkeeper_sidecar_client_wait_seconds_count \d+/);
      assert.match(metrics, /poolkeeper_sidecar_server_connections\{state="idle"\} \d/);
      assert.match(metrics, /poolkeeper_sidecar_grant_connections 5/);
    } finally {
      await running.stop();
    }
  });

  it('shrinks and grows the grant under load, acknowledging each generation when it holds', async function () {
    const running = await startSidecar(postgres, { grant: 6 });
    const statuses: number[] = [];
    running.sidecar.onStatus((s) => statuses.push(s.acknowledgedGeneration));
    try {
      const errors: Error[] = [];
      const load = Promise.all(Array.from({ length: 30 }, () => churn(running, 40, errors)));
      await waitFor('6 server connections', () => running.sidecar.status().heldConnections === 6);
      running.sidecar.setGrant(2, 2);
      await waitFor('shrink acknowledged', () => running.sidecar.status().acknowledgedGeneration === 2);
      assert.ok(running.sidecar.status().heldConnections <= 2);
      assert.ok(await backendsOf(postgres, 'app') <= 2 + 0, 'backends above the shrunk grant');
      running.sidecar.setGrant(4, 3);
      await waitFor('grow acknowledged', () => running.sidecar.status().acknowledgedGeneration === 3);
      await load;
      assert.deepEqual(errors.map((e) => e.message), []);
      assert.deepEqual(running.sidecar.status().acknowledgedConnections, 4);
      assert.ok(statuses.includes(2) && statuses.includes(3));
    } finally {
      await running.stop();
    }
  });

  it('rotates credentials under load (ALTER ROLE then new files) with zero client errors', async function () {
    const running = await startSidecar(postgres, { grant: 4 });
    const original = postgres.app.password;
    const rotated = randomBytes(12).toString('base64url');
    try {
      const before = running.sidecar.status().credentialsGeneration;
      const errors: Error[] = [];
      const load = Promise.all(Array.from({ length: 20 }, () => churn(running, 60, errors)));
      await waitFor('connections in use', () => running.sidecar.status().heldConnections > 0);
      const rotatedAt = (await postgres.query<{ t: Date }>('SELECT now() AS t'))[0]!.t;
      await postgres.query(`ALTER ROLE app PASSWORD '${rotated}'`);
      writeCredentials(running.credentialsDir, { user: 'app', password: rotated });
      await waitFor('new generation', () => running.sidecar.status().credentialsGeneration !== before);
      await load;
      assert.deepEqual(errors.map((e) => e.message), []);
      // Every backend now serving the sidecar logged in after the rotation.
      await withClient(running, (c) => c.query('SELECT 1'));
      const old = await postgres.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND backend_start < $1 AND backend_start >= $2", [rotatedAt, fileStart]);
      assert.equal(old[0]!.n, '0');
    } finally {
      await postgres.query(`ALTER ROLE app PASSWORD '${original}'`);
      await running.stop();
    }
  });

  it('credentials that name a new user (alternating-user rotation): apps still logging in under the former name are served as the new user', async function () {
    // The pod's state directory: a sidecar restarted after the rotation still knows the former name.
    const stateDir = mkdtempSync(join(tmpdir(), 'poolkeeper-state-'));
    const usersFile = new StateFile({ path: join(stateDir, 'former-users.json'), what: 'former usernames', logger });
    const formerUsers = { load: (): string[] => (usersFile.read() as string[] | undefined) ?? [], save: (users: readonly string[]): void => usersFile.write(users) };
    let running = await startSidecar(postgres, { grant: 2, formerUsers });
    const asUser = async (user: string): Promise<string> => {
      const client = new pg.Client({ host: '127.0.0.1', port: running.port, user, database: 'app' });
      await client.connect();
      try {
        return (await client.query<{ u: string }>('SELECT current_user AS u')).rows[0]!.u;
      } finally {
        await client.end();
      }
    };
    try {
      assert.equal(await asUser('app'), 'app');
      const before = running.sidecar.status().credentialsGeneration;
      writeCredentials(running.credentialsDir, postgres.appMd5);
      await waitFor('new generation', () => running.sidecar.status().credentialsGeneration !== before);
      // The app's PGUSER still names the former user: served, as the user the credentials name now.
      assert.equal(await asUser('app'), postgres.appMd5.user);
      assert.equal(await asUser(postgres.appMd5.user), postgres.appMd5.user);
      // A name the credentials never held is still refused.
      await assert.rejects(asUser('someone_else'), (e: { code?: string; message: string }) => e.code === '28000' && /role "someone_else" is not served by this sidecar/.test(e.message));
      // The sidecar restarts (a crash, an OOM kill) with the new credentials: the former name is still served.
      await running.stop();
      running = await startSidecar(postgres, { grant: 2, role: postgres.appMd5, formerUsers });
      assert.equal(await asUser('app'), postgres.appMd5.user);
      // Rotating back: the current name is never "former".
      const again = running.sidecar.status().credentialsGeneration;
      writeCredentials(running.credentialsDir, postgres.app);
      await waitFor('new generation', () => running.sidecar.status().credentialsGeneration !== again);
      assert.equal(await asUser(postgres.appMd5.user), 'app');
      assert.equal(await asUser('app'), 'app');
    } finally {
      await running.stop();
      rmSync(stateDir, { recursive: true, force: true });
    }
  });

  it('times out a client beyond capacity with SQLSTATE 53300 and a clean close', async function () {
    const running = await startSidecar(postgres, { grant: 1, pool: { poolTimeout: 1 } });
    try {
      const { holder, waiter } = await grantHeld(running);
      await assert.rejects(waiter.query('SELECT 1'), (e: { code?: string; message: string }) => e.code === '53300' && /within 1 s/.test(e.message));
      await holder.query('COMMIT');
      await holder.end();
      await withClient(running, (c) => c.query('SELECT 1'));
    } finally {
      await running.stop();
    }
  });

  it('names the clients pinned by session state in the 53300 of a client that waited for the grant they keep (transaction mode)', async function () {
    const running = await startSidecar(postgres, { grant: 2, pool: { poolTimeout: 1 } });
    const pinned = [running.client(), running.client()];
    try {
      for (const [i, c] of pinned.entries()) {
        await c.connect();
        // As ActiveRecord's get_advisory_lock, kept: pinned while it holds the lock.
        await c.query(`SELECT pg_try_advisory_lock(${424_200 + i})`);
      }
      const waiter = running.client();
      waiter.on('error', () => undefined);
      await waiter.connect();
      const failure = await waiter.query('SELECT 1').then(() => undefined, (e: { code?: string; message: string }) => e);
      await waiter.end().catch(() => undefined); // closed by the server after the FATAL
      assert.ok(failure, 'the query waited past poolTimeout and must fail');
      assert.equal(failure.code, '53300', failure.message);
      assert.match(failure.message, /all 2 granted server connections are busy, 2 of them kept by clients pinned to them by session state \(advisory-lock 2\) until those clients disconnect/);
      await pinned[0]!.end();
      assert.deepEqual((await withClient(running, (c) => c.query('SELECT 1 AS one'))).rows, [{ one: 1 }]);
    } finally {
      await Promise.all(pinned.map((c) => c.end().catch(() => undefined)));
      await running.stop();
    }
  });

  it('lets a client pinned by a session advisory lock go once its backend holds none, and keeps pinned one that holds a lock or left other session state (transaction mode)', async function () {
    const running = await startSidecar(postgres, { grant: 2, pool: { poolTimeout: 2 } });
    const [locker, tryer, other] = [running.client(), running.client(), running.client()];
    const metric = async (name: string): Promise<number> => Number(new RegExp(`reason="advisory-lock"} (\\d+)`).exec(await running.registry.getSingleMetricAsString(name))?.[1] ?? Number.NaN);
    try {
      for (const c of [locker, tryer, other]) await c.connect();
      // As ActiveRecord's get_advisory_lock: literal SQL through exec_params, an unnamed Parse; the lock is taken.
      assert.deepEqual((await locker.query('SELECT pg_try_advisory_lock($1::bigint) AS got', [424_300])).rows, [{ got: true }]);
      // Another client's try fails: pinned by it, then let go (its backend holds no lock), asked before its next statement runs.
      assert.deepEqual((await tryer.query('SELECT pg_try_advisory_lock(424300) AS got')).rows, [{ got: false }]);
      await tryer.query('SELECT 1');
      assert.equal(await metric('poolkeeper_sidecar_unpins_total'), 1);
      // The holder's next statements run on its own connection, which holds the lock: it stays pinned.
      assert.deepEqual((await locker.query('SELECT $1::int AS one', [1])).rows, [{ one: 1 }]);
      assert.equal(await metric('poolkeeper_sidecar_pinned_clients'), 1);
      assert.deepEqual((await other.query('SELECT pg_try_advisory_lock(424300) AS got')).rows, [{ got: false }], 'the lock is still the holder\'s');
      await other.query('SELECT 1');
      // Released (as release_advisory_lock; its unnamed statement locks, so the question waits for the next one), then the next statements.
      assert.deepEqual((await locker.query('SELECT pg_advisory_unlock($1::bigint) AS released', [424_300])).rows, [{ released: true }]);
      assert.deepEqual((await locker.query('SELECT $1::int AS one', [1])).rows, [{ one: 1 }]);
      await locker.query('SELECT 1');
      assert.equal(await metric('poolkeeper_sidecar_pinned_clients'), 0);
      assert.equal(await metric('poolkeeper_sidecar_unpins_total'), 3);
      // Both server connections serve others now: two transactions at once, while every client stays connected.
      await Promise.all([tryer, other].map((c) => c.query('BEGIN')));
      await Promise.all([tryer, other].map((c) => c.query('SELECT pg_sleep(0.1)')));
      await Promise.all([tryer, other].map((c) => c.query('COMMIT')));
      // Nothing of the lock is left on the connection it used: another client takes it.
      assert.deepEqual((await tryer.query('SELECT pg_try_advisory_lock(424300) AS got')).rows, [{ got: true }]);
      assert.deepEqual((await tryer.query('SELECT pg_advisory_unlock_all()')).rows, [{ pg_advisory_unlock_all: '' }]);
      await tryer.query('SELECT 1');
      // A setting beside the lock in one Query: pinned for good, the setting stays the client's.
      await other.query("SELECT pg_advisory_lock(424301); SET work_mem = '2MB'");
      await other.query('SELECT pg_advisory_unlock(424301)');
      await other.query('SELECT 1');
      assert.equal(await metric('poolkeeper_sidecar_pinned_clients'), 1);
      assert.deepEqual((await other.query('SHOW work_mem')).rows, [{ work_mem: '2MB' }]);
      assert.equal(await metric('poolkeeper_sidecar_unpins_total'), 4);
    } finally {
      await Promise.all([locker, tryer, other].map((c) => c.end().catch(() => undefined)));
      await running.stop();
    }
  });

  it('times a waiting client out after poolTimeout when the node\'s wall clock steps back an hour meanwhile (NTP, a resumed VM), and recycles nothing when it steps forward', async function () {
    const running = await startSidecar(postgres, { grant: 1, pool: { poolTimeout: 1, poolRecycle: 1800, idleTimeout: 600 } });
    let restoreClock = (): void => undefined;
    try {
      const pidOf = async (c: pg.Client): Promise<number> => (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
      const before = await withClient(running, pidOf);
      const { holder, waiter } = await grantHeld(running);
      const waitingSince = performance.now();
      const refused = assert.rejects(waiter.query('SELECT 1'), (e: { code?: string }) => e.code === '53300');
      await new Promise((r) => setTimeout(r, 200));
      restoreClock = stepWallClock(-3_600_000);
      await refused;
      const waited = performance.now() - waitingSince;
      assert.ok(waited < 5_000, `the client waited ${Math.round(waited)} ms with poolTimeout 1 s (judged by the wall clock, an hour more)`);
      await holder.query('COMMIT');
      await holder.end();
      // Two hours forward: the idle server connection is 1 s old, not due for poolRecycle (30 min).
      restoreClock();
      restoreClock = stepWallClock(7_200_000);
      assert.equal(await withClient(running, pidOf), before, 'the same server connection serves on');
    } finally {
      restoreClock();
      await running.stop();
    }
  });

  it('keeps one server connection for good with poolRecycle -1, and applies new pool settings in place', async function () {
    const running = await startSidecar(postgres, { grant: 1, pool: { poolRecycle: -1, poolTimeout: 30 } });
    try {
      const pids = new Set<number>();
      for (let i = 0; i < 5; i += 1) {
        await withClient(running, async (c) => {
          pids.add((await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid);
        });
      }
      assert.equal(pids.size, 1, 'poolRecycle -1 means never recycle');
      const result = running.sidecar.updatePoolSettings({ mode: 'session', poolTimeout: 1, poolRecycle: -1, poolPrePing: true, idleTimeout: 600 });
      assert.deepEqual(result, { applied: ['poolTimeout'], needsRestart: ['mode'] });
      const { holder, waiter } = await grantHeld(running);
      const waitingSince = Date.now();
      await assert.rejects(waiter.query('SELECT 1'), (e: { code?: string; message: string }) => e.code === '53300' && /within 1 s/.test(e.message), 'the new poolTimeout of 1 s applies');
      // Generous bound: the old poolTimeout was 30 s, and a timer armed with it must not decide.
      assert.ok(Date.now() - waitingSince < 15_000, `timed out after ${Date.now() - waitingSince} ms`);
      await holder.query('COMMIT');
      await holder.end();
    } finally {
      await running.stop();
    }
  });

  it('discards the server connection of a client that disconnects mid-transaction', async function () {
    const running = await startSidecar(postgres, { grant: 1 });
    const table = `dirty_${randomBytes(3).toString('hex')}`;
    try {
      await withClient(running, (c) => c.query(`CREATE TABLE ${table} (x int)`));
      const quitter = running.client();
      quitter.on('error', () => undefined);
      await quitter.connect();
      await quitter.query('BEGIN');
      await quitter.query(`INSERT INTO ${table} VALUES (1)`);
      const pid = (await quitter.query<{ p: number }>('SELECT pg_backend_pid() AS p')).rows[0]!.p;
      (quitter as unknown as { connection: { stream: { destroy(): void } } }).connection.stream.destroy();
      await withClient(running, async (c) => {
        const res = await c.query<{ p: number; n: string; tx: boolean }>(`SELECT pg_backend_pid() AS p, (SELECT count(*) FROM ${table}) AS n, now() = statement_timestamp() AS tx`);
        assert.equal(res.rows[0]!.tx, true, 'not inside a leftover transaction');
        assert.notEqual(res.rows[0]!.p, pid, 'the dirty connection was reused');
        assert.equal(res.rows[0]!.n, '0');
        await c.query(`DROP TABLE ${table}`);
      });
    } finally {
      await running.stop();
    }
  });

  it('serves named prepared statements in transaction mode (re-prepared on whichever server connection)', async function () {
    const running = await startSidecar(postgres, { grant: 2 });
    try {
      await withClient(running, async (c) => {
        for (let i = 0; i < 5; i += 1) {
          const res = await c.query<{ x: number }>({ name: 'by-name', text: 'SELECT $1::int AS x', values: [i] });
          assert.equal(res.rows[0]!.x, i);
        }
      });
      await withClient(running, (other) => other.query('SELECT 1'));
    } finally {
      await running.stop();
    }
  });

  it('forwards CancelRequest to the server connection the client is using', async function () {
    const running = await startSidecar(postgres, { grant: 2 });
    try {
      await withClient(running, async (c) => {
        const keys = c as unknown as { processID: number; secretKey: number };
        const sleeping = c.query('SELECT pg_sleep(30)');
        await new Promise((r) => setTimeout(r, 300));
        const key = Buffer.alloc(4);
        key.writeInt32BE(keys.secretKey);
        const { buildSpecialRequest, CANCEL_REQUEST_CODE } = await import('../../src/core/protocol/index.ts');
        const socket = netConnect({ host: '127.0.0.1', port: running.port });
        socket.end(buildSpecialRequest(CANCEL_REQUEST_CODE, keys.processID, key));
        await assert.rejects(sleeping, (e: { code?: string }) => e.code === '57014');
      });
    } finally {
      await running.stop();
    }
  });

  it('refuses a user or database it does not serve, and serves health endpoints', async function () {
    const running = await startSidecar(postgres, { grant: 1 });
    try {
      const wrongUser = new pg.Client({ host: '127.0.0.1', port: running.port, user: 'postgres', database: 'app' });
      await assert.rejects(wrongUser.connect(), (e: { code?: string }) => e.code === '28000');
      const wrongDb = new pg.Client({ host: '127.0.0.1', port: running.port, user: 'app', database: 'postgres' });
      await assert.rejects(wrongDb.connect(), (e: { code?: string }) => e.code === '3D000');
      assert.equal((await fetch(`http://127.0.0.1:${running.adminPort}/healthz`)).status, 200);
      assert.equal((await fetch(`http://127.0.0.1:${running.adminPort}/readyz`)).status, 200);
    } finally {
      await running.stop();
    }
  });

  it('drains: lets the open transaction commit, refuses new clients, reports drained with 0 held', async function () {
    const running = await startSidecar(postgres, { grant: 3, drainTimeout: 10 });
    const table = `drain_${randomBytes(3).toString('hex')}`;
    try {
      await withClient(running, (c) => c.query(`CREATE TABLE ${table} (x int)`));
      const inTx = running.client();
      await inTx.connect();
      inTx.on('error', () => undefined);
      await inTx.query('BEGIN');
      await inTx.query(`INSERT INTO ${table} VALUES (1)`);
      const drained = running.sidecar.drain();
      await waitFor('draining', () => running.sidecar.status().draining);
      assert.equal((await fetch(`http://127.0.0.1:${running.adminPort}/readyz`)).status, 503);
      await inTx.query('COMMIT');
      await drained;
      assert.deepEqual(running.sidecar.status(), { ...running.sidecar.status(), draining: true, drained: true, heldConnections: 0, acknowledgedConnections: 0 });
      const rows = await postgres.query<{ n: string }>(`SELECT count(*) AS n FROM ${table}`);
      assert.equal(rows[0]!.n, '1');
      await inTx.end().catch(() => undefined);
      await postgres.query(`DROP TABLE ${table}`);
    } finally {
      await running.stop();
    }
  });
});

/**
 * Kills the sshd session processes holding established connections on
 * `port`: sshd forks each session into its own session group, so killing the
 * listener alone leaves open tunnels alive. Found by pid, through ss.
 */
async function killSshSessions(port: number): Promise<number> {
  const { stdout } = await run('/usr/bin/ss', ['-tnpH', 'state', 'established', `( sport = :${port} )`]);
  const pids = new Set([...stdout.matchAll(/pid=(\d+)/g)].map((m) => Number(m[1])));
  for (const pid of pids) process.kill(pid, 'SIGKILL');
  return pids.size;
}

/** A sidecar counter's value (the first capture of `pattern` in /metrics), 0 when absent. */
async function metricValue(running: Running, pattern: RegExp): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${running.adminPort}/metrics`)).text();
  const match = pattern.exec(text);
  return match === null ? 0 : Number(match[1]);
}

const AUTH_FAILED_LOGINS = /poolkeeper_sidecar_server_logins_total\{result="auth-failed"\} (\d+)/;
const FAILED_LOGINS = /poolkeeper_sidecar_server_logins_total\{result="failed"\} (\d+)/;

interface ConnectFailure {
  code: string | undefined;
  message: string;
  detail: string | undefined;
  hint: string | undefined;
  ms: number;
}

/** Connects with node-postgres, expecting a refusal: what it was and how long it took. */
async function connectFailure(config: pg.ClientConfig): Promise<ConnectFailure> {
  const started = Date.now();
  const client = new pg.Client(config);
  client.on('error', () => undefined);
  try {
    await client.connect();
  } catch (error) {
    const e = error as { code?: string; message: string; detail?: string; hint?: string };
    return { code: e.code, message: e.message, detail: e.detail, hint: e.hint, ms: Date.now() - started };
  }
  await client.end();
  throw new Error('the connection was not refused');
}

/** A TCP port nothing listens on. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

describe('sidecar: a server login that waiting does not cure', function () {
  let postgres: PostgresServer;
  before(async function () {
    fileStart = new Date();
    postgres = await env.postgres();
  });

  it('fails clients at once with the server\'s 28P01 for a wrong password in the Secret, as direct (node-postgres, psql); 200 clients make one login; a fixed Secret serves the next client', async function () {
    const wrong = `wrong-${randomBytes(9).toString('base64url')}`;
    const running = await startSidecar(postgres, { role: { user: 'app', password: wrong }, grant: 5, pool: { poolTimeout: 30 } });
    const through: pg.ClientConfig = { host: '127.0.0.1', port: running.port, user: 'app', database: 'app' };
    try {
      const direct = await connectFailure(postgres.clientConfig({ user: 'app', password: wrong }));
      const viaSidecar = await connectFailure(through);
      assert.equal(direct.code, '28P01');
      assert.equal(viaSidecar.code, direct.code);
      assert.equal(viaSidecar.message, direct.message);
      assert.ok(viaSidecar.ms < 1_000, `the refusal took ${viaSidecar.ms} ms through the sidecar (poolTimeout 30 s)`);
      assert.match(viaSidecar.detail ?? '', /through the poolkeeper sidecar: its own login to .* \(database "app", user "app"\)/);
      assert.match(viaSidecar.hint ?? '', /credentials Secret/);
      assert.ok(!JSON.stringify(viaSidecar).includes(wrong), 'the password is in the client\'s error');

      const psqlArgs = (host: string, port: number): string[] => ['-h', host, '-p', String(port), '-U', 'app', '-d', 'app', '-w', '-X', '-c', 'SELECT 1'];
      const psqlStarted = Date.now();
      const psqlThrough = await run('psql', psqlArgs('127.0.0.1', running.port)).then(() => '', (e: Error) => e.message);
      const psqlMs = Date.now() - psqlStarted;
      const psqlDirect = await run('psql', psqlArgs(postgres.host, postgres.port), { PGPASSWORD: wrong }).then(() => '', (e: Error) => e.message);
      for (const output of [psqlThrough, psqlDirect]) assert.match(output, /FATAL: {2}password authentication failed for user "app"/);
      assert.match(psqlThrough, /poolkeeper sidecar/);
      assert.ok(psqlMs < 1_000, `psql's refusal took ${psqlMs} ms`);

      // Past the hold, a burst of clients shares one new login.
      await new Promise((r) => setTimeout(r, 2_200));
      const loginsBefore = await metricValue(running, AUTH_FAILED_LOGINS);
      const burst = await Promise.all(Array.from({ length: 200 }, () => connectFailure(through)));
      const logins = await metricValue(running, AUTH_FAILED_LOGINS) - loginsBefore;
      assert.deepEqual([...new Set(burst.map((f) => f.code))], ['28P01']);
      assert.ok(logins >= 1 && logins <= 2, `200 clients made ${logins} logins`);
      const slowest = Math.max(...burst.map((f) => f.ms));
      assert.ok(slowest < 2_000, `the slowest of 200 refusals took ${slowest} ms`);
      const refusedCount = await metricValue(running, /poolkeeper_sidecar_errors_total\{kind="login-refused"\} (\d+)/);
      assert.ok(refusedCount >= 202, `login-refused counted ${refusedCount}`);

      // The Secret fixed: the next client is served at once, without waiting out the hold.
      writeCredentials(running.credentialsDir, postgres.app);
      const fixedAt = Date.now();
      await waitFor('a client served with the fixed Secret', () => withClient(running, (c) => c.query('SELECT 1')).then(() => true, () => false), 5_000);
      assert.ok(Date.now() - fixedAt < 1_500, `served ${Date.now() - fixedAt} ms after the fix`);
    } finally {
      await running.stop();
    }
  });

  it('says so when the refused password in the Secret ends with a newline (a file made with echo), without showing it', async function () {
    const running = await startSidecar(postgres, { role: { user: 'app', password: `${postgres.app.password}\n` }, grant: 5, pool: { poolTimeout: 30 } });
    try {
      const refused = await connectFailure({ host: '127.0.0.1', port: running.port, user: 'app', database: 'app' });
      assert.equal(refused.code, '28P01');
      assert.match(refused.hint ?? '', /^The password in the credentials Secret ends with a newline/);
      assert.ok(!JSON.stringify(refused).includes(postgres.app.password), 'the password is not in the client\'s error');
    } finally {
      await running.stop();
    }
  });

  it('fails clients at once with 3D000 for a database the server does not have, as direct; a cold burst makes at most the grant in logins', async function () {
    const running = await startSidecar(postgres, { dbname: 'no_such_db', grant: 3, pool: { poolTimeout: 30 } });
    const through: pg.ClientConfig = { host: '127.0.0.1', port: running.port, user: 'app', database: 'no_such_db' };
    try {
      const burst = await Promise.all(Array.from({ length: 50 }, () => connectFailure(through)));
      assert.deepEqual([...new Set(burst.map((f) => f.code))], ['3D000']);
      const logins = await metricValue(running, FAILED_LOGINS);
      assert.ok(logins <= 3, `50 clients made ${logins} logins with a grant of 3`);
      const direct = await connectFailure(postgres.clientConfig(postgres.app, 'no_such_db'));
      assert.equal(direct.code, '3D000');
      assert.equal(burst[0]!.message, direct.message);
      assert.ok(Math.max(...burst.map((f) => f.ms)) < 1_000);
      assert.match(burst[0]!.hint ?? '', /dbname/);
    } finally {
      await running.stop();
    }
  });

  it('still waits poolTimeout, with 53300, for a server that does not answer (a passing failure)', async function () {
    const running = await startSidecar(postgres, { databasePort: await closedPort(), grant: 2, pool: { poolTimeout: 1 } });
    try {
      const failure = await connectFailure({ host: '127.0.0.1', port: running.port, user: 'app', database: 'app' });
      assert.equal(failure.code, '53300');
      assert.match(failure.message, /no server connection available within 1 s; last connection attempt: .*ECONNREFUSED/);
      assert.ok(failure.ms >= 900, `failed after ${failure.ms} ms`);
    } finally {
      await running.stop();
    }
  });

  it('rotates credentials under load with the Secret changed first and the server\'s password a second later: zero client errors', async function () {
    const running = await startSidecar(postgres, { grant: 4 });
    const original = postgres.app.password;
    const rotated = randomBytes(12).toString('base64url');
    try {
      const errors: Error[] = [];
      const load = Promise.all(Array.from({ length: 20 }, () => churn(running, 80, errors)));
      await waitFor('connections in use', () => running.sidecar.status().heldConnections > 0);
      const before = running.sidecar.status().credentialsGeneration;
      writeCredentials(running.credentialsDir, { user: 'app', password: rotated });
      await waitFor('new generation', () => running.sidecar.status().credentialsGeneration !== before);
      await new Promise((r) => setTimeout(r, 1_000));
      await postgres.query(`ALTER ROLE app PASSWORD '${rotated}'`);
      await load;
      assert.deepEqual(errors.map((e) => e.message), []);
    } finally {
      await postgres.query(`ALTER ROLE app PASSWORD '${original}'`);
      await running.stop();
    }
  });

  it('a client of a pod with no server connection left waits, as before, while the server\'s password has changed and the Secret follows', async function () {
    const running = await startSidecar(postgres, { grant: 4 });
    const original = postgres.app.password;
    const rotated = randomBytes(12).toString('base64url');
    try {
      const client = running.client();
      await client.connect();
      await client.query('SELECT 1');
      running.sidecar.setGrant(0, 2);
      await waitFor('no server connection', () => running.sidecar.status().heldConnections === 0);
      await postgres.query(`ALTER ROLE app PASSWORD '${rotated}'`);
      running.sidecar.setGrant(4, 3);
      const started = Date.now();
      const query = client.query<{ v: number }>('SELECT 4 AS v');
      await new Promise((r) => setTimeout(r, 1_000));
      writeCredentials(running.credentialsDir, { user: 'app', password: rotated });
      assert.equal((await query).rows[0]!.v, 4);
      assert.ok(Date.now() - started >= 900);
      await client.end();
    } finally {
      await postgres.query(`ALTER ROLE app PASSWORD '${original}'`);
      await running.stop();
    }
  });
});

describe('sidecar SSH tunnel', function () {
  before(function () {
    fileStart = new Date();
  });

  it('pools through one SSH connection, survives sshd being killed and restarted', async function () {
    const [postgres, sshd] = await Promise.all([env.postgres(), env.sshd()]);
    const running = await startSidecar(postgres, {
      grant: 3, pool: { poolTimeout: 20 },
      tunnel: { host: sshd.host, port: sshd.port, user: sshd.username, privateKey: sshd.userPrivateKey, hostKey: sshd.hostPublicKey },
    });
    try {
      await Promise.all(Array.from({ length: 6 }, () => withClient(running, (c) => c.query('SELECT pg_sleep(0.05)'))));
      // Forwarded channels arrive from the bastion's loopback, one SSH session for all of them.
      const viaTunnel = await postgres.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = 'app' AND backend_start >= $1 AND client_addr = '127.0.0.1'", [fileStart]);
      assert.ok(Number(viaTunnel[0]!.n) >= 1);
      await sshd.kill();
      assert.ok(await killSshSessions(sshd.port) >= 1, 'no SSH session to kill');
      await waitFor('tunnel down', async () => /poolkeeper_sidecar_tunnel_up 0/.test(await (await fetch(`http://127.0.0.1:${running.adminPort}/metrics`)).text()));
      const during = withClient(running, (c) => c.query<{ one: number }>('SELECT 1 AS one'));
      await new Promise((r) => setTimeout(r, 500));
      await sshd.restart();
      assert.equal((await during).rows[0]!.one, 1);
      const metrics = await (await fetch(`http://127.0.0.1:${running.adminPort}/metrics`)).text();
      assert.match(metrics, /poolkeeper_sidecar_tunnel_up 1/);
      assert.match(metrics, /poolkeeper_sidecar_tunnel_reconnects_total [1-9]/);
    } finally {
      await running.stop();
    }
  });

  it('a rotated SSH key (its Secret file replaced) is used from the next SSH connection on', async function () {
    const [postgres, sshd] = await Promise.all([env.postgres(), env.sshd()]);
    const dir = mkdtempSync(join(tmpdir(), 'poolkeeper-ssh-key-'));
    const keyFile = join(dir, 'ssh-privatekey');
    // As the kubelet updates a Secret volume: the new file is written aside and renamed over the old.
    const publish = (text: string): void => {
      writeFileSync(`${keyFile}.tmp`, text, { mode: 0o600 });
      renameSync(`${keyFile}.tmp`, keyFile);
    };
    publish(sshd.userPrivateKey);
    const running = await startSidecar(postgres, {
      grant: 2, pool: { poolTimeout: 20 },
      tunnel: { host: sshd.host, port: sshd.port, user: sshd.username, privateKey: sshd.userPrivateKey, hostKey: sshd.hostPublicKey },
      sshPrivateKey: new MountedFile({ path: keyFile, kind: await sshPrivateKeyKind(), logger }),
    });
    try {
      assert.equal((await withClient(running, (c) => c.query<{ v: number }>('SELECT 1 AS v'))).rows[0]!.v, 1);
      // The bastion accepts only the new key from now on, and the Secret holds it.
      const rotated = sshd.newUserKey();
      sshd.authorize([rotated.publicKeyLine]);
      publish(rotated.privateKey);
      assert.ok(await killSshSessions(sshd.port) >= 1, 'no SSH session to kill');
      await waitFor('tunnel down', async () => /poolkeeper_sidecar_tunnel_up 0/.test(await (await fetch(`http://127.0.0.1:${running.adminPort}/metrics`)).text()));
      // A server connection that went down with the tunnel may still fail the first query on it (as a direct one would):
      // what matters is that the tunnel comes back, with the new key, and serves.
      let served: number | undefined;
      await waitFor('a query through the tunnel reconnected with the new key', async () => {
        served = await withClient(running, (c) => c.query<{ v: number }>('SELECT 2 AS v')).then((r) => r.rows[0]!.v, () => undefined);
        return served === 2;
      }, 30_000);
      const metrics = await (await fetch(`http://127.0.0.1:${running.adminPort}/metrics`)).text();
      assert.match(metrics, /poolkeeper_sidecar_tunnel_reconnects_total [1-9]/);
    } finally {
      await running.stop();
      sshd.authorize([sshd.userPublicKey]);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a channel asked for while the bastion refuses the tunnel (its host key, the private key) fails at once with why, not at its deadline; a corrected host key is tried at once', async function () {
    this.timeout(60_000);
    const [postgres, sshd] = await Promise.all([env.postgres(), env.sshd()]);
    const metrics = new SidecarMetrics(new Registry());
    const logger = pino({ level: 'silent' });
    const wrongHostKey = new SshTunnel({ settings: { host: sshd.host, port: sshd.port, user: sshd.username, privateKey: sshd.userPrivateKey, hostKey: 'SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA' }, logger, metrics });
    const unknownKey = new SshTunnel({ settings: { host: sshd.host, port: sshd.port, user: sshd.username, privateKey: sshd.newUserKey().privateKey, hostKey: sshd.hostKeyFingerprint }, logger, metrics });
    wrongHostKey.start();
    unknownKey.start();
    try {
      // Two minutes' deadline: waiting it out would fail this test's timeout; the refusal comes in well under a second.
      const deadline = steadyNow() + 120_000;
      await assert.rejects(wrongHostKey.open('127.0.0.1', postgres.port, deadline), /SSH tunnel to .* refused: host key mismatch \(the bastion presented SHA256:/);
      await assert.rejects(unknownKey.open('127.0.0.1', postgres.port, deadline), /SSH tunnel to .* refused: the bastion refused the SSH login .*All configured authentication methods failed/);
      // Asked again while the refusal stands: at once too.
      await assert.rejects(wrongHostKey.open('127.0.0.1', postgres.port, deadline), /host key mismatch/);
      wrongHostKey.setHostKey(sshd.hostKeyFingerprint);
      const channel = await wrongHostKey.open('127.0.0.1', postgres.port, deadline);
      channel.destroy();
    } finally {
      wrongHostKey.stop();
      unknownKey.stop();
    }
  });

  it('refuses a bastion whose host key does not match, counts it, and tells the client at once; a host key changed in the DatabaseConnection is checked from the next SSH connection on', async function () {
    const [postgres, sshd] = await Promise.all([env.postgres(), env.sshd()]);
    const running = await startSidecar(postgres, {
      grant: 2, pool: { poolTimeout: 30 },
      tunnel: { host: sshd.host, port: sshd.port, user: sshd.username, privateKey: sshd.userPrivateKey, hostKey: 'SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA' },
    });
    try {
      const c = running.client();
      c.on('error', () => undefined);
      const started = Date.now();
      // Waiting does not cure a mismatch: the client gets the tunnel's cause at once, not after poolTimeout.
      await assert.rejects(c.connect(), (e: { code?: string; message: string; detail?: string }) => e.code === '08001' && /host key mismatch \(the bastion presented SHA256:/.test(e.message) && /poolkeeper sidecar/.test(e.detail ?? ''));
      assert.ok(Date.now() - started < 3_000, `the refusal took ${Date.now() - started} ms`);
      const metrics = await (await fetch(`http://127.0.0.1:${running.adminPort}/metrics`)).text();
      assert.match(metrics, /poolkeeper_sidecar_errors_total\{kind="tunnel-host-key-mismatch"\} [1-9]/);
      assert.equal((await fetch(`http://127.0.0.1:${running.adminPort}/readyz`)).status, 503);
      running.sidecar.updateTunnelHostKey(sshd.hostKeyFingerprint);
      await waitFor('the tunnel up with the new host key', async () => /poolkeeper_sidecar_tunnel_up 1/.test(await (await fetch(`http://127.0.0.1:${running.adminPort}/metrics`)).text()));
      assert.equal((await withClient(running, (c) => c.query<{ v: number }>('SELECT 3 AS v'))).rows[0]!.v, 3);
    } finally {
      await running.stop();
    }
  });
  it('a bastion that presents another host key when the tunnel reconnects: clients are told at once, even with lost backends still counted', async function () {
    const [postgres, sshd] = await Promise.all([env.postgres(), env.sshd()]);
    const running = await startSidecar(postgres, {
      grant: 2, pool: { poolTimeout: 30 },
      tunnel: { host: sshd.host, port: sshd.port, user: sshd.username, privateKey: sshd.userPrivateKey, hostKey: sshd.hostPublicKey },
    });
    try {
      assert.equal((await withClient(running, (c) => c.query<{ v: number }>('SELECT 1 AS v'))).rows[0]!.v, 1);
      // As if the bastion were rebuilt with a new key: the pinned one no longer matches from the next SSH connection on.
      running.sidecar.updateTunnelHostKey('SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA');
      assert.ok(await killSshSessions(sshd.port) >= 1, 'no SSH session to kill');
      await waitFor('the bastion refused', async () => /poolkeeper_sidecar_errors_total\{kind="tunnel-host-key-mismatch"\} [1-9]/.test(await (await fetch(`http://127.0.0.1:${running.adminPort}/metrics`)).text()));
      // The sidecar knows the server's parameters already: the login completes, the first query needs a server connection.
      const client = running.client();
      client.on('error', () => undefined);
      await client.connect();
      const started = Date.now();
      await assert.rejects(client.query('SELECT 1'), (e: { code?: string; message: string }) => e.code === '08001' && /refused: host key mismatch/.test(e.message));
      assert.ok(Date.now() - started < 1_000, `the refusal took ${Date.now() - started} ms (poolTimeout 30 s)`);
      await client.end().catch(() => undefined);
      running.sidecar.updateTunnelHostKey(sshd.hostPublicKey);
      await waitFor('served again through the bastion', () => withClient(running, (c) => c.query('SELECT 1')).then(() => true, () => false), 30_000);
    } finally {
      await running.stop();
    }
  });
});

describe('sidecar fuzzing', function () {
  /** Sends `bytes`, half-closes, and collects what comes back until the sidecar closes. */
  function exchange(port: number, bytes: Buffer): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      const socket = netConnect({ host: '127.0.0.1', port });
      const received: Buffer[] = [];
      const timer = setTimeout(() => reject(new Error('the sidecar kept a fuzzed connection open')), 10_000);
      socket.on('data', (d: Buffer) => received.push(d));
      socket.on('error', () => undefined);
      socket.on('close', () => {
        clearTimeout(timer);
        resolve(Buffer.concat(received));
      });
      socket.write(bytes);
      socket.end();
    });
  }

  function seeded(seed: number): () => number {
    let x = seed >>> 0 || 1;
    return () => {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      return (x >>> 0) / 2 ** 32;
    };
  }

  it('closes only the client that sends malformed bytes, with an ErrorResponse, while others keep working', async function () {
    const postgres = await env.postgres();
    const running = await startSidecar(postgres, { grant: 3 });
    const random = seeded(20261122);
    const startup = buildStartupMessage({ user: 'app', database: 'app' });
    const query = Buffer.from([0x51, 0, 0, 0, 13, ...Buffer.from('SELECT 1\0')]);
    try {
      const healthyErrors: Error[] = [];
      let stop = false;
      const healthy = (async () => {
        const c = running.client();
        await c.connect();
        // Bounded: at most 5000 queries.
        for (let i = 0; !stop && i < 5000; i += 1) await c.query('SELECT $1::int', [i]).catch((e: Error) => healthyErrors.push(e));
        await c.end();
      })();
      let errorsAfterStartup = 0;
      for (let round = 0; round < 60; round += 1) {
        const noise = Buffer.from(Array.from({ length: 1 + Math.floor(random() * 64) }, () => Math.floor(random() * 256)));
        if (round % 3 === 0) {
          // Pure noise: the startup packet itself is garbage.
          await exchange(running.port, noise);
        } else {
          // A valid login, then a mutated query and an invalid message type or length.
          const mutated = Buffer.from(query);
          mutated[5 + Math.floor(random() * 8)] = Math.floor(random() * 256);
          const bad = round % 2 === 0 ? Buffer.from([0x01, 0, 0, 0, 4]) : Buffer.from([0x51, 0x7f, 0xff, 0xff, 0xff]);
          const reply = await exchange(running.port, Buffer.concat([startup, mutated, bad, noise]));
          const text = reply.toString('latin1');
          assert.ok(text.includes('08P01') || text.includes('42601'), `round ${round}: no ErrorResponse in ${JSON.stringify(text.slice(-200))}`);
          if (text.includes('08P01')) errorsAfterStartup += 1;
        }
      }
      stop = true;
      await healthy;
      assert.deepEqual(healthyErrors.map((e) => e.message), []);
      assert.ok(errorsAfterStartup >= 30, `only ${errorsAfterStartup} protocol violations answered`);
      assert.ok(running.sidecar.status().heldConnections <= 3);
      await withClient(running, (c) => c.query('SELECT 1'));
    } finally {
      await running.stop();
    }
  });
});
