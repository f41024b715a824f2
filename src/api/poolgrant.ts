/**
 * PoolGrant (poolkeeper.dev/v1alpha1): one per DatabaseConnection, same name
 * and namespace, written by the controller only. A grant table: one per-pod
 * default and the pods that differ from it. Each sidecar whose PoolMember has
 * switched to the table derives its own grant from it (core/budget/grant-table.ts),
 * so one write reaches every pod of the connection. See docs/protocol.md.
 */
import type { FromSchema } from 'json-schema-to-ts';
import type { V1ObjectMeta } from '@kubernetes/client-node';
import { resourceSchema } from './common.ts';

/** A pod whose grant differs from the table's default. */
export const grantExceptionSchema = {
  type: 'object',
  required: ['connections'],
  additionalProperties: false,
  properties: {
    connections: { type: 'integer', minimum: 0, description: 'Server connections these pods may hold.' },
    drain: { type: 'boolean', description: 'true: these pods are asked to give everything back (terminating, or no consumer), after their drain grace.' },
    since: { type: 'integer', format: 'int64', minimum: 0, description: 'A change in flight: the table generation that set this grant, which these pods have not yet been seen to acknowledge (they do so with a table generation >= since). Absent: acknowledged.' },
    releasing: { type: 'integer', minimum: 0, description: 'With since, for a shrink: what these pods may still hold until they acknowledge it. Counted against the limit until then.' },
    pods: { type: 'array', maxItems: 100000, items: { type: 'string', maxLength: 253 }, description: 'Names of the pods (their PoolMembers), sorted.' },
  },
} as const;

/** PoolGrant spec, written by the controller only. */
export const poolGrantSpecSchema = {
  type: 'object',
  required: ['connection', 'generation', 'perPod'],
  additionalProperties: false,
  properties: {
    connection: { type: 'string', minLength: 1, maxLength: 253, description: 'Name of the DatabaseConnection in this namespace.' },
    generation: { type: 'integer', format: 'int64', minimum: 0, description: 'Increases with every change of the table.' },
    perPod: { type: 'integer', minimum: 0, description: 'The grant of every pod of the table not listed in exceptions.' },
    perPodSince: { type: 'integer', format: 'int64', minimum: 0, description: 'since (see exceptions) of every pod not listed in exceptions.' },
    perPodReleasing: { type: 'integer', minimum: 0, description: 'releasing (see exceptions) of every pod not listed in exceptions.' },
    perPodPods: { type: 'integer', minimum: 0, description: 'How many pods perPod covered when perPodPodsGeneration was written: the live pods of the table not listed in exceptions. A controller that later finds fewer PoolMembers on the default (and none listed or departed for the rest) holds what the missing pods may still hold for departureHoldSeconds: pods force-deleted, their PoolMembers collected, while no controller ran.' },
    perPodPodsGeneration: { type: 'integer', format: 'int64', minimum: 0, description: 'The generation whose write set perPodPods; perPodPods counts only while it equals generation (a table written since by a controller that does not count them says nothing about them).' },
    recordsChanges: { type: 'boolean', description: 'true: the table records changes in flight (since, releasing), and is the record of which acknowledgements the controller has seen. Absent in tables of older controllers.' },
    exceptions: { type: 'array', maxItems: 1024, items: grantExceptionSchema, description: 'Pods whose grant or change in flight differs from the default, grouped.' },
    departed: {
      type: 'array', maxItems: 100000,
      description: 'Pods that left without a drain, still counted against the limit until `until` (what PostgreSQL may still hold of theirs); no sidecar derives a grant from them.',
      items: {
        type: 'object', required: ['pod', 'connections', 'until'], additionalProperties: false,
        properties: {
          pod: { type: 'string', maxLength: 253, description: 'The pod\'s name; "(N pods of the default at generation G)" for pods that left the default unseen (see perPodPods).' },
          uid: { type: 'string', maxLength: 64, description: 'The pod\'s UID; empty when only its name was known.' },
          connections: { type: 'integer', minimum: 0, description: 'What it may still hold.' },
          until: { type: 'string', format: 'date-time', description: 'Counted until then, on the API server\'s clock (each controller replica learns it from the Date of its answers), so that replicas whose own clocks disagree end the hold together.' },
        },
      },
    },
    statusDelaySeconds: { type: 'integer', minimum: 1, maximum: 3600, description: 'After an acknowledgement sent to acknowledgeTo, a sidecar writes it into its PoolMember status at a random point of this many seconds (the table\'s pods / 20, at most a heartbeat). A change of it alone is not a change of the table (generation stays).' },
    acknowledgeTo: { type: 'string', maxLength: 512, pattern: '^http://[^/@]+(/[A-Za-z0-9_-]+)?$', description: 'Where the sidecars of the table send their acknowledgements at once (the leading controller, http://<address>:<port>/<term>, the term new whenever a controller starts leading, so that sidecars resend what an earlier term may have lost); they write them into their PoolMember status at their next heartbeat too. Absent: PoolMember status only. A change of it alone is not a change of the table (generation stays).' },
    heartbeatSeconds: { type: 'integer', minimum: 1, maximum: 3600, description: 'How often each sidecar of the table renews its PoolMember status (heartbeatTime): longer for more pods, so that heartbeats stay a small load on the API server. A change of it alone is not a change of the table (generation stays).' },
  },
} as const;

/** The CRD's openAPIV3Schema. */
export const poolGrantSchema = resourceSchema(poolGrantSpecSchema, { type: 'object', properties: {} }, {
  root: 'PoolGrant: the grant table of one DatabaseConnection (same name); the sidecars of its pods derive their grants from it (docs/protocol.md).',
  spec: 'Written by the controller: the per-pod default grant and the pods that differ from it.',
  status: 'Unused.',
});

/** PoolGrant spec. */
export type PoolGrantSpec = FromSchema<typeof poolGrantSpecSchema>;

/** A PoolGrant object. */
export interface PoolGrant {
  apiVersion: 'poolkeeper.dev/v1alpha1';
  kind: 'PoolGrant';
  metadata: V1ObjectMeta;
  spec: PoolGrantSpec;
}
