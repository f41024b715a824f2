/**
 * Fixtures for controller tests on the real API server: the CRDs applied,
 * a namespace with a credentials Secret and a Deployment whose pods opt in,
 * the controller running in-process, and a fleet of sidecar test doubles that
 * speak the real PoolMember protocol through PoolMemberAgent.
 */
import { randomBytes } from 'node:crypto';
import pino, { type Logger } from 'pino';
import { Registry } from 'prom-client';
import type { PoolGrant, PoolMember } from '../../src/api/index.ts';
import { grantTableOf, memberGrantInForce, tableAccount } from '../../src/core/budget/index.ts';
import { receiverFor, type AcknowledgementReceiver } from '../../src/controller/acknowledgements.ts';
import { BudgetController } from '../../src/controller/controller.ts';
import { LimitDiscovery } from '../../src/controller/limit-discovery.ts';
import type { VerifierOptions } from '../../src/controller/verifier.ts';
import { ControllerMetrics } from '../../src/controller/metrics.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
export { createWorkload, eventually, installCrds } from '../../src/devenv/scenario.ts';
import { EventRecorder } from '../../src/kube/events.ts';
import { ApiServerClock } from '../../src/kube/server-clock.ts';
import { KubeHttp } from '../../src/kube/http.ts';
import { Informer, type KubeObject } from '../../src/kube/informer.ts';
import { PoolMemberAgent, type GrantTarget } from '../../src/sidecar/control-plane.ts';
import type { SidecarStatus } from '../../src/sidecar/settings.ts';
import { DEFAULT_POD_REPAIR_OPTIONS, MissingSidecarRepairer } from '../../src/webhook/repair.ts';

/** A fresh namespace name. */
export function freshNamespace(prefix: string): string {
  return `${prefix}-${randomBytes(3).toString('hex')}`;
}

/**
 * Runs the controller in-process, with the acknowledgement channel on
 * 127.0.0.1 as in a cluster (the sidecars of its tables acknowledge to it
 * directly) unless `channel` is false.
 */
export async function startController(kube: KubeControlPlane, logger: Logger = pino({ level: 'silent' }), options: { repair?: 'report' | 'evict'; manageSidecarAccess?: boolean; heartbeatTimeoutMs?: number; channel?: boolean; verifier?: VerifierOptions; localClock?: () => number } = {}): Promise<{ controller: BudgetController; registry: Registry; receiver?: AcknowledgementReceiver | undefined }> {
  // As the binary wires it: holds timed on the API server's clock, learnt from its answers.
  const serverClock = new ApiServerClock(options.localClock);
  const http = new KubeHttp(kube.kubeConfig(), { clock: serverClock });
  const registry = new Registry();
  const events = new EventRecorder(http, 'poolkeeper-controller', logger);
  const repairer = options.repair ? new MissingSidecarRepairer(http, events, logger, { ...DEFAULT_POD_REPAIR_OPTIONS, mode: options.repair, gracePeriodSeconds: 0 }) : undefined;
  const late: { controller?: BudgetController } = {};
  const receiver = options.channel === false ? undefined : receiverFor(() => late.controller, logger, registry);
  const port = await receiver?.listen('127.0.0.1', 0);
  const controller = new BudgetController({
    http,
    logger,
    metrics: new ControllerMetrics(registry, { apiServerClockOffsetSeconds: () => serverClock.offset().offsetMs / 1000 }),
    stallTimeoutMs: 60_000,
    ...(port === undefined ? {} : { acknowledgeTo: `http://127.0.0.1:${port}` }),
    reconciler: { discovery: new LimitDiscovery({ logger }), events, pendingRequeueMs: 500, repairer, repairGraceSeconds: 0, manageSidecarAccess: options.manageSidecarAccess ?? false, now: () => new Date(serverClock.now()), ...(options.heartbeatTimeoutMs ? { heartbeatTimeoutMs: options.heartbeatTimeoutMs } : {}), ...(options.verifier ? { verifier: options.verifier } : {}) },
  });
  late.controller = controller;
  if (receiver) {
    // Stopping the controller closes its channel too.
    const stop = controller.stop.bind(controller);
    controller.stop = async () => {
      await stop();
      await receiver.close();
    };
  }
  await controller.start();
  return { controller, registry, receiver };
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

  /** Reports whether the database can be reached, as the pool does when that changes. */
  setReachability(reachability: NonNullable<SidecarStatus['databaseReachable']>): void {
    this.current = { ...this.current, databaseReachable: reachability };
    for (const l of this.listeners) l(this.current);
  }

  /** Reports a finished drain, as the pool does once its last server connection closed. */
  setDrained(): void {
    this.current = { ...this.current, draining: true, drained: true, heldConnections: 0 };
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
  /** The namespace this fleet answers in. */
  readonly namespace: string;
  private readonly logger = pino({ level: 'silent' });
  private readonly log: WatchedChange[] = [];

  private readonly heartbeatMs: number;
  private readonly statusDelayMs: number | undefined;
  private readonly clockOffsetMs: number;

  /**
   * `statusDelayMs`: how long statuses may lag acknowledgements over the channel (default: as the table says);
   * `clockOffsetMs`: how far the fleet's node clock is off (its heartbeat timestamps).
   */
  constructor(kube: KubeControlPlane, namespace: string, heartbeatMs = 5_000, statusDelayMs?: number, clockOffsetMs = 0) {
    this.clockOffsetMs = clockOffsetMs;
    this.heartbeatMs = heartbeatMs;
    this.statusDelayMs = statusDelayMs;
    this.http = new KubeHttp(kube.kubeConfig());
    this.namespace = namespace;
    this.informer = new Informer<PoolMember & KubeObject>(this.http, { path: `/apis/poolkeeper.dev/v1alpha1/namespaces/${namespace}/poolmembers`, logger: this.logger });
    this.tables = new Informer<PoolGrant & KubeObject>(this.http, { path: `/apis/poolkeeper.dev/v1alpha1/namespaces/${namespace}/poolgrants`, logger: this.logger });
    this.pods = new Informer<KubeObject>(this.http, { path: `/api/v1/namespaces/${namespace}/pods`, logger: this.logger });
  }

  /** Starts answering for every PoolMember of the namespace. */
  async start(): Promise<void> {
    const record = (kind: WatchedChange['kind']) => (type: WatchedChange['type'], object: KubeObject): void => {
      this.log.push({ kind, type, object: structuredClone(object), resourceVersion: BigInt(object.metadata?.resourceVersion ?? '0'), sequence: nextSequence++ });
    };
    this.informer.onChange(record('member'));
    this.tables.onChange(record('table'));
    this.pods.onChange(record('pod'));
    this.informer.onChange((type, member) => {
      const name = member.metadata.name ?? '';
      if (type === 'DELETED' || this.agents.has(name)) return;
      const double = new ObedientSidecarDouble();
      const agent = new PoolMemberAgent({ http: this.http, namespace: this.namespace, podName: name, target: double, logger: this.logger, version: 'test-double', heartbeatMs: this.heartbeatMs, now: () => new Date(Date.now() + this.clockOffsetMs), ...(this.statusDelayMs === undefined ? {} : { statusDelayMs: this.statusDelayMs }) });
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
    return membersInForce(this.informer.list(), this.tables.list(), this.pods.list());
  }

  /** Every change this fleet's watches delivered, in the order received. */
  history(): readonly WatchedChange[] {
    return this.log;
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

/** One change a fleet's watches delivered, with the object as it was then. */
export interface WatchedChange {
  kind: 'member' | 'table' | 'pod';
  type: 'ADDED' | 'MODIFIED' | 'DELETED';
  object: KubeObject;
  /** The object's resourceVersion: one etcd revision orders every resource. */
  resourceVersion: bigint;
  /** Order of arrival across all fleets. */
  sequence: number;
}

let nextSequence = 0;

/**
 * The PoolMembers of live pods with the grant in force: derived from the
 * connection's table for a member on it, else its spec.grant. A member on a
 * table that records changes in flight is counted as the protocol counts it
 * (tableAccount): the table, not a PoolMember status the sidecar writes only
 * at its next heartbeat, says which acknowledgements the controller has seen;
 * the status fields it supersedes are clamped to that count, so that
 * `reserved` sums exactly what may be held.
 */
function membersInForce(members: readonly PoolMember[], tables: readonly PoolGrant[], pods: readonly KubeObject[]): PoolMember[] {
  const live = new Set(pods.map((p) => p.metadata?.uid));
  const tableOf = new Map(tables.map((t) => [t.metadata.name, t]));
  return members.filter((m) => live.has(m.metadata.ownerReferences?.[0]?.uid)).map((m) => {
    const grant = tableOf.get(m.spec.connection);
    const table = grant ? grantTableOf(grant.spec) : undefined;
    const force = memberGrantInForce({ name: m.metadata.name ?? '', grant: m.spec.grant, tableFrom: m.spec.tableFrom }, table);
    if (!force.fromTable || !table || !force.entry) return m;
    const s = m.status;
    const ack = s?.acknowledgedGeneration === undefined ? undefined : { tableGeneration: s.tableGeneration, connections: s.acknowledgedConnections ?? 0, held: s.heldConnections ?? 0 };
    const account = tableAccount(force.entry, table, m.spec.tableFrom ?? 0, ack);
    const generation = account.acknowledged ? (s?.acknowledgedGeneration ?? force.generation) : force.generation;
    if (table.recordsChanges !== true) return { ...m, spec: { ...m.spec, grant: { connections: force.connections, generation } } };
    const status = s ? { ...s, acknowledgedConnections: Math.min(s.acknowledgedConnections ?? 0, account.reservation), heldConnections: Math.min(s.heldConnections ?? 0, account.reservation) } : s;
    return { ...m, spec: { ...m.spec, grant: { connections: account.reservation, generation } }, ...(status ? { status } : {}) };
  });
}

/**
 * Checks an invariant at every state the API server passed through, not at
 * the states two or three separate watches happen to show together: two
 * watches deliver independently, so a table watch may already show a grow
 * that the member watch has not yet preceded with the shrink's
 * acknowledgement, a state that never existed. On stop, the fleets' changes
 * are replayed in resourceVersion order (one etcd revision counter orders
 * every resource) and `read` is evaluated after each revision since the
 * sampler was created.
 */
export class Sampler {
  max = 0;
  samples = 0;
  /** The members and tables at the revision that set `max`: for a failure message. */
  maxState = '';
  private readonly fleets: readonly SidecarFleetDouble[];
  private readonly read: (membersPerFleet: PoolMember[][]) => number;
  private readonly since = nextSequence;

  constructor(fleets: readonly SidecarFleetDouble[], read: (membersPerFleet: PoolMember[][]) => number) {
    this.fleets = fleets;
    this.read = read;
  }

  /** Replays what the fleets saw and records the maximum of `read`. */
  stop(): void {
    const changes = this.fleets.flatMap((fleet, index) => fleet.history().map((change) => ({ change, index })));
    changes.sort((a, b) => (a.change.resourceVersion < b.change.resourceVersion ? -1 : a.change.resourceVersion > b.change.resourceVersion ? 1 : a.change.sequence - b.change.sequence));
    // Revisions from the first change that arrived after the sampler started.
    const fresh = changes.filter(({ change }) => change.sequence >= this.since).map(({ change }) => change.resourceVersion);
    const from = fresh.reduce((min, rv) => (rv < min ? rv : min), fresh[0] ?? 0n);
    const states = this.fleets.map(() => ({ member: new Map<string, KubeObject>(), table: new Map<string, KubeObject>(), pod: new Map<string, KubeObject>() }));
    for (let i = 0; i < changes.length; i += 1) {
      const { change, index } = changes[i]!;
      const map = states[index]![change.kind];
      const key = change.object.metadata?.uid ?? change.object.metadata?.name ?? '';
      if (change.type === 'DELETED') map.delete(key);
      else map.set(key, change.object);
      if (change.resourceVersion < from || (i + 1 < changes.length && changes[i + 1]!.change.resourceVersion === change.resourceVersion)) continue;
      const perFleet = this.fleets.map((_, f) => membersInForce([...states[f]!.member.values()] as PoolMember[], [...states[f]!.table.values()] as PoolGrant[], [...states[f]!.pod.values()]));
      const value = this.read(perFleet);
      this.samples += 1;
      if (value > this.max) {
        this.max = value;
        this.maxState = JSON.stringify({ revision: String(change.resourceVersion), fleets: states.map((s) => ({ members: [...s.member.values()].map((m) => describeMember(m as PoolMember)), tables: [...s.table.values()].map((t) => ({ name: t.metadata?.name, spec: (t as PoolGrant).spec })) })) });
      }
    }
  }
}

function describeMember(m: PoolMember): unknown {
  return { name: m.metadata.name, grant: m.spec.grant, tableFrom: m.spec.tableFrom, status: m.status && { ack: m.status.acknowledgedConnections, ackGen: m.status.acknowledgedGeneration, held: m.status.heldConnections, table: m.status.tableGeneration } };
}
