import { performance } from 'node:perf_hooks';

/** Wall time when the process started; `performance.timeOrigin` is a getter, read once. */
const ORIGIN = performance.timeOrigin;

/**
 * The clock the binaries time waits, ages and deadlines by: milliseconds
 * since the epoch, from the wall clock when the process started, advanced by
 * a monotonic clock. Unlike Date.now it never steps, so an NTP correction or
 * a resumed VM neither keeps a waiting client for an hour, nor recycles every
 * connection at once, nor ends a controller's departure hold early. It may
 * drift from the wall clock by whatever was stepped since the start.
 */
export function steadyNow(): number {
  return ORIGIN + performance.now();
}
