/**
 * The CustomResourceDefinitions, built from the schemas in this directory.
 * scripts/gen-crds.ts writes them to crds/*.yaml; a unit test fails when the
 * committed files differ from what this module renders.
 */
import { stringify } from 'yaml';
import { API_GROUP, API_VERSION } from './group.ts';
import { databaseConnectionSchema } from './databaseconnection.ts';
import { databaseServerSchema } from './databaseserver.ts';
import { poolMemberSchema } from './poolmember.ts';
import { poolGrantSchema } from './poolgrant.ts';

/** A printer column of `kubectl get`. */
export interface PrinterColumn {
  name: string;
  type: 'integer' | 'number' | 'string' | 'boolean' | 'date';
  jsonPath: string;
  description?: string;
  priority?: number;
}

/** What differs between poolkeeper's CRDs. */
export interface CrdDefinition {
  kind: string;
  plural: string;
  singular: string;
  shortNames: string[];
  schema: object;
  printerColumns: PrinterColumn[];
  /** Namespaced unless said otherwise. */
  scope?: 'Namespaced' | 'Cluster';
}

/** DatabaseConnection: `kubectl get dbc` shows limit, pods, per-pod budget, allocated, Ready, age; `-o wide` adds the Ready reason. */
export const databaseConnectionCrdDefinition: CrdDefinition = {
  kind: 'DatabaseConnection',
  plural: 'databaseconnections',
  singular: 'databaseconnection',
  shortNames: ['dbc'],
  schema: databaseConnectionSchema,
  printerColumns: [
    { name: 'Limit', type: 'integer', jsonPath: '.status.limit.effective', description: 'Effective limit of the server (after reserve), shared by all DatabaseConnections on it' },
    { name: 'Pods', type: 'integer', jsonPath: '.status.pods' },
    { name: 'Per-Pod', type: 'string', jsonPath: '.status.perPodBudget', description: 'Per-pod budget by consumer' },
    { name: 'Allocated', type: 'integer', jsonPath: '.status.allocated' },
    { name: 'Ready', type: 'string', jsonPath: '.status.conditions[?(@.type=="Ready")].status', description: 'False whenever the connection cannot serve its pods' },
    { name: 'Reason', type: 'string', jsonPath: '.status.conditions[?(@.type=="Ready")].reason', description: 'Why it is (not) Ready; kubectl describe shows the message', priority: 1 },
    { name: 'Age', type: 'date', jsonPath: '.metadata.creationTimestamp' },
  ],
};

/** DatabaseServer: `kubectl get dbs` shows address, limit, allocated, connections, Ready, age. */
export const databaseServerCrdDefinition: CrdDefinition = {
  kind: 'DatabaseServer',
  plural: 'databaseservers',
  singular: 'databaseserver',
  shortNames: ['dbs'],
  scope: 'Cluster',
  schema: databaseServerSchema,
  printerColumns: [
    { name: 'Host', type: 'string', jsonPath: '.spec.address.host' },
    { name: 'Port', type: 'integer', jsonPath: '.spec.address.port' },
    { name: 'Limit', type: 'integer', jsonPath: '.status.limit.effective', description: 'Effective limit (after reserve), divided among the namespaces' },
    { name: 'Allocated', type: 'integer', jsonPath: '.status.allocated' },
    { name: 'Connections', type: 'integer', jsonPath: '.status.connections', description: 'DatabaseConnections budgeted inside this server' },
    { name: 'Ready', type: 'string', jsonPath: '.status.conditions[?(@.type=="Ready")].status' },
    { name: 'Age', type: 'date', jsonPath: '.metadata.creationTimestamp' },
  ],
};

/** PoolMember: `kubectl get pm` shows acknowledged, held, waiting, whether the sidecar reaches the database, age. */
export const poolMemberCrdDefinition: CrdDefinition = {
  kind: 'PoolMember',
  plural: 'poolmembers',
  singular: 'poolmember',
  shortNames: ['pm'],
  schema: poolMemberSchema,
  printerColumns: [
    // The grant a live sidecar applies (from its PoolGrant table, or spec.grant) is what it acknowledges:
    // spec.grant alone would show a table-fed pod's grant from the day it switched.
    { name: 'Acknowledged', type: 'integer', jsonPath: '.status.acknowledgedConnections', description: 'Connections the sidecar applies as its grant (from the PoolGrant table once TABLE-FROM is set, else spec.grant)' },
    { name: 'Held', type: 'integer', jsonPath: '.status.heldConnections', description: 'Backends the sidecar holds now' },
    { name: 'Waiting', type: 'integer', jsonPath: '.status.waitingClients', description: 'Clients waiting for a server connection at the sidecar\'s last status write (heartbeat)' },
    { name: 'Reachable', type: 'string', jsonPath: '.status.conditions[?(@.type=="DatabaseReachable")].status', description: 'Whether the sidecar can reach and log in to the database (empty before its first login)' },
    { name: 'Grant', type: 'integer', jsonPath: '.spec.grant.connections', priority: 1, description: 'spec.grant: the grant of a sidecar not on the grant table; for one on it, its value when it switched' },
    { name: 'Table-From', type: 'integer', jsonPath: '.spec.tableFrom', priority: 1, description: 'PoolGrant generation from which this pod takes its grant from the table' },
    { name: 'Age', type: 'date', jsonPath: '.metadata.creationTimestamp' },
  ],
};

/** PoolGrant: `kubectl get pg` shows generation, per-pod default, age. */
export const poolGrantCrdDefinition: CrdDefinition = {
  kind: 'PoolGrant',
  plural: 'poolgrants',
  singular: 'poolgrant',
  shortNames: ['pg'],
  schema: poolGrantSchema,
  printerColumns: [
    { name: 'Generation', type: 'integer', jsonPath: '.spec.generation' },
    { name: 'Per-Pod', type: 'integer', jsonPath: '.spec.perPod', description: 'Grant of every pod not listed in exceptions' },
    { name: 'Age', type: 'date', jsonPath: '.metadata.creationTimestamp' },
  ],
};

/**
 * The schema as Kubernetes wants it. `additionalProperties: false` exists only
 * for exact TypeScript types: structural schemas forbid it next to `properties`
 * and unknown fields are pruned anyway.
 */
export function toStructuralSchema(schema: unknown): unknown {
  if (Array.isArray(schema)) return schema.map(toStructuralSchema);
  if (schema === null || typeof schema !== 'object') return schema;
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(schema)) {
    if (key === 'additionalProperties' && value === false) continue;
    // Enum values, defaults and CEL rules are data, not schemas.
    out[key] = key === 'enum' || key === 'default' || key === 'x-kubernetes-validations' ? value : toStructuralSchema(value);
  }
  return out;
}

/** The CustomResourceDefinition object of one definition. */
export function customResourceDefinition(definition: CrdDefinition): Record<string, unknown> {
  return {
    apiVersion: 'apiextensions.k8s.io/v1',
    kind: 'CustomResourceDefinition',
    metadata: { name: `${definition.plural}.${API_GROUP}` },
    spec: {
      group: API_GROUP,
      scope: definition.scope ?? 'Namespaced',
      names: {
        kind: definition.kind,
        listKind: `${definition.kind}List`,
        plural: definition.plural,
        singular: definition.singular,
        shortNames: definition.shortNames,
        categories: ['poolkeeper'],
      },
      versions: [{
        name: API_VERSION,
        served: true,
        storage: true,
        schema: { openAPIV3Schema: toStructuralSchema(definition.schema) },
        subresources: { status: {} },
        additionalPrinterColumns: definition.printerColumns,
      }],
    },
  };
}

/** The generated files: path relative to the repository root, and content. */
export function renderCrdFiles(): { path: string; content: string }[] {
  const header = '# Generated by scripts/gen-crds.ts from src/api/. Do not edit.\n';
  return [
    { path: 'crds/databaseconnection.yaml', content: header + stringify(customResourceDefinition(databaseConnectionCrdDefinition), { lineWidth: 0 }) },
    { path: 'crds/databaseserver.yaml', content: header + stringify(customResourceDefinition(databaseServerCrdDefinition), { lineWidth: 0 }) },
    { path: 'crds/poolgrant.yaml', content: header + stringify(customResourceDefinition(poolGrantCrdDefinition), { lineWidth: 0 }) },
    { path: 'crds/poolmember.yaml', content: header + stringify(customResourceDefinition(poolMemberCrdDefinition), { lineWidth: 0 }) },
  ];
}
