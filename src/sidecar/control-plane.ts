/**
 * The sidecar's side of the PoolMember protocol (docs/protocol.md): watches
 * its own PoolMember by name and its connection's PoolGrant (grant table),
 * hands each new grant to the pool, and writes the pool's acknowledgement and
 * a heartbeat into the PoolMember's status. Its grant comes from the table once
 * the PoolMember's spec.tableFrom says the table covers it, else from the
 * PoolMember's spec.grant. Needs only get/list/watch on poolmembers and
 * poolgrants and patch on poolmembers/status.
 */
import type { Logger } from 'pino';
import { API_GROUP, API_VERSION, DATABASE_REACHABLE, memberPodUid, type Condition, type PoolGrant, type PoolMember, type PoolMemberStatus } from '../api/index.ts';
import { BASE_HEARTBEAT_SECONDS, deriveGrant, grantTableOf } from '../core/budget/grant-table.ts';
import { KubeApiError, isStatus, type KubeHttp } from '../kube/http.ts';
import { ApiReachability, Backoff, isTransientApiError } from '../kube/backoff.ts';
import { Informer, type KubeObject } from '../kube/informer.ts';
import type { DatabaseReachability, SidecarStatus } from './settings.ts';
import { AcknowledgementSender } from './acknowledgement-sender.ts';
import type { ChannelAcknowledgement } from '../core/budget/acknowledgement.ts';
import { steadyNow } from '../ops/clock.ts';

/** How long acknowledgements take the status path after the channel failed once. */
const CHANNEL_RETRY_MS = 30_000;

/** The status fields an acknowledgement consists of. */
const ACK_BLANK = { acknowledgedGeneration: undefined, acknowledgedConnections: undefined, heldConnections: undefined, tableGeneration: undefined } as const;

/** One status field of each: equal (conditions by their fields, whatever the order of their keys). */
function fieldEqual(a: PoolMemberStatus, b: PoolMemberStatus, k: keyof PoolMemberStatus): boolean {
  if (k !== 'conditions') return a[k] === b[k];
  const left = a.conditions ?? [];
  const right = b.conditions ?? [];
  return left.length === right.length && left.every((c, i) => {
    const d = right[i];
    return d !== undefined && c.type === d.type && c.status === d.status && c.reason === d.reason && c.message === d.message && c.lastTransitionTime === d.lastTransitionTime;
  });
}

/** Equal apart from the heartbeat and the waiting clients (which never cause a write of their own). */
function statusFieldsEqual(a: PoolMemberStatus, b: PoolMemberStatus): boolean {
  const keys = new Set([...Object.keys(a), ...Object.keys(b)].filter((k) => k !== 'heartbeatTime' && k !== 'waitingClients')) as Set<keyof PoolMemberStatus>;
  for (const k of keys) if (!fieldEqual(a, b, k)) return false;
  return true;
}

/** The DatabaseReachable condition of a reachability report. */
function reachabilityCondition(r: DatabaseReachability): Condition {
  return {
    type: DATABASE_REACHABLE, status: r.reachable ? 'True' : 'False', reason: r.reason, message: r.message,
    lastTransitionTime: new Date(r.since).toISOString().replace(/\.\d+Z$/, 'Z'),
  };
}

/** The acknowledgement fields of `status` are those of `written`. */
function sameAcknowledgement(status: PoolMemberStatus, written: PoolMemberStatus | undefined): boolean {
  return written !== undefined && (Object.keys(ACK_BLANK) as Array<keyof typeof ACK_BLANK>).every((k) => status[k] === written[k]);
}

/** What the agent drives: the Sidecar, or a test double of its control side. */
export interface GrantTarget {
  setGrant(connections: number, generation: number): void;
  onStatus(listener: (status: SidecarStatus) => void): () => void;
  status(): SidecarStatus;
}

/** Settings of the agent. */
export interface PoolMemberAgentOptions {
  http: KubeHttp;
  namespace: string;
  podName: string;
  target: GrantTarget;
  logger: Logger;
  version: string;
  /** The heartbeat; absent: the table's heartbeatSeconds (10 s before there is one). */
  heartbeatMs?: number;
  /** How long after an acknowledgement over the channel the status follows at most; absent: the table's statusDelaySeconds. */
  statusDelayMs?: number;
  stallTimeoutMs?: number;
  /**
   * Clients waiting for a server connection now: sent along with every status
   * write, heartbeats included, for `kubectl poolkeeper status`; a change of it
   * alone writes nothing.
   */
  waitingClients?: () => number;
  /** Called with every spec the agent sees (pool settings, database, drain). */
  onSpec?: (spec: PoolMember['spec']) => void;
  /**
   * How long a shrink that comes with `drain: true` waits before it is applied.
   * A terminating pod's app keeps finishing its requests after deletion starts;
   * cutting its connections at once would fail them, and its reservation stays
   * counted until it acknowledges or reports drained, so waiting is safe.
   */
  drainGraceMs?: number;
  /** The node's clock, for status.heartbeatTime; absent: the system clock. */
  now?: () => Date;
}

/**
 * How long a sidecar that drained keeps trying to write that it did before it
 * exits: within the 5 s the webhook adds to drainTimeout for the pod's
 * terminationGracePeriodSeconds.
 */
const FLUSH_WITHIN_MS = 4000;

/** Runs the sidecar's half of the protocol. */
export class PoolMemberAgent {
  private readonly options: PoolMemberAgentOptions;
  private readonly informer: Informer<PoolMember & KubeObject>;
  /** The PoolGrant of the connection, watched by name once the PoolMember names it. */
  private tableInformer: Informer<PoolGrant & KubeObject> | undefined;
  /**
   * The last grant this pod had from its table. If the table goes (its
   * DatabaseConnection deleted and applied again, and the garbage collector
   * came first), the PoolMember's own grant is older and may be higher: the
   * pod is not grown to it, only shrunk if it is lower, until a new table
   * covers the pod.
   */
  private lastTableConnections: number | undefined;
  private member: PoolMember | undefined;
  /** Where the grant last handed to the pool came from: "m<generation>" (PoolMember) or "t" (table), and its number and drain flag. */
  private applied: { source: string; connections: number; drain: boolean } | undefined;
  /** The table generation of the grant handed to the pool, if it came from the table. */
  private appliedTableGeneration: number | undefined;
  /** The latest table generation whose grant the pool has acknowledged (0: none). */
  private acknowledgedTableGeneration = 0;
  /** The PoolGrant watch has listed: only then does this sidecar say it reads tables. */
  private tableReady = false;
  /** The table watch could not start (no RBAC on poolgrants, say): the status says so without a table generation. */
  private tableFailed = false;
  private appliedGeneration = -1;
  private writing: Promise<void> | undefined;
  private dirty = false;
  private heartbeat: NodeJS.Timeout | undefined;
  /** The first beat at a new interval, at a random point of it. */
  private heartbeatStart: NodeJS.Timeout | undefined;
  private heartbeatMs = 0;
  private unsubscribe: (() => void) | undefined;
  private stopped = false;
  private memberExists = false;
  private deferred: NodeJS.Timeout | undefined;
  /**
   * Shared by both watches and the status writes: after an API server
   * outage the first request that gets through (or a probe of /version)
   * ends every retry's wait at once, instead of each one's next backoff
   * step (up to 30 s).
   */
  private readonly reachability: ApiReachability;
  /**
   * A status write that failed for a passing reason (429 from API Priority and
   * Fairness, a 5xx, the network) is sent again after this backoff, or the
   * answer's Retry-After, rather than at the next heartbeat (up to minutes in a
   * large fleet) while the controller waits for the acknowledgement in it.
   */
  private readonly writeBackoff = new Backoff({ initialMs: 500, maxMs: 10_000, jitter: 0.5 });
  private writeRetry: NodeJS.Timeout | undefined;
  private readonly sender = new AcknowledgementSender();
  /** The acknowledgement the leader last confirmed over the channel (its fields only). */
  private sentOverChannel: string | undefined;
  /** Where the table last said to send acknowledgements. */
  private acknowledgeTo: string | undefined;
  /** The status last written to the PoolMember. */
  private lastWritten: PoolMemberStatus | undefined;
  /** The next delivery writes the status even if the channel could carry it (a heartbeat). */
  private writeDue = false;
  /** After a failed send, acknowledgements take the status path until then (ms). */
  private channelRetryAt = 0;
  /** The table's statusDelaySeconds, in ms (0: the status follows with the next heartbeat). */
  private statusDelayMs = 0;
  /** The status write that follows an acknowledgement sent over the channel. */
  private followUp: NodeJS.Timeout | undefined;

  constructor(options: PoolMemberAgentOptions) {
    this.options = options;
    this.reachability = new ApiReachability(options.http);
    this.informer = new Informer<PoolMember & KubeObject>(options.http, {
      path: `/apis/${API_GROUP}/${API_VERSION}/namespaces/${options.namespace}/poolmembers`,
      fieldSelector: `metadata.name=${options.podName}`,
      stallTimeoutMs: options.stallTimeoutMs,
      logger: options.logger.child({ informer: 'poolmember' }),
      reachability: this.reachability,
    });
  }

  /** The grant generation last handed to the pool (-1 before the first). */
  get generation(): number {
    return this.appliedGeneration;
  }

  /** Starts watching and reporting. */
  async start(): Promise<void> {
    this.informer.onChange((type, member) => {
      if (type === 'DELETED') {
        this.memberExists = false;
        this.member = undefined;
        return;
      }
      this.memberExists = true;
      this.member = member;
      this.options.onSpec?.(member.spec);
      this.watchTable(member.spec.connection);
      this.evaluate();
      // Only when the stored status differs from ours (not on the echo of our own write).
      if (!this.statusCurrent(member.status)) this.report();
    });
    this.unsubscribe = this.options.target.onStatus(() => this.report());
    await this.informer.start();
    // The grant table may already have said how often to beat.
    if (this.heartbeatMs === 0) this.scheduleHeartbeat(this.options.heartbeatMs ?? BASE_HEARTBEAT_SECONDS * 1000, false);
  }

  /**
   * Renews the status every `intervalMs`. When the table changes the interval,
   * the first beat comes at a random point of the new one: every sidecar of
   * the table sees the change at the same moment, and beating in step would
   * send the API server all of their writes at once.
   */
  private scheduleHeartbeat(intervalMs: number, spread: boolean): void {
    if (this.heartbeatMs === intervalMs || this.stopped) return;
    this.heartbeatMs = intervalMs;
    clearInterval(this.heartbeat);
    clearTimeout(this.heartbeatStart);
    const start = (): void => {
      this.heartbeat = setInterval(() => this.beat(), intervalMs);
      this.heartbeat.unref();
    };
    if (!spread) return start();
    this.heartbeatStart = setTimeout(() => {
      this.beat();
      start();
    }, Math.floor(Math.random() * intervalMs));
    this.heartbeatStart.unref();
  }

  /** A heartbeat: the status is written, with whatever the channel carried since the last write. */
  private beat(): void {
    this.writeDue = true;
    this.report();
  }

  private watchTable(connection: string): void {
    if (this.tableInformer || this.stopped) return;
    this.tableInformer = new Informer<PoolGrant & KubeObject>(this.options.http, {
      path: `/apis/${API_GROUP}/${API_VERSION}/namespaces/${this.options.namespace}/poolgrants`,
      fieldSelector: `metadata.name=${connection}`,
      stallTimeoutMs: this.options.stallTimeoutMs,
      logger: this.options.logger.child({ informer: 'poolgrant' }),
      reachability: this.reachability,
    });
    // A table change that leaves this pod's grant alone hands nothing to the pool and writes nothing.
    this.tableInformer.onChange((type, grant) => {
      // The table says how often to beat (longer for bigger fleets); an explicit heartbeatMs (tests) wins.
      if (type !== 'DELETED' && grant.spec.heartbeatSeconds !== undefined && this.options.heartbeatMs === undefined) this.scheduleHeartbeat(grant.spec.heartbeatSeconds * 1000, true);
      this.statusDelayMs = type === 'DELETED' ? 0 : (this.options.statusDelayMs ?? (grant.spec.statusDelaySeconds ?? 0) * 1000);
      const acknowledgeTo = type === 'DELETED' ? undefined : grant.spec.acknowledgeTo;
      if (acknowledgeTo !== this.acknowledgeTo) {
        // A new leader has not heard what the old one did: tell it again, unless the status already says it.
        this.acknowledgeTo = acknowledgeTo;
        this.sentOverChannel = undefined;
        this.channelRetryAt = 0;
      }
      this.evaluate();
      this.report();
    });
    this.tableInformer.start().then(() => {
      // Saying so before the watch works (no RBAC on poolgrants, say) would get this pod
      // switched onto a table it cannot read.
      this.tableReady = true;
      this.report();
    }, (err: unknown) => {
      this.options.logger.warn({ err }, 'could not watch the grant table');
      this.tableFailed = true;
      this.report();
    });
  }

  /** The grant in force: the table's once the PoolMember says the table covers this pod, else the PoolMember's. */
  private grantInForce(member: PoolMember): { source: string; connections: number; generation: number; drain: boolean; table: boolean } {
    const from = member.spec.tableFrom;
    const grant = from === undefined ? undefined : this.tableInformer?.get(this.options.namespace, member.spec.connection);
    if (from !== undefined && grant && grant.spec.generation >= from) {
      const derived = deriveGrant(grantTableOf(grant.spec), this.options.podName);
      this.lastTableConnections = derived.connections;
      return { source: 't', ...derived, table: true };
    }
    // Taken off tables (a new pod under this name): the PoolMember's grant is the whole story again.
    if (from === undefined) this.lastTableConnections = undefined;
    const own = member.spec.grant.connections;
    const connections = this.lastTableConnections === undefined ? own : Math.min(own, this.lastTableConnections);
    return { source: `m${member.spec.grant.generation}`, connections, generation: member.spec.grant.generation, drain: member.spec.drain === true, table: false };
  }

  private evaluate(): void {
    const member = this.member;
    if (!member || this.stopped) return;
    const grant = this.grantInForce(member);
    const applied = this.applied;
    // Any other source or generation is applied, lower ones too: a recreated PoolMember restarts its generations.
    if (applied && applied.source === grant.source && applied.connections === grant.connections && applied.drain === grant.drain) return;
    this.applied = { source: grant.source, connections: grant.connections, drain: grant.drain };
    this.appliedGeneration = grant.generation;
    this.appliedTableGeneration = grant.table ? grant.generation : undefined;
    const { connections, generation } = grant;
    clearTimeout(this.deferred);
    this.deferred = undefined;
    const shrinking = connections < this.options.target.status().acknowledgedConnections;
    const grace = this.options.drainGraceMs ?? 0;
    if (grant.drain && shrinking && grace > 0) {
      this.options.logger.info({ connections, generation, table: grant.table, graceMs: grace }, 'drain requested; keeping the current grant for the grace period');
      this.deferred = setTimeout(() => {
        this.deferred = undefined;
        this.options.target.setGrant(connections, generation);
      }, grace);
      this.deferred.unref();
    } else {
      this.options.logger.info({ connections, generation, table: grant.table }, 'grant received');
      this.options.target.setGrant(connections, generation);
    }
  }

  /** The status this sidecar reports now (without the heartbeat). */
  private currentStatus(): PoolMemberStatus {
    const s = this.options.target.status();
    // The table generation is reported once the pool holds that table's grant; it tells the
    // controller this sidecar reads tables (0 before any), so it may switch the PoolMember onto one.
    if (this.appliedTableGeneration !== undefined && s.acknowledgedGeneration === this.appliedTableGeneration && s.acknowledgedConnections === this.applied?.connections) {
      this.acknowledgedTableGeneration = Math.max(this.acknowledgedTableGeneration, this.appliedTableGeneration);
    }
    const status: PoolMemberStatus = {
      acknowledgedGeneration: s.acknowledgedGeneration,
      acknowledgedConnections: s.acknowledgedConnections,
      heldConnections: s.heldConnections,
      credentialsGeneration: s.credentialsGeneration,
      draining: s.draining,
      drained: s.drained,
      sidecarVersion: this.options.version,
      ...(this.tableReady ? { tableGeneration: this.acknowledgedTableGeneration } : {}),
      // Changes only when reachability does (Pool.setReachability): a status write then, none with each login.
      ...(s.databaseReachable ? { conditions: [reachabilityCondition(s.databaseReachable)] } : {}),
    };
    if (s.acknowledgedGeneration < 0) delete status.acknowledgedGeneration;
    return status;
  }

  private statusCurrent(stored: PoolMemberStatus | undefined): boolean {
    if (!stored) return false;
    const now = this.currentStatus();
    return (Object.keys(now) as Array<keyof PoolMemberStatus>).every((k) => fieldEqual(stored, now, k)) && (now.acknowledgedGeneration !== undefined || stored.acknowledgedGeneration === undefined)
      && (now.conditions !== undefined || stored.conditions === undefined);
  }

  /** Writes the current status soon; concurrent calls coalesce into one more write. */
  private report(): void {
    if (this.stopped || !this.memberExists) return;
    if (this.writing) {
      this.dirty = true;
      return;
    }
    this.writing = this.deliver().finally(() => {
      this.writing = undefined;
      if (this.dirty) {
        this.dirty = false;
        this.report();
      }
    });
  }

  /**
   * Tells the controller what changed: over the channel when only the
   * acknowledgement changed and the table names a leader (the status follows
   * with the next heartbeat), else, or when the channel fails, by writing the
   * PoolMember status.
   */
  private async deliver(): Promise<void> {
    const write = this.writeDue;
    // A PoolMember created on its table is first answered once the table is read: that first
    // answer can then go over the channel, and a status without a table generation is not written.
    if (!write && this.firstOnTable() && !this.tableReady && !this.tableFailed) return;
    this.writeDue = false;
    const status = this.currentStatus();
    const channel = write ? undefined : this.channelAcknowledgement(status);
    if (channel) {
      const fields = JSON.stringify(channel.ack);
      // Already confirmed, or already in the status: nothing to say until the follow-up write or the next heartbeat.
      if (fields === this.sentOverChannel || sameAcknowledgement(status, this.lastWritten)) return;
      if (steadyNow() >= this.channelRetryAt) {
        if (await this.sender.send(channel.to, channel.ack, channel.key)) {
          this.sentOverChannel = fields;
          this.scheduleFollowUp();
          return;
        }
        // Refused or unreachable (a network policy, a standby): the status path, without waiting on the channel again for a while.
        this.channelRetryAt = steadyNow() + CHANNEL_RETRY_MS;
      }
    }
    await this.writeStatus();
  }

  /**
   * Writes the status at a random point of the table's statusDelaySeconds
   * after an acknowledgement went over the channel: `kubectl get pm` catches
   * up soon in a small fleet, and a large fleet's writes stay spread.
   */
  private scheduleFollowUp(): void {
    if (this.followUp !== undefined || this.statusDelayMs <= 0 || this.stopped) return;
    this.followUp = setTimeout(() => {
      this.followUp = undefined;
      this.beat();
    }, Math.floor(Math.random() * this.statusDelayMs));
    this.followUp.unref();
  }

  /** No status written yet for a PoolMember the controller created on its table. */
  private firstOnTable(): boolean {
    return this.lastWritten === undefined && this.member?.spec.tableFrom !== undefined;
  }

  /** The acknowledgement the channel may carry instead of a status write, if it may. */
  private channelAcknowledgement(status: PoolMemberStatus): { to: string; key: string; ack: ChannelAcknowledgement } | undefined {
    const member = this.member;
    const key = member?.spec.acknowledgementKey;
    const podUid = member && memberPodUid(member);
    const written = this.lastWritten;
    // Only a grant from a table is acknowledged there, and only when nothing but the acknowledgement changed,
    // or, for a PoolMember created on its table, as its first answer (the status follows, as after any
    // acknowledgement sent over the channel): at thousands of new pods that is a status write each saved.
    if (!this.acknowledgeTo || !key || !podUid || this.appliedTableGeneration === undefined || status.tableGeneration === undefined) return undefined;
    if (written ? !statusFieldsEqual({ ...status, ...ACK_BLANK }, { ...written, ...ACK_BLANK }) : !this.firstOnTable() || status.draining || status.drained) return undefined;
    return {
      to: this.acknowledgeTo,
      key,
      ack: {
        namespace: this.options.namespace, pod: this.options.podName, podUid,
        tableGeneration: status.tableGeneration, generation: status.acknowledgedGeneration ?? 0,
        connections: status.acknowledgedConnections ?? 0, held: status.heldConnections ?? 0,
      },
    };
  }

  /**
   * Writes the status now: 'written', 'gone' (no PoolMember), 'transient'
   * (worth trying again soon, `err` says when; with `retryLater`, a write is
   * scheduled for then) or 'failed'.
   */
  private async writeStatus(retryLater = true): Promise<{ outcome: 'written' | 'gone' | 'failed' } | { outcome: 'transient'; err: unknown }> {
    const waiting = this.options.waitingClients?.();
    const status: PoolMemberStatus = { ...this.currentStatus(), ...(waiting === undefined ? {} : { waitingClients: waiting }), heartbeatTime: (this.options.now?.() ?? new Date()).toISOString().replace(/\.\d+Z$/, 'Z') };
    try {
      // A merge patch keeps what it does not name: an earlier container's report (this pod restarted) goes with null.
      const body = status.conditions === undefined ? { status: { ...status, conditions: null } } : { status };
      await this.options.http.patch(`/apis/${API_GROUP}/${API_VERSION}/namespaces/${this.options.namespace}/poolmembers/${this.options.podName}/status`, body);
      this.lastWritten = status;
      this.reachability.succeeded();
      this.writeBackoff.reset();
      clearTimeout(this.writeRetry);
      this.writeRetry = undefined;
      return { outcome: 'written' };
    } catch (err) {
      this.reachability.failed(err);
      if (isStatus(err, 404)) {
        this.memberExists = false;
        return { outcome: 'gone' };
      }
      this.options.logger.warn({ err }, 'could not write PoolMember status');
      if (!isTransientApiError(err)) return { outcome: 'failed' };
      if (retryLater) this.retryWrite(err);
      return { outcome: 'transient', err };
    }
  }

  /** How long to wait before writing again after `err`: the server's Retry-After (spread over a second), else the backoff's next step. */
  private retryDelayMs(err: unknown): number {
    const retryAfter = err instanceof KubeApiError ? err.retryAfterSeconds : undefined;
    return retryAfter !== undefined ? retryAfter * 1000 + Math.floor(Math.random() * 1000) : this.writeBackoff.next();
  }

  /** Writes the status again soon: after the server's Retry-After (spread over a second), else the backoff's next step. */
  private retryWrite(err: unknown): void {
    if (this.writeRetry !== undefined || this.stopped) return;
    const delay = this.retryDelayMs(err);
    this.writeRetry = setTimeout(() => {
      this.writeRetry = undefined;
      this.beat();
    }, delay);
    this.writeRetry.unref();
  }

  /**
   * Writes a final status (e.g. drained) and waits for it, trying again for
   * up to `withinMs` while the API server turns it away (429, 5xx, no
   * answer): a drain the controller never reads is held against the limit
   * for the connection's departure hold. True once written.
   */
  async flush(withinMs = FLUSH_WITHIN_MS): Promise<boolean> {
    await this.writing;
    const deadline = steadyNow() + withinMs;
    for (;;) {
      if (!this.memberExists) return false;
      const result = await this.writeStatus(false);
      if (result.outcome !== 'transient') return result.outcome === 'written';
      const delay = Math.min(this.retryDelayMs(result.err), 2000);
      if (steadyNow() + delay > deadline) return false;
      await new Promise((r) => setTimeout(r, delay));
    }
  }

  /** Stops watching and reporting. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.heartbeat);
    clearTimeout(this.heartbeatStart);
    clearTimeout(this.deferred);
    clearTimeout(this.followUp);
    clearTimeout(this.writeRetry);
    this.unsubscribe?.();
    await this.writing;
    this.sender.close();
    await Promise.all([this.informer.stop(), this.tableInformer?.stop()]);
  }
}
