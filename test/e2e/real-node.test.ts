/**
 * End to end on a real node: poolkeeper installed from crds/ and deploy/ as a
 * user would (the image built locally, src/devenv/image.ts), applications in
 * real containers whose pods get the sidecar from the webhook, PostgreSQL
 * reached over the node's bridge. PostgreSQL is sampled every 50 ms and must
 * never see more of the workload's connections than the limit; the
 * applications count every failed query. Skipped, with the reason, where the
 * machine cannot run a real node (not root, no namespaces).
 */
import assert from 'node:assert/strict';
import { chmodSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { appDeployment, readAppStats, type AppStats } from '../../src/devenv/real-node-app.ts';
import { BRIDGE_ADDRESS, BRIDGE_POSTGRES_PORT, installPoolkeeper, realNodeSupport, type RealNode } from '../../src/devenv/real-node.ts';
import { processRssMb } from '../../src/devenv/process.ts';
import { eventually } from '../../src/devenv/scenario.ts';
import { testEnvironment } from '../support/hooks.ts';

const LIMIT = 8;
const NAMESPACE = 'shop';
const ROLE = 'rn_app';

/** Each pod's app: one pool of three connections running short queries. */
const LOAD = { pools: 1, poolSize: 3, querySeconds: 0.005 };

describe('real node end to end', function () {
  this.timeout(900_000);
  let node: RealNode;
  let postgres: PostgresServer;
  let statsDir: string;
  let sampler: NodeJS.Timeout | undefined;
  let samplerClient: pg.Client | undefined;
  let peak = 0;
  let samples = 0;
  let sampleFailures = 0;

  before(async function () {
    const support = realNodeSupport({ install: true });
    if (!support.ok) {
      console.log(`      skipped: a real node cannot run here (${support.reason})`);
      this.skip();
    }
    const started = Date.now();
    [node, postgres] = await Promise.all([testEnvironment().realNode(), testEnvironment().postgres()]);
    console.log(`      real node Ready in ${((Date.now() - started) / 1000).toFixed(1)} s (image ${(node.image.compressedBytes / 1e6).toFixed(1)} MB gzipped${node.image.cached ? ', cached' : ''})`);
    const installing = Date.now();
    await installPoolkeeper(node);
    console.log(`      poolkeeper installed from crds/ and deploy/ in ${((Date.now() - installing) / 1000).toFixed(1)} s`);

    const password = `rn-${Date.now()}`;
    await postgres.query(`CREATE ROLE ${ROLE} LOGIN PASSWORD '${password}'`);
    await postgres.query(`GRANT ALL ON DATABASE app TO ${ROLE}`);
    statsDir = join(node.dir, 'stats');
    mkdirSync(statsDir, { recursive: true });
    chmodSync(statsDir, 0o1777);
    await node.kubectlAsync(['create', 'namespace', NAMESPACE]);
    await node.kubectlAsync(['-n', NAMESPACE, 'create', 'secret', 'generic', 'db-credentials', `--from-literal=username=${ROLE}`, `--from-literal=password=${password}`]);
    await node.kubectlAsync(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders', namespace: NAMESPACE },
      spec: {
        database: { host: BRIDGE_ADDRESS, port: BRIDGE_POSTGRES_PORT, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' } },
        maxConnections: LIMIT, reserve: 0,
        consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, minPerPod: 1 }],
        pool: { mode: 'transaction', poolTimeout: 30 },
      },
    }));
    // One connection kept for sampling, so that a sample is a query, not a login; a tick whose previous sample is still running is skipped.
    const sampling = new pg.Client(postgres.clientConfig());
    await sampling.connect();
    samplerClient = sampling;
    let inFlight = false;
    sampler = setInterval(() => {
      if (inFlight) return;
      inFlight = true;
      // The controller's login check per credentials generation is its own application_name and comes out of the reserve.
      sampling.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend' AND application_name NOT LIKE 'poolkeeper-controller%'", [ROLE]).then((result) => {
        samples += 1;
        peak = Math.max(peak, Number(result.rows[0]?.n ?? 0));
      }, () => {
        sampleFailures += 1;
      }).finally(() => {
        inFlight = false;
      });
    }, 50);
    await node.kubectlAsync(['apply', '-f', '-'], JSON.stringify(webDeployment(2, statsDir)));
    await settled(2);
  });

  after(async function () {
    if (sampler) clearInterval(sampler);
    await samplerClient?.end();
    if (samples > 0) console.log(`      PostgreSQL peak ${peak} of ${ROLE}'s connections (limit ${LIMIT}) over ${samples} samples (every 50 ms unless the previous one was still running; ${sampleFailures} failed); apps: ${JSON.stringify(appStats())}`);
    // The node's pods and control plane would otherwise run on through the tests after this one.
    await node?.stop();
  });

  function appStats(): AppStats {
    return readAppStats(statsDir);
  }

  async function json<T>(args: string[]): Promise<T> {
    return JSON.parse(await node.kubectlAsync([...args, '-o', 'json'])) as T;
  }

  /** `pods` running and Ready, none terminating, and the DatabaseConnection Ready for exactly them. */
  async function settled(pods: number, timeoutMs = 180_000): Promise<void> {
    await eventually(`${pods} web pods settled`, async () => {
      // A poll: one kubectl the loaded API server turned away is tried again at the next, not a failure.
      const dbc = await json<{ status?: { pods?: number; conditions?: Array<{ type: string; status: string }> } }>(['-n', NAMESPACE, 'get', 'dbc', 'orders']).catch(() => undefined);
      const list = await json<{ items: Array<{ metadata: { deletionTimestamp?: string }; status?: { conditions?: Array<{ type: string; status: string }> } }> }>(['-n', NAMESPACE, 'get', 'pods', '-l', 'app=web']).catch(() => undefined);
      if (dbc === undefined || list === undefined) return false;
      const ready = list.items.filter((p) => !p.metadata.deletionTimestamp && p.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True'));
      return list.items.length === pods && ready.length === pods && dbc.status?.pods === pods && dbc.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true;
    }, timeoutMs);
  }

  /** RSS of every sidecar process on the node (containers are processes of this host), MB. */
  function sidecarRssMb(): number[] {
    const sizes: number[] = [];
    for (const pid of readdirSync('/proc').filter((name) => /^\d+$/.test(name))) {
      try {
        const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
        if (!cmdline.some((arg) => arg.endsWith('poolkeeper.js')) || cmdline.at(-2) !== 'sidecar') continue;
        const rss = processRssMb(Number(pid));
        if (rss !== undefined) sizes.push(Math.round(rss));
      } catch {
        // exited meanwhile
      }
    }
    return sizes;
  }

  function assertWithinLimit(): void {
    assert.ok(samples > 20, `sampled pg_stat_activity ${samples} times`);
    assert.ok(peak <= LIMIT, `PostgreSQL saw ${peak} of ${ROLE}'s connections > limit ${LIMIT}`);
  }

  it('scales 2 -> 5 -> 1 under load with PostgreSQL at or under the limit and no failed query', async function () {
    const before = appStats();
    await node.kubectlAsync(['-n', NAMESPACE, 'scale', 'deployment/web', '--replicas=5']);
    await settled(5);
    // The image's sidecar under load, reached through its ServiceAccount (no client-node): reported, the 128Mi limit enforces it.
    console.log(`      sidecar RSS under load: ${sidecarRssMb().join(', ')} MB`);
    await node.kubectlAsync(['-n', NAMESPACE, 'scale', 'deployment/web', '--replicas=1']);
    await settled(1);
    const after = appStats();
    console.log(`      scale: ${after.queries - before.queries} queries, ${after.errors - before.errors} failed; peak ${peak}/${LIMIT}`);
    assert.ok(after.queries - before.queries > 100, `the apps ran ${after.queries - before.queries} queries`);
    assert.equal(after.errors, 0, `failed queries: ${after.lastErrors.slice(0, 5).join('; ')}`);
    assertWithinLimit();
  });

  it('rotates the credentials through the real Secret volume: every sidecar on the new password, no old connection left', async function () {
    await node.kubectlAsync(['-n', NAMESPACE, 'scale', 'deployment/web', '--replicas=3']);
    await settled(3);
    const before = appStats();
    const rotated = `rn-rotated-${Date.now()}`;
    await postgres.query(`ALTER ROLE ${ROLE} PASSWORD '${rotated}'`);
    const rotatedAt = new Date();
    await node.kubectlAsync(['-n', NAMESPACE, 'apply', '-f', '-'], await node.kubectlAsync(['-n', NAMESPACE, 'create', 'secret', 'generic', 'db-credentials', `--from-literal=username=${ROLE}`, `--from-literal=password=${rotated}`, '--dry-run=client', '-o', 'yaml']));
    await eventually('every sidecar on the new credentials, as the controller sees it', async () => {
      const members = await json<{ items: Array<{ spec: { credentialsGeneration?: string }; status?: { credentialsGeneration?: string } }> }>(['-n', NAMESPACE, 'get', 'pm']);
      return members.items.length === 3 && members.items.every((m) => m.spec.credentialsGeneration && m.status?.credentialsGeneration === m.spec.credentialsGeneration);
    }, 120_000);
    const volumeSeconds = (Date.now() - rotatedAt.getTime()) / 1000;
    await eventually('no server connection from before the rotation', async () => {
      const rows = await postgres.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend' AND backend_start < $2", [ROLE, rotatedAt]);
      return rows[0]?.n === '0';
    }, 60_000);
    const after = appStats();
    console.log(`      rotation: the new Secret reached every sidecar's volume in ${volumeSeconds.toFixed(1)} s; ${after.errors - before.errors} failed queries`);
    assert.equal(after.errors, 0, `failed queries: ${after.lastErrors.slice(0, 5).join('; ')}`);
    assertWithinLimit();
  });

  it('rolls out with RollingUpdate maxSurge 25% within the limit and without a failed query', async function () {
    await node.kubectlAsync(['-n', NAMESPACE, 'patch', 'deployment/web', '--type=merge', '-p', JSON.stringify({ spec: { replicas: 4, strategy: { type: 'RollingUpdate', rollingUpdate: { maxSurge: '25%', maxUnavailable: 0 } } } })]);
    await settled(4);
    await node.kubectlAsync(['-n', NAMESPACE, 'rollout', 'restart', 'deployment/web']);
    await node.kubectlAsync(['-n', NAMESPACE, 'rollout', 'status', 'deployment/web', '--timeout=300s']);
    await settled(4);
    const stats = appStats();
    assert.equal(stats.errors, 0, `failed queries: ${stats.lastErrors.slice(0, 5).join('; ')}`);
    assertWithinLimit();
  });

  it('rolls out with Recreate: the new pods get the budget the old ones gave back, within the limit and without a failed query', async function () {
    await node.kubectlAsync(['-n', NAMESPACE, 'patch', 'deployment/web', '--type=merge', '-p', JSON.stringify({ spec: { strategy: { type: 'Recreate', rollingUpdate: null } } })]);
    const before = appStats();
    const oldPods = new Set((await json<{ items: Array<{ metadata: { name: string } }> }>(['-n', NAMESPACE, 'get', 'pods', '-l', 'app=web'])).items.map((p) => p.metadata.name));
    await node.kubectlAsync(['-n', NAMESPACE, 'rollout', 'restart', 'deployment/web']);
    await node.kubectlAsync(['-n', NAMESPACE, 'rollout', 'status', 'deployment/web', '--timeout=300s']);
    await settled(4);
    const pods = (await json<{ items: Array<{ metadata: { name: string } }> }>(['-n', NAMESPACE, 'get', 'pods', '-l', 'app=web'])).items.map((p) => p.metadata.name);
    assert.ok(pods.every((name) => !oldPods.has(name)), `old pods left: ${pods.filter((n) => oldPods.has(n)).join(' ')}`);
    // Every new pod's grant is its full share: nothing stays reserved for the pods that are gone.
    // The sidecars acknowledge to the controller directly; their PoolMember statuses follow at their next heartbeat (10 s).
    let acknowledged: number[] = [];
    await eventually('the new pods\' statuses to show their full share', async () => {
      const members = await json<{ items: Array<{ metadata: { name: string }; status?: { acknowledgedConnections?: number } }> }>(['-n', NAMESPACE, 'get', 'pm']);
      acknowledged = members.items.filter((m) => pods.includes(m.metadata.name)).map((m) => m.status?.acknowledgedConnections ?? 0);
      return acknowledged.reduce((a, b) => a + b, 0) === LIMIT;
    }, 30_000).catch(() => undefined);
    assert.equal(acknowledged.reduce((a, b) => a + b, 0), LIMIT, `acknowledged grants ${JSON.stringify(acknowledged)} after the Recreate rollout`);
    const queriesAt = appStats().queries;
    await eventually('the new pods serve', () => appStats().queries > queriesAt + 100, 60_000);
    const after = appStats();
    console.log(`      Recreate rollout: ${after.queries - before.queries} queries, ${after.errors - before.errors} failed; grants ${acknowledged.join(' + ')}`);
    assert.equal(after.errors - before.errors, 0, `failed queries: ${after.lastErrors.slice(0, 5).join('; ')}`);
    assertWithinLimit();
    // Back to the rolling strategy for what follows.
    await node.kubectlAsync(['-n', NAMESPACE, 'patch', 'deployment/web', '--type=merge', '-p', JSON.stringify({ spec: { strategy: { type: 'RollingUpdate', rollingUpdate: { maxSurge: '25%', maxUnavailable: 0 } } } })]);
  });

  it('a killed sidecar container is restarted by the kubelet and its pod serves again', async function () {
    const pods = await json<{ items: Array<{ metadata: { name: string }; status: { initContainerStatuses?: Array<{ name: string; containerID?: string; restartCount: number }> } }> }>(['-n', NAMESPACE, 'get', 'pods', '-l', 'app=web']);
    const pod = pods.items[0]!;
    const sidecar = pod.status.initContainerStatuses?.find((c) => c.name === 'poolkeeper-sidecar');
    assert.ok(sidecar?.containerID, `pod ${pod.metadata.name} has a native sidecar container`);
    const before = appStats();
    node.execInNs('/usr/bin/ctr', ['--address', join(node.dir, 'containerd.sock'), '-n', 'k8s.io', 'tasks', 'kill', '--signal', 'SIGKILL', sidecar.containerID.replace(/^containerd:\/\//, '')]);
    await eventually('the kubelet restarted the sidecar', async () => {
      const p = await json<{ status: { initContainerStatuses?: Array<{ name: string; restartCount: number; ready: boolean }> } }>(['-n', NAMESPACE, 'get', 'pod', pod.metadata.name]);
      const s = p.status.initContainerStatuses?.find((c) => c.name === 'poolkeeper-sidecar');
      return (s?.restartCount ?? 0) > sidecar.restartCount && s?.ready === true;
    }, 120_000);
    await settled(4);
    const queriesAt = appStats().queries;
    await eventually('queries flowing again', () => appStats().queries > queriesAt + 100, 60_000);
    const after = appStats();
    // The app's connections through the killed sidecar fail: that is what a crash is. Report them; the limit must still hold.
    console.log(`      sidecar killed: ${after.errors - before.errors} failed queries while it restarted (pod ${pod.metadata.name})`);
    assertWithinLimit();
  });

  it('keeps the limit when the leading controller pod is deleted in the middle of a scale-up', async function () {
    const baseline = appStats().errors;
    const lease = await json<{ spec: { holderIdentity?: string } }>(['-n', 'poolkeeper-system', 'get', 'lease', 'poolkeeper-controller']);
    const leader = lease.spec.holderIdentity ?? '';
    assert.ok(leader, 'a controller holds the lease');
    await node.kubectlAsync(['-n', NAMESPACE, 'scale', 'deployment/web', '--replicas=6']);
    await node.kubectlAsync(['-n', 'poolkeeper-system', 'delete', 'pod', leader, '--wait=false']);
    await settled(6);
    const after = appStats();
    console.log(`      controller ${leader} deleted mid-scale: ${after.errors - baseline} failed queries`);
    assert.equal(after.errors - baseline, 0, `failed queries: ${after.lastErrors.slice(0, 5).join('; ')}`);
    assertWithinLimit();
  });
});

/** The workload: the app of src/devenv/real-node-app.ts, opted in to `orders`. */
function webDeployment(replicas: number, statsDir: string): Record<string, unknown> {
  return appDeployment({ namespace: NAMESPACE, name: 'web', connection: 'orders', replicas, statsDir, load: LOAD });
}
