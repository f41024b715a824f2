/**
 * End to end through an SSH bastion: a DatabaseConnection with
 * spec.sshTunnel, the webhook mounting the key Secret into the sidecar, the
 * controller copying the tunnel into each PoolMember, and real sidecars (run
 * by the kubelet simulator) reaching PostgreSQL through the real sshd. Each
 * pod holds one SSH connection whatever its server connections; a host key
 * changed in the DatabaseConnection reaches the running sidecars: a wrong one
 * refuses the bastion, with errors that say so, and the right one brings the
 * tunnel back without a pod restart.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { Writable } from 'node:stream';
import { promisify } from 'node:util';
import pg from 'pg';
import pino from 'pino';
import type { PoolMember } from '../../src/api/index.ts';
import { startController, type RunningController } from '../../src/bin/controller-main.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import { KubeletSimulator, type SimulatedPod } from '../../src/devenv/kubelet-sim.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { createNamespaceWithSecret, eventually, installCrds, startLocalWebhook } from '../../src/devenv/scenario.ts';
import type { SshServer } from '../../src/devenv/sshd.ts';
import { freshNamespace } from '../support/budget-fixture.ts';
import { testEnvironment } from '../support/hooks.ts';

const LIMIT = 6;
const POOL_TIMEOUT_SECONDS = 2;

/** A pino destination that keeps every line, to check what was logged. */
class LogCapture extends Writable {
  text = '';
  override _write(chunk: Buffer, _encoding: string, done: () => void): void {
    this.text += chunk.toString('utf8');
    done();
  }
}

interface AppStats {
  queries: Record<string, number>;
  errors: Array<{ at: number; pod: string; message: string }>;
}

/** A pod's "application": four workers running short transactions through its sidecar. */
function startApp(pod: SimulatedPod, stats: AppStats): void {
  const pool = new pg.Pool({ host: '127.0.0.1', port: pod.sidecar!.port, user: 'app', database: 'app', max: 4, connectionTimeoutMillis: 20_000 });
  let running = true;
  pool.on('error', (err) => {
    if (running) stats.errors.push({ at: Date.now(), pod: pod.name, message: `(idle client) ${err.message}` });
  });
  const worker = async (): Promise<void> => {
    while (running) {
      try {
        await pool.query('SELECT pg_sleep(0.01)');
        stats.queries[pod.name] = (stats.queries[pod.name] ?? 0) + 1;
      } catch (err) {
        if (!running) continue;
        stats.errors.push({ at: Date.now(), pod: pod.name, message: (err as Error).message });
        // As an application would: not a hot loop on a failing database.
        await new Promise((r) => setTimeout(r, 200));
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

/** One query through `pod`'s sidecar on a connection of its own: its result, or the error and how long it took. */
async function probe(pod: SimulatedPod, sql: string): Promise<{ rows?: Array<Record<string, unknown>>; error?: { code?: string; message: string }; ms: number }> {
  const started = Date.now();
  const client = new pg.Client({ host: '127.0.0.1', port: pod.sidecar!.port, user: 'app', database: 'app', connectionTimeoutMillis: 30_000 });
  client.on('error', () => undefined);
  try {
    await client.connect();
    const result = await client.query(sql);
    return { rows: result.rows as Array<Record<string, unknown>>, ms: Date.now() - started };
  } catch (err) {
    const e = err as { code?: string; message: string };
    return { error: { ...(e.code ? { code: e.code } : {}), message: e.message }, ms: Date.now() - started };
  } finally {
    await client.end().catch(() => undefined);
  }
}

async function metricsOf(pod: SimulatedPod): Promise<string> {
  return (await fetch(`http://127.0.0.1:${pod.sidecar!.adminPort}/metrics`)).text();
}

function metricValue(text: string, series: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? 0 : Number(line.slice(series.length + 1));
}

/** Pids of the processes holding the client end of each TCP connection to PostgreSQL, by client port. */
async function postgresClientOwners(postgres: PostgresServer): Promise<Map<number, { pids: number[]; command: string }>> {
  const { stdout } = await promisify(execFile)('/usr/bin/ss', ['-tnpH', 'state', 'established', `( dport = :${postgres.port} )`]);
  const owners = new Map<number, { pids: number[]; command: string }>();
  for (const line of stdout.split('\n').filter((l) => l.trim() !== '')) {
    const local = line.trim().split(/\s+/)[2] ?? '';
    owners.set(Number(local.slice(local.lastIndexOf(':') + 1)), { pids: [...line.matchAll(/pid=(\d+)/g)].map((m) => Number(m[1])), command: /\(\("([^"]+)"/.exec(line)?.[1] ?? '' });
  }
  return owners;
}

interface Condition { type: string; status: string; reason: string; message: string }

describe('SSH bastion end to end', function () {
  this.timeout(120_000);
  let kube: KubeControlPlane;
  let postgres: PostgresServer;
  let sshd: SshServer;
  let controller: RunningController | undefined;
  let webhook: Awaited<ReturnType<typeof startLocalWebhook>> | undefined;
  let kubelet: KubeletSimulator | undefined;
  let namespace: string;
  let sampler: NodeJS.Timeout | undefined;
  let peak = 0;
  let samples = 0;
  const logs = new LogCapture();
  const stats: AppStats = { queries: {}, errors: [] };
  const testStart = new Date();

  const connection = (name: string, hostKey: string, deployment: string): string => JSON.stringify({
    apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name, namespace },
    spec: {
      // As the bastion sees the database: its own loopback.
      database: { host: '127.0.0.1', port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' } },
      sshTunnel: { host: sshd.host, port: sshd.port, user: sshd.username, privateKeySecretRef: { name: 'bastion-key' }, hostKey },
      maxConnections: LIMIT, reserve: 0,
      consumers: [{ name: deployment, workloadRef: { kind: 'Deployment', name: deployment }, minPerPod: 1 }],
      pool: { mode: 'transaction', poolTimeout: POOL_TIMEOUT_SECONDS },
    },
  });
  const deployment = (name: string, connectionName: string, replicas: number): string => JSON.stringify({
    apiVersion: 'apps/v1', kind: 'Deployment', metadata: { name, namespace },
    spec: {
      replicas,
      selector: { matchLabels: { app: name } },
      template: { metadata: { labels: { app: name, 'poolkeeper.dev/connection': connectionName } }, spec: { containers: [{ name: 'app', image: 'example.invalid/app:1' }] } },
    },
  });
  const getConnection = async (name: string): Promise<{ status?: { pods?: number; conditions?: Condition[] } }> => JSON.parse(await kube.kubectlAsync(['-n', namespace, 'get', 'dbc', name, '-o', 'json'])) as { status?: { pods?: number; conditions?: Condition[] } };
  const condition = async (name: string, type: string): Promise<Condition | undefined> => (await getConnection(name)).status?.conditions?.find((c) => c.type === type);
  const podsOf = (prefix: string): SimulatedPod[] => kubelet!.live().filter((p) => p.name.startsWith(`${prefix}-`));
  const setHostKey = (name: string, hostKey: string): Promise<string> => kube.kubectlAsync(['-n', namespace, 'patch', 'dbc', name, '--type', 'merge', '-p', JSON.stringify({ spec: { sshTunnel: { hostKey } } })]);
  const membersSee = async (prefix: string, hostKey: string): Promise<boolean> => {
    const members = (JSON.parse(await kube.kubectlAsync(['-n', namespace, 'get', 'pm', '-o', 'json'])) as { items: PoolMember[] }).items.filter((m) => m.metadata?.name?.startsWith(`${prefix}-`));
    return members.length > 0 && members.every((m) => m.spec.sshTunnel?.hostKey === hostKey);
  };
  /** A host key line of another host: valid, not the bastion's. */
  const otherHostKey = (): string => sshd.newUserKey().publicKeyLine.split(' ').slice(0, 2).join(' ');

  before(async function () {
    [kube, postgres, sshd] = await Promise.all([testEnvironment().kube(), testEnvironment().postgres(), testEnvironment().sshd()]);
    await installCrds(kube);
    // Pods bound to a node that does not exist are force-deleted as orphans after about 40 s.
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Node', metadata: { name: 'simulated-node' } }));
    namespace = freshNamespace('bastion');
    createNamespaceWithSecret(kube, { namespace, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['-n', namespace, 'create', 'secret', 'generic', 'bastion-key', `--from-literal=ssh-privatekey=${sshd.userPrivateKey}`]);
    kube.kubectl(['apply', '-f', '-'], connection('orders', sshd.hostPublicKey, 'web'));
    const logger = pino({ level: 'info' }, logs);
    controller = await startController({ apiServer: kube.kubeConfig(), namespace, identity: 'bastion-e2e', metricsPort: 0, metricsHost: '127.0.0.1', leaderElection: false, repair: 'off' }, logger.child({ component: 'controller' }));
    // The sidecar's key volume and POOLKEEPER_SSH_KEY_DIR come from the webhook, as in a cluster.
    webhook = await startLocalWebhook(kube, { webhookNamespace: `${namespace}-pk`, targetNamespace: namespace, probeConnection: 'orders', logger: pino({ level: 'warn' }, process.stderr) });
    // From here on this process serves the webhook and runs the sidecars: kubectl must not block it.
    kubelet = new KubeletSimulator(kube, namespace, { username: postgres.app.user, password: postgres.app.password }, logger.child({ component: 'sidecar' }), 'injected');
    kubelet.onPodReady = (pod) => startApp(pod, stats);
    await kubelet.start();
    sampler = setInterval(() => {
      // The controller's login check comes out of the reserve, not the budget.
      void postgres.query<{ port: number }>("SELECT client_port AS port FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND backend_start >= $1 AND application_name NOT LIKE 'poolkeeper-controller%'", [testStart]).then(async (rows) => {
        samples += 1;
        let n = rows.length;
        // The driver tests' comparison PgBouncer shares the server and its role: its backends are not this test's.
        if (n > peak) {
          const owners = await postgresClientOwners(postgres);
          n = rows.filter((r) => owners.get(r.port)?.command !== 'pgbouncer').length;
        }
        peak = Math.max(peak, n);
      }, () => undefined);
    }, 50);
  });

  after(async function () {
    clearInterval(sampler);
    await kubelet?.stop();
    await webhook?.stop();
    await controller?.shutdown();
    if (webhook) await kube.kubectlAsync(['delete', 'mutatingwebhookconfiguration', webhook.name, '--ignore-not-found']);
    if (namespace) await kube.kubectlAsync(['-n', namespace, 'delete', 'dbc', '--all', '--wait=true']);
  });

  it('tunnels every pod through one SSH connection within the limit; a wrong host key refuses the bastion, the right one brings it back without a restart', async function () {
    await kube.kubectlAsync(['apply', '-f', '-'], deployment('web', 'orders', 2));
    await eventually('2 pods served', async () => {
      const dbc = await getConnection('orders');
      return dbc.status?.pods === 2 && dbc.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true && podsOf('web').length === 2;
    }, 60_000).catch((err: Error) => {
      throw new Error(`${err.message}; kubelet failures ${JSON.stringify(kubelet!.failures)}`);
    });
    const pods = podsOf('web');
    const sidecars = pods.map((p) => p.sidecar);
    for (const pod of pods) assert.ok(pod.sshKeyDir, `${pod.name}: the webhook mounted no SSH key`);
    await eventually('load through both pods', () => pods.every((p) => (stats.queries[p.name] ?? 0) > 50), 30_000);

    // One SSH connection per pod, however many server connections each holds.
    let sessions = await sshd.sessions();
    await eventually('one SSH connection per pod', async () => (sessions = await sshd.sessions()).length === 2, 15_000).catch((err: Error) => {
      throw new Error(`${err.message}: ${JSON.stringify(sessions)}`);
    });
    const sessionPids = new Set(sessions.flatMap((s) => s.pids));
    const throughSshd: number[] = [];
    for (const pod of pods) {
      const result = await probe(pod, 'SELECT inet_client_port() AS port');
      assert.equal(result.error, undefined, `${pod.name}: ${result.error?.message}`);
      const port = Number(result.rows![0]!.port);
      // The server connection that ran it is still held by the sidecar: its client end is an sshd session's.
      const owner = (await postgresClientOwners(postgres)).get(port);
      assert.ok(owner && owner.pids.some((pid) => sessionPids.has(pid)), `${pod.name}: the backend's peer 127.0.0.1:${port} is held by ${JSON.stringify(owner)}, not by an SSH session of the bastion (${[...sessionPids].join(', ')})`);
      const metrics = await metricsOf(pod);
      assert.equal(metricValue(metrics, 'poolkeeper_sidecar_tunnel_up'), 1, `${pod.name}: tunnel not up`);
    }
    const backends = await postgres.query<{ client_port: number }>("SELECT client_port FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND backend_start >= $1 AND application_name NOT LIKE 'poolkeeper-controller%'", [testStart]);
    const owners = await postgresClientOwners(postgres);
    // The SSH connections as they are now too (a tunnel that reconnected on a loaded machine is another sshd process).
    for (const session of await sshd.sessions()) for (const pid of session.pids) sessionPids.add(pid);
    // The sidecars run in this process: their backends' client ends are this process's or an SSH session's. Other
    // poolers on the shared server (the comparison PgBouncer of the driver tests, serving whatever reaches it) are
    // not this test's, and a backend whose client end closed between the two reads has no owner left to judge.
    const judged = backends.filter((b) => owners.get(b.client_port)?.pids.some((pid) => pid === process.pid || sessionPids.has(pid)) === true);
    for (const { client_port: port } of judged) if (owners.get(port)!.pids.some((pid) => sessionPids.has(pid))) throughSshd.push(port);
    assert.ok(throughSshd.length > sessions.length, `${throughSshd.length} backends through the bastion over ${sessions.length} SSH connections: no multiplexing to see`);
    assert.equal(throughSshd.length, judged.length, `backends not through the bastion (peer port: owner): ${JSON.stringify(judged.filter((b) => !throughSshd.includes(b.client_port)).map((b) => [b.client_port, owners.get(b.client_port)]))}; SSH session pids ${[...sessionPids].join(', ')}`);
    assert.deepEqual(stats.errors.slice(0, 5), [], 'application errors with the right host key');

    // A wrong host key in the DatabaseConnection: it reaches every PoolMember, and the SSH connections up now stay (they were verified).
    const wrongKey = otherHostKey();
    await setHostKey('orders', wrongKey);
    await eventually('the wrong host key in every PoolMember', () => membersSee('web', wrongKey), 15_000);
    const beforeWrong = { ...stats.queries };
    await new Promise((r) => setTimeout(r, 1000));
    assert.deepEqual(stats.errors.slice(0, 5), [], 'application errors while the verified SSH connections stay');
    for (const pod of pods) assert.ok((stats.queries[pod.name] ?? 0) > (beforeWrong[pod.name] ?? 0), `${pod.name}: no queries while the verified tunnel stays`);
    const stayed = new Set((await sshd.sessions()).flatMap((s) => s.pids));
    assert.ok([...sessionPids].every((pid) => stayed.has(pid)), 'the verified SSH connections were replaced');
    // The controller's own login check goes through the same bastion: the user sees why.
    await eventually('Ready=False on the host key', async () => {
      const ready = await condition('orders', 'Ready');
      return ready?.status === 'False' && /host key mismatch/.test(ready.message);
    }, 30_000);

    // The bastion drops every connection: the sidecars reconnect, and refuse it.
    const droppedAt = Date.now();
    const logAtDrop = readFileSync(sshd.logFile, 'utf8').length;
    assert.ok(await sshd.endSessions() >= 2, 'no SSH session to end');
    await eventually('both sidecars refused the bastion', async () => {
      const texts = await Promise.all(pods.map(metricsOf));
      return texts.every((t) => metricValue(t, 'poolkeeper_sidecar_tunnel_up') === 0 && metricValue(t, 'poolkeeper_sidecar_errors_total{kind="tunnel-host-key-mismatch"}') >= 1);
    }, 15_000);
    for (const pod of pods) {
      const ready = await fetch(`http://127.0.0.1:${pod.sidecar!.adminPort}/readyz`);
      assert.equal(ready.status, 503, `${pod.name}: ready with the bastion refused`);
      const refused = await probe(pod, 'SELECT 1');
      // Not a hang: the client is told within its poolTimeout why.
      assert.ok(refused.error && /host key mismatch/.test(refused.error.message), `${pod.name}: ${JSON.stringify(refused)}`);
      assert.ok(refused.ms < (POOL_TIMEOUT_SECONDS + 3) * 1000, `${pod.name}: the refusal took ${refused.ms} ms`);
    }
    assert.match(logs.text, /SSH host key mismatch: refusing the bastion/);
    const refusedErrors = stats.errors.filter((e) => e.at >= droppedAt);
    assert.ok(refusedErrors.length > 0, 'the apps saw no error while the bastion was refused');
    // Each error says what happened: the tunnel lost, or the bastion refused on its host key.
    const unclear = refusedErrors.filter((e) => !/host key mismatch|SSH tunnel|server connection|terminat/i.test(e.message));
    assert.deepEqual(unclear.slice(0, 5), [], 'unclear application errors');

    // The client refuses the bastion before it authenticates: sshd accepted no login meanwhile.
    const loginsWhileRefused = readFileSync(sshd.logFile, 'utf8').slice(logAtDrop).split('\n').filter((l) => l.includes('Accepted publickey'));
    assert.deepEqual(loginsWhileRefused, [], 'sshd accepted logins while the host key was wrong');
    // The right key (as its fingerprint this time): the tunnel comes back in the same pods.
    const fixedAt = Date.now();
    const logAtFix = readFileSync(sshd.logFile, 'utf8').length;
    await setHostKey('orders', sshd.hostKeyFingerprint);
    await eventually('both tunnels up again', async () => (await Promise.all(pods.map(metricsOf))).every((t) => metricValue(t, 'poolkeeper_sidecar_tunnel_up') === 1), 20_000);
    const recoveryMs = Date.now() - fixedAt;
    for (const pod of pods) {
      let result: Awaited<ReturnType<typeof probe>> | undefined;
      // A server connection that went down with the tunnel may fail the first query on it, as a direct one would.
      await eventually(`${pod.name} serves again`, async () => (result = await probe(pod, 'SELECT 7 AS v')).rows?.[0]?.v === 7, 15_000).catch((err: Error) => {
        throw new Error(`${err.message}: ${JSON.stringify(result)}`);
      });
      assert.ok(metricValue(await metricsOf(pod), 'poolkeeper_sidecar_tunnel_reconnects_total') >= 1);
    }
    const recoveredAt = Date.now();
    assert.deepEqual(podsOf('web').map((p) => p.name), pods.map((p) => p.name), 'pods were replaced');
    assert.deepEqual(podsOf('web').map((p) => p.sidecar), sidecars, 'sidecars were restarted');
    await eventually('one SSH connection per pod after the recovery', async () => (await sshd.sessions()).length === 2, 10_000);
    // The pattern the check above relies on: the reconnected sidecars' logins are in the log.
    assert.ok(readFileSync(sshd.logFile, 'utf8').slice(logAtFix).split('\n').filter((l) => l.includes('Accepted publickey')).length >= 2, 'no login of the reconnected sidecars in the sshd log');
    await eventually('Ready again', async () => (await condition('orders', 'Ready'))?.status === 'True', 30_000);
    const afterRecovery = { ...stats.queries };
    await new Promise((r) => setTimeout(r, 1000));
    for (const pod of pods) assert.ok((stats.queries[pod.name] ?? 0) > (afterRecovery[pod.name] ?? 0), `${pod.name}: the app does not run after the recovery`);
    const lateErrors = stats.errors.filter((e) => e.at > recoveredAt);
    assert.deepEqual(lateErrors.slice(0, 5), [], 'application errors after the recovery');
    console.log(`      ${backends.length} backends over ${sessions.length} SSH connections; ${refusedErrors.length} app errors while refused (${[...new Set(refusedErrors.map((e) => e.message))].slice(0, 3).join(' | ')}); tunnels back ${recoveryMs} ms after the right key; peak ${peak} of ${LIMIT} over ${samples} samples`);
    assert.ok(peak <= LIMIT, `PostgreSQL saw ${peak} app connections > limit ${LIMIT}`);
    assert.ok(!logs.text.includes(sshd.userPrivateKey.split('\n')[1]!), 'the SSH private key appears in the logs');
  });

  it('a host key wrong from the start: the sidecar never reaches the database, its app is told why at once, and the DatabaseConnection says so', async function () {
    kube.kubectl(['apply', '-f', '-'], connection('reports', otherHostKey(), 'reports'));
    await kube.kubectlAsync(['apply', '-f', '-'], deployment('reports', 'reports', 1));
    await eventually('the reports pod running', () => podsOf('reports').length === 1, 60_000).catch((err: Error) => {
      throw new Error(`${err.message}; kubelet failures ${JSON.stringify(kubelet!.failures)}`);
    });
    const pod = podsOf('reports')[0]!;
    await eventually('a grant for the reports pod', async () => (await getConnection('reports')).status?.pods === 1, 30_000);
    const result = await probe(pod, 'SELECT 1');
    assert.ok(result.error && /host key mismatch/.test(result.error.message), JSON.stringify(result));
    assert.ok(result.ms < (POOL_TIMEOUT_SECONDS + 3) * 1000, `the refusal took ${result.ms} ms`);
    const metrics = await metricsOf(pod);
    assert.equal(metricValue(metrics, 'poolkeeper_sidecar_tunnel_up'), 0);
    assert.ok(metricValue(metrics, 'poolkeeper_sidecar_errors_total{kind="tunnel-host-key-mismatch"}') >= 1, 'the mismatch was not counted');
    assert.equal((await fetch(`http://127.0.0.1:${pod.sidecar!.adminPort}/readyz`)).status, 503);
    let ready: Condition | undefined;
    await eventually('Ready=False on the host key', async () => {
      ready = await condition('reports', 'Ready');
      return ready?.status === 'False' && /host key mismatch/.test(ready.message);
    }, 30_000).catch((err: Error) => {
      throw new Error(`${err.message}: ${JSON.stringify(ready)}`);
    });
    const events = await kube.kubectlAsync(['-n', namespace, 'get', 'events', '--field-selector', 'involvedObject.kind=DatabaseConnection,involvedObject.name=reports', '-o', 'json']);
    const warnings = (JSON.parse(events) as { items: Array<{ type: string; reason: string; message: string }> }).items.filter((e) => e.type === 'Warning' && /host key mismatch/.test(e.message));
    assert.ok(warnings.length > 0, `no Warning Event says why: ${events.slice(0, 1000)}`);
    console.log(`      refused in ${result.ms} ms: ${result.error.message}; Ready=False ${ready?.reason}: ${ready?.message}; Event ${warnings[0]!.reason}`);
    // The tunnelled connection that works was not disturbed.
    for (const web of podsOf('web')) assert.equal((await probe(web, 'SELECT 1 AS v')).rows?.[0]?.v, 1);
    // Another bastion user reaches the PoolMember, and the running sidecar says it keeps the tunnel it started with.
    await kube.kubectlAsync(['-n', namespace, 'patch', 'dbc', 'reports', '--type', 'merge', '-p', JSON.stringify({ spec: { sshTunnel: { user: 'someone-else' } } })]);
    await eventually('the sidecar says when a changed tunnel applies', () => logs.text.split('\n').some((line) => line.includes(pod.name) && line.includes('the SSH tunnel changed: it applies when the pod restarts')), 15_000);
  });
});
