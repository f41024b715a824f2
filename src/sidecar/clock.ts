/**
 * The clock the sidecar (and the SSH tunnel, wherever it runs) times things
 * by: milliseconds since the epoch, from the wall clock when the process
 * started, advanced by a monotonic clock. Unlike Date.now it never steps, so
 * an NTP correction or a resumed VM neither keeps a waiting client for an
 * hour nor recycles every connection at once; it may drift from the wall
 * clock by whatever was stepped since the start, so it is for durations and
 * deadlines, not for times shown to people.
 */
export function steadyNow(): number {
  return performance.timeOrigin + performance.now();
}
