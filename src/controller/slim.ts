/**
 * What the controller's caches keep of each object: the fields the planner,
 * the repairer and the status read, nothing else. At thousands of pods the
 * rest (managedFields, container specs, volumes, container statuses) is most
 * of the controller's memory.
 */
import type { KubeObject } from '../kube/informer.ts';
import type { PodObject } from './plan-input.ts';

/** Any object without metadata.managedFields (the server-side apply bookkeeping nobody here reads). */
export function withoutManagedFields<T extends KubeObject>(object: T): T {
  if (!object.metadata?.managedFields) return object;
  const { managedFields: _dropped, ...metadata } = object.metadata;
  return { ...object, metadata };
}

/** The prefix of every annotation the controller reads on a pod. */
const OWN_ANNOTATIONS = 'poolkeeper.dev/';

/**
 * A pod as the controller uses it: its metadata (labels whole, for consumer
 * selectors; only poolkeeper's own annotations, since others can be large),
 * ServiceAccount, container names (the sidecar is found by name), phase and
 * Ready condition.
 */
export function slimPod<T extends PodObject & KubeObject>(pod: T): T {
  const slim = withoutManagedFields(pod);
  const spec = pod.spec;
  const status = pod.status;
  const annotations = slim.metadata?.annotations;
  const own = annotations ? Object.entries(annotations).filter(([k]) => k.startsWith(OWN_ANNOTATIONS)) : [];
  const metadata = annotations && own.length !== Object.keys(annotations).length
    ? { ...slim.metadata, annotations: Object.fromEntries(own) }
    : slim.metadata;
  return {
    ...slim,
    ...(metadata ? { metadata } : {}),
    spec: spec ? {
      ...(spec.serviceAccountName ? { serviceAccountName: spec.serviceAccountName } : {}),
      containers: spec.containers.map((c) => ({ name: c.name })),
      ...(spec.initContainers ? { initContainers: spec.initContainers.map((c) => ({ name: c.name, ...(c.restartPolicy ? { restartPolicy: c.restartPolicy } : {}) })) } : {}),
    } : undefined,
    status: status ? { ...(status.phase ? { phase: status.phase } : {}), ...(status.conditions ? { conditions: status.conditions.filter((c) => c.type === 'Ready').map((c) => ({ type: c.type, status: c.status })) } : {}) } : undefined,
  };
}
