/**
 * How far the API server's clock is from this process's, learnt from the
 * `Date` header of its answers (RFC 9110, whole seconds). A replica writes
 * wall times other replicas judge (a departure's `until`); judged on each
 * replica's own clock, a replica running S ahead would end such a hold S
 * early. The API server's clock is the one every replica talks to, so the
 * controller times those on it instead.
 *
 * Each answer bounds the offset (server minus local): the server read its
 * clock at some instant between sending and receiving, and the header
 * truncates it to the second, so offset >= date - received and
 * offset < date + 1000 - sent. Intersecting those bounds over many answers
 * narrows them well below a second (the truncation falls at another phase
 * each time). Clocks drift, so the bounds widen with time since they were
 * set; bounds that no longer meet a new answer mean a clock stepped, and
 * the estimate starts again from that answer.
 */

/** What one answer says: when the request went and the answer came (this process's clock, ms), and the `Date` header. */
export interface ClockSample {
  sentMs: number;
  receivedMs: number;
  date: string;
}

/** The offset (server minus local, ms) lies in [low, high]; `atMs` is when (local clock) the bounds were last narrowed. */
export interface OffsetBounds {
  low: number;
  high: number;
  atMs: number;
}

/** How fast two unsynchronised quartz clocks may drift apart: 200 ppm, well above what NTP-less hardware does. */
export const MAX_DRIFT_PER_MS = 200e-6;

/** Bounds widened for the drift since they were set. */
function drifted(bounds: OffsetBounds, nowMs: number): OffsetBounds {
  const widen = Math.max(0, nowMs - bounds.atMs) * MAX_DRIFT_PER_MS;
  return { low: bounds.low - widen, high: bounds.high + widen, atMs: nowMs };
}

/**
 * The bounds after one more answer. A sample without a usable `Date`, or
 * whose times run backwards, changes nothing; one that does not meet the
 * bounds (a clock stepped) replaces them.
 */
export function narrowOffset(bounds: OffsetBounds | undefined, sample: ClockSample): OffsetBounds | undefined {
  const date = Date.parse(sample.date);
  if (Number.isNaN(date) || sample.receivedMs < sample.sentMs) return bounds;
  const fresh: OffsetBounds = { low: date - sample.receivedMs, high: date + 1000 - sample.sentMs, atMs: sample.receivedMs };
  if (bounds === undefined) return fresh;
  const widened = drifted(bounds, sample.receivedMs);
  const low = Math.max(widened.low, fresh.low);
  const high = Math.min(widened.high, fresh.high);
  return low <= high ? { low, high, atMs: sample.receivedMs } : fresh;
}

/** The best single offset (ms) the bounds give at `nowMs`, and how far off it may be; 0 ± Infinity before any answer. */
export function estimateOffset(bounds: OffsetBounds | undefined, nowMs: number): { offsetMs: number; errorMs: number } {
  if (bounds === undefined) return { offsetMs: 0, errorMs: Infinity };
  const b = drifted(bounds, nowMs);
  return { offsetMs: (b.low + b.high) / 2, errorMs: (b.high - b.low) / 2 };
}
