/**
 * The webhook process put together: certificates (self-managed in the shared
 * Secret, or files written by cert-manager), the HTTPS server, and a
 * periodic refresh that rotates and reloads certificates. The entry point
 * (`poolkeeper webhook`) calls webhookConfigFromEnv() and startWebhook().
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { AdmissionregistrationV1Api, CoreV1Api, VersionApi, type KubeConfig } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import type { Registry } from 'prom-client';
import { DEFAULT_INJECTOR_SETTINGS, nativeSidecarsSupported, type InjectorSettings } from '../core/inject/index.ts';
import { SidecarMode } from './node-versions.ts';
import { DEFAULT_ROTATION_POLICY } from '../pki/rotation.ts';
import { AdmissionMetrics, PodAdmissionHandler } from './admission.ts';
import { SelfManagedCertificates, type ServingMaterial } from './certificates.ts';
import { KubeHttp } from '../kube/http.ts';
import { KubeConnectionLookup } from './connections.ts';
import { WebhookServer, type ServingCertificate } from './server.ts';

/** Everything the webhook process is configured with. */
export interface WebhookConfig {
  /** `self`: manage the CA in the shared Secret; `files`: read tls.crt/tls.key from certDir (cert-manager). */
  certificateMode: 'self' | 'files';
  certDir: string;
  namespace: string;
  serviceName: string;
  secretName: string;
  webhookConfigurationName: string;
  host: string;
  port: number;
  /** How often certificates are re-checked (and reloaded). */
  refreshSeconds: number;
  injector: InjectorSettings;
  /** undefined: decide from the API server's version. */
  nativeSidecars?: boolean;
  /** How often the nodes' kubelet versions are read again (ms; default 60 s) when nativeSidecars is not set. */
  nodeRefreshMs?: number;
  /** Extra IP SANs of the serving certificate (a webhook registered by URL on an address, as in the local environment). */
  ipAddresses?: string[];
}

/** Reads the configuration from environment variables (see docs/webhook.md). */
export function webhookConfigFromEnv(env: Readonly<Record<string, string | undefined>>, version: string): WebhookConfig {
  const int = (name: string, fallback: number): number => {
    const raw = env[name];
    if (raw === undefined || raw === '') return fallback;
    const value = Number(raw);
    if (!Number.isInteger(value) || value < 0) throw new Error(`${name} must be a non-negative integer, got ${raw}`);
    return value;
  };
  const mode = env.POOLKEEPER_WEBHOOK_CERTIFICATES ?? 'self';
  if (mode !== 'self' && mode !== 'files') throw new Error(`POOLKEEPER_WEBHOOK_CERTIFICATES must be self or files, got ${mode}`);
  const image = env.POOLKEEPER_SIDECAR_IMAGE;
  if (!image) throw new Error('POOLKEEPER_SIDECAR_IMAGE is required');
  const native = env.POOLKEEPER_NATIVE_SIDECARS;
  const runAs = env.POOLKEEPER_SIDECAR_RUN_AS_USER;
  // "platform": no UID in the sidecar's securityContext, for platforms that assign one (OpenShift's restricted SCCs).
  const runAsUser = runAs === undefined || runAs === '' ? DEFAULT_INJECTOR_SETTINGS.runAsUser : runAs === 'platform' ? undefined : Number(runAs);
  if (runAsUser !== undefined && (!Number.isInteger(runAsUser) || runAsUser < 1)) throw new Error(`POOLKEEPER_SIDECAR_RUN_AS_USER must be a UID >= 1 or "platform", got ${runAs ?? ''}`);
  return {
    certificateMode: mode,
    certDir: env.POOLKEEPER_WEBHOOK_CERT_DIR ?? '/var/run/poolkeeper/webhook-certs',
    namespace: env.POOLKEEPER_NAMESPACE ?? 'poolkeeper-system',
    serviceName: env.POOLKEEPER_WEBHOOK_SERVICE ?? 'poolkeeper-webhook',
    secretName: env.POOLKEEPER_WEBHOOK_SECRET ?? 'poolkeeper-webhook-certs',
    webhookConfigurationName: env.POOLKEEPER_WEBHOOK_CONFIGURATION ?? 'poolkeeper-webhook',
    host: env.POOLKEEPER_WEBHOOK_HOST ?? '0.0.0.0',
    port: int('POOLKEEPER_WEBHOOK_PORT', 9443),
    refreshSeconds: int('POOLKEEPER_WEBHOOK_REFRESH_SECONDS', 60),
    injector: {
      ...DEFAULT_INJECTOR_SETTINGS,
      version,
      sidecarImage: image,
      adminPort: int('POOLKEEPER_SIDECAR_ADMIN_PORT', DEFAULT_INJECTOR_SETTINGS.adminPort),
      runAsUser,
      // Pods reach their sidecar over a Unix-domain socket unless annotated otherwise.
      ...(env.POOLKEEPER_UNIX_SOCKET === 'true' ? { unixSocket: true } : {}),
      ...(env.POOLKEEPER_SIDECAR_CPU_REQUEST || env.POOLKEEPER_SIDECAR_MEMORY_REQUEST || env.POOLKEEPER_SIDECAR_MEMORY_LIMIT || env.POOLKEEPER_SIDECAR_CPU_LIMIT ? {
        resources: {
          requests: { cpu: env.POOLKEEPER_SIDECAR_CPU_REQUEST ?? '50m', memory: env.POOLKEEPER_SIDECAR_MEMORY_REQUEST ?? '64Mi' },
          // No CPU limit unless asked for: a throttled pooler adds its throttling to every query's latency.
          limits: { memory: env.POOLKEEPER_SIDECAR_MEMORY_LIMIT ?? '128Mi', ...(env.POOLKEEPER_SIDECAR_CPU_LIMIT ? { cpu: env.POOLKEEPER_SIDECAR_CPU_LIMIT } : {}) },
        },
      } : {}),
    },
    ...(native === 'true' || native === 'false' ? { nativeSidecars: native === 'true' } : {}),
  };
}

/** A running webhook. */
export interface RunningWebhook {
  server: WebhookServer;
  stop(): Promise<void>;
}

async function readCertificateFiles(dir: string): Promise<ServingCertificate> {
  const [certPem, keyPem] = await Promise.all([readFile(join(dir, 'tls.crt'), 'utf8'), readFile(join(dir, 'tls.key'), 'utf8')]);
  return { certPem, keyPem };
}

/** Starts the webhook with `kc`'s credentials; resolves once it serves. */
export async function startWebhook(kc: KubeConfig, config: WebhookConfig, logger: Logger, registry: Registry): Promise<RunningWebhook> {
  const http = new KubeHttp(kc);
  let nativeSidecars = config.nativeSidecars;
  let mode: SidecarMode | undefined;
  if (nativeSidecars === undefined) {
    // Not set: native while the API server and every node's kubelet are 1.29 or newer, followed as nodes change.
    const version = await kc.makeApiClient(VersionApi).getCode();
    nativeSidecars = nativeSidecarsSupported(version);
    logger.info({ kubernetes: version.gitVersion, nativeSidecars }, 'sidecar mode chosen by the API server\'s version');
    mode = new SidecarMode(http, { apiServerAllowsNative: nativeSidecars, logger, ...(config.nodeRefreshMs !== undefined ? { refreshMs: config.nodeRefreshMs } : {}) });
    await mode.start();
  }
  const service = `${config.serviceName}.${config.namespace}`;
  const certificates = config.certificateMode === 'self'
    ? new SelfManagedCertificates({ core: kc.makeApiClient(CoreV1Api), admission: kc.makeApiClient(AdmissionregistrationV1Api) }, {
      namespace: config.namespace, secretName: config.secretName, webhookConfigurationName: config.webhookConfigurationName,
      dnsNames: [`${service}.svc`, `${service}.svc.cluster.local`, service, config.serviceName], ipAddresses: config.ipAddresses ?? [], policy: DEFAULT_ROTATION_POLICY,
    }, logger)
    : undefined;
  const load = async (): Promise<ServingMaterial | ServingCertificate> => certificates ? certificates.reconcile(new Date()) : readCertificateFiles(config.certDir);
  const following = mode;
  const handler = new PodAdmissionHandler(new KubeConnectionLookup(http), { ...config.injector, nativeSidecars }, logger, new AdmissionMetrics(registry), following ? () => following.native : undefined);
  const server = new WebhookServer(handler, await load(), { host: config.host, port: config.port }, logger);
  await server.listen();
  logger.info({ port: server.port, certificates: config.certificateMode }, 'webhook serving');
  let refreshing = false;
  const timer = setInterval(() => {
    if (refreshing) return;
    refreshing = true;
    load().then((material) => server.updateCertificate(material))
      .catch((err: unknown) => logger.error({ err }, 'certificate refresh failed; serving the current certificate'))
      .finally(() => (refreshing = false));
  }, config.refreshSeconds * 1000);
  timer.unref();
  return {
    server,
    async stop() {
      clearInterval(timer);
      following?.stop();
      await server.close();
    },
  };
}
