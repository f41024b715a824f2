/**
 * Pods that opted in but came up without the sidecar (the webhook was down
 * and failurePolicy Ignore let them through): report them with an Event and,
 * if configured, evict them through policy/v1 Eviction so their workload
 * recreates them, this time through the webhook. Evictions honour
 * PodDisruptionBudgets, and each pass evicts at most a bounded number so an
 * outage does not turn into a fleet-wide restart at once.
 */
import type { V1Pod } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import { CONNECTION_LABEL, repairVerdict, type PodLike, type RepairOptions } from '../core/inject/index.ts';
import { KubeApiError, type KubeHttp } from '../kube/http.ts';

/** Records an Event on an object (src/kube/events.ts EventRecorder fits). */
export interface RepairEventRecorder {
  record(object: { apiVersion?: string; kind?: string; metadata?: { name?: string; namespace?: string; uid?: string; resourceVersion?: string } }, type: 'Normal' | 'Warning', reason: string, message: string): Promise<void>;
}

/** Event reason on a pod found without the sidecar. */
export const MISSING_SIDECAR_REASON = 'SidecarMissing';

/** How to repair. */
export interface PodRepairOptions extends RepairOptions {
  /** `evict`: evict recreatable pods; `report`: only record Events. */
  mode: 'evict' | 'report';
  /** Upper bound of evictions per call. */
  maxEvictionsPerPass: number;
}

/** Default: evict, one minute of grace, five evictions per pass. */
export const DEFAULT_POD_REPAIR_OPTIONS: PodRepairOptions = { mode: 'evict', gracePeriodSeconds: 60, maxEvictionsPerPass: 5 };

/** What happened to one pod. */
export interface RepairOutcome {
  namespace: string;
  pod: string;
  action:
    | 'evicted'
    /** Report mode, or a pod no controller would recreate. */
    | 'reported'
    /** A PodDisruptionBudget refused the eviction (429); retried next pass. */
    | 'blocked'
    /** The per-pass bound was reached; retried next pass. */
    | 'deferred'
    /** The pod was already gone. */
    | 'gone';
}

/** Finds and repairs pods that missed the sidecar. */
export class MissingSidecarRepairer {
  private readonly http: KubeHttp;
  private readonly events: RepairEventRecorder;
  private readonly logger: Logger;
  private readonly options: PodRepairOptions;

  constructor(http: KubeHttp, events: RepairEventRecorder, logger: Logger, options: PodRepairOptions = DEFAULT_POD_REPAIR_OPTIONS) {
    this.http = http;
    this.events = events;
    this.logger = logger;
    this.options = options;
  }

  /** Lists the pods that name `connection` in `namespace` and repairs those that need it. */
  async repairConnection(namespace: string, connection: string, now: Date): Promise<RepairOutcome[]> {
    const pods = await this.http.request<{ items: V1Pod[] }>('GET', `/api/v1/namespaces/${encodeURIComponent(namespace)}/pods?labelSelector=${encodeURIComponent(`${CONNECTION_LABEL}=${connection}`)}`);
    return this.repairPods(pods.items, now);
  }

  /** Repairs those of `pods` that need it; returns one outcome per pod acted on. */
  async repairPods(pods: readonly V1Pod[], now: Date): Promise<RepairOutcome[]> {
    const outcomes: RepairOutcome[] = [];
    let evictions = 0;
    for (const pod of pods) {
      const verdict = repairVerdict(pod as PodLike, now, this.options);
      if (!verdict.needsRepair) continue;
      const namespace = pod.metadata?.namespace ?? 'default';
      const name = pod.metadata?.name ?? '';
      const owner = pod.metadata?.ownerReferences?.find((o) => o.controller === true);
      const subject = { apiVersion: 'v1', kind: 'Pod', metadata: { name, namespace, uid: pod.metadata?.uid, resourceVersion: pod.metadata?.resourceVersion } };
      if (this.options.mode === 'report' || !verdict.recreatable) {
        const why = verdict.recreatable ? 'eviction is turned off' : 'no controller owns it, so it would not come back';
        await this.events.record(subject, 'Warning', MISSING_SIDECAR_REASON, `pod opted into poolkeeper but has no sidecar (the webhook was unavailable when it was created); not evicted: ${why}`);
        outcomes.push({ namespace, pod: name, action: 'reported' });
        continue;
      }
      if (evictions >= this.options.maxEvictionsPerPass) {
        outcomes.push({ namespace, pod: name, action: 'deferred' });
        continue;
      }
      try {
        await this.http.request('POST', `/api/v1/namespaces/${encodeURIComponent(namespace)}/pods/${encodeURIComponent(name)}/eviction`,
          { apiVersion: 'policy/v1', kind: 'Eviction', metadata: { name, namespace }, deleteOptions: { preconditions: { uid: pod.metadata?.uid } } });
        evictions += 1;
        await this.events.record(subject, 'Warning', MISSING_SIDECAR_REASON, `pod opted into poolkeeper but has no sidecar; evicted so that ${owner?.kind ?? 'its controller'} ${owner?.name ?? ''} recreates it with the sidecar`);
        this.logger.info({ namespace, pod: name, owner: owner?.name }, 'evicted pod without sidecar');
        outcomes.push({ namespace, pod: name, action: 'evicted' });
      } catch (err) {
        const status = err instanceof KubeApiError ? err.statusCode : undefined;
        if (status === 404 || status === 409) {
          outcomes.push({ namespace, pod: name, action: 'gone' }); // deleted, or replaced by a pod of the same name
        } else if (status === 429) {
          this.logger.info({ namespace, pod: name }, 'eviction blocked by a PodDisruptionBudget; will retry');
          outcomes.push({ namespace, pod: name, action: 'blocked' });
        } else {
          throw err;
        }
      }
    }
    return outcomes;
  }
}
