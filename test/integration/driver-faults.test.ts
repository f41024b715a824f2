/**
 * Real drivers, each with its own pool of long-lived connections, through the
 * sidecar's in-place pool disposal and a PostgreSQL restart: psycopg2 (with
 * SQLAlchemy's QueuePool and pool_pre_ping when SQLAlchemy is installed),
 * asyncpg's create_pool, pgjdbc, node-postgres's Pool; every driver in
 * transaction and session mode at once, while the test
 *
 *  1. rotates the role's password in place, both orders (Secret first, then
 *     ALTER ROLE; ALTER ROLE first, then the Secret), the Secret directory
 *     rewritten as the kubelet does (a new timestamped directory, `..data`
 *     swapped): no app error, and no server connection of the old password left;
 *  2. drains the sidecar as a rollout does, with transactions in flight: none
 *     of them fails or is lost; what each driver gets for new work is recorded;
 *  3. restarts PostgreSQL (fast shutdown): what each driver sees through the
 *     sidecar is compared with the same program connected directly; an error
 *     only the sidecar gives must be a PostgreSQL error that says why.
 *
 * The load programs (test/drivers/drv_fault_*.py, FaultLoad.java,
 * fault-load.ts) print every error with its SQLSTATE and message.
 * POOLKEEPER_DRIVER_FAULTS_REPORT=<file> writes every result there (the source
 * of docs/compatibility.md, "Drivers through rotation, drain and a restart").
 */
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { testEnvironment } from '../support/hooks.ts';
import { startTestSidecar, type TestSidecar } from '../support/sidecar-fixture.ts';
import type { PostgresRole, PostgresServer } from '../../src/devenv/postgres.ts';

const env = testEnvironment();
const driversDir = join(dirname(fileURLToPath(import.meta.url)), '..', 'drivers');
const PYTHON = '/usr/bin/python3'; // Debian's: the one the python3-* driver packages belong to
const PGJDBC_JAR = '/usr/share/java/postgresql.jar';
const WORKERS = 4;
const DRIVERS = ['psycopg2', 'asyncpg', 'pgjdbc', 'node-postgres'] as const;
type Driver = (typeof DRIVERS)[number];
type Mode = 'transaction' | 'session';
const MODES: readonly Mode[] = ['transaction', 'session'];
type TargetName = Mode | 'direct';
/** Server connections per sidecar: transaction mode shares a few; session mode needs one per client. */
const GRANT: Record<Mode, number> = { transaction: 4, session: DRIVERS.length * WORKERS };
const SCENARIOS = ['rotation, Secret first', 'rotation, ALTER ROLE first', 'drain', 'PostgreSQL restart'] as const;
type Scenario = (typeof SCENARIOS)[number];

interface Login { host: string; port: number; user: string; password: string; dbname: string }
interface LoadError { when: 'before' | 'after'; stage: 'new' | 'inflight' | 'commit' | 'release' | 'idle' | 'unhandled'; sqlstate: string; message: string; count: number }
/** atFault: transactions past their read when the fault began (running on a server connection); atFaultFailed: those of them that failed. */
interface LoadResult { driver: string; version: string; pool: string; committed: number; commitUnknown: number; errors: LoadError[]; atFault: number; atFaultFailed: string[]; crashed?: string }
/** One load program's run: its result, the rows it left and how many of them came after the fault. */
interface Measured { result: LoadResult; rows: number; rowsAfterFault: number; stopMs?: number }
type PhaseResult = Map<string, Measured>;

const key = (driver: Driver, target: TargetName): string => `${driver}/${target}`;

/** Why a driver cannot run here, or undefined. */
const unavailable = new Map<Driver, string>();
let javaClasses = '';

function missing(driver: Driver): string | undefined {
  const python = (module: string): string | undefined => {
    try {
      execFileSync(PYTHON, ['-c', `import ${module}`], { stdio: 'ignore' });
      return undefined;
    } catch {
      return `${PYTHON} cannot import ${module} (Debian: python3-${module})`;
    }
  };
  switch (driver) {
    case 'psycopg2': return python('psycopg2');
    case 'asyncpg': return python('asyncpg');
    case 'pgjdbc': {
      if (!existsSync(PGJDBC_JAR)) return `${PGJDBC_JAR} is not installed (Debian: libpostgresql-jdbc-java)`;
      try {
        execFileSync('javac', ['-version'], { stdio: 'ignore' });
        return undefined;
      } catch {
        return 'javac is not installed (Debian: default-jdk-headless)';
      }
    }
    case 'node-postgres': return undefined;
  }
}

/** A running load program, driven through its stdin. */
class Load {
  readonly ready: Promise<void>;
  /** The program has marked the fault (its answer to "fault"). */
  readonly faultSeen: Promise<void>;
  readonly done: Promise<LoadResult>;
  private readonly child: ChildProcess;

  constructor(driver: Driver, login: Login, run: string) {
    const config = JSON.stringify({ target: login, run, workers: WORKERS });
    // No PG* variables from the caller's environment.
    const childEnv = { ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PG'))), PYTHONDONTWRITEBYTECODE: '1' };
    const [command, args] = driver === 'psycopg2' ? [PYTHON, ['drv_fault_psycopg2.py', config]]
      : driver === 'asyncpg' ? [PYTHON, ['drv_fault_asyncpg.py', config]]
        : driver === 'pgjdbc' ? ['java', ['-cp', `${javaClasses}:${PGJDBC_JAR}`, 'FaultLoad', `jdbc:postgresql://${login.host}:${login.port}/${login.dbname}`, login.user, login.password, run, String(WORKERS)]]
          : [process.execPath, ['fault-load.ts', config]];
    this.child = spawn(command, args, { cwd: driversDir, env: childEnv, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let markReady: () => void = () => undefined;
    let markFaultSeen: () => void = () => undefined;
    this.ready = new Promise((resolve) => (markReady = resolve));
    this.faultSeen = new Promise((resolve) => (markFaultSeen = resolve));
    this.child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
      stdout += chunk;
      if (stdout.includes('{"ready":true}') || stdout.includes('{"ready": true}')) markReady();
      if (stdout.includes('{"fault":true}') || stdout.includes('{"fault": true}')) markFaultSeen();
    });
    this.child.stderr!.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    this.child.stdin!.on('error', () => undefined);
    const label = `${driver} ${login.host}:${login.port}`;
    this.done = new Promise((resolve, reject) => {
      this.child.once('close', (code) => {
        const last = stdout.trim().split('\n').pop() ?? '';
        try {
          const result = JSON.parse(last) as LoadResult;
          if ('ready' in result || 'fault' in result) throw new Error('no result line');
          resolve(result);
        } catch {
          reject(new Error(`${label} exited ${String(code)} without a result:\n${stderr.slice(-3000)}\n${stdout.slice(-1000)}`));
        }
      });
    });
    // A program that dies before its first commit must not leave `ready` pending.
    void this.done.catch(() => undefined).then(() => {
      markReady();
      markFaultSeen();
    });
  }

  fault(): void {
    this.child.stdin!.write('fault\n');
  }

  async stop(timeoutMs = 30_000): Promise<LoadResult> {
    this.child.stdin!.end('stop\n');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), timeoutMs);
    try {
      return await this.done;
    } finally {
      clearTimeout(timer);
    }
  }

  kill(): void {
    if (this.child.exitCode === null) this.child.kill('SIGKILL');
  }
}

/**
 * Publishes credentials as the kubelet updates a Secret volume: the files in a
 * new timestamped directory, the `..data` symlink swapped to it atomically, the
 * top-level names links through `..data`.
 */
function publishSecret(dir: string, role: PostgresRole): void {
  const version = `..${new Date().toISOString().replace(/[-:.]/g, '_')}.${randomBytes(4).toString('hex')}`;
  mkdirSync(join(dir, version));
  writeFileSync(join(dir, version, 'username'), role.user);
  writeFileSync(join(dir, version, 'password'), role.password);
  symlinkSync(version, join(dir, '..data_tmp'));
  renameSync(join(dir, '..data_tmp'), join(dir, '..data'));
  for (const name of ['username', 'password']) {
    rmSync(join(dir, name), { force: true });
    symlinkSync(join('..data', name), join(dir, name));
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function waitFor(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

const sidecarLogin = (sidecar: TestSidecar): Login => ({ host: '127.0.0.1', port: sidecar.port, user: sidecar.role.user, password: 'unused: loopback clients are trusted', dbname: 'app' });

describe('real drivers through rotation, drain and a PostgreSQL restart', function () {
  this.timeout(120_000);
  this.slow(20_000);
  let postgres: PostgresServer;
  const roles = new Map<Mode, PostgresRole>();
  const phases = new Map<Scenario, Promise<PhaseResult>>();
  const notes = new Map<Scenario, string[]>();
  // POOLKEEPER_FAULT_DRIVERS=asyncpg,pgjdbc runs those only (a closer look at one driver).
  const only = process.env.POOLKEEPER_FAULT_DRIVERS?.split(',');
  const available = (): Driver[] => DRIVERS.filter((d) => !unavailable.has(d) && (only === undefined || only.includes(d)));

  before(async function () {
    postgres = await env.postgres();
    for (const d of DRIVERS) {
      const why = missing(d);
      if (why) unavailable.set(d, why);
    }
    const suffix = randomBytes(3).toString('hex');
    for (const mode of MODES) {
      const role = { user: `drv_fault_${mode}_${suffix}`, password: randomBytes(12).toString('base64url') };
      await postgres.query(`CREATE ROLE ${role.user} LOGIN PASSWORD '${role.password}'`);
      await postgres.query(`GRANT CONNECT ON DATABASE app TO ${role.user}`);
      roles.set(mode, role);
    }
    await postgres.query('CREATE UNLOGGED TABLE IF NOT EXISTS drv_fault (run text NOT NULL, worker int NOT NULL, seq int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())');
    await postgres.query('CREATE INDEX IF NOT EXISTS drv_fault_run ON drv_fault (run, worker)');
    for (const role of roles.values()) await postgres.query(`GRANT SELECT, INSERT ON drv_fault TO ${role.user}`);
    if (!unavailable.has('pgjdbc')) {
      javaClasses = mkdtempSync(join(tmpdir(), 'poolkeeper-fault-load-'));
      await new Promise<void>((resolve, reject) => {
        execFile('javac', ['-d', javaClasses, '-cp', PGJDBC_JAR, join(driversDir, 'FaultLoad.java'), join(driversDir, 'JsonText.java')], { timeout: 60_000 }, (error, _out, stderr) => (error ? reject(new Error(`javac: ${stderr}`)) : resolve()));
      });
    }
  });

  after(async function () {
    if (javaClasses) rmSync(javaClasses, { recursive: true, force: true });
    const report: Record<string, unknown> = {};
    for (const [scenario, pending] of phases) {
      const result = await pending.catch((e: Error) => e.message);
      report[scenario] = typeof result === 'string' ? { failed: result } : { results: Object.fromEntries(result), notes: notes.get(scenario) ?? [] };
    }
    if (process.env.POOLKEEPER_DRIVER_FAULTS_REPORT) writeFileSync(process.env.POOLKEEPER_DRIVER_FAULTS_REPORT, JSON.stringify(report, null, 1));
    if (postgres) {
      await postgres.query('DROP TABLE IF EXISTS drv_fault').catch(() => undefined);
      for (const role of roles.values()) await postgres.query(`DROP ROLE IF EXISTS ${role.user}`).catch(() => undefined);
    }
  });

  /**
   * Runs every available driver against every target at once; `fault` runs
   * once all commit, and calls `mark` as the fault begins (the programs are
   * told, and the database's time is taken); `settleMs` of load follow it. Returns each program's result and the rows it wrote.
   */
  async function phase(scenario: Scenario, targets: Map<TargetName, Login>, fault: (mark: () => Promise<Date>) => Promise<void>, settleMs: number): Promise<PhaseResult> {
    const runs = new Map<string, { load: Load; run: string }>();
    try {
      for (const driver of available()) {
        for (const [target, login] of targets) {
          const run = `${scenario.replace(/\W+/g, '-')}/${key(driver, target)}/${randomBytes(3).toString('hex')}`;
          runs.set(key(driver, target), { load: new Load(driver, login, run), run });
        }
      }
      await Promise.race([
        Promise.all([...runs.values()].map((r) => r.load.ready)),
        sleep(60_000).then(() => { throw new Error('the load programs did not commit within 60 s'); }),
      ]);
      await sleep(800);
      let faultAt: Date | undefined;
      await fault(async () => {
        faultAt = (await postgres.query<{ t: Date }>('SELECT clock_timestamp() AS t'))[0]!.t;
        for (const { load } of runs.values()) load.fault();
        // Each program has marked the moment (and which of its transactions run) before the fault begins.
        await Promise.all([...runs.values()].map((r) => r.load.faultSeen));
        return faultAt;
      });
      await sleep(settleMs);
      const results = new Map<string, Measured>();
      const stopAt = Date.now();
      const stopMs = new Map<string, number>();
      const stopped = new Map([...runs].map(([name, { load }]) => [name, load.stop()
        .catch((e: Error): LoadResult => ({ driver: name, version: '', pool: '', committed: 0, commitUnknown: 0, errors: [], atFault: 0, atFaultFailed: [], crashed: e.message }))
        .finally(() => stopMs.set(name, Date.now() - stopAt))]));
      for (const [name, { run }] of runs) {
        const result = await stopped.get(name)!;
        const [counts] = await postgres.query<{ rows: string; after: string }>('SELECT count(*) AS rows, count(*) FILTER (WHERE at > $2) AS after FROM drv_fault WHERE run = $1', [run, faultAt ?? new Date(0)]);
        results.set(name, { result, rows: Number(counts!.rows), rowsAfterFault: Number(counts!.after), stopMs: stopMs.get(name)! });
      }
      return results;
    } finally {
      for (const { load } of runs.values()) load.kill();
    }
  }

  async function sidecars(): Promise<Map<Mode, TestSidecar>> {
    const started = new Map<Mode, TestSidecar>();
    for (const mode of MODES) {
      const role = roles.get(mode)!;
      const sidecar = await startTestSidecar(postgres, { mode, grant: GRANT[mode], role, pool: { poolPrePing: true } });
      // The Secret volume as the kubelet lays it out (same content: the same credentials generation).
      publishSecret(sidecar.credentialsDir, role);
      started.set(mode, sidecar);
    }
    return started;
  }

  /** Backends of `role` that logged in before `at` (the old password's). */
  async function backendsBefore(role: PostgresRole, at: Date): Promise<number> {
    const rows = await postgres.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend' AND backend_start < $2", [role.user, at]);
    return Number(rows[0]!.n);
  }

  function rotation(scenario: Scenario, order: 'secret-first' | 'alter-first'): Promise<PhaseResult> {
    return lazily(scenario, async () => {
      const running = await sidecars();
      try {
        let rotatedAt = new Date();
        const result = await phase(scenario, new Map([...running].map(([m, s]) => [m, sidecarLogin(s)])), async (faultAt) => {
          rotatedAt = await faultAt();
          await Promise.all(MODES.map(async (mode) => {
            const sidecar = running.get(mode)!;
            const before = sidecar.sidecar.status().credentialsGeneration;
            const rotated = { user: roles.get(mode)!.user, password: randomBytes(12).toString('base64url') };
            const secret = async (): Promise<void> => {
              publishSecret(sidecar.credentialsDir, rotated);
              await waitFor('the new credentials generation', () => sidecar.sidecar.status().credentialsGeneration !== before);
            };
            const alter = (): Promise<unknown> => postgres.query(`ALTER ROLE ${rotated.user} PASSWORD '${rotated.password}'`);
            // The second half lands 1 s after the first: within poolTimeout (10 s).
            if (order === 'secret-first') {
              await secret();
              await sleep(1000);
              await alter();
            } else {
              await alter();
              await sleep(1000);
              await secret();
            }
            roles.get(mode)!.password = rotated.password;
          }));
        }, 2000);
        for (const mode of MODES) {
          const role = roles.get(mode)!;
          // Idle connections of the old password are closed at once, busy ones when released: none is left.
          let left = -1;
          await waitFor(`no ${mode} backend of the old password`, async () => (left = await backendsBefore(role, rotatedAt)) === 0, 5000).catch(() => undefined);
          notes.set(scenario, [...(notes.get(scenario) ?? []), `${mode}: ${left} server connections of the old password left`]);
          result.set(`old-password-backends/${mode}`, { result: { driver: 'sidecar', version: '', pool: '', committed: 0, commitUnknown: 0, errors: [], atFault: 0, atFaultFailed: [] }, rows: left, rowsAfterFault: 0 });
        }
        return result;
      } finally {
        await Promise.all([...running.values()].map((s) => s.stop()));
      }
    });
  }

  function lazily(scenario: Scenario, body: () => Promise<PhaseResult>): Promise<PhaseResult> {
    let pending = phases.get(scenario);
    if (!pending) phases.set(scenario, (pending = body()));
    return pending;
  }

  function drain(): Promise<PhaseResult> {
    return lazily('drain', async () => {
      const running = await sidecars();
      try {
        const result = await phase('drain', new Map([...running].map(([m, s]) => [m, sidecarLogin(s)])), async (faultAt) => {
          // Transactions are in flight (each write takes 20 ms on its server connection).
          const users = [...roles.values()].map((r) => r.user);
          await waitFor('transactions in flight', async () => Number((await postgres.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = ANY($1) AND state IN ('active', 'idle in transaction')", [users]))[0]!.n) >= 2, 5000);
          await faultAt();
          const started = Date.now();
          await Promise.all([...running.values()].map((s) => s.sidecar.drain()));
          notes.set('drain', [`both sidecars drained in ${Date.now() - started} ms`]);
        }, 1000);
        // The drain met transactions in flight: otherwise this tested nothing.
        const inFlight = [...result.values()].reduce((n, m) => n + m.result.atFault, 0);
        assert.ok(inFlight >= Math.min(4, available().length), `only ${inFlight} transactions were in flight when the drain began`);
        return result;
      } finally {
        await Promise.all([...running.values()].map((s) => s.stop()));
      }
    });
  }

  function restart(): Promise<PhaseResult> {
    return lazily('PostgreSQL restart', async () => {
      const running = await sidecars();
      try {
        const targets = new Map<TargetName, Login>([...running].map(([m, s]) => [m, sidecarLogin(s)]));
        const direct = roles.get('transaction')!;
        targets.set('direct', { host: postgres.host, port: postgres.port, user: direct.user, password: direct.password, dbname: 'app' });
        return await phase('PostgreSQL restart', targets, async (faultAt) => {
          await faultAt();
          const started = Date.now();
          await postgres.restart('fast', 500);
          notes.set('PostgreSQL restart', [`PostgreSQL down and up again in ${Date.now() - started} ms`]);
          // Drivers reconnect with backoffs of their own (asyncpg's pool among them): on a loaded machine 3 s was not always enough.
        }, 6000);
      } finally {
        await Promise.all([...running.values()].map((s) => s.stop()));
      }
    });
  }

  const describeErrors = (errors: LoadError[]): string => JSON.stringify(errors.map((e) => `${e.when}/${e.stage} ${e.sqlstate} ${e.message} x${e.count}`));

  /** What every run must show: the load ran clean until the fault, and every committed transaction is in the table. */
  function assertSound(m: Measured, label: string): void {
    const { result } = m;
    assert.equal(result.crashed, undefined, `${label}: the load program died`);
    assert.ok(result.committed >= 5, `${label}: only ${result.committed} transactions committed`);
    assert.deepEqual(result.errors.filter((e) => e.when === 'before'), [], `${label}: errors before the fault`);
    assert.ok(m.rows >= result.committed && m.rows <= result.committed + result.commitUnknown,
      `${label}: ${m.rows} rows in the table, ${result.committed} commits reported (${result.commitUnknown} COMMITs failed): a committed transaction was lost`);
  }

  for (const scenario of SCENARIOS) {
    describe(scenario, function () {
      const targets: TargetName[] = scenario === 'PostgreSQL restart' ? ['direct', ...MODES] : [...MODES];
      const run = (): Promise<PhaseResult> => scenario === 'drain' ? drain() : scenario === 'PostgreSQL restart' ? restart() : rotation(scenario, scenario === 'rotation, Secret first' ? 'secret-first' : 'alter-first');
      for (const driver of DRIVERS) {
        for (const target of targets) {
          it(`${driver}, ${target === 'direct' ? 'direct (the reference)' : `${target} mode`}`, async function () {
            if (only !== undefined && !only.includes(driver)) this.skip();
            if (unavailable.has(driver)) {
              this.test!.title += ` (skipped: ${unavailable.get(driver)!})`;
              this.skip();
            }
            const measured = (await run()).get(key(driver, target));
            assert.ok(measured, `no run of ${driver} against ${target}`);
            const label = `${driver} ${target}`;
            assertSound(measured, label);
            const { errors } = measured.result;
            if (scenario.startsWith('rotation')) {
              assert.deepEqual(errors, [], `${label}: app errors during the rotation: ${describeErrors(errors)}`);
              assert.ok(measured.rowsAfterFault > 0, `${label}: no transaction committed after the rotation began`);
            } else if (scenario === 'drain') {
              // New work after the drain began may fail (the app is being stopped too), before it begins; a transaction
              // that ran then may not, nor what the driver sends behind its COMMIT (asyncpg's reset: "release").
              assert.deepEqual(measured.result.atFaultFailed, [], `${label}: of ${measured.result.atFault} transactions in flight when the drain began, these failed`);
              // ('idle': a pooled client the app does not hold was closed: the pool drops it.)
              const begun = errors.filter((e) => e.stage !== 'new' && e.stage !== 'idle');
              assert.deepEqual(begun, [], `${label}: errors after a transaction began: ${describeErrors(begun)}`);
              // node-postgres: an 'error' event on a client the app still holds ends an app with no listener there.
              const unhandled = errors.filter((e) => e.stage === 'unhandled');
              assert.deepEqual(unhandled, [], `${label}: errors with no listener (they end the app): ${describeErrors(unhandled)}`);
            } else {
              assert.ok(measured.rowsAfterFault > 0, `${label}: no transaction committed after PostgreSQL came back`);
              if (target !== 'direct') {
                const reference = (await run()).get(key(driver, 'direct'))!.result.errors;
                const directStates = new Set(reference.map((e) => e.sqlstate));
                // An error from the server side direct did not get must say why. The driver's own reports of a
                // lost connection (no SQLSTATE, or 08003, which PostgreSQL never sends) come and go with timing,
                // direct as well: they are recorded in the report, not compared.
                const added = errors.filter((e) => !directStates.has(e.sqlstate) && /^[0-9A-Z]{5}$/.test(e.sqlstate) && e.sqlstate !== '08003');
                const silent = added.filter((e) => !/server|postgres|sidecar|poolkeeper|shut|terminat|restart|recover/i.test(e.message));
                assert.deepEqual(silent, [], `${label}: errors direct did not get, saying nothing of why: ${describeErrors(silent)} (direct: ${describeErrors(reference)})`);
              }
            }
          });
        }
      }
      if (scenario.startsWith('rotation')) {
        for (const mode of MODES) {
          it(`${mode} mode: no server connection of the old password is left`, async function () {
            if (available().length === 0) this.skip();
            const left = (await run()).get(`old-password-backends/${mode}`)!.rows;
            assert.equal(left, 0, `${left} backends of the ${mode} sidecar's role logged in before the rotation began`);
          });
        }
      }
    });
  }
});

/** Bytes the sidecar on `port` has not read yet from its clients' sockets. */
function unreadByClients(port: number): number {
  const lines = execFileSync('/usr/bin/ss', ['-tnH', 'state', 'established', `( sport = :${port} )`], { encoding: 'utf8' }).trim().split('\n');
  return lines.reduce((sum, line) => sum + (Number(line.trim().split(/\s+/)[0]) || 0), 0);
}

/** Blocks this thread (and the sidecars running on it) for `ms`. */
const blockThread = (ms: number): void => void Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

/**
 * asyncpg's pool resets a connection when the app gives it back, right after
 * its COMMIT, and raises out of `async with pool.acquire()` if that fails. A
 * drain that begins between the COMMIT's answer and the reset must let the
 * reset run: the app's transaction committed, and the drain is to be invisible.
 * Both orders: the reset sent before the drain began but not read yet (the
 * sidecar runs on this thread, which waits while it arrives), and sent after.
 */
describe('asyncpg: a connection given back to its pool just as a drain begins', function () {
  this.timeout(60_000);
  let postgres: PostgresServer;
  let dir: string;

  before(async function () {
    if (missing('asyncpg') !== undefined) this.skip();
    postgres = await env.postgres();
    dir = mkdtempSync(join(tmpdir(), 'poolkeeper-release-after-drain-'));
  });

  after(function () {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  for (const mode of MODES) {
    for (const order of ['the reset sent before the drain began, unread', 'the reset sent after the drain began'] as const) {
      it(`${mode} mode, ${order}: the pool's reset after the COMMIT runs`, async function () {
        const running = await startTestSidecar(postgres, { mode, grant: 2 });
        const release = join(dir, `${mode}-${order.length}`);
        const child = spawn(PYTHON, ['drv_release_after_drain_asyncpg.py', JSON.stringify({ target: sidecarLogin(running), release })], { cwd: driversDir, stdio: ['ignore', 'pipe', 'pipe'] });
        let stdout = '';
        let stderr = '';
        child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
        child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
        const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
        try {
          await waitFor('the COMMIT', () => stdout.includes('{"committed": true}') || child.exitCode !== null, 30_000);
          assert.ok(stdout.includes('{"committed": true}'), `the program ended before its COMMIT: ${stderr.slice(-2000)}`);
          let drained: Promise<void>;
          if (order === 'the reset sent before the drain began, unread') {
            writeFileSync(release, '');
            const deadline = Date.now() + 20_000;
            while (unreadByClients(running.port) === 0) {
              assert.ok(Date.now() < deadline, 'the reset did not arrive within 20 s');
              blockThread(5);
            }
            drained = running.sidecar.drain();
          } else {
            drained = running.sidecar.drain();
            writeFileSync(release, '');
          }
          assert.equal(running.sidecar.status().draining, true);
          await exited;
          const last = stdout.trim().split('\n').pop() ?? '';
          assert.deepEqual(JSON.parse(last), { released: true }, `the release: ${last} ${stderr.slice(-2000)}`);
          await drained;
        } finally {
          if (child.exitCode === null) child.kill('SIGKILL');
          await running.stop();
        }
      });
    }
  }
});
