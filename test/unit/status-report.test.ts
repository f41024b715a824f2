/** The status view's report and text: from API objects to what an operator reads. */
import assert from 'node:assert/strict';
import { buildStatusReport, formatStatusReport, oversubscription } from '../../src/core/status/index.ts';
import { parseStatusArgs } from '../../src/cli/status.ts';

function connection(namespace: string, name: string, extra: { spec?: Record<string, unknown>; status?: Record<string, unknown>; created?: string } = {}): Record<string, unknown> {
  return {
    metadata: { namespace, name, creationTimestamp: extra.created ?? '2026-01-01T00:00:00Z' },
    spec: {
      database: { host: 'pg.internal', port: 5432, dbname: 'app', credentialsSecretRef: { name: 'creds' } },
      maxConnections: 'auto', reserve: '15%',
      consumers: [
        { name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, minPerPod: 4, maxPerPod: 16, processesPerPod: 4, weight: 2 },
        { name: 'worker', workloadRef: { kind: 'Deployment', name: 'worker' }, minPerPod: 4, processesPerPod: 4 },
      ],
      ...extra.spec,
    },
    status: extra.status,
  };
}

function pod(namespace: string, name: string, connectionName: string, consumer: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { metadata: { namespace, name, labels: { 'poolkeeper.dev/connection': connectionName }, annotations: { 'poolkeeper.dev/consumer': consumer }, ...extra }, status: { phase: 'Running' } };
}

function member(namespace: string, name: string, grant: number, generation: number, status?: Record<string, unknown>): Record<string, unknown> {
  return { metadata: { namespace, name }, spec: { connection: 'superset-db', grant: { connections: grant, generation } }, status };
}

const readyStatus = {
  limit: { discovered: 97, reserve: 15, effective: 82, shared: 1 },
  allocated: 44, pods: 3,
  consumers: [{ name: 'web', pods: 2, perPodBudget: 14, perProcessBudget: 3 }, { name: 'worker', pods: 1, perPodBudget: 16, perProcessBudget: 4 }],
  conditions: [{ type: 'Ready', status: 'True', reason: 'Allocated', message: 'every pod is at its budget' }, { type: 'LimitConflict', status: 'False', reason: 'SetsLimit', message: '' }],
};

describe('status report', function () {
  it('shows per server the limit and who set it, each consumer with its budgets, and each pod with grant, held, waiting and state', function () {
    const report = buildStatusReport({
      connections: [connection('superset', 'superset-db', { status: readyStatus })],
      members: [
        member('superset', 'web-1', 14, 3, { acknowledgedGeneration: 3, acknowledgedConnections: 14, heldConnections: 9, waitingClients: 2 }),
        member('superset', 'web-2', 14, 4, { acknowledgedGeneration: 3, acknowledgedConnections: 6, heldConnections: 6 }),
      ],
      pods: [pod('superset', 'web-1', 'superset-db', 'web'), pod('superset', 'web-2', 'superset-db', 'web'), pod('superset', 'worker-1', 'superset-db', 'worker'), pod('other', 'x', 'other-db', 'web')],
    });
    assert.equal(report.servers.length, 1);
    const server = report.servers[0]!;
    assert.equal(server.server, 'pg.internal:5432');
    assert.equal(server.limit, 82);
    assert.equal(server.allocated, 44);
    assert.equal(server.limitSetBy, 'DatabaseConnection superset/superset-db: maxConnections auto (read from the server), reserve 15%');
    assert.equal(server.oversubscription, undefined);
    const row = server.connections[0]!;
    assert.deepEqual(row.consumers.map((c) => [c.name, c.pods, c.perPodBudget, c.perProcessBudget]), [['web', 2, 14, 3], ['worker', 1, 16, 4]]);
    assert.deepEqual(row.pods, [
      { name: 'web-1', consumer: 'web', grant: 14, held: 9, waiting: 2, state: 'ok' },
      { name: 'web-2', consumer: 'web', grant: 14, held: 6, waiting: undefined, state: 'grant not acknowledged yet' },
      { name: 'worker-1', consumer: 'worker', grant: undefined, held: undefined, waiting: undefined, state: 'no PoolMember yet' },
    ]);
    const text = formatStatusReport(report);
    assert.match(text, /^SERVER pg\.internal:5432 {3}limit 82 \(97 - reserve 15\) {3}allocated 44\/82$/m);
    assert.match(text, /limit set by DatabaseConnection superset\/superset-db/);
    assert.match(text, /^ {4}web +2 +4 +16 +4 +2 +14 +3$/m);
    assert.match(text, /^ {4}worker +1 +4 +- +4 +1 +16 +4$/m);
    assert.match(text, /^ {4}web-1 +web +14 +9 +2 +ok$/m);
    assert.doesNotMatch(text, /OVERSUBSCRIBED/);
  });

  it('names the DatabaseConnection that set a shared limit, from the LimitConflict condition, and groups connections by server', function () {
    const conflict = { ...readyStatus, limit: { discovered: 60, reserve: 9, effective: 51, shared: 2 }, conditions: [{ type: 'LimitConflict', status: 'True', reason: 'ConflictingLimit', message: 'this DatabaseConnection asks for a limit of 0 (maxConnections 10 - reserve 10), which would lower every DatabaseConnection\'s budget on this server; the limit stays 51 (maxConnections 60 - reserve 9), set by DatabaseConnection team-a/orders-db, the first on this server.' }] };
    const report = buildStatusReport({
      connections: [connection('team-b', 'orders-db', { status: conflict }), connection('team-a', 'orders-db', { status: { ...conflict, conditions: [] } }), connection('x', 'elsewhere', { spec: { database: { host: 'other', port: 5433, dbname: 'a', credentialsSecretRef: { name: 'c' } } } })],
      members: [], pods: [],
    });
    assert.deepEqual(report.servers.map((s) => s.server), ['other:5433', 'pg.internal:5432']);
    const shared = report.servers[1]!;
    assert.deepEqual(shared.connections.map((c) => `${c.namespace}/${c.name}`), ['team-a/orders-db', 'team-b/orders-db']);
    assert.equal(shared.limit, 51);
    assert.equal(shared.limitSetBy, 'DatabaseConnection team-a/orders-db, the first of 2 on this server: maxConnections auto (read from the server), reserve 15%');
    assert.match(shared.connections[1]!.problems[0]!, /^LimitConflict: this DatabaseConnection asks for a limit of 0/);
    assert.equal(report.servers[0]!.limit, undefined);
    assert.match(formatStatusReport(report), /SERVER other:5433 {3}limit unknown/);
    assert.match(report.servers[0]!.limitSetBy, /not known yet/);
  });

  it('says a DatabaseServer set the limit when the connection references one, and reads a source the controller records', function () {
    const byRef = buildStatusReport({ connections: [connection('a', 'db', { spec: { serverRef: { name: 'main-pg' } }, status: readyStatus })], members: [], pods: [] });
    assert.equal(byRef.servers[0]!.limitSetBy, 'DatabaseServer main-pg');
    assert.equal(byRef.servers[0]!.server, 'pg.internal:5432 (DatabaseServer main-pg)');
    const bySource = buildStatusReport({ connections: [connection('a', 'db', { status: { ...readyStatus, limit: { ...readyStatus.limit, source: 'DatabaseServer main-pg: maxConnections 200 - reserve 30' } } })], members: [], pods: [] });
    assert.equal(bySource.servers[0]!.limitSetBy, 'DatabaseServer main-pg: maxConnections 200 - reserve 30');
  });

  it('reads unknown shapes without throwing: missing status, odd types, members without spec', function () {
    const report = buildStatusReport({
      connections: [{ metadata: { namespace: 'a', name: 'b' }, spec: { database: { host: 'h' }, consumers: [{ name: 'c', minPerPod: '3' }] }, status: { limit: { effective: 'x' }, consumers: 'no' } }, null, 42],
      members: [{ metadata: { namespace: 'a', name: 'p' } }, 'junk'],
      pods: [pod('a', 'p', 'b', 'c'), { metadata: { namespace: 'a', name: 'done', labels: { 'poolkeeper.dev/connection': 'b' } }, status: { phase: 'Succeeded' } }],
    });
    assert.equal(report.servers.length, 2);
    const text = formatStatusReport(report);
    assert.match(text, /limit unknown/);
    assert.match(text, /p +c +- +- +- +sidecar not reporting/);
    assert.doesNotMatch(text, /done/);
  });

  it('finds the consumer of a pod admitted without the webhook from its owner', function () {
    const owned = { metadata: { namespace: 's', name: 'web-5d8f-x', labels: { 'poolkeeper.dev/connection': 'superset-db', 'pod-template-hash': '5d8f' }, ownerReferences: [{ kind: 'ReplicaSet', name: 'web-5d8f', controller: true }] }, status: { phase: 'Pending' } };
    const report = buildStatusReport({ connections: [connection('s', 'superset-db', { status: { ...readyStatus, consumers: undefined } })], members: [], pods: [owned] });
    const row = report.servers[0]!.connections[0]!;
    assert.equal(row.pods[0]!.consumer, 'web');
    assert.deepEqual(row.consumers.map((c) => c.pods), [1, 0]);
  });

  it('takes the acknowledged grant of a member whose grants come from a grant table', function () {
    const tabled = { metadata: { namespace: 's', name: 'a' }, spec: { grant: { connections: 0, generation: 1 }, tableFrom: 4 }, status: { acknowledgedGeneration: 1, acknowledgedConnections: 10, heldConnections: 7 } };
    const report = buildStatusReport({ connections: [connection('s', 'superset-db', { status: readyStatus })], members: [tabled], pods: [pod('s', 'a', 'superset-db', 'web')] });
    assert.deepEqual([report.servers[0]!.connections[0]!.pods[0]!.grant, report.servers[0]!.connections[0]!.pods[0]!.held], [10, 7]);
  });

  it('takes the grant of a member on a table from the table, acknowledged as the table says (before the sidecar\'s status catches up)', function () {
    const members = ['a', 'b'].map((name) => ({ metadata: { namespace: 's', name }, spec: { grant: { connections: 0, generation: 1 }, tableFrom: 4 }, status: { acknowledgedGeneration: 4, acknowledgedConnections: 10, heldConnections: 9, tableGeneration: 4 } }));
    // a: shrunk to 6 by generation 7, acknowledged over the channel (no `since` left); b: still in flight since 7.
    const grant = { metadata: { namespace: 's', name: 'superset-db' }, spec: { connection: 'superset-db', generation: 8, perPod: 6, recordsChanges: true, exceptions: [{ connections: 6, since: 7, releasing: 10, pods: ['b'] }] } };
    const report = buildStatusReport({ connections: [connection('s', 'superset-db', { status: readyStatus })], members, pods: [pod('s', 'a', 'superset-db', 'web'), pod('s', 'b', 'superset-db', 'web')], grants: [grant] });
    const rows = report.servers[0]!.connections[0]!.pods.map((p) => [p.name, p.grant, p.held, p.state]);
    assert.deepEqual(rows, [['a', 6, 9, 'ok'], ['b', 6, 9, 'grant not acknowledged yet']]);
  });

  it('shows terminating and draining pods', function () {
    const report = buildStatusReport({
      connections: [connection('s', 'superset-db', { status: readyStatus })],
      members: [member('s', 'a', 0, 5, { acknowledgedGeneration: 5, heldConnections: 0, drained: true }), member('s', 'b', 3, 5, { acknowledgedGeneration: 5, heldConnections: 3, draining: true })],
      pods: [pod('s', 'a', 'superset-db', 'web', { deletionTimestamp: '2026-01-01T00:00:00Z' }), pod('s', 'b', 'superset-db', 'web')],
    });
    assert.deepEqual(report.servers[0]!.connections[0]!.pods.map((p) => p.state), ['terminating, drained', 'draining']);
  });

  it('shows pods whose sidecar cannot reach the database, and the Degraded message with the cause among the problems', function () {
    const degraded = { type: 'Degraded', status: 'True', reason: 'SidecarsCannotConnect', message: '1 of 2 sidecar(s) cannot reach the database: SQLSTATE 28P01: password authentication failed for user "app" (pods a)' };
    const report = buildStatusReport({
      connections: [connection('s', 'superset-db', { status: { ...readyStatus, conditions: [...readyStatus.conditions, degraded] } })],
      members: [
        member('s', 'a', 3, 5, { acknowledgedGeneration: 5, heldConnections: 0, conditions: [{ type: 'DatabaseReachable', status: 'False', reason: 'LoginFailed', message: 'SQLSTATE 28P01: password authentication failed for user "app"' }] }),
        member('s', 'b', 3, 5, { acknowledgedGeneration: 5, heldConnections: 3, conditions: [{ type: 'DatabaseReachable', status: 'True', reason: 'LoggedIn', message: 'logged in as app' }] }),
      ],
      pods: [pod('s', 'a', 'superset-db', 'web'), pod('s', 'b', 'superset-db', 'web')],
    });
    const c = report.servers[0]!.connections[0]!;
    assert.deepEqual(c.pods.map((p) => p.state), ['cannot reach the database (LoginFailed)', 'ok']);
    assert.ok(c.problems.includes(`Degraded: ${degraded.message}`), JSON.stringify(c.problems));
    assert.match(formatStatusReport(report), /a\s.*cannot reach the database \(LoginFailed\)[\s\S]*Degraded: 1 of 2 sidecar\(s\) cannot reach the database: SQLSTATE 28P01/);
  });

  it('lists a pooler that pools by transaction among the problems, and not one in session mode', function () {
    const withPooler = (reason: string): string[] => {
      const pooler = { type: 'PoolerInFront', status: 'True', reason, message: `pgbouncer:6432 is a connection pooler (${reason})` };
      const report = buildStatusReport({ connections: [connection('s', 'superset-db', { status: { ...readyStatus, conditions: [...readyStatus.conditions, pooler] } })], members: [], pods: [] });
      return report.servers[0]!.connections[0]!.problems;
    };
    assert.deepEqual(withPooler('TransactionPooler'), ['PoolerInFront: pgbouncer:6432 is a connection pooler (TransactionPooler)']);
    assert.deepEqual(withPooler('Pooler'), []);
  });

  it('when the minimums exceed the limit, says by how much and three ways out with numbers', function () {
    const status = { ...readyStatus, limit: { discovered: 97, reserve: 15, effective: 82, shared: 1 }, consumers: [{ name: 'web', pods: 15, perPodBudget: 4, perProcessBudget: 1 }, { name: 'worker', pods: 6, perPodBudget: 3, perProcessBudget: 0 }],
      conditions: [{ type: 'Oversubscribed', status: 'True', reason: 'MinimumsExceedLimit', message: 'web: 15 pods x minPerPod 4 = 60; worker: 6 pods x minPerPod 4 = 24; total 84 > limit 82' }] };
    const report = buildStatusReport({ connections: [connection('s', 'superset-db', { status })], members: [], pods: [] });
    const o = report.servers[0]!.oversubscription!;
    assert.deepEqual([o.needed, o.limit, o.excess], [84, 82, 2]);
    assert.deepEqual(o.advice, [
      'raise the limit by 2 to 84: max_connections (or a numeric maxConnections) up by at least 2, plus what the reserve takes of it',
      'scale s/superset-db consumer web from 15 to 14 pods (4 each)',
      'lower s/superset-db consumer web\'s minPerPod from 4 to 3 (15 pods), below its processesPerPod 4: some processes would wait for each other',
      'scale s/superset-db consumer worker from 6 to 5 pods (4 each)',
      'lower s/superset-db consumer worker\'s minPerPod from 4 to 3 (6 pods), below its processesPerPod 4: some processes would wait for each other',
    ]);
    const text = formatStatusReport(report);
    assert.match(text, /OVERSUBSCRIBED: the pods' minimums need 84 connections, the limit is 82 \(2 short\)/);
    assert.match(text, /! Oversubscribed: web: 15 pods x minPerPod 4 = 60/);
    assert.equal(oversubscription(report.servers[0]!.connections, 84), undefined);
  });

  it('prints a line when there is nothing', function () {
    assert.equal(formatStatusReport({ servers: [] }), 'No DatabaseConnections found.\n');
  });
});

describe('status arguments', function () {
  it('takes -n, --namespace=, -A, -o json, --kubeconfig and --context; the default namespace is the context\'s', function () {
    assert.deepEqual(parseStatusArgs([]), { namespace: '', kubeconfig: undefined, context: undefined, output: 'text', help: false });
    assert.equal(parseStatusArgs(['-n', 'shop']).namespace, 'shop');
    assert.equal(parseStatusArgs(['-nshop']).namespace, 'shop');
    assert.equal(parseStatusArgs(['--namespace=shop']).namespace, 'shop');
    assert.equal(parseStatusArgs(['-A']).namespace, undefined);
    assert.deepEqual(parseStatusArgs(['-o', 'json', '--kubeconfig', '/k', '--context=c']), { namespace: '', kubeconfig: '/k', context: 'c', output: 'json', help: false });
    assert.equal(parseStatusArgs(['--help']).help, true);
  });

  it('refuses mistakes with one line', function () {
    assert.throws(() => parseStatusArgs(['-n']), /-n needs a value/);
    assert.throws(() => parseStatusArgs(['-n', 'a', '-A']), /either --namespace or --all-namespaces/);
    assert.throws(() => parseStatusArgs(['-o', 'yaml']), /text or json/);
    assert.throws(() => parseStatusArgs(['--watch']), /unknown argument --watch/);
  });
});
