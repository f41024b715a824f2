/**
 * The pod's ServiceAccount as ApiServerAccess, for the sidecar: the same
 * files and variables KubeConfig.loadFromCluster reads, without importing
 * @kubernetes/client-node, which alone adds about 78 MB to a process (more
 * than half of the sidecar's memory limit).
 */
import { readFileSync, statSync } from 'node:fs';
import type { RequestOptions } from 'node:https';
import { SERVICE_ACCOUNT_TOKEN_DIR } from '../core/inject/model.ts';
import type { ApiServerAccess } from './http.ts';

/** Where a pod finds its ServiceAccount (Kubernetes' mount, or the one the injector adds to the sidecar). */
export const SERVICE_ACCOUNT_DIR = SERVICE_ACCOUNT_TOKEN_DIR;

/** What InClusterAccess reads: the API server's address and the ServiceAccount's files. */
export interface InClusterSource {
  /** KUBERNETES_SERVICE_HOST */
  host: string;
  /** KUBERNETES_SERVICE_PORT */
  port: string;
  /** Directory with `token` and `ca.crt`. */
  directory: string;
}

/**
 * Bearer token and CA of the pod's ServiceAccount. The kubelet rewrites the
 * projected token before it expires, so the token file is read again when
 * it changes (checked at most once a minute, as client-go does).
 */
export class InClusterAccess implements ApiServerAccess {
  private readonly server: string;
  private readonly ca: Buffer;
  private readonly tokenFile: string;
  private token = '';
  private tokenModified = 0;
  private checkedAt = 0;
  private readonly now: () => number;

  constructor(source: InClusterSource, now: () => number = Date.now) {
    if (!source.host || !source.port) throw new Error('KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set in a pod');
    // An IPv6 service address needs brackets in a URL.
    const host = source.host.includes(':') ? `[${source.host}]` : source.host;
    this.server = `https://${host}:${source.port}`;
    this.ca = readFileSync(`${source.directory}/ca.crt`);
    this.tokenFile = `${source.directory}/token`;
    this.now = now;
    this.readToken();
  }

  /** The API server, as KubeConfig's current cluster names it. */
  getCurrentCluster(): { server: string } {
    return { server: this.server };
  }

  /** Adds the CA and the current bearer token. */
  applyToHTTPSOptions(options: RequestOptions): Promise<void> {
    if (this.now() - this.checkedAt >= 60_000) {
      try {
        this.readToken();
      } catch {
        // Mid-rewrite by the kubelet: the token read last is still valid for a while.
      }
    }
    options.ca = this.ca;
    options.headers = { ...options.headers, authorization: `Bearer ${this.token}` };
    return Promise.resolve();
  }

  private readToken(): void {
    this.checkedAt = this.now();
    const modified = statSync(this.tokenFile).mtimeMs;
    if (modified === this.tokenModified && this.token) return;
    this.token = readFileSync(this.tokenFile, 'utf8').trim();
    this.tokenModified = modified;
  }
}
