/**
 * Every DatabaseConnection verified on its own, on the real API server and
 * PostgreSQL: wrong credentials or database on a server another connection
 * already uses, a missing Secret, maxConnections above the server, workloads
 * whose pods do not opt in and opted-in pods no consumer selects. And no
 * password in status, Events or logs, with hostile inputs.
 */
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import pino from 'pino';
import type { DatabaseConnection } from '../../src/api/index.ts';
import type { BudgetController } from '../../src/controller/controller.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { createNamespaceWithSecret } from '../../src/devenv/scenario.ts';
import { KubeHttp } from '../../src/kube/http.ts';
import { Informer, type KubeObject } from '../../src/kube/informer.ts';
import { testEnvironment } from '../support/hooks.ts';
import { SidecarFleetDouble, createWorkload, eventually, freshNamespace, installCrds, reserved, startController } from '../support/budget-fixture.ts';

function spec(postgres: PostgresServer, extra: Record<string, unknown> = {}, database: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' }, ...database },
    consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } }],
    maxConnections: 'auto',
    reserve: 0,
    ...extra,
  };
}

describe('controller: every DatabaseConnection verified on its own', function () {
  let kube: KubeControlPlane;
  let postgres: PostgresServer;
  let controller: BudgetController | undefined;
  let cache: Informer<DatabaseConnection & KubeObject>;
  const namespaces: string[] = [];
  const fleets: SidecarFleetDouble[] = [];
  const logLines: string[] = [];

  const condition = (namespace: string, type: string): { status: string; reason: string; message: string } | undefined =>
    cache.get(namespace, 'orders')?.status?.conditions?.find((c) => c.type === type);
  const apply = (namespace: string, body: Record<string, unknown>): void => {
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders', namespace }, spec: body }));
  };
  const events = (namespace: string, reason: string): string =>
    kube.kubectl(['-n', namespace, 'get', 'events', '--field-selector', `reason=${reason}`, '-o', 'jsonpath={.items[*].message}']);
  const namespaceFor = (prefix: string): string => {
    const ns = freshNamespace(prefix);
    namespaces.push(ns);
    return ns;
  };

  before(async function () {
    [kube, postgres] = await Promise.all([testEnvironment().kube(), testEnvironment().postgres()]);
    await installCrds(kube);
    cache = new Informer(new KubeHttp(kube.kubeConfig()), { path: '/apis/poolkeeper.dev/v1alpha1/databaseconnections', logger: pino({ level: 'silent' }) });
    await cache.start();
    const stream = new Writable({
      write(chunk: Buffer, _enc, done) {
        logLines.push(chunk.toString('utf8'));
        done();
      },
    });
    ({ controller } = await startController(kube, pino({ level: 'debug' }, stream)));
  });

  after(async function () {
    await Promise.all(fleets.map((f) => f.stop()));
    await controller?.stop();
    await cache.stop();
    for (const ns of namespaces) kube.kubectl(['-n', ns, 'delete', 'dbc', '--all', '--wait=true']);
  });

  it('checks the login of each connection on a shared server: wrong password, wrong database and a missing Secret are not Ready, and say why', async function () {
    const good = namespaceFor('v-good');
    const badPassword = namespaceFor('v-badpw');
    const badNumeric = namespaceFor('v-badnum');
    const badDb = namespaceFor('v-baddb');
    const noSecret = namespaceFor('v-nosecret');
    createWorkload(kube, { namespace: good, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    createWorkload(kube, { namespace: badPassword, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: postgres.app.user, password: 'not-the-password' });
    createWorkload(kube, { namespace: badNumeric, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: postgres.app.user, password: 'not-the-password-either' });
    createWorkload(kube, { namespace: badDb, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['create', 'namespace', noSecret]);
    // Sidecars that acknowledge, so that a connection that can serve becomes Ready.
    for (const namespace of [good, badPassword]) {
      const fleet = new SidecarFleetDouble(kube, namespace);
      fleets.push(fleet);
      await fleet.start();
    }
    apply(good, spec(postgres));
    apply(badPassword, spec(postgres));
    apply(badNumeric, spec(postgres, { maxConnections: 10 }));
    apply(badDb, spec(postgres, {}, { dbname: 'no_such_db' }));
    apply(noSecret, spec(postgres));
    await eventually('the good one Ready', () => condition(good, 'Ready')?.status === 'True', 30_000);
    await eventually('CredentialsRejected', () => condition(badPassword, 'Ready')?.reason === 'CredentialsRejected', 30_000);
    assert.match(condition(badPassword, 'Ready')?.message ?? '', /password authentication failed for user "app".*28P01/);
    await eventually('CredentialsRejected with a numeric maxConnections', () => condition(badNumeric, 'Ready')?.reason === 'CredentialsRejected', 30_000);
    await eventually('DatabaseNotFound', () => condition(badDb, 'Ready')?.reason === 'DatabaseNotFound', 30_000);
    assert.match(condition(badDb, 'Ready')?.message ?? '', /database "no_such_db" does not exist/);
    await eventually('SecretMissing', () => condition(noSecret, 'Ready')?.reason === 'SecretMissing', 30_000);
    assert.match(kube.kubectl(['-n', noSecret, 'get', 'dbc', 'orders']), /orders\s.*\sFalse\s/);
    assert.match(kube.kubectl(['-n', badPassword, 'get', 'dbc', 'orders']), /orders\s.*\sFalse\s/);
    assert.match(kube.kubectl(['-n', badPassword, 'get', 'dbc', 'orders', '-o', 'wide']), /\sFalse\s+CredentialsRejected\s/);
    await eventually('a CredentialsRejected Event', () => /password authentication failed/.test(events(badPassword, 'CredentialsRejected')));
    // A fixed password is checked at its new generation, at once.
    kube.kubectl(['-n', badPassword, 'apply', '-f', '-'], kube.kubectl(['-n', badPassword, 'create', 'secret', 'generic', 'db-credentials', `--from-literal=username=${postgres.app.user}`, `--from-literal=password=${postgres.app.password}`, '--dry-run=client', '-o', 'json']));
    await eventually('Ready after the Secret is fixed', () => condition(badPassword, 'Ready')?.status === 'True', 30_000);
  });

  it('warns when maxConnections is above the server\'s real value and budgets with the server\'s', async function () {
    const namespace = namespaceFor('v-above');
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    apply(namespace, spec(postgres, { maxConnections: 500 }));
    const available = postgres.options.maxConnections - postgres.options.superuserReservedConnections;
    await eventually('LimitExceedsServer', () => condition(namespace, 'LimitExceedsServer')?.status === 'True', 30_000);
    assert.match(condition(namespace, 'LimitExceedsServer')?.message ?? '', new RegExp(`maxConnections 500 is above what the server allows \\(max_connections ${postgres.options.maxConnections} - superuser_reserved_connections ${postgres.options.superuserReservedConnections}.* = ${available}\\)`));
    await eventually('the server\'s value used', () => cache.get(namespace, 'orders')?.status?.limit?.discovered === available);
    await eventually('an Event', () => /maxConnections 500/.test(events(namespace, 'MaxConnectionsAboveServer')));
  });

  it('says when a connection pooler answers instead of PostgreSQL: one that pools by transaction with a Warning Event, one in session mode, and not PostgreSQL itself', async function () {
    const [transactionPooler, sessionPooler] = await Promise.all([testEnvironment().pgbouncer('transaction'), testEnvironment().pgbouncer('session')]);
    const direct = namespaceFor('v-direct');
    const viaTransaction = namespaceFor('v-txpooler');
    const viaSession = namespaceFor('v-sesspooler');
    for (const namespace of [direct, viaTransaction, viaSession]) {
      createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    }
    apply(direct, spec(postgres));
    apply(viaTransaction, spec(postgres, {}, { host: transactionPooler.host, port: transactionPooler.port }));
    apply(viaSession, spec(postgres, {}, { host: sessionPooler.host, port: sessionPooler.port }));
    await eventually('TransactionPooler', () => condition(viaTransaction, 'PoolerInFront')?.reason === 'TransactionPooler', 30_000);
    assert.equal(condition(viaTransaction, 'PoolerInFront')?.status, 'True');
    assert.match(condition(viaTransaction, 'PoolerInFront')?.message ?? '', new RegExp(`^127\\.0\\.0\\.1:${transactionPooler.port} is a connection pooler that pools by transaction`));
    await eventually('a Warning Event', () => /pools by transaction/.test(events(viaTransaction, 'TransactionPooler')));
    assert.match(kube.kubectl(['-n', viaTransaction, 'get', 'events', '--field-selector', 'reason=TransactionPooler', '-o', 'jsonpath={.items[*].type}']), /^Warning/);
    await eventually('Pooler, for the session-mode one', () => condition(viaSession, 'PoolerInFront')?.reason === 'Pooler', 30_000);
    assert.equal(condition(viaSession, 'PoolerInFront')?.status, 'True');
    await eventually('PostgreSQL itself', () => condition(direct, 'PoolerInFront')?.reason === 'PostgreSQL', 30_000);
    assert.equal(condition(direct, 'PoolerInFront')?.status, 'False');
    // The limit still comes through the pooler: PostgreSQL's max_connections, as it reports it.
    const available = postgres.options.maxConnections - postgres.options.superuserReservedConnections;
    await eventually('the limit read through the pooler', () => cache.get(viaTransaction, 'orders')?.status?.limit?.discovered === available);
  });

  it('reads the limit again as soon as the server restarts with a lower max_connections, not at the next periodic check, and shrinks the grants to it', async function () {
    const scratch = await testEnvironment().postgresScratch();
    const namespace = namespaceFor('v-restart');
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 2, secret: 'db-credentials', username: scratch.app.user, password: scratch.app.password });
    const fleet = new SidecarFleetDouble(kube, namespace);
    fleets.push(fleet);
    await fleet.start();
    // The watching login takes a slot of the reserve: none is held on a server whose reserve is 0, as every other one in this file.
    assert.equal((await postgres.query("SELECT 1 FROM pg_stat_activity WHERE application_name = 'poolkeeper-controller-watch'")).length, 0);
    apply(namespace, spec(scratch, { reserve: 2, consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, maxPerPod: 100 }] }));
    const before = scratch.options.maxConnections - scratch.options.superuserReservedConnections;
    await eventually('the first limit', () => cache.get(namespace, 'orders')?.status?.limit?.discovered === before, 30_000);
    await eventually('the watching login', async () => (await scratch.query("SELECT 1 FROM pg_stat_activity WHERE application_name = 'poolkeeper-controller-watch'")).length === 1, 30_000);
    const lowered = scratch.options.maxConnections - 10;
    await scratch.query(`ALTER SYSTEM SET max_connections = ${lowered}`);
    await scratch.restart('fast');
    const after = lowered - scratch.options.superuserReservedConnections;
    // The periodic check comes every 10 minutes: within this wait, only the lost login can have told.
    await eventually('the lower limit', () => cache.get(namespace, 'orders')?.status?.limit?.discovered === after, 30_000);
    await eventually('grants within it', () => fleet.members().length === 2 && reserved(fleet.members()) <= after - 2, 30_000);
    await eventually('the login watching again', async () => (await scratch.query("SELECT 1 FROM pg_stat_activity WHERE application_name = 'poolkeeper-controller-watch'")).length === 1, 30_000);
  });

  it('reports a workload whose pods lack the label, and opted-in pods no consumer selects: not Ready, with Events', async function () {
    const unlabelled = namespaceFor('v-nolabel');
    createNamespaceWithSecret(kube, { namespace: unlabelled, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'apps/v1', kind: 'Deployment', metadata: { name: 'web', namespace: unlabelled },
      spec: { replicas: 2, selector: { matchLabels: { app: 'web' } }, template: { metadata: { labels: { app: 'web' } }, spec: { containers: [{ name: 'app', image: 'example.invalid/app:1' }] } } },
    }));
    apply(unlabelled, spec(postgres, { maxConnections: 10 }));
    await eventually('WorkloadNotOptedIn', () => condition(unlabelled, 'Ready')?.reason === 'WorkloadNotOptedIn', 30_000);
    assert.match(condition(unlabelled, 'Ready')?.message ?? '', /pod template of Deployment web lacks the label poolkeeper.dev\/connection=orders, so its 2 pod\(s\) get no budget/);
    assert.equal(condition(unlabelled, 'ConsumersMatched')?.status, 'False');
    await eventually('a WorkloadNotOptedIn Event', () => /lacks the label/.test(events(unlabelled, 'WorkloadNotOptedIn')));

    const stray = namespaceFor('v-stray');
    createWorkload(kube, { namespace: stray, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'v1', kind: 'Pod', metadata: { name: 'stray', namespace: stray, labels: { 'poolkeeper.dev/connection': 'orders' } },
      spec: { containers: [{ name: 'app', image: 'example.invalid/app:1' }] },
    }));
    apply(stray, spec(postgres, { maxConnections: 10 }));
    await eventually('PodsWithoutConsumer', () => condition(stray, 'ConsumersMatched')?.reason === 'PodsWithoutConsumer', 30_000);
    assert.match(condition(stray, 'ConsumersMatched')?.message ?? '', /1 pod\(s\) carry poolkeeper.dev\/connection=orders but match no consumer.*stray/);
    assert.equal(condition(stray, 'Ready')?.status, 'False');
    await eventually('a PodsWithoutConsumer Event', () => /stray/.test(events(stray, 'PodsWithoutConsumer')));
  });

  it('keeps hostile passwords out of status, Events and logs', async function () {
    const namespace = namespaceFor('v-hostile');
    const password = `Pw-${freshNamespace('x')}:@/'"\\%;--`;
    // A user name that carries the password: the server echoes the user name in its error.
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 1, secret: 'db-credentials', username: `app${password}`, password });
    apply(namespace, spec(postgres, { maxConnections: 10 }));
    await eventually('CredentialsRejected', () => condition(namespace, 'Ready')?.reason === 'CredentialsRejected', 30_000);
    await eventually('its Event', () => events(namespace, 'CredentialsRejected') !== '');
    const everything = [
      kube.kubectl(['-n', namespace, 'get', 'dbc', 'orders', '-o', 'json']),
      kube.kubectl(['-n', namespace, 'get', 'events', '-o', 'json']),
      kube.kubectl(['-n', namespace, 'get', 'poolmembers', '-o', 'json']),
      logLines.join(''),
    ].join('\n');
    assert.ok(!everything.includes(password), 'the password appears somewhere');
    assert.ok(!everything.includes(JSON.stringify(password).slice(1, -1)), 'the JSON-escaped password appears somewhere');
    assert.match(condition(namespace, 'Ready')?.message ?? '', /\*\*\*/);
  });
});
