/**
 * A de-duplicating, rate-limited work queue in the manner of client-go's:
 * a key waits in the queue at most once; a key added while it is being
 * processed is processed again afterwards (never twice at once); failures
 * retry with per-key exponential backoff; `addAfter` schedules a resync.
 */

/** Backoff settings for failed keys. */
export interface WorkQueueOptions {
  baseDelayMs?: number;
  maxDelayMs?: number;
}

/** What a handler did with a key. */
export type ProcessResult = { requeueAfterMs?: number } | void;

/** The queue. Keys are strings (e.g. `namespace/name`). */
export class WorkQueue {
  private readonly queue: string[] = [];
  private readonly dirty = new Set<string>();
  private readonly processing = new Set<string>();
  private readonly failures = new Map<string, number>();
  private readonly timers = new Map<string, { timer: NodeJS.Timeout; due: number }>();
  private readonly waiters: Array<() => void> = [];
  private readonly baseDelayMs: number;
  private readonly maxDelayMs: number;
  private shuttingDown = false;

  constructor(options: WorkQueueOptions = {}) {
    this.baseDelayMs = options.baseDelayMs ?? 50;
    this.maxDelayMs = options.maxDelayMs ?? 30_000;
  }

  /** Queues `key` unless it is already waiting. */
  add(key: string): void {
    if (this.shuttingDown || this.dirty.has(key)) return;
    this.dirty.add(key);
    if (this.processing.has(key)) return;
    this.queue.push(key);
    this.waiters.shift()?.();
  }

  /** Queues `key` after `delayMs` (the earliest pending delay wins). */
  addAfter(key: string, delayMs: number): void {
    if (this.shuttingDown) return;
    if (delayMs <= 0) {
      this.add(key);
      return;
    }
    const due = Date.now() + delayMs;
    const pending = this.timers.get(key);
    if (pending && pending.due <= due) return;
    if (pending) clearTimeout(pending.timer);
    const timer = setTimeout(() => {
      this.timers.delete(key);
      this.add(key);
    }, delayMs);
    timer.unref();
    this.timers.set(key, { timer, due });
  }

  /** Queues `key` after its next backoff delay. */
  addRateLimited(key: string): void {
    const failures = (this.failures.get(key) ?? 0) + 1;
    this.failures.set(key, failures);
    this.addAfter(key, Math.min(this.maxDelayMs, this.baseDelayMs * 2 ** (failures - 1)));
  }

  /** Forgets the failure history of `key` (after a success). */
  forget(key: string): void {
    this.failures.delete(key);
  }

  /** Number of keys waiting. */
  get length(): number {
    return this.queue.length;
  }

  private async next(): Promise<string | undefined> {
    while (this.queue.length === 0) {
      if (this.shuttingDown) return undefined;
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
    const key = this.queue.shift() as string;
    this.dirty.delete(key);
    this.processing.add(key);
    return key;
  }

  private done(key: string): void {
    this.processing.delete(key);
    if (this.dirty.has(key)) {
      this.queue.push(key);
      this.waiters.shift()?.();
    }
  }

  /**
   * Runs `workers` loops that take keys and call `handler`; a throw is
   * retried with backoff, a returned `requeueAfterMs` schedules a resync.
   * Resolves after `shutDown()` once the workers have finished.
   */
  async run(workers: number, handler: (key: string) => Promise<ProcessResult>, onError: (key: string, err: unknown) => void = () => undefined): Promise<void> {
    const loop = async (): Promise<void> => {
      for (;;) {
        const key = await this.next();
        if (key === undefined) return;
        try {
          const result = await handler(key);
          this.forget(key);
          if (result && result.requeueAfterMs !== undefined) this.addAfter(key, result.requeueAfterMs);
        } catch (err) {
          onError(key, err);
          this.addRateLimited(key);
        } finally {
          this.done(key);
        }
      }
    };
    await Promise.all(Array.from({ length: workers }, loop));
  }

  /** Stops accepting keys and lets the workers return. */
  shutDown(): void {
    this.shuttingDown = true;
    for (const { timer } of this.timers.values()) clearTimeout(timer);
    this.timers.clear();
    for (const wake of this.waiters.splice(0)) wake();
  }
}
