#!/usr/bin/env node
/**
 * The one binary of the image: `poolkeeper controller`, `poolkeeper webhook`
 * or `poolkeeper sidecar`; `poolkeeper --help`, `poolkeeper <command> --help`
 * and `poolkeeper version` print and exit. A configuration error ends the
 * process with one line on stderr and exit code 2, never a stack trace.
 * The only place that reads process.env; everything else gets its
 * configuration passed in.
 */
import { existsSync } from 'node:fs';
import { hostname } from 'node:os';
import type { KubeConfig } from '@kubernetes/client-node';
import pino from 'pino';
import type { ApiServerAccess } from '../kube/http.ts';
import { InClusterAccess, SERVICE_ACCOUNT_DIR } from '../kube/in-cluster.ts';

// Each command imports only what it runs: @kubernetes/client-node alone is
// about 78 MB of memory, which the sidecar (limit 128Mi) does without.

const VERSION = '0.1.0';
const env = process.env;
const logger = pino({ level: env.POOLKEEPER_LOG_LEVEL ?? 'info', base: { component: process.argv[2] ?? 'poolkeeper' }, redact: ['password', '*.password', 'privateKey', '*.privateKey'] });

/** A mistake in how poolkeeper was started: reported as one line, exit code 2. */
class UsageError extends Error {}

function required(name: string): string {
  const value = env[name];
  if (!value) throw new UsageError(`environment variable ${name} is required`);
  return value;
}

function repairMode(value: string): 'evict' | 'report' | 'off' {
  if (value === 'evict' || value === 'report' || value === 'off') return value;
  throw new UsageError(`POOLKEEPER_REPAIR must be evict, report or off, got ${value}`);
}

function clusterLease(value: string): { namespace: string; name: string } | undefined {
  if (value === 'none') return undefined;
  if (!/^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/.test(value)) throw new UsageError(`POOLKEEPER_CLUSTER_LEASE_NAMESPACE must be a namespace name or none, got ${JSON.stringify(value)}`);
  return { namespace: value, name: 'poolkeeper-controller' };
}

function clientTlsSetting(value: string | undefined): { clientTls?: 'self-signed' } {
  if (value === undefined || value === '' || value === 'off') return {};
  if (value === 'self-signed') return { clientTls: value };
  throw new UsageError(`POOLKEEPER_CLIENT_TLS must be self-signed or off, got ${value}`);
}

function port(name: string, fallback: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0 || value > 65535) throw new UsageError(`${name} must be a port number (0-65535), got ${raw}`);
  return value;
}

const SERVICE_ACCOUNT_TOKEN = `${SERVICE_ACCOUNT_DIR}/token`;

/** Throws a UsageError unless KUBECONFIG names a file or this is a pod with a ServiceAccount token. */
function checkClusterAccess(): void {
  const path = env.KUBECONFIG;
  if (!path && !(env.KUBERNETES_SERVICE_HOST && existsSync(SERVICE_ACCOUNT_TOKEN))) {
    throw new UsageError(`not running in a Kubernetes pod (no ${SERVICE_ACCOUNT_TOKEN}) and KUBECONFIG is not set: set KUBECONFIG to a kubeconfig file to run outside a cluster`);
  }
  if (path && !existsSync(path)) throw new UsageError(`KUBECONFIG=${path}: no such file`);
}

/** The API server's configuration, or a UsageError that says what is missing. */
async function kubeConfig(): Promise<KubeConfig> {
  checkClusterAccess();
  const { loadKubeConfig } = await import('./kubeconfig.ts');
  try {
    return loadKubeConfig(env.KUBECONFIG);
  } catch (err) {
    throw new UsageError(`cannot load ${env.KUBECONFIG ? `KUBECONFIG=${env.KUBECONFIG}` : 'the in-cluster configuration'}: ${oneLine(err)}`);
  }
}

/** The way to the API server of the controller and the sidecar: a KUBECONFIG when set, else the pod's ServiceAccount without client-node. */
async function apiServerAccess(): Promise<ApiServerAccess> {
  if (env.KUBECONFIG) return kubeConfig();
  checkClusterAccess();
  try {
    return new InClusterAccess({ host: env.KUBERNETES_SERVICE_HOST ?? '', port: env.KUBERNETES_SERVICE_PORT ?? '', directory: SERVICE_ACCOUNT_DIR });
  } catch (err) {
    throw new UsageError(`cannot load the in-cluster configuration: ${oneLine(err)}`);
  }
}

function oneLine(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).split('\n')[0] ?? '';
}

function onTerminate(shutdown: () => Promise<void>): void {
  let terminating = false;
  const handler = (signal: string): void => {
    if (terminating) return;
    terminating = true;
    logger.info({ signal }, 'terminating');
    shutdown().then(() => process.exit(0), (err: unknown) => {
      logger.error({ err }, 'shutdown failed');
      process.exit(1);
    });
  };
  process.on('SIGTERM', handler);
  process.on('SIGINT', handler);
}

const USAGE = `usage: poolkeeper <command> [--help]

commands:
  controller  the budget controller (leader-elected) and missing-sidecar repair
  webhook     the sidecar injection webhook (every replica serves)
  sidecar     the pooling sidecar of one pod (injected by the webhook)
  version     print the version
  status      budgets, pods and waiting clients per database server (also: kubectl poolkeeper status)

Configuration is read from environment variables; see poolkeeper <command> --help.
Outside a cluster, set KUBECONFIG.`;

const COMMAND_HELP: Record<string, string> = {
  controller: `usage: poolkeeper controller

Watches DatabaseConnections, opted-in pods and PoolMembers, and gives every pod
its connection budget. Two replicas elect a leader with a Lease.

environment:
  KUBECONFIG                       kubeconfig file (default: the in-cluster ServiceAccount)
  POD_NAMESPACE                    namespace of the leader-election Lease (default poolkeeper-system)
  POD_NAME                         identity in the election (default: the host name)
  POOLKEEPER_METRICS_PORT          /metrics, /healthz, /readyz port (default 8080)
  POOLKEEPER_LEADER_ELECTION       false: this replica always leads (default true)
  POOLKEEPER_CLUSTER_LEASE_NAMESPACE
                                   namespace of the Lease every install in the cluster contends for,
                                   so that a second install stands by instead of budgeting the same
                                   servers (default kube-system; none: only the own Lease)
  POOLKEEPER_REPAIR                evict | report | off: opted-in pods without the sidecar (default evict)
  POOLKEEPER_MANAGE_SIDECAR_RBAC   false: leave the sidecars' RoleBinding to you (default true)
  POD_IP                           this pod's IP: with it, sidecars send acknowledgements to the
                                   leader directly (http://POD_IP:POOLKEEPER_ACK_PORT); without, through
                                   their PoolMember status only
  POOLKEEPER_ACK_PORT              port of the acknowledgement channel (default 8082)
  POOLKEEPER_LOG_LEVEL             pino level (default info)`,
  webhook: `usage: poolkeeper webhook

Serves the mutating admission webhook that injects the sidecar into pods
labelled poolkeeper.dev/connection, and manages its own certificates.

environment:
  KUBECONFIG                          kubeconfig file (default: the in-cluster ServiceAccount)
  POOLKEEPER_SIDECAR_IMAGE            image of the injected sidecar (required)
  POOLKEEPER_SIDECAR_CPU_REQUEST, POOLKEEPER_SIDECAR_CPU_LIMIT, POOLKEEPER_SIDECAR_MEMORY_REQUEST,
  POOLKEEPER_SIDECAR_MEMORY_LIMIT     the sidecar's resources (default 50m, none, 64Mi, 128Mi); a pod's
                                      annotations poolkeeper.dev/sidecar-cpu-request (-cpu-limit,
                                      -memory-request, -memory-limit) override them
  POOLKEEPER_SIDECAR_RUN_AS_USER      UID (and GID) of the sidecar (default 65532, the image's user), or
                                      platform: none set, the platform assigns one (OpenShift)
  POOLKEEPER_WEBHOOK_CERTIFICATES     self (a self-managed CA) | files (e.g. cert-manager) (default self)
  POOLKEEPER_WEBHOOK_CERT_DIR         certificate directory for files (default /var/run/poolkeeper/webhook-certs)
  POOLKEEPER_NAMESPACE                namespace of the webhook (default poolkeeper-system)
  POOLKEEPER_WEBHOOK_PORT             HTTPS port (default 9443)
  POOLKEEPER_METRICS_PORT             /metrics, /healthz, /readyz port (default 8081)
  POOLKEEPER_LOG_LEVEL                pino level (default info)`,
  sidecar: `usage: poolkeeper sidecar

The pooling sidecar of one pod: listens on 127.0.0.1 and never holds more
server connections than the pod's grant. The webhook injects it with its
settings; running it by hand is for testing.

environment:
  POOLKEEPER_POD_NAMESPACE      namespace of the pod (required)
  POOLKEEPER_POD_NAME           name of the pod, and of its PoolMember (required)
  POOLKEEPER_LISTEN_PORT        client port on 127.0.0.1 (default 6432)
  POOLKEEPER_LISTEN_SOCKET_DIR  also listen on a Unix-domain socket in this directory (.s.PGSQL.<port>)
  POOLKEEPER_ADMIN_PORT         /metrics, /healthz, /readyz port (default 9187)
  POOLKEEPER_CREDENTIALS_DIR    directory with the files username and password (default /var/run/poolkeeper/credentials)
  POOLKEEPER_SSH_KEY_DIR        directory with the bastion's private key, if any
  POOLKEEPER_DB_CA_FILE         CA certificate of the database server, if any
  POOLKEEPER_DRAIN_TIMEOUT      seconds in-flight transactions get on SIGTERM (default 30)
  POOLKEEPER_CLIENT_TLS         "self-signed": accept TLS from apps (sslmode=require) with a certificate made at start; unset: answer SSLRequest "no"
  POOLKEEPER_STATE_DIR          a directory that outlives the process (the pod's emptyDir): backends a killed sidecar left, and usernames the credentials held before, are found there
  POOLKEEPER_NATIVE_IO          "off": Node.js streams instead of the native socket I/O for plain connections (default on where built)
  KUBECONFIG                    kubeconfig file (default: the pod's ServiceAccount)`,
};

async function run(command: string | undefined, args: readonly string[]): Promise<void> {
  const wantsHelp = args.includes('--help') || args.includes('-h');
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    console.log(USAGE);
    process.exit(command === undefined ? 2 : 0);
  }
  if (command === 'version' || command === '--version') {
    console.log(`poolkeeper ${VERSION} (node ${process.version})`);
    return;
  }
  if (command === 'status') {
    await status(args);
    return;
  }
  const help = COMMAND_HELP[command];
  if (help === undefined) throw new UsageError(`unknown command "${command}"; run poolkeeper --help`);
  if (wantsHelp) {
    console.log(help);
    return;
  }
  const unknown = args.find((a) => a.startsWith('-'));
  if (unknown) throw new UsageError(`unknown option ${unknown}; poolkeeper ${command} takes its settings from the environment (poolkeeper ${command} --help)`);
  switch (command) {
    case 'controller': {
      // Settings first, so a typo is reported before the cluster connection is tried.
      const settings = {
        namespace: env.POD_NAMESPACE ?? 'poolkeeper-system',
        identity: env.POD_NAME ?? hostname(),
        metricsPort: port('POOLKEEPER_METRICS_PORT', 8080),
        leaderElection: env.POOLKEEPER_LEADER_ELECTION !== 'false',
        clusterLease: clusterLease(env.POOLKEEPER_CLUSTER_LEASE_NAMESPACE ?? 'kube-system'),
        repair: repairMode(env.POOLKEEPER_REPAIR ?? 'evict'),
        manageSidecarAccess: env.POOLKEEPER_MANAGE_SIDECAR_RBAC !== 'false',
        ...(env.POD_IP ? { acknowledgements: { host: env.POD_IP, port: port('POOLKEEPER_ACK_PORT', 8082), advertise: env.POD_IP } } : {}),
      };
      const config = { ...settings, apiServer: await apiServerAccess() };
      const { startController } = await import('./controller-main.ts');
      const running = await startController(config, logger);
      onTerminate(() => running.shutdown());
      break;
    }
    case 'sidecar': {
      const config = {
        namespace: required('POOLKEEPER_POD_NAMESPACE'),
        podName: required('POOLKEEPER_POD_NAME'),
        listenPort: port('POOLKEEPER_LISTEN_PORT', 6432),
        ...clientTlsSetting(env.POOLKEEPER_CLIENT_TLS),
        ...(env.POOLKEEPER_LISTEN_SOCKET_DIR ? { listenSocketDir: env.POOLKEEPER_LISTEN_SOCKET_DIR } : {}),
        adminPort: port('POOLKEEPER_ADMIN_PORT', 9187),
        apiServer: await apiServerAccess(),
        credentialsDir: env.POOLKEEPER_CREDENTIALS_DIR ?? '/var/run/poolkeeper/credentials',
        sshKeyDir: env.POOLKEEPER_SSH_KEY_DIR,
        caFile: env.POOLKEEPER_DB_CA_FILE,
        stateDir: env.POOLKEEPER_STATE_DIR,
        nativeIo: env.POOLKEEPER_NATIVE_IO !== 'off',
        drainTimeoutSeconds: Number(env.POOLKEEPER_DRAIN_TIMEOUT ?? 30),
        version: VERSION,
      };
      const { startSidecar } = await import('./sidecar-main.ts');
      const running = await startSidecar(config, logger);
      onTerminate(() => running.shutdown());
      break;
    }
    case 'webhook': {
      const kc = await kubeConfig();
      const [{ startWebhook, webhookConfigFromEnv }, { Registry, collectDefaultMetrics }, { AdminServer }] = await Promise.all([import('../webhook/runtime.ts'), import('prom-client'), import('../ops/admin-server.ts')]);
      let webhookConfig;
      try {
        webhookConfig = webhookConfigFromEnv(env, VERSION);
      } catch (err) {
        throw new UsageError(oneLine(err));
      }
      const metricsPort = port('POOLKEEPER_METRICS_PORT', 8081);
      const registry = new Registry();
      collectDefaultMetrics({ register: registry, prefix: 'poolkeeper_webhook_process_' });
      const running = await startWebhook(kc, webhookConfig, logger, registry);
      let stopping = false;
      const admin = new AdminServer({ registry, healthy: () => !stopping, readiness: () => ({ ready: !stopping, reasons: [] }) });
      await admin.listen('0.0.0.0', metricsPort);
      onTerminate(async () => {
        stopping = true;
        await running.stop();
        await admin.close();
      });
      break;
    }
  }
}

/** `poolkeeper status`: a client of the API server like kubectl (KUBECONFIG, else ~/.kube/config). */
async function status(args: readonly string[]): Promise<void> {
  const [{ KubeConfig }, { STATUS_USAGE, parseStatusArgs, statusCommand }] = await Promise.all([import('@kubernetes/client-node'), import('../cli/status.ts')]);
  let parsed;
  try {
    parsed = parseStatusArgs(args);
  } catch (err) {
    throw new UsageError(oneLine(err));
  }
  if (parsed.help) {
    console.log(STATUS_USAGE);
    return;
  }
  const kc = new KubeConfig();
  try {
    if (parsed.kubeconfig) kc.loadFromFile(parsed.kubeconfig);
    else kc.loadFromDefault();
    if (parsed.context) kc.setCurrentContext(parsed.context);
  } catch (err) {
    throw new UsageError(`cannot load the kubeconfig: ${oneLine(err)}`);
  }
  if (!kc.getCurrentCluster()) throw new UsageError('no cluster in the kubeconfig: set KUBECONFIG or pass --kubeconfig');
  process.stdout.write(await statusCommand(kc, parsed));
}

const [command, ...args] = process.argv.slice(2);
try {
  await run(command, args);
} catch (err) {
  // One line a person can act on; the stack only at debug level.
  console.error(`poolkeeper${command && (COMMAND_HELP[command] || command === 'status') ? ` ${command}` : ''}: ${oneLine(err)}`);
  if (!(err instanceof UsageError)) logger.debug({ err }, 'start failed');
  process.exit(err instanceof UsageError ? 2 : 1);
}
