/**
 * Leader election on a coordination.k8s.io/v1 Lease, as client-go does it:
 * acquire when the lease is free or expired, renew every retry period, and
 * step down when renewal has failed for `renewDeadline`. Writes use the
 * lease's resourceVersion, so two candidates can never both win a round.
 * A standby also watches the Lease, so it takes over as soon as a leader that
 * stops cleanly releases it rather than at its next retry period.
 *
 * With `clusterLease`, a candidate leads only while it holds both its own Lease
 * (its install's replicas contend there) and a second Lease that every install in
 * the cluster contends for, taken in that order and released in the reverse one.
 * Two installs in different namespaces then never lead at once, and a replica of an
 * older release, which takes only its own Lease, keeps a newer one of the same
 * install from leading beside it during an upgrade (client-go's multilock).
 *
 * Clocks of different nodes differ, so a Lease's renewTime (the holder's clock)
 * is never compared with this candidate's clock: as client-go does, a Lease
 * counts as expired once its record has not changed for its duration, timed
 * from when this candidate saw it change, and every duration is measured on a
 * monotonic clock, so neither another node's clock nor a step of this one's
 * lets two candidates lead at once.
 */
import type { Logger } from 'pino';
import { steadyNow } from '../ops/clock.ts';
import { describeApiError } from './backoff.ts';
import { isStatus, type KubeHttp } from './http.ts';
import { Informer, type KubeObject } from './informer.ts';

/** Timings, in milliseconds. */
export interface LeaderElectionOptions {
  namespace: string;
  name: string;
  identity: string;
  /** A Lease shared by every install in the cluster; its holder is named `<namespace>/<identity>`. */
  clusterLease?: LeaseLock | undefined;
  leaseDurationMs?: number;
  renewDeadlineMs?: number;
  retryPeriodMs?: number;
  /** The clocks read; default the system's. */
  clock?: ElectionClock | undefined;
  logger: Logger;
}

/** The clocks the election reads. */
export interface ElectionClock {
  /** Wall time, ms since the epoch: only written into the Lease for people to read. */
  wallMs(): number;
  /** A clock that never steps: every duration judged is measured on it. */
  monotonicMs(): number;
}

/** The system's clocks. */
export const SYSTEM_ELECTION_CLOCK: ElectionClock = { wallMs: () => Date.now(), monotonicMs: steadyNow };

/** Lease times are MicroTime: RFC 3339 with exactly six fractional digits. */
function toMicroTime(date: Date): string {
  return date.toISOString().replace('Z', '000Z');
}

/** Where a Lease lives. */
export interface LeaseLock {
  namespace: string;
  name: string;
}

/** One Lease this candidate contends for, and the identity it writes there. */
interface HeldLock extends LeaseLock {
  identity: string;
}

/** The outcome of one acquire-or-renew attempt on one Lease. */
interface LeaseRound {
  held: boolean;
  /** Who holds it when we do not (empty if nobody). */
  holder: string;
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
  private readonly options: Required<Omit<LeaderElectionOptions, 'logger' | 'clusterLease' | 'clock'>> & { logger: Logger };
  private readonly clock: ElectionClock;
  /** Per Lease (namespace/name), the record last seen and when it was first seen so, on the monotonic clock. */
  private readonly observed = new Map<string, { record: string; at: number }>();
  /** Own Lease first, then the cluster's: acquired in this order, released in reverse. */
  private readonly locks: readonly HeldLock[];
  /** The other install holding the cluster Lease, last reported (so it is logged once per holder). */
  private reportedHolder = '';
  private leading = false;
  private stopped = false;
  private timer: NodeJS.Timeout | undefined;
  /** Fires when the renew deadline passes, so a round hung on the network cannot keep this replica leading. */
  private deadlineTimer: NodeJS.Timeout | undefined;
  private lastRenew = 0;
  /** The acquire-or-renew round in flight, so `stop` never races it. */
  private round: Promise<void> | undefined;
  /** The Lease changed during a round: look again right after it. */
  private again = false;
  private readonly watchers: Array<Informer<Lease & KubeObject>> = [];
  private readonly leadingListeners: Array<(leading: boolean) => void> = [];
  private readonly otherInstallListeners: Array<(holder: string) => void> = [];

  constructor(http: KubeHttp, options: LeaderElectionOptions) {
    this.http = http;
    const { clusterLease, clock, ...rest } = options;
    this.clock = clock ?? SYSTEM_ELECTION_CLOCK;
    this.options = { leaseDurationMs: 15_000, renewDeadlineMs: 10_000, retryPeriodMs: 2_000, ...rest };
    const own = { namespace: options.namespace, name: options.name, identity: options.identity };
    this.locks = clusterLease ? [own, { ...clusterLease, identity: `${options.namespace}/${options.identity}` }] : [own];
  }

  /** True while this candidate holds the lease. */
  get isLeader(): boolean {
    return this.leading;
  }

  /** Subscribes to changes of which other install holds the cluster Lease (empty: none). */
  onOtherInstallChange(listener: (holder: string) => void): void {
    this.otherInstallListeners.push(listener);
  }

  /** Subscribes to leadership changes. */
  onLeadershipChange(listener: (leading: boolean) => void): void {
    this.leadingListeners.push(listener);
  }

  private static path(lock: LeaseLock): string {
    return `/apis/coordination.k8s.io/v1/namespaces/${lock.namespace}/leases`;
  }

  private setLeading(leading: boolean): void {
    if (leading === this.leading) return;
    this.leading = leading;
    this.options.logger.info({ identity: this.options.identity, lease: this.options.name }, leading ? 'became leader' : 'lost leadership');
    for (const listener of this.leadingListeners) listener(leading);
  }

  /**
   * Notes the record read (or written) now; returns how long, on the monotonic
   * clock, it has stood unchanged as far as this candidate has seen.
   */
  private observe(lock: HeldLock, spec: Lease['spec']): number {
    const key = `${lock.namespace}/${lock.name}`;
    const record = JSON.stringify([spec.holderIdentity ?? '', spec.renewTime ?? '', spec.acquireTime ?? '', spec.leaseDurationSeconds ?? 0, spec.leaseTransitions ?? 0]);
    const now = this.clock.monotonicMs();
    const seen = this.observed.get(key);
    if (seen?.record === record) return now - seen.at;
    this.observed.set(key, { record, at: now });
    return 0;
  }

  /** One acquire-or-renew attempt on one Lease. */
  private async tryAcquireOrRenew(lock: HeldLock, now: Date): Promise<LeaseRound> {
    const { name, namespace, identity } = lock;
    const { leaseDurationMs } = this.options;
    const path = LeaderElector.path(lock);
    const microTime = toMicroTime(now);
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
      lease = await this.http.get<Lease>(`${path}/${name}`);
    } catch (err) {
      if (!isStatus(err, 404)) throw err;
      try {
        const created = { ...spec(), leaseTransitions: 0 };
        await this.http.create(path, { apiVersion: 'coordination.k8s.io/v1', kind: 'Lease', metadata: { name, namespace }, spec: created });
        this.observe(lock, created);
        return { held: true, holder: identity };
      } catch (createErr) {
        if (isStatus(createErr, 409)) return { held: false, holder: '' };
        throw createErr;
      }
    }
    const holder = lease.spec.holderIdentity ?? '';
    const unchangedMs = this.observe(lock, lease.spec);
    const duration = (lease.spec.leaseDurationSeconds ?? 0) * 1000;
    // Released, or not renewed for its duration as this candidate has seen it (renewTime is another node's clock).
    const expired = holder === '' || unchangedMs > duration;
    if (holder !== identity && !expired) return { held: false, holder };
    try {
      const written = spec(lease.spec);
      await this.http.replace(`${path}/${name}`, { ...lease, spec: written });
      this.observe(lock, written);
      return { held: true, holder: identity };
    } catch (err) {
      if (isStatus(err, 409)) return { held: false, holder };
      throw err;
    }
  }

  /** Acquires or renews every Lease in order, stopping at the first held by another; true if all are held. */
  private async tryAcquireOrRenewAll(now = new Date(this.clock.wallMs())): Promise<boolean> {
    for (const [index, lock] of this.locks.entries()) {
      const round = await this.tryAcquireOrRenew(lock, now);
      if (index > 0) this.reportClusterHolder(round, lock);
      if (!round.held) return false;
    }
    return true;
  }

  /** Says once per holder that another install leads the cluster, and once when it no longer does. */
  private reportClusterHolder(round: LeaseRound, lock: HeldLock): void {
    const other = round.held ? '' : round.holder;
    if (other === this.reportedHolder) return;
    this.reportedHolder = other;
    for (const listener of this.otherInstallListeners) listener(other);
    const lease = `${lock.namespace}/${lock.name}`;
    if (other === '') this.options.logger.info({ lease }, 'no other poolkeeper install leads the cluster now');
    else {
      this.options.logger.warn(
        { lease, holder: other, identity: lock.identity },
        `another poolkeeper controller leads this cluster (${other}); this one stands by: two installs would budget the same servers twice. Remove one install, or this one takes over if that one stops`,
      );
    }
  }

  private async tick(): Promise<void> {
    if (this.stopped) return;
    try {
      const held = await this.tryAcquireOrRenewAll();
      if (held && !this.stopped) {
        this.lastRenew = this.clock.monotonicMs();
        this.setLeading(true);
        this.armDeadline();
      } else if (!this.leading) this.setLeading(false);
    } catch (err) {
      this.options.logger.warn({ lease: this.options.name, error: describeApiError(err) }, 'lease renewal failed');
    }
    this.checkDeadline();
  }

  /** Checks the renew deadline again when it would pass, whatever the round in flight is doing. */
  private armDeadline(): void {
    clearTimeout(this.deadlineTimer);
    this.deadlineTimer = setTimeout(() => this.checkDeadline(), this.options.renewDeadlineMs + 1);
    this.deadlineTimer.unref();
  }

  /** A leader that could not renew within the deadline must stop acting: a standby may take over once the lease's duration passes. */
  private checkDeadline(): void {
    if (!this.leading || this.clock.monotonicMs() - this.lastRenew <= this.options.renewDeadlineMs) return;
    this.options.logger.warn({ lease: this.options.name, renewDeadlineMs: this.options.renewDeadlineMs }, 'lease not renewed within the renew deadline: stepping down');
    this.setLeading(false);
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
    for (const lock of this.locks) {
      const watcher = new Informer<Lease & KubeObject>(this.http, {
        path: LeaderElector.path(lock), fieldSelector: `metadata.name=${lock.name}`, logger: this.options.logger.child({ lease: `${lock.namespace}/${lock.name}` }),
      });
      watcher.onChange((type, lease) => {
        if (!this.leading && (type === 'DELETED' || !lease.spec.holderIdentity)) this.runRound();
      });
      this.watchers.push(watcher);
      void watcher.start();
    }
  }

  /**
   * Stops the loop and releases the lease if held, so a standby takes over at
   * once. Call it only after the work done as leader has ended.
   */
  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    clearTimeout(this.deadlineTimer);
    await this.round;
    await Promise.all(this.watchers.map((watcher) => watcher.stop()));
    // Our own Lease is held whenever the cluster's is, even by a replica that stands by for another install.
    for (const lock of [...this.locks].reverse()) await this.release(lock);
    this.setLeading(false);
  }

  /** Gives up a Lease we hold, so that the next candidate need not wait for it to expire. */
  private async release(lock: HeldLock): Promise<void> {
    const path = `${LeaderElector.path(lock)}/${lock.name}`;
    try {
      const lease = await this.http.get<Lease>(path);
      if (lease.spec.holderIdentity === lock.identity) {
        const microTime = toMicroTime(new Date(this.clock.wallMs()));
        await this.http.replace(path, { ...lease, spec: { ...lease.spec, holderIdentity: '', leaseDurationSeconds: 1, renewTime: microTime } });
      }
    } catch (err) {
      if (!isStatus(err, 404)) this.options.logger.warn({ lease: `${lock.namespace}/${lock.name}`, error: describeApiError(err) }, 'could not release the lease');
    }
  }
}
