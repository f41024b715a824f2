/**
 * Leader election on a coordination.k8s.io/v1 Lease, as client-go does it:
 * acquire when the lease is free or expired, renew every retry period, and
 * step down when renewal has failed for `renewDeadline`. Writes use the
 * lease's resourceVersion, so two candidates can never both win a round.
 * A standby also watches the Lease, so it takes over as soon as a leader that
 * stops cleanly releases it rather than at its next retry period.
 */
import type { Logger } from 'pino';
import { describeApiError } from './backoff.ts';
import { isStatus, type KubeHttp } from './http.ts';
import { Informer, type KubeObject } from './informer.ts';

/** Timings, in milliseconds. */
export interface LeaderElectionOptions {
  namespace: string;
  name: string;
  identity: string;
  leaseDurationMs?: number;
  renewDeadlineMs?: number;
  retryPeriodMs?: number;
  logger: Logger;
}

interface Lease {
  apiVersion: 'coordination.k8s.io/v1';
  kind: 'Lease';
  metadata: { name: string; namespace: string; resourceVersion?: string };
  spec: { holderIdentity?: string; leaseDurationSeconds?: number; acquireTime?: string; renewTime?: string; leaseTransitions?: number };
}

/** Runs the election loop and tells callbacks when leadership starts and stops. */
export class LeaderElector {
  private readonly http: KubeHttp;
  private readonly options: Required<Omit<LeaderElectionOptions, 'logger'>> & { logger: Logger };
  private leading = false;
  private stopped = false;
  private timer: NodeJS.Timeout | undefined;
  private lastRenew = 0;
  /** The acquire-or-renew round in flight, so `stop` never races it. */
  private round: Promise<void> | undefined;
  /** The Lease changed during a round: look again right after it. */
  private again = false;
  private watcher: Informer<Lease & KubeObject> | undefined;
  private readonly leadingListeners: Array<(leading: boolean) => void> = [];

  constructor(http: KubeHttp, options: LeaderElectionOptions) {
    this.http = http;
    this.options = { leaseDurationMs: 15_000, renewDeadlineMs: 10_000, retryPeriodMs: 2_000, ...options };
  }

  /** True while this candidate holds the lease. */
  get isLeader(): boolean {
    return this.leading;
  }

  /** Subscribes to leadership changes. */
  onLeadershipChange(listener: (leading: boolean) => void): void {
    this.leadingListeners.push(listener);
  }

  private get path(): string {
    return `/apis/coordination.k8s.io/v1/namespaces/${this.options.namespace}/leases`;
  }

  private setLeading(leading: boolean): void {
    if (leading === this.leading) return;
    this.leading = leading;
    this.options.logger.info({ identity: this.options.identity, lease: this.options.name }, leading ? 'became leader' : 'lost leadership');
    for (const listener of this.leadingListeners) listener(leading);
  }

  /** One acquire-or-renew attempt; true if we hold the lease afterwards. */
  async tryAcquireOrRenew(now = new Date()): Promise<boolean> {
    const { name, namespace, identity, leaseDurationMs } = this.options;
    // Lease times are MicroTime: RFC 3339 with exactly six fractional digits.
    const microTime = now.toISOString().replace('Z', '000Z');
    const spec = (existing?: Lease['spec']): Lease['spec'] => {
      const renewing = existing?.holderIdentity === identity;
      return {
        holderIdentity: identity,
        leaseDurationSeconds: Math.ceil(leaseDurationMs / 1000),
        acquireTime: renewing && existing?.acquireTime ? existing.acquireTime : microTime,
        renewTime: microTime,
        leaseTransitions: (existing?.leaseTransitions ?? 0) + (renewing ? 0 : 1),
      };
    };
    let lease: Lease;
    try {
      lease = await this.http.get<Lease>(`${this.path}/${name}`);
    } catch (err) {
      if (!isStatus(err, 404)) throw err;
      try {
        await this.http.create(this.path, { apiVersion: 'coordination.k8s.io/v1', kind: 'Lease', metadata: { name, namespace }, spec: { ...spec(), leaseTransitions: 0 } });
        return true;
      } catch (createErr) {
        if (isStatus(createErr, 409)) return false;
        throw createErr;
      }
    }
    const holder = lease.spec.holderIdentity;
    const renewed = lease.spec.renewTime ? Date.parse(lease.spec.renewTime) : 0;
    const duration = (lease.spec.leaseDurationSeconds ?? 0) * 1000;
    const expired = !holder || renewed + duration < now.getTime();
    if (holder !== identity && !expired) return false;
    try {
      await this.http.replace(`${this.path}/${name}`, { ...lease, spec: spec(lease.spec) });
      return true;
    } catch (err) {
      if (isStatus(err, 409)) return false;
      throw err;
    }
  }

  private async tick(): Promise<void> {
    if (this.stopped) return;
    try {
      const held = await this.tryAcquireOrRenew();
      if (held) this.lastRenew = Date.now();
      if (held) this.setLeading(true);
      else if (!this.leading) this.setLeading(false);
    } catch (err) {
      this.options.logger.warn({ lease: this.options.name, error: describeApiError(err) }, 'lease renewal failed');
    }
    // A leader that could not renew within the deadline must stop acting.
    if (this.leading && Date.now() - this.lastRenew > this.options.renewDeadlineMs) this.setLeading(false);
  }

  /** Runs a round now (or right after the one in flight), then schedules the next. */
  private runRound(): void {
    if (this.stopped) return;
    if (this.round) {
      this.again = true;
      return;
    }
    clearTimeout(this.timer);
    this.round = this.tick().finally(() => {
      this.round = undefined;
      if (this.stopped) return;
      const again = this.again;
      this.again = false;
      this.timer = setTimeout(() => this.runRound(), again ? 0 : this.options.retryPeriodMs);
      this.timer.unref();
    });
  }

  /** Starts the loop; returns at once. */
  start(): void {
    this.runRound();
    // A released or expired lease is tried at once, not at the next retry period.
    const watcher = new Informer<Lease & KubeObject>(this.http, {
      path: this.path, fieldSelector: `metadata.name=${this.options.name}`, logger: this.options.logger.child({ lease: this.options.name }),
    });
    watcher.onChange((type, lease) => {
      if (!this.leading && (type === 'DELETED' || !lease.spec.holderIdentity)) this.runRound();
    });
    this.watcher = watcher;
    void watcher.start();
  }

  /**
   * Stops the loop and releases the lease if held, so a standby takes over at
   * once. Call it only after the work done as leader has ended.
   */
  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    await this.round;
    await this.watcher?.stop();
    if (!this.leading) return;
    try {
      const lease = await this.http.get<Lease>(`${this.path}/${this.options.name}`);
      if (lease.spec.holderIdentity === this.options.identity) {
        const microTime = new Date().toISOString().replace('Z', '000Z');
        await this.http.replace(`${this.path}/${this.options.name}`, { ...lease, spec: { ...lease.spec, holderIdentity: '', leaseDurationSeconds: 1, renewTime: microTime } });
      }
    } catch (err) {
      this.options.logger.warn({ lease: this.options.name, error: describeApiError(err) }, 'could not release the lease');
    }
    this.setLeading(false);
  }
}
