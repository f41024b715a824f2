/**
 * The injection webhook on the real API server: registered through
 * clientConfig.url on loopback, served from this process with the
 * certificates it manages itself, called by kube-apiserver for pods that
 * kube-controller-manager creates.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { AdmissionregistrationV1Api, AppsV1Api, CoreV1Api, CustomObjectsApi, type V1Container, type V1Pod } from '@kubernetes/client-node';
import { KubeHttp } from '../../src/kube/http.ts';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { testEnvironment } from '../support/hooks.ts';
import { DEFAULT_INJECTOR_SETTINGS, SIDECAR_CONTAINER_NAME, type InjectorSettings } from '../../src/core/inject/index.ts';
import { issuedBy, splitPemBundle } from '../../src/pki/bundle.ts';
import { createCertificateAuthority, issueCertificate } from '../../src/pki/certificates.ts';
import { DEFAULT_ROTATION_POLICY } from '../../src/pki/rotation.ts';
import { AdmissionMetrics, PodAdmissionHandler } from '../../src/webhook/admission.ts';
import { SelfManagedCertificates, type ServingMaterial } from '../../src/webhook/certificates.ts';
import { KubeConnectionLookup } from '../../src/webhook/connections.ts';
import { MissingSidecarRepairer, type RepairEventRecorder } from '../../src/webhook/repair.ts';
import { MUTATE_PODS_PATH, WebhookServer } from '../../src/webhook/server.ts';
import { SidecarMode } from '../../src/webhook/node-versions.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import { webhookRegistration } from '../../src/devenv/scenario.ts';

const env = testEnvironment();
const logger = pino({ level: 'silent' });
const settings: InjectorSettings = { ...DEFAULT_INJECTOR_SETTINGS, sidecarImage: 'poolkeeper/poolkeeper:test', version: '0.1.0-test' };
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function eventually<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(200);
  }
}

/** Records Events through the core API, as the controller's recorder does. */
class CoreEventRecorder implements RepairEventRecorder {
  readonly core: CoreV1Api;
  constructor(core: CoreV1Api) {
    this.core = core;
  }
  async record(object: Parameters<RepairEventRecorder['record']>[0], type: 'Normal' | 'Warning', reason: string, message: string): Promise<void> {
    const namespace = object.metadata?.namespace ?? 'default';
    await this.core.createNamespacedEvent({
      namespace,
      body: {
        metadata: { generateName: `${object.metadata?.name ?? 'x'}.`, namespace },
        involvedObject: { apiVersion: object.apiVersion, kind: object.kind, name: object.metadata?.name, namespace, uid: object.metadata?.uid },
        type, reason, message, source: { component: 'poolkeeper-test' }, firstTimestamp: new Date(), lastTimestamp: new Date(), count: 1,
      },
    });
  }
}

const DATABASE_CONNECTION_FIXTURE = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: { name: databaseconnections.poolkeeper.dev }
spec:
  group: poolkeeper.dev
  scope: Namespaced
  names: { plural: databaseconnections, singular: databaseconnection, kind: DatabaseConnection, shortNames: [dbc] }
  versions:
    - name: v1alpha1
      served: true
      storage: true
      subresources: { status: {} }
      schema: { openAPIV3Schema: { type: object, x-kubernetes-preserve-unknown-fields: true } }
`;

describe('webhook on the API server', function () {
  let kube: KubeControlPlane;
  let core: CoreV1Api;
  let apps: AppsV1Api;
  let admission: AdmissionregistrationV1Api;
  let handler: PodAdmissionHandler;
  let certs: SelfManagedCertificates;
  let server: WebhookServer;
  let material: ServingMaterial;
  let port: number;
  const suffix = randomBytes(3).toString('hex');
  const namespace = `wh-${suffix}`;
  const configName = `poolkeeper-test-${suffix}`;

  function registration(): object {
    return webhookRegistration({ name: configName, url: `https://127.0.0.1:${port}${MUTATE_PODS_PATH}`, targetNamespace: namespace });
  }

  function podManifest(name: string, labels: Record<string, string>, ports: number[] = []): V1Pod {
    return { metadata: { name, labels }, spec: { containers: [{ name: 'app', image: 'example.invalid/app:1', ports: ports.map((containerPort) => ({ containerPort })) }] } };
  }

  /** Dry-run creates go through the webhook too: poll until the registration is live. */
  async function waitForWebhook(): Promise<void> {
    await eventually('webhook registration', async () => {
      const pod = await core.createNamespacedPod({ namespace, body: podManifest(`probe-${randomBytes(2).toString('hex')}`, { 'poolkeeper.dev/connection': 'orders-db' }), dryRun: 'All' });
      return pod.spec?.initContainers?.some((c) => c.name === SIDECAR_CONTAINER_NAME) ? true : undefined;
    });
  }

  function sidecarOf(pod: V1Pod): V1Container | undefined {
    return pod.spec?.initContainers?.find((c) => c.name === SIDECAR_CONTAINER_NAME) ?? pod.spec?.containers.find((c) => c.name === SIDECAR_CONTAINER_NAME);
  }

  async function podsOf(app: string, count: number): Promise<V1Pod[]> {
    return eventually(`${count} pods of ${app}`, async () => {
      const pods = (await core.listNamespacedPod({ namespace, labelSelector: `app=${app}` })).items.filter((p) => !p.metadata?.deletionTimestamp);
      return pods.length === count ? pods : undefined;
    });
  }

  function deployment(name: string, replicas: number): object {
    const labels = { app: name, 'poolkeeper.dev/connection': 'orders-db' };
    return {
      metadata: { name },
      spec: { replicas, selector: { matchLabels: { app: name } }, template: { metadata: { labels }, spec: { containers: [{ name: 'app', image: 'example.invalid/app:1', env: [{ name: 'PGHOST', value: 'mine' }] }] } } },
    };
  }

  before(async function () {
    kube = await env.kube();
    const kc = kube.kubeConfig();
    core = kc.makeApiClient(CoreV1Api);
    apps = kc.makeApiClient(AppsV1Api);
    admission = kc.makeApiClient(AdmissionregistrationV1Api);
    if (existsSync('crds/databaseconnection.yaml')) kube.kubectl(['apply', '-f', 'crds/']);
    else kube.kubectl(['apply', '-f', '-'], DATABASE_CONNECTION_FIXTURE);
    kube.kubectl(['wait', '--for=condition=Established', '--timeout=60s', 'crd/databaseconnections.poolkeeper.dev']);
    await core.createNamespace({ body: { metadata: { name: namespace } } });
    await core.createNamespacedSecret({ namespace, body: { metadata: { name: 'orders-creds' }, stringData: { username: 'app', password: 's3cret' } } });
    const custom = kc.makeApiClient(CustomObjectsApi);
    await eventually('DatabaseConnection served', async () => {
      try {
        await custom.createNamespacedCustomObject({
          group: 'poolkeeper.dev', version: 'v1alpha1', namespace, plural: 'databaseconnections',
          body: {
            apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders-db' },
            spec: {
              database: { host: '127.0.0.1', port: 5432, dbname: 'orders', credentialsSecretRef: { name: 'orders-creds' } },
              consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, minPerPod: 2, processesPerPod: 1 }],
              sidecar: { port: 6432, drainTimeout: 20 },
            },
          },
        });
        return true;
      } catch (err) {
        if ((err as { code?: number }).code === 404) return undefined;
        throw err;
      }
    });

    certs = new SelfManagedCertificates({ core, admission }, {
      namespace, secretName: 'poolkeeper-webhook-certs', webhookConfigurationName: configName,
      dnsNames: ['localhost'], ipAddresses: ['127.0.0.1'], policy: DEFAULT_ROTATION_POLICY,
    }, logger);
    material = await certs.ensure(new Date());
    handler = new PodAdmissionHandler(new KubeConnectionLookup(new KubeHttp(kc)), settings, logger, new AdmissionMetrics(new Registry()));
    server = new WebhookServer(handler, material, { host: '127.0.0.1', port: 0 }, logger);
    port = await server.listen();
    await admission.createMutatingWebhookConfiguration({ body: registration() });
    assert.equal(await certs.syncCaBundle(material.caBundlePem, new Date()), true);
    await waitForWebhook();
  });

  after(async function () {
    await server?.close();
    await admission?.deleteMutatingWebhookConfiguration({ name: configName }).catch(() => undefined);
    await core?.deleteNamespace({ name: namespace }).catch(() => undefined);
  });

  it('patches its own CA into the caBundle', async function () {
    const config = await admission.readMutatingWebhookConfiguration({ name: configName });
    const bundle = Buffer.from(config.webhooks![0]!.clientConfig.caBundle!, 'base64').toString('utf8');
    assert.equal(splitPemBundle(bundle).length, 1);
    assert.ok(issuedBy(material.certPem, splitPemBundle(bundle)[0]!));
    assert.equal(await certs.syncCaBundle(material.caBundlePem, new Date()), false, 'a second sync changes nothing');
  });

  it('injects the sidecar into the pods kube-controller-manager creates for an opted-in Deployment', async function () {
    await apps.createNamespacedDeployment({ namespace, body: deployment('web', 2) });
    const pods = await podsOf('web', 2);
    for (const pod of pods) {
      const sidecar = sidecarOf(pod);
      assert.ok(sidecar, `pod ${pod.metadata?.name} has the sidecar`);
      assert.equal(sidecar.restartPolicy, 'Always');
      assert.equal(pod.metadata?.annotations?.['poolkeeper.dev/injected'], '0.1.0-test');
      assert.equal(pod.metadata?.annotations?.['poolkeeper.dev/consumer'], 'web');
      assert.equal(pod.spec?.terminationGracePeriodSeconds, 30, 'the default 30 s already covers drainTimeout 20 + 5');
      const env = Object.fromEntries((pod.spec.containers[0]!.env ?? []).map((e) => [e.name, e]));
      assert.equal(env.PGHOST?.value, 'mine', 'the user\'s PGHOST is kept');
      assert.equal(env.PGPORT?.value, '6432');
      assert.equal(env.POOLKEEPER_POOL_SIZE?.value, '2');
      assert.equal(env.DATABASE_URL?.value, 'postgresql://$(PGUSER)@127.0.0.1:6432/orders');
      assert.deepEqual(pod.spec?.volumes?.find((v) => v.name === 'poolkeeper-credentials')?.secret?.secretName, 'orders-creds');
      assert.equal(pod.spec.containers[0]!.volumeMounts?.some((m) => m.name === 'poolkeeper-credentials') ?? false, false);
    }
  });

  it('gives the sidecar a ServiceAccount token: Kubernetes\' own, or a projected one of its own when the pod or its ServiceAccount turns automount off', async function () {
    const tokenDir = '/var/run/secrets/kubernetes.io/serviceaccount';
    const opted = { 'poolkeeper.dev/connection': 'orders-db' };
    const tokenMounts = (c: V1Container | undefined): string[] => (c?.volumeMounts ?? []).filter((m) => m.mountPath === tokenDir).map((m) => m.name);
    const sidecarContainer = (p: V1Pod): V1Container | undefined => p.spec?.initContainers?.find((c) => c.name === SIDECAR_CONTAINER_NAME);

    // The ServiceAccount admission plugin runs again after the webhook and mounts Kubernetes' token into the sidecar too.
    const auto = await core.createNamespacedPod({ namespace, body: podManifest('token-auto', opted) });
    assert.match(tokenMounts(sidecarContainer(auto)).join(), /^kube-api-access-/);
    assert.equal(auto.spec?.volumes?.some((v) => v.name === 'poolkeeper-api-access'), false);

    const offOnPod = podManifest('token-off-pod', opted);
    offOnPod.spec!.automountServiceAccountToken = false;
    await core.createNamespacedServiceAccount({ namespace, body: { metadata: { name: 'no-token' }, automountServiceAccountToken: false } });
    const offOnAccount = podManifest('token-off-account', opted);
    offOnAccount.spec!.serviceAccountName = 'no-token';
    for (const body of [offOnPod, offOnAccount]) {
      const created = await core.createNamespacedPod({ namespace, body });
      assert.deepEqual(tokenMounts(sidecarContainer(created)), ['poolkeeper-api-access'], `${body.metadata?.name}: the sidecar mounts its own token`);
      assert.deepEqual(tokenMounts(created.spec?.containers[0]), [], `${body.metadata?.name}: the app container stays without one`);
      const volume = created.spec?.volumes?.find((v) => v.name === 'poolkeeper-api-access');
      assert.deepEqual(volume?.projected?.sources?.map((source) => Object.keys(source).filter((k) => source[k as keyof typeof source] !== undefined)[0]), ['serviceAccountToken', 'configMap', 'downwardAPI']);
    }
  });

  it('leaves pods that do not opt in untouched', async function () {
    const created = await core.createNamespacedPod({ namespace, body: podManifest('plain', { app: 'plain' }) });
    assert.equal(sidecarOf(created), undefined);
    assert.equal(created.metadata?.annotations?.['poolkeeper.dev/injected'], undefined);
    assert.equal(created.spec?.containers[0]?.env, undefined);
  });

  it('answers a re-admission of an injected pod with no patch', async function () {
    const [pod] = await podsOf('web', 2);
    const review = { apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview', request: { uid: 'u1', kind: { group: '', version: 'v1', kind: 'Pod' }, operation: 'CREATE', namespace, object: pod } };
    const answer = await handler.review(review);
    assert.deepEqual(answer.response, { uid: 'u1', allowed: true });
  });

  it('admits a pod naming a missing DatabaseConnection unmodified, with a warning', async function () {
    const manifest = JSON.stringify({ apiVersion: 'v1', kind: 'Pod', ...podManifest('orphan', { 'poolkeeper.dev/connection': 'no-such-db' }) });
    // kubectl prints admission warnings on stderr; run it asynchronously, since this process serves the webhook.
    const run = await new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve, reject) => {
      const child = spawn(kube.kubectlPath, [`--kubeconfig=${kube.kubeconfigPath}`, 'create', '-n', namespace, '-f', '-', '-o', 'json']);
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
      child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
      child.on('error', reject);
      child.on('close', (status) => resolve({ status, stdout, stderr }));
      child.stdin.end(manifest);
    });
    assert.equal(run.status, 0, run.stderr);
    assert.match(run.stderr, /Warning: poolkeeper: DatabaseConnection .*no-such-db does not exist/);
    assert.equal(sidecarOf(JSON.parse(run.stdout) as V1Pod), undefined);
  });

  it('denies a pod whose own container uses the sidecar\'s port, naming the conflict', async function () {
    await assert.rejects(
      core.createNamespacedPod({ namespace, body: podManifest('clash', { 'poolkeeper.dev/connection': 'orders-db' }, [6432]) }),
      (err: { code?: number; body?: string }) => err.code === 422 && /PortConflict/.test(String(err.body)),
    );
  });

  it('in a namespace whose ResourceQuota requires CPU limits, gives the sidecar the limits its annotations ask for, and refuses a malformed one at admission', async function () {
    await core.createNamespacedResourceQuota({ namespace, body: { metadata: { name: 'cpu-limits' }, spec: { hard: { 'limits.cpu': '10' } } } });
    try {
      const withLimit = (name: string, annotations: Record<string, string>): V1Pod => {
        const pod = podManifest(name, { 'poolkeeper.dev/connection': 'orders-db' });
        pod.metadata!.annotations = annotations;
        pod.spec!.containers[0]!.resources = { limits: { cpu: '100m' } };
        return pod;
      };
      // Until the quota controller has counted the namespace, the quota admits nothing; then the sidecar without a CPU limit is what it refuses.
      const refusal = await eventually('the quota in force', async () => {
        try {
          await core.createNamespacedPod({ namespace, body: withLimit('quota-plain', {}), dryRun: 'All' });
          return undefined;
        } catch (err) {
          const body = String((err as { body?: unknown }).body);
          return /must specify limits\.cpu/.test(body) ? body : undefined;
        }
      });
      assert.match(refusal, new RegExp(`must specify limits\\.cpu for: ${SIDECAR_CONTAINER_NAME}`));
      const created = await core.createNamespacedPod({ namespace, body: withLimit('quota-annotated', { 'poolkeeper.dev/sidecar-cpu-limit': '250m', 'poolkeeper.dev/sidecar-memory-limit': '192Mi' }) });
      const sidecar = sidecarOf(created);
      assert.deepEqual({ ...sidecar?.resources }, { requests: { cpu: '50m', memory: '64Mi' }, limits: { cpu: '250m', memory: '192Mi' } });
      assert.equal(sidecar?.env?.find((e) => e.name === 'NODE_OPTIONS')?.value, '--max-semi-space-size=2 --max-old-space-size=115');
      await assert.rejects(
        core.createNamespacedPod({ namespace, body: withLimit('quota-malformed', { 'poolkeeper.dev/sidecar-cpu-limit': 'a quarter' }) }),
        (err: { code?: number; body?: string }) => err.code === 422 && /InvalidAnnotation.*poolkeeper\.dev\/sidecar-cpu-limit/.test(String(err.body)),
      );
    } finally {
      await core.deleteNamespacedResourceQuota({ namespace, name: 'cpu-limits' });
    }
  });

  it('injects a plain container while a node\'s kubelet is older than 1.29 (an upgrade under way), and native sidecars again once it is upgraded', async function () {
    const nodeName = `old-kubelet-${suffix}`;
    const setKubelet = (version: string): void => {
      kube.kubectl(['patch', 'node', nodeName, '--subresource=status', '--type=merge', '-p', JSON.stringify({ status: { nodeInfo: { kubeletVersion: version } } })]);
    };
    const mode = new SidecarMode(new KubeHttp(kube.kubeConfig()), { apiServerAllowsNative: true, logger });
    const following = new PodAdmissionHandler(new KubeConnectionLookup(new KubeHttp(kube.kubeConfig())), settings, logger, undefined, () => mode.native);
    const injectedAs = async (): Promise<string> => {
      const review = await following.review({
        apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview',
        request: { uid: randomBytes(4).toString('hex'), kind: { group: '', version: 'v1', kind: 'Pod' }, operation: 'CREATE', namespace, object: podManifest('mode-probe', { 'poolkeeper.dev/connection': 'orders-db' }) },
      });
      const patch = JSON.parse(Buffer.from(review.response.patch ?? '', 'base64').toString('utf8')) as Array<{ path: string; value?: { name?: string } | Array<{ name?: string }> }>;
      const sidecarAt = patch.find((op) => (Array.isArray(op.value) ? op.value.some((v) => v.name === SIDECAR_CONTAINER_NAME) : op.value?.name === SIDECAR_CONTAINER_NAME));
      return sidecarAt?.path.startsWith('/spec/initContainers') === true ? 'native' : sidecarAt?.path === '/spec/containers/-' ? 'plain' : 'none';
    };
    await mode.start();
    try {
      assert.equal(mode.native, true, 'no node older than 1.29');
      assert.equal(await injectedAs(), 'native');
      kube.kubectl(['create', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Node', metadata: { name: nodeName } }));
      setKubelet('v1.28.5-eks-5e0fdde');
      await mode.refresh();
      assert.equal(mode.native, false, 'a 1.28 kubelet refuses native sidecars');
      assert.equal(await injectedAs(), 'plain');
      setKubelet('v1.29.3');
      await mode.refresh();
      assert.equal(mode.native, true, 'upgraded');
      assert.equal(await injectedAs(), 'native');
    } finally {
      mode.stop();
      kube.kubectl(['delete', 'node', nodeName, '--ignore-not-found']);
    }
  });

  it('puts back restartPolicy: Always that a later webhook strips (one built with a Kubernetes client older than 1.28), so the API server admits the pod', async function () {
    // The other webhook: it removes the field from the sidecar, as decoding into an old PodSpec and encoding again does.
    const ca = await createCertificateAuthority('stripping-webhook-test', 1);
    const leaf = await issueCertificate(ca, { commonName: '127.0.0.1', ipAddresses: ['127.0.0.1'], usage: 'server', validityDays: 1 });
    let stripped = 0;
    const stripper = createHttpsServer({ cert: leaf.certPem, key: leaf.keyPem }, (req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const review = JSON.parse(Buffer.concat(chunks).toString('utf8')) as { request: { uid: string; object: V1Pod } };
        const index = review.request.object.spec?.initContainers?.findIndex((c) => c.name === SIDECAR_CONTAINER_NAME && c.restartPolicy !== undefined) ?? -1;
        const patch = index < 0 ? [] : [{ op: 'remove', path: `/spec/initContainers/${index}/restartPolicy` }];
        if (index >= 0) stripped += 1;
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({
          apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview',
          response: { uid: review.request.uid, allowed: true, ...(patch.length > 0 ? { patchType: 'JSONPatch', patch: Buffer.from(JSON.stringify(patch)).toString('base64') } : {}) },
        }));
      });
    });
    await new Promise<void>((resolve) => stripper.listen(0, '127.0.0.1', resolve));
    // Configurations are called in name order: this one after poolkeeper's, which is called again after it (IfNeeded).
    const name = `zz-stripper-${suffix}`;
    const registration = webhookRegistration({ name, url: `https://127.0.0.1:${(stripper.address() as AddressInfo).port}/`, targetNamespace: namespace }) as { webhooks: Array<Record<string, unknown>> };
    registration.webhooks[0] = { ...registration.webhooks[0], name: 'strip.example.dev', failurePolicy: 'Fail', reinvocationPolicy: 'Never', clientConfig: { url: `https://127.0.0.1:${(stripper.address() as AddressInfo).port}/`, caBundle: Buffer.from(ca.certPem).toString('base64') } };
    await admission.createMutatingWebhookConfiguration({ body: registration as object });
    try {
      await eventually('the stripping webhook live', async () => {
        const before = stripped;
        await core.createNamespacedPod({ namespace, body: podManifest(`strip-probe-${randomBytes(2).toString('hex')}`, { 'poolkeeper.dev/connection': 'orders-db' }), dryRun: 'All' }).catch(() => undefined);
        return stripped > before ? true : undefined;
      });
      const created = await core.createNamespacedPod({ namespace, body: podManifest('stripped-sidecar', { 'poolkeeper.dev/connection': 'orders-db' }) });
      const sidecar = created.spec?.initContainers?.find((c) => c.name === SIDECAR_CONTAINER_NAME);
      assert.equal(sidecar?.restartPolicy, 'Always', 'the sidecar stays a native sidecar');
      assert.ok(sidecar?.startupProbe, 'with its probes');
    } finally {
      await admission.deleteMutatingWebhookConfiguration({ name });
      await core.deleteNamespacedPod({ name: 'stripped-sidecar', namespace, gracePeriodSeconds: 0 }).catch(() => undefined);
      await new Promise((resolve) => stripper.close(resolve));
    }
  });

  it('in a namespace enforcing the restricted Pod Security Standard, injects a sidecar the API server admits, with the socket volume and its own token too; a refusal names only the app\'s container', async function () {
    kube.kubectl(['label', 'namespace', namespace, 'pod-security.kubernetes.io/enforce=restricted', '--overwrite']);
    try {
      const restricted = (name: string, annotations: Record<string, string> = {}, compliant = true): V1Pod => {
        const pod = podManifest(name, { 'poolkeeper.dev/connection': 'orders-db' });
        pod.metadata!.annotations = annotations;
        if (compliant) {
          pod.spec!.securityContext = { runAsNonRoot: true, runAsUser: 1000, seccompProfile: { type: 'RuntimeDefault' } };
          pod.spec!.containers[0]!.securityContext = { allowPrivilegeEscalation: false, capabilities: { drop: ['ALL'] } };
        }
        return pod;
      };
      // The admission plugin reads namespace labels from its cache: wait until a plain non-compliant pod is refused.
      const refusal = await eventually('the standard in force', async () => {
        try {
          await core.createNamespacedPod({ namespace, body: restricted(`psa-probe-${randomBytes(2).toString('hex')}`, {}, false), dryRun: 'All' });
          return undefined;
        } catch (err) {
          const body = String((err as { body?: unknown }).body);
          const message = body.startsWith('{') ? String((JSON.parse(body) as { message?: unknown }).message) : body;
          return /violates PodSecurity "restricted/.test(message) ? message : undefined;
        }
      });
      // What it refuses is the app's container alone: the sidecar brings nothing the standard forbids.
      assert.match(refusal, /container "app"/);
      assert.doesNotMatch(refusal, new RegExp(`"${SIDECAR_CONTAINER_NAME}"`));
      for (const [name, annotations] of [
        ['psa-plain', {}],
        ['psa-socket', { 'poolkeeper.dev/unix-socket': 'true' }],
      ] as const) {
        const created = await core.createNamespacedPod({ namespace, body: restricted(name, annotations) });
        assert.ok(sidecarOf(created), `${name} has the sidecar`);
        if (name === 'psa-socket') assert.ok(created.spec?.volumes?.some((v) => v.emptyDir !== undefined), 'the socket directory is an emptyDir');
      }
      // POOLKEEPER_SIDECAR_RUN_AS_USER=platform: the sidecar names no UID (the pod's, or the platform's, applies), and is admitted too.
      const plain = await core.readNamespacedPod({ name: 'psa-plain', namespace });
      const platformUid: V1Pod = { metadata: { name: 'psa-platform-uid', namespace, annotations: plain.metadata?.annotations ?? {} }, spec: plain.spec! };
      const noUid = sidecarOf(platformUid)!;
      delete noUid.securityContext!.runAsUser;
      delete noUid.securityContext!.runAsGroup;
      await core.createNamespacedPod({ namespace, body: platformUid, dryRun: 'All' });
      const ownToken = restricted('psa-own-token');
      ownToken.spec!.automountServiceAccountToken = false;
      const created = await core.createNamespacedPod({ namespace, body: ownToken });
      assert.ok(created.spec?.volumes?.some((v) => v.projected !== undefined), 'the sidecar\'s own projected token');
    } finally {
      kube.kubectl(['label', 'namespace', namespace, 'pod-security.kubernetes.io/enforce-']);
      for (const name of ['psa-plain', 'psa-socket', 'psa-own-token']) await core.deleteNamespacedPod({ name, namespace, gracePeriodSeconds: 0 }).catch(() => undefined);
    }
  });

  it('converges racing replicas on one CA in one Secret', async function () {
    const make = (): SelfManagedCertificates => new SelfManagedCertificates({ core, admission }, {
      namespace, secretName: 'race-certs', webhookConfigurationName: configName, dnsNames: ['localhost'], ipAddresses: ['127.0.0.1'], policy: DEFAULT_ROTATION_POLICY,
    }, logger);
    const results = await Promise.all([make().ensure(new Date()), make().ensure(new Date()), make().ensure(new Date())]);
    assert.equal(new Set(results.map((r) => r.caBundlePem)).size, 1);
    assert.equal(new Set(results.map((r) => r.certPem)).size, 1);
    const secret = await core.readNamespacedSecret({ name: 'race-certs', namespace });
    assert.equal(Buffer.from(secret.data!['ca-bundle.crt']!, 'base64').toString('utf8'), results[0].caBundlePem);
  });

  it('rotates the CA with the new one trusted before it serves, without failing an admission', async function () {
    const withPolicy = (policy: Partial<typeof DEFAULT_ROTATION_POLICY>): SelfManagedCertificates => new SelfManagedCertificates({ core, admission }, {
      namespace, secretName: 'poolkeeper-webhook-certs', webhookConfigurationName: configName, dnsNames: ['localhost'], ipAddresses: ['127.0.0.1'],
      policy: { ...DEFAULT_ROTATION_POLICY, ...policy },
    }, logger);
    const oldCa = splitPemBundle(material.caBundlePem)[0]!;
    // The stored CA has 5 years left; asking to renew 6 years ahead stages the next one now.
    const staged = await withPolicy({ caRenewBeforeDays: 6 * 365, caValidityDays: 7 * 365, propagationSeconds: 3600 }).reconcile(new Date());
    assert.equal(staged.certPem, material.certPem, 'still serving from the old CA');
    assert.equal(splitPemBundle(staged.caBundlePem).length, 2);
    const config = await admission.readMutatingWebhookConfiguration({ name: configName });
    assert.equal(splitPemBundle(Buffer.from(config.webhooks![0]!.clientConfig.caBundle!, 'base64').toString('utf8')).length, 2, 'the API server trusts both CAs');
    await waitForWebhook();

    const promoted = await withPolicy({ caRenewBeforeDays: 6 * 365, caValidityDays: 7 * 365, propagationSeconds: 0 }).reconcile(new Date());
    assert.notEqual(promoted.certPem, material.certPem);
    assert.equal(issuedBy(promoted.certPem, oldCa), false);
    assert.ok(splitPemBundle(promoted.caBundlePem).some((ca) => issuedBy(promoted.certPem, ca)));
    assert.ok(splitPemBundle(promoted.caBundlePem).includes(oldCa), 'the old CA stays trusted until it expires');
    assert.equal(server.updateCertificate(promoted), true);
    material = promoted;
    await waitForWebhook();
  });

  it('with the webhook down admits opted-in pods without the sidecar (failurePolicy Ignore), and the repair path evicts them so they return with it', async function () {
    await server.close();
    await apps.createNamespacedDeployment({ namespace, body: deployment('batch', 1) });
    const [bare] = await podsOf('batch', 1);
    assert.equal(sidecarOf(bare!), undefined, 'admitted without the sidecar while the webhook was down');
    const standalone = await core.createNamespacedPod({ namespace, body: podManifest('standalone', { 'poolkeeper.dev/connection': 'orders-db' }) });
    assert.equal(sidecarOf(standalone), undefined);

    server = new WebhookServer(handler, material, { host: '127.0.0.1', port }, logger);
    await server.listen();
    await waitForWebhook();

    const repairer = new MissingSidecarRepairer(new KubeHttp(kube.kubeConfig()), new CoreEventRecorder(core), logger, { mode: 'evict', gracePeriodSeconds: 0, maxEvictionsPerPass: 5 });
    const outcomes = await repairer.repairConnection(namespace, 'orders-db', new Date(Date.now() + 1000));
    // A pod without a controller would not come back: reported, not evicted.
    assert.deepEqual(outcomes.map((o) => `${o.pod}:${o.action}`).sort(), [`${bare!.metadata!.name}:evicted`, 'standalone:reported']);
    assert.ok(await core.readNamespacedPod({ name: 'standalone', namespace }));
    const replacement = await eventually('a replacement pod with the sidecar', async () => {
      const pods = (await core.listNamespacedPod({ namespace, labelSelector: 'app=batch' })).items;
      return pods.find((p) => p.metadata?.name !== bare!.metadata!.name && sidecarOf(p) !== undefined);
    });
    assert.ok(replacement);
    const events = await core.listNamespacedEvent({ namespace, fieldSelector: `involvedObject.name=${bare!.metadata!.name}` });
    assert.ok(events.items.some((e) => e.reason === 'SidecarMissing' && /evicted/.test(e.message ?? '')));
    // A second pass finds nothing left to do among the live pods.
    const again = await repairer.repairConnection(namespace, 'orders-db', new Date(Date.now() + 1000));
    assert.deepEqual(again.filter((o) => o.action === 'evicted'), []);
  });
});
