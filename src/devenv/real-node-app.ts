/**
 * The application that the real-node scenarios and `npm run demo -- --real-node`
 * run in pods: the poolkeeper image's node running a small script that keeps
 * its pools busy through the sidecar (PGHOST, PGPORT and PGUSER come from the
 * webhook) and writes what it saw to /stats/<pod>.json on a hostPath the host
 * reads: queries, errors, and its sidecar's client wait histogram (read from
 * the sidecar's /metrics, which is on the pod's own loopback).
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { DEFAULT_INJECTOR_SETTINGS } from '../core/inject/index.ts';
import { addHistograms, EMPTY_HISTOGRAM, type HistogramCounts } from '../core/status/histogram.ts';
import { deployedImageName } from './image.ts';

/**
 * The script. `APP_POOLS` pools (a process each, in a real app) of
 * `APP_POOL_SIZE` connections, every connection running `SELECT
 * pg_sleep(APP_QUERY_SECONDS)` in a loop. On SIGTERM it finishes what it has
 * in flight, as a well-behaved application does, and writes its last figures.
 */
const APP_SCRIPT = `
import pg from 'pg';
import { renameSync, writeFileSync } from 'node:fs';
const file = '/stats/' + process.env.POD_NAME + '.json';
const stats = { queries: 0, errors: 0, lastError: '', waits: { buckets: [], count: 0 } };
let running = true;
const write = () => { writeFileSync(file + '.tmp', JSON.stringify(stats)); renameSync(file + '.tmp', file); };
const pools = Array.from({ length: Number(process.env.APP_POOLS ?? 1) }, () => new pg.Pool({ max: Number(process.env.APP_POOL_SIZE ?? 3), connectionTimeoutMillis: 30000 }));
const sql = 'SELECT pg_sleep(' + Number(process.env.APP_QUERY_SECONDS ?? 0.005) + ')';
const workers = pools.flatMap((pool) => {
  pool.on('error', (e) => { if (running) { stats.errors++; stats.lastError = e.message; } });
  return Array.from({ length: pool.options.max }, async () => {
    while (running) {
      try { await pool.query(sql); stats.queries++; }
      catch (e) { if (running) { stats.errors++; stats.lastError = e.message; await new Promise((r) => setTimeout(r, 100)); } }
    }
  });
});
const readWaits = async () => {
  try {
    const text = await (await fetch(process.env.APP_SIDECAR_METRICS)).text();
    const buckets = new Map();
    let count = 0;
    for (const line of text.split('\\n')) {
      const value = Number(line.split(' ').pop());
      if (line.startsWith('poolkeeper_sidecar_client_wait_seconds_bucket{')) {
        const le = /le="([^"]+)"/.exec(line)?.[1] ?? '+Inf';
        buckets.set(le, (buckets.get(le) ?? 0) + value);
      } else if (line.startsWith('poolkeeper_sidecar_client_wait_seconds_count')) count += value;
    }
    stats.waits = { buckets: [...buckets], count };
  } catch {
    // the sidecar is starting or gone: keep the last reading
  }
};
setInterval(() => { void readWaits().then(write); }, 250);
process.on('SIGTERM', async () => { await readWaits(); running = false; await Promise.all(workers); await Promise.all(pools.map((p) => p.end())); write(); process.exit(0); });
`;

/** How the app in each pod loads its sidecar. */
export interface AppLoad {
  /** Pools per pod (worker processes, in a real app). */
  pools: number;
  /** Connections per pool. */
  poolSize: number;
  /** Seconds each query sleeps on the server. */
  querySeconds: number;
}

/** A Deployment of the app, opted in to `connection`, writing its figures to `statsDir` on the node. */
export function appDeployment(args: { namespace: string; name: string; connection: string; replicas: number; statsDir: string; load: AppLoad }): Record<string, unknown> {
  const { namespace, name, connection, replicas, statsDir, load } = args;
  return {
    apiVersion: 'apps/v1',
    kind: 'Deployment',
    metadata: { name, namespace },
    spec: {
      replicas,
      selector: { matchLabels: { app: name } },
      template: {
        metadata: { labels: { app: name, 'poolkeeper.dev/connection': connection } },
        spec: {
          containers: [{
            name: 'app',
            image: deployedImageName(),
            imagePullPolicy: 'IfNotPresent',
            command: ['/nodejs/bin/node', '--input-type=module', '-e', APP_SCRIPT],
            env: [
              { name: 'POD_NAME', valueFrom: { fieldRef: { fieldPath: 'metadata.name' } } },
              { name: 'APP_POOLS', value: String(load.pools) },
              { name: 'APP_POOL_SIZE', value: String(load.poolSize) },
              { name: 'APP_QUERY_SECONDS', value: String(load.querySeconds) },
              { name: 'APP_SIDECAR_METRICS', value: `http://127.0.0.1:${DEFAULT_INJECTOR_SETTINGS.adminPort}/metrics` },
            ],
            volumeMounts: [{ name: 'stats', mountPath: '/stats' }],
            resources: { requests: { cpu: '10m', memory: '32Mi' } },
          }],
          volumes: [{ name: 'stats', hostPath: { path: statsDir, type: 'Directory' } }],
        },
      },
    },
  };
}

/** What the apps wrote, summed over pods (those gone included: their files stay). */
export interface AppStats {
  queries: number;
  errors: number;
  lastErrors: string[];
  /** Each pod's latest reading of its sidecar's wait histogram. */
  waits: Map<string, HistogramCounts>;
}

/** Reads every pod's file in `statsDir`. */
export function readAppStats(statsDir: string): AppStats {
  const total: AppStats = { queries: 0, errors: 0, lastErrors: [], waits: new Map() };
  if (!existsSync(statsDir)) return total;
  // Each app replaces its file whole (rename), so a read never sees half a file.
  for (const f of readdirSync(statsDir).filter((name) => name.endsWith('.json'))) {
    const s = JSON.parse(readFileSync(join(statsDir, f), 'utf8')) as { queries: number; errors: number; lastError: string; waits?: { buckets: Array<[string, number]>; count: number } };
    total.queries += s.queries;
    total.errors += s.errors;
    if (s.lastError) total.lastErrors.push(`${f}: ${s.lastError}`);
    if (s.waits) total.waits.set(f.replace(/\.json$/, ''), { buckets: new Map(s.waits.buckets.map(([le, n]) => [le === '+Inf' ? Infinity : Number(le), n])), count: s.waits.count });
  }
  return total;
}

/** The apps' wait histograms summed. */
export function totalWaits(stats: AppStats): HistogramCounts {
  return [...stats.waits.values()].reduce(addHistograms, EMPTY_HISTOGRAM);
}
