/**
 * The generated CRDs on the real kube-apiserver: a full valid DatabaseConnection
 * is accepted and defaulted, and each kind of mistake is refused at
 * `kubectl apply` with a message that names the field.
 */
/* eslint-disable @typescript-eslint/no-explicit-any, @typescript-eslint/no-unsafe-member-access -- the mistakes are deliberately ill-typed specs */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { stringify, parse } from 'yaml';
import { testEnvironment } from '../support/hooks.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import type { DatabaseConnection, DatabaseConnectionSpecInput, PoolMember } from '../../src/api/index.ts';

const env = testEnvironment();
const namespace = `crd-${randomBytes(3).toString('hex')}`;

/** A complete spec using every field, valid. */
function validSpec(): DatabaseConnectionSpecInput {
  return {
    database: {
      host: 'orders.db.internal',
      dbname: 'orders',
      sslMode: 'require',
      credentialsSecretRef: { name: 'orders-db-credentials' },
    },
    sshTunnel: {
      host: 'bastion.internal',
      user: 'tunnel',
      privateKeySecretRef: { name: 'bastion-key' },
      hostKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFkq0XnR3o9gP1RzvV6j1mJ7n0u2pN8HkqVbqY3p6XQm',
    },
    maxConnections: 100,
    reserve: '10%',
    budgetStrategy: 'Dynamic',
    consumers: [
      { name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, weight: 2, minPerPod: 1, maxPerPod: 20, processesPerPod: 4 },
      { name: 'worker', selector: { matchLabels: { app: 'worker' } } },
    ],
    pool: { mode: 'transaction', poolTimeout: 30, poolRecycle: -1, poolPrePing: true, idleTimeout: 600 },
    sidecar: { port: 6432, drainTimeout: 20 },
  };
}

function manifest(name: string, spec: unknown): string {
  return stringify({ apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name, namespace }, spec });
}

/** Applies `spec` after `mutate` and returns kubectl's error message (fails if accepted). */
function refusal(kube: KubeControlPlane, mutate: (spec: Record<string, any>) => void): string {
  const spec = structuredClone(validSpec()) as Record<string, any>;
  mutate(spec);
  const name = `bad-${randomBytes(3).toString('hex')}`;
  try {
    kube.kubectl(['apply', '-f', '-'], manifest(name, spec));
  } catch (err) {
    return (err as Error).message;
  }
  assert.fail(`kubectl accepted ${JSON.stringify(spec)}`);
}

async function servedWithin(kube: KubeControlPlane, resource: string): Promise<void> {
  // Established can precede the resource being served for a moment.
  for (let i = 0; i < 100; i += 1) {
    try {
      kube.kubectl(['get', resource, '-n', namespace]);
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  throw new Error(`${resource} not served`);
}

describe('CRDs on the API server', function () {
  let kube: KubeControlPlane;

  before(async function () {
    kube = await env.kube();
    kube.kubectl(['apply', '-f', 'crds/']);
    kube.kubectl(['wait', '--for=condition=Established', '--timeout=60s', 'crd/databaseconnections.poolkeeper.dev', 'crd/poolmembers.poolkeeper.dev']);
    kube.kubectl(['create', 'namespace', namespace]);
    await servedWithin(kube, 'dbc');
    await servedWithin(kube, 'pm');
  });

  it('accepts a full DatabaseConnection and fills in the defaults', function () {
    const spec = validSpec();
    kube.kubectl(['apply', '-f', '-'], manifest('orders-db', spec));
    const stored = JSON.parse(kube.kubectl(['get', 'dbc', 'orders-db', '-n', namespace, '-o', 'json'])) as DatabaseConnection;
    assert.equal(stored.spec.database.port, 5432);
    assert.equal(stored.spec.database.credentialsSecretRef.usernameKey, 'username');
    assert.equal(stored.spec.database.credentialsSecretRef.passwordKey, 'password');
    assert.equal(stored.spec.sshTunnel?.port, 22);
    assert.equal(stored.spec.sshTunnel?.privateKeySecretRef.key, 'ssh-privatekey');
    const worker = stored.spec.consumers.find((c) => c.name === 'worker');
    assert.deepEqual([worker?.weight, worker?.minPerPod, worker?.processesPerPod], [1, 1, 1]);
    assert.equal(stored.spec.maxConnections, 100);
  });

  it('defaults strategy, pool and sidecar of a minimal spec; maxConnections and reserve stay unset (the controller reads them as "auto" and "15%", or from a DatabaseServer)', function () {
    kube.kubectl(['apply', '-f', '-'], manifest('minimal', {
      database: { host: 'db', dbname: 'app', credentialsSecretRef: { name: 'creds' } },
      consumers: [{ name: 'web', workloadRef: { kind: 'StatefulSet', name: 'web' } }],
    }));
    const stored = JSON.parse(kube.kubectl(['get', 'databaseconnection', 'minimal', '-n', namespace, '-o', 'json'])) as DatabaseConnection;
    assert.equal(stored.spec.maxConnections, undefined);
    assert.equal(stored.spec.reserve, undefined);
    assert.equal(stored.spec.budgetStrategy, 'Dynamic');
    assert.equal(stored.spec.database.sslMode, 'prefer');
    assert.equal(stored.spec.database.channelBinding, 'prefer');
    assert.deepEqual(stored.spec.pool, { mode: 'transaction', poolTimeout: 30, poolRecycle: 3600, poolPrePing: false, idleTimeout: 600 });
    assert.deepEqual(stored.spec.sidecar, { port: 6432, drainTimeout: 30, clientTLS: 'Disabled' });
  });

  it('shows limit, pods, per-pod budget, allocated, ready and age in kubectl get dbc', function () {
    kube.kubectl(['patch', 'dbc', 'orders-db', '-n', namespace, '--subresource=status', '--type=merge', '-p', JSON.stringify({
      status: {
        limit: { discovered: 100, reserve: 10, effective: 90, shared: 1 }, allocated: 40, pods: 10, perPodBudget: 'web=4 worker=2',
        consumers: [{ name: 'web', pods: 8, perPodBudget: 4, perProcessBudget: 1 }, { name: 'worker', pods: 2, perPodBudget: 2, perProcessBudget: 2 }],
        conditions: [{ type: 'Ready', status: 'True', reason: 'Allocated', message: 'ok', lastTransitionTime: '2026-01-01T00:00:00Z', observedGeneration: 1 }],
      },
    })]);
    const table = kube.kubectl(['get', 'dbc', 'orders-db', '-n', namespace]);
    const [header, row] = table.trim().split('\n');
    assert.match(header!, /NAME\s+LIMIT\s+PODS\s+PER-POD\s+ALLOCATED\s+READY\s+AGE/);
    assert.match(row!, /orders-db\s+90\s+10\s+web=4 worker=2\s+40\s+True\s+\S+/);
  });

  it('accepts a PoolMember and shows acknowledged and held in kubectl get pm, spec.grant and the table switch with -o wide', function () {
    const member: Omit<PoolMember, 'spec'> & { spec: unknown } = {
      apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'PoolMember', metadata: { name: 'web-1', namespace },
      spec: {
        connection: 'orders-db', grant: { connections: 4, generation: 7 }, processesPerPod: 2, credentialsGeneration: '3f2a9c0d1e2b4a5f',
        database: { host: 'db.example', port: 5432, dbname: 'app', sslMode: 'disable' },
        pool: { mode: 'transaction', poolTimeout: 30, poolRecycle: 1800, poolPrePing: true, idleTimeout: 600 },
      },
    };
    kube.kubectl(['apply', '-f', '-'], stringify(member));
    kube.kubectl(['patch', 'pm', 'web-1', '-n', namespace, '--subresource=status', '--type=merge', '-p', JSON.stringify({
      status: {
        acknowledgedGeneration: 7, acknowledgedConnections: 4, heldConnections: 3, waitingClients: 2, drained: false, heartbeatTime: '2026-01-01T00:00:00Z',
        conditions: [{ type: 'DatabaseReachable', status: 'False', reason: 'LoginFailed', message: 'SQLSTATE 28P01: password authentication failed for user "app"', lastTransitionTime: '2026-01-01T00:00:00Z' }],
      },
    })]);
    const [header, row] = kube.kubectl(['get', 'pm', 'web-1', '-n', namespace]).trim().split('\n');
    assert.match(header!, /NAME\s+ACKNOWLEDGED\s+HELD\s+WAITING\s+REACHABLE\s+AGE/);
    assert.match(row!, /web-1\s+4\s+3\s+2\s+False\s+\S+/);
    // spec.grant and the table switch only with -o wide: for a pod on the grant table spec.grant is history.
    const [wideHeader, wideRow] = kube.kubectl(['get', 'pm', 'web-1', '-n', namespace, '-o', 'wide']).trim().split('\n');
    assert.match(wideHeader!, /NAME\s+ACKNOWLEDGED\s+HELD\s+WAITING\s+REACHABLE\s+GRANT\s+TABLE-FROM\s+AGE/);
    // TABLE-FROM is empty: this pod takes its grant from spec.grant.
    assert.match(wideRow!, /^web-1\s+4\s+3\s+2\s+False\s+4\s+\S+$/);
    const stored = parse(kube.kubectl(['get', 'pm', 'web-1', '-n', namespace, '-o', 'yaml'])) as PoolMember;
    assert.equal(stored.spec.drain, false);
  });

  it('refuses a PoolMember with a negative grant', function () {
    assert.throws(() => kube.kubectl(['apply', '-f', '-'], stringify({
      apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'PoolMember', metadata: { name: 'bad-pm', namespace },
      spec: {
        connection: 'x', grant: { connections: -1, generation: 1 },
        database: { host: 'h', port: 5432, dbname: 'd', sslMode: 'disable' },
        pool: { mode: 'transaction', poolTimeout: 30, poolRecycle: 1800, poolPrePing: true, idleTimeout: 600 },
      },
    })), /spec\.grant\.connections/);
  });

  describe('refuses a bad DatabaseConnection with a message naming the field', function () {
    const mistakes: [string, (spec: Record<string, any>) => void, RegExp][] = [
      ['port out of range', (s) => { s.database.port = 70000; }, /spec\.database\.port/],
      ['no host', (s) => { delete s.database.host; }, /spec\.database\.host: Required/],
      ['no dbname', (s) => { delete s.database.dbname; }, /spec\.database\.dbname: Required/],
      ['no credentials secret name', (s) => { s.database.credentialsSecretRef = {}; }, /spec\.database\.credentialsSecretRef\.name: Required/],
      ['unknown sslMode', (s) => { s.database.sslMode = 'strict'; }, /spec\.database\.sslMode: Unsupported value: "strict"/],
      ['unknown channelBinding', (s) => { s.database.channelBinding = 'always'; }, /spec\.database\.channelBinding: Unsupported value: "always"/],
      ['channelBinding require without TLS', (s) => { s.database.sslMode = 'disable'; s.database.channelBinding = 'require'; }, /spec\.database\.channelBinding: .*channelBinding require binds the login to the TLS connection: set sslMode to prefer, require, verify-ca or verify-full/],
      ['maxConnections 0', (s) => { s.maxConnections = 0; }, /spec\.maxConnections: .*maxConnections must be an integer >= 1 or "auto"/],
      ['maxConnections a word', (s) => { s.maxConnections = 'lots'; }, /spec\.maxConnections: .*maxConnections must be an integer >= 1 or "auto"/],
      ['reserve 95%', (s) => { s.reserve = '95%'; }, /spec\.reserve: .*reserve must be an integer >= 0 or a percent/],
      ['reserve negative', (s) => { s.reserve = -1; }, /spec\.reserve: .*reserve must be/],
      ['unknown budgetStrategy', (s) => { s.budgetStrategy = 'Greedy'; }, /spec\.budgetStrategy: Unsupported value: "Greedy"/],
      ['no consumers', (s) => { s.consumers = []; }, /spec\.consumers: .*(at least 1|should have at least 1)/],
      ['duplicate consumer names', (s) => { s.consumers[1].name = 'web'; }, /spec\.consumers\[1\]: Duplicate value/],
      ['both workloadRef and selector', (s) => { s.consumers[0].selector = { matchLabels: { app: 'web' } }; }, /spec\.consumers\[0\]: .*exactly one of workloadRef or selector/],
      ['neither workloadRef nor selector', (s) => { delete s.consumers[1].selector; }, /spec\.consumers\[1\]: .*exactly one of workloadRef or selector/],
      ['weight 0', (s) => { s.consumers[0].weight = 0; }, /spec\.consumers\[0\]\.weight/],
      ['negative minPerPod', (s) => { s.consumers[0].minPerPod = -1; }, /spec\.consumers\[0\]\.minPerPod/],
      ['maxPerPod below minPerPod', (s) => { s.consumers[0].minPerPod = 5; s.consumers[0].maxPerPod = 2; }, /spec\.consumers\[0\]\.maxPerPod: .*maxPerPod must be >= minPerPod/],
      ['processesPerPod 0', (s) => { s.consumers[0].processesPerPod = 0; }, /spec\.consumers\[0\]\.processesPerPod/],
      ['workloadRef kind DaemonSet', (s) => { s.consumers[0].workloadRef.kind = 'DaemonSet'; }, /spec\.consumers\[0\]\.workloadRef\.kind: Unsupported value: "DaemonSet"/],
      ['unknown pool mode', (s) => { s.pool.mode = 'statement'; }, /spec\.pool\.mode: Unsupported value: "statement"/],
      ['unknown clientTLS', (s) => { s.sidecar = { clientTLS: 'Required' }; }, /spec\.sidecar\.clientTLS: Unsupported value: "Required"/],
      ['poolTimeout 0', (s) => { s.pool.poolTimeout = 0; }, /spec\.pool\.poolTimeout/],
      ['poolRecycle 0', (s) => { s.pool.poolRecycle = 0; }, /spec\.pool\.poolRecycle: .*poolRecycle must be -1 \(never\) or > 0/],
      ['tunnel without hostKey', (s) => { delete s.sshTunnel.hostKey; }, /spec\.sshTunnel\.hostKey: Required/],
      ['hostKey that is not a key', (s) => { s.sshTunnel.hostKey = 'trust me'; }, /spec\.sshTunnel\.hostKey: .*hostKey must be a known_hosts key/],
      ['a URL with credentials as host', (s) => { s.database.host = 'postgresql://app:S3cret-pw@orders.db.internal:5432/orders'; }, /spec\.database\.host: .*must be a host name or IP address, not a URL/],
      ['user@host as host', (s) => { s.database.host = 'app:S3cret-pw@orders.db.internal'; }, /spec\.database\.host: .*must not contain "@"/],
      ['a URL as dbname', (s) => { s.database.dbname = 'postgres://app:S3cret-pw@db/orders'; }, /spec\.database\.dbname: .*not a URL/],
      ['a URL as bastion host', (s) => { s.sshTunnel.host = 'ssh://tunnel:S3cret-pw@bastion'; }, /spec\.sshTunnel\.host: .*not a URL/],
    ];
    for (const [what, mutate, message] of mistakes) {
      it(what, function () {
        const refused = refusal(kube, mutate);
        assert.match(refused, message);
        // The refusal does not echo a password back.
        assert.ok(!refused.includes('S3cret-pw'), refused);
      });
    }

    it('kubectl explain describes every field', function () {
      const paths = ['databaseconnection', 'databaseconnection.spec', 'databaseconnection.spec.database', 'databaseconnection.spec.database.credentialsSecretRef', 'databaseconnection.spec.sshTunnel',
        'databaseconnection.spec.consumers', 'databaseconnection.spec.consumers.selector', 'databaseconnection.spec.pool', 'databaseconnection.spec.sidecar', 'databaseconnection.status', 'databaseconnection.status.conditions', 'poolmember.spec', 'poolmember.status'];
      for (const path of paths) {
        const explained = kube.kubectl(['explain', path]);
        assert.doesNotMatch(explained, /<no description>|<empty>/, `${path}:\n${explained}`);
      }
      assert.match(kube.kubectl(['explain', 'databaseconnection.spec']), /A PostgreSQL server, its credentials/);
    });

    it('accepts a SHA256 host key fingerprint and a known_hosts line', function () {
      for (const hostKey of ['SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8', 'bastion.internal ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFkq0XnR3o9gP1RzvV6j1mJ7n0u2pN8HkqVbqY3p6XQm']) {
        const spec = validSpec();
        spec.sshTunnel!.hostKey = hostKey;
        kube.kubectl(['apply', '-f', '-'], manifest(`fp-${randomBytes(3).toString('hex')}`, spec));
      }
    });
  });
});
