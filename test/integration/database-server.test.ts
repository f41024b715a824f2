/**
 * DatabaseServer on the real API server and PostgreSQL: a platform-owned
 * limit that app namespaces draw on by allocation. A value in one namespace
 * cannot lower another's budget; an inline DatabaseConnection on the
 * server's address is budgeted inside it; an unlisted namespace is refused;
 * moving share between namespaces never lets the total pass the limit.
 *
 * The server is reached through a TCP proxy on its own port, so that the
 * DatabaseServer's address is not the one other tests' connections use.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import pino from 'pino';
import type { DatabaseConnection, DatabaseServer } from '../../src/api/index.ts';
import type { BudgetController } from '../../src/controller/controller.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { KubeHttp } from '../../src/kube/http.ts';
import { Informer, type KubeObject } from '../../src/kube/informer.ts';
import { testEnvironment } from '../support/hooks.ts';
import { Sampler, SidecarFleetDouble, createWorkload, eventually, freshNamespace, installCrds, reserved, startController } from '../support/budget-fixture.ts';
import { TcpProxy } from '../support/tcp-proxy.ts';

describe('controller: a DatabaseServer owns a shared server\'s limit', function () {
  let kube: KubeControlPlane;
  let postgres: PostgresServer;
  let proxy: TcpProxy;
  let controller: BudgetController | undefined;
  let connections: Informer<DatabaseConnection & KubeObject>;
  let servers: Informer<DatabaseServer & KubeObject>;
  const fleets = new Map<string, SidecarFleetDouble>();
  const serverName = `orders-${randomBytes(3).toString('hex')}`;
  const [shop, billing, rogue, stranger] = ['dbs-shop', 'dbs-billing', 'dbs-rogue', 'dbs-stranger'].map(freshNamespace) as [string, string, string, string];

  const dbc = (namespace: string): (DatabaseConnection & KubeObject) | undefined => connections.get(namespace, 'orders');
  const condition = (namespace: string, type: string): { status: string; reason: string; message: string } | undefined =>
    dbc(namespace)?.status?.conditions?.find((c) => c.type === type);
  const applyServer = (spec: Record<string, unknown>): void => {
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseServer', metadata: { name: serverName }, spec }));
  };
  const serverSpec = (shopMax: number): Record<string, unknown> => ({
    address: { host: '127.0.0.1', port: proxy.port },
    aliases: [{ host: 'localhost', port: proxy.port }],
    maxConnections: 30,
    reserve: 0,
    allocations: [{ namespaces: [shop], guaranteed: 4, max: shopMax }, { namespaces: [billing] }],
    defaultAllocation: 'None',
  });
  const applyConnection = (namespace: string, spec: Record<string, unknown>): string =>
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders', namespace }, spec }));
  const connectionSpec = (host: string, extra: Record<string, unknown>): Record<string, unknown> => ({
    database: { host, port: proxy.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' } },
    consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, minPerPod: 1 }],
    ...extra,
  });
  /** What every pod drawing on the server may hold now, from the sidecars' own objects. */

  before(async function () {
    [kube, postgres] = await Promise.all([testEnvironment().kube(), testEnvironment().postgres()]);
    proxy = new TcpProxy(postgres.host, postgres.port);
    await proxy.start();
    await installCrds(kube);
    const http = new KubeHttp(kube.kubeConfig());
    connections = new Informer(http, { path: '/apis/poolkeeper.dev/v1alpha1/databaseconnections', logger: pino({ level: 'silent' }) });
    servers = new Informer(http, { path: '/apis/poolkeeper.dev/v1alpha1/databaseservers', logger: pino({ level: 'silent' }) });
    await Promise.all([connections.start(), servers.start()]);
    for (const namespace of [shop, billing, rogue, stranger]) {
      createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 3, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
      const fleet = new SidecarFleetDouble(kube, namespace, 1_000);
      fleets.set(namespace, fleet);
      await fleet.start();
    }
    ({ controller } = await startController(kube));
  });

  after(async function () {
    await Promise.all([...fleets.values()].map((f) => f.stop()));
    await controller?.stop();
    await Promise.all([connections.stop(), servers.stop()]);
    for (const ns of [shop, billing, rogue, stranger]) kube.kubectl(['-n', ns, 'delete', 'dbc', '--all', '--wait=true']);
    kube.kubectl(['delete', 'databaseserver', serverName, '--ignore-not-found', '--wait=true']);
    await proxy.stop();
  });

  it('refuses maxConnections or reserve next to serverRef, naming the field', function () {
    assert.throws(() => applyConnection(shop, connectionSpec('127.0.0.1', { serverRef: { name: serverName }, maxConnections: 10 })), /spec\.maxConnections: Invalid value.*cannot be set with serverRef/);
    assert.throws(() => applyConnection(shop, connectionSpec('127.0.0.1', { serverRef: { name: serverName }, reserve: 2 })), /spec\.reserve: Invalid value.*cannot be set with serverRef/);
    assert.throws(() => applyServer({ ...serverSpec(12), allocations: [{ namespaces: [shop], namespaceSelector: { matchLabels: { a: 'b' } } }] }), /exactly one of namespaces or namespaceSelector/);
    assert.throws(() => applyServer({ ...serverSpec(12), address: { host: 'postgresql://u:pw@db' } }), /spec\.address\.host.*not a URL/);
  });

  it('divides its limit by allocation; an inline connection on its address and an unlisted namespace draw nothing, and lower nobody', async function () {
    applyServer(serverSpec(12));
    applyConnection(shop, connectionSpec('127.0.0.1', { serverRef: { name: serverName } }));
    applyConnection(billing, connectionSpec('localhost', { serverRef: { name: serverName } }));
    // A team writing the address inline with a tiny limit: budgeted inside the DatabaseServer, as an unlisted namespace.
    applyConnection(rogue, connectionSpec('localhost', { maxConnections: 5, reserve: 5 }));
    applyConnection(stranger, connectionSpec('127.0.0.1', { serverRef: { name: serverName } }));
    const sampler = new Sampler([...fleets.values()], (perFleet) => perFleet.reduce((sum, members) => sum + reserved(members), 0));
    try {
      await eventually('shop and billing Ready at their shares', () =>
        condition(shop, 'Ready')?.status === 'True' && condition(billing, 'Ready')?.status === 'True'
        && dbc(shop)?.status?.allocated === 12 && dbc(billing)?.status?.allocated === 18, 60_000);
      assert.equal(condition(shop, 'LimitConflict')?.reason, 'SetByDatabaseServer');
      assert.equal(dbc(shop)?.status?.limit?.effective, 30);
      await eventually('the rogue connection told who owns the server, and not allowed', () => condition(rogue, 'LimitConflict')?.reason === 'OwnedByDatabaseServer' && condition(rogue, 'Ready')?.reason === 'NotAllowed', 30_000);
      assert.match(condition(rogue, 'LimitConflict')?.message ?? '', new RegExp(`belongs to DatabaseServer ${serverName}.*maxConnections and reserve are ignored`));
      await eventually('the unlisted namespace not allowed', () => condition(stranger, 'Ready')?.reason === 'NotAllowed', 30_000);
      assert.match(condition(stranger, 'Ready')?.message ?? '', new RegExp(`namespace ${stranger} may not draw on DatabaseServer ${serverName}`));
      assert.equal(dbc(stranger)?.status?.allocated ?? 0, 0);
      assert.equal(dbc(rogue)?.status?.allocated ?? 0, 0);
      await eventually('the DatabaseServer\'s status', () => {
        const s = servers.get(undefined, serverName)?.status;
        return s?.limit?.effective === 30 && s.namespaces?.find((n) => n.namespace === shop)?.share === 12 && s.conditions?.find((c) => c.type === 'Ready')?.status === 'True';
      }, 30_000);
      assert.match(kube.kubectl(['get', 'dbs', serverName]), new RegExp(`${serverName}\\s+127\\.0\\.0\\.1\\s+${proxy.port}\\s+30\\s+30\\s+4\\s+True`));
      assert.match(kube.kubectl(['-n', rogue, 'get', 'events', '--field-selector', 'reason=OwnedByDatabaseServer', '-o', 'jsonpath={.items[*].message}']), new RegExp(serverName));

      // The owner moves share from shop to billing: shop shrinks first, billing grows after.
      applyServer(serverSpec(6));
      await eventually('shop at 6 and billing at 24', () => dbc(shop)?.status?.allocated === 6 && dbc(billing)?.status?.allocated === 24, 60_000);
    } finally {
      sampler.stop();
    }
    assert.ok(sampler.samples > 10, `sampled ${sampler.samples} times`);
    assert.ok(sampler.max <= 30, `at most the limit may be held at any time, saw ${sampler.max}: ${sampler.maxState}`);
  });

  it('keeps the pods of two namespaces that log in as one role within its CONNECTION LIMIT together, inside their shares', async function () {
    const role = `shared_${randomBytes(3).toString('hex')}`;
    await postgres.query(`CREATE ROLE ${role} LOGIN PASSWORD 'shared-secret' CONNECTION LIMIT 8`);
    // Two namespaces of their own, each with 3 pods logging in as the role: nothing held before as another role.
    const [first, second] = ['dbs-cap-a', 'dbs-cap-b'].map(freshNamespace) as [string, string];
    const capped: SidecarFleetDouble[] = [];
    try {
      for (const namespace of [first, second]) {
        createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 3, secret: 'db-credentials', username: role, password: 'shared-secret' });
        const fleet = new SidecarFleetDouble(kube, namespace, 1_000);
        capped.push(fleet);
        await fleet.start();
      }
      const spec = serverSpec(12);
      applyServer({ ...spec, allocations: [...(spec.allocations as unknown[]), { namespaces: [first] }, { namespaces: [second] }] });
      const sampler = new Sampler(capped, (perFleet) => perFleet.reduce((sum, members) => sum + reserved(members), 0));
      applyConnection(first, connectionSpec('127.0.0.1', { serverRef: { name: serverName } }));
      applyConnection(second, connectionSpec('localhost', { serverRef: { name: serverName } }));
      try {
        // Their shares of the limit 30 would allow more; the role allows 8, split by their pods (3 and 3).
        await eventually('both namespaces at 4', () => dbc(first)?.status?.allocated === 4 && dbc(second)?.status?.allocated === 4, 90_000);
      } finally {
        sampler.stop();
      }
      assert.ok(sampler.max <= 8, `the role's pods reserved ${sampler.max} together, above its CONNECTION LIMIT 8: ${sampler.maxState}`);
      assert.equal(condition(first, 'LimitExceedsServer')?.reason, 'LoginConnectionLimit');
    } finally {
      for (const ns of [first, second]) kube.kubectl(['-n', ns, 'delete', 'dbc', '--all', '--wait=true']);
      await Promise.all(capped.map((f) => f.stop()));
      await postgres.query(`DROP ROLE IF EXISTS ${role}`).catch(() => undefined);
    }
  });

  it('a serverRef to a DatabaseServer that does not exist is not Ready and draws nothing', async function () {
    applyConnection(stranger, connectionSpec('127.0.0.1', { serverRef: { name: `${serverName}-missing` } }));
    await eventually('ServerNotFound', () => condition(stranger, 'Ready')?.reason === 'ServerNotFound', 30_000);
    assert.match(condition(stranger, 'Ready')?.message ?? '', /does not exist/);
  });
});
