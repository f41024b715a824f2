/**
 * Real drivers against four targets in one run: PostgreSQL direct, PgBouncer
 * (transaction mode), the sidecar in transaction mode and in session mode.
 * The scenario programs under test/drivers/ (psycopg2 and psycopg 3 on libpq,
 * asyncpg, pgjdbc, node-postgres, Perl DBD::Pg, PHP's PDO_pgsql and pgsql, and raw
 * sockets) print one JSON result each;
 * every assertion holds direct, and must hold through the sidecar: the same
 * result as direct, or a clear error that names what the pooler cannot do.
 * What PgBouncer 1.18 legitimately cannot do is recorded, not asserted.
 *
 * POOLKEEPER_DRIVERS_REPORT=<file> writes every measured result there (the
 * source of docs/compatibility.md).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { testEnvironment } from '../support/hooks.ts';
import { startTestSidecar, type TestSidecar } from '../support/sidecar-fixture.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';

const env = testEnvironment();
const driversDir = join(dirname(fileURLToPath(import.meta.url)), '..', 'drivers');
const PYTHON = '/usr/bin/python3'; // Debian's: the one the python3-* driver packages belong to
const PGJDBC_JAR = '/usr/share/java/postgresql.jar';
const PERL = '/usr/bin/perl'; // Debian's: the one libdbd-pg-perl belongs to
const PHP = '/usr/bin/php'; // Debian's php-cli, with php-pgsql's pdo_pgsql and pgsql

interface Login { host: string; port: number; user: string; password: string; dbname: string }
type TargetName = 'direct' | 'pgbouncer' | 'sidecar-transaction' | 'sidecar-session';
interface Target { name: TargetName; mode: 'direct' | 'transaction' | 'session'; login: Login; poolSize: number; suffix: string }
type Json = Record<string, unknown>;
interface Step { ok: boolean; value?: unknown; sqlstate?: string; message?: string }

const TARGETS: readonly TargetName[] = ['direct', 'pgbouncer', 'sidecar-transaction', 'sidecar-session'];
const SIDECAR_TRANSACTION_GRANT = 5;
const SIDECAR_SESSION_GRANT = 20; // psycopg 3 runs 20 threads, each a session
const PGBOUNCER_POOL_SIZE = 20; // src/devenv/pgbouncer.ts default_pool_size
const MIN_SIDECAR_CANCELS = 300;

/**
 * What PgBouncer 1.18 in transaction mode cannot do: measured and reported,
 * not asserted (the sidecar is held to direct's behaviour instead).
 */
const PGBOUNCER_CANNOT: Record<string, string> = {
  'psycopg 3 prepared': 'named prepared statements are per server connection in transaction mode (PgBouncer < 1.21)',
  'psycopg 3 SQL statement commands': 'SQL PREPARE and DEALLOCATE act on whichever server connection runs them',
  'psycopg 3 backend pid': 'a client has no fixed backend in transaction mode: its BackendKeyData pid names none',
  'psycopg 3 cancel while the pool is busy': 'a cancel of a statement still waiting for a server connection is lost: the statement runs once one is free',
  'asyncpg pool prepared': 'named prepared statements are per server connection in transaction mode (PgBouncer < 1.21)',
  'pgjdbc prepared': 'named prepared statements are per server connection in transaction mode (PgBouncer < 1.21)',
  'pgjdbc more connections than the pool': 'pgjdbc\'s SET extra_float_digits after login stays on the server connection that ran it: the client loses it when moved, another client gets it',
  'pgjdbc batch insert': 'pgjdbc\'s server-side statement names (S_1, ...) collide on server connections shared with other clients (PgBouncer < 1.21)',
  'node-postgres shared statement': 'named prepared statements are per server connection in transaction mode (PgBouncer < 1.21)',
  'protocol negotiation': 'PgBouncer 1.18 refuses protocol 3.x > 3.0 and _pq_ options with an error instead of negotiating',
  'server terminates the backend': 'a lost server connection is reported to the next query as an error of its own (08P01) after the FATAL',
  'libpq without application_name': 'a client that sends no application_name gets the one the server connection\'s previous client set',
  'Terminate behind a query': 'PgBouncer closes at the Terminate and drops the answer to the query before it',
  'libpq max_protocol_version=3.2': 'PgBouncer 1.18 refuses protocol 3.x > 3.0 with an error instead of negotiating',
  'session state': 'SET, temporary tables, advisory locks, WITH HOLD cursors and LISTEN stay on the server connection that ran them',
  'DBD::Pg basics': 'DBD::Pg\'s named statements (dbdpg_p<pid>_<n>) are per server connection in transaction mode (PgBouncer < 1.21)',
  'DBD::Pg last_insert_id, clients taking turns': 'currval() in a later transaction reads whichever client last ran nextval() on the server connection it gets',
  'DBD::Pg last_insert_id in the INSERT\'s transaction': 'DBD::Pg\'s named statements (dbdpg_p<pid>_<n>) are per server connection in transaction mode (PgBouncer < 1.21)',
  'PHP PDO named statements': 'PDO\'s named statements (pdo_stmt_<n>, numbered per connection) are per server connection in transaction mode (PgBouncer < 1.21)',
  'PHP PDO lastInsertId, clients taking turns': 'currval() in a later transaction reads whichever client last ran nextval() on the server connection it gets',
  'PHP PDO lastInsertId without a sequence name, clients taking turns': 'lastval() in a later transaction reads whichever client last ran nextval() on the server connection it gets',
  'PHP pg_prepare and pg_execute': 'named prepared statements are per server connection in transaction mode (PgBouncer < 1.21)',
  'PHP pg_get_notify': 'LISTEN stays on the server connection that ran it',
  'psqlODBC transaction with a failing statement': 'psqlODBC\'s named statements (_PLAN0x<address>) are per server connection in transaction mode (PgBouncer < 1.21); measured, as direct while one client runs alone',
};

const measured = new Map<string, Map<TargetName, Json>>();
const logins = new Map<TargetName, Target>();
let directSuperuser: Login;
let javaClasses: string;

function run(command: string, args: string[], timeoutMs: number): Promise<Json> {
  // No PG* variables from the caller's environment: each scenario sets its own.
  const childEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PG')));
  return new Promise((resolve, reject) => {
    execFile(command, args, { cwd: driversDir, timeout: timeoutMs, maxBuffer: 16 << 20, env: { ...childEnv, PYTHONDONTWRITEBYTECODE: '1' } }, (error, stdout, stderr) => {
      const last = stdout.trim().split('\n').pop() ?? '';
      if (error) {
        const why = error.killed ? `no result within ${timeoutMs / 1000} s (a hang; the last step it began is on stderr)` : error.message;
        reject(new Error(`${command} ${args[0]}: ${why}\n${stderr.slice(-2000)}\n${stdout.slice(-1000)}`));
        return;
      }
      try {
        resolve(JSON.parse(last) as Json);
      } catch {
        reject(new Error(`${command} ${args[0]} printed no JSON result:\n${stdout.slice(-1000)}\n${stderr.slice(-2000)}`));
      }
    });
  });
}

/** One run of a scenario program per target, shared by the tests that read its result. */
const runs = new Map<string, Promise<Json>>();
function scenario(target: Target, program: 'cancel' | 'startup' | 'session-state' | 'psycopg3' | 'asyncpg' | 'pgjdbc' | 'node-postgres' | 'dbdpg' | 'php' | 'odbc'): Promise<Json> {
  const key = `${target.name}/${program}`;
  let pending = runs.get(key);
  if (!pending) {
    const config = {
      target: target.login, direct: directSuperuser, suffix: target.suffix, mode: target.mode,
      // How many server connections a client can be moved across (transaction mode only).
      holders: target.mode === 'transaction' ? target.poolSize : 0,
      poolSize: target.poolSize,
    };
    const json = JSON.stringify(config);
    switch (program) {
      case 'cancel': {
        // >= 300 cancels through the sidecar; direct and PgBouncer are references, and each of their
        // cancels costs PostgreSQL a new backend process, so they send fewer in the same time.
        const minCancels = target.name.startsWith('sidecar') ? MIN_SIDECAR_CANCELS : 50;
        // Until minCancels are sent: about 5 s on an idle 2-core machine, up to maxSeconds on a busy one.
        pending = run(PYTHON, ['drv_cancel_psycopg2.py', JSON.stringify({ ...config, seconds: 2, maxSeconds: 30, minCancels, bystanders: 8, cancellers: 3 })], 60_000);
        break;
      }
      case 'startup': pending = run(PYTHON, ['drv_startup_libpq.py', json], 60_000); break;
      case 'session-state': pending = run(PYTHON, ['drv_session_state_psycopg2.py', json], 60_000); break;
      case 'psycopg3': pending = run(PYTHON, ['drv_psycopg3.py', JSON.stringify({ ...config, threads: 20, transactions: 25, seconds: 4 })], 60_000); break;
      case 'asyncpg': pending = run(PYTHON, ['drv_asyncpg.py', JSON.stringify({ ...config, asyncpgPool: 10 })], 60_000); break;
      case 'node-postgres': pending = run(process.execPath, ['node-postgres.ts', json], 60_000); break;
      case 'dbdpg': pending = run(PERL, ['drv_dbdpg.pl', json], 60_000); break;
      // More connections than the sidecar's transaction-mode grant, the same on every target.
      case 'odbc': pending = run(PYTHON, ['drv_odbc.py', JSON.stringify({ ...config, connections: SIDECAR_TRANSACTION_GRANT + 2 })], 90_000); break;
      case 'php':
        // Without php-cli the program cannot say so itself (drv_php.php does when php-pgsql is missing).
        pending = existsSync(PHP) ? run(PHP, ['drv_php.php', json], 60_000) : Promise.resolve({ skipped: `${PHP} is not installed (Debian: php-cli php-pgsql)` });
        break;
      case 'pgjdbc': {
        const url = `jdbc:postgresql://${target.login.host}:${target.login.port}/${target.login.dbname}`;
        pending = run('java', ['-Duser.timezone=Asia/Tokyo', '-cp', `${javaClasses}:${PGJDBC_JAR}`, 'PgjdbcScenarios', url, target.login.user, target.login.password, target.suffix, '8', String(target.mode === 'session' ? target.poolSize : target.poolSize + 4)], 60_000);
        break;
      }
    }
    runs.set(key, pending);
  }
  return pending;
}

function record(feature: string, target: TargetName, value: Json): void {
  let row = measured.get(feature);
  if (!row) measured.set(feature, (row = new Map<TargetName, Json>()));
  row.set(target, value);
}

/** The result a feature got direct (the direct target runs first). */
function direct(feature: string): Json {
  const value = measured.get(feature)?.get('direct');
  assert.ok(value, `no direct result for ${feature}: the direct target runs first`);
  return value;
}

/** A step's outcome as compared across targets: the value, or the SQLSTATE (messages differ in names). */
function outcome(step: Step | undefined): unknown {
  if (!step) return 'missing';
  return step.ok ? { value: step.value } : { sqlstate: step.sqlstate };
}

/** Either every value was applied as the client asked, or the connection was refused with an error naming the parameter. */
function assertAppliedOrRefused(label: string, result: Json): void {
  const names = (result.names as string[] | undefined) ?? [];
  if (typeof result.refused === 'string') {
    const refused = result.refused.toLowerCase();
    assert.ok(names.some((n) => refused.includes(n.toLowerCase())), `${label}: refused without naming ${names.join('/')}: ${result.refused}`);
    return;
  }
  const seen = result.seen as Record<string, string[]>;
  for (const [name, want] of Object.entries(result.expected as Record<string, string>)) {
    assert.deepEqual(seen[name], [want], `${label}: SHOW ${name} gave ${JSON.stringify(seen[name])}, the client asked for ${want} (neither applied nor refused)`);
  }
}

describe('real drivers: direct, PgBouncer, sidecar transaction and session mode', function () {
  this.timeout(120_000);
  this.slow(30_000);
  let postgres: PostgresServer;
  const sidecars: TestSidecar[] = [];

  before(async function () {
    postgres = await env.postgres();
    const pgbouncer = await env.pgbouncer();
    const [transaction, session] = await Promise.all([
      startTestSidecar(postgres, { mode: 'transaction', grant: SIDECAR_TRANSACTION_GRANT }),
      startTestSidecar(postgres, { mode: 'session', grant: SIDECAR_SESSION_GRANT }),
    ]);
    sidecars.push(transaction, session);
    const app = (port: number): Login => ({ host: '127.0.0.1', port, user: postgres.app.user, password: postgres.app.password, dbname: 'app' });
    directSuperuser = { ...app(postgres.port), user: postgres.superuser.user, password: postgres.superuser.password };
    const suffix = randomBytes(3).toString('hex');
    const targets: Target[] = [
      { name: 'direct', mode: 'direct', login: app(postgres.port), poolSize: 0, suffix: `d_${suffix}` },
      { name: 'pgbouncer', mode: 'transaction', login: app(pgbouncer.port), poolSize: PGBOUNCER_POOL_SIZE, suffix: `b_${suffix}` },
      { name: 'sidecar-transaction', mode: 'transaction', login: app(transaction.port), poolSize: SIDECAR_TRANSACTION_GRANT, suffix: `t_${suffix}` },
      { name: 'sidecar-session', mode: 'session', login: app(session.port), poolSize: SIDECAR_SESSION_GRANT, suffix: `s_${suffix}` },
    ];
    for (const t of targets) logins.set(t.name, t);
    javaClasses = mkdtempSync(join(tmpdir(), 'poolkeeper-pgjdbc-'));
    await new Promise<void>((resolve, reject) => {
      execFile('javac', ['-d', javaClasses, '-cp', PGJDBC_JAR, join(driversDir, 'PgjdbcScenarios.java'), join(driversDir, 'JsonText.java')], { timeout: 60_000 }, (error, _out, stderr) => (error ? reject(new Error(`javac: ${stderr}`)) : resolve()));
    });
  });

  after(async function () {
    await Promise.all(sidecars.map((s) => s.stop()));
    if (javaClasses) rmSync(javaClasses, { recursive: true, force: true });
    const reportFile = process.env.POOLKEEPER_DRIVERS_REPORT;
    if (reportFile) {
      const report = Object.fromEntries([...measured].map(([feature, row]) => [feature, Object.fromEntries(row)]));
      writeFileSync(reportFile, JSON.stringify(report, null, 1));
    }
  });

  for (const name of TARGETS) {
    describe(`target: ${name}`, function () {
      const target = (): Target => logins.get(name)!;
      /** A test for one feature; PgBouncer's known limits are measured and reported, not asserted. */
      const feature = (title: string, body: (t: Target) => Promise<Json>, check: (result: Json, t: Target) => void | 'skip'): void => {
        const cannot = name === 'pgbouncer' ? PGBOUNCER_CANNOT[title] : undefined;
        it(cannot ? `${title} (PgBouncer cannot: ${cannot})` : title, async function () {
          const result = await body(target());
          record(title, name, result);
          if (cannot) return;
          if (typeof result.hang === 'string') assert.fail(`${title}: ${result.hang}`);
          if (typeof result.skipped === 'string') {
            // The driver is not installed here (scripts/setup.sh installs it): say so in the report.
            this.test!.title += ` (skipped: ${result.skipped})`;
            this.skip();
          }
          if (check(result, target()) === 'skip') this.skip();
        });
      };

      feature('psycopg2 cancel routing', async (t) => scenario(t, 'cancel'), (r, t) => {
        const bystanders = r.bystanders as Record<string, number>;
        const canceller = r.canceller as Record<string, number>;
        const idle = r.idleCancel as Record<string, number>;
        if (t.name.startsWith('sidecar')) assert.ok((r.cancelsSent as number) >= MIN_SIDECAR_CANCELS, `only ${String(r.cancelsSent)} cancels sent`);
        assert.equal(bystanders.cancelled, 0, `${bystanders.cancelled} of ${bystanders.statements} bystander statements were cancelled by another client's cancel`);
        assert.equal(idle.nextStatementCancelled, 0, `a cancel sent while idle cancelled the next statement ${idle.nextStatementCancelled} times of ${idle.rounds} (a late cancel)`);
        assert.ok(canceller.cancelled! <= (r.cancelsSent as number), 'more statements cancelled than cancels sent');
        assert.deepEqual([bystanders.other, canceller.other], [0, 0], `other errors: ${JSON.stringify(r.errors)}`);
      });

      feature('libpq startup parameters', async (t) => scenario(t, 'startup'), (r) => {
        assertAppliedOrRefused('options=-c ...', r.options as Json);
        assertAppliedOrRefused('PGTZ', r.PGTZ as Json);
        const application = r.application_name as Json;
        assertAppliedOrRefused('application_name', application);
        if (application.refused === undefined) {
          assert.equal(application.pgStatActivity, (application.expected as Json).application_name, 'pg_stat_activity.application_name of the backend running the client');
        }
        for (const variant of ['leakApplicationName', 'leakOptions']) {
          const leak = r[variant] as Json;
          if (typeof leak.refused === 'string') {
            assert.match(leak.refused, /options|application_name|statement_timeout|search_path/i, `${variant}: refused without naming the parameter`);
          } else {
            assert.equal(leak.mismatches, 0, `${variant}: ${String(leak.mismatches)} of ${String(leak.checks)} checks saw settings that were not the client's own: ${JSON.stringify(leak.samples)}`);
          }
        }
      });

      feature('libpq without application_name', async (t) => (await scenario(t, 'startup')).noApplicationName as Json, (r) => {
        assertAppliedOrRefused('no application_name', r);
      });

      feature('libpq max_protocol_version=3.2', async (t) => (await scenario(t, 'startup')).protocol32 as Json, (r) => {
        if (r.skipped === true) return 'skip'; // libpq older than 18 cannot ask for 3.2; the raw-socket test below covers the reply
        assert.deepEqual(outcome(r as unknown as Step), outcome(direct('libpq max_protocol_version=3.2') as unknown as Step), JSON.stringify(r));
        return undefined;
      });

      feature('session state', async (t) => scenario(t, 'session-state'), (r) => {
        const want = direct('session state');
        for (const [kind, expected] of Object.entries(want)) {
          const got = r[kind] as Record<string, Step> | Step;
          if ('ok' in (expected as Json)) {
            assert.deepEqual(outcome(got as Step), outcome(expected as Step), `${kind}: ${JSON.stringify(got)}, direct: ${JSON.stringify(expected)}`);
            continue;
          }
          for (const [part, step] of Object.entries(expected as Record<string, Step>)) {
            assert.deepEqual(outcome((got as Record<string, Step>)[part]), outcome(step), `${kind} (${part}): ${JSON.stringify(got)}, direct: ${JSON.stringify(expected)}`);
          }
        }
      });

      feature('psycopg 3 prepared', async (t) => (await scenario(t, 'psycopg3')).prepared as Json, (r) => {
        assert.ok(r.deallocateAllSent, 'no rollback happened with prepared statements held');
        assert.equal(r.failed, 0, `${String(r.failed)} of ${String(r.transactions)} transactions failed: ${JSON.stringify(r.errors)}`);
      });

      feature('psycopg 3 SQL statement commands', async (t) => (await scenario(t, 'psycopg3')).sqlCommands as Json, (r) => {
        const want = direct('psycopg 3 SQL statement commands');
        for (const [step, expected] of Object.entries(want)) {
          assert.deepEqual(outcome(r[step] as Step), outcome(expected as Step), `step ${step}: ${JSON.stringify(r[step])}, direct: ${JSON.stringify(expected)}`);
        }
      });

      feature('psycopg 3 backend pid', async (t) => (await scenario(t, 'psycopg3')).identity as Json, (r, t) => {
        const want = direct('psycopg 3 backend pid');
        if (t.mode !== 'transaction') {
          for (const [step, expected] of Object.entries(want)) {
            assert.deepEqual(outcome(r[step] as Step), outcome(expected as Step), `step ${step}: ${JSON.stringify(r[step])}, direct: ${JSON.stringify(expected)}`);
          }
          return;
        }
        // Transaction mode has no fixed backend: the pid names none (docs/transaction-mode.md), so terminating it ends nothing.
        assert.deepEqual(outcome(r.pidIsBackendPid as Step), { value: false });
        assert.deepEqual(outcome(r.cancel as Step), outcome(want.cancel as Step));
        assert.deepEqual(outcome(r.terminateOwnPid as Step), { value: false });
      });

      feature('psycopg 3 cancel while the pool is busy', async (t) => (await scenario(t, 'psycopg3')).cancelWhileQueued as Json, (r) => {
        // Transaction mode: the statement waits in the sidecar for a server connection, and the cancel is answered there.
        assert.deepEqual(outcome(r.cancelled as Step), { sqlstate: '57014' }, JSON.stringify(r));
        assert.equal(r.beforeHoldersEnd, true, `57014 after ${String(r.seconds)} s, once the pool was free again`);
        assert.deepEqual(outcome(r.next as Step), { value: 42 }, JSON.stringify(r.next));
      });

      feature('asyncpg pool prepared', async (t) => (await scenario(t, 'asyncpg')).poolPrepared as Json, (r) => {
        assert.equal(r.refused, undefined);
        assert.equal(r.failed, 0, `${String(r.failed)} of ${String(r.queries)} failed: ${JSON.stringify(r.errors)}`);
      });

      feature('asyncpg server_settings', async (t) => (await scenario(t, 'asyncpg')).serverSettings as Json, (r) => {
        assertAppliedOrRefused('server_settings', r);
      });

      feature('asyncpg timeout cancel', async (t) => (await scenario(t, 'asyncpg')).cancelByTimeout as Json, (r) => {
        assert.equal(r.raised, 'TimeoutError');
        assert.equal(r.stillRunningOnServer, 0, `the statement kept running on the server ${String(r.secondsUntilGone)} s after the cancel`);
        assert.equal(r.nextQuery, 42);
        assert.ok((r.secondsForNextQuery as number) < 1, `the next query waited ${String(r.secondsForNextQuery)} s`);
      });

      feature('pgjdbc prepared', async (t) => (await scenario(t, 'pgjdbc')).prepared as Json, (r) => {
        assert.equal(r.failed, 0, `${String(r.failed)} of ${String(r.executions)} failed: ${JSON.stringify(r.errors)}`);
      });

      feature('pgjdbc batch insert', async (t) => (await scenario(t, 'pgjdbc')).batch as Json, (r) => {
        assert.deepEqual(r, { batchCounts: 1000, rows: 1000, sum: 499500 });
      });

      feature('pgjdbc TimeZone', async (t) => (await scenario(t, 'pgjdbc')).timeZone as Json, (r) => {
        if (typeof r.error === 'string') {
          assert.match(r.error, /TimeZone/i, `refused without naming TimeZone: ${r.error}`);
          return;
        }
        assert.deepEqual(r.showTimeZone, ['Asia/Tokyo'], 'SHOW TimeZone: the JVM zone sent at startup');
        // '2024-01-01 00:00:00' read in Asia/Tokyo is 2023-12-31T15:00:00Z.
        assert.equal(r.epochMillis, 1704034800000, 'timestamptz literal read in the wrong zone');
      });

      feature('pgjdbc server version', async (t) => (await scenario(t, 'pgjdbc')).serverVersion as Json, (r) => {
        assert.deepEqual(r, direct('pgjdbc server version'));
      });

      feature('pgjdbc more connections than the pool', async (t) => (await scenario(t, 'pgjdbc')).manyConnections as Json, (r) => {
        assert.equal(r.failed, 0, `${String(r.failed)} of ${String(r.connections)} default pgjdbc connections failed: ${JSON.stringify(r.errors)}`);
        assert.deepEqual(r.seen, { '3/PostgreSQL JDBC Driver': 2 * (r.connections as number) }, 'each connection sees the settings its own SETs made');
      });

      feature('node-postgres shared statement', async (t) => (await scenario(t, 'node-postgres')).sharedStatementSchemaChange as Json, (r, t) => {
        if (t.mode === 'transaction') assert.ok(r.steeredToSameBackend, 'could not run the second client on the first client\'s server connection');
        const want = direct('node-postgres shared statement');
        for (const step of ['aFirst', 'alter', 'bFirst', 'bAgain']) {
          assert.deepEqual(outcome(r[step] as Step), outcome(want[step] as Step), `${step}: ${JSON.stringify(r[step])}, direct: ${JSON.stringify(want[step])}`);
        }
      });

      feature('node-postgres 40,000 parameters', async (t) => (await scenario(t, 'node-postgres')).manyParameters as Json, (r) => {
        assert.deepEqual(outcome(r.insert as Step), { value: 40000 }, JSON.stringify(r.insert));
        assert.deepEqual(outcome(r.after as Step), { value: '40000' }, JSON.stringify(r.after));
      });

      feature('re-Parse after a failed Parse', async (t) => (await scenario(t, 'node-postgres')).reparseAfterFailedParse as Json, (r) => {
        assert.deepEqual(r, { types: 'EZ12DCZ', errors: ['42704'] }, 'the second Parse of the name must define it anew');
      });

      feature('Terminate as first bytes', async (t) => (await scenario(t, 'node-postgres')).terminateFirst as Json, (r) => {
        assert.deepEqual(r, { bytesReceived: 0, closed: true, types: '' }, 'a Terminate before the startup message is closed silently');
      });

      feature('server terminates the backend', async (t) => (await scenario(t, 'node-postgres')).serverTerminated as Json, (r) => {
        const want = direct('server terminates the backend');
        assert.deepEqual(outcome(r.terminate as Step), outcome(want.terminate as Step), `the FATAL of the terminated backend: ${JSON.stringify(r.terminate)}`);
        const terminate = r.terminate as Step & { severity?: string };
        if (terminate.severity === 'FATAL') {
          // A FATAL ends the session: the client's connection closes, as direct, and nothing more comes.
          assert.deepEqual(outcome(r.queued as Step), outcome(want.queued as Step), `a query queued behind the FATAL: ${JSON.stringify(r.queued)}, direct: ${JSON.stringify(want.queued)}`);
        } else {
          // A pooler that keeps the client reports the lost backend as an ERROR and serves the next query.
          assert.deepEqual(outcome(r.queued as Step), { value: 1 }, JSON.stringify(r.queued));
        }
      });

      feature('Terminate behind a query', async (t) => (await scenario(t, 'node-postgres')).terminateAfterQuery as Json, (r) => {
        assert.deepEqual(r, direct('Terminate behind a query'), 'a query written before the Terminate is answered before the close');
      });

      /** A DBD::Pg scenario's result, or the whole result when the driver is not installed (it says so). */
      const dbdpg = async (t: Target, part: string): Promise<Json> => {
        const r = await scenario(t, 'dbdpg');
        return typeof r.skipped === 'string' ? r : r[part] as Json;
      };

      feature('DBD::Pg basics', async (t) => dbdpg(t, 'basics'), (r) => {
        assert.deepEqual(r.errors, [], 'named statements across transactions, a savepoint, COPY, an async query and its cancel, ping');
        assert.equal(r.rounds, 10);
      });

      feature('DBD::Pg last_insert_id, client alone', async (t) => dbdpg(t, 'lastInsertIdAlone'), (r) => {
        assert.deepEqual([r.own, r.other, r.refused, r.errors], [4, 0, [], []], 'a client whose server connection no other client had reads its own id, as direct');
      });

      /**
       * Two clients taking turns, each reading the id its INSERT made: never the other's; in transaction mode,
       * the reads after another client's nextval() on the shared connection are refused, saying why.
       */
      const ownIdsTakingTurns = (r: Json, t: Target): void => {
        assert.equal(r.other, 0, `read another client's id ${String(r.other)} times`);
        assert.deepEqual(r.errors, []);
        if (t.mode !== 'transaction') {
          assert.deepEqual([r.own, r.refused], [8, []]);
          return;
        }
        const refused = r.refused as string[];
        assert.ok(refused.length > 0, 'two clients taking turns on one idle connection: expected a refusal');
        assert.equal((r.own as number) + refused.length, r.reads);
      };

      feature('DBD::Pg last_insert_id, clients taking turns', async (t) => dbdpg(t, 'lastInsertIdTurns'), ownIdsTakingTurns);

      feature('DBD::Pg last_insert_id in the INSERT\'s transaction', async (t) => dbdpg(t, 'lastInsertIdInTransaction'), (r) => {
        assert.deepEqual([r.own, r.other, r.refused, r.errors], [8, 0, [], []], 'AutoCommit off: the read in the transaction of its INSERT is the client\'s own');
      });

      /** A PHP scenario's result, or the whole result when PHP or its PostgreSQL extensions are not installed (it says so). */
      const php = async (t: Target, part: string): Promise<Json> => {
        const r = await scenario(t, 'php');
        return typeof r.skipped === 'string' ? r : r[part] as Json;
      };
      /** Each step's value or SQLSTATE, as direct's. */
      const asDirect = (title: string, r: Json, steps: string[]): void => {
        const d = direct(title);
        for (const s of steps) assert.deepEqual(outcome(r[s] as Step), outcome(d[s] as Step), `${title}: ${s}: ${JSON.stringify(r[s])}, direct ${JSON.stringify(d[s])}`);
      };

      feature('PHP PDO named statements', async (t) => php(t, 'pdoStatements'), (r) => {
        assert.deepEqual(r.errors, [], 'PDO statements kept across transactions and destroyed (DEALLOCATE), two connections taking turns, an error rolled back');
        assert.equal(r.rounds, 10);
      });

      feature('PHP PDO persistent connection', async (t) => php(t, 'pdoPersistent'), (r) => {
        asDirect('PHP PDO persistent connection', r, ['set', 'first', 'applicationName', 'second', 'inTransaction', 'reset']);
      });

      feature('PHP PDO COPY', async (t) => php(t, 'pdoCopy'), (r) => {
        asDirect('PHP PDO COPY', r, ['in', 'out', 'bad', 'after', 'inTransaction']);
      });

      feature('PHP PDO lastInsertId, client alone', async (t) => php(t, 'lastInsertIdAlone'), (r) => {
        assert.deepEqual([r.own, r.other, r.refused, r.errors], [4, 0, [], []], 'a client whose server connection no other client had reads its own id, as direct');
      });

      for (const [title, part] of [['PHP PDO lastInsertId, clients taking turns', 'lastInsertIdTurns'], ['PHP PDO lastInsertId without a sequence name, clients taking turns', 'lastInsertIdLastval']] as const) {
        feature(title, async (t) => php(t, part), ownIdsTakingTurns);
      }

      feature('PHP PDO lastInsertId in the INSERT\'s transaction', async (t) => php(t, 'lastInsertIdInTransaction'), (r) => {
        assert.deepEqual([r.own, r.other, r.refused, r.errors], [8, 0, [], []], 'the read in the transaction of its INSERT is the client\'s own');
      });

      feature('PHP pg_prepare and pg_execute', async (t) => php(t, 'pgPrepared'), (r) => {
        assert.deepEqual(r.errors, [], 'one statement name, two connections taking turns, across transactions, DEALLOCATE then 26000, prepared again');
      });

      feature('PHP pg_cancel_query', async (t) => php(t, 'pgCancel'), (r) => {
        assert.equal(r.cancelled, true);
        assert.equal(r.within2s, true, `pg_cancel_query returned after ${String(r.seconds)} s`);
        asDirect('PHP pg_cancel_query', r, ['next', 'stillRunning']);
      });

      feature('PHP pg_get_notify', async (t) => php(t, 'pgNotify'), (r, t) => {
        const d = direct('PHP pg_get_notify');
        assert.deepEqual([r.listen, r.other, r.own, r.afterUnlisten], [d.listen, d.other, d.own, d.afterUnlisten], 'the other connection\'s and its own notification, nothing after UNLISTEN');
        // Transaction mode: no fixed backend, so the pids name none of the connections' (docs/transaction-mode.md).
        if (t.mode !== 'transaction') assert.deepEqual([r.otherPidIsSender, r.ownPidIsGetPid], [true, true]);
      });

      feature('psqlODBC connections taking turns', async (t) => scenario(t, 'odbc'), (r) => {
        // More connections than the transaction-mode grant, each logged in with psqlODBC's SETs and a SHOW: none is pinned for them.
        const d = direct('psqlODBC connections taking turns');
        assert.deepEqual(outcome(r.connect as Step), outcome(d.connect as Step), `connect: ${JSON.stringify(r.connect)}`);
        assert.deepEqual((r.turns as Step[]).map(outcome), (d.turns as Step[]).map(outcome), 'each statement\'s result, DateStyle and extra_float_digits');
      });

      feature('psqlODBC transaction with a failing statement', async (t) => scenario(t, 'odbc'), (r) => {
        // psqlODBC's savepoint per statement, and DEALLOCATE inside `SAVEPOINT ...;DEALLOCATE "_PLAN0x...";RELEASE ...`.
        asDirect('psqlODBC transaction with a failing statement', r, ['create', 'insert', 'failing', 'afterFailure', 'duplicate', 'second', 'commit', 'committed', 'rolledBackInsert', 'rollback', 'afterRollback', 'drop']);
      });

      feature('protocol negotiation', async (t) => (await scenario(t, 'node-postgres')).protocolVersions as Json, (r) => {
        for (const [asked, reply] of Object.entries(r as Record<string, Json>)) {
          assert.equal(reply.type, 'v', `${asked}: first reply ${JSON.stringify(reply)}, not NegotiateProtocolVersion`);
          assert.equal(reply.version, 196608, `${asked}: NegotiateProtocolVersion must carry the whole version 3.0 (196608)`);
          assert.deepEqual(reply.options, asked.startsWith('_pq_.') ? [asked] : [], `${asked}: unrecognized options`);
        }
      });
    });
  }
});
