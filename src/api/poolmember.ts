/**
 * PoolMember (poolkeeper.dev/v1alpha1): one per pod, the channel between the
 * controller (writes spec: the grant) and the pod's sidecar (writes status: its
 * acknowledgement). See docs/protocol.md. Single source of truth for
 * crds/poolmember.yaml and the TypeScript types.
 */
import type { FromSchema } from 'json-schema-to-ts';
import type { V1ObjectMeta } from '@kubernetes/client-node';
import { conditionsSchema, resourceSchema } from './common.ts';
import { HOST_KEY_PATTERN, POOL_MODES, SSL_MODES } from './databaseconnection.ts';
import { CHANNEL_BINDING_MODES } from '../core/protocol/channel-binding.ts';

const portSchema = { type: 'integer', minimum: 1, maximum: 65535 } as const;
const credentialsGenerationSchema = { type: 'string', maxLength: 64, pattern: '^[0-9a-f]*$' } as const;

/** What the controller allows the pod: `connections` server connections, versioned by `generation`. */
export const grantSchema = {
  type: 'object',
  required: ['connections', 'generation'],
  additionalProperties: false,
  properties: {
    connections: { type: 'integer', minimum: 0, description: 'Server connections this pod may hold from now on.' },
    generation: { type: 'integer', format: 'int64', minimum: 0, description: 'Increases with every change of connections.' },
  },
} as const;

/** PoolMember spec, written by the controller only. */
export const poolMemberSpecSchema = {
  type: 'object',
  required: ['connection', 'grant', 'processesPerPod', 'database', 'pool'],
  additionalProperties: false,
  properties: {
    connection: { type: 'string', minLength: 1, maxLength: 253, description: 'Name of the DatabaseConnection in this namespace.' },
    grant: { ...grantSchema, description: 'What the controller allows the pod.' },
    processesPerPod: { type: 'integer', minimum: 1, default: 1, description: 'Processes of the pod sharing its grant.' },
    credentialsGeneration: { ...credentialsGenerationSchema, description: 'Hash of the credentials the controller last read from the Secret; the sidecar renews its pool when its own differ.' },
    database: {
      type: 'object',
      description: 'Where the sidecar connects (from the DatabaseConnection).',
      required: ['host', 'port', 'dbname', 'sslMode'],
      additionalProperties: false,
      properties: {
        host: { type: 'string', minLength: 1, maxLength: 253, description: 'Host name or IP address of the server.' },
        port: { ...portSchema, description: 'TCP port of the server.' },
        dbname: { type: 'string', minLength: 1, maxLength: 63, description: 'Database name.' },
        sslMode: { type: 'string', enum: SSL_MODES, description: 'libpq sslmode.' },
        channelBinding: { type: 'string', enum: CHANNEL_BINDING_MODES, description: 'libpq channel_binding (absent: prefer).' },
      },
    },
    sshTunnel: {
      type: 'object',
      description: 'The SSH bastion to tunnel through, if any.',
      required: ['host', 'port', 'user', 'hostKey'],
      additionalProperties: false,
      properties: {
        host: { type: 'string', minLength: 1, maxLength: 253, description: 'Host name or IP address of the bastion.' },
        port: { ...portSchema, description: 'SSH port of the bastion.' },
        user: { type: 'string', minLength: 1, maxLength: 64, description: 'SSH user.' },
        hostKey: { type: 'string', maxLength: 8192, pattern: HOST_KEY_PATTERN, description: 'The pinned host key or its SHA256 fingerprint.' },
      },
    },
    pool: {
      type: 'object',
      description: 'Pool settings (from the DatabaseConnection).',
      required: ['mode', 'poolTimeout', 'poolRecycle', 'poolPrePing', 'idleTimeout'],
      additionalProperties: false,
      properties: {
        mode: { type: 'string', enum: POOL_MODES, description: 'transaction or session.' },
        poolTimeout: { type: 'integer', minimum: 1, description: 'Seconds a client waits for a server connection.' },
        poolRecycle: { type: 'integer', minimum: -1, description: 'Seconds a server connection lives; -1 never.' },
        poolPrePing: { type: 'boolean', description: 'Check an idle connection before use.' },
        idleTimeout: { type: 'integer', minimum: 1, description: 'Seconds an idle server connection is kept.' },
      },
    },
    drain: { type: 'boolean', default: false, description: 'true: the controller asks the sidecar to give everything back.' },
    acknowledgementKey: { type: 'string', minLength: 32, maxLength: 64, pattern: '^[A-Za-z0-9_-]+$', description: 'Set with tableFrom: the key this pod\'s sidecar signs its acknowledgements with (HMAC-SHA256) when it sends them to the leading controller directly (PoolGrant acknowledgeTo). Readable by whoever may read this PoolMember, who may also write its status.' },
    tableFrom: { type: 'integer', format: 'int64', minimum: 1, description: 'Set once the sidecar reads grant tables: from this PoolGrant generation on, the pod\'s grant is derived from the PoolGrant named connection; grant (and drain) hold until then.' },
  },
} as const;

/** PoolMember status, written by the pod's sidecar only. */
export const poolMemberStatusSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    acknowledgedGeneration: { type: 'integer', format: 'int64', minimum: 0, description: 'The grant.generation whose limit the sidecar now holds.' },
    acknowledgedConnections: { type: 'integer', minimum: 0, description: 'spec.grant.connections of that generation.' },
    heldConnections: { type: 'integer', minimum: 0, description: 'Server connections open right now.' },
    credentialsGeneration: { ...credentialsGenerationSchema, description: 'Hash of the credentials the sidecar logs in with.' },
    draining: { type: 'boolean', description: 'The sidecar is giving its connections back.' },
    drained: { type: 'boolean', description: 'Holds 0 server connections and will open none.' },
    heartbeatTime: { type: 'string', format: 'date-time', description: 'When the sidecar last wrote this status; a stale one counts as unresponsive.' },
    sidecarVersion: { type: 'string', maxLength: 64, description: 'Version of the sidecar.' },
    waitingClients: { type: 'integer', minimum: 0, description: 'Clients waiting for a server connection when this status was written (heartbeats included; a change of it alone writes nothing).' },
    tableGeneration: { type: 'integer', format: 'int64', minimum: 0, description: 'Written only by sidecars that read grant tables: the PoolGrant generation acknowledgedConnections was derived from (0 before any).' },
    conditions: { ...conditionsSchema, description: 'DatabaseReachable: whether this sidecar can reach and log in to the database (True after a login that succeeded; False after one that failed while the sidecar held no live server connection, with the cause in reason and message; absent before its first login). Written when it changes, not with every heartbeat.' },
  },
} as const;

/** The PoolMember condition a sidecar reports whether it can reach and log in to its database with. */
export const DATABASE_REACHABLE = 'DatabaseReachable';

/** The CRD's openAPIV3Schema. */
export const poolMemberSchema = resourceSchema(poolMemberSpecSchema, poolMemberStatusSchema, {
  root: 'PoolMember: one per opted-in pod, owned by it; the controller writes its connection grant, the pod\'s sidecar acknowledges it (docs/protocol.md).',
  spec: 'Written by the controller: the grant and the settings of the pod\'s sidecar.',
  status: 'Written by the pod\'s sidecar: what it acknowledged and holds.',
});

/** PoolMember spec as read from the API server (defaults filled in). */
export type PoolMemberSpec = FromSchema<typeof poolMemberSpecSchema>;

/** PoolMember spec as written (defaulted fields optional). */
export type PoolMemberSpecInput = FromSchema<typeof poolMemberSpecSchema, { keepDefaultedPropertiesOptional: true }>;

/** PoolMember status. */
export type PoolMemberStatus = FromSchema<typeof poolMemberStatusSchema>;

/** A grant: connections and its generation. */
export type Grant = FromSchema<typeof grantSchema>;

/** A PoolMember object. */
export interface PoolMember {
  apiVersion: 'poolkeeper.dev/v1alpha1';
  kind: 'PoolMember';
  metadata: V1ObjectMeta;
  spec: PoolMemberSpec;
  status?: PoolMemberStatus;
}

/** The UID of the pod a PoolMember belongs to (its owner), or '' if it names none. */
export function memberPodUid(member: Pick<PoolMember, 'metadata'>): string {
  const owners = member.metadata.ownerReferences;
  if (owners === undefined) return '';
  // Called for every PoolMember several times a pass: a plain loop, no closure.
  for (let i = 0; i < owners.length; i += 1) if (owners[i]!.kind === 'Pod') return owners[i]!.uid;
  return '';
}
