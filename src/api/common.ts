/**
 * Schema pieces shared by both CRDs: Kubernetes conditions and label selectors,
 * written as Kubernetes' own (metav1) schemas.
 */
import type { FromSchema } from 'json-schema-to-ts';

/** metav1.Condition. */
export const conditionSchema = {
  type: 'object',
  description: 'One aspect of the current state (metav1.Condition).',
  required: ['type', 'status', 'reason', 'message', 'lastTransitionTime'],
  additionalProperties: false,
  properties: {
    type: { type: 'string', maxLength: 316, pattern: '^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$' },
    status: { type: 'string', enum: ['True', 'False', 'Unknown'] },
    observedGeneration: { type: 'integer', format: 'int64', minimum: 0 },
    lastTransitionTime: { type: 'string', format: 'date-time' },
    reason: { type: 'string', minLength: 1, maxLength: 1024, pattern: '^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$' },
    message: { type: 'string', maxLength: 32768 },
  },
} as const;

/** A Kubernetes condition as stored in a status. */
export type Condition = FromSchema<typeof conditionSchema>;

/** The list of conditions in a status, keyed by type. */
export const conditionsSchema = {
  type: 'array',
  maxItems: 16,
  'x-kubernetes-list-type': 'map',
  'x-kubernetes-list-map-keys': ['type'],
  items: conditionSchema,
} as const;

/** The openAPIV3Schema of a custom resource with a required spec and a status. */
export function resourceSchema(spec: object, status: object): Record<string, unknown> {
  return {
    type: 'object',
    required: ['spec'],
    properties: {
      apiVersion: { type: 'string' },
      kind: { type: 'string' },
      metadata: { type: 'object' },
      spec,
      status,
    },
  };
}

/** metav1.LabelSelector. */
export const labelSelectorSchema = {
  type: 'object',
  description: 'Selects pods by label (metav1.LabelSelector).',
  additionalProperties: false,
  'x-kubernetes-map-type': 'atomic',
  properties: {
    matchLabels: { type: 'object', additionalProperties: { type: 'string' } },
    matchExpressions: {
      type: 'array',
      maxItems: 32,
      items: {
        type: 'object',
        required: ['key', 'operator'],
        additionalProperties: false,
        properties: {
          key: { type: 'string', minLength: 1, maxLength: 317 },
          operator: { type: 'string', enum: ['In', 'NotIn', 'Exists', 'DoesNotExist'] },
          values: { type: 'array', maxItems: 64, items: { type: 'string', maxLength: 63 } },
        },
      },
    },
  },
} as const;

/** A label selector. */
export type LabelSelector = FromSchema<typeof labelSelectorSchema>;
