/**
 * The budget controller on the real API server and PostgreSQL: grants follow
 * a Deployment's scale, `auto` reads the server, DatabaseConnections on one
 * server share its limit, oversubscription is reported, and a controller
 * restart never lets the total exceed the limit.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import pino from 'pino';
import type { Registry } from 'prom-client';
import { parseAllDocuments } from 'yaml';
import type { DatabaseConnection, PoolMember } from '../../src/api/index.ts';
import { startController as startControllerBinary, type RunningController } from '../../src/bin/controller-main.ts';
import type { BudgetController } from '../../src/controller/controller.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { READS_TABLES_ANNOTATION } from '../../src/core/inject/model.ts';
import { createNamespaceWithSecret } from '../../src/devenv/scenario.ts';
import { KubeHttp } from '../../src/kube/http.ts';
import { Informer, type KubeObject } from '../../src/kube/informer.ts';
import { steadyNow } from '../../src/ops/clock.ts';
import { PoolMemberAgent } from '../../src/sidecar/control-plane.ts';
import { testEnvironment } from '../support/hooks.ts';
import { stepWallClock } from '../support/wall-clock.ts';
import { ObedientSidecarDouble, Sampler, SidecarFleetDouble, createWorkload, eventually, freshNamespace, installCrds, reserved, startController } from '../support/budget-fixture.ts';

function applyConnection(kube: KubeControlPlane, postgres: PostgresServer, namespace: string, name: string, extra: Record<string, unknown>): void {
  kube.kubectl(['apply', '-f', '-'], JSON.stringify({
    apiVersion: 'poolkeeper.dev/v1alpha1',
    kind: 'DatabaseConnection',
    metadata: { name, namespace },
    spec: {
      database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' } },
      consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } }],
      ...extra,
    },
  }));
}

/**
 * DatabaseConnections as a watch sees them. A synchronous kubectl in a poll
 * would block this process, where the controller under test runs.
 */
let connectionCache: Informer<DatabaseConnection & KubeObject> | undefined;

function getConnection(_kube: KubeControlPlane, namespace: string, name: string): DatabaseConnection | undefined {
  return connectionCache?.get(namespace, name);
}

function grants(members: readonly PoolMember[]): number[] {
  return members.map((m) => m.spec.grant.connections).sort((a, b) => a - b);
}

describe('budget controller', function () {
  let kube: KubeControlPlane;
  let postgres: PostgresServer;
  let controller: BudgetController | undefined;
  const fleets: SidecarFleetDouble[] = [];

  before(async function () {
    [kube, postgres] = await Promise.all([testEnvironment().kube(), testEnvironment().postgres()]);
    await installCrds(kube);
    connectionCache = new Informer<DatabaseConnection & KubeObject>(new KubeHttp(kube.kubeConfig()), { path: '/apis/poolkeeper.dev/v1alpha1/databaseconnections', logger: pino({ level: 'silent' }) });
    await connectionCache.start();
  });

  after(async function () {
    await connectionCache?.stop();
  });

  const namespaces: string[] = [];
  const namespaceFor = (prefix: string): string => {
    const name = freshNamespace(prefix);
    namespaces.push(name);
    return name;
  };

  /** A namespace with `replicas` pods of Deployment web drawing on DatabaseConnection orders (`spec`) and their sidecar doubles answering; no controller yet. */
  const ordersFleet = async (prefix: string, replicas: number, spec: Record<string, unknown>): Promise<{ namespace: string; fleet: SidecarFleetDouble }> => {
    const namespace = namespaceFor(prefix);
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    applyConnection(kube, postgres, namespace, 'orders', spec);
    const fleet = new SidecarFleetDouble(kube, namespace);
    fleets.push(fleet);
    await fleet.start();
    return { namespace, fleet };
  };

  /** ordersFleet, and the controller running. */
  const startOrders = async (prefix: string, replicas: number, spec: Record<string, unknown>): Promise<{ namespace: string; fleet: SidecarFleetDouble }> => {
    const started = await ordersFleet(prefix, replicas, spec);
    ({ controller } = await startController(kube));
    return started;
  };

  afterEach(async function () {
    await controller?.stop();
    controller = undefined;
    await Promise.all(fleets.splice(0).map((f) => f.stop()));
    // Every test uses the one PostgreSQL server, whose limit all DatabaseConnections share.
    for (const ns of namespaces.splice(0)) kube.kubectl(['-n', ns, 'delete', 'dbc', '--all', '--wait=true']);
  });

  it('follows a Deployment scaled 2 -> 8 -> 1, never exceeding the limit', async function () {
    // Pods without a node vanish at once here and their doubles never drain: released at once, not held for a lost node.
    const { namespace, fleet } = await startOrders('scale', 2, { maxConnections: 40, reserve: 0, departureHoldSeconds: 0 });
    const sampler = new Sampler([fleet], ([members]) => reserved(members!));
    try {
      await eventually('2 pods at 20 each', () => grants(fleet.members()).join() === '20,20');
      const scaledAt = Date.now();
      kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=8']);
      await eventually('8 pods at 5 each', () => grants(fleet.members()).join() === '5,5,5,5,5,5,5,5');
      const upSeconds = (Date.now() - scaledAt) / 1000;
      kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=1']);
      await eventually('1 pod at 40', () => grants(fleet.members()).join() === '40');
      await eventually('status of 1 settled pod', () => {
        const s = getConnection(kube, namespace, 'orders')?.status;
        return s?.pods === 1 && s.conditions?.find((c) => c.type === 'Ready')?.status === 'True';
      });
      const status = getConnection(kube, namespace, 'orders')?.status;
      assert.equal(status?.pods, 1);
      assert.equal(status?.allocated, 40);
      assert.equal(status?.consumers?.[0]?.perPodBudget, 40);
      assert.equal(status?.conditions?.find((c) => c.type === 'Ready')?.status, 'True');
      assert.ok(upSeconds < 30, `scale-up converged in ${upSeconds}s`);
      // A small fleet beats at the base interval; the table tells its sidecars so.
      assert.equal(kube.kubectl(['-n', namespace, 'get', 'poolgrant', 'orders', '-o', 'jsonpath={.spec.heartbeatSeconds}']), '10');
    } finally {
      sampler.stop();
    }
    assert.ok(sampler.samples > 10, 'the sampler ran');
    assert.ok(sampler.max <= 40, `reserved peaked at ${sampler.max} > limit 40`);
    const printed = kube.kubectl(['-n', namespace, 'get', 'dbc']);
    assert.match(printed, /orders\s+40\s+1\s+web=40\s+40\s+True/);
  });

  it('re-grants live pods within seconds when their DatabaseConnection is deleted and created again under the same name, before or after its old grant table is collected', async function () {
    const { namespace, fleet } = await startOrders('recreate', 3, { maxConnections: 30, reserve: 0 });
    const settled = (each: number): boolean => grants(fleet.members()).every((g) => g === each) && fleet.members().every((m) => m.status?.acknowledgedConnections === each);
    // The highest limit of the test: every revision of the objects is checked against it.
    const sampler = new Sampler([fleet], ([members]) => reserved(members!));
    const table = (field: string): string => kube.kubectl(['-n', namespace, 'get', 'poolgrant', 'orders', '--ignore-not-found', '-o', `jsonpath={${field}}`]);
    try {
      await eventually('3 pods at 10 each', () => settled(10));
      // Table changes, then a fourth pod: it joins on the table from a generation well past 1.
      for (const next of [27, 30, 24, 32]) {
        applyConnection(kube, postgres, namespace, 'orders', { maxConnections: next, reserve: 0 });
        await eventually(`3 pods at ${next / 3}`, () => next % 3 !== 0 || settled(next / 3));
      }
      kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=4']);
      await eventually('4 pods at 8 each', () => fleet.members().length === 4 && settled(8));
      for (const [when, next] of [['at once', 20], ['after the old table is collected', 28]] as const) {
        // Deleted and applied again (kubectl replace --force, a GitOps tool re-creating it): at once, the old
        // grant table may still await garbage collection when the new DatabaseConnection comes.
        const oldGeneration = Number(table('.spec.generation'));
        kube.kubectl(['-n', namespace, 'delete', 'dbc', 'orders', '--wait=true']);
        if (when !== 'at once') await eventually('the old grant table collected', () => table('.metadata.name') === '', 60_000);
        const recreatedAt = Date.now();
        applyConnection(kube, postgres, namespace, 'orders', { maxConnections: next, reserve: 0 });
        await eventually(`4 pods at ${next / 4} each on the new connection (${when})`, () => settled(next / 4), 30_000);
        const seconds = (Date.now() - recreatedAt) / 1000;
        assert.ok(seconds < 10, `${when}: re-created connection converged in ${seconds} s`);
        // The table never goes back to a generation its sidecars acknowledged before (a stale acknowledgement would count).
        assert.ok(Number(table('.spec.generation')) > oldGeneration, `${when}: table generation ${table('.spec.generation')} after ${oldGeneration}`);
        // It belongs to the new DatabaseConnection, and stays so.
        await eventually(`${when}: a table owned by the new DatabaseConnection`, () => table('.metadata.ownerReferences[0].uid') === kube.kubectl(['-n', namespace, 'get', 'dbc', 'orders', '-o', 'jsonpath={.metadata.uid}']), 30_000);
        await new Promise((r) => setTimeout(r, 2000));
        assert.ok(settled(next / 4), `${when}: still ${next / 4} each: ${JSON.stringify(grants(fleet.members()))}`);
      }
    } finally {
      sampler.stop();
    }
    assert.ok(sampler.max <= 32, `reserved peaked at ${sampler.max} > 32: ${sampler.maxState}`);
  });

  /**
   * Two pods at 5 each on a limit of 10; then one's node is lost (its sidecar silent) and the pod
   * force-deleted, and the controller records its departure: when, and how to read the records.
   */
  const loseOneOfTwo = async (prefix: string, hold: number): Promise<{ fleet: SidecarFleetDouble; departed: () => string; lost: string; recordedAt: number }> => {
    const { namespace, fleet } = await startOrders(prefix, 2, { maxConnections: 10, reserve: 0, departureHoldSeconds: hold });
    await eventually('2 pods at 5 each', () => grants(fleet.members()).join() === '5,5' && fleet.members().every((m) => m.status?.acknowledgedConnections === 5));
    const departed = (): string => kube.kubectl(['-n', namespace, 'get', 'poolgrant', 'orders', '-o', 'jsonpath={.spec.departed}']);
    const lost = fleet.members().map((m) => m.metadata.name ?? '').sort()[0]!;
    await fleet.agents.get(lost)?.agent.stop();
    kube.kubectl(['-n', namespace, 'delete', 'pod', lost, '--grace-period=0', '--force', '--wait=false']);
    await eventually('the departure recorded', () => departed().includes('"connections":5'), 15_000);
    const recordedAt = performance.now();
    return { fleet, departed, lost, recordedAt };
  };

  it('keeps a departed pod counted for its whole hold when the controller\'s wall clock steps forward an hour meanwhile (NTP, a resumed VM)', async function () {
    const hold = 8;
    const { fleet, departed, lost, recordedAt } = await loseOneOfTwo('depart-step', hold);
    const restoreClock = stepWallClock(3_600_000);
    let peak = 0;
    try {
      // Judged by the wall clock, the hold ended an hour ago: the replacement would be granted the lost pod's 5 at once.
      while (performance.now() - recordedAt < (hold - 2) * 1000) {
        peak = Math.max(peak, reserved(fleet.members().filter((m) => m.metadata.name !== lost)));
        assert.ok(departed().includes('"connections":5'), 'the record stays for its hold');
        await new Promise((r) => setTimeout(r, 200));
      }
    } finally {
      restoreClock();
    }
    assert.ok(peak <= 5, `the survivor and the replacement reserved ${peak} while the lost pod may still hold 5 (limit 10)`);
  });

  it('keeps a departed pod counted for its whole hold when the replica that leads next runs a minute ahead of the one that recorded it (clocks judged against the API server\'s)', async function () {
    const hold = 10;
    const { fleet, departed, lost, recordedAt } = await loseOneOfTwo('depart-skew', hold);
    // The recording replica goes; the next runs on a node whose clock is a minute ahead (no NTP there).
    await controller?.stop();
    const ahead = await startController(kube, pino({ level: 'silent' }), { localClock: () => steadyNow() + 60_000 });
    controller = ahead.controller;
    let peak = 0;
    // Judged on its own clock, the hold ended 50 s before it began: the replacement would get the lost pod's 5 at once.
    while (performance.now() - recordedAt < (hold - 2) * 1000) {
      peak = Math.max(peak, reserved(fleet.members().filter((m) => m.metadata.name !== lost)));
      assert.ok(departed().includes('"connections":5'), 'the record stays for its hold');
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.ok(peak <= 5, `the survivor and the replacement reserved ${peak} while the lost pod may still hold 5 (limit 10)`);
    const offset = /^poolkeeper_controller_api_server_clock_offset_seconds (\S+)$/m.exec(await ahead.registry.metrics());
    assert.ok(offset !== null && Math.abs(Number(offset[1]) + 60) < 2, `the offset it exports: ${offset?.[1]}`);
    await eventually('released once the hold ends', () => departed() === '' || !departed().includes('"connections":5'), 30_000);
  });

  it('counts a pod that vanished without draining (a lost node\'s pod force-deleted) for departureHoldSeconds, recorded in its grant table, then releases it', async function () {
    const hold = 12;
    const { namespace, fleet } = await startOrders('depart', 2, { maxConnections: 10, reserve: 0, departureHoldSeconds: hold });
    const settled = (): boolean => grants(fleet.members()).join() === '5,5' && fleet.members().every((m) => m.status?.acknowledgedConnections === 5);
    await eventually('2 pods at 5 each', settled);
    const departed = (): Array<{ pod: string; connections: number; until: string }> => {
      const text = kube.kubectl(['-n', namespace, 'get', 'poolgrant', 'orders', '-o', 'jsonpath={.spec.departed}']);
      return text === '' ? [] : JSON.parse(text) as Array<{ pod: string; connections: number; until: string }>;
    };
    const lost = fleet.members().map((m) => m.metadata.name ?? '').sort()[0]!;
    // Its node is gone: its sidecar answers nothing more, nothing drains it, and PostgreSQL may keep its 5
    // connections until its keepalives give up. Then the pod is force-deleted.
    await fleet.agents.get(lost)?.agent.stop();
    const goneAt = Date.now();
    kube.kubectl(['-n', namespace, 'delete', 'pod', lost, '--grace-period=0', '--force', '--wait=false']);
    let recorded = false;
    let peak = 0;
    let replacementSeen = false;
    while (Date.now() - goneAt < (hold - 1.5) * 1000) {
      const others = fleet.members().filter((m) => m.metadata.name !== lost);
      replacementSeen ||= others.length === 2;
      peak = Math.max(peak, reserved(others));
      // By name; or, if its PoolMember left this controller's view first, as a pod gone from the default.
      recorded ||= departed().some((d) => (d.pod === lost || /^\(1 pod of the default at generation \d+\)$/.test(d.pod)) && d.connections === 5);
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.ok(replacementSeen, 'the Deployment replaced the pod meanwhile');
    assert.ok(recorded, `the grant table records the departed pod: ${JSON.stringify(departed())}`);
    assert.ok(peak <= 5, `the survivor and the replacement reserved ${peak} while the lost pod may still hold 5 (limit 10)`);
    await eventually('the replacement at 5 once the hold ends, the record gone', () => settled() && departed().length === 0, 30_000);
    // The garbage collector may take the PoolMember with its pod before the controller sees the pod go
    // (a pod on the table's default grant is not listed by name): deleted together, it is still recorded.
    const second = fleet.members().map((m) => m.metadata.name ?? '').sort()[0]!;
    await fleet.agents.get(second)?.agent.stop();
    kube.kubectl(['-n', namespace, 'delete', `pod/${second}`, `poolmember/${second}`, '--grace-period=0', '--force', '--wait=false', '--ignore-not-found']);
    // (Within 30 s, as the other waits here: on a machine loaded by other test runs, 10 s was once not enough.)
    // By its name if the controller saw the pod before its PoolMember went; else as a pod gone from the
    // table's default, counted (perPodPods): either record holds its 5.
    await eventually('the second lost pod recorded', () => departed().some((d) => (d.pod === second || /^\(1 pod of the default at generation \d+\)$/.test(d.pod)) && d.connections === 5), 30_000);
    await eventually('settled again after its hold', () => settled() && departed().length === 0, 30_000);
    const status = getConnection(kube, namespace, 'orders')?.status;
    assert.equal(status?.allocated, 10);
    // This server keeps a dead peer's connections for the kernel's two hours and more: longer than the hold, and said so.
    const warning = kube.kubectl(['-n', namespace, 'get', 'events', '--field-selector', 'reason=DepartureHoldShort', '-o', 'jsonpath={.items[*].message}']);
    assert.match(warning, /longer than departureHoldSeconds 12: .*ALTER ROLE \S+ SET tcp_keepalives_idle = 4;/);
  });

  it('holds what a pod on the table\'s default may still hold when it was force-deleted and its PoolMember collected while no controller ran', async function () {
    const hold = 12;
    const { namespace, fleet } = await startOrders('unseen', 2, { maxConnections: 10, reserve: 0, departureHoldSeconds: hold });
    const settled = (): boolean => grants(fleet.members()).join() === '5,5' && fleet.members().every((m) => m.status?.acknowledgedConnections === 5);
    await eventually('2 pods at 5 each', settled);
    const spec = (): { generation: number; perPodPods?: number; perPodPodsGeneration?: number; departed?: Array<{ pod: string; uid: string; connections: number }> } =>
      JSON.parse(kube.kubectl(['-n', namespace, 'get', 'poolgrant', 'orders', '-o', 'jsonpath={.spec}'])) as ReturnType<typeof spec>;
    await eventually('the table counts both pods on its default', () => spec().perPodPods === 2 && spec().perPodPodsGeneration === spec().generation);
    const generation = spec().generation;
    await controller?.stop();
    controller = undefined;
    // No controller runs: a pod's node is lost, the pod force-deleted, its PoolMember collected. Nothing
    // names it any more; only the table's count says it was there. PostgreSQL may keep its 5 for the hold.
    const lost = fleet.members().map((m) => m.metadata.name ?? '').sort()[0]!;
    await fleet.agents.get(lost)?.agent.stop();
    kube.kubectl(['-n', namespace, 'delete', `pod/${lost}`, `poolmember/${lost}`, '--grace-period=0', '--force', '--wait=true', '--ignore-not-found']);
    await eventually('the PoolMember gone', () => !fleet.members().some((m) => m.metadata.name === lost));
    ({ controller } = await startController(kube));
    const noticedAt = Date.now();
    const record = `(1 pod of the default at generation ${generation})`;
    await eventually('the new table holds the pod gone unseen', () => (spec().departed ?? []).some((d) => d.pod === record && d.uid === '' && d.connections === 5), 15_000);
    let peak = 0;
    let replacementSeen = false;
    while (Date.now() - noticedAt < (hold - 1.5) * 1000) {
      const members = fleet.members();
      replacementSeen ||= members.length === 2;
      peak = Math.max(peak, reserved(members));
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.ok(replacementSeen, 'the Deployment replaced the pod meanwhile');
    assert.ok(peak <= 5, `the survivor and the replacement reserved ${peak} while the lost pod may still hold 5 (limit 10)`);
    const warning = kube.kubectl(['-n', namespace, 'get', 'events', '--field-selector', 'reason=PodsLeftUnseen', '-o', 'jsonpath={.items[*].message}']);
    assert.match(warning, /^1 pod of the default at generation \d+ left without a PoolMember .* their 5 connections are held until /);
    await eventually('the replacement at 5 once the hold ends, the record gone', () => settled() && (spec().departed ?? []).length === 0, 30_000);
  });

  it('reads maxConnections: auto from PostgreSQL and applies the reserve', async function () {
    const namespace = namespaceFor('auto');
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    applyConnection(kube, postgres, namespace, 'orders', { maxConnections: 'auto', reserve: '15%' });
    ({ controller } = await startController(kube));
    const discovered = postgres.options.maxConnections - postgres.options.superuserReservedConnections;
    const reserve = Math.ceil(discovered * 0.15);
    await eventually('status.limit', () => getConnection(kube, namespace, 'orders')?.status?.limit?.discovered !== undefined);
    assert.deepEqual(getConnection(kube, namespace, 'orders')?.status?.limit, { discovered, reserve, effective: discovered - reserve, shared: 1 });
  });

  it('reports a login that works again as soon as its background check sees it, with nothing changed in the spec or the Secret', async function () {
    const role = `late_${Math.random().toString(36).slice(2, 8)}`;
    // The Secret has the password the role will have; the server has another one for now.
    await postgres.query(`CREATE ROLE ${role} LOGIN PASSWORD 'before-${role}'`);
    const namespace = namespaceFor('late');
    try {
      // No pods: a settled server is reconciled again only at its resync, a minute away.
      createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 0, secret: 'db-credentials', username: role, password: `after-${role}` });
      applyConnection(kube, postgres, namespace, 'orders', { maxConnections: 10, reserve: 0 });
      ({ controller } = await startController(kube, undefined, { verifier: { retryFailedMs: 1_000 } }));
      const condition = (type: string): string => {
        const c = getConnection(kube, namespace, 'orders')?.status?.conditions?.find((x) => x.type === type);
        return c ? `${c.status}/${c.reason}` : '';
      };
      await eventually('the login refused', () => condition('Degraded') === 'True/CredentialsRejected');
      await postgres.query(`ALTER ROLE ${role} PASSWORD 'after-${role}'`);
      await eventually('the login reported working', () => condition('Degraded') !== 'True/CredentialsRejected' && condition('Ready').startsWith('True'), 20_000).catch((err: unknown) => { throw new Error(`${String(err)}: ${JSON.stringify(getConnection(kube, namespace, 'orders')?.status?.conditions)}`); });
    } finally {
      await controller?.stop();
      controller = undefined;
      kube.kubectl(['-n', namespace, 'delete', 'dbc', '--all', '--wait=true']);
      await postgres.query(`DROP ROLE IF EXISTS ${role}`).catch(() => undefined);
    }
  });

  it('keeps every connection of a role (or to a database) with a CONNECTION LIMIT within it together, and gives the rest of the server to other roles', async function () {
    const suffix = Math.random().toString(36).slice(2, 8);
    const role = `capped_${suffix}`;
    const database = `capped_db_${suffix}`;
    await postgres.query(`CREATE ROLE ${role} LOGIN PASSWORD 'capped-secret' CONNECTION LIMIT 7`);
    await postgres.query(`CREATE DATABASE ${database} CONNECTION LIMIT 5`);
    const byRole = namespaceFor('cap-role');
    const byDatabase = namespaceFor('cap-db');
    const uncapped = namespaceFor('cap-free');
    const fleets3: SidecarFleetDouble[] = [];
    try {
      // Two namespaces log in as the capped role (one of them to the capped database); a third as another role.
      createWorkload(kube, { namespace: byRole, connection: 'orders', deployment: 'web', replicas: 3, secret: 'db-credentials', username: role, password: 'capped-secret' });
      createWorkload(kube, { namespace: byDatabase, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: role, password: 'capped-secret' });
      createWorkload(kube, { namespace: uncapped, connection: 'orders', deployment: 'web', replicas: 2, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
      applyConnection(kube, postgres, byRole, 'orders', { maxConnections: 'auto', reserve: 0 });
      kube.kubectl(['apply', '-f', '-'], JSON.stringify({
        apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders', namespace: byDatabase },
        spec: { database: { host: postgres.host, port: postgres.port, dbname: database, sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' } }, consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } }], maxConnections: 'auto', reserve: 0 },
      }));
      applyConnection(kube, postgres, uncapped, 'orders', { maxConnections: 'auto', reserve: 0 });
      for (const ns of [byRole, byDatabase, uncapped]) fleets3.push(new SidecarFleetDouble(kube, ns));
      fleets.push(...fleets3);
      await Promise.all(fleets3.map((f) => f.start()));
      const sampler = new Sampler(fleets3, ([r, d]) => reserved([...r!, ...d!]));
      ({ controller } = await startController(kube));
      const available = postgres.options.maxConnections - postgres.options.superuserReservedConnections;
      const condition = (namespace: string, type: string): string => {
        const c = getConnection(kube, namespace, 'orders')?.status?.conditions?.find((x) => x.type === type);
        return c ? `${c.status}/${c.reason}: ${c.message}` : '';
      };
      const sum = (fleet: SidecarFleetDouble): number => grants(fleet.members()).reduce((a, b) => a + b, 0);
      try {
        await eventually('the role\'s 4 pods at 7 together, the other role\'s 2 pods at the rest', () => fleets3[0]!.members().length === 3 && sum(fleets3[0]!) + sum(fleets3[1]!) === 7 && grants(fleets3[2]!.members()).join() === `${(available - 7) / 2},${(available - 7) / 2}`);
      } finally {
        sampler.stop();
      }
      assert.ok(sampler.max <= 7, `the role's pods reserved ${sampler.max} together, above its CONNECTION LIMIT 7`);
      assert.ok(sum(fleets3[1]!) <= 5, `the capped database's pod got ${sum(fleets3[1]!)}`);
      assert.deepEqual(grants([...fleets3[0]!.members(), ...fleets3[1]!.members()]), [1, 2, 2, 2]);
      // Every connection shares the server's limit: a CONNECTION LIMIT is not a conflicting limit.
      for (const ns of [byRole, byDatabase, uncapped]) {
        assert.equal(getConnection(kube, ns, 'orders')?.status?.limit?.effective, available);
        assert.match(condition(ns, 'LimitConflict'), /^False\//);
      }
      await eventually('conditions', () => condition(byDatabase, 'LimitExceedsServer').startsWith('True'));
      assert.match(condition(byRole, 'LimitExceedsServer'), new RegExp(`^True/LoginConnectionLimit: the role's CONNECTION LIMIT is 7 \\(role ${role}.*log in as ${role} hold at most 7 .*ALTER ROLE ${role} CONNECTION LIMIT n`));
      // The database's 5 is the stricter of its two.
      assert.match(condition(byDatabase, 'LimitExceedsServer'), new RegExp(`^True/LoginConnectionLimit: the database's CONNECTION LIMIT is 5 .*ALTER DATABASE ${database} CONNECTION LIMIT n`));
      assert.doesNotMatch(condition(uncapped, 'LimitExceedsServer'), /^True/);
    } finally {
      await controller?.stop();
      controller = undefined;
      await Promise.all(fleets3.map((f) => f.stop()));
      for (const ns of [byRole, byDatabase, uncapped]) kube.kubectl(['-n', ns, 'delete', 'dbc', '--all', '--wait=true']);
      await postgres.query(`DROP DATABASE IF EXISTS ${database}`).catch(() => undefined);
      await postgres.query(`DROP ROLE IF EXISTS ${role}`).catch(() => undefined);
    }
  });

  it('reads maxConnections: auto over TLS (require; verify-full with the CA from caSecretRef) and falls back to plaintext for prefer where the server has no TLS', async function () {
    const tls = await testEnvironment().postgresTls();
    const overTls = namespaceFor('auto-tls');
    const verified = namespaceFor('auto-verify');
    const preferPlain = namespaceFor('auto-prefer');
    createWorkload(kube, { namespace: overTls, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: tls.app.user, password: tls.app.password });
    createWorkload(kube, { namespace: verified, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: tls.app.user, password: tls.app.password });
    kube.kubectl(['-n', verified, 'create', 'secret', 'generic', 'db-ca', `--from-literal=ca.crt=${tls.caPem ?? ''}`]);
    createWorkload(kube, { namespace: preferPlain, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    // Each on its own server key (host:port), so no cached discovery answers for another.
    const spec = (host: string, port: number, sslMode: string, extra: Record<string, unknown> = {}): string => JSON.stringify({
      apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders' },
      spec: {
        database: { host, port, dbname: 'app', sslMode, credentialsSecretRef: { name: 'db-credentials' }, ...extra },
        maxConnections: 'auto', reserve: 0, consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } }],
      },
    });
    kube.kubectl(['-n', overTls, 'apply', '-f', '-'], spec('127.0.0.1', tls.port, 'require'));
    kube.kubectl(['-n', verified, 'apply', '-f', '-'], spec('localhost', tls.port, 'verify-full', { caSecretRef: { name: 'db-ca' } }));
    kube.kubectl(['-n', preferPlain, 'apply', '-f', '-'], spec('localhost', postgres.port, 'prefer'));
    ({ controller } = await startController(kube));
    const expected = (server: PostgresServer): number => server.options.maxConnections - server.options.superuserReservedConnections;
    await eventually('limit over TLS', () => getConnection(kube, overTls, 'orders')?.status?.limit?.discovered === expected(tls));
    await eventually('limit over verified TLS', () => getConnection(kube, verified, 'orders')?.status?.limit?.discovered === expected(tls));
    await eventually('limit with prefer on a plaintext server', () => getConnection(kube, preferPlain, 'orders')?.status?.limit?.discovered === expected(postgres));
  });

  it('reads maxConnections: auto through the SSH bastion, and refuses a bastion whose host key does not match', async function () {
    const sshd = await testEnvironment().sshd();
    const good = namespaceFor('tunnel');
    const bad = namespaceFor('tunnel-bad');
    for (const namespace of [good, bad]) {
      createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
      kube.kubectl(['-n', namespace, 'create', 'secret', 'generic', 'bastion-key', `--from-literal=ssh-privatekey=${sshd.userPrivateKey}`]);
    }
    // A real key line of another host: syntactically valid, not the bastion's.
    const otherHostKey = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl';
    // Distinct server addresses (localhost vs 127.0.0.1) so the two do not share one limit or one cached discovery.
    applyConnection(kube, postgres, good, 'orders', { maxConnections: 'auto', reserve: 0, sshTunnel: { host: sshd.host, port: sshd.port, user: sshd.username, privateKeySecretRef: { name: 'bastion-key' }, hostKey: sshd.hostPublicKey } });
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders', namespace: bad },
      spec: {
        database: { host: 'localhost', port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' } },
        maxConnections: 'auto', reserve: 0,
        sshTunnel: { host: sshd.host, port: sshd.port, user: sshd.username, privateKeySecretRef: { name: 'bastion-key' }, hostKey: otherHostKey },
        consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } }],
      },
    }));
    ({ controller } = await startController(kube));
    const expected = postgres.options.maxConnections - postgres.options.superuserReservedConnections;
    await eventually('limit read through the tunnel', () => getConnection(kube, good, 'orders')?.status?.limit?.discovered === expected);
    await eventually('Degraded on the wrong host key', () => {
      const degraded = getConnection(kube, bad, 'orders')?.status?.conditions?.find((c) => c.type === 'Degraded');
      return degraded?.status === 'True' && degraded.reason === 'LimitDiscoveryFailed' && /host key/.test(degraded.message);
    }, 30_000);
    assert.equal(getConnection(kube, bad, 'orders')?.status?.limit, undefined, 'no limit, so nothing is granted');
  });

  it('shares one server limit between DatabaseConnections in two namespaces', async function () {
    const a = namespaceFor('share-a');
    const b = namespaceFor('share-b');
    for (const namespace of [a, b]) {
      createWorkload(kube, { namespace, connection: 'db', deployment: 'web', replicas: 3, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
      applyConnection(kube, postgres, namespace, 'db', { maxConnections: 30, reserve: 0 });
    }
    const fleetA = new SidecarFleetDouble(kube, a);
    const fleetB = new SidecarFleetDouble(kube, b);
    fleets.push(fleetA, fleetB);
    await Promise.all([fleetA.start(), fleetB.start()]);
    const sampler = new Sampler([fleetA, fleetB], (fleets) => reserved(fleets.flat()));
    ({ controller } = await startController(kube));
    try {
      await eventually('6 pods at 5 each', () => [...grants(fleetA.members()), ...grants(fleetB.members())].join() === '5,5,5,5,5,5');
    } finally {
      sampler.stop();
    }
    assert.ok(sampler.max <= 30, `reserved peaked at ${sampler.max}: ${sampler.maxState}`);
    await eventually('shared status', () => getConnection(kube, a, 'db')?.status?.limit?.shared === 2);
  });

  it('one server under two spellings (localhost, 127.0.0.1): one limit, set by the first DatabaseConnection; a newer one\'s lower value is refused and reported, never lowering the other namespace', async function () {
    const first = namespaceFor('owner');
    const second = namespaceFor('culprit');
    for (const namespace of [first, second]) {
      createWorkload(kube, { namespace, connection: 'db', deployment: 'web', replicas: 2, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    }
    applyConnection(kube, postgres, first, 'db', { maxConnections: 20, reserve: 0 });
    // Created later, a different spelling of the same server, with a value that would leave nothing.
    await new Promise((r) => setTimeout(r, 1100));
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'db', namespace: second },
      spec: {
        database: { host: 'localhost', port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' } },
        maxConnections: 10, reserve: 20, consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } }],
      },
    }));
    const fleetA = new SidecarFleetDouble(kube, first);
    const fleetB = new SidecarFleetDouble(kube, second);
    fleets.push(fleetA, fleetB);
    await Promise.all([fleetA.start(), fleetB.start()]);
    const sampler = new Sampler([fleetA, fleetB], (fleets) => reserved(fleets.flat()));
    ({ controller } = await startController(kube));
    try {
      await eventually('4 pods at 5 each: one limit of 20 for both spellings', () => [...grants(fleetA.members()), ...grants(fleetB.members())].join() === '5,5,5,5');
    } finally {
      sampler.stop();
    }
    assert.ok(sampler.max <= 20, `reserved peaked at ${sampler.max}: ${sampler.maxState}`);
    await eventually('LimitConflict on the newer one', () => getConnection(kube, second, 'db')?.status?.conditions?.some((c) => c.type === 'LimitConflict' && c.status === 'True') ?? false);
    const conflict = getConnection(kube, second, 'db')?.status?.conditions?.find((c) => c.type === 'LimitConflict');
    assert.match(conflict?.message ?? '', new RegExp(`asks for a limit of 0 \\(maxConnections 10 - reserve 10\\).*the limit stays 20 \\(maxConnections 20 - reserve 0\\), set by DatabaseConnection ${first}/db`));
    assert.equal(getConnection(kube, first, 'db')?.status?.limit?.effective, 20);
    assert.equal(getConnection(kube, second, 'db')?.status?.limit?.shared, 2);
    await eventually('a ConflictingLimit Event', () => kube.kubectl(['-n', second, 'get', 'events', '--field-selector', 'reason=ConflictingLimit', '-o', 'name']).trim() !== '');
  });

  it('reports oversubscription with the numbers, as a condition and an Event, and grants no more than the limit', async function () {
    const { namespace, fleet } = await startOrders('over', 4, { maxConnections: 10, reserve: 0, consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, minPerPod: 3 }] });
    await eventually('Oversubscribed', () => getConnection(kube, namespace, 'orders')?.status?.conditions?.some((c) => c.type === 'Oversubscribed' && c.status === 'True') ?? false);
    const condition = getConnection(kube, namespace, 'orders')?.status?.conditions?.find((c) => c.type === 'Oversubscribed');
    assert.match(condition?.message ?? '', /4 pods x minPerPod 3 = 12 > limit 10/);
    // The fix, with numbers.
    assert.match(condition?.message ?? '', /To fix: raise the limit to at least 12.*lower minPerPod of .*\/orders consumer web from 3 to 2.*run at most 3 pods/);
    await eventually('the Event', () => kube.kubectl(['-n', namespace, 'get', 'events', '--field-selector', 'reason=Oversubscribed', '-o', 'name']).trim() !== '');
    await eventually('grants settle', () => fleet.members().length === 4 && fleet.members().every((m) => m.status?.acknowledgedGeneration === m.spec.grant.generation));
    assert.ok(reserved(fleet.members()) <= 10);
  });

  it('reports pods that opted in but run without the sidecar: Degraded condition and an Event', async function () {
    const namespace = namespaceFor('nosidecar');
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 2, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    applyConnection(kube, postgres, namespace, 'orders', { maxConnections: 10, reserve: 0 });
    ({ controller } = await startController(kube, undefined, { repair: 'report' }));
    await eventually('Degraded SidecarMissing', () => getConnection(kube, namespace, 'orders')?.status?.conditions?.some((c) => c.type === 'Degraded' && c.status === 'True' && c.reason === 'SidecarMissing') ?? false);
    assert.match(getConnection(kube, namespace, 'orders')?.status?.conditions?.find((c) => c.type === 'Degraded')?.message ?? '', /2 pod\(s\) opted in but run without the sidecar/);
    await eventually('SidecarMissing Events', () => kube.kubectl(['-n', namespace, 'get', 'events', '--field-selector', 'reason=SidecarMissing', '-o', 'name']).trim() !== '');
  });

  it('MaxReplicas: budgets pods for the HPA\'s maxReplicas and does not rebalance on scale', async function () {
    const namespace = namespaceFor('hpa');
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 2, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'autoscaling/v2', kind: 'HorizontalPodAutoscaler', metadata: { name: 'web', namespace },
      spec: { scaleTargetRef: { apiVersion: 'apps/v1', kind: 'Deployment', name: 'web' }, minReplicas: 2, maxReplicas: 5, metrics: [{ type: 'Resource', resource: { name: 'cpu', target: { type: 'Utilization', averageUtilization: 80 } } }] },
    }));
    applyConnection(kube, postgres, namespace, 'orders', { maxConnections: 20, reserve: 0, budgetStrategy: 'MaxReplicas' });
    const fleet = new SidecarFleetDouble(kube, namespace);
    fleets.push(fleet);
    await fleet.start();
    ({ controller } = await startController(kube));
    await eventually('2 pods at 20 / 5 = 4', () => grants(fleet.members()).join() === '4,4');
    // Not rebalanced: the old pods' grants stay 4 in every state observed while the new pods arrive.
    const old = new Set(fleet.members().map((m) => m.metadata.name));
    const seen = new Set<number>();
    fleet.onChange(() => {
      for (const m of fleet.members()) if (old.has(m.metadata.name)) seen.add(m.spec.grant.connections);
    });
    kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=5']);
    await eventually('5 pods at 4', () => grants(fleet.members()).join() === '4,4,4,4,4');
    assert.deepEqual([...seen], [4], 'the old pods kept their grant');
  });

  it('reports a sidecar that stopped reporting (Degraded/SidecarUnresponsive) and keeps its reservation, judging silence by its own clock, not the node\'s', async function () {
    const namespace = namespaceFor('silent');
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 2, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    applyConnection(kube, postgres, namespace, 'orders', { maxConnections: 10, reserve: 0 });
    // The pods' node clock is ten minutes behind: its heartbeats' timestamps are old when written.
    const fleet = new SidecarFleetDouble(kube, namespace, 300, undefined, -600_000);
    fleets.push(fleet);
    await fleet.start();
    ({ controller } = await startController(kube, undefined, { heartbeatTimeoutMs: 2_000 }));
    await eventually('2 pods at 5', () => grants(fleet.members()).join() === '5,5');
    await new Promise((r) => setTimeout(r, 3_000));
    assert.equal(getConnection(kube, namespace, 'orders')?.status?.conditions?.find((c) => c.type === 'Degraded')?.status, 'False', 'sidecars that beat are not silent, whatever their clock says');
    const [[name, { agent }], [other]] = [...fleet.agents.entries()] as [[string, { agent: PoolMemberAgent }], [string, unknown]];
    await agent.stop();
    await eventually('Degraded SidecarUnresponsive', () => {
      const degraded = getConnection(kube, namespace, 'orders')?.status?.conditions?.find((c) => c.type === 'Degraded');
      return degraded?.reason === 'SidecarUnresponsive' && degraded.message.includes(name) && !degraded.message.includes(other);
    }, 30_000);
    assert.equal(getConnection(kube, namespace, 'orders')?.status?.allocated, 10, 'the silent sidecar keeps its reservation');
  });

  it('writes nothing while nothing changes: no status or PoolMember write after convergence, whatever reconciles', async function () {
    const namespace = namespaceFor('quiet');
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 3, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    applyConnection(kube, postgres, namespace, 'orders', { maxConnections: 30, reserve: 0 });
    // Sidecars that heartbeat often, as a busy fleet's do.
    const fleet = new SidecarFleetDouble(kube, namespace, 300);
    fleets.push(fleet);
    await fleet.start();
    let registry: Registry;
    ({ controller, registry } = await startController(kube));
    const reconciles = async (): Promise<number> => (await registry.getMetricsAsJSON()).find((m) => m.name === 'poolkeeper_reconcile_duration_seconds')?.values.filter((v) => (v as { metricName?: string }).metricName === 'poolkeeper_reconcile_duration_seconds_count').reduce((sum, v) => sum + v.value, 0) ?? 0;
    await eventually('3 pods at 10, acknowledged', () => grants(fleet.members()).join() === '10,10,10' && fleet.members().every((m) => m.status?.acknowledgedGeneration === m.spec.grant.generation));
    await eventually('status of 3 settled pods', () => {
      const s = getConnection(kube, namespace, 'orders')?.status;
      return s?.pods === 3 && s.allocated === 30 && s.conditions?.find((c) => c.type === 'Ready')?.status === 'True';
    });
    await new Promise((resolve) => setTimeout(resolve, 1_500));
    // About 30 heartbeats in the next 3 s: none of them may wake a reconcile.
    const quietStart = await reconciles();
    await new Promise((resolve) => setTimeout(resolve, 3_000));
    const heartbeatReconciles = (await reconciles()) - quietStart;
    const writes: string[] = [];
    // eslint-disable-next-line @typescript-eslint/unbound-method -- called back with .call(this)
    const original = KubeHttp.prototype.request;
    KubeHttp.prototype.request = function counted<T>(this: KubeHttp, method: string, path: string, body?: unknown, contentType?: string): Promise<T> {
      if (method !== 'GET' && path.includes(`/namespaces/${namespace}/`) && (path.includes('/databaseconnections/') || (path.includes('/poolmembers') && !path.endsWith('/status')))) writes.push(`${method} ${path}`);
      return original.call(this, method, path, body, contentType) as Promise<T>;
    };
    try {
      // Reconciles with nothing to change: a Deployment annotation wakes the controller.
      for (let i = 0; i < 3; i += 1) {
        kube.kubectl(['-n', namespace, 'annotate', '--overwrite', 'deployment/web', `poolkeeper.test/poke=${i}`]);
        await new Promise((resolve) => setTimeout(resolve, 1_000));
      }
    } finally {
      KubeHttp.prototype.request = original;
    }
    assert.deepEqual(writes, [], 'writes after convergence');
    assert.equal(heartbeatReconciles, 0, 'reconciles woken by heartbeats alone');
  });

  it('binds the sidecar role to the pods\' ServiceAccount: a sidecar with the pod\'s own token reads its grant and acknowledges', async function () {
    const namespace = namespaceFor('rbac');
    // The ClusterRole as deploy/ installs it.
    const sidecarRole = parseAllDocuments(readFileSync('deploy/base/rbac.yaml', 'utf8')).map((d) => d.toJS() as { kind: string; metadata: { name: string } }).find((d) => d.kind === 'ClusterRole' && d.metadata.name === 'poolkeeper-sidecar');
    kube.kubectl(['apply', '-f', '-'], JSON.stringify(sidecarRole));
    createNamespaceWithSecret(kube, { namespace, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['-n', namespace, 'create', 'serviceaccount', 'app-sa']);
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'apps/v1', kind: 'Deployment', metadata: { name: 'web', namespace },
      spec: { replicas: 1, selector: { matchLabels: { app: 'web' } }, template: { metadata: { labels: { app: 'web', 'poolkeeper.dev/connection': 'orders' } }, spec: { serviceAccountName: 'app-sa', containers: [{ name: 'app', image: 'example.invalid/app:1' }] } } },
    }));
    applyConnection(kube, postgres, namespace, 'orders', { maxConnections: 6, reserve: 0 });
    ({ controller } = await startController(kube, undefined, { manageSidecarAccess: true }));
    await eventually('the RoleBinding', () => {
      try {
        return kube.kubectl(['-n', namespace, 'get', 'rolebinding', 'poolkeeper-sidecar', '-o', 'jsonpath={.subjects[*].name}']).includes('app-sa');
      } catch {
        return false;
      }
    });
    const pod = kube.kubectl(['-n', namespace, 'get', 'pods', '-l', 'app=web', '-o', 'jsonpath={.items[0].metadata.name}']).trim();
    const token = kube.kubectl(['-n', namespace, 'create', 'token', 'app-sa']).trim();
    const double = new ObedientSidecarDouble();
    const agent = new PoolMemberAgent({ http: new KubeHttp(kube.kubeConfigForToken(token)), namespace, podName: pod, target: double, logger: pino({ level: 'silent' }), version: 'test' });
    await agent.start();
    try {
      await eventually('grant 6 acknowledged with the pod\'s own token', () => {
        const member = JSON.parse(kube.kubectl(['-n', namespace, 'get', 'pm', pod, '-o', 'json'])) as PoolMember;
        // On a grant table the grant in force is the PoolGrant's; spec.grant keeps its value from the switch.
        return member.status?.acknowledgedConnections === 6 && (member.spec.tableFrom !== undefined || member.spec.grant.connections === 6);
      });
    } finally {
      await agent.stop();
    }
  });

  it('takes a pod off its grant table when its sidecar may not read the table, and grants it on its PoolMember', async function () {
    const namespace = namespaceFor('notable');
    createNamespaceWithSecret(kube, { namespace, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['-n', namespace, 'create', 'serviceaccount', 'app-sa']);
    // A Role written by hand from an older copy of the sidecar's: PoolMembers only, no poolgrants.
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'rbac.authorization.k8s.io/v1', kind: 'Role', metadata: { name: 'old-sidecar', namespace },
      rules: [
        { apiGroups: ['poolkeeper.dev'], resources: ['poolmembers'], verbs: ['get', 'list', 'watch'] },
        { apiGroups: ['poolkeeper.dev'], resources: ['poolmembers/status'], verbs: ['patch'] },
      ],
    }));
    kube.kubectl(['-n', namespace, 'create', 'rolebinding', 'old-sidecar', '--role=old-sidecar', `--serviceaccount=${namespace}:app-sa`]);
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'apps/v1', kind: 'Deployment', metadata: { name: 'web', namespace },
      spec: {
        replicas: 1, selector: { matchLabels: { app: 'web' } },
        // As the injector stamps it: the controller creates the PoolMember on the table.
        template: { metadata: { labels: { app: 'web', 'poolkeeper.dev/connection': 'orders' }, annotations: { [READS_TABLES_ANNOTATION]: 'true' } }, spec: { serviceAccountName: 'app-sa', containers: [{ name: 'app', image: 'example.invalid/app:1' }] } },
      },
    }));
    applyConnection(kube, postgres, namespace, 'orders', { maxConnections: 6, reserve: 0 });
    ({ controller } = await startController(kube));
    let pod = '';
    await eventually('the pod', () => (pod = kube.kubectl(['-n', namespace, 'get', 'pods', '-l', 'app=web', '-o', 'jsonpath={.items[*].metadata.name}']).trim()) !== '');
    await eventually('its PoolMember, created on the table', () => {
      try {
        return (JSON.parse(kube.kubectl(['-n', namespace, 'get', 'pm', pod, '-o', 'json'])) as PoolMember).spec.tableFrom !== undefined;
      } catch {
        return false;
      }
    });
    const token = kube.kubectl(['-n', namespace, 'create', 'token', 'app-sa']).trim();
    const agent = new PoolMemberAgent({ http: new KubeHttp(kube.kubeConfigForToken(token)), namespace, podName: pod, target: new ObedientSidecarDouble(), logger: pino({ level: 'silent' }), version: 'no-table', heartbeatMs: 1_000 });
    await agent.start();
    try {
      await eventually('the PoolMember off the table, granted 6 and acknowledged', () => {
        const member = JSON.parse(kube.kubectl(['-n', namespace, 'get', 'pm', pod, '-o', 'json'])) as PoolMember;
        return member.spec.tableFrom === undefined && member.spec.grant.connections === 6 && member.status?.acknowledgedConnections === 6;
      }, 60_000);
      let events = '';
      await eventually('a SidecarReadsNoTable Event', () => (events = kube.kubectl(['-n', namespace, 'get', 'events', '--field-selector', 'reason=SidecarReadsNoTable', '-o', 'jsonpath={.items[*].message}'])) !== '');
      assert.match(events, /1 sidecar\(s\) do not read the grant table \(sidecar version no-table.*poolgrants/);
      assert.ok(events.includes(pod), events);
    } finally {
      await agent.stop();
    }
  });

  it('writes the status of every DatabaseConnection on a server when the API server refuses one of them', async function () {
    const namespace = namespaceFor('refused');
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 2, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    // An admission policy of the cluster refuses every status write of one DatabaseConnection;
    // it is the older of the two on the server, so it comes first in a pass.
    const policy = `poolkeeper-test-${namespace}`;
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'admissionregistration.k8s.io/v1', kind: 'ValidatingAdmissionPolicy', metadata: { name: policy },
      spec: {
        failurePolicy: 'Fail',
        matchConstraints: { resourceRules: [{ apiGroups: ['poolkeeper.dev'], apiVersions: ['*'], operations: ['UPDATE'], resources: ['databaseconnections/status'] }] },
        validations: [{ expression: `!(object.metadata.namespace == '${namespace}' && object.metadata.name == 'a-refused')`, message: 'status writes of a-refused are refused by policy' }],
      },
    }));
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'admissionregistration.k8s.io/v1', kind: 'ValidatingAdmissionPolicyBinding', metadata: { name: policy },
      spec: { policyName: policy, validationActions: ['Deny'] },
    }));
    try {
      applyConnection(kube, postgres, namespace, 'a-refused', { maxConnections: 12, reserve: 0, consumers: [{ name: 'batch', workloadRef: { kind: 'Deployment', name: 'batch' } }] });
      await new Promise((r) => setTimeout(r, 1100));
      applyConnection(kube, postgres, namespace, 'orders', { maxConnections: 12, reserve: 0 });
      const fleet = new SidecarFleetDouble(kube, namespace);
      fleets.push(fleet);
      await fleet.start();
      // The policy takes a moment to be enforced: until then a-refused may get a status of its own.
      await eventually('the policy to refuse', () => {
        try {
          kube.kubectl(['-n', namespace, 'patch', 'dbc', 'a-refused', '--subresource=status', '--type=merge', '-p', '{"status":{"observedGeneration":0}}']);
          return false;
        } catch (err) {
          return /refused by policy/.test(String((err as Error).message) + String(((err as Error).cause as { stderr?: string } | undefined)?.stderr));
        }
      }, 30_000);
      const started = await startController(kube);
      controller = started.controller;
      await eventually('2 pods at 6', () => grants(fleet.members()).join() === '6,6');
      await eventually('orders to report its pods, whatever happens to a-refused', () => {
        const status = getConnection(kube, namespace, 'orders')?.status;
        return status?.pods === 2 && status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true;
      }, 30_000);
      const metrics = await started.registry.metrics();
      assert.match(metrics, /poolkeeper_reconcile_errors_total\{reason="StatusWriteError"\} [1-9]/);
    } finally {
      kube.kubectl(['delete', 'validatingadmissionpolicybinding', policy, '--ignore-not-found']);
      kube.kubectl(['delete', 'validatingadmissionpolicy', policy, '--ignore-not-found']);
    }
  });

  it('runs as two replicas: one leads, and the other takes over when it stops', async function () {
    const { namespace, fleet } = await ordersFleet('ha', 2, { maxConnections: 12, reserve: 0 });
    const replica = (identity: string): Promise<RunningController> => startControllerBinary({ apiServer: kube.kubeConfig(), namespace, identity, metricsPort: 0, metricsHost: '127.0.0.1', leaderElection: true, repair: 'off' }, pino({ level: 'silent' }));
    const a = await replica('a');
    const b = await replica('b');
    const leaderOf = async (r: RunningController): Promise<boolean> => /^poolkeeper_controller_leader 1$/m.test(await r.registry.metrics());
    try {
      await eventually('2 pods at 6', () => grants(fleet.members()).join() === '6,6');
      await eventually('one leader', async () => (await leaderOf(a)) !== (await leaderOf(b)));
      const [leader, standby] = (await leaderOf(a)) ? [a, b] : [b, a];
      await leader.shutdown();
      kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=3']);
      await eventually('the standby to take over and rebalance', async () => (await leaderOf(standby)) && grants(fleet.members()).join() === '4,4,4', 30_000);
    } finally {
      await a.shutdown();
      await b.shutdown();
    }
  });

  it('runs as two installs in two namespaces: one leads the cluster, the other stands by, says so, and takes over when the first stops', async function () {
    const { namespace, fleet } = await ordersFleet('installs', 2, { maxConnections: 12, reserve: 0 });
    // Each install has its own namespace (and Lease there); the cluster Lease is shared.
    const installs = [freshNamespace('install-a'), freshNamespace('install-b')];
    for (const ns of installs) kube.kubectl(['create', 'namespace', ns]);
    const clusterLease = { namespace, name: 'poolkeeper-controller-cluster' };
    const install = (ns: string): Promise<RunningController> => startControllerBinary({
      apiServer: kube.kubeConfig(), namespace: ns, identity: 'replica-0', metricsPort: 0, metricsHost: '127.0.0.1', leaderElection: true, clusterLease, repair: 'off', manageSidecarAccess: false,
      lease: { leaseDurationMs: 3000, renewDeadlineMs: 2000, retryPeriodMs: 300 },
    }, pino({ level: 'silent' }));
    const a = await install(installs[0]!);
    const b = await install(installs[1]!);
    const gauge = async (r: RunningController, name: string): Promise<number> => Number(new RegExp(`^${name} (\\d+)$`, 'm').exec(await r.registry.metrics())?.[1]);
    const leads = (r: RunningController): Promise<number> => gauge(r, 'poolkeeper_controller_leader');
    const standsBy = (r: RunningController): Promise<number> => gauge(r, 'poolkeeper_controller_other_install_leading');
    try {
      await eventually('2 pods at 6', () => grants(fleet.members()).join() === '6,6');
      await eventually('one install to lead, the other to stand by for it', async () => (await leads(a)) + (await leads(b)) === 1);
      const [leader, standby, standbyNamespace] = (await leads(a)) === 1 ? [a, b, installs[1]!] : [b, a, installs[0]!];
      // Several renewals later, still one leader: both installs hold their own Lease throughout.
      await new Promise((r) => setTimeout(r, 1500));
      assert.equal(await leads(standby), 0, 'the second install must not lead while the first renews');
      assert.equal(await standsBy(standby), 1);
      assert.equal(await standsBy(leader), 0);
      assert.equal(kube.kubectl(['-n', standbyNamespace, 'get', 'lease', 'poolkeeper-controller', '-o', 'jsonpath={.spec.holderIdentity}']).trim(), 'replica-0', 'the standby holds its own Lease');
      await leader.shutdown();
      kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=3']);
      await eventually('the other install to take over and rebalance', async () => (await leads(standby)) === 1 && grants(fleet.members()).join() === '4,4,4', 30_000);
      assert.equal(kube.kubectl(['-n', clusterLease.namespace, 'get', 'lease', clusterLease.name, '-o', 'jsonpath={.spec.holderIdentity}']).trim(), `${standbyNamespace}/replica-0`);
      assert.equal(await standsBy(standby), 0);
    } finally {
      await a.shutdown();
      await b.shutdown();
      for (const ns of installs) kube.kubectl(['delete', 'namespace', ns, '--wait=false']);
    }
  });

  it('keeps grants safe across a controller restart during a scale-up', async function () {
    const namespace = namespaceFor('restart');
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 2, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    applyConnection(kube, postgres, namespace, 'orders', { maxConnections: 24, reserve: 0 });
    const fleet = new SidecarFleetDouble(kube, namespace);
    fleets.push(fleet);
    await fleet.start();
    const sampler = new Sampler([fleet], ([members]) => reserved(members!));
    try {
      ({ controller } = await startController(kube));
      await eventually('2 pods at 12', () => grants(fleet.members()).join() === '12,12');
      // One sidecar hangs: it keeps its 12 and never acknowledges a shrink.
      const hung = [...fleet.agents.values()][0]!;
      hung.double.hang();
      kube.kubectl(['-n', namespace, 'scale', 'deployment/web', '--replicas=4']);
      await eventually('4 PoolMembers', () => fleet.members().length === 4);
      await controller.stop();
      ({ controller } = await startController(kube));
      await new Promise((r) => setTimeout(r, 1500));
      assert.ok(reserved(fleet.members()) <= 24);
      hung.double.resume();
      await eventually('4 pods at 6', () => grants(fleet.members()).join() === '6,6,6,6' && fleet.members().every((m) => m.status?.acknowledgedGeneration === m.spec.grant.generation), 30_000);
    } finally {
      sampler.stop();
    }
    assert.ok(sampler.max <= 24, `reserved peaked at ${sampler.max}; at that sample: ${sampler.maxState}`);
  });
});
