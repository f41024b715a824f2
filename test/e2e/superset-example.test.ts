/**
 * deploy/examples/superset on the local environment: its DatabaseConnection,
 * web, worker and beat Deployments and superset_config.py, applied as
 * rendered by kustomize (only the server's address and limit changed), the
 * webhook injecting the sidecars, the controller budgeting them, and a Python
 * program that behaves like Superset's processes (gunicorn threads after a
 * fork, Celery prefork children, beat; SQLAlchemy configured by the example's
 * superset_config.py) in every pod. Under scale-up, credential rotation and
 * scale-down, PostgreSQL must never see more connections than the limit, every
 * process must have a connection of its own, and the apps must see no error.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import pg from 'pg';
import pino from 'pino';
import { parseAllDocuments } from 'yaml';
import { startController, type RunningController } from '../../src/bin/controller-main.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import { KubeletSimulator, type SimulatedPod } from '../../src/devenv/kubelet-sim.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { createNamespaceWithSecret, eventually, installCrds, startLocalWebhook } from '../../src/devenv/scenario.ts';
import { freshNamespace } from '../support/budget-fixture.ts';
import { testEnvironment } from '../support/hooks.ts';

const LIMIT = 18;
const EXAMPLE = 'deploy/examples/superset';
const APP = 'test/apps/superset_like.py';
const ROLES = { 'superset-web': 'web', 'superset-worker': 'worker', 'superset-beat': 'beat' } as const;

interface KubeDoc {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string };
  spec?: Record<string, unknown>;
  data?: Record<string, string>;
}

interface AppStats {
  ok: Record<string, number>;
  errors: string[];
  /** Clients pinned to a server connection, summed over the sidecars (read as each pod stops). */
  pins: number;
  /** Each pod's app and the seconds it took from SIGTERM to exit. */
  stops: string[];
  /** The longest a process took from its SIGTERM to its last request's end. */
  slowestProcessStop: number;
  started: string[];
}

/** Sum of a counter's samples in a Prometheus text exposition. */
function counterSum(text: string, name: string): number {
  return text.split('\n').filter((line) => line.startsWith(`${name}{`) || line.startsWith(`${name} `)).reduce((sum, line) => sum + Number(line.split(' ').pop()), 0);
}

/** Runs the Superset stand-in for `pod` with the env its container gets from the webhook (and kubelet's $(VAR) expansion). */
function startApp(pod: SimulatedPod, configPath: string, stats: AppStats): void {
  const deployment = Object.keys(ROLES).find((name) => pod.name.startsWith(`${name}-`)) as keyof typeof ROLES | undefined;
  if (!deployment || !pod.sidecar) {
    stats.errors.push(`${pod.name}: no role or no sidecar`);
    return;
  }
  const injected = pod.appEnv;
  // Every simulated sidecar listens on its own free port of this host's loopback, not on the injected one.
  const port = String(pod.sidecar.port);
  const databaseUrl = (injected.DATABASE_URL ?? '').replace('$(PGUSER)', 'app').replace(`:${injected.PGPORT}/`, `:${port}/`);
  if (!databaseUrl.startsWith('postgresql://app@127.0.0.1:') || databaseUrl.includes(':' + 'password')) stats.errors.push(`${pod.name}: unexpected DATABASE_URL ${databaseUrl}`);
  stats.started.push(pod.name);
  const child: ChildProcess = spawn('/usr/bin/python3', [APP, ROLES[deployment], '--config', configPath], {
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...injected, PGPORT: port, PGUSER: 'app', DATABASE_URL: databaseUrl },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  createInterface({ input: child.stdout! }).on('line', (line) => {
    const [kind, role = '?', ...rest] = line.split(' ');
    if (kind === 'ok') stats.ok[role] = (stats.ok[role] ?? 0) + Number(rest[0]);
    else if (kind === 'stopped') stats.slowestProcessStop = Math.max(stats.slowestProcessStop, Number(rest[0]));
    else stats.errors.push(`${pod.name}: ${line}`);
  });
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
  let stopping = false;
  const exited = new Promise<void>((resolve) => child.on('exit', (code, signal) => {
    if (!stopping || code !== 0) stats.errors.push(`${pod.name}: exited (code ${code}, signal ${signal}) ${stderr.slice(-500)}`);
    resolve();
  }));
  pod.onAppStop = async () => {
    const metrics = await fetch(`http://127.0.0.1:${pod.sidecar!.adminPort}/metrics`).then((r) => r.text(), (err: Error) => `unreadable: ${err.message}`);
    if (!metrics.includes('poolkeeper_sidecar_pins_total')) stats.errors.push(`${pod.name}: sidecar metrics ${metrics.slice(0, 200)}`);
    stats.pins += counterSum(metrics, 'poolkeeper_sidecar_pins_total');
    stopping = true;
    const stopAt = Date.now();
    child.kill('SIGTERM');
    const timer = setTimeout(() => {
      stats.errors.push(`${pod.name}: did not stop within 45 s of SIGTERM`);
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        // gone already
      }
    }, 45_000);
    await exited;
    stats.stops.push(`${pod.name} ${((Date.now() - stopAt) / 1000).toFixed(1)}`);
    clearTimeout(timer);
  };
}

describe('deploy/examples/superset', function () {
  this.timeout(300_000);
  let kube: KubeControlPlane;
  let postgres: PostgresServer;
  let controller: RunningController | undefined;
  let kubelet: KubeletSimulator | undefined;
  let webhook: Awaited<ReturnType<typeof startLocalWebhook>> | undefined;
  let namespace: string | undefined;
  const workDir = mkdtempSync(join(tmpdir(), 'poolkeeper-superset-'));

  before(async function () {
    [kube, postgres] = await Promise.all([testEnvironment().kube(), testEnvironment().postgres()]);
    await installCrds(kube);
    // The kubelet simulator binds pods to this node; without a Node object the pod garbage collector
    // force-deletes them as orphans after about 40 s while their apps and sidecars still run.
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Node', metadata: { name: 'simulated-node' } }));
  });

  after(async function () {
    await kubelet?.stop();
    await webhook?.stop();
    await controller?.shutdown();
    if (webhook) await kube.kubectlAsync(['delete', 'mutatingwebhookconfiguration', webhook.name, '--ignore-not-found']);
    if (namespace) await kube.kubectlAsync(['-n', namespace, 'delete', 'dbc', '--all', '--wait=true']);
    rmSync(workDir, { recursive: true, force: true });
  });

  it('runs web (gunicorn threads), Celery prefork workers and beat within the limit through scale-up, credential rotation and scale-down, with no application error', async function () {
    namespace = freshNamespace('superset');
    const ns = namespace;
    const testStart = new Date();
    createNamespaceWithSecret(kube, { namespace: ns, secret: 'superset-db-credentials', username: postgres.app.user, password: postgres.app.password });
    const docs = parseAllDocuments(kube.kubectl(['kustomize', EXAMPLE])).map((d) => d.toJSON() as KubeDoc);
    for (const doc of docs) doc.metadata.namespace = ns;
    const connection = docs.find((d) => d.kind === 'DatabaseConnection')!;
    const spec = connection.spec as { database: Record<string, unknown>; consumers: Array<{ name: string; minPerPod: number; processesPerPod: number; maxPerPod: number }> };
    // Only where the server is and its limit differ from the example.
    spec.database = { ...spec.database, host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable' };
    // The apps stay in plaintext (the webhook's PGSSLMODE=disable); one client below insists on TLS.
    connection.spec = { ...connection.spec, maxConnections: LIMIT, reserve: 0, sidecar: { ...(connection.spec as { sidecar?: object }).sidecar, clientTLS: 'SelfSigned' } };
    for (const consumer of spec.consumers) assert.ok(consumer.minPerPod >= consumer.processesPerPod, `consumer ${consumer.name}: minPerPod ${consumer.minPerPod} < processesPerPod ${consumer.processesPerPod}`);
    const config = docs.find((d) => d.kind === 'ConfigMap')!;
    const configPath = join(workDir, 'superset_config.py');
    writeFileSync(configPath, config.data!['superset_config.py']!);
    const deployments = docs.filter((d) => d.kind === 'Deployment');
    assert.deepEqual(deployments.map((d) => d.metadata.name).sort(), Object.keys(ROLES).sort());
    for (const d of deployments) d.spec = { ...d.spec, replicas: 1 };
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'List', items: docs.filter((d) => d.kind !== 'Deployment') }));

    const logger = pino({ level: 'silent' });
    // As shipped: a pod the webhook missed (it did not answer in time, say) is evicted and comes back with its sidecar.
    controller = await startController({ apiServer: kube.kubeConfig(), namespace: ns, identity: 'superset-e2e', metricsPort: 0, metricsHost: '127.0.0.1', leaderElection: false, repair: 'evict' }, logger);
    // The webhook says why it admitted a pod without the sidecar, if it does.
    webhook = await startLocalWebhook(kube, { webhookNamespace: `${ns}-pk`, targetNamespace: ns, probeConnection: connection.metadata.name, logger: pino({ level: 'warn' }, process.stderr) });
    // From here on this process serves the webhook and runs the sidecars: kubectl must not block it.
    const stats: AppStats = { ok: {}, errors: [], pins: 0, stops: [], slowestProcessStop: 0, started: [] };
    kubelet = new KubeletSimulator(kube, ns, { username: postgres.app.user, password: postgres.app.password }, logger, 'injected');
    kubelet.onPodReady = (pod) => startApp(pod, configPath, stats);
    await kubelet.start();
    await kube.kubectlAsync(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'List', items: deployments }));

    let peak = 0;
    let samples = 0;
    let overLimit = '';
    const sampler = setInterval(() => {
      // The controller's login check comes out of the reserve, not the budget.
      void postgres.query<{ pid: number; application_name: string; backend_start: Date; state: string; client_port: number }>("SELECT pid, application_name, backend_start, state, client_port FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND backend_start >= $1 AND application_name NOT LIKE 'poolkeeper-controller%'", [testStart]).then((rows) => {
        samples += 1;
        peak = Math.max(peak, rows.length);
        if (rows.length > LIMIT && !overLimit) overLimit = `${new Date().toISOString()} ${JSON.stringify(rows)} grants ${JSON.stringify(kubelet?.live().map((p) => [p.name, p.sidecar?.sidecar.status()]))}`;
      }, () => undefined);
    }, 50);
    const budgets: string[] = [];
    const settled = async (pods: Record<string, number>): Promise<void> => {
      const total = Object.values(pods).reduce((a, b) => a + b, 0);
      let status: { pods?: number; perPodBudget?: string; consumers?: Array<{ name: string; pods: number; perPodBudget: number; perProcessBudget: number }>; conditions?: Array<{ type: string; status: string }> } = {};
      await eventually(`${JSON.stringify(pods)} settled`, async () => {
        status = (JSON.parse(await kube.kubectlAsync(['-n', ns, 'get', 'dbc', connection.metadata.name, '-o', 'json'])) as { status?: typeof status }).status ?? {};
        return status.pods === total && status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true && kubelet!.live().length === total
          && Object.entries(pods).every(([consumer, n]) => status.consumers?.find((c) => c.name === consumer)?.pods === n);
      }, 120_000).catch(async (err: Error) => {
        // Say what was seen, so that a timeout can be told apart from the controller, the kubelet or the apps.
        const podList = await kube.kubectlAsync(['-n', ns, 'get', 'pods', '-o', 'wide']).catch((e: Error) => e.message);
        const members = await kube.kubectlAsync(['-n', ns, 'get', 'pm,pg', '-o', 'yaml']).catch((e: Error) => e.message);
        throw new Error(`${err.message}; kubelet failures ${JSON.stringify(kubelet!.failures)}; status ${JSON.stringify(status)}; live ${JSON.stringify(kubelet!.live().map((p) => [p.name, p.sidecar?.sidecar.status()]))}; pods\n${podList}\n${members.slice(0, 6000)}`);
      });
      // Every process of every pod has at least one server connection of its own: the sizing rule minPerPod >= processesPerPod.
      for (const consumer of status.consumers ?? []) assert.ok(consumer.perProcessBudget >= 1, `consumer ${consumer.name}: ${consumer.perPodBudget} per pod leaves a process without a connection`);
      budgets.push(`${JSON.stringify(pods)}: ${status.perPodBudget ?? ''}`);
      // Let the load run at this budget for a moment.
      await new Promise((resolve) => setTimeout(resolve, 3000));
    };
    const original = postgres.app.password;
    const setPassword = async (password: string): Promise<void> => {
      await postgres.query(`ALTER ROLE app PASSWORD '${password}'`);
      await kube.kubectlAsync(['-n', ns, 'apply', '-f', '-'], await kube.kubectlAsync(['-n', ns, 'create', 'secret', 'generic', 'superset-db-credentials', '--from-literal=username=app', `--from-literal=password=${password}`, '--dry-run=client', '-o', 'yaml']));
      kubelet!.rotate({ username: 'app', password });
    };
    try {
      await settled({ web: 1, worker: 1, beat: 1 });
      // clientTLS reaches the sidecar the webhook injected: a client that insists on TLS is served over it.
      const secure = new pg.Client({ host: '127.0.0.1', port: kubelet.live()[0]!.sidecar!.port, user: 'app', database: 'app', ssl: { rejectUnauthorized: false } });
      await secure.connect();
      try {
        assert.equal((await secure.query<{ v: number }>('SELECT 1 AS v')).rows[0]!.v, 1);
        assert.equal((secure as unknown as { connection: { stream: { encrypted?: boolean } } }).connection.stream.encrypted, true);
      } finally {
        await secure.end();
      }
      await Promise.all(['superset-web', 'superset-worker'].map((d) => kube.kubectlAsync(['-n', ns, 'scale', `deployment/${d}`, '--replicas=2'])));
      await settled({ web: 2, worker: 2, beat: 1 });
      // Credential rotation: a new password on the server and in the Secret; no app restarts, the apps never had it.
      const rotatedAt = new Date();
      await setPassword(`${original}-rotated`);
      await eventually('no server connection from before the rotation', async () => {
        const rows = await postgres.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND backend_start < $1 AND backend_start >= $2 AND application_name NOT LIKE 'poolkeeper-controller%'", [rotatedAt, testStart]);
        return rows[0]?.n === '0';
      }, 60_000);
      await new Promise((resolve) => setTimeout(resolve, 2000));
      await kube.kubectlAsync(['-n', ns, 'scale', 'deployment/superset-web', '--replicas=1']);
      await settled({ web: 1, worker: 2, beat: 1 });
    } finally {
      clearInterval(sampler);
      await setPassword(original).catch(() => undefined);
    }
    const failures = [...kubelet.failures];
    await kubelet.stop();
    kubelet = undefined;
    console.log(`      PostgreSQL peak ${peak} connections (limit ${LIMIT}) over ${samples} samples; requests/tasks ${JSON.stringify(stats.ok)}; ${stats.errors.length} app errors; ${stats.pins} pinned clients; app stop times ${stats.stops.join(', ')} s (slowest process ${stats.slowestProcessStop.toFixed(1)} s); budgets ${budgets.join('; ')}; apps started ${stats.started.join(' ')}${failures.length > 0 ? `; repaired: ${failures.join('; ')}` : ''}`);
    if (overLimit) console.log(`      over the limit: ${overLimit}`);
    assert.deepEqual(stats.errors.slice(0, 5), [], `${stats.errors.length} application errors`);
    // 3 pods, then one more web and one more worker: no pod was replaced behind the test's back.
    assert.equal(stats.started.length, 5, `apps started in ${stats.started.join(' ')}`);
    assert.ok(samples > 100, `sampled pg_stat_activity ${samples} times`);
    for (const role of ['web', 'worker', 'beat']) assert.ok((stats.ok[role] ?? 0) > 10, `${role} ran ${stats.ok[role] ?? 0} requests`);
    // SQLAlchemy with psycopg2 sets no session state: no client keeps a server connection between transactions.
    assert.equal(stats.pins, 0, 'clients pinned to their server connection');
    assert.ok(peak <= LIMIT, `PostgreSQL saw ${peak} connections > limit ${LIMIT}`);
    assert.ok(peak >= 9, `PostgreSQL saw at most ${peak} connections: the load never reached the budgets`);
  });
});
