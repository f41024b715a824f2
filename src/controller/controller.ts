/**
 * The budget controller: informers on DatabaseConnections, opted-in pods,
 * PoolMembers, Secrets and workloads feed a work queue keyed by database
 * server; the leader's workers reconcile those keys. Handlers only enqueue.
 * Start-up waits for every informer's first list, which retries (429 while
 * the API server's storage initializes, 5xx, connection refused) rather than
 * failing. On stop, in-flight reconciles end before the Lease is released.
 */
import { createHash, randomBytes } from 'node:crypto';
import { steadyNow } from '../ops/clock.ts';
import type { Logger } from 'pino';
import { API_GROUP, API_VERSION, CONNECTION_LABEL, DATABASE_REACHABLE, memberPodUid, type DatabaseConnection, type DatabaseServer, type PoolMember } from '../api/index.ts';
import { laterAcknowledgement, type Acknowledgement } from '../core/budget/index.ts';
import { ApiReachability } from '../kube/backoff.ts';
import type { KubeHttp } from '../kube/http.ts';
import { Informer, type KubeObject } from '../kube/informer.ts';
import type { LeaderElector } from '../kube/leader-election.ts';
import { WorkQueue } from '../kube/workqueue.ts';
import type { ControllerMetrics } from './metrics.ts';
import type { PoolGrant } from '../api/poolgrant.ts';
import { slimPod, withoutManagedFields } from './slim.ts';
import { AcknowledgementLedger } from './acknowledgements.ts';
import { readsNoTable } from './grant-tables.ts';
import { statusAcknowledgement, type PodObject } from './plan-input.ts';
import { ReconcileSchedule } from './reconcile-schedule.ts';
import { ServerReconciler, type ControllerCaches, type HpaObject, type NamespaceObject, type ReconcilerDeps, type SecretObject, type WorkloadObject } from './reconciler.ts';

/** What woke a reconcile: a change of its inputs, or an acknowledgement (or an echo of the controller's own write). */
type WakeCause = 'change' | 'acknowledgement';

/**
 * What a reconcile reads of a PoolMember, hashed: its owner, its whole spec,
 * the status fields the planner counts and whether its sidecar reaches the
 * database. Left out: heartbeatTime and
 * sidecarVersion, which every sidecar rewrites every few seconds and which change
 * no grant (a sidecar going silent is found by the periodic requeue instead).
 */
function memberFingerprint(m: PoolMember, channel: Acknowledgement | undefined): string {
  const s = m.status;
  // The acknowledgement as the planner reads it: a status that only catches up with what came over the channel changes nothing.
  const later = laterAcknowledgement(statusAcknowledgement(s), channel);
  const ack = later ? [later.generation, later.connections, later.held, later.tableGeneration] : [];
  // Whether the sidecar reads tables (its PoolMember is switched onto one) is in the status alone.
  // A heartbeat that shows a PoolMember's sidecar does not read its table (readsNoTable) changes what the reconcile does.
  const status = s || channel ? [...ack, s?.tableGeneration !== undefined, s?.credentialsGeneration, s?.draining, s?.drained, readsNoTable(m, m.spec.tableFrom)] : null;
  return createHash('sha1').update(JSON.stringify([m.metadata.ownerReferences?.map((o) => o.uid), m.spec, status, memberReachability(m) ?? null])).digest('base64');
}

/**
 * Whether a PoolMember's sidecar says it reaches its database, and why not:
 * its sidecar writes it only when it changes, and the DatabaseConnection's
 * Degraded and Ready conditions count it, so a change reconciles.
 */
function memberReachability(m: PoolMember): string | undefined {
  const c = m.status?.conditions?.find((x) => x.type === DATABASE_REACHABLE);
  return c ? `${c.status}/${c.reason}/${c.message}` : undefined;
}

/** What a PoolMember's status says its sidecar holds and acknowledged (undefined before it answered), for telling its answers from echoes of spec writes. */
function statusAnswer(m: PoolMember): string | undefined {
  const s = m.status;
  return s ? JSON.stringify([s.acknowledgedGeneration, s.acknowledgedConnections, s.heldConnections, s.tableGeneration, s.credentialsGeneration, s.draining, s.drained]) : undefined;
}

/** Settings of the controller. */
export interface ControllerOptions {
  http: KubeHttp;
  logger: Logger;
  metrics: ControllerMetrics;
  /** Absent: this replica always leads (single replica, tests). */
  elector?: LeaderElector;
  workers?: number;
  stallTimeoutMs?: number;
  reconciler: Omit<ReconcilerDeps, 'http' | 'caches' | 'logger' | 'metrics' | 'acknowledgements'>;
  /**
   * Where sidecars on grant tables send acknowledgements to this replica
   * (http://pod-ip:port, served by an AcknowledgementReceiver on `ledger`);
   * written into the tables while it leads. Absent: PoolMember status only.
   */
  acknowledgeTo?: string | undefined;
}

/** The running controller. */
export class BudgetController {
  readonly caches: ControllerCaches;
  private readonly options: ControllerOptions;
  private readonly reconciler: ServerReconciler;
  private queue: WorkQueue | undefined;
  private workers: Promise<void> | undefined;
  private synced = false;
  private stopping = false;
  /** The last server key seen for each connection, so a host change reconciles the old server too. */
  private readonly lastServer = new Map<string, string>();
  /**
   * Per PoolMember: the fingerprint of what the planner reads, the heartbeat
   * last seen, and when this replica saw it change (its own clock, ms): a
   * node's clock that is off must not make its sidecars look silent.
   */
  private readonly memberSeen = new Map<string, { fingerprint: string; answer: string | undefined; heartbeat: string | undefined; heardAt: number; reachability: string | undefined }>();
  /** heardAt of memberSeen by the PoolMember object the cache holds: read for every PoolMember each pass. */
  private readonly heardByObject = new WeakMap<PoolMember, number>();
  /** What specChanged last saw of each DatabaseConnection and DatabaseServer. */
  private readonly specsSeen = new Map<string, string>();
  /** When each server is reconciled, while this replica's workers run. */
  private schedule: ReconcileSchedule | undefined;
  /** Acknowledgements received over the channel while this replica leads. */
  readonly ledger = new AcknowledgementLedger();
  /**
   * What the tables name while this replica leads: its address and a term new
   * with every start of leading. A replica that leads again under the same
   * address has forgotten what it heard before; the new term makes the
   * sidecars send it again.
   */
  private acknowledgeTo: string | undefined;

  constructor(options: ControllerOptions) {
    this.options = options;
    const { http, logger } = options;
    // One probe for all informers: when the API server is back, every watch resumes at once.
    const reachability = new ApiReachability(http);
    // The caches keep only what is read: at thousands of pods, the rest is most of the memory.
    const informer = <T extends KubeObject>(path: string, labelSelector?: string, transform: (o: T) => T = withoutManagedFields): Informer<T> =>
      new Informer<T>(http, { path, labelSelector, reachability, logger: logger.child({ informer: path }), stallTimeoutMs: options.stallTimeoutMs, transform });
    this.caches = {
      connections: informer<DatabaseConnection & KubeObject>(`/apis/${API_GROUP}/${API_VERSION}/databaseconnections`),
      pods: informer<PodObject & KubeObject>('/api/v1/pods', CONNECTION_LABEL, slimPod),
      members: informer<PoolMember & KubeObject>(`/apis/${API_GROUP}/${API_VERSION}/poolmembers`),
      secrets: informer<SecretObject>('/api/v1/secrets'),
      deployments: informer<WorkloadObject>('/apis/apps/v1/deployments'),
      statefulSets: informer<WorkloadObject>('/apis/apps/v1/statefulsets'),
      hpas: informer<HpaObject>('/apis/autoscaling/v2/horizontalpodautoscalers'),
      grants: informer<PoolGrant & KubeObject>(`/apis/${API_GROUP}/${API_VERSION}/poolgrants`),
      servers: informer<DatabaseServer & KubeObject>(`/apis/${API_GROUP}/${API_VERSION}/databaseservers`),
      namespaces: informer<NamespaceObject>('/api/v1/namespaces'),
    };
    const { elector } = options;
    this.reconciler = new ServerReconciler({
      ...options.reconciler, http, caches: this.caches, logger, metrics: options.metrics,
      // A replica that lost the Lease stops writing grants even mid-reconcile.
      ...(elector ? { mayWrite: () => elector.isLeader && !this.stopping } : {}),
      ...(options.acknowledgeTo ? { acknowledgements: { ledger: this.ledger, acknowledgeTo: () => this.acknowledgeTo } } : {}),
      heardAt: (m) => this.heardByObject.get(m) ?? this.memberSeen.get(`${m.metadata.namespace ?? ''}/${m.metadata.name ?? ''}`)?.heardAt,
      wake: (server) => this.enqueue(server),
    });
    this.wireHandlers();
  }

  /** True while this replica's workers run (it leads, or there is no election). */
  get leading(): boolean {
    return this.queue !== undefined;
  }

  /**
   * An acknowledgement arrived over the channel: reconcile its connection's
   * server (spaced as any event), and remember it as what the PoolMember says,
   * so that the status write that follows at the heartbeat wakes nothing.
   */
  acknowledged(member: PoolMember): void {
    const k = `${member.metadata.namespace ?? ''}/${member.metadata.name ?? ''}`;
    const podUid = memberPodUid(member);
    const seen = this.memberSeen.get(k);
    if (seen) this.memberSeen.set(k, { ...seen, fingerprint: memberFingerprint(member, this.ledger.get(podUid)) });
    const c = this.caches.connections.get(member.metadata.namespace, member.spec.connection);
    if (c) this.enqueue(this.serverOf(c), 'acknowledgement', podUid);
  }

  /** A pod's PoolMember: the cache's, or one this replica created that the cache has yet to show (its sidecar may answer first). */
  member(namespace: string, name: string): PoolMember | undefined {
    return this.caches.members.get(namespace, name) ?? this.reconciler.createdMember(namespace, name);
  }

  /** True once every informer has listed. */
  get ready(): boolean {
    return this.synced;
  }

  /** Queues a server's reconcile, as its schedule says (src/controller/reconcile-schedule.ts); `podUid`: the pod whose sidecar answered. */
  private enqueue(server: string | undefined, cause: WakeCause = 'change', podUid?: string): void {
    if (!server || !this.schedule) return;
    if (cause === 'change') this.schedule.changed(server);
    else this.schedule.answered(server, podUid);
  }

  /**
   * Whether an event of a DatabaseConnection or DatabaseServer changed more
   * than its status: its spec (generation), labels or deletion. Remembers
   * what it saw, by `key`.
   */
  private specChanged(key: string, type: 'ADDED' | 'MODIFIED' | 'DELETED', o: KubeObject): boolean {
    const seen = JSON.stringify([o.metadata?.uid, o.metadata?.generation, o.metadata?.labels ?? null, o.metadata?.deletionTimestamp ?? null]);
    const before = this.specsSeen.get(key);
    if (type === 'DELETED') this.specsSeen.delete(key);
    else this.specsSeen.set(key, seen);
    return type !== 'MODIFIED' || before !== seen;
  }

  private serverOf(c: DatabaseConnection): string {
    return this.reconciler.directory.keyOf(c);
  }

  private connectionsIn(namespace: string | undefined): Array<DatabaseConnection & KubeObject> {
    return this.caches.connections.list().filter((c) => c.metadata.namespace === namespace);
  }

  private wireHandlers(): void {
    const { connections, pods, members, secrets, deployments, statefulSets, hpas, servers, namespaces } = this.caches;
    connections.onChange((type, c) => {
      const k = `${c.metadata.namespace ?? ''}/${c.metadata.name ?? ''}`;
      const now = this.serverOf(c);
      // Its status, which this controller writes, coming back: nothing to regroup or replan at once.
      if (!this.specChanged(`DatabaseConnection ${k}`, type, c)) {
        this.enqueue(now, 'acknowledgement');
        return;
      }
      const before = this.lastServer.get(k);
      this.lastServer.set(k, now);
      this.enqueue(now);
      if (before !== now) this.enqueue(before);
      // A new or changed address may join or leave a server: regroup, then reconcile both sides.
      void this.reconciler.refreshDirectory().then((changed) => {
        for (const { before: from, after: to } of changed) {
          this.enqueue(from);
          this.enqueue(to);
        }
      }, (err: unknown) => this.options.logger.warn({ error: err instanceof Error ? err.message : String(err) }, 'resolving server addresses failed'));
    });
    const byConnectionName = (namespace: string | undefined, name: string | undefined, cause: WakeCause = 'change'): void => {
      const c = name ? connections.get(namespace, name) : undefined;
      if (c) this.enqueue(this.serverOf(c), cause);
    };
    pods.onChange((type, p) => {
      const name = p.metadata?.labels?.[CONNECTION_LABEL];
      const c = name ? connections.get(p.metadata?.namespace, name) : undefined;
      if (type === 'DELETED') {
        this.reconciler.podDeleted(p);
        // A pod gone is awaited no more (a terminating pod's drain, say).
        if (c) this.enqueue(this.serverOf(c), 'acknowledgement', p.metadata?.uid ?? '');
      }
      if (c) this.enqueue(this.serverOf(c));
    });
    // Written by this controller; an event matters when someone else changed or deleted one.
    this.caches.grants?.onChange((_type, g) => byConnectionName(g.metadata.namespace, g.spec.connection, 'acknowledgement'));
    members.onChange((type, m) => {
      const k = `${m.metadata.namespace ?? ''}/${m.metadata.name ?? ''}`;
      const podUid = memberPodUid(m);
      if (type === 'DELETED') {
        const replan = this.reconciler.memberDeleted(m);
        this.ledger.forget(podUid);
        this.memberSeen.delete(k);
        if (replan) byConnectionName(m.metadata.namespace, m.spec.connection);
        return;
      }
      const fingerprint = memberFingerprint(m, this.ledger.get(podUid));
      if (m.status) this.ledger.forget(podUid, { tableGeneration: m.status.tableGeneration, generation: m.status.acknowledgedGeneration });
      const heartbeat = m.status?.heartbeatTime;
      const answer = statusAnswer(m);
      const seen = this.memberSeen.get(k);
      const now = steadyNow();
      const heardAt = seen === undefined || seen.heartbeat !== heartbeat ? now : seen.heardAt;
      this.memberSeen.set(k, { fingerprint, answer, heartbeat, heardAt, reachability: memberReachability(m) });
      this.heardByObject.set(m, heardAt);
      // A heartbeat alone changes no grant; but one from a sidecar that had gone quiet
      // past the timeout may clear a SidecarUnresponsive condition, so that one reconciles.
      const quiet = seen !== undefined && seen.heartbeat !== heartbeat && now - seen.heardAt > this.reconciler.memberHeartbeatTimeoutMs(m);
      if (seen?.fingerprint === fingerprint && !quiet) return;
      const c = connections.get(m.metadata.namespace, m.spec.connection);
      if (!c) return;
      // A sidecar that now reaches its database or no longer does changes the connection's conditions: a change, reconciled
      // at once (a fleet's sidecars failing together are one burst), not an answer that may wait for the plan's others.
      if (seen !== undefined && memberReachability(m) !== seen.reachability) this.enqueue(this.serverOf(c));
      // The sidecar said something new; anything else is this controller's own write coming back.
      else this.enqueue(this.serverOf(c), 'acknowledgement', answer !== undefined && answer !== seen?.answer ? podUid : undefined);
    });
    secrets.onChange((_type, s) => {
      for (const c of this.connectionsIn(s.metadata?.namespace)) {
        const refs = [c.spec.database.credentialsSecretRef.name, c.spec.database.caSecretRef?.name, c.spec.sshTunnel?.privateKeySecretRef.name];
        if (refs.includes(s.metadata?.name)) this.enqueue(this.serverOf(c));
      }
    });
    const byNamespace = (_type: string, o: KubeObject): void => {
      for (const c of this.connectionsIn(o.metadata?.namespace)) this.enqueue(this.serverOf(c));
    };
    // A DatabaseServer's addresses regroup connections; its limit and allocations change every namespace's share.
    servers.onChange((type, s) => {
      if (!this.specChanged(`DatabaseServer ${s.metadata.name ?? ''}`, type, s)) {
        this.enqueue(this.reconciler.ownedKey(s.metadata.name ?? ''), 'acknowledgement');
        return;
      }
      this.enqueue(this.reconciler.ownedKey(s.metadata.name ?? ''));
      void this.reconciler.refreshDirectory().then(() => {
        for (const server of this.reconciler.serverKeys()) this.enqueue(server);
      }, (err: unknown) => this.options.logger.warn({ error: err instanceof Error ? err.message : String(err) }, 'resolving server addresses failed'));
    });
    // Namespace labels decide which allocation applies (namespaceSelector).
    namespaces.onChange((_type, n) => {
      const name = n.metadata?.name;
      const owned = new Set(this.connectionsIn(name).map((c) => this.serverOf(c)).filter((k) => this.reconciler.directory.ownerOf(k) !== undefined));
      for (const server of owned) this.enqueue(server);
    });
    deployments.onChange(byNamespace);
    statefulSets.onChange(byNamespace);
    hpas.onChange(byNamespace);
  }

  /** Starts the informers (and waits for their first list), then works whenever this replica leads. */
  async start(): Promise<void> {
    await Promise.all(Object.values(this.caches).map((i: Informer<KubeObject>) => i.start()));
    if (this.stopping) return;
    await this.reconciler.refreshDirectory();
    this.synced = true;
    const { elector } = this.options;
    if (!elector) {
      this.startWorkers();
      return;
    }
    elector.onLeadershipChange((leading) => {
      this.options.metrics.leader.set(leading ? 1 : 0);
      // A later term starts from what is durable; the sidecars resend to whoever the tables name.
      this.ledger.clear();
      if (leading) this.startWorkers();
      else void this.stopWorkers();
    });
    elector.start();
  }

  private startWorkers(): void {
    if (this.queue || this.stopping) return;
    if (this.options.acknowledgeTo) this.acknowledgeTo = `${this.options.acknowledgeTo}/${randomBytes(6).toString('base64url')}`;
    const queue = new WorkQueue();
    this.queue = queue;
    const schedule = new ReconcileSchedule(queue, (server) => this.reconciler.lastPlanMs(server));
    this.schedule = schedule;
    // A replica that leads again starts only after its previous workers have ended.
    const previous = this.workers ?? Promise.resolve();
    this.workers = previous.then(() => queue.run(this.options.workers ?? 2, async (server) => {
      schedule.started(server);
      try {
        return await this.reconciler.reconcile(server);
      } finally {
        schedule.finished(server, this.reconciler.awaitedAcknowledgements(server));
      }
    }, (server, err) => {
      this.options.logger.warn({ server, error: err instanceof Error ? err.message : String(err) }, 'reconcile failed; retrying with backoff');
    }));
    for (const server of this.reconciler.serverKeys()) queue.add(server);
  }

  private async stopWorkers(): Promise<void> {
    const queue = this.queue;
    this.queue = undefined;
    this.schedule?.stop();
    this.schedule = undefined;
    queue?.shutDown();
    await this.workers;
    // Only a leader watches the servers; nothing reconciles now to use what it held.
    await this.reconciler.release();
  }

  /**
   * Stops the workers and waits for in-flight reconciles, then releases the
   * Lease (a standby may write only after this replica has stopped writing),
   * then stops the informers.
   */
  async stop(): Promise<void> {
    this.stopping = true;
    await this.stopWorkers();
    await this.options.elector?.stop();
    await Promise.all(Object.values(this.caches).map((i: Informer<KubeObject>) => i.stop()));
  }
}
