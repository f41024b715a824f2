/**
 * Retrying against the API server: an exponential backoff with jitter that
 * starts over after a success, and an ApiReachability shared by the clients of
 * one process that wakes every waiting retry as soon as the API server answers
 * again, so an outage ends for all of them at once rather than at each one's
 * next backoff step.
 */
import type { KubeHttp } from './http.ts';
import { KubeApiError } from './http.ts';

/** Exponential backoff settings, in milliseconds. */
export interface BackoffOptions {
  initialMs?: number;
  maxMs?: number;
  /** 0..1: the delay is drawn from [delay * (1 - jitter), delay]. */
  jitter?: number;
}

/** Exponential backoff that resets on success. */
export class Backoff {
  private readonly initialMs: number;
  private readonly maxMs: number;
  private readonly jitter: number;
  private failures = 0;

  constructor(options: BackoffOptions = {}) {
    this.initialMs = options.initialMs ?? 200;
    this.maxMs = options.maxMs ?? 30_000;
    this.jitter = options.jitter ?? 0.2;
  }

  /** Consecutive failures since the last success. */
  get attempts(): number {
    return this.failures;
  }

  /** The delay before the next attempt, after one more failure. */
  next(): number {
    const base = Math.min(this.maxMs, this.initialMs * 2 ** Math.min(this.failures, 20));
    this.failures += 1;
    return Math.round(base * (1 - this.jitter * Math.random()));
  }

  /** After a success the next failure waits the initial delay again. */
  reset(): void {
    this.failures = 0;
  }
}

/** The one-line description of an API error: status and reason, or the network error's code. */
export function describeApiError(err: unknown): string {
  if (err instanceof KubeApiError) return err.message.split('\n')[0] ?? err.message;
  if (err instanceof Error) {
    const code = (err as NodeJS.ErrnoException).code;
    return code && !err.message.includes(code) ? `${code}: ${err.message}` : err.message;
  }
  return String(err);
}

/**
 * True if the request may succeed when sent again unchanged: a network error, a
 * timeout, a 5xx, or a 429 (API Priority and Fairness turning it away before it ran).
 */
export function isTransientApiError(err: unknown): boolean {
  return !(err instanceof KubeApiError) || err.statusCode >= 500 || err.statusCode === 429;
}

/** Options of ApiReachability. */
export interface ApiReachabilityOptions {
  /** How often to probe `/version` while some retry is waiting. */
  probeIntervalMs?: number;
}

/**
 * Tracks whether the API server answers. Retries wait through `sleep`, which
 * ends early when the server becomes reachable again after being unreachable:
 * either a probe of `/version` (run only while someone waits) or any client's
 * request (`succeeded()`) notices it.
 */
export class ApiReachability {
  private readonly http: KubeHttp | undefined;
  private readonly probeIntervalMs: number;
  private readonly waiters = new Set<() => void>();
  private down = false;
  private probe: NodeJS.Timeout | undefined;
  private probing = false;

  constructor(http?: KubeHttp, options: ApiReachabilityOptions = {}) {
    this.http = http;
    this.probeIntervalMs = options.probeIntervalMs ?? 500;
  }

  /** A request reached the API server. */
  succeeded(): void {
    const wasDown = this.down;
    this.down = false;
    if (wasDown) this.wakeAll();
  }

  /** A request failed; a network error or a 5xx/429 means the server may be down. */
  failed(err: unknown): void {
    if (!isTransientApiError(err)) return;
    this.down = true;
  }

  private wakeAll(): void {
    for (const wake of [...this.waiters]) wake();
  }

  /** Waits `ms`, or less if the server becomes reachable again meanwhile, or `abort` fires. */
  sleep(ms: number, abort?: AbortSignal): Promise<void> {
    return new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.waiters.delete(done);
        abort?.removeEventListener('abort', done);
        if (this.waiters.size === 0) this.stopProbe();
        resolve();
      };
      const timer = setTimeout(done, ms);
      timer.unref();
      this.waiters.add(done);
      abort?.addEventListener('abort', done);
      if (abort?.aborted) done();
      else this.startProbe();
    });
  }

  private startProbe(): void {
    if (!this.http || this.probe) return;
    const http = this.http;
    this.probe = setInterval(() => {
      if (this.probing || !this.down) return;
      this.probing = true;
      http.get('/version').then(() => this.succeeded(), (err: unknown) => this.failed(err)).finally(() => {
        this.probing = false;
      });
    }, this.probeIntervalMs);
    this.probe.unref();
  }

  private stopProbe(): void {
    clearInterval(this.probe);
    this.probe = undefined;
  }
}
