/**
 * The foundation's own tests: each component of the local environment does
 * what later tests rely on, against the real binaries.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { AppsV1Api, CoreV1Api, CustomObjectsApi, Watch } from '@kubernetes/client-node';
import pg from 'pg';
import { Client as SshClient, type ClientChannel } from 'ssh2';
import { testEnvironment } from '../support/hooks.ts';
import { channelAsSocket } from '../../src/controller/limit-discovery.ts';
import { fingerprintOf } from '../../src/devenv/sshd.ts';

const env = testEnvironment();

describe('local environment', function () {
  describe('kube-apiserver, etcd and kube-controller-manager', function () {
    it('accepts a CRD from kubectl and streams its objects to a client-node watch', async function () {
      const kube = await env.kube();
      kube.kubectl(['apply', '-f', 'test/fixtures/widget-crd.yaml']);
      kube.kubectl(['wait', '--for=condition=Established', '--timeout=60s', 'crd/widgets.envtest.poolkeeper.dev']);

      // Established can precede the resource being served for a moment.
      for (let i = 0; i < 50; i += 1) {
        try {
          kube.kubectl(['get', 'widgets', '-n', 'default']);
          break;
        } catch {
          await new Promise((r) => setTimeout(r, 200));
        }
      }
      const kc = kube.kubeConfig();
      const seen: string[] = [];
      let resolveSeen!: () => void;
      const gotIt = new Promise<void>((resolve) => (resolveSeen = resolve));
      const request = await new Watch(kc).watch('/apis/envtest.poolkeeper.dev/v1/namespaces/default/widgets', {}, (phase, obj: { metadata: { name: string } }) => {
        seen.push(`${phase} ${obj.metadata.name}`);
        if (obj.metadata.name === 'w1') resolveSeen();
      }, () => undefined);
      await kc.makeApiClient(CustomObjectsApi).createNamespacedCustomObject({
        group: 'envtest.poolkeeper.dev', version: 'v1', namespace: 'default', plural: 'widgets',
        body: { apiVersion: 'envtest.poolkeeper.dev/v1', kind: 'Widget', metadata: { name: 'w1' }, spec: { size: 3 } },
      });
      await gotIt;
      request.abort();
      assert.ok(seen.includes('ADDED w1'), `watch saw ${seen.join(', ')}`);
    });

    it('validates custom resources with the CRD schema and names the field', async function () {
      const kube = await env.kube();
      assert.throws(
        () => kube.kubectl(['apply', '-f', '-'], 'apiVersion: envtest.poolkeeper.dev/v1\nkind: Widget\nmetadata: {name: bad}\nspec: {size: 0}\n'),
        /spec\.size/,
      );
    });

    it('runs kube-controller-manager: a Deployment gets a ReplicaSet and Pods', async function () {
      const kube = await env.kube();
      const kc = kube.kubeConfig();
      const namespace = `env-${randomBytes(3).toString('hex')}`;
      await kc.makeApiClient(CoreV1Api).createNamespace({ body: { metadata: { name: namespace } } });
      await kc.makeApiClient(AppsV1Api).createNamespacedDeployment({
        namespace,
        body: {
          metadata: { name: 'web' },
          spec: {
            replicas: 2,
            selector: { matchLabels: { app: 'web' } },
            template: { metadata: { labels: { app: 'web' } }, spec: { containers: [{ name: 'web', image: 'example.invalid/web:1' }] } },
          },
        },
      });
      const core = kc.makeApiClient(CoreV1Api);
      const deadline = Date.now() + 30_000;
      let pods = 0;
      while (Date.now() < deadline) {
        pods = (await core.listNamespacedPod({ namespace, labelSelector: 'app=web' })).items.length;
        if (pods === 2) break;
        await new Promise((r) => setTimeout(r, 200));
      }
      assert.equal(pods, 2);
    });

    it('enforces RBAC: a ServiceAccount token without a Role is forbidden', async function () {
      const kube = await env.kube();
      kube.kubectl(['create', 'serviceaccount', 'nobody', '-n', 'default']);
      const token = kube.kubectl(['create', 'token', 'nobody', '-n', 'default']).trim();
      const core = kube.kubeConfigForToken(token).makeApiClient(CoreV1Api);
      await assert.rejects(core.listNamespacedSecret({ namespace: 'default' }), (err: { code?: number }) => err.code === 403);
    });
  });

  describe('PostgreSQL', function () {
    it('logs the app role in with SCRAM-SHA-256 and enforces max_connections', async function () {
      const postgres = await env.postgres();
      const client = new pg.Client(postgres.clientConfig(postgres.app));
      await client.connect();
      try {
        const res = await client.query<{ user: string; max: string }>("SELECT current_user AS user, current_setting('max_connections') AS max");
        assert.deepEqual(res.rows[0], { user: 'app', max: String(postgres.options.maxConnections) });
      } finally {
        await client.end();
      }
      const verifier = await postgres.query<{ v: string }>("SELECT rolpassword AS v FROM pg_authid WHERE rolname = 'app'");
      assert.match(verifier[0]!.v, /^SCRAM-SHA-256\$/);
    });

    it('refuses a wrong password with SQLSTATE 28P01', async function () {
      const postgres = await env.postgres();
      const client = new pg.Client({ ...postgres.clientConfig(postgres.app), password: 'wrong' });
      await assert.rejects(client.connect(), (err: { code?: string }) => err.code === '28P01');
    });

    it('logs the md5 role in with md5', async function () {
      const postgres = await env.postgres();
      const client = new pg.Client(postgres.clientConfig(postgres.appMd5));
      await client.connect();
      await client.end();
      const verifier = await postgres.query<{ v: string }>("SELECT rolpassword AS v FROM pg_authid WHERE rolname = 'app_md5'");
      assert.match(verifier[0]!.v, /^md5/);
    });
  });

  describe('OpenSSH', function () {
    function connect(hostFingerprint: string): Promise<SshClient> {
      return env.sshd().then((sshd) => new Promise((resolve, reject) => {
        const ssh = new SshClient();
        ssh.once('ready', () => resolve(ssh));
        ssh.once('error', reject);
        ssh.connect({
          host: sshd.host, port: sshd.port, username: sshd.username, privateKey: sshd.userPrivateKey,
          hostVerifier: (key: Buffer) => fingerprintOf(`ssh-ed25519 ${key.toString('base64')}`) === hostFingerprint,
        });
      }));
    }

    it('forwards a channel to PostgreSQL and runs SELECT 1 through it', async function () {
      const [sshd, postgres] = await Promise.all([env.sshd(), env.postgres()]);
      const ssh = await connect(sshd.hostKeyFingerprint);
      try {
        const channel = await new Promise<ClientChannel>((resolve, reject) => {
          ssh.forwardOut('127.0.0.1', 0, postgres.host, postgres.port, (err, ch) => (err ? reject(err) : resolve(ch)));
        });
        const socketLike = channelAsSocket(channel);
        const client = new pg.Client({ ...postgres.clientConfig(postgres.app), stream: () => socketLike });
        await client.connect();
        const res = await client.query<{ one: number }>('SELECT 1 AS one');
        assert.equal(res.rows[0]!.one, 1);
        await client.end();
      } finally {
        ssh.end();
      }
    });

    it('lets a client refuse a host key that does not match', async function () {
      await assert.rejects(connect('SHA256:not-the-right-key'), /verification failed/i);
    });
  });

  describe('PgBouncer', function () {
    it('pools the app role in transaction mode', async function () {
      const bouncer = await env.pgbouncer();
      const client = new pg.Client(bouncer.clientConfig());
      await client.connect();
      const res = await client.query<{ one: number }>('SELECT 1 AS one');
      assert.equal(res.rows[0]!.one, 1);
      await client.end();
    });
  });
});
