/**
 * Kubernetes conditions (metav1.Condition) as plain data: set, find, remove.
 * lastTransitionTime changes only when a condition's status changes, so a
 * reconcile that re-asserts the same state writes an identical status.
 */
import type { Condition } from '../../api/common.ts';

export type { Condition };

/** True, False or Unknown. */
export type ConditionStatus = Condition['status'];

/** What a reconcile asserts about one condition type. */
export interface ConditionUpdate {
  type: string;
  status: ConditionStatus;
  /** CamelCase, machine-readable. */
  reason: string;
  /** For humans. */
  message: string;
}

/** RFC 3339 with second precision, as metav1.Time serializes. */
export function conditionTime(now: Date): string {
  return now.toISOString().replace(/\.\d{3}Z$/, 'Z');
}

/**
 * Returns `conditions` with `update` applied: a new condition is appended, an
 * existing one of the same type is replaced in place. lastTransitionTime is
 * kept when the status does not change; observedGeneration is always the
 * generation this update was computed from.
 */
export function setCondition(conditions: readonly Condition[] | undefined, update: ConditionUpdate, observedGeneration: number, now: Date): Condition[] {
  const list = conditions ?? [];
  const previous = list.find((c) => c.type === update.type);
  const next: Condition = {
    type: update.type,
    status: update.status,
    reason: update.reason,
    message: update.message,
    observedGeneration,
    lastTransitionTime: previous && previous.status === update.status ? previous.lastTransitionTime : conditionTime(now),
  };
  return previous ? list.map((c) => (c === previous ? next : c)) : [...list, next];
}

/** Applies several updates in order (see setCondition). */
export function setConditions(conditions: readonly Condition[] | undefined, updates: readonly ConditionUpdate[], observedGeneration: number, now: Date): Condition[] {
  return updates.reduce<Condition[]>((list, update) => setCondition(list, update, observedGeneration, now), [...(conditions ?? [])]);
}

/** The condition of `type`, if present. */
export function findCondition(conditions: readonly Condition[] | undefined, type: string): Condition | undefined {
  return conditions?.find((c) => c.type === type);
}

/** Whether the condition of `type` is present with status True. */
export function isConditionTrue(conditions: readonly Condition[] | undefined, type: string): boolean {
  return findCondition(conditions, type)?.status === 'True';
}

/** `conditions` without the condition of `type`. */
export function removeCondition(conditions: readonly Condition[] | undefined, type: string): Condition[] {
  return (conditions ?? []).filter((c) => c.type !== type);
}

/** Whether two condition lists say the same thing (order included), to skip needless status writes. */
export function conditionsEqual(a: readonly Condition[] | undefined, b: readonly Condition[] | undefined): boolean {
  const left = a ?? [];
  const right = b ?? [];
  return left.length === right.length && left.every((c, i) => {
    const d = right[i];
    return d !== undefined && c.type === d.type && c.status === d.status && c.reason === d.reason && c.message === d.message
      && c.observedGeneration === d.observedGeneration && c.lastTransitionTime === d.lastTransitionTime;
  });
}
