/**
 * The controller's Prometheus metrics, registered on a Registry passed in.
 */
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

/** Every metric the controller exports. */
export class ControllerMetrics {
  readonly serverLimit: Gauge<'server'>;
  readonly serverAllocated: Gauge<'server'>;
  readonly connectionAllocated: Gauge<'namespace' | 'connection'>;
  readonly connectionPods: Gauge<'namespace' | 'connection'>;
  readonly connectionOversubscribed: Gauge<'namespace' | 'connection'>;
  readonly perPodBudget: Gauge<'namespace' | 'connection' | 'consumer'>;
  readonly unresponsiveSidecars: Gauge<'namespace' | 'connection'>;
  readonly reconcileDuration: Histogram<'result'>;
  readonly reconcileErrors: Counter<'reason'>;
  readonly rebalanceLatency: Histogram;
  readonly grantWrites: Counter<'direction'>;
  readonly leader: Gauge;
  /** 1 while another install holds the cluster Lease and this replica stands by for it. */
  readonly otherInstallLeading: Gauge;
  /** The API server's clock minus this replica's, as learnt from its answers (departure holds are timed on it). */
  readonly apiServerClockOffset: Gauge;

  /** `sources`: values read when the metrics are scraped. */
  constructor(registry: Registry, sources: { apiServerClockOffsetSeconds?: () => number } = {}) {
    const registers = [registry];
    this.serverLimit = new Gauge({ name: 'poolkeeper_server_limit_connections', help: 'Effective connection limit of a database server (after reserve), shared by its DatabaseConnections.', labelNames: ['server'], registers });
    this.serverAllocated = new Gauge({ name: 'poolkeeper_server_allocated_connections', help: 'Sum over pods of max(granted, acknowledged) on a server.', labelNames: ['server'], registers });
    this.connectionAllocated = new Gauge({ name: 'poolkeeper_connection_allocated_connections', help: 'Connections reserved by the pods of a DatabaseConnection.', labelNames: ['namespace', 'connection'], registers });
    this.connectionPods = new Gauge({ name: 'poolkeeper_connection_pods', help: 'Live pods drawing on a DatabaseConnection.', labelNames: ['namespace', 'connection'], registers });
    this.connectionOversubscribed = new Gauge({ name: 'poolkeeper_connection_oversubscribed', help: '1 when pods x minPerPod exceeds the limit.', labelNames: ['namespace', 'connection'], registers });
    this.perPodBudget = new Gauge({ name: 'poolkeeper_consumer_per_pod_budget_connections', help: 'Fair per-pod budget of a consumer.', labelNames: ['namespace', 'connection', 'consumer'], registers });
    this.unresponsiveSidecars = new Gauge({ name: 'poolkeeper_connection_unresponsive_sidecars', help: 'Sidecars of live pods that stopped writing their PoolMember status (their reservations stay counted).', labelNames: ['namespace', 'connection'], registers });
    this.reconcileDuration = new Histogram({ name: 'poolkeeper_reconcile_duration_seconds', help: 'Time to reconcile one database server.', labelNames: ['result'], buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5], registers });
    this.reconcileErrors = new Counter({ name: 'poolkeeper_reconcile_errors_total', help: 'Failed reconciles by reason.', labelNames: ['reason'], registers });
    this.rebalanceLatency = new Histogram({ name: 'poolkeeper_rebalance_latency_seconds', help: 'From the first reconcile that found grants off target to the one that found them settled.', buckets: [0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120], registers });
    this.grantWrites = new Counter({ name: 'poolkeeper_grant_writes_total', help: 'PoolMember grant changes written, by direction.', labelNames: ['direction'], registers });
    this.leader = new Gauge({ name: 'poolkeeper_controller_leader', help: '1 while this replica holds the leader lease.', registers });
    this.apiServerClockOffset = new Gauge({ name: 'poolkeeper_controller_api_server_clock_offset_seconds', help: 'The API server\'s clock minus this replica\'s, learnt from the Date of its answers; departure holds are timed on the API server\'s clock.', registers, collect() {
      if (sources.apiServerClockOffsetSeconds) this.set(sources.apiServerClockOffsetSeconds());
    } });
    this.otherInstallLeading = new Gauge({ name: 'poolkeeper_controller_other_install_leading', help: '1 while another poolkeeper install holds the cluster Lease and this replica stands by for it.', registers });
  }
}
