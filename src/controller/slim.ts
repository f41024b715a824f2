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

/**
 * A pod as the controller uses it: its metadata, ServiceAccount, container
 * names (the sidecar is found by name), phase and Ready condition.
 */
export function slimPod<T extends PodObject & KubeObject>(pod: T): T {
  const slim = withoutManagedFields(pod);
  const spec = pod.spec;
  const status = pod.status;
  return {
    ...slim,
    spec: spec ? {
      ...(spec.serviceAccountName ? { serviceAccountName: spec.serviceAccountName } : {}),
      containers: spec.containers.map((c) => ({ name: c.name })),
      ...(spec.initContainers ? { initContainers: spec.initContainers.map((c) => ({ name: c.name, ...(c.restartPolicy ? { restartPolicy: c.restartPolicy } : {}) })) } : {}),
    } : undefined,
    status: status ? { ...(status.phase ? { phase: status.phase } : {}), ...(status.conditions ? { conditions: status.conditions.filter((c) => c.type === 'Ready').map((c) => ({ type: c.type, status: c.status })) } : {}) } : undefined,
  };
}
