/**
 * pgx v5 (Go) against four targets: PostgreSQL direct, PgBouncer (transaction
 * mode), the sidecar in transaction mode with a grant of 2 (8 clients, each
 * its own pgx.Conn, share 2 server connections) and in session mode. The
 * program (test/drivers/pgx-driver, built once) runs every query exec mode
 * across many transactions, pgxpool, statement cache eviction (queries and
 * batches), named statements of the same name on every connection, a schema
 * change under cached statements, DISCARD ALL, SendBatch with a failing
 * query, CopyFrom (alone, failing, 8 at once), a context timeout's cancel,
 * LISTEN/NOTIFY, the backend pid and a savepoint; each step's
 * "compare" part must be the same through the sidecar as direct. PgBouncer's
 * results are recorded, not asserted (docs/compatibility.md has them).
 *
 * POOLKEEPER_DRIVERS_REPORT=<file> writes every measured result there.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { goProgram } from '../support/go-program.ts';
import { DRIVER_TARGETS, startDriverTargets, targetMode, targetSuffix, targetTitle, writeDriversReport, type DriverTargetName, type DriverTargets } from '../support/driver-targets.ts';
import { MissingPrerequisiteError } from '../../src/devenv/system.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';

const PROGRAM_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'drivers', 'pgx-driver');
const CLIENTS = 8;
const SIDECAR_TRANSACTION_GRANT = 2;
const SIDECAR_SESSION_GRANT = 12; // 8 concurrent clients, and the steps' second connections

type TargetName = DriverTargetName;
type Json = Record<string, unknown>;
interface Step { compare: Json; detail?: unknown }

/**
 * Steps whose compared result differs from direct by design in transaction
 * mode (docs/transaction-mode.md): the part that differs, and what it is there.
 */
const TRANSACTION_MODE_DIFFERS: Record<string, (compare: Json) => Json> = {
  // The BackendKeyData pid names no backend: pg_backend_pid() and a notification's sender pid are another's.
  backendPid: () => ({ pidIsBackendPid: [false, false] }),
  listenNotify: (want) => ({ ...want, pids: { otherSenderIsNotifierPid: false, ownSenderIsOwnPid: false } }),
};

function runProgram(binary: string, config: Json): Promise<Record<string, Step>> {
  const childEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PG')));
  return new Promise((resolve, reject) => {
    execFile(binary, [JSON.stringify(config)], { timeout: 90_000, maxBuffer: 16 << 20, env: childEnv }, (error, stdout, stderr) => {
      const last = stdout.trim().split('\n').pop() ?? '';
      if (error) {
        reject(new Error(`pgx-driver: ${error.killed ? 'no result within 90 s (a hang; the last step it began is on stderr)' : error.message}\n${stderr.slice(-2000)}`));
        return;
      }
      try {
        resolve(JSON.parse(last) as Record<string, Step>);
      } catch {
        reject(new Error(`pgx-driver printed no JSON result:\n${stdout.slice(-1000)}\n${stderr.slice(-2000)}`));
      }
    });
  });
}

describe('pgx v5: direct, PgBouncer, sidecar transaction and session mode', function () {
  this.timeout(180_000);
  this.slow(30_000);
  let postgres: PostgresServer;
  let targets: DriverTargets | undefined;
  const results = new Map<TargetName, Record<string, Step>>();
  let ports: ReadonlyMap<TargetName, number>;
  let binary: string;

  before(async function () {
    this.timeout(600_000); // the first build downloads pgx
    try {
      binary = await goProgram(PROGRAM_DIR, 'pgx-driver');
    } catch (error) {
      if (!(error instanceof MissingPrerequisiteError)) throw error;
      console.log(`      skipped: ${error.message}`);
      this.skip();
    }
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
      const login = (port: number, user: string, password: string): string =>
        `host=127.0.0.1 port=${port} user=${user} password=${password} dbname=app sslmode=disable`;
      const mode = targetMode(name);
      const r = await runProgram(binary, {
        conn: login(ports.get(name)!, postgres.app.user, postgres.app.password),
        admin: login(postgres.port, postgres.superuser.user, postgres.superuser.password),
        suffix: targetSuffix(name, suffix), mode, clients: CLIENTS, rounds: 12,
      });
      results.set(name, r);
      if (name === 'pgbouncer') return;
      for (const step of Object.values(r)) assert.equal(step.compare.hang, undefined, `${name}: ${String(step.compare.hang)}`);
      const direct = results.get('direct');
      if (name === 'direct' || !direct) {
        // Direct is the reference: every concurrent step ran without a failure.
        for (const stepName of ['execModes', 'cacheEviction']) {
          for (const [m, counts] of Object.entries(r[stepName]!.compare)) assert.deepEqual(counts, { failed: 0, wrong: 0 }, `${name} ${stepName} ${m}: ${JSON.stringify(r[stepName]!.detail)}`);
        }
        assert.deepEqual(r.setup!.compare, { value: 'created' });
        assert.equal(r.schemaChange!.compare.alter, undefined, JSON.stringify(r.schemaChange));
        assert.equal((r.cancelTimeout!.compare.cancelRequest as Json).error, '57014', JSON.stringify(r.cancelTimeout));
        assert.ok(direct || name === 'direct', 'the direct target runs first');
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
