/**
 * The acknowledgement channel on the real API server: sidecars on a grant
 * table acknowledge to the leading controller directly, the controller counts
 * that at once and records it in the table, and the PoolMember status follows
 * at the next heartbeat. Forged, malformed and unknown acknowledgements are
 * refused; when the channel does not answer, sidecars write their status.
 */
import assert from 'node:assert/strict';
import { request } from 'node:http';
import pino from 'pino';
import type { Registry } from 'prom-client';
import type { DatabaseConnection, PoolGrant, PoolMember } from '../../src/api/index.ts';
import type { AcknowledgementReceiver } from '../../src/controller/acknowledgements.ts';
import type { BudgetController } from '../../src/controller/controller.ts';
import { startController as startControllerBinary, type RunningController } from '../../src/bin/controller-main.ts';
import { acknowledgementUrl, signAcknowledgement, type ChannelAcknowledgement } from '../../src/core/budget/index.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { KubeHttp } from '../../src/kube/http.ts';
import { Informer, type KubeObject } from '../../src/kube/informer.ts';
import { testEnvironment } from '../support/hooks.ts';
import { Sampler, SidecarFleetDouble, createWorkload, eventually, freshNamespace, installCrds, reserved, startController } from '../support/budget-fixture.ts';

/** Heartbeats slower than any test here: a status written during one came from a status write, not a beat. */
const NO_HEARTBEAT_MS = 600_000;

function post(url: string, body: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(new URL(acknowledgementUrl(url)), { method: 'POST', headers: { 'content-type': 'application/json' } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

async function counter(registry: Registry, result: string): Promise<number> {
  const metric = await registry.getSingleMetric('poolkeeper_acknowledgements_received_total')?.get();
  return metric?.values.find((v) => v.labels['result'] === result)?.value ?? 0;
}

describe('acknowledgement channel', function () {
  let kube: KubeControlPlane;
  let postgres: PostgresServer;
  let controller: BudgetController | undefined;
  let fleet: SidecarFleetDouble | undefined;
  let connections: Informer<DatabaseConnection & KubeObject>;
  let tables: Informer<PoolGrant & KubeObject>;
  const namespaces: string[] = [];

  before(async function () {
    [kube, postgres] = await Promise.all([testEnvironment().kube(), testEnvironment().postgres()]);
    await installCrds(kube);
    const http = new KubeHttp(kube.kubeConfig());
    connections = new Informer<DatabaseConnection & KubeObject>(http, { path: '/apis/poolkeeper.dev/v1alpha1/databaseconnections', logger: pino({ level: 'silent' }) });
    tables = new Informer<PoolGrant & KubeObject>(http, { path: '/apis/poolkeeper.dev/v1alpha1/poolgrants', logger: pino({ level: 'silent' }) });
    await Promise.all([connections.start(), tables.start()]);
  });

  after(async function () {
    await Promise.all([connections.stop(), tables.stop()]);
  });

  afterEach(async function () {
    await controller?.stop();
    controller = undefined;
    await fleet?.stop();
    fleet = undefined;
    for (const ns of namespaces.splice(0)) kube.kubectl(['-n', ns, 'delete', 'dbc', '--all', '--wait=true']);
  });

  /** A Deployment of `replicas` opted-in pods on a connection with `limit`, its fleet, and the controller. */
  /** `readsTables: false`: pods as an older injector left them, switched onto the table once their sidecar says it reads it; `statusDelayMs`: how long statuses may lag the channel. */
  async function setUp(prefix: string, replicas: number, limit: number, channel = true, readsTables = true, statusDelayMs?: number): Promise<{ namespace: string; registry: Registry; receiver: AcknowledgementReceiver | undefined }> {
    const namespace = freshNamespace(prefix);
    namespaces.push(namespace);
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password, readsTables });
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders', namespace },
      spec: { database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' } }, consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } }], maxConnections: limit, reserve: 0 },
    }));
    fleet = new SidecarFleetDouble(kube, namespace, NO_HEARTBEAT_MS, statusDelayMs);
    await fleet.start();
    const started = await startController(kube, pino({ level: 'silent' }), { channel });
    controller = started.controller;
    return { namespace, registry: started.registry, receiver: started.receiver };
  }

  /** A namespace with `replicas` pods on a connection limited to 12, and its fleet (`statusDelayMs`: how long statuses may lag the channel). */
  async function setUpForReplicas(prefix: string, replicas: number, statusDelayMs?: number): Promise<{ namespace: string; sampler: Sampler }> {
    const namespace = freshNamespace(prefix);
    namespaces.push(namespace);
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders', namespace },
      spec: { database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' } }, consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } }], maxConnections: 12, reserve: 0 },
    }));
    fleet = new SidecarFleetDouble(kube, namespace, NO_HEARTBEAT_MS, statusDelayMs);
    await fleet.start();
    return { namespace, sampler: new Sampler([fleet], ([members]) => reserved(members!)) };
  }

  const settled = (namespace: string, pods: number): boolean => {
    const s = connections.get(namespace, 'orders')?.status;
    return s?.pods === pods && s.conditions?.find((c) => c.type === 'Ready')?.reason === 'Allocated';
  };
  const tableGrants = (namespace: string): string => {
    const t = tables.get(namespace, 'orders')?.spec;
    return t ? `${t.perPod}/${(t.exceptions ?? []).length}/${t.perPodSince ?? '-'}` : '';
  };

  it('counts acknowledgements sent to the leader at once, the statuses following within a second; within the limit throughout', async function () {
    const { namespace, registry } = await setUp('ack-fast', 4, 40);
    const sampler = new Sampler([fleet!], ([members]) => reserved(members!));
    try {
      // Created on the table, each sidecar first answers over the channel (the controller learns it reads tables), then it is grown.
      await eventually('4 pods at 10, settled', () => settled(namespace, 4) && tableGrants(namespace) === '10/0/-');
      const table = tables.get(namespace, 'orders')!.spec;
      assert.match(table.acknowledgeTo ?? '', /^http:\/\/127\.0\.0\.1:\d+\/[\w-]+$/);
      assert.equal(table.recordsChanges, true);
      const acceptedBefore = await counter(registry, 'accepted');

      // Twice the pods: every old pod shrinks to 5, then the new ones grow, only after the shrinks were acknowledged.
      kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=8']);
      await eventually('8 pods at 5, settled, the table clear of changes in flight', () => settled(namespace, 8) && tableGrants(namespace) === '5/0/-', 60_000);
      const accepted = (await counter(registry, 'accepted')) - acceptedBefore;
      assert.ok(accepted >= 8, `acknowledgements accepted over the channel: ${accepted}`);
      // The statuses follow within the table's statusDelaySeconds (8 pods: 1 s), long before a heartbeat would.
      assert.equal(tables.get(namespace, 'orders')?.spec.statusDelaySeconds, 1);
      await eventually('every PoolMember status to show 5', () => {
        const stored = (JSON.parse(kube.kubectl(['-n', namespace, 'get', 'poolmembers', '-o', 'json'])) as { items: PoolMember[] }).items;
        return stored.length === 8 && stored.every((m) => m.status?.acknowledgedConnections === 5);
      }, 15_000);
      for (const m of fleet!.members()) {
        assert.equal(m.spec.acknowledgementKey?.length, 43, `${m.metadata.name} has its key`);
        // The injector's annotation: created on the table with its key, one write, never switched after.
        assert.ok(m.spec.tableFrom !== undefined && m.metadata.generation === 1, `${m.metadata.name} created on the table: tableFrom ${m.spec.tableFrom}, generation ${m.metadata.generation}`);
      }
    } finally {
      sampler.stop();
    }
    assert.ok(sampler.samples > 10, 'the sampler ran');
    // Counted from what is durable only (tables, statuses): the table records which acknowledgements the controller used.
    assert.ok(sampler.max <= 40, `reserved peaked at ${sampler.max} > limit 40: ${sampler.maxState}`);
  });

  it('a sidecar created on its table answers first over the channel: its pod is grown before any status is written', async function () {
    // Statuses lag the channel by up to two minutes here, so any status seen was written before the grow.
    const { namespace, registry } = await setUp('ack-first', 2, 20, true, true, 120_000);
    await eventually('2 pods at 10, settled', () => settled(namespace, 2) && tableGrants(namespace) === '10/0/-');
    kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=4']);
    await eventually('4 pods at 5, settled', () => settled(namespace, 4) && tableGrants(namespace) === '5/0/-', 60_000);
    const stored = (JSON.parse(kube.kubectl(['-n', namespace, 'get', 'poolmembers', '-o', 'json'])) as { items: PoolMember[] }).items;
    assert.equal(stored.length, 4);
    for (const m of stored) assert.equal(m.status, undefined, `${m.metadata.name} wrote a status before it was grown: ${JSON.stringify(m.status)}`);
    // Each pod: its first answer at 0, its grow; the first two: their shrink.
    const accepted = await counter(registry, 'accepted');
    assert.ok(accepted >= 10, `acknowledgements accepted over the channel: ${accepted}`);
  });

  it('refuses forged, malformed and unknown acknowledgements, naming what is wrong', async function () {
    const { namespace, registry } = await setUp('ack-forged', 2, 20);
    await eventually('2 pods at 10, settled', () => settled(namespace, 2) && tableGrants(namespace) === '10/0/-');
    const to = tables.get(namespace, 'orders')!.spec.acknowledgeTo!;
    const member = fleet!.members()[0]!;
    const ack: ChannelAcknowledgement = {
      namespace, pod: member.metadata.name!, podUid: member.metadata.ownerReferences![0]!.uid,
      tableGeneration: 1_000_000, generation: 1, connections: 0, held: 0,
    };
    const forged = await post(to, JSON.stringify({ ...ack, signature: signAcknowledgement(ack, 'A'.repeat(43)) }));
    assert.equal(forged.status, 401);
    assert.match(forged.body, /signature does not match/);
    const malformed = await post(to, JSON.stringify({ ...ack, connections: -1, signature: 'x' }));
    assert.equal(malformed.status, 400);
    assert.match(malformed.body, /connections must be a non-negative integer/);
    const garbage = await post(to, '{"namespace":');
    assert.equal(garbage.status, 400);
    const stranger = await post(to, JSON.stringify({ ...ack, pod: 'no-such-pod', signature: signAcknowledgement(ack, member.spec.acknowledgementKey!) }));
    assert.equal(stranger.status, 409);
    // A new pod under the same name (another UID) may not use the old one's acknowledgement.
    const otherUid = { ...ack, podUid: 'another-uid' };
    assert.equal((await post(to, JSON.stringify({ ...otherUid, signature: signAcknowledgement(otherUid, member.spec.acknowledgementKey!) }))).status, 409);
    assert.equal(await counter(registry, 'rejected'), 1);
    // The forged "holds nothing" changed nothing: both pods still count their 10.
    await new Promise((r) => setTimeout(r, 1_000));
    assert.equal(connections.get(namespace, 'orders')?.status?.allocated, 20);
  });

  it('a new leader is named in the tables, hears the acknowledgements again and rebalances; what is durable stays within the limit across the change', async function () {
    const { namespace, sampler } = await setUpForReplicas('ack-ha', 2);
    const replica = (identity: string): Promise<RunningController> => startControllerBinary({
      apiServer: kube.kubeConfig(), namespace, identity, metricsPort: 0, metricsHost: '127.0.0.1', leaderElection: true, repair: 'off', manageSidecarAccess: false,
      acknowledgements: { host: '127.0.0.1', port: 0, advertise: '127.0.0.1' },
    }, pino({ level: 'silent' }));
    const a = await replica('a');
    const b = await replica('b');
    const leaderOf = async (r: RunningController): Promise<boolean> => /^poolkeeper_controller_leader 1$/m.test(await r.registry.metrics());
    try {
      await eventually('2 pods at 6, settled', () => settled(namespace, 2) && tableGrants(namespace) === '6/0/-');
      await eventually('one leader', async () => (await leaderOf(a)) !== (await leaderOf(b)));
      const [leader, standby] = (await leaderOf(a)) ? [a, b] : [b, a];
      assert.ok(tables.get(namespace, 'orders')?.spec.acknowledgeTo?.startsWith(`${leader.acknowledgeTo}/`));
      await leader.shutdown();
      // Three pods: the two old ones shrink to 4, acknowledged to the new leader only (no heartbeat comes), then the new one grows.
      kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=3']);
      await eventually('the standby leads, named in the table, and the three pods settle at 4', async () => (await leaderOf(standby)) && tables.get(namespace, 'orders')?.spec.acknowledgeTo?.startsWith(`${standby.acknowledgeTo}/`) === true && settled(namespace, 3) && tableGrants(namespace) === '4/0/-', 60_000);
      assert.ok((await counter(standby.registry, 'accepted')) >= 2, 'the new leader heard the acknowledgements');
    } finally {
      sampler.stop();
      await a.shutdown();
      await b.shutdown();
    }
    assert.ok(sampler.max <= 12, `reserved peaked at ${sampler.max} > limit 12: ${sampler.maxState}`);
  });

  it('a replica that loses and regains its Lease names a new term in the tables and hears every acknowledgement again', async function () {
    // Statuses lag the channel for the whole test: what the replica heard, it heard only over the channel.
    const { namespace, sampler } = await setUpForReplicas('ack-flap', 3, NO_HEARTBEAT_MS);
    const replica = await startControllerBinary({
      apiServer: kube.kubeConfig(), namespace, identity: 'only', metricsPort: 0, metricsHost: '127.0.0.1', leaderElection: true, repair: 'off', manageSidecarAccess: false,
      acknowledgements: { host: '127.0.0.1', port: 0, advertise: '127.0.0.1' },
      lease: { leaseDurationMs: 3_000, renewDeadlineMs: 2_000, retryPeriodMs: 300 },
    }, pino({ level: 'silent' }));
    const leading = async (): Promise<boolean> => /^poolkeeper_controller_leader 1$/m.test(await replica.registry.metrics());
    const named = (): string => tables.get(namespace, 'orders')?.spec.acknowledgeTo ?? '';
    try {
      await eventually('3 pods at 4, settled', () => settled(namespace, 3) && tableGrants(namespace) === '4/0/-');
      const firstTerm = named();
      const generation = tables.get(namespace, 'orders')?.spec.generation;
      const heard = await counter(replica.registry, 'accepted');
      // Another holder takes the Lease for longer than the renew deadline: the replica stops leading and forgets what it heard.
      const lease = JSON.parse(kube.kubectl(['-n', namespace, 'get', 'lease', 'poolkeeper-controller', '-o', 'json'])) as { spec: Record<string, unknown> };
      lease.spec = { ...lease.spec, holderIdentity: 'intruder', renewTime: new Date().toISOString().replace('Z', '000Z'), leaseDurationSeconds: 5 };
      kube.kubectl(['replace', '-f', '-'], JSON.stringify(lease));
      await eventually('the replica stops leading', async () => !(await leading()), 20_000);
      await eventually('it leads again once the Lease expires, under a new term named in the table', async () => (await leading()) && named() !== firstTerm && named().startsWith(`${replica.acknowledgeTo}/`), 30_000);
      // No grant changed, no status followed: every sidecar sent its acknowledgement again because the table names a new address.
      // A sidecar whose first try is refused or times out (a loaded machine) writes its status instead and tries the channel again only after CHANNEL_RETRY_MS (30 s).
      await eventually('each sidecar acknowledged again to the new term', async () => (await counter(replica.registry, 'accepted')) >= heard + 3, 45_000);
      assert.equal(tables.get(namespace, 'orders')?.spec.generation, generation, 'the grants did not change');
      kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=4']);
      await eventually('four pods at 3, settled', () => settled(namespace, 4) && tableGrants(namespace) === '3/0/-', 60_000);
    } finally {
      sampler.stop();
      await replica.shutdown();
    }
    assert.ok(sampler.max <= 12, `reserved peaked at ${sampler.max} > limit 12: ${sampler.maxState}`);
  });

  it('falls back to the PoolMember status when the channel does not answer', async function () {
    // Pods as an older injector left them: switched onto the table once their sidecar said it reads it.
    const { namespace, receiver } = await setUp('ack-down', 2, 20, true, false);
    await eventually('2 pods at 10, settled', () => settled(namespace, 2) && tableGrants(namespace) === '10/0/-');
    // The leader's endpoint goes away (a crashed process keeps its address in the table until a new leader writes its own).
    await receiver!.close();
    kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=4']);
    await eventually('4 pods at 5, settled', () => settled(namespace, 4) && tableGrants(namespace) === '5/0/-', 60_000);
    const statuses = fleet!.members().map((m) => m.status?.acknowledgedConnections).join();
    assert.equal(statuses, '5,5,5,5', 'every sidecar wrote its acknowledgement into its status');
    for (const m of fleet!.members()) assert.ok(m.spec.tableFrom !== undefined && (m.metadata.generation ?? 0) > 1, `${m.metadata.name} switched onto the table`);
  });
});
