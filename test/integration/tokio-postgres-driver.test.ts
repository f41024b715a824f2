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
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cargoProgram } from '../support/cargo-program.ts';
import { DRIVER_TARGETS, startDriverTargets, targetMode, targetSuffix, targetTitle, writeDriversReport, type DriverTargetName, type DriverTargets } from '../support/driver-targets.ts';
import { MissingPrerequisiteError } from '../../src/devenv/system.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';

const PROGRAM_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'drivers', 'tokio-postgres-driver');
/** The Debian crate directories the program is built from (scripts/setup.sh installs their packages). */
const CRATES = ['tokio-postgres-0.7', 'tokio-1.', 'futures-util-0.3', 'serde_json-1.', 'bytes-1.'];
const CLIENTS = 8;
const SIDECAR_TRANSACTION_GRANT = 2;
// 8 concurrent clients, the 3 processes' 12, and the steps' second connections.
const SIDECAR_SESSION_GRANT = 16;

type TargetName = DriverTargetName;
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
  let targets: DriverTargets | undefined;
  const results = new Map<TargetName, Record<string, Step>>();
  let ports: ReadonlyMap<TargetName, number>;
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
        suffix: targetSuffix(name, suffix), clients: CLIENTS, rounds: 12,
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
