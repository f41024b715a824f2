/**
 * Building blocks of a scenario on the local control plane, shared by the
 * demo and the tests: the CRDs installed, a namespace with a credentials
 * Secret and a Deployment of opted-in pods, and polling until a condition.
 */
import type { Logger } from 'pino';
import { Registry } from 'prom-client';
import { DEFAULT_INJECTOR_SETTINGS, READS_TABLES_ANNOTATION } from '../core/inject/index.ts';
import { startWebhook, type RunningWebhook } from '../webhook/runtime.ts';
import { MUTATE_PODS_PATH } from '../webhook/server.ts';
import type { KubeControlPlane } from './kube.ts';
import { freePort } from './process.ts';

/** Polls `check` every 50 ms until true; throws after `timeoutMs`. */
export async function eventually(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Applies crds/ and waits until every resource is served. */
export async function installCrds(kube: KubeControlPlane, crdDir = 'crds/'): Promise<void> {
  kube.kubectl(['apply', '-f', crdDir]);
  kube.kubectl(['wait', '--for=condition=Established', '--timeout=60s', 'crd/databaseconnections.poolkeeper.dev', 'crd/poolmembers.poolkeeper.dev', 'crd/poolgrants.poolkeeper.dev', 'crd/databaseservers.poolkeeper.dev']);
  await eventually('CRDs served', () => {
    try {
      kube.kubectl(['get', 'dbc,pm,dbs', '-A']);
      return true;
    } catch {
      return false;
    }
  }, 30_000);
}

/** Creates a namespace and a credentials Secret in it. */
export function createNamespaceWithSecret(kube: KubeControlPlane, args: { namespace: string; secret: string; username: string; password: string }): void {
  kube.kubectl(['create', 'namespace', args.namespace]);
  kube.kubectl(['-n', args.namespace, 'create', 'secret', 'generic', args.secret, `--from-literal=username=${args.username}`, `--from-literal=password=${args.password}`]);
}

/** Creates a Deployment whose pods opt in to `connection`. */
/**
 * A Deployment whose pods opt in to `connection`. Its pods carry the
 * annotation the injector stamps on pods whose sidecar reads grant tables,
 * unless `readsTables` is false (pods injected by an older webhook).
 */
export function createOptedInDeployment(kube: KubeControlPlane, args: { namespace: string; connection: string; deployment: string; replicas: number; readsTables?: boolean }): void {
  kube.kubectl(['apply', '-f', '-'], JSON.stringify({
    apiVersion: 'apps/v1',
    kind: 'Deployment',
    metadata: { name: args.deployment, namespace: args.namespace },
    spec: {
      replicas: args.replicas,
      selector: { matchLabels: { app: args.deployment } },
      template: {
        metadata: { labels: { app: args.deployment, 'poolkeeper.dev/connection': args.connection }, ...(args.readsTables === false ? {} : { annotations: { [READS_TABLES_ANNOTATION]: 'true' } }) },
        spec: { containers: [{ name: 'app', image: 'example.invalid/app:1' }] },
      },
    },
  }));
}

/** Creates a namespace, a credentials Secret and a Deployment whose pods opt in to `connection`. */
export function createWorkload(kube: KubeControlPlane, args: { namespace: string; connection: string; deployment: string; replicas: number; secret: string; username: string; password: string; readsTables?: boolean }): void {
  createNamespaceWithSecret(kube, args);
  createOptedInDeployment(kube, args);
}

/**
 * A MutatingWebhookConfiguration for the injection webhook reached by URL
 * (as on loopback in the local environment), as deploy/ configures it:
 * failurePolicy Ignore, opted-in pods only, and only `targetNamespace` since
 * other tests share the API server.
 */
export function webhookRegistration(args: { name: string; url: string; targetNamespace: string }): Record<string, unknown> {
  return {
    apiVersion: 'admissionregistration.k8s.io/v1',
    kind: 'MutatingWebhookConfiguration',
    metadata: { name: args.name },
    webhooks: [{
      name: 'pods.poolkeeper.dev',
      admissionReviewVersions: ['v1'],
      sideEffects: 'None',
      failurePolicy: 'Ignore',
      reinvocationPolicy: 'IfNeeded',
      timeoutSeconds: 5,
      clientConfig: { url: args.url },
      rules: [{ apiGroups: [''], apiVersions: ['v1'], operations: ['CREATE'], resources: ['pods'], scope: 'Namespaced' }],
      objectSelector: { matchExpressions: [{ key: 'poolkeeper.dev/connection', operator: 'Exists' }] },
      namespaceSelector: { matchLabels: { 'kubernetes.io/metadata.name': args.targetNamespace } },
    }],
  };
}

/**
 * Runs the injection webhook in this process on 127.0.0.1 and registers it
 * with `clientConfig.url` (the API server calls it on loopback), scoped to
 * `targetNamespace`. It manages its own CA in a Secret of `webhookNamespace`.
 */
export async function startLocalWebhook(kube: KubeControlPlane, args: { webhookNamespace: string; targetNamespace: string; probeConnection: string; logger: Logger; name?: string }): Promise<RunningWebhook & { name: string }> {
  const name = args.name ?? `poolkeeper-${args.targetNamespace}`;
  const port = await freePort();
  try {
    kube.kubectl(['create', 'namespace', args.webhookNamespace]);
  } catch {
    // exists already
  }
  kube.kubectl(['apply', '-f', '-'], JSON.stringify(webhookRegistration({ name, url: `https://127.0.0.1:${port}${MUTATE_PODS_PATH}`, targetNamespace: args.targetNamespace })));
  const running = await startWebhook(kube.kubeConfig(), {
    certificateMode: 'self', certDir: '', namespace: args.webhookNamespace, serviceName: 'poolkeeper-webhook', secretName: `${name}-certs`,
    webhookConfigurationName: name, host: '127.0.0.1', port, refreshSeconds: 60, ipAddresses: ['127.0.0.1'],
    injector: { ...DEFAULT_INJECTOR_SETTINGS, version: 'local', sidecarImage: 'poolkeeper:local' },
  }, args.logger, new Registry());
  // The API server picks up the new caBundle within a moment; wait until a dry-run pod is mutated.
  // kubectl must not block this process while the API server calls the webhook in it.
  await eventually('the webhook to be called', async () => {
    try {
      const pod = await kube.kubectlAsync(['-n', args.targetNamespace, 'run', 'webhook-probe', '--image=example.invalid/probe', `--labels=poolkeeper.dev/connection=${args.probeConnection}`, '--dry-run=server', '-o', 'json']);
      return pod.includes('"poolkeeper-sidecar"');
    } catch {
      return false;
    }
  }, 30_000);
  return { ...running, name };
}
