/**
 * The sidecar's side of the PoolMember protocol (docs/protocol.md): watches
 * its own PoolMember by name, hands each new grant to the pool, and writes
 * the pool's acknowledgement and a heartbeat into the PoolMember's status.
 * Needs only get/list/watch on poolmembers and patch on poolmembers/status.
 */
import type { Logger } from 'pino';
import { API_GROUP, API_VERSION, type PoolMember, type PoolMemberStatus } from '../api/index.ts';
import { isStatus, type KubeHttp } from '../kube/http.ts';
import { Informer, type KubeObject } from '../kube/informer.ts';
import type { SidecarStatus } from './settings.ts';

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
  heartbeatMs?: number;
  stallTimeoutMs?: number;
  /** Called with every spec the agent sees (pool settings, database, drain). */
  onSpec?: (spec: PoolMember['spec']) => void;
  /**
   * How long a shrink that comes with `drain: true` waits before it is applied.
   * A terminating pod's app keeps finishing its requests after deletion starts;
   * cutting its connections at once would fail them, and its reservation stays
   * counted until it acknowledges or reports drained, so waiting is safe.
   */
  drainGraceMs?: number;
}

/** Runs the sidecar's half of the protocol. */
export class PoolMemberAgent {
  private readonly options: PoolMemberAgentOptions;
  private readonly informer: Informer<PoolMember & KubeObject>;
  private appliedGeneration = -1;
  private writing: Promise<void> | undefined;
  private dirty = false;
  private heartbeat: NodeJS.Timeout | undefined;
  private unsubscribe: (() => void) | undefined;
  private stopped = false;
  private memberExists = false;
  private deferred: NodeJS.Timeout | undefined;

  constructor(options: PoolMemberAgentOptions) {
    this.options = options;
    this.informer = new Informer<PoolMember & KubeObject>(options.http, {
      path: `/apis/${API_GROUP}/${API_VERSION}/namespaces/${options.namespace}/poolmembers`,
      fieldSelector: `metadata.name=${options.podName}`,
      stallTimeoutMs: options.stallTimeoutMs,
      logger: options.logger.child({ informer: 'poolmember' }),
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
        return;
      }
      this.memberExists = true;
      this.apply(member);
    });
    this.unsubscribe = this.options.target.onStatus(() => this.report());
    await this.informer.start();
    const heartbeatMs = this.options.heartbeatMs ?? 10_000;
    this.heartbeat = setInterval(() => this.report(), heartbeatMs);
    this.heartbeat.unref();
  }

  private apply(member: PoolMember): void {
    this.options.onSpec?.(member.spec);
    const { connections, generation } = member.spec.grant;
    // A recreated PoolMember (new pod, same name) restarts generations; follow it.
    const acknowledged = member.status?.acknowledgedGeneration;
    if (generation !== this.appliedGeneration || acknowledged === undefined) {
      this.appliedGeneration = generation;
      clearTimeout(this.deferred);
      this.deferred = undefined;
      const shrinking = connections < this.options.target.status().acknowledgedConnections;
      const grace = this.options.drainGraceMs ?? 0;
      if (member.spec.drain === true && shrinking && grace > 0) {
        this.options.logger.info({ connections, generation, graceMs: grace }, 'drain requested; keeping the current grant for the grace period');
        this.deferred = setTimeout(() => {
          this.deferred = undefined;
          this.options.target.setGrant(connections, generation);
        }, grace);
        this.deferred.unref();
      } else {
        this.options.logger.info({ connections, generation }, 'grant received');
        this.options.target.setGrant(connections, generation);
      }
    }
    this.report();
  }

  /** Writes the current status soon; concurrent calls coalesce into one more write. */
  private report(): void {
    if (this.stopped || !this.memberExists) return;
    if (this.writing) {
      this.dirty = true;
      return;
    }
    this.writing = this.writeStatus().finally(() => {
      this.writing = undefined;
      if (this.dirty) {
        this.dirty = false;
        this.report();
      }
    });
  }

  private async writeStatus(): Promise<void> {
    const s = this.options.target.status();
    const status: PoolMemberStatus = {
      acknowledgedGeneration: s.acknowledgedGeneration,
      acknowledgedConnections: s.acknowledgedConnections,
      heldConnections: s.heldConnections,
      credentialsGeneration: s.credentialsGeneration,
      draining: s.draining,
      drained: s.drained,
      heartbeatTime: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
      sidecarVersion: this.options.version,
    };
    if (s.acknowledgedGeneration < 0) delete status.acknowledgedGeneration;
    try {
      await this.options.http.patch(`/apis/${API_GROUP}/${API_VERSION}/namespaces/${this.options.namespace}/poolmembers/${this.options.podName}/status`, { status });
    } catch (err) {
      if (isStatus(err, 404)) this.memberExists = false;
      else this.options.logger.warn({ err }, 'could not write PoolMember status');
    }
  }

  /** Writes a final status (e.g. drained) and waits for it. */
  async flush(): Promise<void> {
    await this.writing;
    if (this.memberExists) await this.writeStatus();
  }

  /** Stops watching and reporting. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.heartbeat);
    clearTimeout(this.deferred);
    this.unsubscribe?.();
    await this.writing;
    await this.informer.stop();
  }
}
