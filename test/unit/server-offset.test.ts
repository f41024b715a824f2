import assert from 'node:assert/strict';
import fc from 'fast-check';
import { estimateOffset, MAX_DRIFT_PER_MS, narrowOffset, type OffsetBounds } from '../../src/core/clock/server-offset.ts';

/** The Date header a server whose clock reads `serverMs` sends (whole seconds, as RFC 9110 has it). */
const httpDate = (serverMs: number): string => new Date(Math.floor(serverMs / 1000) * 1000).toUTCString();

describe('the API server clock offset learnt from Date headers', function () {
  it('one answer bounds the offset within a second plus the round trip', function () {
    // The server runs 30.25 s ahead; it read its clock 5 ms into a 20 ms round trip.
    const bounds = narrowOffset(undefined, { sentMs: 1_000_000, receivedMs: 1_000_020, date: httpDate(1_000_005 + 30_250) })!;
    assert.ok(bounds.low <= 30_250 && 30_250 <= bounds.high, JSON.stringify(bounds));
    assert.ok(bounds.high - bounds.low <= 1020, JSON.stringify(bounds));
  });

  it('answers at other phases of the second narrow the bounds well below a second, always around the true offset', function () {
    fc.assert(fc.property(
      fc.integer({ min: -3_600_000, max: 3_600_000 }),
      fc.array(fc.record({ gap: fc.integer({ min: 1, max: 5000 }), rtt: fc.integer({ min: 0, max: 50 }), at: fc.double({ min: 0, max: 1, noNaN: true }) }), { minLength: 1, maxLength: 60 }),
      (offset, requests) => {
        let local = 1_700_000_000_000;
        let bounds: OffsetBounds | undefined;
        for (const r of requests) {
          local += r.gap;
          const serverRead = local + r.rtt * r.at + offset;
          bounds = narrowOffset(bounds, { sentMs: local, receivedMs: local + r.rtt, date: httpDate(serverRead) });
          local += r.rtt;
          assert.ok(bounds && bounds.low <= offset + 1e-6 && offset <= bounds.high + 1e-6, `${offset} outside ${JSON.stringify(bounds)}`);
          const estimate = estimateOffset(bounds, local);
          assert.ok(Math.abs(estimate.offsetMs - offset) <= estimate.errorMs + 1e-6);
        }
      },
    ));
    // Sixty answers a second apart at a drifting phase: far sharper than one.
    let bounds: OffsetBounds | undefined;
    for (let i = 0; i < 60; i++) {
      const local = 1_700_000_000_000 + i * 1037;
      bounds = narrowOffset(bounds, { sentMs: local, receivedMs: local + 2, date: httpDate(local + 1 - 12_345) });
    }
    assert.ok(estimateOffset(bounds, bounds!.atMs).errorMs < 50, JSON.stringify(bounds));
  });

  it('widens with time for drift, and starts again from an answer that does not fit (a clock stepped)', function () {
    let bounds = narrowOffset(undefined, { sentMs: 0, receivedMs: 10, date: httpDate(5_000) })!;
    const width = bounds.high - bounds.low;
    assert.ok(Math.abs(estimateOffset(bounds, 600_000).errorMs * 2 - (width + 2 * 599_990 * MAX_DRIFT_PER_MS)) < 1e-6);
    // The server's clock stepped an hour forward.
    bounds = narrowOffset(bounds, { sentMs: 20_000, receivedMs: 20_010, date: httpDate(20_005 + 3_600_000) })!;
    assert.ok(bounds.low > 3_590_000, JSON.stringify(bounds));
  });

  it('ignores answers without a usable Date, and is 0 with no bound before any', function () {
    assert.equal(narrowOffset(undefined, { sentMs: 0, receivedMs: 5, date: 'yesterday-ish' }), undefined);
    assert.equal(narrowOffset(undefined, { sentMs: 10, receivedMs: 5, date: httpDate(0) }), undefined);
    assert.deepEqual(estimateOffset(undefined, 0), { offsetMs: 0, errorMs: Infinity });
  });
});
