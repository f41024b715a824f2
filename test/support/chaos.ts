/**
 * Fault scenarios for the sidecar, shared by `npm run chaos` (bench/chaos.ts,
 * every scenario at full length) and test/integration/chaos.test.ts (a quick
 * subset with shorter faults). One implementation, two runners.
 *
 * Each scenario starts a sidecar in a child process (its RSS is its own, and
 * it can be SIGKILLed) in front of a PostgreSQL of the local environment,
 * logged in as a role of its own (`chaos`) so that its backends can be
 * counted by `usename` in pg_stat_activity whatever application_name its
 * clients set, and whoever opened them (a killed sidecar's orphans count
 * too). Clients insert unique ids in transactions while the fault runs; at
 * the end every id a client believes committed must be in the table and
 * every id whose transaction failed before COMMIT must not be.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { buildStartupMessage } from '../../src/core/protocol/index.ts';
import type { LocalEnvironment } from '../../src/devenv/environment.ts';
import type { PostgresRole, PostgresServer } from '../../src/devenv/postgres.ts';
import { freePort } from '../../src/devenv/process.ts';
import { postgresBinDir } from '../../src/devenv/system.ts';
import type { NetworkNamespace } from '../../src/devenv/network-namespace.ts';
import type { SshServer } from '../../src/devenv/sshd.ts';
import type { ServerKeepalive, SidecarSettings } from '../../src/sidecar/index.ts';
import { SidecarProcess } from './sidecar-process.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The role every chaos sidecar logs in as; its backends are the ones counted. */
export const CHAOS_ROLE = 'chaos';

/** One row of the results: what clients saw and what PostgreSQL held. */
export interface ChaosResult {
  fault: string;
  /** Transactions clients saw committed. */
  committed: number;
  /** Client errors by SQLSTATE (or `conn:<reason>` when the connection broke without one). */
  errors: Record<string, number>;
  /** One message for each error key. */
  errorMessages: Record<string, string>;
  /** Committed per the client but missing, plus failed before COMMIT but present. */
  lost: number;
  /** COMMITs that failed (connection lost during COMMIT): their outcome is unknown to the client, so not counted as lost; how many of them did commit. */
  inDoubt: { total: number; committed: number };
  /** Client requests with no answer within poolTimeout + margin (the client then gave up on its connection). */
  unanswered: number;
  /** Slowest client request, ms. */
  maxLatencyMs: number;
  /** p99 transaction latency before the fault and while it lasted, ms. */
  p99QuietMs: number;
  p99FaultMs: number;
  /** Most backends of the sidecar's role PostgreSQL held at once. */
  maxBackends: number;
  /** The grant (the limit those backends must stay under). */
  limit: number;
  /** Time samples showed more backends than the limit in force (0 after a drain is reported), ms. */
  overLimitMs: number;
  /** From the fault healed to the first commit after the last client error; null: never within the run. */
  recoveryMs: number | null;
  /** null: the sidecars ran in the runner's process (fleet scenarios). */
  rssBaseMb: number | null;
  rssMaxMb: number | null;
  /** Backends the sidecar still counted after the load stopped that PostgreSQL no longer had (full runs only). */
  phantomBackends: number;
  /** Sampling gaps (PostgreSQL down) are not counted: samples taken. */
  samples: number;
  /** Backends of the role over time: [ms since the fault, count] at each change; and the limit changes. */
  timeline: [number, number][];
  limitTimeline: [number, number][];
  notes: string[];
  /** Which goals this row misses: empty when all are met. */
  missed: string[];
}

/** Sidecars of several pods under a controller, with a limit for all of them together. */
export interface Fleet {
  /** The limit their backends together must stay under. */
  limit: number;
  /** The sidecar port client `worker` uses. */
  port(worker: number): number;
  stop(): Promise<void>;
}

/** What a scenario gets to inject its fault. */
export interface FaultContext {
  lab: ChaosLab;
  /** Current sidecar (a scenario may replace it: `restartSidecar`); not in fleet scenarios. */
  sidecar(): SidecarProcess;
  restartSidecar(): Promise<SidecarProcess>;
  /** Full-length fault (npm run chaos) or the quick variant (npm test). */
  quick: boolean;
  /** The fault is over from now (recovery is measured from here); default: when `inject` returns. */
  healed(): void;
  /** The limit in force from now on (0 once a drain is reported: the controller frees the reservation). */
  setLimit(n: number): void;
  note(text: string): void;
  /** A goal of this fault other than the common ones was missed (reported in `missed`). */
  miss(goal: string): void;
  load: Load;
  /** Port the load connects to. */
  port: number;
  /** The sidecar's grant at the start. */
  grant: number;
}

/** One fault. */
export interface Scenario {
  name: string;
  /** In the quick subset of `npm test`. */
  quick?: boolean;
  /** Through the SSH tunnel. */
  tunnel?: boolean;
  /** Against a PostgreSQL alone in a network namespace (ctx.lab.namespace), which the fault can cut off; skipped where namespaces cannot be made. */
  isolatedDatabase?: boolean;
  grant?: number;
  clients?: number;
  pool?: Partial<SidecarSettings['pool']>;
  settings?: Partial<Omit<SidecarSettings, 'pool'>>;
  /** The load is expected to see errors (e.g. 57P01 with poolPrePing off); otherwise any client error is a miss. */
  expectedErrors?: boolean;
  /** The sidecar does not serve again after this fault (a drain): recovery is not measured. */
  noRecovery?: boolean;
  /** Hostile input from a client: the other clients' p99 latency must stay within 2x of its quiet value. */
  hostile?: boolean;
  /** Instead of one sidecar: a fleet of pods under the controller (Kubernetes faults), started before the load. */
  fleet?: (lab: ChaosLab, options: { quick: boolean; logDir: string }) => Promise<Fleet>;
  inject(ctx: FaultContext): Promise<void>;
}

const POOL_TIMEOUT_S = 3;
const BACKENDS_SQL = "SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'";
/** Beyond poolTimeout, how long a request may take before it counts as unanswered. */
export const ANSWER_MARGIN_MS = 2000;

/** The environment side: PostgreSQL with the chaos role and table, sshd on demand. */
export class ChaosLab {
  readonly env: LocalEnvironment;
  readonly postgres: PostgresServer;
  /** The network namespace PostgreSQL runs alone in (the lab of `isolated()`); undefined: on loopback. */
  readonly namespace: NetworkNamespace | undefined;
  readonly role: PostgresRole;
  readonly credentialsDir: string;
  private sshdStarted: SshServer | undefined;
  private isolatedLab: Promise<ChaosLab> | undefined;

  private constructor(env: LocalEnvironment, postgres: PostgresServer, role: PostgresRole, credentialsDir: string, namespace: NetworkNamespace | undefined) {
    this.env = env;
    this.postgres = postgres;
    this.role = role;
    this.credentialsDir = credentialsDir;
    this.namespace = namespace;
  }

  /** Creates the role (synchronous_commit on: with the environment's `off`, a crash may drop acknowledged commits, which would be PostgreSQL's doing, not a pooler's) and the table. */
  static async start(env: LocalEnvironment, isolated?: { postgres: PostgresServer; namespace: NetworkNamespace }): Promise<ChaosLab> {
    const postgres = isolated?.postgres ?? await env.postgres();
    const role: PostgresRole = { user: CHAOS_ROLE, password: randomBytes(18).toString('base64url') };
    const exists = await postgres.query('SELECT 1 FROM pg_roles WHERE rolname = $1', [role.user]);
    await postgres.query(`${exists.length > 0 ? 'ALTER' : 'CREATE'} ROLE ${role.user} LOGIN PASSWORD '${role.password}'`);
    await postgres.query(`ALTER ROLE ${role.user} SET synchronous_commit = on`);
    const app = new pg.Client(postgres.clientConfig());
    await app.connect();
    try {
      await app.query(`GRANT ALL ON DATABASE app TO ${role.user}`);
      await app.query('CREATE TABLE IF NOT EXISTS chaos_tx (id text PRIMARY KEY, fault text NOT NULL, at timestamptz DEFAULT now())');
      await app.query(`GRANT SELECT, INSERT ON chaos_tx TO ${role.user}`);
    } finally {
      await app.end();
    }
    const credentialsDir = mkdtempSync(join(tmpdir(), 'poolkeeper-chaos-creds-'));
    writeFileSync(join(credentialsDir, 'username'), role.user);
    writeFileSync(join(credentialsDir, 'password'), role.password);
    return new ChaosLab(env, postgres, role, credentialsDir, isolated?.namespace);
  }

  /** The same lab on a PostgreSQL alone in a network namespace (started on first use; Scenario.isolatedDatabase). */
  isolated(): Promise<ChaosLab> {
    this.isolatedLab ??= this.env.postgresInNamespace().then((isolated) => ChaosLab.start(this.env, isolated));
    return this.isolatedLab;
  }

  /** sshd, started on first use. */
  async sshd(): Promise<SshServer> {
    this.sshdStarted ??= await this.env.sshd();
    return this.sshdStarted;
  }

  /** Number of backends of the chaos role now, asked on `observer` (a superuser connection: it has reserved slots). */
  async backends(observer: pg.Client): Promise<number> {
    const rows = await observer.query<{ n: number }>(BACKENDS_SQL, [CHAOS_ROLE]);
    return rows.rows[0]?.n ?? 0;
  }

  /** Removes the credentials directories. */
  close(): void {
    rmSync(this.credentialsDir, { recursive: true, force: true });
    void this.isolatedLab?.then((lab) => lab.close(), () => undefined);
  }
}

function errorKey(err: unknown): string {
  const e = err as { code?: unknown; message?: unknown };
  if (typeof e.code === 'string' && /^[0-9A-Z]{5}$/.test(e.code)) return e.code;
  if (typeof e.code === 'string') return `conn:${e.code}`;
  const message = typeof e.message === 'string' ? e.message : String(err);
  // node-postgres says "not queryable" for a query on a connection that broke between statements.
  if (/terminated|ended|closed|not queryable/i.test(message)) return 'conn:closed';
  if (/timeout/i.test(message)) return 'conn:timeout';
  return 'conn:other';
}

/** A pg.Client that never throws 'error' events at the process. */
function newClient(port: number, extra: Partial<pg.ClientConfig> = {}): pg.Client {
  const c = new pg.Client({ host: '127.0.0.1', port, user: CHAOS_ROLE, database: 'app', ...extra });
  c.on('error', () => undefined);
  return c;
}

function destroyClient(c: pg.Client): void {
  (c as unknown as { connection?: { stream?: Socket } }).connection?.stream?.destroy();
  c.end().catch(() => undefined);
}

class Unanswered extends Error {}

/** Client load: workers inserting unique ids in BEGIN / INSERT / COMMIT transactions. */
export class Load {
  readonly committed = new Set<string>();
  readonly failed = new Set<string>();
  readonly inDoubt = new Set<string>();
  readonly errors: Record<string, number> = {};
  /** The first message seen for each error key, to tell what `conn:*` ones were. */
  readonly errorMessages: Record<string, string> = {};
  readonly errorTimes: number[] = [];
  readonly commitTimes: number[] = [];
  /** [start, duration] of each committed transaction. */
  readonly latencies: [number, number][] = [];
  unanswered = 0;
  maxLatencyMs = 0;
  private running = true;
  private paused = false;
  private readonly workers: Promise<void>[] = [];
  private readonly fault: string;
  private readonly answerLimitMs: number;
  private readonly port: (worker: number) => number;

  constructor(args: { fault: string; clients: number; port: (worker: number) => number; answerLimitMs: number }) {
    this.fault = args.fault;
    this.answerLimitMs = args.answerLimitMs;
    this.port = args.port;
    for (let i = 0; i < args.clients; i += 1) this.workers.push(this.worker(i));
  }

  /** Counts a client error (also from scenario clients). */
  error(err: unknown): void {
    const key = errorKey(err);
    this.errors[key] = (this.errors[key] ?? 0) + 1;
    this.errorMessages[key] ??= err instanceof Error ? err.message : String((err as { code?: unknown }).code);
    this.errorTimes.push(Date.now());
  }

  /** Runs `query` with the answer deadline; a late answer counts as unanswered and breaks the client. */
  async timed<T>(c: pg.Client, run: () => Promise<T>, limitMs = this.answerLimitMs): Promise<T> {
    const started = Date.now();
    let timer: NodeJS.Timeout | undefined;
    try {
      return await Promise.race([
        run(),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => {
            this.unanswered += 1;
            destroyClient(c);
            reject(new Unanswered(`no answer within ${limitMs} ms`));
          }, limitMs);
        }),
      ]);
    } finally {
      clearTimeout(timer);
      this.maxLatencyMs = Math.max(this.maxLatencyMs, Date.now() - started);
    }
  }

  private async worker(index: number): Promise<void> {
    let client: pg.Client | undefined;
    let seq = 0;
    while (this.running) {
      if (this.paused) {
        await sleep(20);
        continue;
      }
      try {
        if (client === undefined) {
          const c = newClient(this.port(index));
          client = c;
          await this.timed(c, () => c.connect());
        }
        const c = client;
        seq += 1;
        const id = `${this.fault}/${index}/${seq}`;
        const started = Date.now();
        let phase: 'before' | 'commit' = 'before';
        try {
          await this.timed(c, () => c.query('BEGIN'));
          await this.timed(c, () => c.query('INSERT INTO chaos_tx (id, fault) VALUES ($1, $2)', [id, this.fault]));
          phase = 'commit';
          await this.timed(c, () => c.query('COMMIT'));
          this.committed.add(id);
          const now = Date.now();
          this.commitTimes.push(now);
          this.latencies.push([started, now - started]);
        } catch (err) {
          (phase === 'commit' ? this.inDoubt : this.failed).add(id);
          throw err;
        }
      } catch (err) {
        if (!(err instanceof Unanswered)) this.error(err);
        else this.error({ code: 'unanswered' });
        if (client) destroyClient(client);
        client = undefined;
        await sleep(50);
        continue;
      }
      await sleep(5);
    }
    if (client) await client.end().catch(() => undefined);
  }

  /** Workers stop starting transactions (their connections stay open and idle). */
  pause(): void {
    this.paused = true;
  }

  /** Workers go on. */
  resume(): void {
    this.paused = false;
  }

  /** Stops every worker after its current transaction (bounded by the answer deadline). */
  async stop(): Promise<void> {
    this.running = false;
    await Promise.all(this.workers);
  }
}

/** A raw protocol client: startup as the chaos role, then whatever a scenario sends. */
export function rawLogin(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = netConnect({ host: '127.0.0.1', port });
    socket.once('error', reject);
    let seen = Buffer.alloc(0);
    const onData = (chunk: Buffer): void => {
      seen = Buffer.concat([seen, chunk]);
      // ReadyForQuery 'Z' (length 5, status I) ends the login.
      if (seen.includes(Buffer.from([0x5a, 0, 0, 0, 5, 0x49]))) {
        socket.off('data', onData);
        resolve(socket);
      }
    };
    socket.on('data', onData);
    socket.write(buildStartupMessage({ user: CHAOS_ROLE, database: 'app' }));
  });
}

function queryMessage(sql: string): Buffer {
  const body = Buffer.from(`${sql}\0`, 'utf8');
  const head = Buffer.alloc(5);
  head[0] = 0x51;
  head.writeInt32BE(body.length + 4, 1);
  return Buffer.concat([head, body]);
}

function percentile(values: number[], q: number): number {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
}

/** How runScenario runs a scenario. */
export interface RunOptions {
  quick: boolean;
  log?: (line: string) => void;
  logDir?: string;
  /** The sidecar child's entry (buildChildSidecar: compiled, as in the image); default: the TypeScript source. */
  sidecarEntry?: string;
  /** A goal on the sidecar's RSS, MB (meaningful only for a compiled sidecar). */
  rssLimitMb?: number;
}

/** How a missed timing goal begins: measured by `npm run chaos` on a quiet machine, not asserted by the tests. */
export const TIMING_GOAL_PREFIX = 'p99 under hostile input over';

/** Healthy clients' p99 under hostile input may be at most this many times its quiet value. */
export const HOSTILE_P99_FACTOR = 2;

/** Runs one scenario under load and measures it. */
export async function runScenario(mainLab: ChaosLab, scenario: Scenario, options: RunOptions): Promise<ChaosResult> {
  const lab = scenario.isolatedDatabase ? await mainLab.isolated() : mainLab;
  const log = options.log ?? ((): void => undefined);
  const grant = scenario.grant ?? 5;
  const pool: SidecarSettings['pool'] = { mode: 'transaction', poolTimeout: POOL_TIMEOUT_S, poolRecycle: 1800, poolPrePing: true, idleTimeout: 600, ...scenario.pool };
  const port = await freePort();
  const settings: SidecarSettings = {
    listenHost: '127.0.0.1', listenPort: port,
    database: { host: lab.postgres.tcpHost, port: lab.postgres.port, dbname: 'app', sslMode: 'disable' },
    drainTimeout: 5,
    ...scenario.settings,
    pool,
  };
  if (scenario.tunnel) {
    const sshd = await lab.sshd();
    settings.sshTunnel = { host: sshd.host, port: sshd.port, user: sshd.username, privateKey: sshd.userPrivateKey, hostKey: sshd.hostPublicKey };
  }
  const logFile = join(options.logDir ?? lab.env.runDir, `sidecar-${scenario.name.replace(/[^a-z0-9]+/gi, '-')}.log`);
  // The pod's emptyDir: a restarted sidecar finds the backends its killed predecessor left.
  const stateDir = mkdtempSync(join(lab.env.runDir, 'sidecar-state-'));
  const startSidecar = (): Promise<SidecarProcess> => SidecarProcess.start({ settings, credentialsDir: lab.credentialsDir, grant, logFile, stateDir, ...(options.sidecarEntry ? { entry: options.sidecarEntry } : {}) });
  const fleet = scenario.fleet ? await scenario.fleet(lab, { quick: options.quick, logDir: options.logDir ?? lab.env.runDir }) : undefined;
  let sidecar: SidecarProcess | undefined = fleet ? undefined : await startSidecar();
  const notes: string[] = [];
  const missedGoals: string[] = [];
  let limit = fleet?.limit ?? grant;
  const limitChanges: [number, number][] = [[0, limit]];
  // Sampler: backends of the role and the sidecar's RSS every 50 ms.
  const samples: { t: number; n: number }[] = [];
  let rssBase = sidecar?.rssMb() ?? 0;
  let rssMax = rssBase;
  let sampling = true;
  let sampler: pg.Client | undefined;
  const sample = async (): Promise<void> => {
    while (sampling) {
      const tick = Date.now();
      const rss = sidecar?.rssMb();
      if (rss !== undefined) rssMax = Math.max(rssMax, rss);
      try {
        if (sampler === undefined) {
          const c = new pg.Client({ ...lab.postgres.clientConfig(), database: 'app', connectionTimeoutMillis: 1000 });
          c.on('error', () => undefined);
          await c.connect();
          sampler = c;
        }
        samples.push({ t: Date.now(), n: await lab.backends(sampler) });
      } catch {
        // PostgreSQL down or restarting: a gap in the samples.
        if (sampler !== undefined) destroyClient(sampler);
        sampler = undefined;
      }
      await sleep(Math.max(0, 50 - (Date.now() - tick)));
    }
  };
  const samplerDone = sample();

  const load = new Load({ fault: scenario.name, clients: scenario.clients ?? 8, port: (worker) => fleet?.port(worker) ?? sidecar!.port, answerLimitMs: pool.poolTimeout * 1000 + ANSWER_MARGIN_MS });
  await sleep(options.quick ? 700 : 2000);
  rssBase = sidecar?.rssMb() ?? rssBase;
  const faultAt = Date.now();
  let healedAt: number | undefined;
  log(`  ${scenario.name}: fault`);
  try {
    await scenario.inject({
      lab, quick: options.quick, load, port, grant,
      sidecar: () => {
        if (sidecar === undefined) throw new Error('a fleet scenario has no single sidecar');
        return sidecar;
      },
      restartSidecar: async () => {
        sidecar = await startSidecar();
        return sidecar;
      },
      healed: () => (healedAt = Date.now()),
      setLimit: (n) => {
        limit = n;
        limitChanges.push([Date.now(), n]);
      },
      note: (text) => notes.push(text),
      miss: (goal) => missedGoals.push(goal),
    });
  } catch (err) {
    notes.push(`fault injection failed: ${err instanceof Error ? err.message : String(err)}`);
  }
  const healed = healedAt ?? Date.now();
  log(`  ${scenario.name}: healed, settling`);
  // Let the load run on until it commits again after the last error (bounded).
  const settleUntil = Date.now() + (scenario.noRecovery ? 0 : options.quick ? 6000 : 15_000);
  await sleep(scenario.noRecovery ? 0 : options.quick ? 500 : 2000);
  while (Date.now() < settleUntil) {
    const lastError = Math.max(0, ...load.errorTimes.slice(-1));
    if ((load.commitTimes.at(-1) ?? 0) > lastError + 500) break;
    await sleep(100);
  }
  log(`  ${scenario.name}: stopping load`);
  await load.stop();
  log(`  ${scenario.name}: load stopped`);
  // Backends must go once clients are done: keep sampling a moment to see them go.
  await sleep(options.quick ? 200 : 500);
  let phantom = 0;
  await fleet?.stop();
  if (sidecar?.running) {
    const rss = sidecar.rssMb();
    if (rss !== undefined) rssMax = Math.max(rssMax, rss);
    if (!options.quick) {
      // What the sidecar counts against what PostgreSQL has, once its janitor (1 s) had a turn:
      // counting backends that are gone costs capacity, not safety.
      await sleep(1500);
      const status = await sidecar.status();
      const actual = (await lab.postgres.query<{ n: number }>(BACKENDS_SQL, [CHAOS_ROLE]).catch(() => []))[0]?.n ?? 0;
      if (status !== undefined && !status.drained && status.held > actual) {
        phantom = status.held - actual;
        notes.push(`the sidecar counts ${status.held} backends, PostgreSQL has ${actual}`);
      }
    }
    // The quick runs do not wait for a clean close: the sockets closing is enough to end idle backends.
    await sidecar.stop(options.quick ? 300 : 5000);
  }
  log(`  ${scenario.name}: sidecar stopped`);
  let leftover = 0;
  const goneBy = Date.now() + 10_000;
  while (Date.now() < goneBy) {
    try {
      leftover = (await lab.postgres.query<{ n: number }>(BACKENDS_SQL, [CHAOS_ROLE]))[0]?.n ?? 0;
    } catch {
      break;
    }
    if (leftover === 0) break;
    await sleep(100);
  }
  sampling = false;
  await samplerDone;
  if (sampler !== undefined) await sampler.end().catch(() => undefined);
  if (leftover > 0) {
    notes.push(`${leftover} backends still there 10 s after the sidecar stopped (terminated)`);
    await lab.postgres.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1', [CHAOS_ROLE]).catch(() => undefined);
  }

  // Lost transactions: what clients believe against what the table holds.
  const present = new Set((await lab.postgres.query<{ id: string }>('SELECT id FROM chaos_tx WHERE fault = $1', [scenario.name])).map((r) => r.id));
  let lost = 0;
  for (const id of load.committed) if (!present.has(id)) lost += 1;
  for (const id of load.failed) if (present.has(id)) lost += 1;
  let inDoubtCommitted = 0;
  for (const id of load.inDoubt) if (present.has(id)) inDoubtCommitted += 1;

  // Backends against the limit in force at each sample.
  const limitAt = (t: number): number => {
    let n = limitChanges[0]![1];
    for (const [at, value] of limitChanges) if (at <= t) n = value;
    return n;
  };
  let overLimitMs = 0;
  let maxBackends = 0;
  for (let i = 0; i < samples.length; i += 1) {
    const s = samples[i]!;
    maxBackends = Math.max(maxBackends, s.n);
    if (s.n > limitAt(s.t)) overLimitMs += Math.min(200, (samples[i + 1]?.t ?? s.t + 50) - s.t);
  }
  const lastError = load.errorTimes.filter((t) => t >= faultAt).at(-1);
  const from = Math.max(healed, lastError ?? 0);
  const firstCommit = load.commitTimes.find((t) => t >= from);
  const recoveryMs = lastError === undefined && firstCommit !== undefined ? 0 : firstCommit === undefined ? null : firstCommit - healed;
  const quiet = load.latencies.filter(([t]) => t < faultAt).map(([, d]) => d);
  const during = load.latencies.filter(([t]) => t >= faultAt && t <= healed).map(([, d]) => d);

  const result: ChaosResult = {
    fault: scenario.name,
    committed: load.committed.size,
    errors: load.errors,
    errorMessages: load.errorMessages,
    lost,
    inDoubt: { total: load.inDoubt.size, committed: inDoubtCommitted },
    unanswered: load.unanswered,
    maxLatencyMs: load.maxLatencyMs,
    p99QuietMs: percentile(quiet, 0.99),
    p99FaultMs: percentile(during, 0.99),
    maxBackends,
    limit: Math.max(limitChanges[0]![1], limit),
    overLimitMs,
    recoveryMs: scenario.noRecovery ? null : recoveryMs,
    rssBaseMb: fleet ? null : Math.round(rssBase),
    rssMaxMb: fleet ? null : Math.round(rssMax),
    phantomBackends: phantom,
    samples: samples.length,
    timeline: samples.filter((x, i) => i === 0 || samples[i - 1]!.n !== x.n).map((x) => [x.t - faultAt, x.n]),
    limitTimeline: limitChanges.map(([t, n]) => [t === 0 ? 0 : t - faultAt, n]),
    notes,
    missed: [...missedGoals],
  };
  if (overLimitMs > 0) result.missed.push('backends over the limit');
  if (lost > 0) result.missed.push('lost transactions');
  if (load.unanswered > 0) result.missed.push('clients unanswered past poolTimeout');
  if (recoveryMs === null && !scenario.noRecovery) result.missed.push('no recovery');
  if (!scenario.expectedErrors && Object.keys(load.errors).length > 0) result.missed.push('client errors');
  if (leftover > 0) result.missed.push('backends left behind');
  if (options.rssLimitMb !== undefined && result.rssMaxMb !== null && result.rssMaxMb > options.rssLimitMb) result.missed.push(`sidecar RSS over ${options.rssLimitMb} MB`);
  if (scenario.hostile && result.p99FaultMs > HOSTILE_P99_FACTOR * result.p99QuietMs) result.missed.push(`${TIMING_GOAL_PREFIX} ${HOSTILE_P99_FACTOR}x quiet`);
  return result;
}

/** Runs `count` clients that each start `sql` on their own connection; resolves once they have sent it. */
async function startStatements(ctx: FaultContext, count: number, sql: string): Promise<pg.Client[]> {
  const clients: pg.Client[] = [];
  for (let i = 0; i < count; i += 1) {
    const c = newClient(ctx.port);
    await c.connect();
    c.query(sql).catch(() => undefined);
    clients.push(c);
  }
  return clients;
}

/** Waits until `n` backends of the role run a statement matching `like`. */
async function waitRunning(ctx: FaultContext, like: string, n: number, timeoutMs = 10_000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const rows = await ctx.lab.postgres.query<{ n: number }>("SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = $1 AND state = 'active' AND query LIKE $2", [CHAOS_ROLE, like]);
    if ((rows[0]?.n ?? 0) >= n) return true;
    await sleep(50);
  }
  return false;
}

async function terminate(ctx: FaultContext, states: string[]): Promise<number> {
  const rows = await ctx.lab.postgres.query<{ n: number }>('SELECT count(pg_terminate_backend(pid))::int AS n FROM pg_stat_activity WHERE usename = $1 AND state = ANY($2)', [CHAOS_ROLE, states]);
  return rows[0]?.n ?? 0;
}

function terminateIdle(prePing: boolean): Scenario {
  return {
    name: `backends terminated while idle, poolPrePing ${prePing ? 'on' : 'off'}`,
    quick: prePing,
    pool: { poolPrePing: prePing },
    // Without pre-ping, a client handed a connection that died while idle gets its error: SQLAlchemy's pool_pre_ping=False behaves alike.
    expectedErrors: !prePing,
    async inject(ctx) {
      const rounds = ctx.quick ? 2 : 4;
      let killed = 0;
      for (let i = 0; i < rounds; i += 1) {
        ctx.load.pause();
        // Past prePingAfterIdle (1 s), as a connection dropped by a NAT would be.
        await sleep(1200);
        killed += await terminate(ctx, ['idle']);
        await sleep(100);
        ctx.load.resume();
        await sleep(ctx.quick ? 300 : 700);
      }
      ctx.note(`${killed} idle backends terminated in ${rounds} rounds`);
    },
  };
}

function terminateInTransaction(prePing: boolean): Scenario {
  return {
    name: `backends terminated mid-transaction, poolPrePing ${prePing ? 'on' : 'off'}`,
    quick: !prePing,
    pool: { poolPrePing: prePing },
    expectedErrors: true,
    async inject(ctx) {
      const rounds = ctx.quick ? 3 : 10;
      let killed = 0;
      for (let i = 0; i < rounds; i += 1) {
        killed += await terminate(ctx, ['idle in transaction', 'active']);
        await sleep(300);
      }
      ctx.note(`${killed} backends terminated in a transaction in ${rounds} rounds`);
    },
  };
}

/**
 * Server keepalives of the lost-host scenario, shorter than SERVER_KEEPALIVE
 * (30 s) for a quick run: a silent host is given up after 1 + 1 x 2 s of
 * silence, or 3 s of data unacknowledged.
 */
const LOST_HOST_KEEPALIVE: ServerKeepalive = { idleSeconds: 1, intervalSeconds: 1, count: 2, userTimeoutMs: 3000 };
/** poolTimeout of the lost-host scenario: longer than the keepalive timeout, so that the load's clients in flight are answered by it. */
const LOST_HOST_POOL_TIMEOUT_S = 5;
/** Once a connection to the host that answers again got through, the lost backends are ended and uncounted within this (s). */
const LOST_HOST_REGROW_S = 1.5;

/** A psql run with its outcome: when it exited (ms since it started) and what it said, or still running. */
class Psql {
  readonly started = Date.now();
  exitedAt: number | undefined;
  output = '';
  private readonly child;

  constructor(postgres: PostgresServer, sql: string) {
    // libpq's defaults: keepalives on with the kernel's timings, no tcp_user_timeout, no connect_timeout.
    this.child = spawn(join(postgresBinDir(), 'psql'), ['-X', '-A', '-t', '-c', sql], {
      env: { ...process.env, PGHOST: postgres.tcpHost, PGPORT: String(postgres.port), PGUSER: postgres.app.user, PGPASSWORD: postgres.app.password, PGDATABASE: 'app' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const collect = (d: Buffer): void => {
      this.output += d.toString('utf8');
    };
    this.child.stdout.on('data', collect);
    this.child.stderr.on('data', collect);
    this.child.once('exit', () => (this.exitedAt = Date.now()));
  }

  /** What it did in `sinceMs`: "ended after N s: output" or "still waiting after N s". */
  describe(at = Date.now(), from = this.started): string {
    if (this.exitedAt !== undefined && this.exitedAt <= at) return `ended after ${((this.exitedAt - from) / 1000).toFixed(1)} s (${this.output.trim().split('\n')[0] ?? ''})`;
    return `still waiting after ${((at - from) / 1000).toFixed(1)} s`;
  }

  kill(): void {
    if (this.exitedAt === undefined) this.child.kill('SIGKILL');
  }
}

/** The sidecar's poolkeeper_sidecar_errors_total by kind, from its /metrics. */
async function sidecarErrors(sidecar: SidecarProcess): Promise<Record<string, number>> {
  if (sidecar.adminPort === undefined) return {};
  const text = await (await fetch(`http://127.0.0.1:${sidecar.adminPort}/metrics`)).text();
  const counts: Record<string, number> = {};
  for (const m of text.matchAll(/^poolkeeper_sidecar_errors_total\{kind="([^"]+)"\} (\d+)/gm)) counts[m[1]!] = Number(m[2]);
  return counts;
}

/** The outcome of a statement: an Error, or 'answered', or 'hung' past `ms`. */
async function within<T>(p: Promise<T>, ms: number): Promise<T | 'hung'> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<'hung'>((r) => (timer = setTimeout(() => r('hung'), Math.max(0, ms))))]);
  } finally {
    clearTimeout(timer);
  }
}

type Outcome = (Error & { code?: string }) | 'answered';

/**
 * The database host stops answering (every packet on its link dropped, no
 * RST: a lost node, a partition, a failover that leaves the old address
 * black-holed) while the load runs, a statement is in flight through the
 * sidecar and one through a direct libpq connection (psql), then answers
 * again. Goals: the statement in flight ends with 08006 naming the cause
 * within the keepalive timeout plus a margin; a client arriving during the
 * fault gets an error with a SQLSTATE within poolTimeout plus a margin, not
 * a connection to the lost host to hang on; the sidecar counts the
 * failures in its metrics; once the host answers, a new client's query
 * succeeds on the same sidecar. (The common goals hold too: PostgreSQL
 * never has more of its backends than the limit in force, the abandoned
 * ones included; the limit is the grant, or what the sidecar reports held
 * while it opens one connection over it to end its lost backends.)
 * Direct libpq has no such bound: its statement waits as long as the
 * kernel's keepalives let it (2 h 11 min with Linux defaults), or until the
 * host answers again, and a new connection retries its SYN for about 2 min
 * (no connect_timeout). Measured: through the sidecar 08006 after 2.1 to
 * 2.8 s and 53300 after 5.0 to 5.2 s; psql's statement had no answer for
 * the whole fault (8 s, 45 s) and finished once the host was back, and its
 * new connection was still retrying its SYN after that.
 */
async function loseDatabaseHost(ctx: FaultContext): Promise<void> {
  const namespace = ctx.lab.namespace;
  if (namespace === undefined) throw new Error('the lost-host scenario needs isolatedDatabase');
  const k = LOST_HOST_KEEPALIVE;
  const detectMs = Math.max((k.idleSeconds + k.intervalSeconds * k.count) * 1000, k.userTimeoutMs);
  const boundMs = detectMs + 3000;
  const answerMs = LOST_HOST_POOL_TIMEOUT_S * 1000 + ANSWER_MARGIN_MS;
  // The full run outlasts the 30 s after which lost backends that could not be asked about were once forgotten.
  const faultMs = ctx.quick ? 8000 : 45_000;
  const sidecar = ctx.sidecar();
  const sleepSql = 'SELECT pg_sleep(45)';
  const inflight = newClient(ctx.port);
  await inflight.connect();
  const inflightDone: Promise<Outcome> = inflight.query(sleepSql).then(() => 'answered' as const, (err: Error) => err);
  const directInflight = new Psql(ctx.lab.postgres, sleepSql);
  const others: pg.Client[] = [inflight];
  const psqls = [directInflight];
  // What the sidecar reports held: with every granted connection lost, it may open one more to find out
  // whether their backends still live once the host answers, and reports it, so the controller reserves it
  // (a pod's reservation is the larger of its grant and what it holds). That is the limit in force meanwhile.
  let watching = true;
  let maxHeld = 0;
  const watcher = (async (): Promise<void> => {
    let over = false;
    while (watching) {
      const held = (await sidecar.status())?.held ?? 0;
      maxHeld = Math.max(maxHeld, held);
      if (held > ctx.grant + 1) ctx.miss(`the sidecar held ${held} server connections, more than its grant and the one opened to ask about lost backends`);
      if ((held > ctx.grant) !== over) {
        over = held > ctx.grant;
        ctx.setLimit(Math.max(held, ctx.grant));
      }
      await sleep(50);
    }
    if (over) ctx.setLimit(ctx.grant);
  })();
  try {
    const deadline = Date.now() + 10_000;
    while ((await ctx.lab.postgres.query<{ n: number }>("SELECT count(*)::int AS n FROM pg_stat_activity WHERE state = 'active' AND query = $1", [sleepSql]))[0]?.n !== 2) {
      if (Date.now() > deadline) throw new Error('the statements in flight never started');
      await sleep(50);
    }
    const before = await sidecarErrors(sidecar);
    namespace.blackHole();
    const lostAt = Date.now();
    // A new client while the sidecar's idle connections still look alive, and a new direct connection.
    const fresh = newClient(ctx.port);
    others.push(fresh);
    const freshDone: Promise<Outcome> = fresh.connect().then(() => fresh.query('SELECT 1')).then(() => 'answered' as const, (err: Error) => err);
    const directNew = new Psql(ctx.lab.postgres, 'SELECT 1');
    psqls.push(directNew);
    const check = async (what: string, p: Promise<Outcome>, limitMs: number, expect: (o: Outcome) => string | undefined): Promise<number> => {
      const outcome = await within(p, limitMs - (Date.now() - lostAt));
      const seconds = (Date.now() - lostAt) / 1000;
      if (outcome === 'hung') ctx.miss(`${what}: no answer ${limitMs / 1000} s after the host was lost`);
      else {
        const wrong = expect(outcome);
        if (wrong !== undefined) ctx.miss(`${what}: ${wrong}`);
        ctx.note(`${what}: ${outcome === 'answered' ? 'answered' : `${outcome.code ?? 'no SQLSTATE'} "${outcome.message}"`} after ${seconds.toFixed(1)} s`);
      }
      return seconds;
    };
    const [inflightSeconds] = await Promise.all([
      check('statement in flight through the sidecar', inflightDone, boundMs, (o) => {
        if (o === 'answered') return 'succeeded while the host was lost';
        if (o.code !== '08006' || !/database host stopped answering/.test(o.message)) return `not 08006 naming the lost host: ${o.code ?? 'no SQLSTATE'} ${o.message}`;
        return undefined;
      }),
      check('new client through the sidecar during the fault', freshDone, answerMs, (o) => (o !== 'answered' && o.code === undefined ? `a bare error without a SQLSTATE: ${o.message}` : undefined)),
    ]);
    ctx.note(`direct psql, statement in flight: ${directInflight.describe(Date.now(), lostAt)} when the sidecar's client had its error`);
    await sleep(Math.max(0, faultMs - (Date.now() - lostAt)));
    const after = await sidecarErrors(sidecar);
    const counted: Record<string, number> = {};
    for (const [kind, n] of Object.entries(after)) if (n > (before[kind] ?? 0)) counted[kind] = n - (before[kind] ?? 0);
    ctx.note(`sidecar errors counted during the fault: ${JSON.stringify(counted)}`);
    if (!((counted['server-lost'] ?? 0) > 0)) ctx.miss('the sidecar\'s metrics did not count the lost server connections');
    ctx.note(`direct psql at the end of the ${(faultMs / 1000).toFixed(0)} s fault: statement in flight ${directInflight.describe(Date.now(), lostAt)}; new connection ${directNew.describe()}`);
    if (directInflight.exitedAt !== undefined && directInflight.exitedAt - lostAt < inflightSeconds * 1000) ctx.note('direct psql ended before the sidecar\'s client');
    namespace.restore();
    ctx.healed();
    const backAt = Date.now();
    // The host answers again: a new client of the same sidecar.
    let served: number | undefined;
    let lastError = '';
    while (served === undefined && Date.now() - backAt < 15_000) {
      const c = newClient(ctx.port);
      others.push(c);
      try {
        await within(c.connect().then(() => c.query('SELECT 1')), 7000);
        served = Date.now();
      } catch (err) {
        lastError = err instanceof Error ? err.message : String(err);
        await sleep(200);
      }
    }
    if (served === undefined) ctx.miss(`no query served 15 s after the host answered again (${lastError})`);
    else ctx.note(`first new query served ${((served - backAt) / 1000).toFixed(1)} s after the host answered again${lastError ? ` (before: ${lastError})` : ''}`);
    ctx.note(`direct psql when the sidecar served again: statement in flight ${directInflight.describe(Date.now(), lostAt)}; new connection ${directNew.describe()}`);
    // Once a connection got through, the lost backends are ended and no longer counted: the pool may grow back to its grant.
    if (served !== undefined) {
      let held = (await sidecar.status())?.held ?? 0;
      while (held > ctx.grant && Date.now() - served < 5000) {
        await sleep(50);
        held = (await sidecar.status())?.held ?? 0;
      }
      const seconds = (Date.now() - served) / 1000;
      ctx.note(`the sidecar was back within its grant ${seconds.toFixed(1)} s after the first query served`);
      if (held > ctx.grant || seconds > LOST_HOST_REGROW_S) ctx.miss(`lost backends still counted ${seconds.toFixed(1)} s after a connection got through (the pool could not grow back to its grant)`);
    }
  } finally {
    watching = false;
    await watcher;
    ctx.note(`the sidecar reported at most ${maxHeld} server connections held (grant ${ctx.grant})`);
    namespace.restore();
    for (const p of psqls) p.kill();
    for (const c of others) destroyClient(c);
  }
}

/** Every scenario, most important first. */
export const SCENARIOS: Scenario[] = [
  {
    name: 'PostgreSQL restart (fast shutdown)',
    quick: true,
    expectedErrors: true,
    async inject(ctx) {
      await ctx.lab.postgres.restart('fast', ctx.quick ? 500 : 2000);
    },
  },
  {
    name: 'PostgreSQL SIGKILL (postmaster and backends)',
    expectedErrors: true,
    async inject(ctx) {
      await ctx.lab.postgres.restart('kill', ctx.quick ? 500 : 2000);
    },
  },
  terminateInTransaction(false),
  terminateInTransaction(true),
  terminateIdle(true),
  terminateIdle(false),
  {
    name: 'clients vanish during pg_sleep(20)',
    quick: true,
    async inject(ctx) {
      // As many sleepers as the grant, so the load needs the connections they leave.
      const sleepers = await startStatements(ctx, 5, 'SELECT pg_sleep(20)');
      if (!(await waitRunning(ctx, 'SELECT pg_sleep(20)%', 5))) ctx.note('not every pg_sleep started');
      await sleep(ctx.quick ? 300 : 1000);
      for (const c of sleepers) destroyClient(c);
      ctx.healed();
      await sleep(ctx.quick ? 2000 : 8000);
      const left = await ctx.lab.postgres.query<{ n: number }>("SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = $1 AND query LIKE 'SELECT pg_sleep(20)%' AND state = 'active'", [CHAOS_ROLE]);
      ctx.note(`${left[0]?.n ?? 0} pg_sleep backends still running ${ctx.quick ? 2 : 8} s after their clients left`);
    },
  },
  {
    name: 'database host unreachable (packets dropped)',
    quick: true,
    isolatedDatabase: true,
    expectedErrors: true,
    pool: { poolTimeout: LOST_HOST_POOL_TIMEOUT_S },
    settings: { serverKeepalive: LOST_HOST_KEEPALIVE, admin: { host: '127.0.0.1', port: 0 } },
    inject: loseDatabaseHost,
  },
  {
    name: 'drain with a transaction longer than drainTimeout (2 s)',
    quick: true,
    settings: { drainTimeout: 2 },
    expectedErrors: true,
    noRecovery: true,
    async inject(ctx) {
      const long = newClient(ctx.port);
      await long.connect();
      await long.query('BEGIN');
      long.query('SELECT pg_sleep(10)').catch(() => undefined);
      await waitRunning(ctx, 'SELECT pg_sleep(10)%', 1);
      const started = Date.now();
      const drainedAt = await ctx.sidecar().drain(20_000);
      if (drainedAt === undefined) {
        ctx.note('never reported drained');
        return;
      }
      ctx.setLimit(0);
      ctx.healed();
      const atDrained = (await ctx.lab.postgres.query<{ n: number }>(BACKENDS_SQL, [CHAOS_ROLE]))[0]?.n ?? 0;
      let goneAt: number | undefined;
      const deadline = Date.now() + 12_000;
      while (Date.now() < deadline) {
        const rows = await ctx.lab.postgres.query<{ n: number }>(BACKENDS_SQL, [CHAOS_ROLE]);
        if ((rows[0]?.n ?? 0) === 0) {
          goneAt = Date.now();
          break;
        }
        await sleep(50);
      }
      destroyClient(long);
      ctx.note(`drained reported after ${((drainedAt - started) / 1000).toFixed(1)} s with ${atDrained} backends left${goneAt === undefined ? ', some still there 12 s later' : ''}`);
      // A drained sidecar serves nobody: the load's errors from here on are expected, so stop it.
      await ctx.load.stop();
    },
  },
  {
    name: 'max_connections filled by another role',
    quick: true,
    expectedErrors: true,
    async inject(ctx) {
      const hogs: pg.Client[] = [];
      const postgres = ctx.lab.postgres;
      // md5 logins in batches of 8: the slots fill faster than with SCRAM one at a time.
      const fill = async (): Promise<void> => {
        for (let round = 0; round < 40; round += 1) {
          const batch = Array.from({ length: 8 }, () => {
            const c = new pg.Client(postgres.clientConfig(postgres.appMd5));
            c.on('error', () => undefined);
            return c.connect().then(() => c, () => undefined);
          });
          const connected = (await Promise.all(batch)).filter((c) => c !== undefined);
          hogs.push(...connected);
          if (connected.length < batch.length) return;
        }
      };
      try {
        await fill();
        // The sidecar must now open new connections, and the slots it frees are taken at once: its clients must get 53300 within poolTimeout.
        const killed = await terminate(ctx, ['idle', 'active', 'idle in transaction']);
        await fill();
        const held = await ctx.lab.postgres.query<{ n: number }>(BACKENDS_SQL, [CHAOS_ROLE]);
        ctx.note(`${hogs.length} slots taken by role app; ${killed} sidecar backends terminated while full, ${held[0]?.n ?? 0} reopened before the slots were retaken`);
        await sleep(ctx.quick ? 3500 : 8000);
      } finally {
        for (const c of hogs) destroyClient(c);
      }
    },
  },
  {
    name: 'sidecar SIGKILL (a statement running) and restart',
    quick: true,
    expectedErrors: true,
    async inject(ctx) {
      // Longer than a restart takes: the killed sidecar's backend still runs when the new one opens connections.
      await startStatements(ctx, 1, 'SELECT pg_sleep(15)');
      await waitRunning(ctx, 'SELECT pg_sleep(15)%', 1);
      const killedAt = Date.now();
      await ctx.sidecar().kill();
      // The container restarts at once, with the same grant and the pod's state directory.
      await ctx.restartSidecar();
      const restartedAt = Date.now();
      ctx.note(`restarted in ${((restartedAt - killedAt) / 1000).toFixed(1)} s`);
      ctx.healed();
      const deadline = Date.now() + 20_000;
      while (Date.now() < deadline) {
        const rows = await ctx.lab.postgres.query<{ n: number }>("SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = $1 AND query LIKE 'SELECT pg_sleep(15)%' AND state = 'active'", [CHAOS_ROLE]);
        if ((rows[0]?.n ?? 0) === 0) break;
        await sleep(50);
      }
      ctx.note(`the killed sidecar's running backend lived ${((Date.now() - restartedAt) / 1000).toFixed(1)} s after the new sidecar started (it cancels the backends its predecessor left)`);
    },
  },
  {
    name: 'sshd killed (through the SSH tunnel)',
    tunnel: true,
    expectedErrors: true,
    async inject(ctx) {
      const sshd = await ctx.lab.sshd();
      sshd.signalAll('SIGKILL');
      await sshd.kill();
      await sleep(ctx.quick ? 1000 : 3000);
      await sshd.restart();
    },
  },
  {
    name: 'sshd frozen (SIGSTOP) 20 s (through the SSH tunnel)',
    tunnel: true,
    expectedErrors: true,
    async inject(ctx) {
      const sshd = await ctx.lab.sshd();
      sshd.signalAll('SIGSTOP');
      try {
        await sleep(ctx.quick ? 8000 : 20_000);
      } finally {
        sshd.signalAll('SIGCONT');
      }
    },
  },
  {
    name: 'slowloris: 2,000 half-sent startup packets (loginTimeout 3 s)',
    hostile: true,
    quick: true,
    settings: { loginTimeout: 3 },
    async inject(ctx) {
      const count = 2000;
      const sockets: Socket[] = [];
      let closed = 0;
      for (let i = 0; i < count; i += 1) {
        const s = netConnect({ host: '127.0.0.1', port: ctx.port });
        s.on('error', () => undefined);
        s.on('close', () => (closed += 1));
        // Read, so that the sidecar's close is seen.
        s.resume();
        // The length of a startup packet, and nothing after it.
        s.write(Buffer.from([0, 0, 0, 40]));
        sockets.push(s);
        if (i % 100 === 99) await sleep(10);
      }
      await sleep(5000);
      const after5 = count - closed;
      if (!ctx.quick) await sleep(5000);
      ctx.note(`of ${count} half-open logins, ${after5} still open 5 s later${ctx.quick ? '' : `, ${count - closed} 10 s later`}`);
      for (const s of sockets) s.destroy();
    },
  },
  {
    name: 'a client that never reads a 300 MB result',
    hostile: true,
    async inject(ctx) {
      const socket = await rawLogin(ctx.port);
      socket.pause();
      socket.write(queryMessage("SELECT repeat('x', 1048576) FROM generate_series(1, 300)"));
      await sleep(ctx.quick ? 3000 : 8000);
      socket.destroy();
    },
  },
  {
    name: 'a client that pipelines queries without reading the answers',
    hostile: true,
    async inject(ctx) {
      const socket = await rawLogin(ctx.port);
      socket.pause();
      socket.on('error', () => undefined);
      // 64 KiB of small queries at a time, as fast as the sidecar takes them: it must stop reading (backpressure), not buffer.
      const chunk = Buffer.concat(Array.from({ length: 2048 }, () => queryMessage('SELECT 1')));
      const deadline = Date.now() + (ctx.quick ? 4000 : 15_000);
      let sent = 0;
      while (!socket.destroyed && Date.now() < deadline) {
        sent += chunk.length;
        if (!socket.write(chunk)) await Promise.race([new Promise((r) => socket.once('drain', r)), sleep(Math.max(0, deadline - Date.now()))]);
      }
      ctx.note(`${(sent / 2 ** 20).toFixed(0)} MiB of queries written before the sidecar stopped reading${socket.destroyed ? ' (connection closed)' : ''}`);
      socket.destroy();
    },
  },
  {
    name: 'oversized messages (4 x near maxMessageBytes) and random input',
    hostile: true,
    quick: false,
    async inject(ctx) {
      // A valid Query of near the largest accepted size: blanks ending in a NUL (an empty query).
      const size = 64 * 1024 * 1024 - 1024;
      const deadline = Date.now() + (ctx.quick ? 10_000 : 30_000);
      const outcomes: string[] = [];
      const big = async (): Promise<void> => {
        const socket = await rawLogin(ctx.port);
        let answer = '';
        socket.on('error', () => undefined);
        socket.on('data', (d: Buffer) => (answer += d.subarray(0, 64).toString('latin1')));
        const head = Buffer.alloc(5);
        head[0] = 0x51;
        head.writeInt32BE(size, 1);
        socket.write(head);
        const body = size - 4;
        let sent = 0;
        // Bounded: a sidecar that stops reading (backpressure) must not hang the run.
        while (sent < body && !socket.destroyed && Date.now() < deadline) {
          const n = Math.min(1024 * 1024, body - sent);
          const chunk = Buffer.alloc(n, 0x20);
          if (sent + n === body) chunk[n - 1] = 0;
          sent += n;
          if (!socket.write(chunk)) await Promise.race([new Promise((r) => socket.once('drain', r)), sleep(Math.max(0, deadline - Date.now()))]);
        }
        // Wait for the answer (EmptyQueryResponse 'I' then ReadyForQuery) until the deadline.
        while (!answer.includes('Z') && !socket.destroyed && Date.now() < deadline) await sleep(100);
        outcomes.push(`${Math.round(sent / 2 ** 20)} MiB sent, ${answer.includes('I') ? 'answered' : answer.includes('E') ? 'refused' : 'no answer'}`);
        socket.destroy();
      };
      const random = async (): Promise<void> => {
        for (let i = 0; i < (ctx.quick ? 50 : 300); i += 1) {
          const socket = i % 2 === 0 ? await rawLogin(ctx.port) : netConnect({ host: '127.0.0.1', port: ctx.port });
          socket.on('error', () => undefined);
          socket.resume();
          socket.write(randomBytes(1 + (i * 977) % 4000));
          await sleep(5);
          socket.destroy();
        }
      };
      await Promise.all([big(), big(), big(), big(), random()]);
      ctx.note(`4 clients sending 64 MiB queries: ${outcomes.join('; ')}`);
    },
  },
];

/** Formats results as a Markdown table. */
export function formatTable(results: ChaosResult[]): string {
  const lines = [
    '| fault | committed | client errors (SQLSTATE) | lost | in doubt (committed) | unanswered | max backends / limit | over limit | recovery | RSS MB (base -> max) | p99 ms quiet / fault |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ];
  for (const r of results) {
    const errors = Object.entries(r.errors).sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k} x${v}`).join(', ') || '-';
    lines.push(`| ${r.fault} | ${r.committed} | ${errors} | ${r.lost} | ${r.inDoubt.total} (${r.inDoubt.committed}) | ${r.unanswered} | ${r.maxBackends} / ${r.limit} | ${r.overLimitMs > 0 ? `${(r.overLimitMs / 1000).toFixed(1)} s` : '-'} | ${r.recoveryMs === null ? 'never' : `${(r.recoveryMs / 1000).toFixed(1)} s`} | ${r.rssBaseMb === null ? 'in-process' : `${r.rssBaseMb} -> ${r.rssMaxMb}`} | ${r.p99QuietMs} / ${r.p99FaultMs} |`);
  }
  return lines.join('\n');
}
