/**
 * Wiring of the controller binary: informers, reconciler, leader election,
 * and the /metrics, /healthz and /readyz endpoints.
 */
import type { Logger } from 'pino';
import { Registry, collectDefaultMetrics } from 'prom-client';
import { receiverFor } from '../controller/acknowledgements.ts';
import { BudgetController } from '../controller/controller.ts';
import { LimitDiscovery } from '../controller/limit-discovery.ts';
import { ControllerMetrics } from '../controller/metrics.ts';
import { EventRecorder } from '../kube/events.ts';
import { KubeHttp, type ApiServerAccess } from '../kube/http.ts';
import { LeaderElector, type LeaseLock } from '../kube/leader-election.ts';
import { ApiServerClock } from '../kube/server-clock.ts';
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
  /**
   * The Lease every install in the cluster contends for besides its own, so that two
   * installs never budget the same servers at once (absent: only the own Lease).
   */
  clusterLease?: LeaseLock | undefined;
  /** Pods that opted in but came up without the sidecar: evict them, only report them, or ignore them. */
  repair: 'evict' | 'report' | 'off';
  /** Keep a RoleBinding `poolkeeper-sidecar` for the pods' ServiceAccounts in each namespace (default true). */
  manageSidecarAccess?: boolean;
  /**
   * The acknowledgement channel: listen on host:port (0: a free port) and tell
   * sidecars to send to http://<advertise>:<port> (advertise: the pod's IP).
   * Absent: sidecars acknowledge through their PoolMember status only.
   */
  acknowledgements?: { host: string; port: number; advertise: string } | undefined;
  /** Lease timings (default 15 s lease, 10 s renew deadline, 2 s between attempts). */
  lease?: { leaseDurationMs: number; renewDeadlineMs: number; retryPeriodMs: number } | undefined;
  /** This replica's clock (ms since the epoch); default the steady clock. Tests give one that runs ahead or behind. */
  localClock?: (() => number) | undefined;
}

/** A running controller binary. */
export interface RunningController {
  controller: BudgetController;
  registry: Registry;
  metricsPort: number;
  /** Where sidecars send acknowledgements, if the channel is on. */
  acknowledgeTo?: string | undefined;
  shutdown(): Promise<void>;
}

/** Starts the controller. */
export async function startController(config: ControllerConfig, logger: Logger): Promise<RunningController> {
  // What other replicas judge (a departure's `until`) is timed on the API server's clock, the one they share.
  const serverClock = new ApiServerClock(config.localClock);
  const http = new KubeHttp(config.apiServer, { clock: serverClock });
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'poolkeeper_controller_process_' });
  const metrics = new ControllerMetrics(registry, { apiServerClockOffsetSeconds: () => serverClock.offset().offsetMs / 1000 });
  const elector = config.leaderElection
    ? new LeaderElector(http, { namespace: config.namespace, name: 'poolkeeper-controller', identity: config.identity, clusterLease: config.clusterLease, logger, ...config.lease })
    : undefined;
  elector?.onOtherInstallChange((holder) => metrics.otherInstallLeading.set(holder === '' ? 0 : 1));
  const events = new EventRecorder(http, 'poolkeeper-controller', logger);
  const repairer = config.repair === 'off'
    ? undefined
    : new MissingSidecarRepairer(http, events, logger, { ...DEFAULT_POD_REPAIR_OPTIONS, mode: config.repair });
  // The receiver answers only once the controller exists and leads; it listens first so that its port is known.
  const late: { controller?: BudgetController } = {};
  const receiver = config.acknowledgements ? receiverFor(() => late.controller, logger.child({ component: 'acknowledgements' }), registry) : undefined;
  const acknowledgementPort = receiver && config.acknowledgements ? await receiver.listen(config.acknowledgements.host, config.acknowledgements.port) : undefined;
  const advertise = config.acknowledgements?.advertise ?? '';
  const acknowledgeTo = acknowledgementPort === undefined ? undefined : `http://${advertise.includes(':') ? `[${advertise}]` : advertise}:${acknowledgementPort}`;
  const running = new BudgetController({
    http,
    logger,
    metrics,
    elector,
    acknowledgeTo,
    reconciler: { discovery: new LimitDiscovery({ logger }), events, repairer, manageSidecarAccess: config.manageSidecarAccess ?? true, now: () => new Date(serverClock.now()) },
  });
  late.controller = running;
  let stopping = false;
  const admin = new AdminServer({
    registry,
    healthy: () => !stopping,
    readiness: () => ({ ready: running.ready && !stopping, reasons: running.ready ? [] : ['caches not synced'] }),
  });
  const metricsPort = await admin.listen(config.metricsHost ?? '0.0.0.0', config.metricsPort);
  await running.start();
  logger.info({ metricsPort, acknowledgeTo, identity: config.identity, leaderElection: config.leaderElection }, 'controller started');
  return {
    controller: running,
    registry,
    metricsPort,
    acknowledgeTo,
    async shutdown(): Promise<void> {
      stopping = true;
      await running.stop();
      await receiver?.close();
      await admin.close();
    },
  };
}
