/**
 * The reconciler's write path against an in-memory API: grant writes go out
 * with bounded concurrency, every shrink of a pass before any grow; a PoolMember
 * already garbage-collected is skipped; a cache behind the controller's own
 * writes causes no second write; orphans are deleted concurrently.
 */
import assert from 'node:assert/strict';
import pino from 'pino';
import { Registry } from 'prom-client';
import { CONNECTION_LABEL, type DatabaseConnection, type DatabaseServer, type PoolMember } from '../../src/api/index.ts';
import { ControllerMetrics } from '../../src/controller/metrics.ts';
import type { PodObject } from '../../src/controller/plan-input.ts';
import { ServerReconciler, type ControllerCaches, type SecretObject, type WorkloadObject, type HpaObject } from '../../src/controller/reconciler.ts';
import { ServerDirectory } from '../../src/controller/server-directory.ts';
import type { LimitDiscovery } from '../../src/controller/limit-discovery.ts';
import { credentialsGeneration } from '../../src/core/credentials.ts';
import type { EventRecorder } from '../../src/kube/events.ts';
import { KubeApiError, type KubeHttp } from '../../src/kube/http.ts';
import type { Informer, KubeObject } from '../../src/kube/informer.ts';

const NS = 'shop';
const POOL = { mode: 'transaction', poolTimeout: 30, poolRecycle: 3600, poolPrePing: true, idleTimeout: 600 } as const;
const DATABASE = { host: '127.0.0.1', port: 5432, dbname: 'app', sslMode: 'disable' } as const;

function connection(limit: number): DatabaseConnection & KubeObject {
  return {
    apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection',
    metadata: { name: 'orders', namespace: NS, generation: 1, creationTimestamp: new Date(0) },
    spec: {
      database: { ...DATABASE, credentialsSecretRef: { name: 'db', usernameKey: 'username', passwordKey: 'password' } },
      maxConnections: limit, reserve: 0,
      consumers: [{ name: 'web', selector: { matchLabels: { app: 'web' } }, weight: 1, minPerPod: 1, processesPerPod: 1 }],
      pool: { ...POOL },
    },
  } as unknown as DatabaseConnection & KubeObject;
}

function pod(i: number): PodObject & KubeObject {
  return { metadata: { name: `web-${i}`, namespace: NS, uid: `uid-${i}`, labels: { [CONNECTION_LABEL]: 'orders', app: 'web' } }, status: { phase: 'Running', conditions: [{ type: 'Ready', status: 'True' }] } };
}

/** A PoolMember granted `connections` at generation 1 and acknowledged. */
function member(i: number, connections: number): PoolMember & KubeObject {
  return {
    apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'PoolMember',
    metadata: { name: `web-${i}`, namespace: NS, resourceVersion: '1', labels: { [CONNECTION_LABEL]: 'orders' }, ownerReferences: [{ apiVersion: 'v1', kind: 'Pod', name: `web-${i}`, uid: `uid-${i}`, controller: true }] },
    spec: { connection: 'orders', grant: { connections, generation: 1 }, processesPerPod: 1, credentialsGeneration: credentialsGeneration({ username: 'app', password: 'secret' }), database: { ...DATABASE }, pool: { ...POOL }, drain: false },
    status: { acknowledgedGeneration: 1, acknowledgedConnections: connections, heldConnections: connections, drained: false },
  };
}

function cache<T extends KubeObject>(items: () => T[]): Informer<T> {
  return { list: items, get: (namespace: string | undefined, name: string) => items().find((o) => o.metadata?.namespace === namespace && o.metadata?.name === name) } as unknown as Informer<T>;
}

interface Write { method: 'create' | 'patch' | 'delete'; name: string; connections?: number; start: number; end: number }

/** An API server of PoolMembers only: records every write, with a few ms of latency each. */
class FakeApi {
  readonly stored = new Map<string, PoolMember>();
  readonly writes: Write[] = [];
  inFlight = 0;
  maxInFlight = 0;
  private clock = 0;

  private async timed<T>(write: Omit<Write, 'start' | 'end'>, body: () => T): Promise<T> {
    this.inFlight += 1;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    const entry: Write = { ...write, start: (this.clock += 1), end: 0 };
    try {
      await new Promise((resolve) => setTimeout(resolve, 2));
      return body();
    } finally {
      this.inFlight -= 1;
      entry.end = (this.clock += 1);
      this.writes.push(entry);
    }
  }

  private static notFound(): Error {
    return new KubeApiError(404, 'NotFound', 'not found');
  }

  readonly http = {
    create: (_path: string, body: PoolMember) => this.timed({ method: 'create', name: body.metadata.name ?? '', connections: body.spec.grant.connections }, () => {
      const created = { ...body, metadata: { ...body.metadata, resourceVersion: '2' } };
      this.stored.set(body.metadata.name ?? '', created);
      return created;
    }),
    patch: (path: string, body: { spec?: PoolMember['spec'] }) => {
      if (path.includes('/databaseconnections/')) return Promise.resolve({});
      const name = path.split('/poolmembers/')[1]?.split('/')[0] ?? '';
      return this.timed({ method: 'patch', name, connections: body.spec?.grant.connections }, () => {
        const current = this.stored.get(name);
        if (!current) throw FakeApi.notFound();
        const next = { ...current, spec: body.spec ? { ...current.spec, ...body.spec } : current.spec, metadata: { ...current.metadata, resourceVersion: String(Number(current.metadata.resourceVersion) + 1) } };
        this.stored.set(name, next);
        return next;
      });
    },
    delete: (path: string) => {
      const name = path.split('/poolmembers/')[1] ?? '';
      return this.timed({ method: 'delete', name }, () => {
        if (!this.stored.delete(name)) throw FakeApi.notFound();
        return {};
      });
    },
  };
}

function reconcilerFor(api: FakeApi, limit: number, pods: Array<PodObject & KubeObject>, members: () => Array<PoolMember & KubeObject>): ServerReconciler {
  const secret: SecretObject = { metadata: { name: 'db', namespace: NS }, data: { username: Buffer.from('app').toString('base64'), password: Buffer.from('secret').toString('base64') } };
  const caches: ControllerCaches = {
    connections: cache(() => [connection(limit)]),
    pods: cache(() => pods),
    members: cache(members),
    secrets: cache(() => [secret]),
    deployments: cache<WorkloadObject>(() => []),
    statefulSets: cache<WorkloadObject>(() => []),
    hpas: cache<HpaObject>(() => []),
    servers: cache<DatabaseServer & KubeObject>(() => []),
    namespaces: cache<KubeObject>(() => []),
  };
  const discovery = { check: () => Promise.resolve({ maxConnections: 100_000, superuserReservedConnections: 0 }), remember: () => undefined } as unknown as LimitDiscovery;
  return new ServerReconciler({
    http: api.http as unknown as KubeHttp,
    caches, discovery,
    events: { record: () => Promise.resolve() } as unknown as EventRecorder,
    metrics: new ControllerMetrics(new Registry()),
    logger: pino({ level: 'silent' }),
    directory: new ServerDirectory({ resolver: (host) => Promise.resolve([host]) }),
  });
}

async function reconcileOnce(reconciler: ServerReconciler): Promise<void> {
  await reconciler.refreshDirectory();
  const [server] = reconciler.serverKeys();
  assert.ok(server);
  await reconciler.reconcile(server);
}

describe('reconciler writes', function () {
  it('writes grants concurrently (at most 32 at once), every shrink of a pass finished before the first grow starts', async function () {
    // 100 pods, limit 300 (3 each): 50 hold 4 (shrink to 3), 50 hold 1; the 50 freed
    // only once the shrinks are acknowledged, so this pass grows 25 pods with the 50 free now.
    const api = new FakeApi();
    const pods = Array.from({ length: 100 }, (_, i) => pod(i));
    const members = pods.map((_, i) => member(i, i < 50 ? 4 : 1));
    for (const m of members) api.stored.set(m.metadata.name ?? '', m);
    await reconcileOnce(reconcilerFor(api, 300, pods, () => members));
    const patches = api.writes.filter((w) => w.method === 'patch');
    const shrinks = patches.filter((w) => w.connections === 3 && Number(w.name.slice(4)) < 50);
    const grows = patches.filter((w) => Number(w.name.slice(4)) >= 50);
    assert.equal(shrinks.length, 50);
    assert.equal(grows.length, 25);
    assert.ok(Math.max(...shrinks.map((w) => w.end)) < Math.min(...grows.map((w) => w.start)), 'a grow started before every shrink had been written');
    assert.ok(api.maxInFlight > 1 && api.maxInFlight <= 32, `${api.maxInFlight} writes in flight at most`);
  });

  it('skips a PoolMember that is gone (404 on its PATCH) and writes the others', async function () {
    const api = new FakeApi();
    const pods = Array.from({ length: 10 }, (_, i) => pod(i));
    const members = pods.map((_, i) => member(i, 1));
    for (const m of members) api.stored.set(m.metadata.name ?? '', m);
    // The garbage collector got to web-3 after the cache last showed it.
    api.stored.delete('web-3');
    await reconcileOnce(reconcilerFor(api, 30, pods, () => members));
    const written = api.writes.filter((w) => w.method === 'patch' && w.end > 0).map((w) => w.name);
    assert.equal(new Set(written).size, 10, 'every pod was tried');
    assert.deepEqual([...api.stored.values()].map((m) => m.spec.grant.connections), Array.from({ length: 9 }, () => 3));
  });

  it('does not write a grant again while the cache has not caught up with its own write', async function () {
    const api = new FakeApi();
    const pods = Array.from({ length: 10 }, (_, i) => pod(i));
    const members = pods.map((_, i) => member(i, 1));
    for (const m of members) api.stored.set(m.metadata.name ?? '', m);
    // The cache keeps showing generation 1 (its watch is behind).
    const reconciler = reconcilerFor(api, 30, pods, () => members);
    await reconcileOnce(reconciler);
    assert.equal(api.writes.length, 10);
    await reconcileOnce(reconciler);
    await reconcileOnce(reconciler);
    assert.equal(api.writes.length, 10, 'no write repeated from the stale cache');
    // A new pod's PoolMember, created but not yet in the cache, is not created twice.
    const more = [...pods, pod(10)];
    const second = reconcilerFor(api, 33, more, () => members);
    await reconcileOnce(second);
    const creates = api.writes.filter((w) => w.method === 'create').length;
    await reconcileOnce(second);
    assert.equal(api.writes.filter((w) => w.method === 'create').length, creates);
    assert.equal(creates, 1);
  });

  it('deletes the PoolMembers of vanished pods concurrently, at most 32 at once', async function () {
    const api = new FakeApi();
    const pods = Array.from({ length: 10 }, (_, i) => pod(i));
    const members = Array.from({ length: 200 }, (_, i) => member(i, i < 10 ? 3 : 1));
    for (const m of members) api.stored.set(m.metadata.name ?? '', m);
    await reconcileOnce(reconcilerFor(api, 30, pods, () => members));
    assert.equal(api.writes.filter((w) => w.method === 'delete').length, 190);
    assert.equal(api.stored.size, 10);
    assert.ok(api.maxInFlight > 1 && api.maxInFlight <= 32, `${api.maxInFlight} writes in flight at most`);
  });

  it('leaves the PoolMembers of pods seen deleted to the garbage collector, and deletes those of pods it did not see go', async function () {
    const api = new FakeApi();
    const pods = Array.from({ length: 10 }, (_, i) => pod(i));
    const members = Array.from({ length: 20 }, (_, i) => member(i, i < 10 ? 3 : 1));
    for (const m of members) api.stored.set(m.metadata.name ?? '', m);
    const reconciler = reconcilerFor(api, 30, pods, () => members);
    // A scale-down: the API server deleted pods 10-14 (their last state carries a deletionTimestamp).
    for (let i = 10; i < 15; i += 1) reconciler.podDeleted({ ...pod(i), metadata: { ...pod(i).metadata, deletionTimestamp: new Date().toISOString() } });
    await reconcileOnce(reconciler);
    const deleted = api.writes.filter((w) => w.method === 'delete').map((w) => w.name).sort();
    assert.deepEqual(deleted, ['web-15', 'web-16', 'web-17', 'web-18', 'web-19'], 'only the PoolMembers of pods not seen deleted (say, relabelled)');
  });

  it('knows a PoolMember it created before its cache shows it (its sidecar may answer first), and forgets it once the cache does', async function () {
    const api = new FakeApi();
    const pods = [pod(0), pod(1)];
    let members = [member(0, 3)];
    const reconciler = reconcilerFor(api, 6, pods, () => members);
    await reconcileOnce(reconciler);
    const created = reconciler.createdMember(NS, 'web-1');
    assert.equal(created?.metadata.ownerReferences?.[0]?.uid, 'uid-1');
    members = [member(0, 3), created];
    await reconcileOnce(reconciler);
    assert.equal(reconciler.createdMember(NS, 'web-1'), undefined);
  });
});
