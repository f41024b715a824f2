/**
 * Detecting pods that should carry the sidecar but do not: the webhook was
 * down (failurePolicy Ignore admitted them unmodified) or not yet registered.
 * Such a pod would run unbudgeted forever; recreating it through its workload
 * puts it through the webhook again.
 */
import { findSidecar, podWantsInjection } from './inject.ts';
import type { PodLike } from './model.ts';

/** Tuning of the repair check. */
export interface RepairOptions {
  /**
   * How long a pod may lack the sidecar before it counts as missed: covers
   * the pod being admitted while the DatabaseConnection was briefly absent
   * and caches lagging behind the pod's creation.
   */
  gracePeriodSeconds: number;
}

/** Default repair tuning. */
export const DEFAULT_REPAIR_OPTIONS: RepairOptions = { gracePeriodSeconds: 60 };

/** Why a pod needs (or does not need) repair. */
export type RepairReason =
  | 'NotOptedIn'
  | 'HasSidecar'
  | 'Terminating'
  | 'Finished'
  | 'TooYoung'
  | 'MissingSidecar';

/** The repair verdict with its reason, and whether recreating the pod is possible. */
export interface RepairVerdict {
  needsRepair: boolean;
  reason: RepairReason;
  /**
   * True when a controller (ReplicaSet, StatefulSet, Job...) owns the pod and
   * will recreate it after an eviction; a bare pod would simply be lost.
   */
  recreatable: boolean;
}

function toMillis(value: string | Date | undefined): number | undefined {
  if (value === undefined) return undefined;
  const ms = value instanceof Date ? value.getTime() : Date.parse(value);
  return Number.isNaN(ms) ? undefined : ms;
}

/** Full verdict: see podNeedsRepair. */
export function repairVerdict(pod: PodLike, now: Date, options: RepairOptions = DEFAULT_REPAIR_OPTIONS): RepairVerdict {
  const recreatable = pod.metadata?.ownerReferences?.some((o) => o.controller === true) ?? false;
  const verdict = (needsRepair: boolean, reason: RepairReason): RepairVerdict => ({ needsRepair, reason, recreatable });
  if (!podWantsInjection(pod)) return verdict(false, 'NotOptedIn');
  if (findSidecar(pod)) return verdict(false, 'HasSidecar');
  if (pod.metadata?.deletionTimestamp !== undefined) return verdict(false, 'Terminating');
  const phase = pod.status?.phase;
  if (phase === 'Succeeded' || phase === 'Failed') return verdict(false, 'Finished');
  const created = toMillis(pod.metadata?.creationTimestamp);
  // A pod without a creation time has not been persisted yet: leave it to admission.
  if (created === undefined || now.getTime() - created < options.gracePeriodSeconds * 1000) return verdict(false, 'TooYoung');
  return verdict(true, 'MissingSidecar');
}

/**
 * True if `pod` opted in, lacks the sidecar, is neither terminating nor
 * finished, and was created more than `gracePeriodSeconds` before `now`.
 */
export function podNeedsRepair(pod: PodLike, now: Date, options: RepairOptions = DEFAULT_REPAIR_OPTIONS): boolean {
  return repairVerdict(pod, now, options).needsRepair;
}
