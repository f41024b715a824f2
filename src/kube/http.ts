/**
 * A thin HTTPS client for the Kubernetes API that works for any resource,
 * custom ones included: JSON requests, typed errors, and a streaming watch.
 * Authentication comes from a KubeConfig (client certificate, token, exec...).
 */
import { request, type RequestOptions } from 'node:https';
import type { KubeConfig } from '@kubernetes/client-node';

/** A Kubernetes API error with its HTTP status and Status reason. */
export class KubeApiError extends Error {
  readonly statusCode: number;
  readonly reason: string;

  constructor(statusCode: number, reason: string, message: string) {
    super(message);
    this.name = 'KubeApiError';
    this.statusCode = statusCode;
    this.reason = reason;
  }
}

/** True if `err` is a KubeApiError with `statusCode`. */
export function isStatus(err: unknown, statusCode: number): boolean {
  return err instanceof KubeApiError && err.statusCode === statusCode;
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

/** JSON over HTTPS to one API server. */
export class KubeHttp {
  private readonly kubeConfig: KubeConfig;
  private readonly server: string;

  constructor(kubeConfig: KubeConfig) {
    this.kubeConfig = kubeConfig;
    const cluster = kubeConfig.getCurrentCluster();
    if (!cluster) throw new Error('kubeconfig has no current cluster');
    this.server = cluster.server.replace(/\/$/, '');
  }

  private async options(method: string, headers: Record<string, string>): Promise<RequestOptions> {
    const options: RequestOptions = { method, headers: { accept: 'application/json', ...headers } };
    await this.kubeConfig.applyToHTTPSOptions(options);
    return options;
  }

  /** Sends one request and parses the JSON answer; non-2xx becomes a KubeApiError. */
  async request<T>(method: string, path: string, body?: unknown, contentType = 'application/json'): Promise<T> {
    const payload = body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body);
    const headers: Record<string, string> = payload === undefined ? {} : { 'content-type': contentType, 'content-length': String(Buffer.byteLength(payload)) };
    const options = await this.options(method, headers);
    return new Promise<T>((resolve, reject) => {
      const req = request(`${this.server}${path}`, { ...options, timeout: 30_000 }, (res) => {
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
          reject(new KubeApiError(status, reason, `${method} ${path}: ${status} ${reason}: ${message}`));
        });
        res.on('error', reject);
      });
      req.on('timeout', () => req.destroy(new Error(`${method} ${path}: timeout`)));
      req.on('error', reject);
      if (payload !== undefined) req.write(payload);
      req.end();
    });
  }

  /** GET */
  get<T>(path: string): Promise<T> {
    return this.request<T>('GET', path);
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
   * which is what a stall watchdog needs (bookmarks count).
   */
  async watch<T>(path: string, onEvent: (event: WatchEvent<T>) => void, onActivity: () => void = () => undefined): Promise<WatchHandle> {
    const options = await this.options('GET', {});
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
          let newline = buffered.indexOf('\n');
          while (newline >= 0) {
            const line = buffered.slice(0, newline).trim();
            buffered = buffered.slice(newline + 1);
            if (line) onEvent(JSON.parse(line) as WatchEvent<T>);
            newline = buffered.indexOf('\n');
          }
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
    return { abort: () => abort(), done };
  }
}
