/**
 * Ruby's pg gem, ActiveRecord 6.1 and Sequel (Debian's ruby-pg,
 * ruby-activerecord, ruby-sequel) against four targets: PostgreSQL direct,
 * PgBouncer (transaction mode), the sidecar in transaction mode with a grant
 * of 2 (4 clients, and ActiveRecord's pool of 5 for 10 threads, share 2
 * server connections) and in session mode. The program
 * (test/drivers/drv_ruby.rb) runs ActiveRecord's prepared statements (a1,
 * a2, ... per connection) with clients taking turns, their eviction and a
 * schema change under them, a schema per tenant (search_path), transactions,
 * savepoints, row locks, session advisory locks and a migration,
 * reconnect!/verify!, and the pg gem's exec_params, prepare, cancel, COPY,
 * single-row mode, pipeline mode, clients gone mid-transaction, mid-COPY and
 * mid-statement, LISTEN/NOTIFY, statement_timeout and type maps, and
 * Sequel's prepared statements on its pool; each step's "compare" part
 * must be the same through the sidecar as direct. PgBouncer's results are
 * recorded, not asserted (docs/compatibility.md has them).
 *
 * POOLKEEPER_DRIVERS_REPORT=<file> writes every measured result there.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DRIVER_TARGETS, startDriverTargets, targetMode, targetSuffix, targetTitle, writeDriversReport, type DriverTargetName, type DriverTargets } from '../support/driver-targets.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';

const driversDir = join(dirname(fileURLToPath(import.meta.url)), '..', 'drivers');
const RUBY = '/usr/bin/ruby'; // Debian's: the one ruby-pg, ruby-activerecord and ruby-sequel belong to
const CLIENTS = 4;
const SIDECAR_TRANSACTION_GRANT = 2;
const SIDECAR_SESSION_GRANT = 14; // 10 threads on ActiveRecord's pool of 5, and the steps' other connections

type TargetName = DriverTargetName;
type Json = Record<string, unknown>;
interface Step { compare: Json; detail?: Json }

/**
 * Steps whose compared result differs from direct by design in transaction
 * mode (docs/transaction-mode.md): the part that differs, and what it is there.
 */
const TRANSACTION_MODE_DIFFERS: Record<string, (compare: Json) => Json> = {
  // The BackendKeyData pid names no backend: pg_backend_pid() and a notification's sender pid are another's.
  pgBackendPid: () => ({ pidIsBackendPid: [false] }),
  pgListenNotify: (want) => ({ ...want, otherPidIsNotifierPid: false, ownPidIsOwnPid: false }),
};

/** Steps whose concurrent clients must all succeed direct: { failed, wrong } counts. */
const COUNTED_STEPS = ['arPreparedTakingTurns', 'arStatementEviction', 'arRailsEncoding', 'arPoolThreads', 'pgExecParams', 'pgPrepared', 'sequelPrepared'];

/** The program's steps, or why it did not run (Ruby or its gems not installed: it says so). */
type Outcome = { steps: Record<string, Step> } | { skipped: string };

function runProgram(config: Json): Promise<Outcome> {
  if (!existsSync(RUBY)) return Promise.resolve({ skipped: `${RUBY} is not installed (Debian: ruby ruby-pg ruby-activerecord ruby-sequel)` });
  const childEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PG')));
  return new Promise((resolve, reject) => {
    execFile(RUBY, ['drv_ruby.rb', JSON.stringify(config)], { cwd: driversDir, timeout: 150_000, maxBuffer: 16 << 20, env: childEnv }, (error, stdout, stderr) => {
      const last = stdout.trim().split('\n').pop() ?? '';
      if (error) {
        reject(new Error(`drv_ruby.rb: ${error.killed ? 'no result within 150 s (a hang; the last step it began is on stderr)' : error.message}\n${stderr.slice(-2000)}`));
        return;
      }
      try {
        const parsed = JSON.parse(last) as Json;
        resolve(typeof parsed.skipped === 'string' ? { skipped: parsed.skipped } : { steps: parsed as Record<string, Step> });
      } catch {
        reject(new Error(`drv_ruby.rb printed no JSON result:\n${stdout.slice(-1000)}\n${stderr.slice(-2000)}`));
      }
    });
  });
}

describe('Ruby pg, ActiveRecord and Sequel: direct, PgBouncer, sidecar transaction and session mode', function () {
  this.timeout(180_000);
  this.slow(30_000);
  let postgres: PostgresServer;
  let targets: DriverTargets | undefined;
  const results = new Map<TargetName, Record<string, Step>>();
  let ports: ReadonlyMap<TargetName, number>;

  before(async function () {
    targets = await startDriverTargets({ transaction: SIDECAR_TRANSACTION_GRANT, session: SIDECAR_SESSION_GRANT });
    postgres = targets.postgres;
    ports = targets.ports;
  });

  after(async function () {
    await targets?.stop();
    writeDriversReport(results);
  });

  const suffix = randomBytes(3).toString('hex');
  for (const name of DRIVER_TARGETS) {
    it(targetTitle(name), async function () {
      const login = (port: number, user: string, password: string): Json => ({ host: '127.0.0.1', port, user, password, dbname: 'app' });
      const mode = targetMode(name);
      const outcome = await runProgram({
        target: login(ports.get(name)!, postgres.app.user, postgres.app.password),
        suffix: targetSuffix(name, suffix), mode, clients: CLIENTS,
      });
      if ('skipped' in outcome) {
        this.test!.title += ` (skipped: ${outcome.skipped})`;
        this.skip();
      }
      const r = outcome.steps;
      results.set(name, r);
      if (name === 'pgbouncer') return;
      for (const [stepName, step] of Object.entries(r)) assert.equal(step.compare.hang, undefined, `${name} ${stepName}: ${String(step.compare.hang)}`);
      const direct = results.get('direct');
      if (name === 'direct' || !direct) {
        // Direct is the reference: every step ran, and every concurrent client got its own right answers.
        assert.ok(name === 'direct', 'the direct target runs first');
        for (const [stepName, step] of Object.entries(r)) assert.equal(step.compare.error, undefined, `${name} ${stepName}: ${JSON.stringify(step)}`);
        for (const stepName of COUNTED_STEPS) {
          const { failed, wrong } = r[stepName]?.compare ?? {};
          assert.deepEqual({ failed, wrong }, { failed: 0, wrong: 0 }, `${name} ${stepName}: ${JSON.stringify(r[stepName])}`);
        }
        assert.deepEqual(r.schemaPerTenant!.compare, { activeRecord: { failed: 0, wrong: 0 }, setLocal: { failed: 0, wrong: 0 } }, JSON.stringify(r.schemaPerTenant));
        assert.deepEqual(r.clientGoneMidCopyOrQuery!.compare, { failed: 0, wrong: 0, copyRowsLeft: { value: '0' } }, JSON.stringify(r.clientGoneMidCopyOrQuery));
        assert.deepEqual(r.pgCancel!.compare.result, { sqlstate: '57014' }, JSON.stringify(r.pgCancel));
        assert.deepEqual(r.advisoryLocks!.compare.otherTryWhileHeld, { value: 'f' }, 'a session advisory lock held by another connection');
        assert.deepEqual(r.arWithLock!.compare.order, ['0 in', '0 out', '1 in', '1 out'], 'with_lock: the second waits for the first');
        return;
      }
      for (const [stepName, want] of Object.entries(direct)) {
        const differs = mode === 'transaction' ? TRANSACTION_MODE_DIFFERS[stepName] : undefined;
        const expected = differs ? differs(want.compare) : want.compare;
        assert.deepEqual(r[stepName]?.compare, expected, `${name} ${stepName}: ${JSON.stringify(r[stepName])}, direct: ${JSON.stringify(want)}`);
      }
    });
  }
});
