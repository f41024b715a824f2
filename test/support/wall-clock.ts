/**
 * Steps this process's wall clock, as an NTP correction or a resumed VM does
 * to the node's: `Date.now()` and `new Date()` read `offsetMs` away from the
 * system's time, while the monotonic clock (`performance.now()`, timers) goes
 * on as before. Returns the function that puts the clock back.
 */
export function stepWallClock(offsetMs: number): () => void {
  const SystemDate = globalThis.Date;
  class SteppedDate extends SystemDate {
    constructor(...args: unknown[]) {
      if (args.length === 0) super(SystemDate.now() + offsetMs);
      else super(...(args as [string | number | Date]));
    }

    static override now(): number {
      return SystemDate.now() + offsetMs;
    }
  }
  globalThis.Date = SteppedDate as DateConstructor;
  return () => {
    globalThis.Date = SystemDate;
  };
}
