/**
 * Quantiles of a Prometheus histogram, estimated as PromQL's
 * histogram_quantile does: find the bucket the rank falls in and interpolate
 * linearly within it. Used to report client wait from the sidecars'
 * `poolkeeper_sidecar_client_wait_seconds` without keeping every sample.
 */

/** Cumulative bucket counts by upper bound (`le`), as prom-client's Histogram.get() reports them, plus the total count. */
export interface HistogramCounts {
  /** Upper bound -> cumulative count; +Inf is the total. */
  buckets: ReadonlyMap<number, number>;
  count: number;
}

/** An empty histogram. */
export const EMPTY_HISTOGRAM: HistogramCounts = { buckets: new Map(), count: 0 };

/** a + b, bucket by bucket (bounds missing on one side count as 0). */
export function addHistograms(a: HistogramCounts, b: HistogramCounts): HistogramCounts {
  const buckets = new Map(a.buckets);
  for (const [le, n] of b.buckets) buckets.set(le, (buckets.get(le) ?? 0) + n);
  return { buckets, count: a.count + b.count };
}

/** later - earlier (the observations made in between); negative counts (a reset) become 0. */
export function subtractHistograms(later: HistogramCounts, earlier: HistogramCounts): HistogramCounts {
  const buckets = new Map<number, number>();
  for (const [le, n] of later.buckets) buckets.set(le, Math.max(0, n - (earlier.buckets.get(le) ?? 0)));
  return { buckets, count: Math.max(0, later.count - earlier.count) };
}

/**
 * The q-quantile (0 < q <= 1), or undefined without observations. Within a
 * bucket the observations are taken as evenly spread from the bucket's lower
 * bound (0 for the first) to its upper bound; a rank beyond the last finite
 * bound returns that bound (the estimate cannot say more).
 */
export function histogramQuantile(q: number, histogram: HistogramCounts): number | undefined {
  if (histogram.count <= 0) return undefined;
  const bounds = [...histogram.buckets.keys()].filter((le) => Number.isFinite(le)).sort((x, y) => x - y);
  const rank = q * histogram.count;
  let lower = 0;
  let below = 0;
  for (const le of bounds) {
    const cumulative = histogram.buckets.get(le) ?? 0;
    if (cumulative >= rank) {
      const inBucket = cumulative - below;
      return inBucket <= 0 ? le : lower + (le - lower) * ((rank - below) / inBucket);
    }
    lower = le;
    below = cumulative;
  }
  return bounds.length > 0 ? bounds[bounds.length - 1] : undefined;
}
