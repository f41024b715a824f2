/**
 * `poolkeeper status` / `kubectl poolkeeper status`: lists DatabaseConnections,
 * PoolMembers and opted-in pods (one namespace, or all) and prints the report
 * of src/core/status.
 */
import type { KubeConfig } from '@kubernetes/client-node';
import { buildStatusReport, formatStatusReport, type StatusReport } from '../core/status/index.ts';
import { isStatus, KubeHttp } from '../kube/http.ts';

/** Options of `status`. */
export interface StatusOptions {
  /** A namespace, or undefined for all namespaces. */
  namespace: string | undefined;
}

/** Parsed command line of `status`. */
export interface StatusArgs extends StatusOptions {
  kubeconfig: string | undefined;
  context: string | undefined;
  output: 'text' | 'json';
  help: boolean;
}

/** Usage of `status`. */
export const STATUS_USAGE = `usage: kubectl poolkeeper status [-n NAMESPACE | -A] [-o text|json] [--kubeconfig FILE] [--context NAME]
       poolkeeper status ...

Per database server: the connection limit and who set it, each DatabaseConnection and
consumer (pods, minPerPod, processesPerPod, budget per pod and per process), each pod's
grant, the server connections its sidecar holds and the clients waiting (as of the
sidecar's last heartbeat), and what to change when the pods' minimums exceed the limit.

  -n, --namespace NAME    one namespace (default: the kubeconfig context's, else default)
  -A, --all-namespaces    every namespace (servers are shared across namespaces)
  -o, --output FORMAT     text (default) or json
  --kubeconfig FILE       kubeconfig file (default: KUBECONFIG, else ~/.kube/config)
  --context NAME          kubeconfig context`;

/** Parses the arguments after `status`; throws an Error with a one-line message on a mistake. */
export function parseStatusArgs(args: readonly string[]): StatusArgs {
  const parsed: StatusArgs = { namespace: undefined, kubeconfig: undefined, context: undefined, output: 'text', help: false };
  let all = false;
  let namespaceGiven = false;
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    const [flag, inline] = arg.startsWith('--') && arg.includes('=') ? [arg.slice(0, arg.indexOf('=')), arg.slice(arg.indexOf('=') + 1)] : [arg, undefined];
    const value = (): string => {
      const v = inline ?? args[++i];
      if (v === undefined || v === '') throw new Error(`${flag} needs a value`);
      return v;
    };
    switch (flag) {
      case '-h': case '--help': parsed.help = true; break;
      case '-n': case '--namespace': parsed.namespace = value(); namespaceGiven = true; break;
      case '-A': case '--all-namespaces': all = true; break;
      case '-o': case '--output': {
        const v = value();
        if (v !== 'text' && v !== 'json') throw new Error(`--output must be text or json, got ${v}`);
        parsed.output = v;
        break;
      }
      case '--kubeconfig': parsed.kubeconfig = value(); break;
      case '--context': parsed.context = value(); break;
      default:
        if (/^-n./.test(flag)) {
          parsed.namespace = flag.slice(2);
          namespaceGiven = true;
          break;
        }
        throw new Error(`unknown argument ${arg}; see --help`);
    }
  }
  if (all && namespaceGiven) throw new Error('use either --namespace or --all-namespaces');
  if (all) parsed.namespace = undefined;
  else if (!namespaceGiven) parsed.namespace = '';
  return parsed;
}

/** The namespace a kubectl user means by default: the current context's, else "default". */
export function contextNamespace(kubeConfig: KubeConfig): string {
  return kubeConfig.getContextObject(kubeConfig.getCurrentContext())?.namespace ?? 'default';
}

interface ListOf {
  items?: unknown[];
}

/** Reads what the report needs from the API server. */
export async function readStatus(kubeConfig: KubeConfig, options: StatusOptions): Promise<StatusReport> {
  const http = new KubeHttp(kubeConfig);
  const scope = options.namespace === undefined ? '' : `/namespaces/${encodeURIComponent(options.namespace)}`;
  const [connections, members, pods, grants] = await Promise.all([
    http.get<ListOf>(`/apis/poolkeeper.dev/v1alpha1${scope}/databaseconnections`),
    http.get<ListOf>(`/apis/poolkeeper.dev/v1alpha1${scope}/poolmembers`),
    http.get<ListOf>(`/api/v1${scope}/pods?labelSelector=${encodeURIComponent('poolkeeper.dev/connection')}`),
    // Someone allowed to read PoolMembers but not PoolGrants still gets a report (grants then as the statuses say).
    http.get<ListOf>(`/apis/poolkeeper.dev/v1alpha1${scope}/poolgrants`).catch((err: unknown) => {
      if (isStatus(err, 403) || isStatus(err, 404)) return { items: [] };
      throw err;
    }),
  ]);
  return buildStatusReport({ connections: connections.items ?? [], members: members.items ?? [], pods: pods.items ?? [], grants: grants.items ?? [] });
}

/** Runs `status` and returns its output. */
export async function statusCommand(kubeConfig: KubeConfig, args: StatusArgs): Promise<string> {
  const namespace = args.namespace === '' ? contextNamespace(kubeConfig) : args.namespace;
  const report = await readStatus(kubeConfig, { namespace });
  return args.output === 'json' ? `${JSON.stringify(report, null, 2)}\n` : formatStatusReport(report);
}
