/**
 * The controller of bench/controller-scale.ts, in a process of its own so
 * that its CPU time, peak RSS and API writes are its own. It reaches the API
 * server as in a pod, through a ServiceAccount token and CA (no kubeconfig),
 * and imports nothing the controller binary would not: its RSS is the
 * controller's.
 *
 *   node bench/controller-child.ts '{"directory":...,"host":...,"port":...}' [--verbose] [--no-channel]
 */
import pino from 'pino';
import { KubeHttp } from '../src/kube/http.ts';
import { InClusterAccess } from '../src/kube/in-cluster.ts';

/** Where the child finds its ServiceAccount: what KubeControlPlane.serviceAccountFiles returns. */
export interface ServiceAccountFiles {
  directory: string;
  host: string;
  port: string;
}

/** Messages between the bench and the controller child. */
export type ChildMessage = { type: 'ready' } | { type: 'mark'; cpuS: number; peakRssMb: number; writes: number; writesByKind: Record<string, number>; reconciles: number; reconcileS: number; memory: NodeJS.MemoryUsage };

async function runControllerChild(access: ServiceAccountFiles, verbose: boolean): Promise<void> {
  // Count every write this process makes, before the controller module captures anything.
  const writesByKind: Record<string, number> = {};
  let writes = 0;
  // eslint-disable-next-line @typescript-eslint/unbound-method -- called back with .call(this)
  const original = KubeHttp.prototype.request;
  KubeHttp.prototype.request = function counted<T>(this: KubeHttp, method: string, path: string, body?: unknown, contentType?: string): Promise<T> {
    if (method !== 'GET') {
      writes += 1;
      const kind = `${method} ${path.replace(/^.*\/namespaces\/[^/]+\//, '').replace(/\/[^/]+(\/status)?$/, (_m, status: string | undefined) => (status ? '/status' : ''))}`;
      writesByKind[kind] = (writesByKind[kind] ?? 0) + 1;
    }
    return original.call(this, method, path, body, contentType) as Promise<T>;
  };
  // And every reconcile, with the time it took (planning and its writes).
  let reconciles = 0;
  let reconcileS = 0;
  const { ServerReconciler } = await import('../src/controller/reconciler.ts');
  // eslint-disable-next-line @typescript-eslint/unbound-method -- called back with .call(this)
  const reconcile = ServerReconciler.prototype.reconcile;
  ServerReconciler.prototype.reconcile = async function timed(this: InstanceType<typeof ServerReconciler>, server: string) {
    const started = performance.now();
    try {
      return await reconcile.call(this, server);
    } finally {
      reconciles += 1;
      reconcileS += (performance.now() - started) / 1000;
    }
  };
  const { startController } = await import('../src/bin/controller-main.ts');
  let peakRss = process.memoryUsage.rss();
  const sampler = setInterval(() => (peakRss = Math.max(peakRss, process.memoryUsage.rss())), 50);
  const logger = pino({ level: verbose ? 'warn' : 'silent' }, pino.destination(2));
  const apiServer = new InClusterAccess(access);
  // The acknowledgement channel on loopback, as a controller pod serves it on its IP (unless the bench measures without it).
  const acknowledgements = process.argv.includes('--no-channel') ? undefined : { host: '127.0.0.1', port: 0, advertise: '127.0.0.1' };
  const running = await startController({ apiServer, namespace: 'default', identity: 'bench', metricsPort: 0, metricsHost: '127.0.0.1', leaderElection: false, repair: 'off', manageSidecarAccess: false, acknowledgements }, logger);
  let lastCpu = process.cpuUsage();
  process.on('message', (message: { type: string }) => {
    if (message.type === 'mark') {
      const cpu = process.cpuUsage(lastCpu);
      lastCpu = process.cpuUsage();
      const reply: ChildMessage = { type: 'mark', cpuS: (cpu.user + cpu.system) / 1e6, peakRssMb: peakRss / 2 ** 20, writes, writesByKind: { ...writesByKind }, reconciles, reconcileS, memory: process.memoryUsage() };
      peakRss = process.memoryUsage.rss();
      writes = 0;
      reconciles = 0;
      reconcileS = 0;
      for (const k of Object.keys(writesByKind)) delete writesByKind[k];
      process.send?.(reply);
    } else if (message.type === 'stop') {
      clearInterval(sampler);
      void running.shutdown().finally(() => process.exit(0));
    }
  });
  // Never outlive the bench.
  process.on('disconnect', () => process.exit(1));
  process.send?.({ type: 'ready' } satisfies ChildMessage);
}

if (process.send) await runControllerChild(JSON.parse(process.argv[2] ?? '{}') as ServiceAccountFiles, process.argv.includes('--verbose'));
