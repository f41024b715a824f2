/**
 * pgbench select-only (-S) against PostgreSQL directly, through PgBouncer
 * (transaction mode, pool 20) and through the sidecar (transaction mode,
 * grant 20), interleaved round by round so that machine noise hits all three
 * alike. Also -C (a new connection per transaction) with 4 clients, and
 * `-M prepared` (named prepared statements) direct vs the sidecar only:
 * PgBouncer 1.18 cannot pool those in transaction mode.
 *
 *   node bench/pgbench-compare.ts [seconds per run, default 6] [rounds, default 2] [scenario filter]
 *
 * The filter (a regular expression on the scenario name, e.g. '^-S \\d') keeps
 * quick iterations short; recorded figures use all scenarios.
 *
 * max_connections is raised to 120 here so that 50 direct clients fit next to
 * both poolers' server connections.
 */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { credentialsGeneration } from '../src/core/credentials.ts';
import { LocalEnvironment } from '../src/devenv/environment.ts';
import { Sidecar, StaticCredentialsSource } from '../src/sidecar/index.ts';

interface Result {
  tps: number;
  latencyMs: number;
  /** CPU time the pooler process spent per transaction (µs); NaN for direct. */
  poolerCpuMicros: number;
}

const seconds = Number(process.argv[2] ?? 6);
const rounds = Number(process.argv[3] ?? 2);
const scenarioFilter = new RegExp(process.argv[4] ?? '');
const targets = ['direct', 'pgbouncer', 'sidecar'] as const;
type Target = (typeof targets)[number];
interface Scenario {
  name: string;
  clients: number;
  connectEach: boolean;
  prepared?: boolean;
  targets: readonly Target[];
}
const scenarios: Scenario[] = ([
  { name: '-S  1 client', clients: 1, connectEach: false, targets },
  { name: '-S 10 clients', clients: 10, connectEach: false, targets },
  { name: '-S 50 clients', clients: 50, connectEach: false, targets },
  { name: '-S -C 4 clients', clients: 4, connectEach: true, targets },
  { name: '-M prepared -S 10 clients', clients: 10, connectEach: false, prepared: true, targets: ['direct', 'sidecar'] },
  { name: '-M prepared -S 50 clients', clients: 50, connectEach: false, prepared: true, targets: ['direct', 'sidecar'] },
] satisfies Scenario[]).filter((s) => scenarioFilter.test(s.name));

function pgbench(args: string[], password: string): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('/usr/bin/pgbench', args, { env: { ...process.env, PGPASSWORD: password }, timeout: (seconds + 60) * 1000, maxBuffer: 1 << 24 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`pgbench ${args.join(' ')} failed: ${stderr}`));
      else resolve(stdout);
    });
  });
}

function parse(output: string, cpuMicros: number): Result {
  const tps = /tps = ([\d.]+)/.exec(output);
  const latency = /latency average = ([\d.]+) ms/.exec(output);
  const count = /actually processed: (\d+)/.exec(output);
  if (!tps || !latency || !count) throw new Error(`cannot parse pgbench output:\n${output}`);
  return { tps: Number(tps[1]), latencyMs: Number(latency[1]), poolerCpuMicros: cpuMicros / Number(count[1]) };
}

/** The pid listening on a loopback TCP port (PgBouncer's), from ss. */
function listenerPid(port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    execFile('ss', ['-Htlnp', `sport = :${port}`], (err, stdout) => {
      const pid = /pid=(\d+)/.exec(stdout);
      if (err || !pid) reject(new Error(`no process listens on ${port}: ${err?.message ?? stdout}`));
      else resolve(Number(pid[1]));
    });
  });
}

/** user+system CPU of a process in µs (clock ticks of 10 ms). */
function processCpuMicros(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /s, '').split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 10_000;
}

const environment = new LocalEnvironment({ postgres: { maxConnections: 120, superuserReservedConnections: 3 } });
try {
  const postgres = await environment.postgres();
  const bouncer = await environment.pgbouncer();
  const { app } = postgres;
  const credentials = new StaticCredentialsSource({ username: app.user, password: app.password, generation: credentialsGeneration({ username: app.user, password: app.password }) });
  const sidecar = new Sidecar({
    settings: {
      listenHost: '127.0.0.1', listenPort: 0,
      database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable' },
      pool: { mode: 'transaction', poolTimeout: 30, poolRecycle: 3600, poolPrePing: true, idleTimeout: 600 },
      drainTimeout: 5,
    },
    credentials, logger: pino({ level: 'warn' }), metrics: new Registry(),
  });
  const { port: sidecarPort } = await sidecar.start();
  sidecar.setGrant(20, 1);
  const ports: Record<Target, number> = { direct: postgres.port, pgbouncer: bouncer.port, sidecar: sidecarPort };
  const bouncerPid = await listenerPid(bouncer.port);
  // The sidecar runs in this process, idle apart from it during a run.
  const cpuOf: Record<Target, () => number> = {
    direct: () => Number.NaN,
    pgbouncer: () => processCpuMicros(bouncerPid),
    sidecar: () => { const u = process.cpuUsage(); return u.user + u.system; },
  };
  await pgbench(['-i', '-s', '10', '-q', '-h', '127.0.0.1', '-p', String(postgres.port), '-U', app.user, 'app'], app.password);
  console.log(`pgbench -S, ${seconds} s per run, ${rounds} interleaved rounds; PostgreSQL ${await postgres.version()}, ${bouncer.version()}`);
  const results = new Map<string, Result[]>();
  for (let round = 1; round <= rounds; round += 1) {
    for (const scenario of scenarios) {
      // Rotate the order each round so no target always runs first.
      const order = scenario.targets.map((_, i) => scenario.targets[(i + round + scenarios.indexOf(scenario)) % scenario.targets.length]!);
      for (const target of order) {
        const args = ['-S', '-n', '-T', String(seconds), '-c', String(scenario.clients), '-j', String(Math.min(scenario.clients, 2)), '-h', '127.0.0.1', '-p', String(ports[target]), '-U', app.user];
        if (scenario.connectEach) args.push('-C');
        if (scenario.prepared === true) args.push('-M', 'prepared');
        const cpuBefore = cpuOf[target]();
        const output = await pgbench([...args, 'app'], app.password);
        const result = parse(output, cpuOf[target]() - cpuBefore);
        const key = `${scenario.name}|${target}`;
        results.set(key, [...(results.get(key) ?? []), result]);
        console.log(`round ${round} ${scenario.name.padEnd(26)} ${target.padEnd(9)} ${result.tps.toFixed(0).padStart(7)} tps  ${result.latencyMs.toFixed(3)} ms  pooler CPU ${result.poolerCpuMicros.toFixed(1)} µs/tx`);
      }
    }
  }
  const mean = (rs: Result[], f: (r: Result) => number): number => rs.reduce((a, r) => a + f(r), 0) / rs.length;
  console.log('\nmean over rounds');
  console.log('scenario                    direct tps (ms)      pgbouncer tps (ms)   sidecar tps (ms)     sidecar/pgbouncer  sidecar/direct  CPU µs/tx pgbouncer  sidecar');
  for (const scenario of scenarios) {
    const runs = (t: Target): Result[] => results.get(`${scenario.name}|${t}`) ?? [{ tps: Number.NaN, latencyMs: Number.NaN, poolerCpuMicros: Number.NaN }];
    const cell = (t: Target): string => {
      const rs = runs(t);
      return `${mean(rs, (r) => r.tps).toFixed(0).padStart(7)} (${mean(rs, (r) => r.latencyMs).toFixed(3)})`.padEnd(21);
    };
    const tps = (t: Target): number => mean(runs(t), (r) => r.tps);
    const cpu = (t: Target): string => mean(runs(t), (r) => r.poolerCpuMicros).toFixed(1);
    console.log(`${scenario.name.padEnd(28)}${cell('direct')}${cell('pgbouncer')}${cell('sidecar')}${(tps('sidecar') / tps('pgbouncer')).toFixed(2).padStart(8)}${(tps('sidecar') / tps('direct')).toFixed(2).padStart(17)}${cpu('pgbouncer').padStart(21)}${cpu('sidecar').padStart(9)}`);
  }
  await sidecar.close();
} finally {
  await environment.stop();
}
