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
    type: { type: 'string', description: 'Type of the condition, e.g. Ready.', maxLength: 316, pattern: '^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$' },
    status: { type: 'string', enum: ['True', 'False', 'Unknown'], description: 'True, False or Unknown.' },
    observedGeneration: { type: 'integer', format: 'int64', minimum: 0, description: 'The metadata.generation the condition was computed from.' },
    lastTransitionTime: { type: 'string', format: 'date-time', description: 'When the status last changed.' },
    reason: { type: 'string', description: 'Why, in CamelCase, for machines.', minLength: 1, maxLength: 1024, pattern: '^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$' },
    message: { type: 'string', maxLength: 32768, description: 'Why, for humans, with the numbers and names involved.' },
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
export function resourceSchema(spec: object, status: object, descriptions: { root: string; spec: string; status: string }): Record<string, unknown> {
  return {
    type: 'object',
    description: descriptions.root,
    required: ['spec'],
    properties: {
      apiVersion: { type: 'string', description: 'Versioned schema of this object: poolkeeper.dev/v1alpha1.' },
      kind: { type: 'string', description: 'Kind of this object.' },
      // The API server allows nothing but the type here (kubectl explain documents metadata itself).
      metadata: { type: 'object' },
      spec: { ...spec, description: descriptions.spec },
      status: { ...status, description: descriptions.status },
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
    matchLabels: { type: 'object', additionalProperties: { type: 'string' }, description: 'Labels a pod must all carry, with these values.' },
    matchExpressions: {
      type: 'array',
      description: 'Label requirements a pod must all meet.',
      maxItems: 32,
      items: {
        type: 'object',
        required: ['key', 'operator'],
        additionalProperties: false,
        properties: {
          key: { type: 'string', minLength: 1, maxLength: 317, description: 'The label key.' },
          operator: { type: 'string', enum: ['In', 'NotIn', 'Exists', 'DoesNotExist'], description: 'In, NotIn, Exists or DoesNotExist.' },
          values: { type: 'array', maxItems: 64, items: { type: 'string', maxLength: 63 }, description: 'Values for In and NotIn; empty for Exists and DoesNotExist.' },
        },
      },
    },
  },
} as const;

/** A label selector. */
export type LabelSelector = FromSchema<typeof labelSelectorSchema>;
