/**
 * Fixtures for controller tests on the real API server: the CRDs applied,
 * a namespace with a credentials Secret and a Deployment whose pods opt in,
 * the controller running in-process, and a fleet of sidecar test doubles that
 * speak the real PoolMember protocol through PoolMemberAgent.
 */
import { randomBytes } from 'node:crypto';
import { CoreV1Api } from '@kubernetes/client-node';
import pino, { type Logger } from 'pino';
import { Registry } from 'prom-client';
import type { PoolGrant, PoolMember } from '../../src/api/index.ts';
import { memberGrantInForce } from '../../src/core/budget/index.ts';
import { BudgetController } from '../../src/controller/controller.ts';
import { LimitDiscovery } from '../../src/controller/limit-discovery.ts';
import { ControllerMetrics } from '../../src/controller/metrics.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
export { createWorkload, eventually, installCrds } from '../../src/devenv/scenario.ts';
import { EventRecorder } from '../../src/kube/events.ts';
import { KubeHttp } from '../../src/kube/http.ts';
import { Informer, type KubeObject } from '../../src/kube/informer.ts';
import { PoolMemberAgent, type GrantTarget } from '../../src/sidecar/control-plane.ts';
import type { SidecarStatus } from '../../src/sidecar/settings.ts';
import { DEFAULT_POD_REPAIR_OPTIONS, MissingSidecarRepairer } from '../../src/webhook/repair.ts';

/** A fresh namespace name. */
export function freshNamespace(prefix: string): string {
  return `${prefix}-${randomBytes(3).toString('hex')}`;
}

/** Runs the controller in-process. */
export async function startController(kube: KubeControlPlane, logger: Logger = pino({ level: 'silent' }), options: { repair?: 'report' | 'evict'; manageSidecarAccess?: boolean; heartbeatTimeoutMs?: number } = {}): Promise<{ controller: BudgetController; registry: Registry }> {
  const http = new KubeHttp(kube.kubeConfig());
  const registry = new Registry();
  const events = new EventRecorder(http, 'poolkeeper-controller', logger);
  const repairer = options.repair ? new MissingSidecarRepairer(kube.kubeConfig().makeApiClient(CoreV1Api), events, logger, { ...DEFAULT_POD_REPAIR_OPTIONS, mode: options.repair, gracePeriodSeconds: 0 }) : undefined;
  const controller = new BudgetController({
    http,
    logger,
    metrics: new ControllerMetrics(registry),
    stallTimeoutMs: 60_000,
    reconciler: { discovery: new LimitDiscovery({ logger }), events, pendingRequeueMs: 500, repairer, repairGraceSeconds: 0, manageSidecarAccess: options.manageSidecarAccess ?? false, ...(options.heartbeatTimeoutMs ? { heartbeatTimeoutMs: options.heartbeatTimeoutMs } : {}) },
  });
  await controller.start();
  return { controller, registry };
}

/** A sidecar's control side that holds exactly what it is granted, at once. */
export class ObedientSidecarDouble implements GrantTarget {
  private current: SidecarStatus = { acknowledgedGeneration: -1, acknowledgedConnections: 0, heldConnections: 0, credentialsGeneration: '', draining: false, drained: false };
  private readonly listeners = new Set<(s: SidecarStatus) => void>();
  private silent = false;
  private lastGrant: [number, number] | undefined;

  /** From now on, grants are received but never acknowledged (a hung sidecar). */
  hang(): void {
    this.silent = true;
  }

  /** Answers again, starting with the last grant received. */
  resume(): void {
    this.silent = false;
    if (this.lastGrant) this.setGrant(...this.lastGrant);
  }

  setGrant(connections: number, generation: number): void {
    this.lastGrant = [connections, generation];
    if (this.silent) return;
    this.current = { ...this.current, acknowledgedGeneration: generation, acknowledgedConnections: connections, heldConnections: connections };
    for (const l of this.listeners) l(this.current);
  }

  onStatus(listener: (s: SidecarStatus) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  status(): SidecarStatus {
    return this.current;
  }
}

/**
 * One PoolMemberAgent + double per PoolMember that appears in `namespace`,
 * as the pods' sidecars would run them.
 */
export class SidecarFleetDouble {
  readonly agents = new Map<string, { agent: PoolMemberAgent; double: ObedientSidecarDouble }>();
  private readonly informer: Informer<PoolMember & KubeObject>;
  private readonly tables: Informer<PoolGrant & KubeObject>;
  private readonly pods: Informer<KubeObject>;
  private readonly http: KubeHttp;
  private readonly namespace: string;
  private readonly logger = pino({ level: 'silent' });

  private readonly heartbeatMs: number;

  constructor(kube: KubeControlPlane, namespace: string, heartbeatMs = 5_000) {
    this.heartbeatMs = heartbeatMs;
    this.http = new KubeHttp(kube.kubeConfig());
    this.namespace = namespace;
    this.informer = new Informer<PoolMember & KubeObject>(this.http, { path: `/apis/poolkeeper.dev/v1alpha1/namespaces/${namespace}/poolmembers`, logger: this.logger });
    this.tables = new Informer<PoolGrant & KubeObject>(this.http, { path: `/apis/poolkeeper.dev/v1alpha1/namespaces/${namespace}/poolgrants`, logger: this.logger });
    this.pods = new Informer<KubeObject>(this.http, { path: `/api/v1/namespaces/${namespace}/pods`, logger: this.logger });
  }

  /** Starts answering for every PoolMember of the namespace. */
  async start(): Promise<void> {
    this.informer.onChange((type, member) => {
      const name = member.metadata.name ?? '';
      if (type === 'DELETED' || this.agents.has(name)) return;
      const double = new ObedientSidecarDouble();
      const agent = new PoolMemberAgent({ http: this.http, namespace: this.namespace, podName: name, target: double, logger: this.logger, version: 'test-double', heartbeatMs: this.heartbeatMs });
      this.agents.set(name, { agent, double });
      void agent.start();
    });
    await Promise.all([this.informer.start(), this.tables.start(), this.pods.start()]);
  }

  /** Calls `listener` after every PoolMember or pod change this fleet sees. */
  onChange(listener: () => void): void {
    this.informer.onChange(() => listener());
    this.tables.onChange(() => listener());
    this.pods.onChange(() => listener());
  }

  /**
   * PoolMembers of pods that still exist. A deleted pod's containers are
   * gone, so its PoolMember (until garbage collection removes it) holds nothing.
   * A PoolMember on a grant table shows the grant in force (derived from the
   * table) as spec.grant, with the acknowledged generation once its sidecar
   * has acknowledged that number, so tests read every pod the same way.
   */
  members(): PoolMember[] {
    const live = new Set(this.pods.list().map((p) => p.metadata?.uid));
    return this.informer.list().filter((m) => live.has(m.metadata.ownerReferences?.[0]?.uid)).map((m) => this.inForce(m));
  }

  private inForce(m: PoolMember): PoolMember {
    const grant = this.tables.get(this.namespace, m.spec.connection);
    const table = grant ? { generation: grant.spec.generation, perPod: grant.spec.perPod, exceptions: (grant.spec.exceptions ?? []).map((e) => ({ ...e, pods: e.pods ?? [] })) } : undefined;
    const force = memberGrantInForce({ name: m.metadata.name ?? '', grant: m.spec.grant, tableFrom: m.spec.tableFrom }, table);
    if (!force.fromTable) return m;
    const s = m.status;
    const acknowledged = s?.tableGeneration !== undefined && s.tableGeneration >= (m.spec.tableFrom ?? Infinity) && s.acknowledgedConnections === force.connections;
    return { ...m, spec: { ...m.spec, grant: { connections: force.connections, generation: acknowledged ? (s.acknowledgedGeneration ?? force.generation) : force.generation } } };
  }

  /**
   * Each PoolMember as stored (spec.grant, tableFrom, status) and the grant
   * table as this fleet's watch has it: what a failed safety check saw.
   */
  describe(): string {
    const members = this.informer.list().map((m) => ({ name: m.metadata.name, grant: m.spec.grant, tableFrom: m.spec.tableFrom, status: m.status && { ack: m.status.acknowledgedConnections, ackGen: m.status.acknowledgedGeneration, held: m.status.heldConnections, table: m.status.tableGeneration } }));
    const tables = this.tables.list().map((t) => ({ name: t.metadata.name, resourceVersion: t.metadata.resourceVersion, spec: t.spec }));
    return JSON.stringify({ members, tables, pods: this.pods.list().map((p) => p.metadata?.name) });
  }

  /** Stops every agent. */
  async stop(): Promise<void> {
    await Promise.all([this.informer.stop(), this.tables.stop(), this.pods.stop()]);
    await Promise.all([...this.agents.values()].map(({ agent }) => agent.stop()));
  }
}

/** Sum over PoolMembers of max(granted, acknowledged): what the server may see. */
export function reserved(members: readonly PoolMember[]): number {
  return members.reduce((sum, m) => sum + Math.max(m.spec.grant.connections, m.status?.acknowledgedConnections ?? 0, m.status?.heldConnections ?? 0), 0);
}

/**
 * Samples `read()` on every change the fleets observe (each PoolMember or pod
 * event) and every `intervalMs`, until stopped, recording the maximum: the
 * safety invariant is checked at every observed state, not just at the end.
 */
export class Sampler {
  max = 0;
  samples = 0;
  /** What `describe` said at the sample that set `max`: for a failure message. */
  maxState = '';
  private timer: NodeJS.Timeout;
  private stopped = false;

  constructor(read: () => number, fleets: readonly SidecarFleetDouble[] = [], intervalMs = 50, describe?: () => string) {
    const sample = (): void => {
      if (this.stopped) return;
      this.samples += 1;
      const value = read();
      if (value > this.max && describe) this.maxState = describe();
      this.max = Math.max(this.max, value);
    };
    for (const fleet of fleets) fleet.onChange(sample);
    this.timer = setInterval(sample, intervalMs);
  }

  /** Stops sampling. */
  stop(): void {
    this.stopped = true;
    clearInterval(this.timer);
  }
}
