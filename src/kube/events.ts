/**
 * Kubernetes Events (core/v1) for the objects poolkeeper manages. Repeats of
 * the same reason and message on one object bump `count` instead of piling up
 * new Events, as kubectl describe expects. Recording never blocks the caller:
 * Events go into a bounded queue that one background loop writes out, so a
 * slow or failing API server delays Events, never a reconcile.
 */
import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import { describeApiError } from './backoff.ts';
import { isStatus, type KubeHttp } from './http.ts';
import type { KubeObject } from './informer.ts';

/** Normal or Warning, as Kubernetes spells them. */
export type EventType = 'Normal' | 'Warning';

interface PendingEvent {
  object: KubeObject;
  type: EventType;
  reason: string;
  message: string;
  at: string;
}

/** Options of the recorder. */
export interface EventRecorderOptions {
  /** Events waiting beyond this many are dropped (oldest first) and counted. */
  maxQueued?: number;
}

/** Records Events on behalf of one component. */
export class EventRecorder {
  private readonly http: KubeHttp;
  private readonly component: string;
  private readonly logger: Logger;
  private readonly maxQueued: number;
  private readonly queue: PendingEvent[] = [];
  private draining: Promise<void> | undefined;
  /** Events dropped because the queue was full. */
  dropped = 0;

  constructor(http: KubeHttp, component: string, logger: Logger, options: EventRecorderOptions = {}) {
    this.http = http;
    this.component = component;
    this.logger = logger;
    this.maxQueued = options.maxQueued ?? 1000;
  }

  /**
   * Queues an Event on `object` and returns at once; failures to write it are
   * logged, never thrown. (A promise, for callers written against a recorder
   * that writes synchronously.)
   */
  record(object: KubeObject, type: EventType, reason: string, message: string): Promise<void> {
    if (this.queue.length >= this.maxQueued) {
      this.queue.shift();
      this.dropped += 1;
    }
    this.queue.push({ object, type, reason, message, at: new Date().toISOString() });
    this.draining ??= this.drain().finally(() => {
      this.draining = undefined;
    });
    return Promise.resolve();
  }

  /** Resolves once every queued Event has been written (or failed). */
  async flush(): Promise<void> {
    while (this.draining) await this.draining;
  }

  private async drain(): Promise<void> {
    // Let the caller's synchronous work finish before the first request.
    await Promise.resolve();
    for (let next = this.queue.shift(); next; next = this.queue.shift()) await this.write(next);
  }

  private async write(event: PendingEvent): Promise<void> {
    const { object, type, reason, message, at } = event;
    const meta = object.metadata ?? {};
    // A cluster-scoped object's Events live in "default", as client-go's recorder puts them.
    const namespace = meta.namespace ?? 'default';
    const digest = createHash('sha256').update(`${meta.uid ?? ''}/${reason}/${message}`).digest('hex').slice(0, 12);
    const name = `${meta.name ?? 'object'}.${digest}`;
    const path = `/api/v1/namespaces/${namespace}/events`;
    try {
      const existing = await this.http.get<{ count?: number }>(`${path}/${name}`).catch((err: unknown) => {
        if (isStatus(err, 404)) return undefined;
        throw err;
      });
      if (existing) {
        await this.http.patch(`${path}/${name}`, { count: (existing.count ?? 1) + 1, lastTimestamp: at });
        return;
      }
      await this.http.create(path, {
        apiVersion: 'v1',
        kind: 'Event',
        metadata: { name, namespace },
        involvedObject: { apiVersion: object.apiVersion, kind: object.kind, name: meta.name, namespace: meta.namespace, uid: meta.uid, resourceVersion: meta.resourceVersion },
        type,
        reason,
        message,
        source: { component: this.component },
        reportingComponent: this.component,
        reportingInstance: this.component,
        firstTimestamp: at,
        lastTimestamp: at,
        count: 1,
      });
    } catch (err) {
      this.logger.warn({ reason, error: describeApiError(err) }, 'could not record event');
    }
  }
}
