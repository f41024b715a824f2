/**
 * Kubernetes Events (core/v1) for the objects poolkeeper manages. Repeats of
 * the same reason and message on one object bump `count` instead of piling up
 * new Events, as kubectl describe expects.
 */
import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import { isStatus, type KubeHttp } from './http.ts';
import type { KubeObject } from './informer.ts';

/** Normal or Warning, as Kubernetes spells them. */
export type EventType = 'Normal' | 'Warning';

/** Records Events on behalf of one component. */
export class EventRecorder {
  private readonly http: KubeHttp;
  private readonly component: string;
  private readonly logger: Logger;

  constructor(http: KubeHttp, component: string, logger: Logger) {
    this.http = http;
    this.component = component;
    this.logger = logger;
  }

  /** Records an Event on `object`; failures are logged, never thrown. */
  async record(object: KubeObject, type: EventType, reason: string, message: string): Promise<void> {
    const meta = object.metadata ?? {};
    const namespace = meta.namespace ?? 'default';
    const digest = createHash('sha256').update(`${meta.uid ?? ''}/${reason}/${message}`).digest('hex').slice(0, 12);
    const name = `${meta.name ?? 'object'}.${digest}`;
    const path = `/api/v1/namespaces/${namespace}/events`;
    const now = new Date().toISOString();
    try {
      const existing = await this.http.get<{ count?: number }>(`${path}/${name}`).catch((err: unknown) => {
        if (isStatus(err, 404)) return undefined;
        throw err;
      });
      if (existing) {
        await this.http.patch(`${path}/${name}`, { count: (existing.count ?? 1) + 1, lastTimestamp: now });
        return;
      }
      await this.http.create(path, {
        apiVersion: 'v1',
        kind: 'Event',
        metadata: { name, namespace },
        involvedObject: { apiVersion: object.apiVersion, kind: object.kind, name: meta.name, namespace, uid: meta.uid, resourceVersion: meta.resourceVersion },
        type,
        reason,
        message,
        source: { component: this.component },
        reportingComponent: this.component,
        reportingInstance: this.component,
        firstTimestamp: now,
        lastTimestamp: now,
        count: 1,
      });
    } catch (err) {
      this.logger.warn({ err, reason }, 'could not record event');
    }
  }
}
