/** Histogram quantiles as PromQL's histogram_quantile estimates them. */
import assert from 'node:assert/strict';
import { addHistograms, EMPTY_HISTOGRAM, histogramQuantile, subtractHistograms, type HistogramCounts } from '../../src/core/status/histogram.ts';

function histogram(cumulative: Array<[number, number]>, count: number): HistogramCounts {
  return { buckets: new Map(cumulative), count };
}

describe('histogram quantiles', function () {
  it('interpolates within the bucket the rank falls in', function () {
    // 100 observations: 50 up to 0.001, 40 more up to 0.01, 10 more up to 0.1.
    const h = histogram([[0.001, 50], [0.01, 90], [0.1, 100], [Infinity, 100]], 100);
    assert.equal(histogramQuantile(0.5, h), 0.001);
    assert.ok(Math.abs(histogramQuantile(0.7, h)! - 0.0055) < 1e-12);
    assert.ok(Math.abs(histogramQuantile(0.99, h)! - 0.091) < 1e-12);
    assert.ok(Math.abs(histogramQuantile(0.25, h)! - 0.0005) < 1e-12);
  });

  it('returns the last finite bound for ranks in +Inf, and undefined without observations', function () {
    assert.equal(histogramQuantile(0.99, histogram([[0.5, 1], [1, 1], [Infinity, 10]], 10)), 1);
    assert.equal(histogramQuantile(0.5, EMPTY_HISTOGRAM), undefined);
  });

  it('adds and subtracts bucket by bucket', function () {
    const a = histogram([[0.01, 2], [0.1, 3], [Infinity, 3]], 3);
    const b = histogram([[0.01, 1], [0.1, 5], [Infinity, 6]], 6);
    const sum = addHistograms(a, b);
    assert.deepEqual([...sum.buckets], [[0.01, 3], [0.1, 8], [Infinity, 9]]);
    assert.equal(sum.count, 9);
    const delta = subtractHistograms(sum, a);
    assert.deepEqual([...delta.buckets], [...b.buckets]);
    assert.equal(subtractHistograms(a, sum).count, 0);
  });
});
