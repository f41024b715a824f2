/**
 * pgbench select-only (-S) against PostgreSQL directly, through PgBouncer
 * (transaction mode, pool 20) and through the sidecar (transaction mode,
 * grant 20), interleaved round by round so that machine noise hits all three
 * alike. Also -C (a new connection per transaction) with 4 clients.
 *
 *   node bench/pgbench-compare.ts [seconds per run, default 6] [rounds, default 2]
 *
 * max_connections is raised to 120 here so that 50 direct clients fit next to
 * both poolers' server connections.
 */
import { execFile } from 'node:child_process';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { credentialsGeneration } from '../src/core/credentials.ts';
import { LocalEnvironment } from '../src/devenv/environment.ts';
import { Sidecar, StaticCredentialsSource } from '../src/sidecar/index.ts';

interface Result {
  tps: number;
  latencyMs: number;
}

const seconds = Number(process.argv[2] ?? 6);
const rounds = Number(process.argv[3] ?? 2);
const scenarios = [
  { name: '-S  1 client', clients: 1, connectEach: false },
  { name: '-S 10 clients', clients: 10, connectEach: false },
  { name: '-S 50 clients', clients: 50, connectEach: false },
  { name: '-S -C 4 clients', clients: 4, connectEach: true },
];
const targets = ['direct', 'pgbouncer', 'sidecar'] as const;
type Target = (typeof targets)[number];

function pgbench(args: string[], password: string): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('/usr/bin/pgbench', args, { env: { ...process.env, PGPASSWORD: password }, timeout: (seconds + 60) * 1000, maxBuffer: 1 << 24 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`pgbench ${args.join(' ')} failed: ${stderr}`));
      else resolve(stdout);
    });
  });
}

function parse(output: string): Result {
  const tps = /tps = ([\d.]+)/.exec(output);
  const latency = /latency average = ([\d.]+) ms/.exec(output);
  if (!tps || !latency) throw new Error(`cannot parse pgbench output:\n${output}`);
  return { tps: Number(tps[1]), latencyMs: Number(latency[1]) };
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
  await pgbench(['-i', '-s', '10', '-q', '-h', '127.0.0.1', '-p', String(postgres.port), '-U', app.user, 'app'], app.password);
  console.log(`pgbench -S, ${seconds} s per run, ${rounds} interleaved rounds; PostgreSQL ${await postgres.version()}, ${bouncer.version()}`);
  const results = new Map<string, Result[]>();
  for (let round = 1; round <= rounds; round += 1) {
    for (const scenario of scenarios) {
      // Rotate the order each round so no target always runs first.
      const order = targets.map((_, i) => targets[(i + round + scenarios.indexOf(scenario)) % targets.length]!);
      for (const target of order) {
        const args = ['-S', '-n', '-T', String(seconds), '-c', String(scenario.clients), '-j', String(Math.min(scenario.clients, 2)), '-h', '127.0.0.1', '-p', String(ports[target]), '-U', app.user];
        if (scenario.connectEach) args.push('-C');
        const result = parse(await pgbench([...args, 'app'], app.password));
        const key = `${scenario.name}|${target}`;
        results.set(key, [...(results.get(key) ?? []), result]);
        console.log(`round ${round} ${scenario.name.padEnd(16)} ${target.padEnd(9)} ${result.tps.toFixed(0).padStart(7)} tps  ${result.latencyMs.toFixed(3)} ms`);
      }
    }
  }
  const mean = (rs: Result[], f: (r: Result) => number): number => rs.reduce((a, r) => a + f(r), 0) / rs.length;
  console.log('\nmean over rounds');
  console.log('scenario          direct tps (ms)      pgbouncer tps (ms)   sidecar tps (ms)     sidecar/pgbouncer  sidecar/direct');
  for (const scenario of scenarios) {
    const cell = (t: Target): string => {
      const rs = results.get(`${scenario.name}|${t}`)!;
      return `${mean(rs, (r) => r.tps).toFixed(0).padStart(7)} (${mean(rs, (r) => r.latencyMs).toFixed(3)})`.padEnd(21);
    };
    const tps = (t: Target): number => mean(results.get(`${scenario.name}|${t}`)!, (r) => r.tps);
    console.log(`${scenario.name.padEnd(18)}${cell('direct')}${cell('pgbouncer')}${cell('sidecar')}${(tps('sidecar') / tps('pgbouncer')).toFixed(2).padStart(8)}${(tps('sidecar') / tps('direct')).toFixed(2).padStart(17)}`);
  }
  await sidecar.close();
} finally {
  await environment.stop();
}
