import assert from 'node:assert/strict';
import { connectionConditions, limitMismatchCondition, oversubscriptionAdvice, poolerCondition, sidecarReachabilityCondition, type ConnectionFacts } from '../../src/core/conditions/connection.ts';
import { redactSecrets } from '../../src/core/conditions/redact.ts';
import { classifyLoginError } from '../../src/controller/verifier.ts';

const ready = { type: 'Ready', status: 'True' as const, reason: 'Allocated', message: '2 pods at their budget' };
const base: ConnectionFacts = {
  name: 'orders',
  verification: { state: 'ok' },
  limitKnown: true,
  consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, workload: { replicas: 2, templateConnection: 'orders' }, pods: 2 }],
  podsWithoutConsumer: [],
  budgetReady: ready,
};

describe('connection conditions', function () {
  it('is Ready from the budget when it can serve', function () {
    const [r, matched] = connectionConditions(base);
    assert.deepEqual(r, ready);
    assert.equal(matched?.status, 'True');
  });

  it('is not Ready when the login failed, quoting the reason', function () {
    const [r] = connectionConditions({ ...base, verification: { state: 'failed', reason: 'CredentialsRejected', message: 'the server rejected the login: "password authentication failed for user "app""' } });
    assert.equal(r?.status, 'False');
    assert.equal(r?.reason, 'CredentialsRejected');
    assert.match(r?.message ?? '', /password authentication failed/);
  });

  it('names a workload whose pod template lacks the label, and pods no consumer selects', function () {
    const [r, matched] = connectionConditions({ ...base, consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, workload: { replicas: 3, templateConnection: undefined }, pods: 0 }] });
    assert.equal(r?.reason, 'WorkloadNotOptedIn');
    assert.match(r?.message ?? '', /pod template of Deployment web lacks the label poolkeeper.dev\/connection=orders, so its 3 pod\(s\)/);
    assert.equal(matched?.reason, 'ConsumerWithoutPods');
    const [r2, m2] = connectionConditions({ ...base, podsWithoutConsumer: ['stray-1'] });
    assert.equal(r2?.reason, 'PodsWithoutConsumer');
    assert.match(m2?.message ?? '', /stray-1/);
  });

  it('a workload scaled to zero is not a problem', function () {
    const [r, matched] = connectionConditions({ ...base, consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, workload: { replicas: 0, templateConnection: undefined }, pods: 0 }] });
    assert.equal(r?.status, 'True');
    assert.equal(matched?.status, 'True');
  });

  it('warns when maxConnections is above the server, with both numbers', function () {
    const c = limitMismatchCondition(500, { maxConnections: 60, superuserReserved: 3, available: 57 });
    assert.equal(c.status, 'True');
    assert.match(c.message, /maxConnections 500 is above .*max_connections 60 - superuser_reserved_connections 3 = 57/);
    assert.equal(limitMismatchCondition(40, { maxConnections: 60, superuserReserved: 3, available: 57 }).status, 'False');
  });

  it('says whether a pooler answers at the address, and what a transaction pooler loses', function () {
    const direct = poolerCondition(undefined, 'db:5432');
    assert.deepEqual([direct.type, direct.status, direct.reason], ['PoolerInFront', 'False', 'PostgreSQL']);
    const transaction = poolerCondition({ transactionPooling: true }, 'db-pooler:6432');
    assert.deepEqual([transaction.status, transaction.reason], ['True', 'TransactionPooler']);
    assert.match(transaction.message, /^db-pooler:6432 is a connection pooler that pools by transaction/);
    assert.match(transaction.message, /session state does not last from one transaction to the next/);
    assert.match(transaction.message, /Point spec\.database at PostgreSQL itself/);
    assert.match(transaction.message, /max_client_conn\), set maxConnections to it/);
    const session = poolerCondition({ transactionPooling: false }, 'db-pooler:6432');
    assert.deepEqual([session.status, session.reason], ['True', 'Pooler']);
    assert.match(session.message, /not seen pooling by transaction/);
  });

  it('advises how to fix oversubscription with numbers', function () {
    const advice = oversubscriptionAdvice(10, [{ connection: 'shop/orders', consumer: 'web', pods: 4, minPerPod: 3 }]);
    assert.match(advice, /raise the limit to at least 12/);
    assert.match(advice, /lower minPerPod of shop\/orders consumer web from 3 to 2/);
    assert.match(advice, /run at most 3 pods of shop\/orders consumer web \(now 4\)/);
    assert.equal(oversubscriptionAdvice(20, [{ connection: 'a/b', consumer: 'web', pods: 4, minPerPod: 3 }]), '');
  });

  it('classifies login errors by SQLSTATE', function () {
    assert.equal(classifyLoginError(Object.assign(new Error('password authentication failed for user "app"'), { code: '28P01' })).reason, 'CredentialsRejected');
    assert.equal(classifyLoginError(Object.assign(new Error('database "nope" does not exist'), { code: '3D000' })).reason, 'DatabaseNotFound');
    assert.equal(classifyLoginError(Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:1'), { code: 'ECONNREFUSED' })).reason, 'ConnectionFailed');
  });

  it('redacts secrets and URL passwords, whatever surrounds them', function () {
    const hostile = ['p@ss:w/rd', 'hunter2', "'; DROP TABLE x; --", 'ключ-секрет', 'a'.repeat(300)];
    for (const secret of hostile) {
      const text = `login to postgresql://app:${secret}@db:5432/app failed; password was ${secret}.`;
      const out = redactSecrets(text, [secret]);
      assert.ok(!out.includes(secret), out);
    }
    assert.equal(redactSecrets('postgres://u:pw@h/db'), 'postgres://u:***@h/db');
    assert.equal(redactSecrets('nothing here', ['secret']), 'nothing here');
  });
});

describe('sidecar reachability conditions', function () {
  const password = 'SQLSTATE 28P01: password authentication failed for user "app"';
  const refused = 'connect ECONNREFUSED 10.0.0.5:5432';

  it('no Degraded row while no sidecar reports a failure; Ready from the budget', function () {
    assert.equal(sidecarReachabilityCondition({ sidecars: 3, unreachable: [] }), undefined);
    assert.equal(sidecarReachabilityCondition({ sidecars: 0, unreachable: [] }), undefined);
    assert.deepEqual(connectionConditions({ ...base, sidecars: { sidecars: 3, unreachable: [] } })[0], ready);
    assert.deepEqual(connectionConditions({ ...base, sidecars: { sidecars: 0, unreachable: [] } })[0], ready);
  });

  it('Degraded=True SidecarsCannotConnect: some sidecars fail, with the count, the most common cause and its pods; Ready stays', function () {
    const facts = { sidecars: 10, unreachable: [{ pod: 'web-c', cause: password }, { pod: 'web-a', cause: password }, { pod: 'web-b', cause: refused }] };
    const degraded = sidecarReachabilityCondition(facts);
    assert.equal(degraded?.type, 'Degraded');
    assert.equal(degraded?.status, 'True');
    assert.equal(degraded?.reason, 'SidecarsCannotConnect');
    assert.match(degraded?.message ?? '', /^3 of 10 sidecar\(s\) cannot reach the database: SQLSTATE 28P01: password authentication failed for user "app" \(pods web-a, web-c\); 1 more with 1 other cause\(s\), e\.g\. connect ECONNREFUSED/);
    assert.match(degraded?.message ?? '', /NetworkPolicy/);
    assert.deepEqual(connectionConditions({ ...base, sidecars: facts })[0], ready);
  });

  it('Degraded=True SidecarsCannotConnect: the same text whatever order the sidecars come in (equal counts by cause)', function () {
    const a = sidecarReachabilityCondition({ sidecars: 4, unreachable: [{ pod: 'p1', cause: refused }, { pod: 'p2', cause: password }] });
    const b = sidecarReachabilityCondition({ sidecars: 4, unreachable: [{ pod: 'p2', cause: password }, { pod: 'p1', cause: refused }] });
    assert.deepEqual(a, b);
  });

  it('Degraded=True SidecarsCannotConnect: at most five pods named', function () {
    const unreachable = Array.from({ length: 8 }, (_, i) => ({ pod: `web-${i}`, cause: refused }));
    assert.match(sidecarReachabilityCondition({ sidecars: 8, unreachable })?.message ?? '', /\(pods web-0, web-1, web-2, web-3, web-4, \.\.\. \(8 in all\)\)/);
  });

  it('Ready=False SidecarsCannotConnect: every reporting sidecar fails', function () {
    const [r] = connectionConditions({ ...base, sidecars: { sidecars: 2, unreachable: [{ pod: 'web-a', cause: password }, { pod: 'web-b', cause: password }] } });
    assert.equal(r?.status, 'False');
    assert.equal(r?.reason, 'SidecarsCannotConnect');
    assert.match(r?.message ?? '', /^none of the 2 sidecar\(s\) can reach the database: SQLSTATE 28P01: password authentication failed for user "app" \(pods web-a, web-b\)/);
  });

  it('Ready=False from the controller\'s own failed login comes before SidecarsCannotConnect', function () {
    const [r] = connectionConditions({ ...base, verification: { state: 'failed', reason: 'CredentialsRejected', message: 'rejected' }, sidecars: { sidecars: 1, unreachable: [{ pod: 'web-a', cause: password }] } });
    assert.equal(r?.reason, 'CredentialsRejected');
  });
});
