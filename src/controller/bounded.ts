/**
 * Runs API writes with a bound on how many are in flight: one round trip per
 * write in turn makes a rebalance of N pods cost N round trips, while an
 * unbounded burst would queue behind the client's connection cap anyway and
 * keep running after a failure the caller has already given up on.
 */

/**
 * Calls `fn` on every item with at most `limit` calls in flight. After the
 * first failure it starts no more, waits for those in flight (so nothing is
 * still writing when the caller replans), and rethrows that first failure.
 */
export async function forEachBounded<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failed = false;
  let failure: unknown;
  const worker = async (): Promise<void> => {
    while (!failed && next < items.length) {
      const item = items[next] as T;
      next += 1;
      try {
        await fn(item);
      } catch (err) {
        if (!failed) failure = err;
        failed = true;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  if (failed) throw failure;
}
