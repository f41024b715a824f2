/**
 * Start-up and leadership of the controller on the real API server, through
 * a front that refuses connections, answers 429/503, or passes through:
 * start-up retries (one log line per failure, no crash), watches resume at
 * once after an outage, the Lease is released only after in-flight
 * reconciles end and a standby takes over within 2 s, a deposed leader's
 * grant write fails its resourceVersion precondition, and Events never block.
 */
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import pino from 'pino';
import { Registry } from 'prom-client';
import type { PoolGrant, PoolMember } from '../../src/api/index.ts';
import { BudgetController } from '../../src/controller/controller.ts';
import { LimitDiscovery, type DiscoveryTarget } from '../../src/controller/limit-discovery.ts';
import { ControllerMetrics } from '../../src/controller/metrics.ts';
import type { ServerSettings } from '../../src/core/budget/index.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { EventRecorder } from '../../src/kube/events.ts';
import { KubeHttp } from '../../src/kube/http.ts';
import { Informer, type KubeObject } from '../../src/kube/informer.ts';
import { LeaderElector } from '../../src/kube/leader-election.ts';
import { ApiFront } from '../support/api-front.ts';
import { SidecarFleetDouble, createWorkload, eventually, freshNamespace, installCrds, startController } from '../support/budget-fixture.ts';
import { testEnvironment } from '../support/hooks.ts';

/** Log records as parsed JSON, and the raw lines. */
function capturingLogger(): { logger: pino.Logger; lines: string[] } {
  const lines: string[] = [];
  let partial = '';
  const stream = new Writable({
    write(chunk: Buffer, _enc, done) {
      partial += chunk.toString('utf8');
      let newline = partial.indexOf('\n');
      while (newline >= 0) {
        lines.push(partial.slice(0, newline));
        partial = partial.slice(newline + 1);
        newline = partial.indexOf('\n');
      }
      done();
    },
  });
  return { logger: pino({ level: 'info' }, stream), lines };
}

function dbc(namespace: string, postgres: PostgresServer, extra: Record<string, unknown>): string {
  return JSON.stringify({
    apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders', namespace },
    spec: {
      database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' } },
      consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } }],
      ...extra,
    },
  });
}

function grants(members: readonly PoolMember[]): string {
  return members.map((m) => m.spec.grant.connections).sort((a, b) => a - b).join();
}

describe('controller start-up and leadership', function () {
  let kube: KubeControlPlane;
  let postgres: PostgresServer;
  const cleanups: Array<() => Promise<void> | void> = [];
  const namespaces: string[] = [];

  before(async function () {
    [kube, postgres] = await Promise.all([testEnvironment().kube(), testEnvironment().postgres()]);
    await installCrds(kube);
  });

  afterEach(async function () {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
    for (const ns of namespaces.splice(0)) kube.kubectl(['-n', ns, 'delete', 'dbc', '--all', '--wait=true']);
  });

  const namespaceFor = (prefix: string): string => {
    const ns = freshNamespace(prefix);
    namespaces.push(ns);
    return ns;
  };

  it('starts while the API server refuses connections, then answers 429 and 503: retries, one log line per failure, syncs when it answers', async function () {
    const front = new ApiFront(kube.server);
    await front.start();
    cleanups.push(() => front.stop());
    const { logger, lines } = capturingLogger();
    const http = new KubeHttp(front.kubeConfig(kube.kubeConfig()));
    const elector = new LeaderElector(http, { namespace: 'default', name: `startup-${freshNamespace('l')}`, identity: 'a', logger, retryPeriodMs: 500 });
    const controller = new BudgetController({
      http, logger, metrics: new ControllerMetrics(new Registry()), elector,
      reconciler: { discovery: new LimitDiscovery({ logger }), events: new EventRecorder(http, 'test', logger) },
    });
    cleanups.push(() => controller.stop());
    let startError: unknown;
    const started = controller.start().catch((err: unknown) => {
      startError = err;
    });
    await new Promise((r) => setTimeout(r, 1500));
    await front.set('stub', [429, 503]);
    await eventually('429 and 503 answered', () => front.stubbed >= 4);
    await new Promise((r) => setTimeout(r, 1000));
    assert.equal(controller.ready, false);
    const upAt = Date.now();
    await front.set('up');
    await started;
    const syncSeconds = (Date.now() - upAt) / 1000;
    assert.equal(startError, undefined, 'start() never throws');
    assert.equal(controller.ready, true);
    assert.ok(syncSeconds < 3, `synced ${syncSeconds}s after the API server answered`);
    const failures = lines.map((l) => JSON.parse(l) as { msg: string; error?: string; stack?: unknown; err?: unknown }).filter((r) => /failed; retrying/.test(r.msg));
    assert.ok(failures.some((r) => /ECONNREFUSED/.test(r.error ?? '')), 'connection refused logged');
    assert.ok(failures.some((r) => /429 TooManyRequests: storage is \(re\)initializing/.test(r.error ?? '')), '429 logged');
    assert.ok(failures.some((r) => /503/.test(r.error ?? '')), '503 logged');
    for (const line of lines) assert.doesNotMatch(line, /"stack"|\\n\s+at /, `no stack trace: ${line}`);
    console.log(`      synced ${syncSeconds.toFixed(2)} s after the API server answered; ${failures.length} one-line failure logs`);
  });

  // POOLKEEPER_OUTAGE_SECONDS=65 reproduces a long outage (the default keeps the suite short).
  const outageSeconds = Number(process.env.POOLKEEPER_OUTAGE_SECONDS ?? 10);

  it(`resumes watches at once after a ${outageSeconds} s API outage: a limit change lands within 3 s of the server answering`, async function () {
    this.timeout(120_000 + outageSeconds * 1000);
    const namespace = namespaceFor('outage');
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 2, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['apply', '-f', '-'], dbc(namespace, postgres, { maxConnections: 10, reserve: 0 }));
    const fleet = new SidecarFleetDouble(kube, namespace);
    cleanups.push(() => fleet.stop());
    await fleet.start();
    const front = new ApiFront(kube.server);
    await front.start();
    cleanups.push(() => front.stop());
    await front.set('up');
    const viaFront = { ...kube, kubeConfig: () => front.kubeConfig(kube.kubeConfig()) } as unknown as KubeControlPlane;
    const { controller } = await startController(viaFront);
    cleanups.push(() => controller.stop());
    await eventually('2 pods at 5', () => grants(fleet.members()) === '5,5');
    await front.set('down');
    await new Promise((r) => setTimeout(r, outageSeconds * 1000));
    await front.set('up');
    const upAt = Date.now();
    kube.kubectl(['-n', namespace, 'patch', 'dbc', 'orders', '--type=merge', '-p', '{"spec":{"maxConnections":16}}']);
    await eventually('2 pods at 8', () => grants(fleet.members()) === '8,8', 30_000);
    const seconds = (Date.now() - upAt) / 1000;
    console.log(`      limit change applied ${seconds.toFixed(2)} s after a ${outageSeconds} s outage ended`);
    assert.ok(seconds < 3, `took ${seconds}s`);
  });

  it('releases the Lease only after the in-flight reconcile ends; a standby then takes over in < 2 s', async function () {
    const namespace = namespaceFor('release');
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['apply', '-f', '-'], dbc(namespace, postgres, { maxConnections: 'auto', reserve: 0 }));
    const http = new KubeHttp(kube.kubeConfig());
    const logger = pino({ level: 'silent' });
    const lease = `release-${namespace}`;
    // A limit lookup that blocks until the test lets it go: a reconcile in flight.
    let entered = false;
    let releaseDiscovery = (): void => undefined;
    const gate = new Promise<void>((resolve) => {
      releaseDiscovery = resolve;
    });
    const blocking = {
      check: async (_t: DiscoveryTarget): Promise<ServerSettings> => {
        entered = true;
        await gate;
        return { maxConnections: 20, superuserReservedConnections: 0 };
      },
      remember: () => undefined,
    } as unknown as LimitDiscovery;
    const elector = new LeaderElector(http, { namespace, name: lease, identity: 'leader', logger });
    const controller = new BudgetController({ http, logger, metrics: new ControllerMetrics(new Registry()), elector, reconciler: { discovery: blocking, events: new EventRecorder(http, 'test', logger) } });
    await controller.start();
    await eventually('the reconcile to be in flight', () => entered);
    const standby = new LeaderElector(http, { namespace, name: lease, identity: 'standby', logger });
    standby.start();
    cleanups.push(() => standby.stop());
    const stopping = controller.stop();
    await new Promise((r) => setTimeout(r, 1000));
    const holder = (): string => kube.kubectl(['-n', namespace, 'get', 'lease', lease, '-o', 'jsonpath={.spec.holderIdentity}']).trim();
    assert.equal(holder(), 'leader', 'the Lease stays held while a reconcile is in flight');
    assert.equal(standby.isLeader, false);
    releaseDiscovery();
    await stopping;
    const releasedAt = Date.now();
    await eventually('the standby to lead', () => standby.isLeader, 10_000);
    const seconds = (Date.now() - releasedAt) / 1000;
    console.log(`      standby took over ${seconds.toFixed(2)} s after the leader stopped`);
    assert.ok(seconds < 2, `took ${seconds}s`);
  });

  it('a grant write from a stale view (a deposed leader) fails its resourceVersion precondition', async function () {
    const namespace = namespaceFor('deposed');
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 2, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['apply', '-f', '-'], dbc(namespace, postgres, { maxConnections: 12, reserve: 0 }));
    const fleet = new SidecarFleetDouble(kube, namespace);
    cleanups.push(() => fleet.stop());
    await fleet.start();
    const { controller, registry } = await startController(kube);
    cleanups.push(() => controller.stop());
    await eventually('2 pods at 6', () => grants(fleet.members()) === '6,6');
    // The sidecars read grant tables: this replica stops seeing the PoolGrant; another writer (the new leader) changes it.
    await eventually('both pods on the table', () => fleet.members().every((m) => m.spec.tableFrom !== undefined));
    await controller.caches.grants?.stop();
    const table = JSON.parse(kube.kubectl(['-n', namespace, 'get', 'poolgrant', 'orders', '-o', 'json'])) as PoolGrant;
    const generation = table.spec.generation + 5;
    kube.kubectl(['-n', namespace, 'patch', 'poolgrant', 'orders', '--type=merge', '-p', JSON.stringify({ spec: { generation, perPod: 2, exceptions: [] } })]);
    kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=3']);
    await eventually('a conflict', async () => /poolkeeper_reconcile_errors_total\{reason="GrantConflictError"\} [1-9]/.test(await registry.metrics()), 20_000);
    const after = JSON.parse(kube.kubectl(['-n', namespace, 'get', 'poolgrant', 'orders', '-o', 'json'])) as PoolGrant;
    assert.equal(after.spec.perPod, 2, 'the stale write did not land');
    assert.equal(after.spec.generation, generation);
  });

  it('records Events without blocking, even when the API server does not answer', async function () {
    const front = new ApiFront(kube.server);
    await front.start();
    cleanups.push(() => front.stop());
    await front.set('up');
    const http = new KubeHttp(front.kubeConfig(kube.kubeConfig()));
    const recorder = new EventRecorder(http, 'test', pino({ level: 'silent' }));
    await front.set('down');
    const object = { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'x', namespace: 'default', uid: 'u' } };
    const started = process.hrtime.bigint();
    for (let i = 0; i < 50; i++) await recorder.record(object, 'Normal', 'Test', `event ${i}`);
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    assert.ok(ms < 50, `50 records took ${ms} ms`);
    await recorder.flush();
  });

  it('a connection informer on a CRD not installed yet syncs once it is', async function () {
    const http = new KubeHttp(kube.kubeConfig());
    const group = `t${freshNamespace('g').replace(/-/g, '')}.example.com`;
    const informer = new Informer<KubeObject>(http, { path: `/apis/${group}/v1/widgets`, logger: pino({ level: 'silent' }), maxRetryMs: 1000 });
    cleanups.push(() => informer.stop());
    let synced = false;
    void informer.start().then(() => {
      synced = true;
    });
    await eventually('a failed list', () => informer.stats.failures >= 1);
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'apiextensions.k8s.io/v1', kind: 'CustomResourceDefinition', metadata: { name: `widgets.${group}` },
      spec: { group, scope: 'Namespaced', names: { kind: 'Widget', plural: 'widgets' }, versions: [{ name: 'v1', served: true, storage: true, schema: { openAPIV3Schema: { type: 'object', 'x-kubernetes-preserve-unknown-fields': true } } }] },
    }));
    cleanups.push(() => void kube.kubectl(['delete', 'crd', `widgets.${group}`, '--wait=false']));
    await eventually('synced', () => synced, 20_000);
  });
});
