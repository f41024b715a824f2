/**
 * The embedded default (`npm run demo`): a local control plane and
 * PostgreSQL, the poolkeeper controller, and a Deployment whose pods each run
 * a real sidecar (under a kubelet simulator) with application load through it.
 * With `--real-node` (root, see docs/real-node.md) the same story runs on a
 * real single-node Kubernetes: poolkeeper installed from crds/ and deploy/,
 * the pods real containers with the injected native sidecar.
 * It tells the story: what the fleet would open without poolkeeper, the limit
 * and where it comes from, a line per rebalance while the Deployment scales
 * 3 -> 8 -> 2, how long clients wait for a connection in each phase, and a
 * closing table; PostgreSQL must never see more connections than the limit.
 */
import { chmodSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import type { KubeConfig } from '@kubernetes/client-node';
import pg from 'pg';
import pino from 'pino';
import type { DatabaseConnection } from '../api/index.ts';
import { addHistograms, EMPTY_HISTOGRAM, histogramQuantile, subtractHistograms, type HistogramCounts } from '../core/status/histogram.ts';
import { LocalEnvironment } from '../devenv/environment.ts';
import { KubeletSimulator, type SimulatedPod } from '../devenv/kubelet-sim.ts';
import type { PostgresServer } from '../devenv/postgres.ts';
import { appDeployment, readAppStats, totalWaits as appWaits } from '../devenv/real-node-app.ts';
import { BRIDGE_ADDRESS, BRIDGE_POSTGRES_PORT, installPoolkeeper, realNodeSupport } from '../devenv/real-node.ts';
import { formatStatuses, probeEnvironment } from '../devenv/report.ts';
import { createNamespaceWithSecret, createOptedInDeployment, eventually, installCrds, startLocalWebhook } from '../devenv/scenario.ts';
import { KubeHttp } from '../kube/http.ts';
import { Informer, type KubeObject } from '../kube/informer.ts';
import { startController } from './controller-main.ts';

const NAMESPACE = 'shop';
/** Each pod is "gunicorn with 2 workers", each worker with SQLAlchemy's default pool of 5 (no overflow here). */
const PROCESSES = 2;
const APP_POOL = 5;
const PHASES = [3, 8, 2];
const quiet = pino({ level: 'silent' });
/**
 * The sidecars' backends: the app role's, started since the fleet began (the health probe
 * left PgBouncer one idle server connection before), but the controller's brief login
 * check (it comes out of the reserve).
 */
const COUNT_POOLKEEPER = "SELECT count(*) AS n FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND backend_start >= $1 AND application_name NOT LIKE 'poolkeeper-controller%'";

/** What the demo counts while it runs. */
interface Stats {
  queries: number;
  errors: number;
  /** The latest reading of each pod's sidecar wait histogram (kept after the pod is gone). */
  waits: Map<string, HistogramCounts>;
}

/** A sidecar's `poolkeeper_sidecar_client_wait_seconds` as bucket counts. */
async function readWaits(pod: SimulatedPod): Promise<HistogramCounts> {
  const metric = await pod.sidecar?.sidecar.metrics.waitSeconds.get();
  if (!metric) return EMPTY_HISTOGRAM;
  const buckets = new Map<number, number>();
  let count = 0;
  for (const v of metric.values) {
    if (v.metricName?.endsWith('_bucket')) buckets.set(v.labels.le === '+Inf' ? Infinity : Number(v.labels.le), v.value);
    if (v.metricName?.endsWith('_count')) count = v.value;
  }
  return { buckets, count };
}

function totalWaits(stats: Stats): HistogramCounts {
  return [...stats.waits.values()].reduce(addHistograms, EMPTY_HISTOGRAM);
}

function startApp(pod: SimulatedPod, stats: Stats): void {
  // Each worker keeps its pool of 5 whatever the hint says: the sidecar caps what reaches the server, and queues the rest.
  const database = pod.appEnv.PGDATABASE ?? 'app';
  const pools = Array.from({ length: PROCESSES }, () => new pg.Pool({ host: pod.appEnv.PGHOST ?? '127.0.0.1', port: pod.sidecar?.port, user: 'app', database, max: APP_POOL, connectionTimeoutMillis: 30_000 }));
  let running = true;
  for (const pool of pools) pool.on('error', () => undefined);
  const loops = pools.flatMap((pool) => Array.from({ length: APP_POOL }, async () => {
    while (running) {
      try {
        await pool.query('SELECT pg_sleep(0.01)');
        stats.queries += 1;
      } catch {
        if (running) stats.errors += 1;
      }
    }
  }));
  pod.onAppStop = async () => {
    stats.waits.set(pod.name, await readWaits(pod));
    running = false;
    await Promise.all(loops);
    await Promise.all(pools.map((p) => p.end()));
  };
}

function ms(seconds: number | undefined): string {
  if (seconds === undefined) return '-';
  const value = seconds * 1000;
  return value < 10 ? value.toFixed(1) : value.toFixed(0);
}

/** One row of the closing table. */
interface PhaseRow {
  phase: string;
  pods: number;
  wanted: number;
  budget: string;
  now: number;
  peak: number;
  p50: number | undefined;
  p99: number | undefined;
  errors: number;
  seconds: number;
}

function table(rows: readonly PhaseRow[]): string {
  const header = ['phase', 'pods', 'wanted without poolkeeper', 'per-pod budget', 'PostgreSQL now/peak', 'wait p50/p99 ms', 'errors', 'rebalance'];
  const cells = rows.map((r) => [r.phase, String(r.pods), String(r.wanted), r.budget, `${r.now}/${r.peak}`, `${ms(r.p50)}/${ms(r.p99)}`, String(r.errors), `${r.seconds.toFixed(1)} s`]);
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i]!.length)));
  return [header, ...cells].map((row) => row.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n');
}

/** Where the demo's pods run: the kubelet simulator (sidecars in this process) or a real node (containers). */
interface DemoCluster {
  /** kubectl against this cluster's API server. */
  kubectlAsync(args: string[], input?: string): Promise<string>;
  /** The cluster's API server, for the demo's own watch. */
  kubeConfig(): KubeConfig;
  /** Running pods of the Deployment, none terminating. */
  livePods(): Promise<number>;
  /** The apps' queries, errors and their sidecars' wait histograms, summed over pods. */
  stats(): { queries: number; errors: number; waits: HistogramCounts };
  /** The first pod as the webhook left it: its init containers and its app's env. */
  firstPod(): Promise<{ name: string; initContainers: string[]; env: Record<string, string> }>;
  stop(): Promise<void>;
}

/** The DatabaseConnection the story is about, its database at `host:port`. */
function orders(host: string, port: number): string {
  return JSON.stringify({
    apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders-db', namespace: NAMESPACE },
    spec: {
      database: { host, port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'orders-db-credentials' } },
      maxConnections: 'auto', reserve: '15%',
      consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, minPerPod: PROCESSES, processesPerPod: PROCESSES, maxPerPod: PROCESSES * APP_POOL }],
      pool: { mode: 'transaction', poolTimeout: 30 },
    },
  });
}

/** The embedded control plane, the controller and webhook in this process, the pods under the kubelet simulator. */
async function simulatedCluster(postgres: PostgresServer): Promise<DemoCluster> {
  const kube = await env.kube();
  await installCrds(kube);
  // The kubelet simulator binds pods to this node; without a Node object the pod garbage collector
  // force-deletes them as orphans after about 40 s while their sidecars still run.
  kube.kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Node', metadata: { name: 'simulated-node' } }));
  createNamespaceWithSecret(kube, { namespace: NAMESPACE, secret: 'orders-db-credentials', username: postgres.app.user, password: postgres.app.password });
  kube.kubectl(['apply', '-f', '-'], orders(postgres.host, postgres.port));
  // The sidecars run on this host: they acknowledge to the controller over loopback, as pods do to its pod IP.
  const controller = await startController({ apiServer: kube.kubeConfig(), namespace: 'poolkeeper-system', identity: 'demo', metricsPort: 0, metricsHost: '127.0.0.1', leaderElection: false, repair: 'evict', acknowledgements: { host: '127.0.0.1', port: 0, advertise: '127.0.0.1' } }, quiet);
  const webhook = await startLocalWebhook(kube, { webhookNamespace: 'poolkeeper-system', targetNamespace: NAMESPACE, probeConnection: 'orders-db', logger: quiet });
  createOptedInDeployment(kube, { namespace: NAMESPACE, connection: 'orders-db', deployment: 'web', replicas: PHASES[0]! });
  // From here on, this process serves the webhook: kubectl runs asynchronously.
  const stats: Stats = { queries: 0, errors: 0, waits: new Map() };
  const kubelet = new KubeletSimulator(kube, NAMESPACE, { username: postgres.app.user, password: postgres.app.password }, quiet, 'injected');
  kubelet.onPodReady = (pod) => startApp(pod, stats);
  await kubelet.start();
  const sampler = setInterval(() => {
    for (const pod of kubelet.live()) void readWaits(pod).then((w) => stats.waits.set(pod.name, w), () => undefined);
  }, 50);
  return {
    kubectlAsync: (args, input) => kube.kubectlAsync(args, input),
    kubeConfig: () => kube.kubeConfig(),
    livePods: () => Promise.resolve(kubelet.live().length),
    stats: () => ({ queries: stats.queries, errors: stats.errors, waits: totalWaits(stats) }),
    firstPod: async () => {
      await eventually('the first pod', () => kubelet.live().length > 0, 60_000);
      const first = kubelet.live()[0]!;
      const pod = JSON.parse(await kube.kubectlAsync(['-n', NAMESPACE, 'get', 'pod', first.name, '-o', 'json'])) as { spec: { initContainers?: Array<{ name: string; restartPolicy?: string }> } };
      return { name: first.name, initContainers: pod.spec.initContainers?.map((c) => `${c.name} (restartPolicy ${c.restartPolicy ?? '-'})`) ?? [], env: first.appEnv };
    },
    stop: async () => {
      clearInterval(sampler);
      await kubelet.stop();
      await webhook.stop();
      await controller.shutdown();
    },
  };
}

/** A real node: poolkeeper installed from crds/ and deploy/, the app in containers writing its figures to a hostPath. */
async function realNodeCluster(postgres: PostgresServer): Promise<DemoCluster> {
  const support = realNodeSupport({ install: true });
  if (!support.ok) throw new Error(`a real node cannot run here: ${support.reason}`);
  const node = await env.realNode();
  await installPoolkeeper(node);
  const statsDir = join(node.dir, 'demo-stats');
  mkdirSync(statsDir, { recursive: true });
  chmodSync(statsDir, 0o1777);
  await node.kubectlAsync(['create', 'namespace', NAMESPACE]);
  await node.kubectlAsync(['-n', NAMESPACE, 'create', 'secret', 'generic', 'orders-db-credentials', `--from-literal=username=${postgres.app.user}`, `--from-literal=password=${postgres.app.password}`]);
  await node.kubectlAsync(['apply', '-f', '-'], orders(BRIDGE_ADDRESS, BRIDGE_POSTGRES_PORT));
  await node.kubectlAsync(['apply', '-f', '-'], JSON.stringify(appDeployment({ namespace: NAMESPACE, name: 'web', connection: 'orders-db', replicas: PHASES[0]!, statsDir, load: { pools: PROCESSES, poolSize: APP_POOL, querySeconds: 0.01 } })));
  type PodList = { items: Array<{ metadata: { name: string; deletionTimestamp?: string }; spec: { initContainers?: Array<{ name: string; restartPolicy?: string }>; containers: Array<{ name: string; env?: Array<{ name: string; value?: string }> }> }; status?: { conditions?: Array<{ type: string; status: string }> } }> };
  const running = async (): Promise<PodList['items']> => {
    const list = JSON.parse(await node.kubectlAsync(['-n', NAMESPACE, 'get', 'pods', '-l', 'app=web', '-o', 'json'])) as PodList;
    return list.items.filter((p) => !p.metadata.deletionTimestamp && p.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True'));
  };
  return {
    kubectlAsync: (args, input) => node.kubectlAsync(args, input),
    kubeConfig: () => node.kubeConfig(),
    livePods: async () => (await running()).length,
    stats: () => {
      const s = readAppStats(statsDir);
      return { queries: s.queries, errors: s.errors, waits: appWaits(s) };
    },
    firstPod: async () => {
      let pods: PodList['items'] = [];
      await eventually('the first pod', async () => (pods = await running()).length > 0, 180_000);
      const pod = pods[0]!;
      const app = pod.spec.containers.find((c) => c.name === 'app');
      return {
        name: pod.metadata.name,
        initContainers: pod.spec.initContainers?.map((c) => `${c.name} (restartPolicy ${c.restartPolicy ?? '-'})`) ?? [],
        env: Object.fromEntries((app?.env ?? []).filter((e) => e.value !== undefined).map((e) => [e.name, e.value!])),
      };
    },
    stop: async () => {
      await node.kubectlAsync(['-n', NAMESPACE, 'delete', 'deployment', 'web', '--wait=true']).catch(() => undefined);
    },
  };
}

const { values: options } = parseArgs({ options: { 'real-node': { type: 'boolean', default: false } } });
const env = new LocalEnvironment();
let exitCode: number;
try {
  console.log(`poolkeeper demo: starting a local Kubernetes ${options['real-node'] ? 'node (kubelet, containerd, the poolkeeper image)' : 'control plane'}, PostgreSQL, OpenSSH and PgBouncer on 127.0.0.1 ...`);
  const statuses = await probeEnvironment(env);
  console.log(formatStatuses(statuses));
  if (!statuses.every((s) => s.healthy)) throw new Error('the local environment is not healthy');
  const postgres = await env.postgres();
  const fleetStart = new Date();
  const forRoles = postgres.options.maxConnections - postgres.options.superuserReservedConnections;

  console.log(`\nThe fleet: Deployment web; each pod runs ${PROCESSES} worker processes, each with a pool of up to ${APP_POOL} connections.`);
  console.log(`Without poolkeeper each pod may open ${PROCESSES} x ${APP_POOL} = ${PROCESSES * APP_POOL} connections: ${PHASES.map((p) => `${p} pods want ${p * PROCESSES * APP_POOL}`).join(', ')}.`);
  console.log(`PostgreSQL has max_connections ${postgres.options.maxConnections}, ${postgres.options.superuserReservedConnections} of them for superusers: ${forRoles} for the app. At ${Math.max(...PHASES)} pods the fleet would want ${Math.max(...PHASES) * PROCESSES * APP_POOL} of ${forRoles}: "FATAL: sorry, too many clients already".`);

  const cluster = options['real-node'] ? await realNodeCluster(postgres) : await simulatedCluster(postgres);
  // The DatabaseConnection as the controller writes it: every rebalance is a status change.
  const connections = new Informer<DatabaseConnection & KubeObject>(new KubeHttp(cluster.kubeConfig()), { path: `/apis/poolkeeper.dev/v1alpha1/namespaces/${NAMESPACE}/databaseconnections`, logger: quiet });
  await connections.start();
  const connection = (): DatabaseConnection | undefined => connections.get(NAMESPACE, 'orders-db');
  await eventually('the limit', () => connection()?.status?.limit?.effective !== undefined, 120_000);
  const limit = connection()!.status!.limit!;
  console.log(`\nThe limit: DatabaseConnection ${NAMESPACE}/orders-db says maxConnections auto, reserve 15%. The controller logged in and read max_connections ${postgres.options.maxConnections} - superuser_reserved_connections ${postgres.options.superuserReservedConnections} = ${limit.discovered}, kept 15% (${limit.reserve}) free for admins and migrations: limit ${limit.effective}, shared by every pod on this server.`);
  console.log(`Each pod gets a weighted fair share of it: at least minPerPod ${PROCESSES} (one per worker), at most maxPerPod ${PROCESSES * APP_POOL} (all it can use).`);

  const first = await cluster.firstPod();
  console.log(`\nThe webhook injected into pod ${first.name}: initContainers ${JSON.stringify(first.initContainers)}`);
  console.log(`app env: ${['PGHOST', 'PGPORT', 'PGDATABASE', 'PGSSLMODE', 'POOLKEEPER_POOL_SIZE', 'DATABASE_URL'].map((k) => `${k}=${first.env[k] ?? '(from Secret)'}`).join(' ')}`);
  console.log(`POOLKEEPER_POOL_SIZE=${first.env.POOLKEEPER_POOL_SIZE ?? '-'} is a hint fixed when the pod was admitted: its consumer's per-process budget then (before any pod had a budget, minPerPod ${PROCESSES} / processesPerPod ${PROCESSES}). It is not the budget: the sidecar enforces the pod's budget, which follows every rebalance, and in transaction mode the workers' own pools of ${APP_POOL} are only client connections to the sidecar, queued when the budget is in use.`);

  let now = 0;
  let phasePeak = 0;
  let peak = 0;
  const sampler = setInterval(() => {
    void postgres.query<{ n: string }>(COUNT_POOLKEEPER, [fleetStart]).then((rows) => {
      now = Number(rows[0]?.n ?? 0);
      phasePeak = Math.max(phasePeak, now);
      peak = Math.max(peak, now);
    }, () => undefined);
  }, 50);
  // The pod count is read through the API on a real node: not at every check of the settle loop.
  let live = 0;
  const podCounter = setInterval(() => void cluster.livePods().then((n) => (live = n), () => undefined), 200);
  let phaseStart = Date.now();
  let lastLine = '';
  connections.onChange(() => {
    const s = connection()?.status;
    const ready = s?.conditions?.find((c) => c.type === 'Ready');
    const line = `pods ${s?.pods ?? 0}  allocated ${s?.allocated ?? 0}/${s?.limit?.effective ?? '?'}  budget ${s?.perPodBudget ?? '-'} per pod  Ready=${ready?.status ?? '?'}${ready?.reason ? ` (${ready.reason})` : ''}`;
    if (line === lastLine) return;
    lastLine = line;
    console.log(`  +${((Date.now() - phaseStart) / 1000).toFixed(1).padStart(4)} s  ${line}  PostgreSQL ${now}`);
  });

  const rows: PhaseRow[] = [];
  const phase = async (name: string, replicas: number, action: () => Promise<void>): Promise<void> => {
    console.log(`\n== ${name}: ${replicas} pods, ${replicas * PROCESSES * APP_POOL} connections wanted without poolkeeper`);
    phaseStart = Date.now();
    phasePeak = now;
    const before = cluster.stats();
    await action();
    await eventually(`${replicas} pods at their budget`, () => {
      const s = connection()?.status;
      return s?.pods === replicas && s.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true && live === replicas;
    }, 180_000);
    const settledAfter = (Date.now() - phaseStart) / 1000;
    // A few seconds at the new budget, so the wait figures include the steady state.
    await new Promise((r) => setTimeout(r, 3000));
    const after = cluster.stats();
    const waits = subtractHistograms(after.waits, before.waits);
    const status = connection()?.status;
    const budget = String(status?.consumers?.find((c) => c.name === 'web')?.perPodBudget ?? '-');
    const row: PhaseRow = { phase: name, pods: replicas, wanted: replicas * PROCESSES * APP_POOL, budget, now, peak: phasePeak, p50: histogramQuantile(0.5, waits), p99: histogramQuantile(0.99, waits), errors: after.errors - before.errors, seconds: settledAfter };
    rows.push(row);
    console.log(`  settled in ${settledAfter.toFixed(1)} s: budget ${budget} per pod (${status?.consumers?.[0]?.perProcessBudget ?? '-'} per worker); PostgreSQL ${row.now} now, ${row.peak} at most in this phase (limit ${limit.effective}); clients waited p50 ${ms(row.p50)} ms, p99 ${ms(row.p99)} ms for a server connection (${waits.count} waits); ${row.errors} errors`);
    console.log(`$ kubectl -n ${NAMESPACE} get dbc,pm`);
    console.log((await cluster.kubectlAsync(['-n', NAMESPACE, 'get', 'dbc,pm'])).trimEnd());
  };
  try {
    await phase(`start with ${PHASES[0]}`, PHASES[0]!, () => Promise.resolve());
    for (const replicas of PHASES.slice(1)) {
      await phase(`scale to ${replicas}`, replicas, async () => {
        console.log(`$ kubectl scale deployment/web --replicas=${replicas}`);
        await cluster.kubectlAsync(['-n', NAMESPACE, 'scale', 'deployment/web', `--replicas=${replicas}`]);
      });
    }
  } finally {
    clearInterval(sampler);
    clearInterval(podCounter);
    await connections.stop();
    await cluster.stop();
  }
  const stats = cluster.stats();
  console.log('\nWait: time a client waited in its sidecar for a server connection (poolkeeper_sidecar_client_wait_seconds, quantiles interpolated within its buckets as histogram_quantile does). Rebalance: from the change to every pod at its budget.');
  console.log(table(rows));
  console.log(`\nLimit ${limit.effective} (max_connections ${postgres.options.maxConnections} - ${postgres.options.superuserReservedConnections} for superusers - ${limit.reserve} reserve). PostgreSQL peaked at ${peak} poolkeeper connections; the apps ran ${stats.queries} queries with ${stats.errors} errors.`);
  exitCode = stats.errors === 0 && peak <= (limit.effective ?? 0) ? 0 : 1;
} catch (err) {
  console.error(`demo failed: ${err instanceof Error ? err.message : String(err)}`);
  exitCode = 1;
} finally {
  await env.stop();
}
process.exit(exitCode);
