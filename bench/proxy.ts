/**
 * The proxy section of `npm run bench`: pgbench through PostgreSQL directly,
 * PgBouncer, the sidecar and a plain Node.js byte pipe, run interleaved round
 * by round (the order rotating) so that machine noise hits all alike.
 *
 * PgBouncer and the sidecar run with the same pool size and mode, each in a
 * process of its own; their CPU time per transaction comes from
 * /proc/<pid>/stat (utime + stime) before and after each run. Both trust
 * their loopback clients, and so does PostgreSQL for direct clients, so
 * client authentication costs none of them anything.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { chownSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { sidecarNodeOptions } from '../src/core/inject/index.ts';
import { DEFAULT_INJECTOR_SETTINGS } from '../src/core/inject/model.ts';
import { compileEntries, compiledDir } from '../src/devenv/compile.ts';
import { LocalEnvironment } from '../src/devenv/environment.ts';
import { APP_DATABASE } from '../src/devenv/postgres.ts';
import { freePort, processRssMb } from '../src/devenv/process.ts';
import { requireBinary, serviceAccount } from '../src/devenv/system.ts';
import type { ProxyChildConfig } from './proxy-child.ts';

/** One line of the proxy table (tps are medians over rounds; CPU in µs per transaction). */
export interface ProxyResult {
  script: string;
  mode: 'transaction' | 'session';
  clients: number;
  direct_tps: number;
  pgbouncer_tps: number | null;
  sidecar_tps: number;
  pipe_tps: number | null;
  pgbouncer_cpu_us: number | null;
  sidecar_cpu_us: number;
  /** Median over rounds of the per-round ratio, and its range over rounds. */
  sidecar_vs_pgbouncer: number | null;
  sidecar_vs_pgbouncer_range: [number, number] | null;
  sidecar_vs_direct: number;
  /** Over Unix-domain sockets (transaction mode, with `unix`). */
  pgbouncer_unix_tps?: number | null;
  sidecar_unix_tps?: number | null;
  pgbouncer_unix_cpu_us?: number | null;
  sidecar_unix_cpu_us?: number | null;
  /** Only with BENCH_SIDECAR_B: the other build's figures. */
  sidecar_b_tps?: number | null;
  sidecar_b_cpu_us?: number | null;
  rounds: number;
}

/** What the proxy section reports. */
export interface ProxyReport {
  proxy: ProxyResult[];
  sidecar_rss_mb: { idle: number; clients_1000: number };
  versions: { postgres: string; pgbouncer: string; node: string };
  seconds_per_run: number;
}

/** Options of the proxy section. */
export interface ProxyOptions {
  seconds: number;
  rounds: number;
  clients: number[];
  /** Filter on `script mode clients` (e.g. 'select-only transaction'). */
  filter?: RegExp;
  pool: number;
  /** Also PgBouncer and the sidecar over their Unix-domain sockets (transaction mode). */
  unix: boolean;
  /** Also the sidecar on Node.js streams instead of its native socket I/O, as the B target (transaction mode). */
  streams?: boolean;
  /** Only these targets (e.g. pgbouncer, sidecar, sidecar-b): an A/B run without the rest is shorter. */
  targets?: readonly string[];
  log: (line: string) => void;
}

type Target = 'direct' | 'pgbouncer' | 'sidecar' | 'pipe' | 'native-pipe' | 'c-relay' | 'sidecar-b' | 'pgbouncer-unix' | 'sidecar-unix';
type Script = 'select-only' | 'tpcb-like' | 'select-only -M prepared';
type Mode = 'transaction' | 'session';

interface Run {
  tps: number;
  cpuMicros: number;
}

/** User and system CPU of a process in µs (clock ticks of 10 ms). */
function processCpuMicros(pid: number): { user: number; system: number } {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /s, '').split(' ');
  return { user: Number(fields[11]) * 10_000, system: Number(fields[12]) * 10_000 };
}

/** Context switches of a process so far: it slept (voluntary) or was preempted (involuntary). */
function contextSwitches(pid: number): { voluntary: number; involuntary: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (name: string): number => Number(new RegExp(`^${name}:\\s*(\\d+)`, 'm').exec(status)?.[1] ?? Number.NaN);
  return { voluntary: field('voluntary_ctxt_switches'), involuntary: field('nonvoluntary_ctxt_switches') };
}

/** Median of the values that are numbers (NaN if none). */
function median(all: readonly number[]): number {
  const values = all.filter((v) => !Number.isNaN(v));
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** A PgBouncer of our own: a given mode and pool size, trust auth on loopback, a Unix socket in `dir`. */
export class BenchPgBouncer {
  readonly port: number;
  readonly socketDir: string;
  private readonly child: ChildProcess;

  private constructor(port: number, socketDir: string, child: ChildProcess) {
    this.port = port;
    this.socketDir = socketDir;
    this.child = child;
  }

  /** `wrapper`: a command it runs under (e.g. valgrind and its options), and how long to wait for it to listen. */
  static async start(dir: string, postgres: { host: string; port: number; app: { user: string; password: string } }, mode: Mode, pool: number, wrapper: { command: string[]; startMs: number } = { command: [], startMs: 15_000 }): Promise<BenchPgBouncer> {
    const binary = requireBinary('pgbouncer', 'pgbouncer', ['/usr/sbin/pgbouncer']);
    const account = serviceAccount();
    mkdirSync(dir, { recursive: true });
    const port = await freePort();
    const quote = (s: string): string => `"${s.replace(/"/g, '""')}"`;
    const authFile = join(dir, 'userlist.txt');
    writeFileSync(authFile, `${quote(postgres.app.user)} ${quote(postgres.app.password)}\n`, { mode: 0o600 });
    const config = join(dir, 'pgbouncer.ini');
    writeFileSync(config, [
      '[databases]',
      `${APP_DATABASE} = host=${postgres.host} port=${postgres.port} dbname=${APP_DATABASE}`,
      '[pgbouncer]',
      'listen_addr = 127.0.0.1',
      `listen_port = ${port}`,
      `unix_socket_dir = ${dir}`,
      'auth_type = trust',
      `auth_file = ${authFile}`,
      `pool_mode = ${mode}`,
      `default_pool_size = ${pool}`,
      'max_client_conn = 2000',
      'ignore_startup_parameters = extra_float_digits',
      `logfile = ${join(dir, 'pgbouncer.log')}`,
      'admin_users =',
      '',
    ].join('\n'));
    if (account) for (const path of [dir, authFile, config]) chownSync(path, account.uid, account.gid);
    const [program, ...args] = [...wrapper.command, binary, config];
    const child = spawn(program, args, { stdio: 'ignore', ...(account ? { uid: account.uid, gid: account.gid } : {}) });
    const bouncer = new BenchPgBouncer(port, dir, child);
    const deadline = Date.now() + wrapper.startMs;
    while (!(await canConnect(port))) {
      if (Date.now() > deadline || child.exitCode !== null) throw new Error(`PgBouncer (${mode}) did not start; see ${join(dir, 'pgbouncer.log')}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    return bouncer;
  }

  get pid(): number {
    return this.child.pid!;
  }

  stop(): void {
    this.child.kill('SIGKILL');
  }
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port });
    socket.once('connect', () => (socket.destroy(), resolve(true)));
    socket.once('error', () => resolve(false));
  });
}

/** A proxy child process (bench/proxy-child.ts). */
export class ProxyChild {
  readonly port: number;
  private readonly child: ChildProcess;

  private constructor(port: number, child: ChildProcess) {
    this.port = port;
    this.child = child;
  }

  /** `wrapper`: a command the child runs under (e.g. valgrind and its options). */
  static async start(config: ProxyChildConfig, script = fileURLToPath(new URL('./proxy-child.ts', import.meta.url)), wrapper: readonly string[] = []): Promise<ProxyChild> {
    // The options the webhook gives the sidecar container, unless the bench is told others.
    const execArgv = (config.kind === 'sidecar' ? process.env.BENCH_SIDECAR_NODE_OPTIONS ?? sidecarNodeOptions(DEFAULT_INJECTOR_SETTINGS.resources.limits.memory) : '').split(' ').filter(Boolean);
    const [program, ...args] = [...wrapper, process.execPath, ...execArgv, script, JSON.stringify(config)];
    const child = spawn(program, args, { stdio: ['pipe', 'pipe', 'inherit'] });
    const port = await new Promise<number>((resolve, reject) => {
      let out = '';
      child.stdout.on('data', (chunk: Buffer) => {
        out += chunk.toString();
        const line = out.split('\n')[0];
        if (out.includes('\n') && line) resolve((JSON.parse(line) as { port: number }).port);
      });
      child.once('exit', (code) => reject(new Error(`${config.kind} child exited with ${code}`)));
    });
    return new ProxyChild(port, child);
  }

  get pid(): number {
    return this.child.pid!;
  }

  /** Closes stdin (the child exits) and waits for the exit. */
  async stop(): Promise<void> {
    if (this.child.exitCode !== null) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.stdin!.end();
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  }
}

/** Opens `count` clients that log in and then sit idle; resolves once all got ReadyForQuery. */
async function idleClients(port: number, count: number, user: string, dbname: string): Promise<Socket[]> {
  const params = Buffer.from(`user\0${user}\0database\0${dbname}\0\0`);
  const startup = Buffer.alloc(8 + params.length);
  startup.writeInt32BE(startup.length, 0);
  startup.writeInt32BE(196608, 4);
  params.copy(startup, 8);
  const one = (): Promise<Socket> => new Promise((resolve, reject) => {
    const socket = connect({ host: '127.0.0.1', port });
    let pending = Buffer.alloc(0);
    socket.on('data', (chunk: Buffer) => {
      pending = Buffer.concat([pending, chunk]);
      while (pending.length >= 5) {
        const length = pending.readInt32BE(1);
        if (pending.length < length + 1) break;
        const type = String.fromCharCode(pending[0]!);
        if (type === 'E') reject(new Error(`login refused: ${pending.subarray(5, length + 1).toString()}`));
        if (type === 'Z') resolve(socket);
        pending = pending.subarray(length + 1);
      }
    });
    socket.once('error', reject);
    socket.once('connect', () => socket.write(startup));
  });
  const sockets: Socket[] = [];
  // 50 logins at a time: enough to be quick, few enough not to time out.
  for (let i = 0; i < count; i += 50) sockets.push(...await Promise.all(Array.from({ length: Math.min(50, count - i) }, one)));
  return sockets;
}

/**
 * The bench's PostgreSQL trusts the app role on loopback, as PgBouncer and the
 * sidecar trust their clients here: 50 SCRAM logins at once on a loaded
 * 2-core machine can take longer than a whole run.
 */
export async function trustLoopbackApp(postgres: { dataDir: string; app: { user: string }; query: (sql: string) => Promise<unknown> }): Promise<void> {
  const hba = join(postgres.dataDir, 'pg_hba.conf');
  writeFileSync(hba, `host all ${postgres.app.user} 127.0.0.1/32 trust\n${readFileSync(hba, 'utf8')}`);
  await postgres.query('SELECT pg_reload_conf()');
}

/** Runs the proxy section on a fresh local PostgreSQL. */
export async function runProxy(options: ProxyOptions): Promise<ProxyReport> {
  const { seconds, rounds, log } = options;
  const environment = new LocalEnvironment({ postgres: { maxConnections: 200, superuserReservedConnections: 3 } });
  const stoppers: (() => unknown)[] = [];
  const killAll = (): void => {
    for (const stop of stoppers) {
      try {
        void stop();
      } catch {
        // already gone
      }
    }
  };
  process.on('exit', killAll);
  try {
    const postgres = await environment.postgres();
    const { app } = postgres;
    await trustLoopbackApp(postgres);
    const pgbench = (args: string[]): Promise<string> => new Promise((resolve, reject) => {
      execFile('/usr/bin/pgbench', args, { env: { ...process.env, PGPASSWORD: app.password }, timeout: (seconds + 123) * 1000, maxBuffer: 1 << 24 }, (err, stdout, stderr) => {
        if (err) reject(new Error(`pgbench ${args.join(' ')} failed: ${stderr}`));
        else resolve(`${stdout}${stderr}`);
      });
    });
    const bouncers: Record<Mode, BenchPgBouncer> = {
      transaction: await BenchPgBouncer.start(join(environment.runDir, 'bench-pgbouncer-transaction'), postgres, 'transaction', options.pool),
      session: await BenchPgBouncer.start(join(environment.runDir, 'bench-pgbouncer-session'), postgres, 'session', options.pool),
    };
    for (const b of Object.values(bouncers)) stoppers.push(() => b.stop());
    const sidecarSocketDir = join(environment.runDir, 'bench-sidecar-socket');
    mkdirSync(sidecarSocketDir, { recursive: true });
    const target = { host: postgres.host, port: postgres.port, user: app.user, password: app.password, dbname: APP_DATABASE };
    // Compiled, as the image runs it: its CPU and RSS are the product's, not type stripping's.
    const [compiledChild] = compileEntries(['bench/proxy-child.ts'], compiledDir('bench'));
    const sidecars: Record<Mode, ProxyChild> = {
      transaction: await ProxyChild.start({ kind: 'sidecar', ...target, mode: 'transaction', grant: options.pool, ...(options.unix ? { socketDir: sidecarSocketDir } : {}) }, compiledChild),
      session: await ProxyChild.start({ kind: 'sidecar', ...target, mode: 'session', grant: options.pool }, compiledChild),
    };
    const pipe = await ProxyChild.start({ kind: 'pipe', ...target }, compiledChild);
    // The pipe on the sidecar's native socket I/O, and a relay in C on Node's event loop: only when asked for (--targets native-pipe,c-relay).
    const nativePipe = options.targets?.includes('native-pipe') === true ? await ProxyChild.start({ kind: 'native-pipe', ...target }, compiledChild) : undefined;
    const cRelay = options.targets?.includes('c-relay') === true ? await ProxyChild.start({ kind: 'c-relay', ...target }, compiledChild) : undefined;
    // A/B in one run (transaction mode only): the sidecar on Node.js streams (--streams), or another tree's
    // bench/proxy-child.ts named by BENCH_SIDECAR_B.
    const sidecarB = options.streams === true ? await ProxyChild.start({ kind: 'sidecar', ...target, mode: 'transaction', grant: options.pool, nativeIo: false }, compiledChild)
      : process.env.BENCH_SIDECAR_B === undefined ? undefined : await ProxyChild.start({ kind: 'sidecar', ...target, mode: 'transaction', grant: options.pool }, process.env.BENCH_SIDECAR_B);
    for (const c of [...Object.values(sidecars), pipe, ...(sidecarB ? [sidecarB] : []), ...(nativePipe ? [nativePipe] : []), ...(cRelay ? [cRelay] : [])]) stoppers.push(() => c.stop());

    const rssIdle = processRssMb(sidecars.transaction.pid) ?? Number.NaN;
    await pgbench(['-i', '-s', '10', '-q', '-h', '127.0.0.1', '-p', String(postgres.port), '-U', app.user, APP_DATABASE]);
    const versions = { postgres: await postgres.version(), pgbouncer: (await new Promise<string>((r) => execFile(requireBinary('pgbouncer', 'pgbouncer', ['/usr/sbin/pgbouncer']), ['--version'], (_e, out) => r(out.split('\n')[0] ?? '')))), node: process.version };
    log(`proxy: pgbench, ${seconds} s per run, ${rounds} interleaved round(s), pool ${options.pool}; ${versions.postgres}, ${versions.pgbouncer}, Node.js ${versions.node}`);

    interface Case { script: Script; mode: Mode; clients: number; targets: Target[] }
    const cases: Case[] = [];
    for (const script of ['select-only', 'tpcb-like'] as const) {
      for (const clients of options.clients) {
        for (const mode of ['transaction', 'session'] as const) {
          // pgbench logs every client in before it starts, and the sidecar in session mode logs a client in only
          // behind a server connection of its own: with more clients than the pool, the extra ones wait for the
          // first ones' sessions to end, which never happens before the run starts (PgBouncer answers the login itself).
          if (mode === 'session' && clients > options.pool) continue;
          // Direct and the pipe do not pool: measured once per script and client count, shown in both modes.
          const unix: Target[] = options.unix && mode === 'transaction' ? ['pgbouncer-unix', 'sidecar-unix'] : [];
          cases.push({ script, mode, clients, targets: mode === 'transaction' ? ['direct', 'pipe', ...(nativePipe ? ['native-pipe' as const] : []), ...(cRelay ? ['c-relay' as const] : []), 'pgbouncer', 'sidecar', ...unix] : ['pgbouncer', 'sidecar'] });
        }
      }
    }
    // PgBouncer 1.18 cannot pool named prepared statements in transaction mode: direct vs the sidecar only.
    for (const clients of options.clients) cases.push({ script: 'select-only -M prepared', mode: 'transaction', clients, targets: ['direct', 'sidecar'] });
    if (sidecarB) for (const c of cases) if (c.mode === 'transaction') c.targets.push('sidecar-b');
    if (options.targets !== undefined) for (const c of cases) c.targets = c.targets.filter((t) => options.targets!.includes(t));
    const selected = cases.filter((c) => (options.filter === undefined || options.filter.test(`${c.script} ${c.mode} ${c.clients}`)) && c.targets.length > 0);

    // Warm-up, not recorded: each proxy's JIT and buffers settle before round 1.
    for (const port of [pipe.port, ...(nativePipe ? [nativePipe.port] : []), ...(cRelay ? [cRelay.port] : []), ...(sidecarB ? [sidecarB.port] : []), ...Object.values(bouncers).map((b) => b.port), ...Object.values(sidecars).map((c) => c.port)]) {
      await pgbench(['-n', '-S', '-T', '1', '-c', '10', '-j', '2', '-h', '127.0.0.1', '-p', String(port), '-U', app.user, APP_DATABASE]);
    }
    const runs = new Map<string, Run[]>();
    const key = (c: { script: Script; mode: Mode; clients: number }, t: Target): string => (t === 'direct' || t === 'pipe' || t === 'native-pipe' || t === 'c-relay') && c.script !== 'select-only -M prepared' ? `${c.script}|${c.clients}|${t}` : `${c.script}|${c.mode}|${c.clients}|${t}`;
    for (let round = 0; round < rounds; round += 1) {
      for (const [index, c] of selected.entries()) {
        const order = c.targets.map((_, i) => c.targets[(i + round + index) % c.targets.length]!);
        for (const t of order) {
          const proxyOf = t === 'pipe' ? pipe : t === 'native-pipe' ? nativePipe : t === 'c-relay' ? cRelay : t === 'pgbouncer' || t === 'pgbouncer-unix' ? bouncers[c.mode] : t === 'sidecar' || t === 'sidecar-unix' ? sidecars[c.mode] : t === 'sidecar-b' ? sidecarB : undefined;
          const port = proxyOf?.port ?? postgres.port;
          const pid = t === 'direct' ? undefined : proxyOf?.pid;
          // libpq takes a directory as the host: the Unix-domain socket .s.PGSQL.<port> in it.
          const host = t === 'pgbouncer-unix' ? bouncers[c.mode].socketDir : t === 'sidecar-unix' ? sidecarSocketDir : '127.0.0.1';
          // 50 backends forked at once on a loaded 2-core machine can take longer than a short run (pgbench's tps leaves connection time out).
          const duration = c.clients >= 50 ? seconds + 3 : seconds;
          const args = ['-n', '-T', String(duration), '-c', String(c.clients), '-j', String(Math.min(c.clients, 2)), '-h', host, '-p', String(port), '-U', app.user];
          if (c.script !== 'tpcb-like') args.push('-S');
          if (c.script === 'select-only -M prepared') args.push('-M', 'prepared');
          const cpuBefore = pid === undefined ? undefined : processCpuMicros(pid);
          const switchesBefore = pid === undefined ? undefined : contextSwitches(pid);
          const output = await pgbench([...args, APP_DATABASE]);
          const cpuAfter = pid === undefined ? undefined : processCpuMicros(pid);
          const switchesAfter = pid === undefined ? undefined : contextSwitches(pid);
          // User time is the proxy's own work; system time mostly the loopback TCP stack it shares with any proxy.
          const user = cpuBefore && cpuAfter ? cpuAfter.user - cpuBefore.user : Number.NaN;
          const cpu = cpuBefore && cpuAfter ? user + cpuAfter.system - cpuBefore.system : Number.NaN;
          const tps = /tps = ([\d.]+)/.exec(output);
          const count = /actually processed: (\d+)/.exec(output);
          // A run whose clients could not even log in within its time (an overloaded machine) counts as nothing measured.
          if (!tps || !count) log(`  no transactions in this run:\n${output}`);
          const run = tps && count ? { tps: Number(tps[1]), cpuMicros: cpu / Number(count[1]) } : { tps: Number.NaN, cpuMicros: Number.NaN };
          runs.set(key(c, t), [...(runs.get(key(c, t)) ?? []), run]);
          // Preemptions (involuntary switches) per transaction: each costs the pooler a switch out and back in.
          const switches = switchesBefore && switchesAfter
            ? `, switches/tx ${((switchesAfter.voluntary - switchesBefore.voluntary) / Number(count?.[1])).toFixed(2)} vol. ${((switchesAfter.involuntary - switchesBefore.involuntary) / Number(count?.[1])).toFixed(2)} invol.` : '';
          log(`  round ${round + 1} ${c.script.padEnd(23)} ${c.mode.padEnd(11)} ${String(c.clients).padStart(2)} cl. ${t.padEnd(9)} ${run.tps.toFixed(0).padStart(6)} tps${Number.isNaN(run.cpuMicros) ? '' : `  ${run.cpuMicros.toFixed(1)} µs/tx (user ${(user / Number(count?.[1])).toFixed(1)}${switches})`}`);
        }
      }
    }

    const proxy: ProxyResult[] = selected.map((c) => {
      const of = (t: Target): Run[] | undefined => runs.get(key(c, t));
      const tps = (t: Target): number | null => (of(t) ? Math.round(median(of(t)!.map((r) => r.tps))) : null);
      const cpu = (t: Target): number | null => (of(t) ? Number(median(of(t)!.map((r) => r.cpuMicros)).toFixed(1)) : null);
      const ratios = of('pgbouncer') && of('sidecar') ? of('sidecar')!.map((r, i) => r.tps / (of('pgbouncer')![i]?.tps ?? Number.NaN)).filter((r) => !Number.isNaN(r)) : null;
      return {
        script: c.script, mode: c.mode, clients: c.clients,
        direct_tps: tps('direct') ?? Number.NaN, pgbouncer_tps: tps('pgbouncer'), sidecar_tps: tps('sidecar') ?? Number.NaN, pipe_tps: tps('pipe'),
        pgbouncer_cpu_us: cpu('pgbouncer'), sidecar_cpu_us: cpu('sidecar') ?? Number.NaN,
        sidecar_vs_pgbouncer: ratios?.length ? Number(median(ratios).toFixed(2)) : null,
        sidecar_vs_pgbouncer_range: ratios?.length ? [Number(Math.min(...ratios).toFixed(2)), Number(Math.max(...ratios).toFixed(2))] : null,
        ...(of('sidecar-unix') ? {
          pgbouncer_unix_tps: tps('pgbouncer-unix'), sidecar_unix_tps: tps('sidecar-unix'), pgbouncer_unix_cpu_us: cpu('pgbouncer-unix'), sidecar_unix_cpu_us: cpu('sidecar-unix'),
        } : {}),
        ...(of('sidecar-b') ? { sidecar_b_tps: tps('sidecar-b'), sidecar_b_cpu_us: cpu('sidecar-b') } : {}),
        sidecar_vs_direct: Number(((tps('sidecar') ?? Number.NaN) / (tps('direct') ?? Number.NaN)).toFixed(2)),
        rounds,
      };
    });

    // RSS: the transaction-mode sidecar idle (measured at start), then holding 1,000 idle logged-in clients.
    const clients = await idleClients(sidecars.transaction.port, 1000, app.user, APP_DATABASE);
    await new Promise((r) => setTimeout(r, 500));
    const rss1000 = processRssMb(sidecars.transaction.pid) ?? Number.NaN;
    for (const socket of clients) socket.destroy();
    log(`sidecar RSS: idle ${rssIdle.toFixed(0)} MB, with 1,000 idle clients ${rss1000.toFixed(0)} MB`);
    return { proxy, sidecar_rss_mb: { idle: Math.round(rssIdle), clients_1000: Math.round(rss1000) }, versions, seconds_per_run: seconds };
  } finally {
    killAll();
    process.off('exit', killAll);
    await environment.stop();
  }
}
