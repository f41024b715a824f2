/**
 * What to add to a Pod that opts into poolkeeper: a pure function from the
 * Pod, its DatabaseConnection and the injector's settings to a JSON Patch,
 * warnings and coded errors (all collected, none thrown).
 *
 * Convergent rather than one-shot: every piece (annotation, env var, volume,
 * sidecar, grace period) is added only when missing, so running the function
 * on its own output yields an empty patch, and a reinvocation after another
 * webhook added a container only fills in that container's env.
 */
import { poolSizeHint, resolveConsumer } from './consumer.ts';
import { jsonEqual, pointer } from './json-patch.ts';
import {
  CONNECTION_LABEL, CONSUMER_ANNOTATION, READS_TABLES_ANNOTATION, CREDENTIALS_DIR, CREDENTIALS_VOLUME_NAME, INJECTED_ANNOTATION, INJECT_ANNOTATION,
  SIDECAR_CONTAINER_NAME, SSH_KEY_DIR, SSH_KEY_FILE, SSH_KEY_VOLUME_NAME, DB_CA_DIR, DB_CA_FILE, DB_CA_VOLUME_NAME,
  API_ACCESS_VOLUME_NAME, SERVICE_ACCOUNT_TOKEN_DIR, SIDECAR_RESOURCE_ANNOTATIONS, SOCKET_DIR, SOCKET_VOLUME_NAME, STATE_DIR, STATE_VOLUME_NAME, UNIX_SOCKET_ANNOTATION,
  type ContainerLike, type EnvVar, type InjectableConnection, type InjectionError, type InjectionResult, type InjectorSettings,
  type JsonPatchOperation, type PodLike, type ResourceQuantities, type VolumeLike,
} from './model.ts';

/** Port names on the sidecar; probes refer to the admin port by name. */
export const LISTEN_PORT_NAME = 'pk-postgres';
/** Name of the sidecar's admin port. */
export const ADMIN_PORT_NAME = 'pk-admin';
/** Kubernetes' default when a pod does not set terminationGracePeriodSeconds. */
const DEFAULT_TERMINATION_GRACE_SECONDS = 30;

/**
 * Node.js options of the injected sidecar. A young generation of 2 MB
 * instead of V8's default of up to 16 MB per semi-space keeps a burst of
 * client connections from growing the sidecar's RSS by tens of MB (its
 * memory limit is 128Mi); the proxy benchmark shows no CPU cost for it.
 */
export const SIDECAR_NODE_OPTIONS = '--max-semi-space-size=2';

/**
 * The sidecar's Node.js options for a container memory limit: V8 sizes its
 * heap from the node's memory, not the container's (a 128Mi container gets a
 * heap limit above 128 MB), so garbage could pile up until the kernel kills
 * the sidecar; capping the old space at 60 % of the limit makes V8 collect
 * first. Without a parsable limit, only the young generation is bounded.
 */
export function sidecarNodeOptions(memoryLimit: string | undefined): string {
  const bytes = memoryLimit === undefined ? undefined : quantityBytes(memoryLimit);
  if (bytes === undefined) return SIDECAR_NODE_OPTIONS;
  return `${SIDECAR_NODE_OPTIONS} --max-old-space-size=${Math.max(32, Math.floor((bytes * 0.6) / (1024 * 1024)))}`;
}

const QUANTITY_SUFFIXES: Readonly<Record<string, number>> = {
  '': 1, k: 1e3, M: 1e6, G: 1e9, T: 1e12, Ki: 1024, Mi: 1024 ** 2, Gi: 1024 ** 3, Ti: 1024 ** 4,
};

/** A Kubernetes memory quantity ("128Mi", "1G", "134217728") in bytes; undefined if it is not one. */
export function quantityBytes(quantity: string): number | undefined {
  const match = /^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$/.exec(quantity.trim());
  if (!match) return undefined;
  return Number(match[1]) * QUANTITY_SUFFIXES[match[2] ?? '']!;
}

/** Input of computeInjection. */
export interface InjectionInput {
  pod: PodLike;
  connection: InjectableConnection;
  settings: InjectorSettings;
}

/** The DatabaseConnection name a pod opts into, or undefined. */
export function connectionNameOf(pod: PodLike): string | undefined {
  const name = pod.metadata?.labels?.[CONNECTION_LABEL];
  return name === undefined || name === '' ? undefined : name;
}

/** True if the pod opted in and did not opt out with `poolkeeper.dev/inject: "false"`. */
export function podWantsInjection(pod: PodLike): boolean {
  return connectionNameOf(pod) !== undefined && pod.metadata?.annotations?.[INJECT_ANNOTATION] !== 'false';
}

/** The sidecar container if the pod has one (native or plain). */
export function findSidecar(pod: PodLike): { container: ContainerLike; native: boolean } | undefined {
  const init = pod.spec?.initContainers?.find((c) => c.name === SIDECAR_CONTAINER_NAME);
  if (init) return { container: init, native: true };
  const plain = pod.spec?.containers.find((c) => c.name === SIDECAR_CONTAINER_NAME);
  return plain ? { container: plain, native: false } : undefined;
}

/** Native sidecars (initContainers with restartPolicy Always) are on by default from Kubernetes 1.29. */
export function nativeSidecarsSupported(version: { major: string | number; minor: string | number }): boolean {
  const major = Number.parseInt(String(version.major), 10);
  const minor = Number.parseInt(String(version.minor), 10); // "29+" on some distributions
  return major > 1 || (major === 1 && minor >= 29);
}

/** The kubelet versions below 1.29 among `kubeletVersions` ("v1.28.5-eks-5e0fdde"), each once, in order. */
export function kubeletsWithoutNativeSidecars(kubeletVersions: readonly string[]): string[] {
  const older = kubeletVersions.filter((v) => {
    const match = /^v?(\d+)\.(\d+)/.exec(v);
    return match !== null && !nativeSidecarsSupported({ major: match[1]!, minor: match[2]! });
  });
  return [...new Set(older)].sort();
}

function validPort(port: unknown): port is number {
  return Number.isInteger(port) && (port as number) >= 1 && (port as number) <= 65535;
}

function quantities(q: ResourceQuantities): Record<string, string> {
  const out: Record<string, string> = {};
  if (q.cpu) out.cpu = q.cpu;
  if (q.memory) out.memory = q.memory;
  return out;
}

interface Derived {
  connectionName: string;
  listenPort: number;
  drainTimeout: number;
  /** The sidecar accepts TLS from apps with a certificate of its own making. */
  clientTlsSelfSigned: boolean;
  usernameKey: string;
  passwordKey: string;
  /** Application containers use the sidecar's Unix-domain socket. */
  unixSocket: boolean;
  /** The pod gets no ServiceAccount token: the sidecar mounts one of its own. */
  apiAccess: boolean;
  /** The sidecar's resources: the injector's, with the pod's annotations over them. */
  resources: { requests: ResourceQuantities; limits: ResourceQuantities };
}

function appEnv(connection: InjectableConnection, derived: Derived, poolSize: number): EnvVar[] {
  const { dbname, credentialsSecretRef } = connection.spec.database;
  // libpq (and the drivers built on it, node-postgres, SQLAlchemy) take a directory as the host: the socket .s.PGSQL.<port> in it.
  const url = derived.unixSocket
    ? `postgresql://$(PGUSER)@/${encodeURIComponent(dbname)}?host=${SOCKET_DIR}&port=${derived.listenPort}`
    : `postgresql://$(PGUSER)@127.0.0.1:${derived.listenPort}/${encodeURIComponent(dbname)}`;
  return [
    { name: 'PGHOST', value: derived.unixSocket ? SOCKET_DIR : '127.0.0.1' },
    { name: 'PGPORT', value: String(derived.listenPort) },
    { name: 'PGDATABASE', value: dbname },
    // Only the username reaches the app; the password stays in the sidecar's volume.
    { name: 'PGUSER', valueFrom: { secretKeyRef: { name: credentialsSecretRef.name, key: derived.usernameKey } } },
    { name: 'PGSSLMODE', value: 'disable' },
    // $(PGUSER) is expanded by the kubelet from the variable defined just before.
    { name: 'DATABASE_URL', value: url },
    { name: 'POOLKEEPER_POOL_SIZE', value: String(poolSize) },
  ];
}

function sidecarVolumes(connection: InjectableConnection, derived: Derived): VolumeLike[] {
  const volumes: VolumeLike[] = [{
    name: CREDENTIALS_VOLUME_NAME,
    secret: {
      secretName: connection.spec.database.credentialsSecretRef.name,
      items: [{ key: derived.usernameKey, path: 'username' }, { key: derived.passwordKey, path: 'password' }],
      // World-readable inside the volume: only the sidecar mounts it, and it runs as a non-root UID without fsGroup.
      defaultMode: 0o444,
    },
  }];
  const tunnel = connection.spec.sshTunnel;
  if (tunnel) {
    volumes.push({
      name: SSH_KEY_VOLUME_NAME,
      secret: { secretName: tunnel.privateKeySecretRef.name, items: [{ key: tunnel.privateKeySecretRef.key ?? 'ssh-privatekey', path: SSH_KEY_FILE }], defaultMode: 0o444 },
    });
  }
  const ca = connection.spec.database.caSecretRef;
  if (ca) {
    volumes.push({ name: DB_CA_VOLUME_NAME, secret: { secretName: ca.name, items: [{ key: ca.key ?? 'ca.crt', path: DB_CA_FILE }], defaultMode: 0o444 } });
  }
  // Only this pod's containers mount it: the socket is no more reachable than the loopback port.
  if (derived.unixSocket) volumes.push({ name: SOCKET_VOLUME_NAME, emptyDir: {} });
  // As Kubernetes' own kube-api-access volume: a bound token the kubelet renews, the cluster CA, the namespace.
  if (derived.apiAccess) {
    volumes.push({
      name: API_ACCESS_VOLUME_NAME,
      projected: {
        defaultMode: 0o444,
        sources: [
          { serviceAccountToken: { expirationSeconds: 3607, path: 'token' } },
          { configMap: { name: 'kube-root-ca.crt', items: [{ key: 'ca.crt', path: 'ca.crt' }] } },
          { downwardAPI: { items: [{ path: 'namespace', fieldRef: { apiVersion: 'v1', fieldPath: 'metadata.namespace' } }] } },
        ],
      },
    });
  }
  // A few hundred bytes: the backends held, for the next sidecar process in this pod.
  volumes.push({ name: STATE_VOLUME_NAME, emptyDir: { medium: 'Memory', sizeLimit: '1Mi' } });
  return volumes;
}

function sidecarContainer(connection: InjectableConnection, settings: InjectorSettings, derived: Derived): ContainerLike {
  const fieldEnv = (name: string, fieldPath: string): EnvVar => ({ name, valueFrom: { fieldRef: { fieldPath } } });
  const env: EnvVar[] = [
    fieldEnv('POOLKEEPER_POD_NAME', 'metadata.name'),
    fieldEnv('POOLKEEPER_POD_NAMESPACE', 'metadata.namespace'),
    fieldEnv('POOLKEEPER_POD_UID', 'metadata.uid'),
    { name: 'POOLKEEPER_CONNECTION', value: derived.connectionName },
    { name: 'POOLKEEPER_LISTEN_PORT', value: String(derived.listenPort) },
    { name: 'POOLKEEPER_ADMIN_PORT', value: String(settings.adminPort) },
    { name: 'POOLKEEPER_DRAIN_TIMEOUT', value: String(derived.drainTimeout) },
    ...(derived.clientTlsSelfSigned ? [{ name: 'POOLKEEPER_CLIENT_TLS', value: 'self-signed' }] : []),
    { name: 'POOLKEEPER_CREDENTIALS_DIR', value: CREDENTIALS_DIR },
    { name: 'POOLKEEPER_STATE_DIR', value: STATE_DIR },
    { name: 'NODE_OPTIONS', value: sidecarNodeOptions(derived.resources.limits.memory) },
  ];
  const volumeMounts = [{ name: CREDENTIALS_VOLUME_NAME, mountPath: CREDENTIALS_DIR, readOnly: true }, { name: STATE_VOLUME_NAME, mountPath: STATE_DIR, readOnly: false }];
  if (connection.spec.sshTunnel) {
    env.push({ name: 'POOLKEEPER_SSH_KEY_DIR', value: SSH_KEY_DIR });
    volumeMounts.push({ name: SSH_KEY_VOLUME_NAME, mountPath: SSH_KEY_DIR, readOnly: true });
  }
  if (connection.spec.database.caSecretRef) {
    env.push({ name: 'POOLKEEPER_DB_CA_FILE', value: `${DB_CA_DIR}/${DB_CA_FILE}` });
    volumeMounts.push({ name: DB_CA_VOLUME_NAME, mountPath: DB_CA_DIR, readOnly: true });
  }
  if (derived.unixSocket) {
    env.push({ name: 'POOLKEEPER_LISTEN_SOCKET_DIR', value: SOCKET_DIR });
    volumeMounts.push({ name: SOCKET_VOLUME_NAME, mountPath: SOCKET_DIR, readOnly: false });
  }
  if (derived.apiAccess) volumeMounts.push({ name: API_ACCESS_VOLUME_NAME, mountPath: SERVICE_ACCOUNT_TOKEN_DIR, readOnly: true });
  const probe = (path: string, periodSeconds: number, failureThreshold: number): Record<string, unknown> => ({
    httpGet: { path, port: ADMIN_PORT_NAME, scheme: 'HTTP' }, periodSeconds, failureThreshold, timeoutSeconds: 2,
  });
  const resources: Record<string, Record<string, string>> = {};
  const requests = quantities(derived.resources.requests);
  const limits = quantities(derived.resources.limits);
  if (Object.keys(requests).length > 0) resources.requests = requests;
  if (Object.keys(limits).length > 0) resources.limits = limits;
  const container: ContainerLike = {
    name: SIDECAR_CONTAINER_NAME,
    image: settings.sidecarImage,
    args: ['sidecar'],
    ports: [
      { name: LISTEN_PORT_NAME, containerPort: derived.listenPort, protocol: 'TCP' },
      { name: ADMIN_PORT_NAME, containerPort: settings.adminPort, protocol: 'TCP' },
    ],
    env,
    volumeMounts,
    resources,
    securityContext: {
      runAsNonRoot: true,
      ...(settings.runAsUser === undefined ? {} : { runAsUser: settings.runAsUser, runAsGroup: settings.runAsUser }),
      readOnlyRootFilesystem: true,
      allowPrivilegeEscalation: false,
      capabilities: { drop: ['ALL'] },
      seccompProfile: { type: 'RuntimeDefault' },
    },
    // Up to a minute to start: a loaded node can be slow to schedule and page in a new container, and the app waits for it either way.
    startupProbe: probe(settings.probePaths.startup, 1, 60),
    readinessProbe: probe(settings.probePaths.readiness, 5, 3),
    livenessProbe: probe(settings.probePaths.liveness, 10, 3),
    terminationMessagePolicy: 'FallbackToLogsOnError',
  };
  if (settings.imagePullPolicy) container.imagePullPolicy = settings.imagePullPolicy;
  if (settings.nativeSidecars) container.restartPolicy = 'Always';
  return container;
}

/** Whether the pod's containers use the sidecar's Unix-domain socket: its annotation, else the injector's setting. */
export function wantsUnixSocket(pod: PodLike, settings: InjectorSettings): boolean {
  const annotation = pod.metadata?.annotations?.[UNIX_SOCKET_ANNOTATION];
  if (annotation === 'true' || annotation === 'false') return annotation === 'true';
  return settings.unixSocket === true;
}

function checkConnection(pod: PodLike, connection: InjectableConnection, settings: InjectorSettings, errors: InjectionError[]): Derived | undefined {
  const database = connection.spec?.database;
  const connectionName = connection.metadata?.name ?? '';
  if (!database?.credentialsSecretRef?.name) errors.push({ code: 'InvalidConnection', message: 'spec.database.credentialsSecretRef.name is required' });
  if (!database?.dbname) errors.push({ code: 'InvalidConnection', message: 'spec.database.dbname is required' });
  if (!Array.isArray(connection.spec?.consumers)) errors.push({ code: 'InvalidConnection', message: 'spec.consumers must be a list' });
  const tunnel = connection.spec?.sshTunnel;
  if (tunnel && !tunnel.privateKeySecretRef?.name) errors.push({ code: 'InvalidConnection', message: 'spec.sshTunnel.privateKeySecretRef.name is required with a tunnel' });
  const listenPort = connection.spec?.sidecar?.port ?? settings.defaultListenPort;
  if (!validPort(listenPort)) errors.push({ code: 'InvalidConnection', message: `spec.sidecar.port ${String(listenPort)} is not a TCP port` });
  if (!validPort(settings.adminPort)) errors.push({ code: 'InvalidConnection', message: `sidecar admin port ${String(settings.adminPort)} is not a TCP port` });
  if (listenPort === settings.adminPort) errors.push({ code: 'PortConflict', message: `spec.sidecar.port ${listenPort} is the sidecar's admin port; choose another` });
  const drainTimeout = connection.spec?.sidecar?.drainTimeout ?? settings.defaultDrainTimeoutSeconds;
  if (!Number.isInteger(drainTimeout) || drainTimeout < 0) errors.push({ code: 'InvalidConnection', message: `spec.sidecar.drainTimeout ${String(drainTimeout)} is not a whole number of seconds` });
  const clientTls = connection.spec?.sidecar?.clientTLS ?? 'Disabled';
  if (clientTls !== 'Disabled' && clientTls !== 'SelfSigned') errors.push({ code: 'InvalidConnection', message: `spec.sidecar.clientTLS ${String(clientTls)} is not Disabled or SelfSigned` });
  const resources = sidecarResources(pod, settings, errors);
  if (errors.length > 0 || !database) return undefined;
  return {
    resources,
    connectionName,
    listenPort,
    drainTimeout,
    clientTlsSelfSigned: clientTls === 'SelfSigned',
    usernameKey: database.credentialsSecretRef.usernameKey ?? 'username',
    passwordKey: database.credentialsSecretRef.passwordKey ?? 'password',
    // A sidecar injected earlier without the socket keeps serving TCP only: its pod cannot gain the volume.
    unixSocket: wantsUnixSocket(pod, settings) && (findSidecar(pod) === undefined || (pod.spec?.volumes ?? []).some((v) => v.name === SOCKET_VOLUME_NAME)),
    apiAccess: findSidecar(pod) === undefined ? !podGetsToken(pod) : (pod.spec?.volumes ?? []).some((v) => v.name === API_ACCESS_VOLUME_NAME),
  };
}

/** CPU quantities as Kubernetes writes them: cores ("1", "0.5") or millicores ("500m"). */
function cpuMillis(quantity: string): number | undefined {
  const match = /^(\d+(?:\.\d+)?)(m)?$/.exec(quantity.trim());
  if (!match) return undefined;
  return match[2] === 'm' ? Number(match[1]) : Number(match[1]) * 1000;
}

/**
 * The sidecar's resources: the injector's settings, each replaced by the
 * pod's annotation when it has one. A value that is not a quantity, or a
 * request above its limit, is an error naming the annotation, so the pod is
 * refused at admission with the reason instead of by the API server later.
 */
function sidecarResources(pod: PodLike, settings: InjectorSettings, errors: InjectionError[]): { requests: ResourceQuantities; limits: ResourceQuantities } {
  const annotations = pod.metadata?.annotations ?? {};
  const pick = (annotation: string, fallback: string | undefined, parse: (q: string) => number | undefined, kind: string): string | undefined => {
    const value = annotations[annotation];
    if (value === undefined) return fallback;
    if (parse(value) === undefined) {
      errors.push({ code: 'InvalidAnnotation', message: `annotation ${annotation}: ${JSON.stringify(value)} is not a ${kind} quantity (e.g. ${kind === 'CPU' ? '"250m" or "1"' : '"256Mi"'})` });
      return fallback;
    }
    return value.trim();
  };
  const a = SIDECAR_RESOURCE_ANNOTATIONS;
  const requests = { cpu: pick(a.cpuRequest, settings.resources.requests.cpu, cpuMillis, 'CPU'), memory: pick(a.memoryRequest, settings.resources.requests.memory, quantityBytes, 'memory') };
  const limits = { cpu: pick(a.cpuLimit, settings.resources.limits.cpu, cpuMillis, 'CPU'), memory: pick(a.memoryLimit, settings.resources.limits.memory, quantityBytes, 'memory') };
  const over = (request: string | undefined, limit: string | undefined, parse: (q: string) => number | undefined): boolean =>
    request !== undefined && limit !== undefined && (parse(request) ?? 0) > (parse(limit) ?? Infinity);
  if (over(requests.cpu, limits.cpu, cpuMillis)) errors.push({ code: 'InvalidAnnotation', message: `the sidecar's CPU request ${requests.cpu ?? ''} is above its limit ${limits.cpu ?? ''} (annotations ${a.cpuRequest}, ${a.cpuLimit})` });
  if (over(requests.memory, limits.memory, quantityBytes)) errors.push({ code: 'InvalidAnnotation', message: `the sidecar's memory request ${requests.memory ?? ''} is above its limit ${limits.memory ?? ''} (annotations ${a.memoryRequest}, ${a.memoryLimit})` });
  const defined = (q: { cpu: string | undefined; memory: string | undefined }): ResourceQuantities => ({ ...(q.cpu ? { cpu: q.cpu } : {}), ...(q.memory ? { memory: q.memory } : {}) });
  return { requests: defined(requests), limits: defined(limits) };
}

/**
 * Whether Kubernetes mounted a ServiceAccount token into the pod's
 * containers. Its ServiceAccount admission plugin runs before webhooks (and
 * again after them, adding the token to the sidecar too), so on a pod
 * without the sidecar no token mount means automountServiceAccountToken is
 * false on the pod or on its ServiceAccount.
 */
function podGetsToken(pod: PodLike): boolean {
  if (pod.spec?.automountServiceAccountToken === false) return false;
  const containers = [...(pod.spec?.initContainers ?? []), ...(pod.spec?.containers ?? [])];
  return containers.some((c) => (c.volumeMounts as { mountPath?: string }[] | undefined)?.some((m) => m.mountPath === SERVICE_ACCOUNT_TOKEN_DIR) === true);
}

/**
 * Mounts the socket volume into an application container that lacks it;
 * undefined if the container mounts something else at that path (it cannot
 * have the socket).
 */
function socketMountOps(list: 'containers' | 'initContainers', index: number, container: ContainerLike, warnings: string[]): JsonPatchOperation[] | undefined {
  const mounts = container.volumeMounts as { name: string; mountPath: string }[] | undefined;
  if (mounts?.some((m) => m.name === SOCKET_VOLUME_NAME)) return [];
  if (mounts?.some((m) => m.mountPath === SOCKET_DIR)) {
    warnings.push(`container ${container.name} mounts something else at ${SOCKET_DIR}: it reaches the sidecar over TCP (127.0.0.1)`);
    return undefined;
  }
  const value = { name: SOCKET_VOLUME_NAME, mountPath: SOCKET_DIR };
  if (!mounts) return [{ op: 'add', path: pointer('spec', list, index, 'volumeMounts'), value: [value] }];
  return [{ op: 'add', path: pointer('spec', list, index, 'volumeMounts', '-'), value }];
}

function checkPorts(pod: PodLike, settings: InjectorSettings, derived: Derived, errors: InjectionError[]): void {
  const own = new Map<number, string>([[derived.listenPort, 'listen'], [settings.adminPort, 'admin']]);
  const ownNames = new Set([LISTEN_PORT_NAME, ADMIN_PORT_NAME]);
  const others = [...(pod.spec?.initContainers ?? []), ...(pod.spec?.containers ?? [])].filter((c) => c.name !== SIDECAR_CONTAINER_NAME);
  for (const container of others) {
    for (const port of container.ports ?? []) {
      const role = own.get(port.containerPort);
      if (role !== undefined && (port.protocol ?? 'TCP') === 'TCP') {
        errors.push({ code: 'PortConflict', message: `container ${container.name} declares port ${port.containerPort}, which the sidecar needs as its ${role} port` });
      }
      if (port.name !== undefined && ownNames.has(port.name)) {
        errors.push({ code: 'PortNameConflict', message: `container ${container.name} declares a port named ${port.name}, reserved for the sidecar` });
      }
    }
  }
}

/** Adds annotation `key` unless present, creating `/metadata/annotations` when needed. */
function annotationOps(pod: PodLike, wanted: Record<string, string>): JsonPatchOperation[] {
  const existing = pod.metadata?.annotations;
  const missing = Object.entries(wanted).filter(([key]) => existing?.[key] === undefined);
  if (missing.length === 0) return [];
  if (!pod.metadata) return [{ op: 'add', path: '/metadata', value: { annotations: Object.fromEntries(missing) } }];
  if (!existing) return [{ op: 'add', path: '/metadata/annotations', value: Object.fromEntries(missing) }];
  return missing.map(([key, value]) => ({ op: 'add', path: pointer('metadata', 'annotations', key), value }));
}

function envOps(list: 'containers' | 'initContainers', index: number, container: ContainerLike, wanted: EnvVar[], reportConflicts: boolean, warnings: string[]): JsonPatchOperation[] {
  const existing = container.env;
  const toAdd: EnvVar[] = [];
  for (const variable of wanted) {
    const current = existing?.find((e) => e.name === variable.name);
    if (!current) {
      toAdd.push(variable);
    } else if (reportConflicts && !jsonEqual(current, variable)) {
      warnings.push(`container ${container.name}: kept its own ${variable.name}; poolkeeper would set ${variable.value ?? 'it from the credentials Secret'}`);
    }
  }
  if (reportConflicts && toAdd.length > 0 && (container.envFrom?.length ?? 0) > 0) {
    warnings.push(`container ${container.name} uses envFrom: poolkeeper's ${toAdd.map((e) => e.name).join(', ')} take precedence over same-named keys there`);
  }
  if (toAdd.length === 0) return [];
  if (!existing) return [{ op: 'add', path: pointer('spec', list, index, 'env'), value: toAdd }];
  return toAdd.map((value) => ({ op: 'add', path: pointer('spec', list, index, 'env', '-'), value }));
}

/**
 * Computes the JSON Patch that injects the poolkeeper sidecar into `pod`.
 * Returns `skipped` for pods that did not opt in, an empty patch for pods
 * that already have everything, and errors (with no patch) when the pod
 * cannot be injected safely.
 */
export function computeInjection({ pod, connection, settings }: InjectionInput): InjectionResult {
  const warnings: string[] = [];
  const errors: InjectionError[] = [];
  if (connectionNameOf(pod) === undefined) return { skipped: 'NotOptedIn', patch: [], warnings, errors };
  if (!podWantsInjection(pod)) return { skipped: 'OptedOut', patch: [], warnings, errors };
  if (!pod.spec || !Array.isArray(pod.spec.containers)) {
    return { patch: [], warnings, errors: [{ code: 'InvalidPod', message: 'pod has no spec.containers' }] };
  }
  const derived = checkConnection(pod, connection, settings, errors);
  if (!derived) return { patch: [], warnings, errors };

  const existingSidecar = findSidecar(pod);
  if (!existingSidecar) checkPorts(pod, settings, derived, errors);
  const volumes = sidecarVolumes(connection, derived);
  if (!existingSidecar) {
    for (const volume of volumes) {
      const clash = pod.spec.volumes?.find((v) => v.name === volume.name);
      if (clash) errors.push({ code: 'VolumeConflict', message: `pod already has a volume named ${volume.name}, reserved for the sidecar` });
    }
  }

  const consumer = resolveConsumer(connection, pod);
  if (!consumer) warnings.push(`pod matches no consumer of DatabaseConnection ${derived.connectionName}: it gets no connection budget until one selects it`);
  if (pod.spec.hostNetwork === true) warnings.push(`pod uses hostNetwork: the sidecar's ports ${derived.listenPort} and ${settings.adminPort} are the node's and may clash with other pods`);
  if (errors.length > 0) return { patch: [], warnings, errors, ...(consumer ? { consumer: consumer.name } : {}) };

  // Values differing on a pod we already injected are ours from an earlier pass, not the user's.
  const reportConflicts = pod.metadata?.annotations?.[INJECTED_ANNOTATION] === undefined;
  const sidecarNative = existingSidecar ? existingSidecar.native : settings.nativeSidecars;
  const patch: JsonPatchOperation[] = [];

  const annotations: Record<string, string> = { [INJECTED_ANNOTATION]: settings.version, [READS_TABLES_ANNOTATION]: 'true' };
  if (consumer) annotations[CONSUMER_ANNOTATION] = consumer.name;
  patch.push(...annotationOps(pod, annotations));

  // Env first: the sidecar insertion at initContainers/0 shifts the indices after it.
  const poolSize = poolSizeHint(connection, consumer);
  const wantedEnv = appEnv(connection, derived, poolSize);
  const tcpEnv = derived.unixSocket ? appEnv(connection, { ...derived, unixSocket: false }, poolSize) : wantedEnv;
  const containerOps = (list: 'containers' | 'initContainers', index: number, container: ContainerLike): void => {
    if (!derived.unixSocket) {
      patch.push(...envOps(list, index, container, wantedEnv, reportConflicts, warnings));
      return;
    }
    const mounts = socketMountOps(list, index, container, warnings);
    // A container that cannot mount the socket directory keeps reaching the sidecar over TCP.
    patch.push(...envOps(list, index, container, mounts === undefined ? tcpEnv : wantedEnv, reportConflicts, warnings), ...(mounts ?? []));
  };
  pod.spec.containers.forEach((container, index) => {
    if (container.name !== SIDECAR_CONTAINER_NAME) containerOps('containers', index, container);
  });
  if (sidecarNative) {
    // A native sidecar starts before regular init containers, so migrations can use it too.
    pod.spec.initContainers?.forEach((container, index) => {
      if (container.name !== SIDECAR_CONTAINER_NAME && container.restartPolicy !== 'Always') containerOps('initContainers', index, container);
    });
  }

  // A later webhook that round-trips the pod through a Kubernetes client older than 1.28 drops the field unknown
  // to it: without it the API server refuses the sidecar's probes on an init container, or the kubelet waits
  // for the sidecar to exit before starting the app. Reinvoked after it (reinvocationPolicy IfNeeded), put it back.
  const initIndex = pod.spec.initContainers?.findIndex((c) => c.name === SIDECAR_CONTAINER_NAME) ?? -1;
  if (existingSidecar?.native === true && existingSidecar.container.restartPolicy !== 'Always' && initIndex >= 0) {
    patch.push({ op: 'add', path: `/spec/initContainers/${initIndex}/restartPolicy`, value: 'Always' });
    warnings.push('another mutating webhook removed restartPolicy: Always from the poolkeeper sidecar (one built with a Kubernetes client older than 1.28 drops it); it is put back, but if that webhook runs again after this one the pod is refused: upgrade it');
  }

  const wantedGrace = derived.drainTimeout + settings.terminationMarginSeconds;
  const currentGrace = pod.spec.terminationGracePeriodSeconds ?? DEFAULT_TERMINATION_GRACE_SECONDS;
  if (currentGrace < wantedGrace) patch.push({ op: 'add', path: '/spec/terminationGracePeriodSeconds', value: wantedGrace });

  if (!existingSidecar) {
    if (!pod.spec.volumes) patch.push({ op: 'add', path: '/spec/volumes', value: volumes });
    else for (const volume of volumes) patch.push({ op: 'add', path: '/spec/volumes/-', value: volume });
    const sidecar = sidecarContainer(connection, settings, derived);
    if (!settings.nativeSidecars) patch.push({ op: 'add', path: '/spec/containers/-', value: sidecar });
    else if (!pod.spec.initContainers) patch.push({ op: 'add', path: '/spec/initContainers', value: [sidecar] });
    else patch.push({ op: 'add', path: '/spec/initContainers/0', value: sidecar });
  }

  return { patch, warnings, errors, ...(consumer ? { consumer: consumer.name } : {}) };
}
