/**
 * Probes every component of a local environment and reports its version and
 * health, one line each: what `npm run testenv -- smoke` and the demo print.
 */
import type { LocalEnvironment } from './environment.ts';

/** One component's state. */
export interface ComponentStatus {
  name: string;
  version: string;
  healthy: boolean;
  detail: string;
}

async function probe(name: string, check: () => Promise<{ version: string; healthy: boolean; detail?: string }>): Promise<ComponentStatus> {
  const started = Date.now();
  try {
    const { version, healthy, detail } = await check();
    return { name, version, healthy, detail: detail ?? `${Date.now() - started} ms` };
  } catch (err) {
    return { name, version: '-', healthy: false, detail: err instanceof Error ? err.message : String(err) };
  }
}

/** Starts every component (if not yet started) and probes it. */
export async function probeEnvironment(env: LocalEnvironment): Promise<ComponentStatus[]> {
  const [postgres, ssh] = await Promise.all([
    probe('postgresql', async () => {
      const pg = await env.postgres();
      return { version: await pg.version(), healthy: await pg.healthy(), detail: `127.0.0.1:${pg.port} max_connections=${pg.options.maxConnections}` };
    }),
    probe('openssh', async () => {
      const sshd = await env.sshd();
      return { version: sshd.version(), healthy: await sshd.healthy(), detail: `127.0.0.1:${sshd.port} host key ${sshd.hostKeyFingerprint}` };
    }),
  ]);
  const bouncer = await probe('pgbouncer', async () => {
    const b = await env.pgbouncer();
    return { version: b.version(), healthy: await b.healthy(), detail: `127.0.0.1:${b.port}` };
  });
  const etcd = await probe('etcd', async () => {
    const k = await env.kube();
    return { version: await k.etcdVersion(), healthy: (await fetch(`${k.etcdUrl}/health`)).ok, detail: k.etcdUrl };
  });
  const apiserver = await probe('kube-apiserver', async () => {
    const k = await env.kube();
    return { version: await k.apiserverVersion(), healthy: await k.healthy(), detail: k.server };
  });
  const kcm = await probe('kube-controller-manager', async () => {
    const k = await env.kube();
    // The service-account controller has created `default`: controllers are running.
    const sa = await k.get('/api/v1/namespaces/default/serviceaccounts/default');
    return { version: k.binaryVersion('kube-controller-manager'), healthy: sa.status === 200 };
  });
  const kubectl = await probe('kubectl', async () => {
    const k = await env.kube();
    return { version: k.kubectlVersion(), healthy: k.kubectl(['get', '--raw', '/readyz']).trim() === 'ok', detail: k.kubeconfigPath };
  });
  return [postgres, ssh, bouncer, etcd, apiserver, kcm, kubectl];
}

/** Formats statuses as aligned lines. */
export function formatStatuses(statuses: ComponentStatus[]): string {
  return statuses.map((s) => `${s.name.padEnd(24)} ${s.version.padEnd(32)} ${s.healthy ? 'healthy  ' : 'UNHEALTHY'} ${s.detail}`).join('\n');
}
