/**
 * The API server's clock as this process estimates it from the `Date`
 * headers of the answers KubeHttp receives (src/core/clock/server-offset.ts
 * does the arithmetic). The controller times what other replicas judge by
 * it, so that replicas whose own clocks disagree still agree on when a
 * recorded hold ends.
 */
import { estimateOffset, narrowOffset, type OffsetBounds } from '../core/clock/server-offset.ts';
import { steadyNow } from '../ops/clock.ts';

/** Learns the API server's clock from answers; reads it as local time plus the learnt offset. */
export class ApiServerClock {
  private bounds: OffsetBounds | undefined;
  /** This process's clock (ms since the epoch); tests give a skewed one. */
  readonly local: () => number;

  constructor(local: () => number = steadyNow) {
    this.local = local;
  }

  /** One answer: sent and received on `local`, and its `Date` header (absent: ignored). */
  observe(sentMs: number, receivedMs: number, date: string | undefined): void {
    if (date !== undefined) this.bounds = narrowOffset(this.bounds, { sentMs, receivedMs, date });
  }

  /** The API server's time now (ms since the epoch); this process's own until an answer was seen. */
  now(): number {
    const local = this.local();
    return local + estimateOffset(this.bounds, local).offsetMs;
  }

  /** The offset in use (server minus local, ms) and how far off it may be. */
  offset(): { offsetMs: number; errorMs: number } {
    return estimateOffset(this.bounds, this.local());
  }
}
