/**
 * Which consumer of a DatabaseConnection a pod belongs to, from what the pod
 * carries at admission: its owner reference (a ReplicaSet named
 * `<deployment>-<pod-template-hash>`, a StatefulSet, ...) or its labels.
 */
import type { ConsumerSpec, InjectableConnection, LabelSelector, PodLike } from './model.ts';

/** True if `labels` satisfy `selector` (Kubernetes semantics; an empty selector matches everything). */
export function selectorMatches(selector: LabelSelector, labels: Readonly<Record<string, string>>): boolean {
  for (const [key, value] of Object.entries(selector.matchLabels ?? {})) {
    if (labels[key] !== value) return false;
  }
  for (const expression of selector.matchExpressions ?? []) {
    const has = Object.hasOwn(labels, expression.key);
    const value = labels[expression.key];
    const values = expression.values ?? [];
    switch (expression.operator) {
      case 'In': if (!has || !values.includes(value!)) return false; break;
      case 'NotIn': if (has && values.includes(value!)) return false; break;
      case 'Exists': if (!has) return false; break;
      case 'DoesNotExist': if (has) return false; break;
      default: return false;
    }
  }
  return true;
}

function ownedByWorkload(pod: PodLike, workload: { kind: string; name: string }): boolean {
  const owner = pod.metadata?.ownerReferences?.find((o) => o.controller === true) ?? pod.metadata?.ownerReferences?.[0];
  if (!owner) return false;
  if (owner.kind === workload.kind && owner.name === workload.name) return true;
  // A Deployment's pods are owned by a ReplicaSet named after the template hash.
  if (workload.kind === 'Deployment' && owner.kind === 'ReplicaSet') {
    const hash = pod.metadata?.labels?.['pod-template-hash'];
    return hash !== undefined && owner.name === `${workload.name}-${hash}`;
  }
  return false;
}

/** True if `consumer` selects `pod`. */
export function consumerSelects(consumer: ConsumerSpec, pod: PodLike): boolean {
  if (consumer.workloadRef) return ownedByWorkload(pod, consumer.workloadRef);
  if (consumer.selector) return selectorMatches(consumer.selector, pod.metadata?.labels ?? {});
  return false;
}

/** The first consumer (in spec order) that selects `pod`, if any. */
export function resolveConsumer(connection: InjectableConnection, pod: PodLike): ConsumerSpec | undefined {
  return connection.spec.consumers.find((consumer) => consumerSelects(consumer, pod));
}

/**
 * The per-process pool size hint for the app: the controller's current
 * `perProcessBudget` when the status has one, else the consumer's
 * `minPerPod` spread over its processes; never below 1, since a pool of 0
 * breaks most client libraries.
 */
export function poolSizeHint(connection: InjectableConnection, consumer: ConsumerSpec | undefined): number {
  if (!consumer) return 1;
  const status = connection.status?.consumers?.find((c) => c.name === consumer.name);
  // A consumer with no live pods yet has a budget of 0 in status, which says nothing about the next pod.
  if (status?.perProcessBudget !== undefined && Number.isFinite(status.perProcessBudget) && (status.pods ?? 0) > 0) return Math.max(1, Math.floor(status.perProcessBudget));
  const processes = Math.max(1, consumer.processesPerPod ?? 1);
  return Math.max(1, Math.floor((consumer.minPerPod ?? 1) / processes));
}
