/**
 * DatabaseConnection (poolkeeper.dev/v1alpha1): one PostgreSQL server, the
 * workloads that draw on it and how its connection limit is shared. The
 * schema below is the single source of truth: crds/databaseconnection.yaml is
 * generated from it (scripts/gen-crds.ts) and the TypeScript types are inferred
 * from it. Field names are fixed by docs/api.md.
 */
import type { FromSchema } from 'json-schema-to-ts';
import type { V1ObjectMeta } from '@kubernetes/client-node';
import { conditionsSchema, labelSelectorSchema, resourceSchema } from './common.ts';
import { CHANNEL_BINDING_MODES } from '../core/protocol/channel-binding.ts';

const portSchema = { type: 'integer', minimum: 1, maximum: 65535 } as const;
const dnsLabelPattern = '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$';
const secretNameSchema = { type: 'string', minLength: 1, maxLength: 253, pattern: '^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$' } as const;
const secretKeySchema = { type: 'string', minLength: 1, maxLength: 253, pattern: '^[-._a-zA-Z0-9]+$' } as const;

/** A known_hosts key (optionally with the host field in front) or an OpenSSH SHA256 fingerprint. */
export const HOST_KEY_PATTERN = '^(([^ ]+ )?(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh[.]com|sk-ecdsa-sha2-nistp256@openssh[.]com) AAAA[A-Za-z0-9+/]+={0,3}( .*)?|SHA256:[A-Za-z0-9+/]{43}=?)$';

/**
 * CEL rules refusing a URL (and so any `user:password@` in it) where a host
 * or name belongs; the API server names the field, and CEL errors do not echo
 * the value back.
 */
function notAUrl(field: string): Array<{ rule: string; message: string; fieldPath: string }> {
  // On the parent object with a fieldPath: the API server then names the field but
  // does not echo its value (which may hold a password) in the refusal.
  return [
    { rule: `!has(self.${field}) || !self.${field}.contains('://')`, message: 'must be a host name or IP address, not a URL: put the user name and password in the Secret named by credentialsSecretRef', fieldPath: `.${field}` },
    { rule: `!has(self.${field}) || !self.${field}.contains('@')`, message: 'must not contain "@": credentials belong in the Secret named by credentialsSecretRef, not in the address', fieldPath: `.${field}` },
  ];
}

/** maxConnections when a DatabaseConnection (without serverRef) leaves it out. */
export const DEFAULT_MAX_CONNECTIONS = 'auto';

/** reserve when a DatabaseConnection (without serverRef) leaves it out. */
export const DEFAULT_RESERVE = '15%';

/** Percent form of `reserve`: "0%".."90%". */
export const RESERVE_PERCENT_PATTERN = '^([0-9]|[1-8][0-9]|90)%$';

/** TLS modes of libpq's sslmode. */
export const SSL_MODES = ['disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full'] as const;

/** Budget strategies: follow live pods, or reserve for the HPA's maxReplicas. */
export const BUDGET_STRATEGIES = ['Dynamic', 'MaxReplicas'] as const;

/** Pooling modes of the sidecar. */
export const POOL_MODES = ['transaction', 'session'] as const;

/** How the sidecar answers an app that asks for TLS (spec.sidecar.clientTLS). */
export const CLIENT_TLS_MODES = ['Disabled', 'SelfSigned'] as const;

/** Where and how to reach the database. */
export const databaseSchema = {
  type: 'object',
  required: ['host', 'dbname', 'credentialsSecretRef'],
  'x-kubernetes-validations': [
    ...notAUrl('host'), ...notAUrl('dbname'),
    {
      rule: "!has(self.channelBinding) || self.channelBinding != 'require' || !has(self.sslMode) || !(self.sslMode in ['disable', 'allow'])",
      message: 'channelBinding require binds the login to the TLS connection: set sslMode to prefer, require, verify-ca or verify-full',
      fieldPath: '.channelBinding',
    },
  ],
  additionalProperties: false,
  properties: {
    host: {
      type: 'string', minLength: 1, maxLength: 253,
      description: 'Host name or IP address of the PostgreSQL server (not a URL: the login comes from credentialsSecretRef). A name and the IP addresses it resolves to, with the same port, are one server.',
    },
    port: { ...portSchema, default: 5432, description: 'TCP port of the PostgreSQL server.' },
    dbname: { type: 'string', minLength: 1, maxLength: 63, description: 'Database the sidecar connects to; the controller logs in to it to check the credentials.' },
    sslMode: { type: 'string', enum: SSL_MODES, default: 'prefer', description: 'libpq sslmode for the sidecar\'s server connections.' },
    channelBinding: {
      type: 'string', enum: CHANNEL_BINDING_MODES, default: 'prefer',
      description: 'libpq channel_binding for the sidecar\'s and the controller\'s logins: prefer binds a SCRAM login to the TLS connection (SCRAM-SHA-256-PLUS) whenever the server offers it, so a password exchange relayed by an interception that ends TLS before the server fails; require refuses any login without it (and sends no md5 or cleartext password); disable never binds.',
    },
    credentialsSecretRef: {
      type: 'object',
      description: 'A Secret in the same namespace holding the login.',
      required: ['name'],
      additionalProperties: false,
      properties: {
        name: { ...secretNameSchema, description: 'Name of the Secret.' },
        usernameKey: { ...secretKeySchema, default: 'username', description: 'Key of the Secret holding the user name.' },
        passwordKey: { ...secretKeySchema, default: 'password', description: 'Key of the Secret holding the password.' },
      },
    },
    caSecretRef: {
      type: 'object',
      description: 'A Secret in the same namespace holding the CA that signed the server\'s certificate (for sslMode verify-ca and verify-full with a private CA).',
      required: ['name'],
      additionalProperties: false,
      properties: {
        name: { ...secretNameSchema, description: 'Name of the Secret.' },
        key: { ...secretKeySchema, default: 'ca.crt', description: 'Key of the Secret holding the PEM CA certificate(s).' },
      },
    },
  },
} as const;

/** An SSH bastion the sidecar tunnels through; its host key is pinned (no trust on first use). */
export const sshTunnelSchema = {
  type: 'object',
  required: ['host', 'user', 'privateKeySecretRef', 'hostKey'],
  'x-kubernetes-validations': [...notAUrl('host'), ...notAUrl('user')],
  additionalProperties: false,
  properties: {
    host: { type: 'string', minLength: 1, maxLength: 253, description: 'Host name or IP address of the bastion.' },
    port: { ...portSchema, default: 22, description: 'SSH port of the bastion.' },
    user: { type: 'string', minLength: 1, maxLength: 64, description: 'SSH user on the bastion (TCP forwarding only is needed).' },
    privateKeySecretRef: {
      type: 'object',
      description: 'A Secret in the same namespace holding the SSH private key (OpenSSH or PEM format).',
      required: ['name'],
      additionalProperties: false,
      properties: {
        name: { ...secretNameSchema, description: 'Name of the Secret.' },
        key: { ...secretKeySchema, default: 'ssh-privatekey', description: 'Key of the Secret holding the private key.' },
      },
    },
    hostKey: {
      type: 'string',
      maxLength: 8192,
      description: 'The bastion\'s host key: a known_hosts key ("ssh-ed25519 AAAA...") or a "SHA256:..." fingerprint.',
      'x-kubernetes-validations': [{
        rule: `self.matches('${HOST_KEY_PATTERN}')`,
        message: 'hostKey must be a known_hosts key ("ssh-ed25519 AAAA...") or an OpenSSH fingerprint ("SHA256:" + 43 base64 characters)',
      }],
    },
  },
} as const;

/** A workload (or label selector) whose pods draw on the connection, and how its share is computed. */
export const consumerSchema = {
  type: 'object',
  required: ['name'],
  additionalProperties: false,
  properties: {
    name: { type: 'string', minLength: 1, maxLength: 63, pattern: dnsLabelPattern, description: 'Name of the consumer, unique in this DatabaseConnection (a DNS label).' },
    workloadRef: {
      type: 'object',
      description: 'The workload whose pods are this consumer (set this or selector). Its pod template must carry the label poolkeeper.dev/connection: <this DatabaseConnection>.',
      required: ['kind', 'name'],
      additionalProperties: false,
      properties: {
        kind: { type: 'string', enum: ['Deployment', 'StatefulSet'], description: 'Deployment or StatefulSet.' },
        name: { type: 'string', minLength: 1, maxLength: 253, description: 'Name of the workload in this namespace.' },
      },
    },
    selector: { ...labelSelectorSchema, description: 'Opted-in pods with these labels are this consumer (set this or workloadRef).' },
    weight: { type: 'integer', minimum: 1, maximum: 1000, default: 1, description: 'Relative share of each pod of this consumer.' },
    minPerPod: { type: 'integer', minimum: 0, maximum: 10000, default: 1, description: 'Connections every pod needs; more pods than the limit allows is Oversubscribed.' },
    maxPerPod: { type: 'integer', minimum: 0, maximum: 10000, description: 'Upper bound of a pod\'s budget (>= minPerPod).' },
    processesPerPod: { type: 'integer', minimum: 1, maximum: 1024, default: 1, description: 'Worker processes per pod sharing its budget (gunicorn, Celery prefork).' },
  },
  'x-kubernetes-validations': [
    { rule: 'has(self.workloadRef) != has(self.selector)', message: 'exactly one of workloadRef or selector must be set' },
    { rule: '!has(self.maxPerPod) || self.maxPerPod >= (has(self.minPerPod) ? self.minPerPod : 1)', message: 'maxPerPod must be >= minPerPod', fieldPath: '.maxPerPod' },
  ],
} as const;

/** Pool settings, named after SQLAlchemy's where they mean the same. */
export const poolSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    mode: { type: 'string', enum: POOL_MODES, default: 'transaction', description: 'transaction: a server connection per transaction; session: per client, reset with DISCARD ALL (pool_mode).' },
    poolTimeout: { type: 'integer', minimum: 1, maximum: 86400, default: 30, description: 'Seconds a client waits for a server connection (pool_timeout); > 0.' },
    poolRecycle: {
      type: 'integer', minimum: -1, maximum: 604800, default: 3600,
      description: 'Seconds a server connection lives (pool_recycle); -1 never.',
      'x-kubernetes-validations': [{ rule: 'self == -1 || self > 0', message: 'poolRecycle must be -1 (never) or > 0 seconds' }],
    },
    poolPrePing: { type: 'boolean', default: false, description: 'Check a connection that sat idle before use (pool_pre_ping).' },
    idleTimeout: { type: 'integer', minimum: 1, maximum: 604800, default: 600, description: 'Seconds an idle server connection is kept.' },
  },
} as const;

/** Settings of the injected sidecar. */
export const sidecarSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    port: { ...portSchema, default: 6432, description: '127.0.0.1 port the sidecar listens on in the pod.' },
    drainTimeout: { type: 'integer', minimum: 0, maximum: 3600, default: 30, description: 'Seconds in-flight transactions get on SIGTERM.' },
    clientTLS: {
      type: 'string', enum: CLIENT_TLS_MODES, default: 'Disabled',
      description: 'Disabled: the sidecar answers an app\'s SSLRequest "no" (loopback needs no encryption). SelfSigned: it accepts TLS with a certificate it makes at start, for apps that insist on sslmode=require (not verify-ca or verify-full).',
    },
  },
} as const;

/** DatabaseConnection spec. */
export const databaseConnectionSpecSchema = {
  type: 'object',
  required: ['database', 'consumers'],
  additionalProperties: false,
  'x-kubernetes-validations': [
    { rule: '!has(self.serverRef) || !has(self.maxConnections)', message: 'maxConnections cannot be set with serverRef: the DatabaseServer sets the server\'s limit', fieldPath: '.maxConnections' },
    { rule: '!has(self.serverRef) || !has(self.reserve)', message: 'reserve cannot be set with serverRef: the DatabaseServer sets the reserve', fieldPath: '.reserve' },
  ],
  properties: {
    database: { ...databaseSchema, description: 'Where and how to reach the PostgreSQL server.' },
    sshTunnel: { ...sshTunnelSchema, description: 'An SSH bastion the sidecar (and the controller\'s login check) tunnels through; its host key is pinned.' },
    serverRef: {
      type: 'object',
      required: ['name'],
      additionalProperties: false,
      description: 'The DatabaseServer (cluster-scoped, owned by the platform team) whose limit and allocations this connection draws on; then maxConnections and reserve are not set here. database.host must be one of its addresses.',
      properties: {
        name: { type: 'string', minLength: 1, maxLength: 253, pattern: '^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$', description: 'Name of the DatabaseServer.' },
      },
    },
    maxConnections: {
      'x-kubernetes-int-or-string': true,
      anyOf: [{ type: 'integer' }, { type: 'string' }],
      description: 'The server\'s limit: an integer >= 1, or "auto" (the default) for SHOW max_connections minus reserved slots. Either way at most the CONNECTION LIMIT of the login\'s role and database. Not with serverRef: the DatabaseServer sets it.',
      'x-kubernetes-validations': [{ rule: 'type(self) == int ? self >= 1 : self == \'auto\'', message: 'maxConnections must be an integer >= 1 or "auto"' }],
    },
    reserve: {
      'x-kubernetes-int-or-string': true,
      anyOf: [{ type: 'integer' }, { type: 'string' }],
      description: 'Connections kept free for admin, replication and migrations: an integer >= 0, or a percent "0%".."90%"; default "15%". Not with serverRef: the DatabaseServer sets it.',
      'x-kubernetes-validations': [{ rule: `type(self) == int ? self >= 0 : self.matches('${RESERVE_PERCENT_PATTERN}')`, message: 'reserve must be an integer >= 0 or a percent from "0%" to "90%"' }],
    },
    departureHoldSeconds: {
      type: 'integer', minimum: 0, maximum: 86400, default: 60,
      description: 'Seconds a pod that left without its sidecar reporting a drain (its node lost and the pod force-deleted or marked Failed, its sidecar killed mid-statement) stays counted at what it may hold: how long PostgreSQL may keep such a pod\'s connections before it notices they are dead. Set it at least to the server\'s dead-peer detection (tcp_keepalives_idle + tcp_keepalives_interval x tcp_keepalives_count, or tcp_user_timeout; docs/budget.md). 0: released at once.',
    },
    budgetStrategy: { type: 'string', enum: BUDGET_STRATEGIES, default: 'Dynamic', description: 'Dynamic: budgets follow the live pods; MaxReplicas: each pod is budgeted as if its workload ran at its HPA\'s maxReplicas, so scaling never rebalances.' },
    consumers: {
      type: 'array',
      description: 'The workloads that draw on this connection and how their shares are weighed.',
      minItems: 1,
      maxItems: 32,
      'x-kubernetes-list-type': 'map',
      'x-kubernetes-list-map-keys': ['name'],
      items: consumerSchema,
    },
    pool: { ...poolSchema, default: {}, description: 'Pool settings of the sidecar.' },
    sidecar: { ...sidecarSchema, default: {}, description: 'Settings of the injected sidecar.' },
  },
} as const;

/** DatabaseConnection status, written by the controller only. */
export const databaseConnectionStatusSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    observedGeneration: { type: 'integer', format: 'int64', minimum: 0, description: 'The metadata.generation this status was computed from.' },
    conditions: { ...conditionsSchema, description: 'Ready, Degraded, Oversubscribed, ConsumersMatched, LimitExceedsServer, LimitConflict, PoolerInFront.' },
    limit: {
      type: 'object',
      description: 'The server\'s connection limit as this DatabaseConnection sees it.',
      additionalProperties: false,
      properties: {
        discovered: { type: 'integer', minimum: 0, description: 'The server\'s limit before the reserve (maxConnections, or what "auto" read).' },
        reserve: { type: 'integer', minimum: 0, description: 'Connections kept free, from spec.reserve.' },
        effective: { type: 'integer', minimum: 0, description: 'The limit shared by all DatabaseConnections on this server.' },
        shared: { type: 'integer', minimum: 1, description: 'DatabaseConnections on the same server (host and port).' },
      },
    },
    allocated: { type: 'integer', minimum: 0, description: 'Sum over this connection\'s pods of max(granted, acknowledged).' },
    pods: { type: 'integer', minimum: 0, description: 'Live opted-in pods of this connection.' },
    perPodBudget: { type: 'string', maxLength: 1024, description: 'Per-pod budgets by consumer for printing, e.g. "web=4 worker=2".' },
    consumers: {
      type: 'array',
      description: 'Budgets by consumer.',
      maxItems: 32,
      'x-kubernetes-list-type': 'map',
      'x-kubernetes-list-map-keys': ['name'],
      items: {
        type: 'object',
        description: 'One consumer\'s pods and budgets.',
        required: ['name', 'pods', 'perPodBudget', 'perProcessBudget'],
        additionalProperties: false,
        properties: {
          name: { type: 'string', description: 'The consumer\'s name.' },
          pods: { type: 'integer', minimum: 0, description: 'Its live pods.' },
          perPodBudget: { type: 'integer', minimum: 0, description: 'Server connections each of its pods may hold.' },
          perProcessBudget: { type: 'integer', minimum: 0, description: 'perPodBudget divided among processesPerPod.' },
        },
      },
    },
    credentialsGeneration: { type: 'string', maxLength: 64, description: 'Hash of the credentials last read from the Secret (never the credentials).' },
  },
} as const;

/** The CRD's openAPIV3Schema. */
export const databaseConnectionSchema = resourceSchema(databaseConnectionSpecSchema, databaseConnectionStatusSchema, {
  root: 'DatabaseConnection: a PostgreSQL server, its credentials and the workloads whose pods share its connection limit (poolkeeper caps the fleet). Pods opt in with the label poolkeeper.dev/connection: <name>.',
  spec: 'A PostgreSQL server, its credentials, the workloads that draw on it and how its connection limit is shared among their pods.',
  status: 'Written by the controller: the limit, the budgets and conditions.',
});

/** DatabaseConnection spec as read from the API server (defaults filled in). */
export type DatabaseConnectionSpec = FromSchema<typeof databaseConnectionSpecSchema>;

/** DatabaseConnection spec as written by a user (defaulted fields optional). */
export type DatabaseConnectionSpecInput = FromSchema<typeof databaseConnectionSpecSchema, { keepDefaultedPropertiesOptional: true }>;

/** DatabaseConnection status. */
export type DatabaseConnectionStatus = FromSchema<typeof databaseConnectionStatusSchema>;

/** One consumer entry of the spec. */
export type Consumer = DatabaseConnectionSpec['consumers'][number];

/** A DatabaseConnection object. */
export interface DatabaseConnection {
  apiVersion: 'poolkeeper.dev/v1alpha1';
  kind: 'DatabaseConnection';
  metadata: V1ObjectMeta;
  spec: DatabaseConnectionSpec;
  status?: DatabaseConnectionStatus;
}
