/**
 * A thin HTTPS client for the Kubernetes API that works for any resource,
 * custom ones included: JSON requests, typed errors, and a streaming watch.
 * Authentication comes from an ApiServerAccess: a KubeConfig (client
 * certificate, token, exec...) or, in a sidecar, the pod's ServiceAccount
 * read without loading @kubernetes/client-node (in-cluster.ts).
 */
import type { ApiServerClock } from './server-clock.ts';
import { Agent, request, type RequestOptions } from 'node:https';

/**
 * Where the API server is and how to authenticate to it: the two methods of
 * @kubernetes/client-node's KubeConfig that KubeHttp uses, so that a
 * KubeConfig is one and a lighter implementation can be another.
 */
export interface ApiServerAccess {
  getCurrentCluster(): { server: string; proxyUrl?: string | undefined } | null;
  applyToHTTPSOptions(options: RequestOptions): Promise<void>;
}

/** A Kubernetes API error with its HTTP status and Status reason. */
export class KubeApiError extends Error {
  readonly statusCode: number;
  readonly reason: string;
  /** The answer's Retry-After, in seconds (API Priority and Fairness sends it with 429). */
  readonly retryAfterSeconds: number | undefined;

  constructor(statusCode: number, reason: string, message: string, retryAfterSeconds?: number) {
    super(message);
    this.name = 'KubeApiError';
    this.statusCode = statusCode;
    this.reason = reason;
    this.retryAfterSeconds = retryAfterSeconds;
  }
}

/** True if `err` is a KubeApiError with `statusCode`. */
export function isStatus(err: unknown, statusCode: number): boolean {
  return err instanceof KubeApiError && err.statusCode === statusCode;
}

/** A meta.k8s.io/v1 Table: a list as `kubectl get` prints it. */
export interface KubeTable {
  columnDefinitions: Array<{ name: string }>;
  rows: Array<{ cells: unknown[] }>;
  metadata?: { continue?: string };
}

/** Content types the API server accepts for PATCH. */
export type PatchType = 'merge' | 'json' | 'strategic' | 'apply';

const PATCH_CONTENT_TYPES: Record<PatchType, string> = {
  merge: 'application/merge-patch+json',
  json: 'application/json-patch+json',
  strategic: 'application/strategic-merge-patch+json',
  apply: 'application/apply-patch+yaml',
};

/** One event of a watch stream. */
export interface WatchEvent<T> {
  type: 'ADDED' | 'MODIFIED' | 'DELETED' | 'BOOKMARK' | 'ERROR';
  object: T;
}

/** Handle on a running watch. */
export interface WatchHandle {
  /** Ends the watch; `done` resolves. */
  abort(): void;
  /** Resolves when the stream ends, for whatever reason. */
  done: Promise<void>;
}

/** Options of a KubeHttp client. */
export interface KubeHttpOptions {
  /** Most concurrent requests (watches not counted); more wait for a free connection. Default 32. */
  maxSockets?: number;
  /** Learns the API server's clock from every answer's `Date` header. */
  clock?: ApiServerClock | undefined;
}

/** Default cap on concurrent requests: well under the API server's in-flight limits (200 mutating, 400 read-only). */
const DEFAULT_MAX_SOCKETS = 32;
// Idle keep-alive connections close well before the API server's idle timeout (90 s), so a reused one is rarely stale.
const IDLE_SOCKET_TIMEOUT_MS = 15_000;
const REQUEST_TIMEOUT_MS = 30_000;

/** JSON over HTTPS to one API server. */
export class KubeHttp {
  private readonly access: ApiServerAccess;
  private readonly server: string;
  /**
   * Keeps connections open between requests: without it every request pays a
   * TCP + TLS handshake. Watches do not use it, so long streams never hold
   * one of its sockets. It pools by TLS material, so rotated client
   * certificates get new connections.
   */
  private readonly agent: Agent | undefined;
  private readonly clock: ApiServerClock | undefined;

  constructor(access: ApiServerAccess, options: KubeHttpOptions = {}) {
    this.access = access;
    this.clock = options.clock;
    const cluster = access.getCurrentCluster();
    if (!cluster) throw new Error('kubeconfig has no current cluster');
    this.server = cluster.server.replace(/\/$/, '');
    const maxSockets = options.maxSockets ?? DEFAULT_MAX_SOCKETS;
    // A proxy needs the kubeconfig's own agent.
    this.agent = cluster.proxyUrl ? undefined : new Agent({ keepAlive: true, maxSockets, maxFreeSockets: maxSockets, scheduling: 'lifo', timeout: IDLE_SOCKET_TIMEOUT_MS });
  }

  private async options(method: string, headers: Record<string, string>): Promise<RequestOptions> {
    const options: RequestOptions = { method, headers: { accept: 'application/json', ...headers } };
    await this.access.applyToHTTPSOptions(options);
    return options;
  }

  /** Closes the idle keep-alive connections (open requests finish first). */
  close(): void {
    this.agent?.destroy();
  }

  /** Sends one request and parses the JSON answer; non-2xx becomes a KubeApiError. */
  async request<T>(method: string, path: string, body?: unknown, contentType = 'application/json'): Promise<T> {
    const payload = body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body);
    const headers: Record<string, string> = payload === undefined ? {} : { 'content-type': contentType, 'content-length': String(Buffer.byteLength(payload)) };
    const options = await this.options(method, headers);
    if (this.agent) options.agent = this.agent;
    // The server may close an idle connection just as we reuse it. Sent again once, except a POST, which could create twice.
    return this.send<T>(method, path, options, payload, method !== 'POST');
  }

  private send<T>(method: string, path: string, options: RequestOptions, payload: string | undefined, retryStale: boolean): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let answered = false;
      const sentMs = this.clock?.local();
      const req = request(`${this.server}${path}`, { ...options, timeout: REQUEST_TIMEOUT_MS }, (res) => {
        answered = true;
        if (this.clock && sentMs !== undefined) this.clock.observe(sentMs, this.clock.local(), res.headers.date);
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          const status = res.statusCode ?? 0;
          if (status >= 200 && status < 300) {
            resolve((text ? JSON.parse(text) : undefined) as T);
            return;
          }
          let reason = 'Unknown';
          let message = text;
          try {
            const parsed = JSON.parse(text) as { reason?: string; message?: string };
            reason = parsed.reason ?? reason;
            message = parsed.message ?? message;
          } catch {
            // not a Status object
          }
          const retryAfter = Number(res.headers['retry-after']);
          reject(new KubeApiError(status, reason, `${method} ${path}: ${status} ${reason}: ${message}`, Number.isFinite(retryAfter) && retryAfter >= 0 ? retryAfter : undefined));
        });
        res.on('error', reject);
      });
      req.on('timeout', () => req.destroy(new Error(`${method} ${path}: timeout`)));
      req.on('error', (err: NodeJS.ErrnoException) => {
        const stale = !answered && req.reusedSocket && (err.code === 'ECONNRESET' || err.code === 'EPIPE');
        if (stale && retryStale) resolve(this.send<T>(method, path, options, payload, false));
        else reject(err);
      });
      if (payload !== undefined) req.write(payload);
      req.end();
    });
  }

  /** GET */
  get<T>(path: string): Promise<T> {
    return this.request<T>('GET', path);
  }

  /**
   * GET a list as the API server prints it (the columns of `kubectl get`, no
   * objects): a list of nodes as a table is a few hundred bytes a node, not
   * the tens of KB of each Node's status.
   */
  async getTable(path: string): Promise<KubeTable> {
    const options = await this.options('GET', { accept: 'application/json;as=Table;v=v1;g=meta.k8s.io' });
    if (this.agent) options.agent = this.agent;
    return this.send<KubeTable>('GET', `${path}${path.includes('?') ? '&' : '?'}includeObject=None`, options, undefined, true);
  }

  /** POST (create) */
  create<T>(path: string, body: unknown): Promise<T> {
    return this.request<T>('POST', path, body);
  }

  /** PUT (replace, with optimistic concurrency through metadata.resourceVersion) */
  replace<T>(path: string, body: unknown): Promise<T> {
    return this.request<T>('PUT', path, body);
  }

  /** PATCH with the given patch type. */
  patch<T>(path: string, body: unknown, type: PatchType = 'merge'): Promise<T> {
    return this.request<T>('PATCH', path, body, PATCH_CONTENT_TYPES[type]);
  }

  /** DELETE */
  delete<T>(path: string, body?: unknown): Promise<T> {
    return this.request<T>('DELETE', path, body);
  }

  /**
   * Opens a watch on `path` (a collection URL with query) and calls `onEvent`
   * for each line of the stream. `onActivity` fires on every byte received,
   * which is what a stall watchdog needs (bookmarks count). Once `signal`
   * aborts, no request starts and a running one ends.
   */
  async watch<T>(path: string, onEvent: (event: WatchEvent<T>) => void, onActivity: () => void = () => undefined, signal?: AbortSignal): Promise<WatchHandle> {
    const options = await this.options('GET', {});
    if (signal?.aborted) return { abort: () => undefined, done: Promise.resolve() };
    let abort = (): void => undefined;
    const done = new Promise<void>((resolve, reject) => {
      const req = request(`${this.server}${path}`, options, (res) => {
        const status = res.statusCode ?? 0;
        if (status !== 200) {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => reject(new KubeApiError(status, 'WatchFailed', `watch ${path}: ${status}: ${Buffer.concat(chunks).toString('utf8')}`)));
          return;
        }
        let buffered = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          onActivity();
          buffered += chunk;
          // Cut once per chunk, not once per line: a chunk can hold thousands of events.
          let start = 0;
          let newline = buffered.indexOf('\n');
          while (newline >= 0) {
            const line = buffered.slice(start, newline).trim();
            start = newline + 1;
            if (line) onEvent(JSON.parse(line) as WatchEvent<T>);
            newline = buffered.indexOf('\n', start);
          }
          buffered = buffered.slice(start);
        });
        res.on('end', () => resolve());
        res.on('close', () => resolve());
        res.on('error', () => resolve());
      });
      req.on('error', (err) => (req.destroyed ? resolve() : reject(err)));
      abort = () => {
        req.destroy();
        resolve();
      };
      req.end();
    });
    if (signal !== undefined) {
      const onAbort = (): void => abort();
      signal.addEventListener('abort', onAbort, { once: true });
      // The signal outlives its watches (an informer's, until it stops): one listener per watch would pile up.
      void done.catch(() => undefined).finally(() => signal.removeEventListener('abort', onAbort));
    }
    return { abort: () => abort(), done };
  }
}
