/**
 * The data the injector works on: just enough of a Pod and of a
 * DatabaseConnection (field names from docs/api.md) to decide what to add,
 * plus the injector's settings. Kept structural so that both the generated
 * client-node types and plain JSON from an AdmissionReview fit.
 */

/** Label on a pod (template) that opts it in; its value names the DatabaseConnection. */
export const CONNECTION_LABEL = 'poolkeeper.dev/connection';
/** Annotation stamped on an injected pod; its value is the injector version. */
export const INJECTED_ANNOTATION = 'poolkeeper.dev/injected';
/**
 * Annotation `"true"` stamped on an injected pod whose sidecar reads grant
 * tables: the controller creates its PoolMember on its connection's table
 * at once (one write), rather than switching it there once the sidecar says so.
 */
export const READS_TABLES_ANNOTATION = 'poolkeeper.dev/sidecar-reads-tables';
/** Annotation naming the consumer of the DatabaseConnection the pod was matched to. */
export const CONSUMER_ANNOTATION = 'poolkeeper.dev/consumer';
/** Annotation `"false"` on a labelled pod turns injection off for that pod. */
export const INJECT_ANNOTATION = 'poolkeeper.dev/inject';
/** Name of the injected container. */
export const SIDECAR_CONTAINER_NAME = 'poolkeeper-sidecar';
/** Volume holding the database credentials (sidecar only). */
export const CREDENTIALS_VOLUME_NAME = 'poolkeeper-credentials';
/** Volume holding the SSH tunnel private key (sidecar only). */
export const SSH_KEY_VOLUME_NAME = 'poolkeeper-ssh-key';
/** Where the sidecar finds `username` and `password`. */
export const CREDENTIALS_DIR = '/var/run/poolkeeper/credentials';
/** Where the sidecar finds the SSH private key (file `ssh-privatekey`). */
export const SSH_KEY_DIR = '/var/run/poolkeeper/ssh';
/** File name of the SSH private key inside SSH_KEY_DIR. */
export const SSH_KEY_FILE = 'ssh-privatekey';

/**
 * Projected volume with a ServiceAccount token, the cluster CA and the
 * namespace, mounted in the sidecar only, where Kubernetes mounts its own:
 * added when the pod gets no token of its own (automountServiceAccountToken
 * false on the pod or its ServiceAccount), since the sidecar needs one to
 * read its PoolMember.
 */
export const API_ACCESS_VOLUME_NAME = 'poolkeeper-api-access';

/** Where Kubernetes mounts a ServiceAccount token (and where the sidecar reads it). */
export const SERVICE_ACCOUNT_TOKEN_DIR = '/var/run/secrets/kubernetes.io/serviceaccount';

/** Volume of the database server's CA (spec.database.caSecretRef), in the sidecar only. */
export const DB_CA_VOLUME_NAME = 'poolkeeper-db-ca';

/** Where the sidecar finds that CA. */
export const DB_CA_DIR = '/var/run/poolkeeper/db-ca';

/** File name of the CA in that directory. */
export const DB_CA_FILE = 'ca.crt';

/**
 * Annotation `"true"` or `"false"` on a pod: whether its containers reach the
 * sidecar over a Unix-domain socket (overrides the injector's `unixSocket`).
 */
export const UNIX_SOCKET_ANNOTATION = 'poolkeeper.dev/unix-socket';

/**
 * Annotations on a pod that set its sidecar's resources instead of the
 * injector's defaults (a namespace whose ResourceQuota requires limits.cpu,
 * or a LimitRange with other bounds, needs them).
 */
export const SIDECAR_RESOURCE_ANNOTATIONS = {
  cpuRequest: 'poolkeeper.dev/sidecar-cpu-request',
  cpuLimit: 'poolkeeper.dev/sidecar-cpu-limit',
  memoryRequest: 'poolkeeper.dev/sidecar-memory-request',
  memoryLimit: 'poolkeeper.dev/sidecar-memory-limit',
} as const;

/** Volume (an emptyDir) shared by the sidecar and the application containers, holding the sidecar's socket. */
export const SOCKET_VOLUME_NAME = 'poolkeeper-socket';

/** Where that volume is mounted in every container: PGHOST of the application containers. */
export const SOCKET_DIR = '/var/run/poolkeeper/socket';

/**
 * Volume (an emptyDir in memory) of the sidecar only, outliving its process:
 * the backends it holds are kept there, so a sidecar restarted after a
 * SIGKILL or OOM kill finds and cancels what its predecessor left.
 */
export const STATE_VOLUME_NAME = 'poolkeeper-state';

/** Where that volume is mounted in the sidecar (POOLKEEPER_STATE_DIR). */
export const STATE_DIR = '/var/run/poolkeeper/state';

/** A name/value environment variable, or one read from elsewhere. */
export interface EnvVar {
  name: string;
  value?: string;
  valueFrom?: unknown;
}

/** A declared container port. */
export interface ContainerPort {
  containerPort: number;
  name?: string;
  protocol?: string;
  hostPort?: number;
}

/** The parts of a container the injector reads. */
export interface ContainerLike {
  name: string;
  image?: string;
  env?: EnvVar[];
  envFrom?: unknown[];
  ports?: ContainerPort[];
  restartPolicy?: string;
  [key: string]: unknown;
}

/** A pod volume. */
export interface VolumeLike {
  name: string;
  [key: string]: unknown;
}

/** Owner reference of a pod. */
export interface OwnerReference {
  apiVersion?: string;
  kind: string;
  name: string;
  uid?: string;
  controller?: boolean;
}

/** The parts of a Pod the injector and the repair check read. */
export interface PodLike {
  metadata?: {
    name?: string;
    generateName?: string;
    namespace?: string;
    labels?: Record<string, string>;
    annotations?: Record<string, string>;
    ownerReferences?: OwnerReference[];
    creationTimestamp?: string | Date;
    deletionTimestamp?: string | Date;
    [key: string]: unknown;
  };
  spec?: {
    containers: ContainerLike[];
    initContainers?: ContainerLike[];
    volumes?: VolumeLike[];
    terminationGracePeriodSeconds?: number;
    hostNetwork?: boolean;
    automountServiceAccountToken?: boolean;
    [key: string]: unknown;
  };
  status?: { phase?: string; [key: string]: unknown };
}

/** A Kubernetes label selector. */
export interface LabelSelector {
  matchLabels?: Record<string, string>;
  matchExpressions?: { key: string; operator: string; values?: string[] }[];
}

/** A consumer of a DatabaseConnection (docs/api.md). */
export interface ConsumerSpec {
  name: string;
  workloadRef?: { kind: string; name: string };
  selector?: LabelSelector;
  weight?: number;
  minPerPod?: number;
  maxPerPod?: number;
  processesPerPod?: number;
}

/**
 * The fields of a DatabaseConnection the injector reads (docs/api.md). A
 * structural subset: the full type from src/api is assignable to it.
 */
export interface InjectableConnection {
  metadata?: { name?: string; namespace?: string };
  spec: {
    database: {
      host: string;
      port?: number;
      dbname: string;
      sslMode?: string;
      credentialsSecretRef: { name: string; usernameKey?: string; passwordKey?: string };
      caSecretRef?: { name: string; key?: string };
    };
    sshTunnel?: {
      host: string;
      port?: number;
      user: string;
      privateKeySecretRef: { name: string; key?: string };
      hostKey: string;
    };
    consumers: ConsumerSpec[];
    sidecar?: { port?: number; drainTimeout?: number; clientTLS?: string };
  };
  status?: {
    consumers?: { name: string; pods?: number; perPodBudget?: number; perProcessBudget?: number }[];
  };
}

/** Resource quantities as Kubernetes strings. */
export interface ResourceQuantities {
  cpu?: string;
  memory?: string;
}

/** HTTP paths of the sidecar's admin endpoint used by the probes. */
export interface ProbePaths {
  readiness: string;
  liveness: string;
  startup: string;
}

/** How the injector builds the sidecar. */
export interface InjectorSettings {
  /** Version written into the `poolkeeper.dev/injected` annotation. */
  version: string;
  sidecarImage: string;
  imagePullPolicy?: 'Always' | 'IfNotPresent' | 'Never';
  /** Port of the sidecar's admin HTTP endpoint (health, metrics, live pool size). */
  adminPort: number;
  /** Used when the DatabaseConnection does not set spec.sidecar.port. */
  defaultListenPort: number;
  /** Used when the DatabaseConnection does not set spec.sidecar.drainTimeout. */
  defaultDrainTimeoutSeconds: number;
  /** Added to the drain timeout for the pod's terminationGracePeriodSeconds. */
  terminationMarginSeconds: number;
  resources: { requests: ResourceQuantities; limits: ResourceQuantities };
  /** Kubernetes >= 1.29: the sidecar goes into initContainers with restartPolicy Always. */
  nativeSidecars: boolean;
  /**
   * UID (and GID) the sidecar runs as: the image's non-root user. Undefined:
   * none is set and the platform assigns one (OpenShift's restricted SCCs
   * assign a UID from the namespace's range and refuse any other); the
   * sidecar still must run as non-root.
   */
  runAsUser: number | undefined;
  probePaths: ProbePaths;
  /**
   * Application containers reach the sidecar over a Unix-domain socket in a
   * shared emptyDir (PGHOST is its directory) rather than loopback TCP, which
   * costs the sidecar less CPU per transaction; the TCP port stays open too.
   * A pod's `poolkeeper.dev/unix-socket` annotation overrides it. Default false.
   */
  unixSocket?: boolean;
}

/** Defaults for everything except the image and version. */
export const DEFAULT_INJECTOR_SETTINGS: Omit<InjectorSettings, 'sidecarImage' | 'version'> = {
  imagePullPolicy: 'IfNotPresent',
  adminPort: 9436,
  defaultListenPort: 6432,
  defaultDrainTimeoutSeconds: 30,
  terminationMarginSeconds: 5,
  resources: { requests: { cpu: '50m', memory: '64Mi' }, limits: { memory: '128Mi' } },
  nativeSidecars: true,
  runAsUser: 65532,
  probePaths: { readiness: '/readyz', liveness: '/healthz', startup: '/healthz' },
};

/** One RFC 6902 operation. */
export type JsonPatchOperation =
  | { op: 'add'; path: string; value: unknown }
  | { op: 'replace'; path: string; value: unknown }
  | { op: 'remove'; path: string }
  | { op: 'test'; path: string; value: unknown };

/** Why injection could not be done; codes are stable for tests and docs. */
export type InjectionErrorCode =
  | 'PortConflict'
  | 'PortNameConflict'
  | 'VolumeConflict'
  | 'InvalidConnection'
  | 'InvalidPod'
  | 'InvalidAnnotation';

/** A reason the pod cannot be injected. */
export interface InjectionError {
  code: InjectionErrorCode;
  message: string;
}

/** What the injector decided. */
export interface InjectionResult {
  /** Why nothing was done, when nothing was to be done (not an error). */
  skipped?: 'NotOptedIn' | 'OptedOut';
  /** Empty when the pod already has everything (idempotence) or on errors. */
  patch: JsonPatchOperation[];
  /** Things the user should know; the pod is still injected. */
  warnings: string[];
  /** Non-empty: no patch is produced. */
  errors: InjectionError[];
  /** The consumer the pod was matched to, if any. */
  consumer?: string;
}
