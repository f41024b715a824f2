/**
 * End to end: the controller binary's wiring and real sidecars (one per pod,
 * run by the kubelet simulator) in front of the real PostgreSQL. Application
 * load runs through every sidecar while the Deployment scales and rolls out;
 * PostgreSQL itself must never see more of the app role's connections than
 * the limit, and the application must see no error.
 */
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import pg from 'pg';
import pino from 'pino';
import { startController, type RunningController } from '../../src/bin/controller-main.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { testEnvironment } from '../support/hooks.ts';
import { createWorkload, eventually, freshNamespace, installCrds } from '../support/budget-fixture.ts';
import { KubeletSimulator, type SimulatedPod } from '../../src/devenv/kubelet-sim.ts';

const LIMIT = 8;

/** One logged line: pino's fields, the sidecar's `pod`, and whatever else was logged. */
interface LogLine {
  level: number;
  time: number;
  component?: string;
  msg: string;
  pod?: string;
  name?: string;
  [k: string]: unknown;
}

/** A pino destination that keeps every line, to check what was logged. */
class LogCapture extends Writable {
  text = '';
  override _write(chunk: Buffer, _encoding: string, done: () => void): void {
    this.text += chunk.toString('utf8');
    done();
  }

  /** Every line, parsed. */
  lines(): LogLine[] {
    return this.text.split('\n').filter((line) => line !== '').map((line) => JSON.parse(line) as LogLine);
  }

  /** The controller's lines at info and above, the sidecars' warnings and drains, one short line each: what a failure needs. */
  story(): string {
    const lines: string[] = [];
    for (const { level, time, component, msg, pod, name, ...rest } of this.lines()) {
      if (component === 'controller' ? level < 30 : level < 40 && !/drain|exit/.test(msg)) continue;
      const { hostname: _h, pid: _p, ...fields } = rest;
      lines.push(`${new Date(time).toISOString().slice(11, 23)} ${component ?? ''} ${pod ?? name ?? ''} ${msg} ${JSON.stringify(fields)}`);
    }
    return lines.slice(-80).join('\n');
  }
}

/** A pod's "application": a few workers running short transactions through its sidecar. */
function startApp(pod: SimulatedPod, stats: { queries: number; errors: string[] }): void {
  const pool = new pg.Pool({ host: '127.0.0.1', port: pod.sidecar!.port, user: 'app', database: 'app', max: 4, connectionTimeoutMillis: 20_000 });
  let running = true;
  pool.on('error', (err) => {
    if (running) stats.errors.push(`${pod.name} (idle client): ${err.message}`);
  });
  const worker = async (): Promise<void> => {
    while (running) {
      try {
        await pool.query('SELECT pg_sleep(0.005)');
        stats.queries += 1;
      } catch (err) {
        if (running) stats.errors.push(`${pod.name}: ${(err as Error).message}`);
      }
    }
  };
  const workers = Array.from({ length: 4 }, worker);
  pod.onAppStop = async () => {
    running = false;
    await Promise.all(workers);
    await pool.end();
  };
}

describe('fleet end to end', function () {
  this.timeout(180_000);
  let kube: KubeControlPlane;
  let postgres: PostgresServer;
  let controller: RunningController | undefined;
  let kubelet: KubeletSimulator | undefined;
  let namespace: string;

  before(async function () {
    [kube, postgres] = await Promise.all([testEnvironment().kube(), testEnvironment().postgres()]);
    await installCrds(kube);
  });

  after(async function () {
    await kubelet?.stop();
    await controller?.shutdown();
    if (namespace) kube.kubectl(['-n', namespace, 'delete', 'dbc', '--all', '--wait=true']);
  });

  // Connections of other tests' poolers (PgBouncer) are not poolkeeper's: count backends started since this test began.
  it('keeps PostgreSQL at or under the limit through scale-up, credential rotation, rollout and scale-down, with no application errors and no secret in the logs', async function () {
    namespace = freshNamespace('fleet');
    const testStart = new Date();
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 2, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders', namespace },
      spec: {
        database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' } },
        maxConnections: LIMIT, reserve: 0,
        consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, minPerPod: 1 }],
        pool: { mode: 'transaction', poolTimeout: 30 },
        // A pod whose drain the API server never took (overloaded) is rightly held this long: less than a settle's wait.
        departureHoldSeconds: 20,
      },
    }));
    const logs = new LogCapture();
    const logger = pino({ level: 'debug' }, logs);
    controller = await startController({ apiServer: kube.kubeConfig(), namespace, identity: 'e2e', metricsPort: 0, metricsHost: '127.0.0.1', leaderElection: true, repair: 'off' }, logger.child({ component: 'controller' }));
    // From here on this process runs the controller and the sidecars: kubectl must not block it.
    const stats = { queries: 0, errors: [] as string[] };
    kubelet = new KubeletSimulator(kube, namespace, { username: postgres.app.user, password: postgres.app.password }, logger.child({ component: 'sidecar' }));
    kubelet.onPodReady = (pod) => startApp(pod, stats);
    await kubelet.start();

    let peak = 0;
    let samples = 0;
    const sampler = setInterval(() => {
      // The controller's brief login check per credentials generation comes out of the reserve, not the budget.
      void postgres.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND backend_start >= $1 AND application_name NOT LIKE 'poolkeeper-controller%'", [testStart]).then((rows) => {
        samples += 1;
        peak = Math.max(peak, Number(rows[0]?.n ?? 0));
      }, () => undefined);
    }, 50);
    const k = kube;
    const settledAt = async (pods: number): Promise<void> => {
      try {
        await eventually(`${pods} pods settled`, async () => {
          // A poll: one kubectl the loaded API server turned away is tried again at the next, not a failure.
          const text = await k.kubectlAsync(['-n', namespace, 'get', 'dbc', 'orders', '-o', 'json']).catch(() => undefined);
          if (text === undefined) return false;
          const dbc = JSON.parse(text) as { status?: { pods?: number; conditions?: Array<{ type: string; status: string }> } };
          return dbc.status?.pods === pods && dbc.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true && kubelet!.live().length === pods;
        }, 60_000);
      } catch (err) {
        // What the controller was waiting for: the connection's status, the grant table, every PoolMember.
        const state = await Promise.all([['dbc', 'orders'], ['poolgrant', 'orders'], ['pm']].map(async (args) => k.kubectlAsync(['-n', namespace, 'get', ...args, '-o', 'yaml']).catch((e: unknown) => String(e))));
        throw new Error(`${(err as Error).message}; ${kubelet!.live().length} pods live\n${state.join('\n---\n')}\n---\n${logs.story()}`, { cause: err });
      }
    };
    try {
      await settledAt(2);
      await kube.kubectlAsync(['-n', namespace, 'scale', 'deployment/web', '--replicas=4']);
      await settledAt(4);
      // Credential rotation in place: new password on the server, then in the Secret and the pods' volumes.
      const original = postgres.app.password;
      const rotated = `${original}-rotated`;
      await postgres.query(`ALTER ROLE app PASSWORD '${rotated}'`);
      await kube.kubectlAsync(['-n', namespace, 'apply', '-f', '-'], await kube.kubectlAsync(['-n', namespace, 'create', 'secret', 'generic', 'db-credentials', '--from-literal=username=app', `--from-literal=password=${rotated}`, '--dry-run=client', '-o', 'yaml']));
      kubelet.rotate({ username: 'app', password: rotated });
      const rotatedAt = new Date();
      await eventually('every sidecar on the new credentials, as the controller sees it', async () => {
        const members = JSON.parse(await kube.kubectlAsync(['-n', namespace, 'get', 'pm', '-o', 'json'])) as { items: Array<{ spec: { credentialsGeneration?: string }; status?: { credentialsGeneration?: string } }> };
        return members.items.length === 4 && members.items.every((m) => m.spec.credentialsGeneration && m.status?.credentialsGeneration === m.spec.credentialsGeneration);
      }, 30_000);
      await eventually('no server connection from before the rotation', async () => {
        const rows = await postgres.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND backend_start < $1 AND backend_start >= $2", [rotatedAt, testStart]);
        return rows[0]?.n === '0';
      }, 30_000);
      // Restore the password the other tests use, the same way.
      await postgres.query(`ALTER ROLE app PASSWORD '${original}'`);
      await kube.kubectlAsync(['-n', namespace, 'apply', '-f', '-'], await kube.kubectlAsync(['-n', namespace, 'create', 'secret', 'generic', 'db-credentials', '--from-literal=username=app', `--from-literal=password=${original}`, '--dry-run=client', '-o', 'yaml']));
      kubelet.rotate({ username: 'app', password: original });
      await kube.kubectlAsync(['-n', namespace, 'rollout', 'restart', 'deployment/web']);
      await eventually('rollout done', async () => {
        try {
          return (await kube.kubectlAsync(['-n', namespace, 'rollout', 'status', 'deployment/web', '--timeout=1s'])).includes('successfully');
        } catch {
          return false;
        }
      }, 90_000);
      await settledAt(4);
      await kube.kubectlAsync(['-n', namespace, 'scale', 'deployment/web', '--replicas=1']);
      await settledAt(1);
    } finally {
      clearInterval(sampler);
    }
    console.log(`      PostgreSQL peak ${peak} app connections (limit ${LIMIT}) over ${samples} samples; ${stats.queries} queries, ${stats.errors.length} errors`);
    // Every pod drained and said so: a departure recorded from a view that missed it (the PoolMember's status
    // not yet in the cache on a loaded API server) must end once the drain is seen, not last its hold, unless
    // the sidecar could not write that it drained.
    const lines = logs.lines();
    // A record of 0 connections holds nothing (the pod had been granted 0 before it left): not a hold to wait out.
    const held = lines.filter((l) => l.msg.startsWith('pod left without a drain') && l.connections !== 0).map((l) => l.pod);
    const endedEarly = new Set(lines.filter((l) => l.msg.startsWith('departure record ended before its hold')).map((l) => l.pod));
    const unreported = new Set(lines.filter((l) => l.msg.startsWith('could not write the drained status')).map((l) => l.pod));
    if (held.length > 0) console.log(`      departures recorded for drained pods and ended once the drain was seen: ${held.filter((pod) => endedEarly.has(pod)).length} of ${held.length}`);
    if (held.length > 0) console.log(logs.story().split('\n').filter((l) => /departure|drain/.test(l)).slice(-40).join('\n'));
    const metrics = await controller.registry.metrics();
    assert.match(metrics, /poolkeeper_server_limit_connections\{server="127\.0\.0\.1:\d+"\} 8/);
    assert.ok(samples > 20, `sampled pg_stat_activity ${samples} times`);
    assert.ok(stats.queries > 100, `the apps ran ${stats.queries} queries`);
    assert.deepEqual(stats.errors.slice(0, 5), [], `${stats.errors.length} application errors`);
    assert.ok(peak <= LIMIT, `PostgreSQL saw ${peak} app connections > limit ${LIMIT}`);
    assert.ok(logs.text.includes('grant received'), 'debug logs were captured');
    // The controller ran throughout: every pod that left, it saw leave.
    assert.ok(!logs.text.includes('default unseen'), 'the controller held pods as gone unseen');
    // A drained pod's connections come back once its drain is seen, however loaded the API server: none waits out its hold.
    const wholeHold = held.filter((pod) => !endedEarly.has(pod) && !unreported.has(pod));
    assert.deepEqual(wholeHold, [], `drained pods held for the whole departure hold: ${wholeHold.join(', ')}`);
    assert.ok(!logs.text.includes(postgres.app.password), 'the database password appears in the logs');
    assert.ok(!logs.text.includes(`${postgres.app.password}-rotated`), 'the rotated password appears in the logs');
  });
});
