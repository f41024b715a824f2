/**
 * DatabaseServer (poolkeeper.dev/v1alpha1, cluster-scoped): one PostgreSQL
 * server as the platform team owns it: its addresses, its limit and how much
 * each namespace may draw. DatabaseConnections refer to it with
 * `spec.serverRef`; a value in one namespace can then never change what
 * another namespace gets. docs/tenancy.md explains the rules.
 */
import type { FromSchema } from 'json-schema-to-ts';
import type { V1ObjectMeta } from '@kubernetes/client-node';
import { conditionsSchema, labelSelectorSchema, resourceSchema } from './common.ts';
import { RESERVE_PERCENT_PATTERN } from './databaseconnection.ts';

const portSchema = { type: 'integer', minimum: 1, maximum: 65535 } as const;
const namespaceNamePattern = '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$';

/** What unlisted namespaces may do. */
export const DEFAULT_ALLOCATIONS = ['None', 'Shared'] as const;

/** One address of the server. */
export const serverAddressSchema = {
  type: 'object',
  required: ['host'],
  additionalProperties: false,
  'x-kubernetes-validations': [
    { rule: '!self.host.contains(\'://\') && !self.host.contains(\'@\')', message: 'must be a host name or IP address, not a URL (no "://" or "@")', fieldPath: '.host' },
  ],
  properties: {
    host: { type: 'string', minLength: 1, maxLength: 253, description: 'Host name or IP address, as DatabaseConnections write it in spec.database.host.' },
    port: { ...portSchema, default: 5432, description: 'TCP port.' },
  },
} as const;

/** How much the namespaces it selects may draw. */
export const allocationSchema = {
  type: 'object',
  additionalProperties: false,
  'x-kubernetes-validations': [
    { rule: 'has(self.namespaces) != has(self.namespaceSelector)', message: 'exactly one of namespaces or namespaceSelector must be set' },
    { rule: '!has(self.max) || self.max >= (has(self.guaranteed) ? self.guaranteed : 0)', message: 'max must be >= guaranteed', fieldPath: '.max' },
  ],
  properties: {
    namespaces: {
      type: 'array', minItems: 1, maxItems: 256,
      items: { type: 'string', minLength: 1, maxLength: 63, pattern: namespaceNamePattern },
      description: 'Namespaces by name (set this or namespaceSelector).',
    },
    namespaceSelector: { ...labelSelectorSchema, description: 'Namespaces by label (set this or namespaces).' },
    guaranteed: { type: 'integer', minimum: 0, maximum: 100000, default: 0, description: 'Connections each selected namespace gets before anything is shared (less if its pods need less).' },
    max: { type: 'integer', minimum: 0, maximum: 100000, description: 'At most this many connections for each selected namespace; absent: no cap but the limit.' },
  },
} as const;

/** DatabaseServer spec. */
export const databaseServerSpecSchema = {
  type: 'object',
  required: ['address'],
  additionalProperties: false,
  properties: {
    address: { ...serverAddressSchema, description: 'The server\'s address.' },
    aliases: {
      type: 'array', maxItems: 32,
      items: { ...serverAddressSchema, description: 'Another address of the same server.' },
      description: 'Other addresses of the same server (an IP, a DNS alias, a pooler in front of it). A DatabaseConnection using any of them is budgeted inside this DatabaseServer.',
    },
    maxConnections: {
      'x-kubernetes-int-or-string': true,
      anyOf: [{ type: 'integer' }, { type: 'string' }],
      default: 'auto',
      description: 'The server\'s limit: an integer >= 1, or "auto" for SHOW max_connections minus reserved slots (read with the DatabaseConnections\' own logins). Never budgeted above what the server reports.',
      'x-kubernetes-validations': [{ rule: 'type(self) == int ? self >= 1 : self == \'auto\'', message: 'maxConnections must be an integer >= 1 or "auto"' }],
    },
    reserve: {
      'x-kubernetes-int-or-string': true,
      anyOf: [{ type: 'integer' }, { type: 'string' }],
      default: '15%',
      description: 'Connections kept free for admin, replication and migrations: an integer >= 0, or a percent "0%".."90%".',
      'x-kubernetes-validations': [{ rule: `type(self) == int ? self >= 0 : self.matches('${RESERVE_PERCENT_PATTERN}')`, message: 'reserve must be an integer >= 0 or a percent from "0%" to "90%"' }],
    },
    allocations: {
      type: 'array', maxItems: 64,
      items: { ...allocationSchema, description: 'Namespaces and what each may draw.' },
      description: 'Which namespaces may draw and how much; the first entry that selects a namespace applies.',
    },
    defaultAllocation: {
      type: 'string', enum: DEFAULT_ALLOCATIONS, default: 'Shared',
      description: 'Namespaces no allocation selects: Shared, they share what the allocations leave; None, they may not draw (their DatabaseConnections are not Ready, reason NotAllowed).',
    },
  },
} as const;

/** DatabaseServer status, written by the controller. */
export const databaseServerStatusSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    observedGeneration: { type: 'integer', format: 'int64', minimum: 0, description: 'The metadata.generation this status was computed from.' },
    conditions: { ...conditionsSchema, description: 'Ready (the limit is known), Overcommitted (guarantees add up to more than the limit), AddressConflict.' },
    limit: {
      type: 'object',
      description: 'The server\'s limit.',
      additionalProperties: false,
      properties: {
        discovered: { type: 'integer', minimum: 0, description: 'maxConnections, or what "auto" read (capped at what the server allows).' },
        reserve: { type: 'integer', minimum: 0, description: 'Connections kept free.' },
        effective: { type: 'integer', minimum: 0, description: 'The limit divided among the namespaces.' },
      },
    },
    allocated: { type: 'integer', minimum: 0, description: 'Sum over every pod drawing on the server of max(granted, acknowledged, held).' },
    connections: { type: 'integer', minimum: 0, description: 'DatabaseConnections budgeted inside this server.' },
    namespaces: {
      type: 'array', maxItems: 1024,
      'x-kubernetes-list-type': 'map',
      'x-kubernetes-list-map-keys': ['namespace'],
      description: 'What each namespace drawing on the server gets.',
      items: {
        type: 'object',
        description: 'One namespace\'s share.',
        required: ['namespace', 'share', 'allocated', 'pods'],
        additionalProperties: false,
        properties: {
          namespace: { type: 'string', description: 'The namespace.' },
          share: { type: 'integer', minimum: 0, description: 'Connections its pods are budgeted from.' },
          allocated: { type: 'integer', minimum: 0, description: 'Connections its pods may hold now.' },
          pods: { type: 'integer', minimum: 0, description: 'Its live pods drawing on the server.' },
          allocation: { type: 'string', maxLength: 256, description: 'Which allocation applies, e.g. "namespaces[0]" or "default (Shared)".' },
        },
      },
    },
  },
} as const;

/** The CRD's openAPIV3Schema. */
export const databaseServerSchema = resourceSchema(databaseServerSpecSchema, databaseServerStatusSchema, {
  root: 'DatabaseServer: a PostgreSQL server owned by the platform team: its addresses, its connection limit and how much each namespace may draw. DatabaseConnections refer to it with spec.serverRef.',
  spec: 'The server\'s addresses, its limit and the namespaces\' allocations.',
  status: 'Written by the controller: the limit, each namespace\'s share and conditions.',
});

/** DatabaseServer spec as read from the API server (defaults filled in). */
export type DatabaseServerSpec = FromSchema<typeof databaseServerSpecSchema>;

/** DatabaseServer status. */
export type DatabaseServerStatus = FromSchema<typeof databaseServerStatusSchema>;

/** One allocation entry. */
export type Allocation = NonNullable<DatabaseServerSpec['allocations']>[number];

/** A DatabaseServer object. */
export interface DatabaseServer {
  apiVersion: 'poolkeeper.dev/v1alpha1';
  kind: 'DatabaseServer';
  metadata: V1ObjectMeta;
  spec: DatabaseServerSpec;
  status?: DatabaseServerStatus;
}
