/**
 * tokio-postgres (Rust) against four targets: PostgreSQL direct, PgBouncer
 * (transaction mode), the sidecar in transaction mode with a grant of 2 (8
 * clients, each its own connection, share 2 server connections) and in
 * session mode. tokio-postgres prepares every `query` under a name of its own
 * (`s0`, `s1`, ... per process) and closes it when done, and pipelines the
 * requests of futures polled together. The program
 * (test/drivers/tokio-postgres-driver, built once from Debian's packaged
 * crates) runs parameterised queries across many transactions, 3 processes
 * whose statement names are the same, explicit `prepare` reused across
 * transactions, `join_all` pipelines (with an error in the middle),
 * user-defined type lookups, savepoints and a portal, `simple_query` and
 * `batch_execute`, text and binary COPY, LISTEN/NOTIFY through
 * `poll_message`, statement_timeout, futures dropped mid-query and
 * `cancel_query`; each step's "compare" part must be the same through the
 * sidecar as direct. PgBouncer's results are recorded, not asserted
 * (docs/compatibility.md has them).
 *
 * POOLKEEPER_DRIVERS_REPORT=<file> writes every measured result there.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cargoProgram } from '../support/cargo-program.ts';
import { testEnvironment } from '../support/hooks.ts';
import { startTestSidecar, type TestSidecar } from '../support/sidecar-fixture.ts';
import { MissingPrerequisiteError } from '../../src/devenv/system.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';

const env = testEnvironment();
const PROGRAM_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'drivers', 'tokio-postgres-driver');
/** The Debian crate directories the program is built from (scripts/setup.sh installs their packages). */
const CRATES = ['tokio-postgres-0.7', 'tokio-1.', 'futures-util-0.3', 'serde_json-1.', 'bytes-1.'];
const CLIENTS = 8;
const SIDECAR_TRANSACTION_GRANT = 2;
// 8 concurrent clients, the 3 processes' 12, and the steps' second connections.
const SIDECAR_SESSION_GRANT = 16;

type TargetName = 'direct' | 'pgbouncer' | 'sidecar-transaction' | 'sidecar-session';
const TARGETS: readonly TargetName[] = ['direct', 'pgbouncer', 'sidecar-transaction', 'sidecar-session'];
type Json = Record<string, unknown>;
interface Step { compare: Json; detail?: unknown }

/** The concurrent steps, whose every query direct must run without a failure. */
const TALLIED_STEPS = ['queries', 'processes', 'prepared', 'pipeline', 'typeInfo', 'copyConcurrent'];

/**
 * Steps whose compared result differs from direct by design in transaction
 * mode (docs/transaction-mode.md): the part that differs, and what it is there.
 */
const TRANSACTION_MODE_DIFFERS: Record<string, (compare: Json) => Json> = {};

function runProgram(binary: string, config: Json): Promise<Record<string, Step>> {
  const childEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PG')));
  return new Promise((resolve, reject) => {
    execFile(binary, [JSON.stringify(config)], { timeout: 120_000, maxBuffer: 16 << 20, env: childEnv }, (error, stdout, stderr) => {
      const last = stdout.trim().split('\n').pop() ?? '';
      if (error) {
        reject(new Error(`tokio-postgres-driver: ${error.killed ? 'no result within 120 s (a hang; the last step it began is on stderr)' : error.message}\n${stderr.slice(-2000)}`));
        return;
      }
      try {
        resolve(JSON.parse(last) as Record<string, Step>);
      } catch {
        reject(new Error(`tokio-postgres-driver printed no JSON result:\n${stdout.slice(-1000)}\n${stderr.slice(-2000)}`));
      }
    });
  });
}

describe('tokio-postgres: direct, PgBouncer, sidecar transaction and session mode', function () {
  this.timeout(240_000);
  this.slow(30_000);
  let postgres: PostgresServer;
  const sidecars: TestSidecar[] = [];
  const results = new Map<TargetName, Record<string, Step>>();
  const ports = new Map<TargetName, number>();
  let binary: string;

  before(async function () {
    this.timeout(1_500_000); // the first build compiles tokio-postgres and its crates
    try {
      binary = await cargoProgram(PROGRAM_DIR, 'tokio-postgres-driver', CRATES);
    } catch (error) {
      if (!(error instanceof MissingPrerequisiteError)) throw error;
      console.log(`      skipped: ${error.message}`);
      this.skip();
    }
    postgres = await env.postgres();
    const pgbouncer = await env.pgbouncer();
    const [transaction, session] = await Promise.all([
      startTestSidecar(postgres, { mode: 'transaction', grant: SIDECAR_TRANSACTION_GRANT }),
      startTestSidecar(postgres, { mode: 'session', grant: SIDECAR_SESSION_GRANT }),
    ]);
    sidecars.push(transaction, session);
    ports.set('direct', postgres.port).set('pgbouncer', pgbouncer.port).set('sidecar-transaction', transaction.port).set('sidecar-session', session.port);
  });

  after(async function () {
    await Promise.all(sidecars.map((s) => s.stop()));
    const reportFile = process.env.POOLKEEPER_DRIVERS_REPORT;
    if (reportFile) writeFileSync(reportFile, JSON.stringify(Object.fromEntries(results), null, 1));
  });

  const suffix = randomBytes(3).toString('hex');
  for (const name of TARGETS) {
    it(`${name}: every step as direct${name === 'pgbouncer' ? ' (PgBouncer: recorded, not asserted)' : ''}`, async function () {
      const login = (port: number, user: string, password: string): string =>
        `host=127.0.0.1 port=${port} user=${user} password=${password} dbname=app sslmode=disable`;
      const mode = name === 'direct' ? 'direct' : name === 'sidecar-session' ? 'session' : 'transaction';
      const r = await runProgram(binary, {
        conn: login(ports.get(name)!, postgres.app.user, postgres.app.password),
        admin: login(postgres.port, postgres.superuser.user, postgres.superuser.password),
        suffix: `${name.slice(0, 1)}${name.endsWith('session') ? 's' : ''}_${suffix}`, clients: CLIENTS, rounds: 12,
      });
      results.set(name, r);
      if (name === 'pgbouncer') return;
      for (const step of Object.values(r)) assert.equal(step.compare.hang, undefined, `${name}: ${String(step.compare.hang)}`);
      const direct = results.get('direct');
      if (name === 'direct' || !direct) {
        // Direct is the reference: every concurrent step ran without a failure, and the errors are the expected ones.
        for (const stepName of TALLIED_STEPS) {
          const { failed, wrong } = r[stepName]!.compare;
          assert.deepEqual({ failed, wrong }, { failed: 0, wrong: 0 }, `${name} ${stepName}: ${JSON.stringify(r[stepName])}`);
        }
        assert.deepEqual(r.setup!.compare, { value: 'created' });
        assert.deepEqual(r.pipelineError!.compare.prepared, [{ value: 10 }, { value: 5 }, { sqlstate: '22012' }, { value: 2 }, { value: 10 }]);
        assert.deepEqual(r.cancel!.compare.sleep, { sqlstate: '57014' }, JSON.stringify(r.cancel));
        assert.deepEqual((r.listenNotify!.compare.fromOther as Json).value, 'from another', JSON.stringify(r.listenNotify));
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
