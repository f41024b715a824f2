/**
 * The sidecar's Prometheus metrics, registered on the Registry passed in.
 * Hot-path counts are plain numbers read at scrape time, so forwarding a
 * message never touches prom-client.
 */
import { Counter, Gauge, type Metric, type Registry } from 'prom-client';
import { SERVER_CONNECTION_STATES, type ServerConnectionState } from '../core/pool-state/index.ts';
import { PIN_REASONS, type PinReason } from '../core/protocol/index.ts';

/** What the metrics read at scrape time. */
export interface SidecarMetricsSource {
  serverConnectionsByState(): Record<ServerConnectionState, number>;
  clientsActive(): number;
  clientsWaiting(): number;
  clientsConnected(): number;
  grant(): { connections: number; generation: number; acknowledgedGeneration: number };
  credentialsGeneration(): string;
  tunnelUp(): boolean | undefined;
  /** Whether the database can be reached and logged in to, and the reason (undefined before the first login). */
  serverReachable(): { reachable: boolean; reason: string } | undefined;
  transactions(): number;
  /** Connected clients pinned to their server connection, by reason. */
  pinnedClients(): Record<PinReason, number>;
}

/** Kinds for poolkeeper_sidecar_errors_total. */
export type SidecarErrorKind =
  | 'client-protocol'
  | 'client-auth'
  | 'prepared-statement-refused'
  | 'sequence-read-refused'
  | 'pool-timeout'
  | 'login-refused'
  | 'server-connect'
  | 'server-login'
  | 'server-lost'
  | 'tunnel'
  | 'tunnel-host-key-mismatch'
  | 'dirty-server-discarded'
  | 'cancel'
  | 'client-settings'
  | 'pre-ping'
  | 'login-timeout'
  | 'too-many-clients';

/** The metric objects; construct once per Sidecar. */
export class SidecarMetrics {
  readonly waitSeconds: PlainHistogram;
  readonly errors: Counter<'kind'>;
  readonly tunnelReconnects: Counter;
  readonly serverLogins: Counter<'result'>;
  readonly pinned: Counter<'reason'>;
  /** Clients unpinned once their session state was gone from the server connection. */
  readonly unpinned: Counter<'reason'>;
  readonly carriedSettings: Counter;
  private readonly clientTlsConnections: Counter;
  readonly cancels: Counter<'result'>;
  private source: SidecarMetricsSource | undefined;

  constructor(registry: Registry) {
    const read = (): SidecarMetricsSource | undefined => this.source;
    new Gauge({
      name: 'poolkeeper_sidecar_server_connections', help: 'Server connections by state', labelNames: ['state'], registers: [registry],
      collect() {
        const s = read();
        if (!s) return;
        const byState = s.serverConnectionsByState();
        for (const state of SERVER_CONNECTION_STATES) if (state !== 'closed') this.set({ state }, byState[state]);
      },
    });
    new Gauge({
      name: 'poolkeeper_sidecar_clients', help: 'Client connections: active (holding a server connection), waiting (queued for one), connected (all)', labelNames: ['state'], registers: [registry],
      collect() {
        const s = read();
        if (!s) return;
        this.set({ state: 'active' }, s.clientsActive());
        this.set({ state: 'waiting' }, s.clientsWaiting());
        this.set({ state: 'connected' }, s.clientsConnected());
      },
    });
    new Gauge({
      name: 'poolkeeper_sidecar_pinned_clients', help: 'Clients kept on one server connection by session state in transaction mode, by reason', labelNames: ['reason'], registers: [registry],
      collect() {
        const s = read();
        if (!s) return;
        const pinned = s.pinnedClients();
        for (const reason of PIN_REASONS) this.set({ reason }, pinned[reason]);
      },
    });
    new Gauge({
      name: 'poolkeeper_sidecar_grant_connections', help: 'Server connections granted by the controller', registers: [registry],
      collect() {
        const s = read();
        if (s) this.set(s.grant().connections);
      },
    });
    new Gauge({
      name: 'poolkeeper_sidecar_grant_generation', help: 'Grant generation: received and acknowledged', labelNames: ['kind'], registers: [registry],
      collect() {
        const s = read();
        if (!s) return;
        const g = s.grant();
        this.set({ kind: 'received' }, g.generation);
        this.set({ kind: 'acknowledged' }, g.acknowledgedGeneration);
      },
    });
    new Gauge({
      name: 'poolkeeper_sidecar_credentials_info', help: 'Credentials generation used by new server logins (value is always 1)', labelNames: ['generation'], registers: [registry],
      collect() {
        const s = read();
        if (!s) return;
        this.reset();
        this.set({ generation: s.credentialsGeneration() }, 1);
      },
    });
    new Gauge({
      name: 'poolkeeper_sidecar_tunnel_up', help: '1 if the SSH tunnel is connected (absent without a tunnel)', registers: [registry],
      collect() {
        const up = read()?.tunnelUp();
        // Without a tunnel, no series at all: an unlabelled gauge otherwise shows 0, which reads as a tunnel down.
        if (up === undefined) this.remove();
        else this.set(up ? 1 : 0);
      },
    });
    new Gauge({
      name: 'poolkeeper_sidecar_server_reachable', help: '1 if the database can be reached and logged in to (a login succeeded), 0 if not (a login failed while no server connection was live), by reason (LoggedIn, LoginFailed, ConnectionFailed, TunnelFailed); absent before the first login', labelNames: ['reason'], registers: [registry],
      collect() {
        const r = read()?.serverReachable();
        // Labelled, so that before the first login there is no series at all (an unlabelled gauge shows 0).
        this.reset();
        if (r !== undefined) this.set({ reason: r.reason }, r.reachable ? 1 : 0);
      },
    });
    new Counter({
      name: 'poolkeeper_sidecar_transactions_total', help: 'Transactions (or autocommit statements) completed through the pool', registers: [registry],
      collect() {
        const s = read();
        if (!s) return;
        this.reset();
        this.inc(s.transactions());
      },
    });
    this.waitSeconds = new PlainHistogram({
      name: 'poolkeeper_sidecar_client_wait_seconds', help: 'Time clients waited for a server connection', registers: [registry],
      buckets: [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30],
    });
    this.errors = new Counter({ name: 'poolkeeper_sidecar_errors_total', help: 'Errors by kind', labelNames: ['kind'], registers: [registry] });
    this.tunnelReconnects = new Counter({ name: 'poolkeeper_sidecar_tunnel_reconnects_total', help: 'SSH tunnel reconnections after the first connection', registers: [registry] });
    this.cancels = new Counter({ name: 'poolkeeper_sidecar_cancel_requests_total', help: 'Client CancelRequests: forwarded to the backend running the statement, answered by the sidecar (the statement still waited for a server connection), or dropped (nothing running, statement ended, unknown key, failed)', labelNames: ['result'], registers: [registry] });
    this.pinned = new Counter({ name: 'poolkeeper_sidecar_pins_total', help: 'Clients pinned to their server connection by session state in transaction mode, by reason', labelNames: ['reason'], registers: [registry] });
    this.unpinned = new Counter({ name: 'poolkeeper_sidecar_unpins_total', help: 'Pinned clients let go of their server connection once their session state was gone from it (session advisory locks all released), by reason', labelNames: ['reason'], registers: [registry] });
    this.carriedSettings = new Counter({ name: 'poolkeeper_sidecar_carried_settings_total', help: 'Session setting changes (SET or RESET alone between transactions) carried to the client\'s next server connections instead of pinning it, in transaction mode', registers: [registry] });
    this.clientTlsConnections = new Counter({ name: 'poolkeeper_sidecar_client_tls_connections_total', help: 'App connections that asked for TLS and got it (spec.sidecar.clientTLS)', registers: [registry] });
    this.serverLogins = new Counter({ name: 'poolkeeper_sidecar_server_logins_total', help: 'Upstream logins by result', labelNames: ['result'], registers: [registry] });
  }

  /** Connects the scrape-time readers. */
  bind(source: SidecarMetricsSource): void {
    this.source = source;
  }

  /** An app's connection switched to TLS. */
  clientTls(): void {
    this.clientTlsConnections.inc();
  }

  /** Counts one error. */
  error(kind: SidecarErrorKind): void {
    this.errors.inc({ kind });
  }
}

/** One line of a histogram as prom-client's own histograms give them (Registry formats these). */
interface HistogramValue {
  value: number;
  labels: { le?: number | string };
  metricName: string;
}

/**
 * An unlabelled histogram counted in plain numbers, exposed as prom-client's
 * Histogram exposes its own (same lines, same get()). The client wait is
 * observed once per transaction in transaction mode, and prom-client's
 * observe() costs about 0.3 µs there (labels checked and hashed, the bucket
 * found by a float-keyed property lookup): about 1 % of the sidecar's CPU.
 */
export class PlainHistogram {
  readonly name: string;
  readonly help: string;
  readonly type = 'histogram';
  readonly aggregator = 'sum';
  private readonly bounds: readonly number[];
  /** Observations per bucket (not cumulative); the last one is above every bound. */
  private readonly counts: Float64Array;
  private sum = 0;
  private count = 0;

  /** Registers itself on each of `registers`. */
  constructor(config: { name: string; help: string; buckets: readonly number[]; registers: readonly Registry[] }) {
    this.name = config.name;
    this.help = config.help;
    this.bounds = [...config.buckets].sort((a, b) => a - b);
    this.counts = new Float64Array(this.bounds.length + 1);
    // Registry asks a metric only for name, help, type, get() and reset().
    for (const registry of config.registers) registry.registerMetric(this as unknown as Metric);
  }

  /** Counts `value` in the first bucket whose bound is at or above it. */
  observe(value: number): void {
    const bounds = this.bounds;
    let i = 0;
    while (i < bounds.length && value > bounds[i]!) i += 1;
    this.counts[i]! += 1;
    this.sum += value;
    this.count += 1;
  }

  /** Forgets every observation. */
  reset(): void {
    this.counts.fill(0);
    this.sum = 0;
    this.count = 0;
  }

  /** The buckets (cumulative, `le`), +Inf, sum and count, as prom-client's Histogram.get(). */
  get(): Promise<{ name: string; help: string; type: 'histogram'; aggregator: 'sum'; values: HistogramValue[] }> {
    const bucket = `${this.name}_bucket`;
    const values: HistogramValue[] = [];
    let cumulative = 0;
    this.bounds.forEach((le, i) => {
      cumulative += this.counts[i]!;
      values.push({ value: cumulative, labels: { le }, metricName: bucket });
    });
    values.push(
      { value: this.count, labels: { le: '+Inf' }, metricName: bucket },
      { value: this.sum, labels: {}, metricName: `${this.name}_sum` },
      { value: this.count, labels: {}, metricName: `${this.name}_count` },
    );
    return Promise.resolve({ name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values });
  }
}
