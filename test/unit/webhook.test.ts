import assert from 'node:assert/strict';
import { request } from 'node:https';
import type { TLSSocket } from 'node:tls';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { DEFAULT_INJECTOR_SETTINGS, applyJsonPatch, type InjectableConnection, type JsonPatchOperation, type PodLike } from '../../src/core/inject/index.ts';
import { createCertificateAuthority, issueCertificate } from '../../src/pki/certificates.ts';
import { AdmissionMetrics, PodAdmissionHandler, type ConnectionLookup } from '../../src/webhook/admission.ts';
import { MUTATE_PODS_PATH, WebhookServer } from '../../src/webhook/server.ts';
import { webhookConfigFromEnv } from '../../src/webhook/runtime.ts';

const logger = pino({ level: 'silent' });
const settings = { ...DEFAULT_INJECTOR_SETTINGS, sidecarImage: 'poolkeeper/poolkeeper:test', version: '0.1.0' };
const connection: InjectableConnection = {
  metadata: { name: 'orders-db' },
  spec: { database: { host: 'db', dbname: 'orders', credentialsSecretRef: { name: 'creds' } }, consumers: [{ name: 'all', selector: {} }] },
};

class MapLookup implements ConnectionLookup {
  readonly calls: string[] = [];
  readonly fail: boolean;
  constructor(fail = false) {
    this.fail = fail;
  }
  get(namespace: string, name: string): Promise<InjectableConnection | undefined> {
    this.calls.push(`${namespace}/${name}`);
    if (this.fail) return Promise.reject(new Error('connection refused'));
    return Promise.resolve(name === 'orders-db' ? connection : undefined);
  }
}

function review(object: unknown, overrides: Record<string, unknown> = {}): unknown {
  return { apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview', request: { uid: 'uid-1', kind: { group: '', version: 'v1', kind: 'Pod' }, operation: 'CREATE', namespace: 'shop', object, ...overrides } };
}

const optedIn: PodLike = { metadata: { generateName: 'web-', labels: { 'poolkeeper.dev/connection': 'orders-db' } }, spec: { containers: [{ name: 'app' }] } };

describe('webhook: PodAdmissionHandler', function () {
  it('answers with a base64 JSON Patch that injects the sidecar, and counts it', async function () {
    const registry = new Registry();
    const handler = new PodAdmissionHandler(new MapLookup(), settings, logger, new AdmissionMetrics(registry));
    const answer = await handler.review(review(optedIn));
    assert.equal(answer.response.uid, 'uid-1');
    assert.equal(answer.response.allowed, true);
    assert.equal(answer.response.patchType, 'JSONPatch');
    const patch = JSON.parse(Buffer.from(answer.response.patch!, 'base64').toString('utf8')) as JsonPatchOperation[];
    const out = applyJsonPatch(optedIn, patch);
    assert.equal(out.spec!.initContainers![0]!.name, 'poolkeeper-sidecar');
    // Feeding the result back (reinvocation) yields nothing more.
    assert.deepEqual((await handler.review(review(out))).response, { uid: 'uid-1', allowed: true });
    assert.match(await registry.metrics(), /poolkeeper_webhook_admissions_total\{result="injected"\} 1/);
    assert.match(await registry.metrics(), /poolkeeper_webhook_admissions_total\{result="unchanged"\} 1/);
  });

  it('admits unmodified with a warning when the DatabaseConnection is missing or unreadable', async function () {
    const missing = await new PodAdmissionHandler(new MapLookup(), settings, logger).review(review({ ...optedIn, metadata: { labels: { 'poolkeeper.dev/connection': 'nope' } } }));
    assert.equal(missing.response.allowed, true);
    assert.equal(missing.response.patch, undefined);
    assert.match(missing.response.warnings![0]!, /shop\/nope does not exist/);
    const failing = await new PodAdmissionHandler(new MapLookup(true), settings, logger).review(review(optedIn));
    assert.equal(failing.response.allowed, true);
    assert.match(failing.response.warnings![0]!, /could not read/);
  });

  it('denies with every coded error when the pod cannot be injected', async function () {
    const pod = { ...optedIn, spec: { containers: [{ name: 'app', ports: [{ containerPort: 6432 }, { containerPort: settings.adminPort }] }] } };
    const answer = await new PodAdmissionHandler(new MapLookup(), settings, logger).review(review(pod));
    assert.equal(answer.response.allowed, false);
    assert.equal(answer.response.status?.code, 422);
    assert.equal(answer.response.status?.message.match(/\[PortConflict\]/g)?.length, 2);
  });

  it('does not look anything up for pods without the label, other operations or kinds', async function () {
    const lookup = new MapLookup();
    const handler = new PodAdmissionHandler(lookup, settings, logger);
    for (const body of [review({ metadata: {}, spec: { containers: [] } }), review(optedIn, { operation: 'UPDATE' }), review(optedIn, { kind: { group: 'apps', version: 'v1', kind: 'Deployment' } })]) {
      assert.deepEqual((await handler.review(body)).response, { uid: 'uid-1', allowed: true });
    }
    assert.deepEqual(lookup.calls, []);
  });

  it('rejects a body that is not an AdmissionReview v1', async function () {
    const handler = new PodAdmissionHandler(new MapLookup(), settings, logger);
    await assert.rejects(handler.review({ kind: 'AdmissionReview', apiVersion: 'admission.k8s.io/v1beta1', request: { uid: 'x' } }), /AdmissionReview/);
  });
});

describe('webhook: WebhookServer', function () {
  function post(port: number, ca: string[], body: string, servername = 'localhost'): Promise<{ status: number; body: string; issuer: string }> {
    return new Promise((resolve, reject) => {
      const req = request({ host: '127.0.0.1', port, path: MUTATE_PODS_PATH, method: 'POST', ca, servername, agent: false, headers: { 'content-type': 'application/json' } }, (res) => {
        const issuer = String((res.socket as TLSSocket).getPeerCertificate().issuer.CN);
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text, issuer }));
      });
      req.on('error', reject);
      req.end(body);
    });
  }

  it('serves AdmissionReviews over TLS, answers 400 to garbage, and swaps its certificate without a restart', async function () {
    const ca1 = await createCertificateAuthority('ca-one', 2);
    const ca2 = await createCertificateAuthority('ca-two', 2);
    const leaf = (ca: typeof ca1): ReturnType<typeof issueCertificate> => issueCertificate(ca, { commonName: 'localhost', dnsNames: ['localhost'], ipAddresses: ['127.0.0.1'], usage: 'server', validityDays: 1 });
    const server = new WebhookServer(new PodAdmissionHandler(new MapLookup(), settings, logger), await leaf(ca1), { host: '127.0.0.1', port: 0 }, logger);
    const port = await server.listen();
    try {
      const bundle = [ca1.certPem, ca2.certPem];
      const ok = await post(port, bundle, JSON.stringify(review(optedIn)));
      assert.equal(ok.status, 200);
      assert.equal((JSON.parse(ok.body) as { response: { allowed: boolean } }).response.allowed, true);
      assert.equal(ok.issuer, 'ca-one');
      assert.equal((await post(port, bundle, 'not json')).status, 400);
      assert.equal((await post(port, bundle, '{"kind":"Other"}')).status, 400);
      assert.equal(server.updateCertificate(await leaf(ca2)), true);
      const rotated = await post(port, bundle, JSON.stringify(review(optedIn)));
      assert.equal(rotated.status, 200);
      assert.equal(rotated.issuer, 'ca-two');
    } finally {
      await server.close();
    }
  });
});

describe('webhook: configuration from the environment', function () {
  it('reads the sidecar\'s UID from POOLKEEPER_SIDECAR_RUN_AS_USER: a UID, or platform for none; anything else stops the webhook with the variable named', function () {
    const base = { POOLKEEPER_SIDECAR_IMAGE: 'poolkeeper/poolkeeper:test' };
    assert.equal(webhookConfigFromEnv(base, '0.1.0').injector.runAsUser, 65532);
    assert.equal(webhookConfigFromEnv({ ...base, POOLKEEPER_SIDECAR_RUN_AS_USER: '1000680000' }, '0.1.0').injector.runAsUser, 1000680000);
    assert.equal(webhookConfigFromEnv({ ...base, POOLKEEPER_SIDECAR_RUN_AS_USER: 'platform' }, '0.1.0').injector.runAsUser, undefined);
    for (const wrong of ['0', 'root', '-1', '1.5']) {
      assert.throws(() => webhookConfigFromEnv({ ...base, POOLKEEPER_SIDECAR_RUN_AS_USER: wrong }, '0.1.0'), /POOLKEEPER_SIDECAR_RUN_AS_USER must be a UID >= 1 or "platform"/);
    }
  });
});
