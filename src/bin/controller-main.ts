/**
 * Wiring of the controller binary: informers, reconciler, leader election,
 * and the /metrics, /healthz and /readyz endpoints.
 */
import type { Logger } from 'pino';
import { Registry, collectDefaultMetrics } from 'prom-client';
import { BudgetController } from '../controller/controller.ts';
import { LimitDiscovery } from '../controller/limit-discovery.ts';
import { ControllerMetrics } from '../controller/metrics.ts';
import { EventRecorder } from '../kube/events.ts';
import { KubeHttp, type ApiServerAccess } from '../kube/http.ts';
import { LeaderElector } from '../kube/leader-election.ts';
import { AdminServer } from '../ops/admin-server.ts';
import { DEFAULT_POD_REPAIR_OPTIONS, MissingSidecarRepairer } from '../webhook/repair.ts';

/** Everything the controller binary is configured with. */
export interface ControllerConfig {
  /** The API server and credentials: in a pod, its ServiceAccount (no client library loaded). */
  apiServer: ApiServerAccess;
  /** Namespace of the leader-election Lease. */
  namespace: string;
  identity: string;
  /** 0 picks a free port. */
  metricsPort: number;
  metricsHost?: string;
  leaderElection: boolean;
  /** Pods that opted in but came up without the sidecar: evict them, only report them, or ignore them. */
  repair: 'evict' | 'report' | 'off';
  /** Keep a RoleBinding `poolkeeper-sidecar` for the pods' ServiceAccounts in each namespace (default true). */
  manageSidecarAccess?: boolean;
}

/** A running controller binary. */
export interface RunningController {
  controller: BudgetController;
  registry: Registry;
  metricsPort: number;
  shutdown(): Promise<void>;
}

/** Starts the controller. */
export async function startController(config: ControllerConfig, logger: Logger): Promise<RunningController> {
  const http = new KubeHttp(config.apiServer);
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'poolkeeper_controller_process_' });
  const metrics = new ControllerMetrics(registry);
  const elector = config.leaderElection
    ? new LeaderElector(http, { namespace: config.namespace, name: 'poolkeeper-controller', identity: config.identity, logger })
    : undefined;
  const events = new EventRecorder(http, 'poolkeeper-controller', logger);
  const repairer = config.repair === 'off'
    ? undefined
    : new MissingSidecarRepairer(http, events, logger, { ...DEFAULT_POD_REPAIR_OPTIONS, mode: config.repair });
  const controller = new BudgetController({
    http,
    logger,
    metrics,
    elector,
    reconciler: { discovery: new LimitDiscovery({ logger }), events, repairer, manageSidecarAccess: config.manageSidecarAccess ?? true },
  });
  let stopping = false;
  const admin = new AdminServer({
    registry,
    healthy: () => !stopping,
    readiness: () => ({ ready: controller.ready && !stopping, reasons: controller.ready ? [] : ['caches not synced'] }),
  });
  const metricsPort = await admin.listen(config.metricsHost ?? '0.0.0.0', config.metricsPort);
  await controller.start();
  logger.info({ metricsPort, identity: config.identity, leaderElection: config.leaderElection }, 'controller started');
  return {
    controller,
    registry,
    metricsPort,
    async shutdown(): Promise<void> {
      stopping = true;
      await controller.stop();
      await admin.close();
    },
  };
}
