/**
 * The embedded default (`npm run demo`): a local control plane and
 * PostgreSQL, the poolkeeper controller, and a Deployment whose pods each run
 * a real sidecar (under a kubelet simulator) with application load through it.
 * It scales the Deployment and shows the budgets following while PostgreSQL
 * never sees more connections than the limit; then it tears everything down.
 */
import pg from 'pg';
import pino from 'pino';
import { LocalEnvironment } from '../devenv/environment.ts';
import { KubeletSimulator, type SimulatedPod } from '../devenv/kubelet-sim.ts';
import { formatStatuses, probeEnvironment } from '../devenv/report.ts';
import { createNamespaceWithSecret, createOptedInDeployment, eventually, installCrds, startLocalWebhook } from '../devenv/scenario.ts';
import { startController } from './controller-main.ts';

const NAMESPACE = 'shop';
const quiet = pino({ level: 'silent' });
// The environment's PgBouncer keeps its own connection as `app`; count poolkeeper's (sidecars and the controller's limit discovery).
/**
 * The sidecars' backends: the app role's, started since the fleet began (the health probe
 * left PgBouncer one idle server connection before), but the controller's brief login
 * check (it comes out of the reserve).
 */
const COUNT_POOLKEEPER = "SELECT count(*) AS n FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND backend_start >= $1 AND application_name <> 'poolkeeper-controller'";

function startApp(pod: SimulatedPod, stats: { queries: number; errors: number }): void {
  // Each pod runs "gunicorn with 2 workers", each with a pool of 5 (a SQLAlchemy default), not the hint: the sidecar caps what reaches the server.
  const database = pod.appEnv.PGDATABASE ?? 'app';
  const pools = [0, 1].map(() => new pg.Pool({ host: pod.appEnv.PGHOST ?? '127.0.0.1', port: pod.sidecar?.port, user: 'app', database, max: 5, connectionTimeoutMillis: 30_000 }));
  let running = true;
  for (const pool of pools) pool.on('error', () => undefined);
  const loops = pools.flatMap((pool) => Array.from({ length: 5 }, async () => {
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
    running = false;
    await Promise.all(loops);
    await Promise.all(pools.map((p) => p.end()));
  };
}

const env = new LocalEnvironment();
let exitCode: number;
try {
  console.log('poolkeeper demo: starting a local Kubernetes control plane, PostgreSQL, OpenSSH and PgBouncer on 127.0.0.1 ...');
  const statuses = await probeEnvironment(env);
  console.log(formatStatuses(statuses));
  if (!statuses.every((s) => s.healthy)) throw new Error('the local environment is not healthy');
  const [kube, postgres] = await Promise.all([env.kube(), env.postgres()]);
  const fleetStart = new Date();

  await installCrds(kube);
  createNamespaceWithSecret(kube, { namespace: NAMESPACE, secret: 'orders-db-credentials', username: postgres.app.user, password: postgres.app.password });
  kube.kubectl(['apply', '-f', '-'], JSON.stringify({
    apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders-db', namespace: NAMESPACE },
    spec: {
      database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'orders-db-credentials' } },
      maxConnections: 'auto', reserve: '15%',
      consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, minPerPod: 2, processesPerPod: 2 }],
      pool: { mode: 'transaction', poolTimeout: 30 },
    },
  }));
  const controller = await startController({ kubeConfig: kube.kubeConfig(), namespace: 'poolkeeper-system', identity: 'demo', metricsPort: 0, metricsHost: '127.0.0.1', leaderElection: false, repair: 'evict' }, quiet);
  const webhook = await startLocalWebhook(kube, { webhookNamespace: 'poolkeeper-system', targetNamespace: NAMESPACE, probeConnection: 'orders-db', logger: quiet });
  createOptedInDeployment(kube, { namespace: NAMESPACE, connection: 'orders-db', deployment: 'web', replicas: 3 });
  // From here on, this process serves the webhook: kubectl runs asynchronously.
  const stats = { queries: 0, errors: 0 };
  const kubelet = new KubeletSimulator(kube, NAMESPACE, { username: postgres.app.user, password: postgres.app.password }, quiet, 'injected');
  kubelet.onPodReady = (pod) => startApp(pod, stats);
  await kubelet.start();
  await eventually('the first pod', () => kubelet.live().length > 0, 60_000);
  const first = kubelet.live()[0]!;
  const injected = JSON.parse(await kube.kubectlAsync(['-n', NAMESPACE, 'get', 'pod', first.name, '-o', 'json'])) as { spec: { initContainers?: Array<{ name: string; restartPolicy?: string }> } };
  console.log(`\nthe webhook injected into pod ${first.name}: initContainers ${JSON.stringify(injected.spec.initContainers?.map((c) => `${c.name} (restartPolicy ${c.restartPolicy ?? '-'})`))}`);
  console.log(`app env: ${['PGHOST', 'PGPORT', 'PGDATABASE', 'PGSSLMODE', 'POOLKEEPER_POOL_SIZE', 'DATABASE_URL'].map((k) => `${k}=${first.appEnv[k] ?? '(from Secret)'}`).join(' ')}`);

  let peak = 0;
  const sampler = setInterval(() => {
    void postgres.query<{ n: string }>(COUNT_POOLKEEPER, [fleetStart]).then((rows) => {
      peak = Math.max(peak, Number(rows[0]?.n ?? 0));
    }, () => undefined);
  }, 50);
  const show = async (replicas: number): Promise<void> => {
    await eventually(`${replicas} pods at their budget`, async () => {
      const dbc = JSON.parse(await kube.kubectlAsync(['-n', NAMESPACE, 'get', 'dbc', 'orders-db', '-o', 'json'])) as { status?: { pods?: number; conditions?: Array<{ type: string; status: string }> } };
      return dbc.status?.pods === replicas && dbc.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true && kubelet.live().length === replicas;
    }, 90_000);
    await new Promise((r) => setTimeout(r, 1000));
    const [{ n } = { n: '0' }] = await postgres.query<{ n: string }>(COUNT_POOLKEEPER, [fleetStart]);
    console.log(`\n$ kubectl -n ${NAMESPACE} get dbc,pm    (${replicas} replicas x 2 processes x pool 5 = ${replicas * 10} client connections wanted)`);
    console.log((await kube.kubectlAsync(['-n', NAMESPACE, 'get', 'dbc,pm'])).trimEnd());
    console.log(`PostgreSQL: ${n} poolkeeper connections now, peak ${peak} so far; apps ran ${stats.queries} queries with ${stats.errors} errors`);
  };
  try {
    await show(3);
    console.log('\n$ kubectl scale deployment/web --replicas=8');
    await kube.kubectlAsync(['-n', NAMESPACE, 'scale', 'deployment/web', '--replicas=8']);
    await show(8);
    console.log('\n$ kubectl scale deployment/web --replicas=2');
    await kube.kubectlAsync(['-n', NAMESPACE, 'scale', 'deployment/web', '--replicas=2']);
    await show(2);
  } finally {
    clearInterval(sampler);
    await kubelet.stop();
    await webhook.stop();
    await controller.shutdown();
  }
  const forRoles = postgres.options.maxConnections - postgres.options.superuserReservedConnections;
  const limit = forRoles - Math.ceil(forRoles * 0.15);
  console.log(`\nmax_connections ${postgres.options.maxConnections}: ${forRoles} for ordinary roles, 15% reserved, limit ${limit}. PostgreSQL peaked at ${peak} poolkeeper connections; ${stats.errors} application errors.`);
  exitCode = stats.errors === 0 && peak <= limit ? 0 : 1;
} catch (err) {
  console.error(`demo failed: ${err instanceof Error ? err.message : String(err)}`);
  exitCode = 1;
} finally {
  await env.stop();
}
process.exit(exitCode);
