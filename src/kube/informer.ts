/**
 * List-then-watch cache of one resource collection, with a stall watchdog:
 * a watch that has received nothing (not even a bookmark) for `stallTimeoutMs`
 * is torn down and resumed; a 410 Gone (expired resourceVersion) relists.
 * Failed lists and watches (429 while storage initializes, 5xx, connection
 * refused) are retried with a backoff that starts over after each success and
 * is cut short when the shared ApiReachability sees the API server answer
 * again; each failure is logged as one line, never thrown.
 * Handlers only learn that an object changed; consumers re-read the cache
 * (level-triggered).
 */
import type { Logger } from 'pino';
import { ApiReachability, Backoff, describeApiError } from './backoff.ts';
import { KubeApiError, type KubeHttp, type WatchEvent, type WatchHandle } from './http.ts';

/** The metadata every Kubernetes object has that the cache needs. */
export interface ObjectMeta {
  name?: string;
  namespace?: string;
  uid?: string;
  resourceVersion?: string;
  generation?: number;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  deletionTimestamp?: string | Date;
  creationTimestamp?: string | Date;
  ownerReferences?: Array<{ apiVersion: string; kind: string; name: string; uid: string; controller?: boolean }>;
  /** Server-side apply bookkeeping; caches drop it (see InformerOptions.transform). */
  managedFields?: unknown[];
}

/** Any Kubernetes object. */
export interface KubeObject {
  apiVersion?: string;
  kind?: string;
  metadata?: ObjectMeta;
}

/** Called with the object that changed (its last known state for deletions). */
export type ChangeHandler<T> = (type: 'ADDED' | 'MODIFIED' | 'DELETED', object: T) => void;

/** Settings of one informer. */
export interface InformerOptions<T extends KubeObject = KubeObject> {
  /** Collection path, e.g. `/api/v1/pods` or `/apis/poolkeeper.dev/v1alpha1/namespaces/x/poolmembers`. */
  path: string;
  labelSelector?: string;
  fieldSelector?: string;
  /** Restart a watch that has been silent this long. */
  stallTimeoutMs?: number;
  /** Server-side watch timeout; the watch is resumed after it. */
  watchTimeoutSeconds?: number;
  /** Shared by the informers of one process: wakes their retries when the API server is back. */
  reachability?: ApiReachability;
  /** Retry backoff of lists and watches. */
  initialRetryMs?: number;
  maxRetryMs?: number;
  logger: Logger;
  /**
   * Applied to every object before it is cached and handed to handlers: keep
   * only what the reader uses (a controller caching thousands of pods pays
   * for every field it keeps).
   */
  transform?: (object: T) => T;
}

/** Key of an object in the cache: `namespace/name` or `name`. */
export function objectKey(object: KubeObject): string {
  const meta = object.metadata ?? {};
  return meta.namespace ? `${meta.namespace}/${meta.name ?? ''}` : (meta.name ?? '');
}

/** Counters an informer exposes, for metrics and tests. */
export interface InformerStats {
  lists: number;
  watches: number;
  stalls: number;
  /** Lists and watches that failed and were retried. */
  failures: number;
}

/** One cached, watched collection. */
export class Informer<T extends KubeObject> {
  private readonly http: KubeHttp;
  private readonly options: InformerOptions<T>;
  private readonly cache = new Map<string, T>();
  private readonly handlers: ChangeHandler<T>[] = [];
  private resourceVersion = '';
  private running = false;
  private current: WatchHandle | undefined;
  private watchdog: NodeJS.Timeout | undefined;
  private loop: Promise<void> | undefined;
  private stopping = new AbortController();
  private readonly reachability: ApiReachability;
  private readonly backoff: Backoff;
  readonly stats: InformerStats = { lists: 0, watches: 0, stalls: 0, failures: 0 };

  constructor(http: KubeHttp, options: InformerOptions<T>) {
    this.http = http;
    this.options = options;
    this.reachability = options.reachability ?? new ApiReachability();
    this.backoff = new Backoff({ initialMs: options.initialRetryMs ?? 200, maxMs: options.maxRetryMs ?? 30_000 });
  }

  /** Registers a change handler (before `start`). */
  onChange(handler: ChangeHandler<T>): void {
    this.handlers.push(handler);
  }

  /**
   * Lists (retrying until it succeeds, so the cache is synced when this
   * resolves, or until `stop`), then watches in the background.
   */
  async start(): Promise<void> {
    this.running = true;
    if (this.stopping.signal.aborted) this.stopping = new AbortController();
    while (this.running) {
      try {
        await this.relist();
        break;
      } catch (err) {
        await this.retryAfter(err, 'list failed');
      }
    }
    if (this.running) this.loop = this.watchLoop();
  }

  /** Stops watching (and a first list still retrying). */
  async stop(): Promise<void> {
    this.running = false;
    this.stopping.abort();
    clearTimeout(this.watchdog);
    this.current?.abort();
    await this.loop;
  }

  /** Logs `err` as one line and waits the next backoff delay (less if the API server comes back). */
  private async retryAfter(err: unknown, what: string): Promise<void> {
    this.stats.failures += 1;
    this.reachability.failed(err);
    const delay = this.backoff.next();
    this.options.logger.warn({ path: this.options.path, attempt: this.backoff.attempts, retryInMs: delay, error: describeApiError(err) }, `${what}; retrying`);
    await this.reachability.sleep(delay, this.stopping.signal);
  }

  private succeeded(): void {
    this.backoff.reset();
    this.reachability.succeeded();
  }

  /** Cached objects. */
  list(): T[] {
    return [...this.cache.values()];
  }

  /** One cached object by namespace and name. */
  get(namespace: string | undefined, name: string): T | undefined {
    return this.cache.get(namespace ? `${namespace}/${name}` : name);
  }

  private query(extra: Record<string, string>): string {
    const params = new URLSearchParams(extra);
    if (this.options.labelSelector) params.set('labelSelector', this.options.labelSelector);
    if (this.options.fieldSelector) params.set('fieldSelector', this.options.fieldSelector);
    return `${this.options.path}?${params.toString()}`;
  }

  private emit(type: 'ADDED' | 'MODIFIED' | 'DELETED', object: T): void {
    for (const handler of this.handlers) {
      try {
        handler(type, object);
      } catch (err) {
        this.options.logger.error({ err }, 'informer change handler failed');
      }
    }
  }

  private async relist(): Promise<void> {
    const list = await this.http.get<{ metadata: { resourceVersion: string }; items: T[] }>(this.query({}));
    this.stats.lists += 1;
    this.succeeded();
    const seen = new Set<string>();
    for (const raw of list.items) {
      const item = this.options.transform ? this.options.transform(raw) : raw;
      const key = objectKey(item);
      seen.add(key);
      const previous = this.cache.get(key);
      this.cache.set(key, item);
      if (!previous) this.emit('ADDED', item);
      else if (previous.metadata?.resourceVersion !== item.metadata?.resourceVersion) this.emit('MODIFIED', item);
    }
    for (const [key, object] of this.cache) {
      if (!seen.has(key)) {
        this.cache.delete(key);
        this.emit('DELETED', object);
      }
    }
    this.resourceVersion = list.metadata.resourceVersion;
  }

  private apply(event: WatchEvent<T>): void {
    if (event.type === 'BOOKMARK') {
      this.resourceVersion = event.object.metadata?.resourceVersion ?? this.resourceVersion;
      return;
    }
    if (event.type === 'ERROR') {
      const status = event.object as unknown as { code?: number; message?: string };
      throw new KubeApiError(status.code ?? 500, 'WatchError', status.message ?? 'watch error');
    }
    const object = this.options.transform ? this.options.transform(event.object) : event.object;
    const key = objectKey(object);
    this.resourceVersion = object.metadata?.resourceVersion ?? this.resourceVersion;
    if (event.type === 'DELETED') this.cache.delete(key);
    else this.cache.set(key, object);
    this.emit(event.type, object);
  }

  private armWatchdog(): void {
    clearTimeout(this.watchdog);
    this.watchdog = setTimeout(() => {
      this.stats.stalls += 1;
      this.options.logger.warn({ path: this.options.path }, 'watch stalled; restarting it');
      this.current?.abort();
    }, this.options.stallTimeoutMs ?? 90_000);
    this.watchdog.unref();
  }

  private async watchLoop(): Promise<void> {
    while (this.running) {
      let watchError: unknown;
      let answered = false;
      const started = Date.now();
      try {
        this.armWatchdog();
        this.current = await this.http.watch<T>(
          this.query({ watch: '1', resourceVersion: this.resourceVersion, allowWatchBookmarks: 'true', timeoutSeconds: String(this.options.watchTimeoutSeconds ?? 300) }),
          (event) => {
            try {
              this.apply(event);
            } catch (err) {
              watchError = err;
              this.current?.abort();
            }
          },
          () => {
            this.armWatchdog();
            // The first bytes of a stream are the success the backoff starts over from.
            if (!answered) {
              answered = true;
              this.succeeded();
            }
          },
          // stop() while the watch is being opened: none starts (this.current is still the one before it).
          this.stopping.signal,
        );
        this.stats.watches += 1;
        await this.current.done;
      } catch (err) {
        watchError = err;
      }
      clearTimeout(this.watchdog);
      if (!this.running) break;
      // A watch that ran and ended (server timeout, stall restart) resumes at once.
      if (!watchError && (answered || Date.now() - started >= 1000)) continue;
      const gone = watchError instanceof KubeApiError && watchError.statusCode === 410;
      if (gone) this.options.logger.info({ path: this.options.path }, 'watch expired (410 Gone); relisting');
      else await this.retryAfter(watchError ?? new Error('watch ended at once'), 'watch failed');
      if (!this.running) break;
      try {
        await this.relist();
      } catch (err) {
        await this.retryAfter(err, 'relist failed');
      }
    }
  }
}
