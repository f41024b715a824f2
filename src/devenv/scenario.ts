/**
 * Building blocks of a scenario on the local control plane, shared by the
 * demo and the tests: the CRDs installed, a namespace with a credentials
 * Secret and a Deployment of opted-in pods, and polling until a condition.
 */
import type { KubeControlPlane } from './kube.ts';

/** Polls `check` every 50 ms until true; throws after `timeoutMs`. */
export async function eventually(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Applies crds/ and waits until both resources are served. */
export async function installCrds(kube: KubeControlPlane, crdDir = 'crds/'): Promise<void> {
  kube.kubectl(['apply', '-f', crdDir]);
  kube.kubectl(['wait', '--for=condition=Established', '--timeout=60s', 'crd/databaseconnections.poolkeeper.dev', 'crd/poolmembers.poolkeeper.dev']);
  await eventually('CRDs served', () => {
    try {
      kube.kubectl(['get', 'dbc,pm', '-A']);
      return true;
    } catch {
      return false;
    }
  }, 30_000);
}

/** Creates a namespace, a credentials Secret and a Deployment whose pods opt in to `connection`. */
export function createWorkload(kube: KubeControlPlane, args: { namespace: string; connection: string; deployment: string; replicas: number; secret: string; username: string; password: string }): void {
  kube.kubectl(['create', 'namespace', args.namespace]);
  kube.kubectl(['-n', args.namespace, 'create', 'secret', 'generic', args.secret, `--from-literal=username=${args.username}`, `--from-literal=password=${args.password}`]);
  kube.kubectl(['apply', '-f', '-'], JSON.stringify({
    apiVersion: 'apps/v1',
    kind: 'Deployment',
    metadata: { name: args.deployment, namespace: args.namespace },
    spec: {
      replicas: args.replicas,
      selector: { matchLabels: { app: args.deployment } },
      template: {
        metadata: { labels: { app: args.deployment, 'poolkeeper.dev/connection': args.connection } },
        spec: { containers: [{ name: 'app', image: 'example.invalid/app:1' }] },
      },
    },
  }));
}
