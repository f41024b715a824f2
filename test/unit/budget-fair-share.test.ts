/**
 * fairShares against a reference model: the straightforward water-filling with
 * the remainder handed out one connection at a time by a linear scan (the
 * planner's original algorithm, O(units x leftover)). The production version
 * must give exactly the same shares on every input.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { fairShares, type ShareUnit } from '../../src/core/budget/index.ts';

const FRACTION_EPSILON = 1e-9;

function clamp(value: number, low: number, high: number): number {
  return Math.min(high, Math.max(low, value));
}

/** The reference: 200 bisection steps, then one scan over every unit per leftover connection. */
function referenceFairShares(units: readonly ShareUnit[], capacity: number): Map<string, number> {
  const shares = new Map<string, number>();
  if (units.length === 0) return shares;
  const sumHigh = units.reduce((sum, u) => sum + u.high, 0);
  if (sumHigh <= capacity) {
    for (const u of units) shares.set(u.key, u.high);
    return shares;
  }
  const total = (level: number): number => units.reduce((sum, u) => sum + clamp(u.weight * level, u.low, u.high), 0);
  let below = 0;
  let above = 1;
  for (let i = 0; i < 1100 && total(above) < capacity; i += 1) above *= 2;
  for (let i = 0; i < 200; i += 1) {
    const middle = (below + above) / 2;
    if (total(middle) < capacity) below = middle;
    else above = middle;
  }
  const level = above;
  let given = 0;
  for (const u of units) {
    const whole = Math.min(u.high, Math.max(u.low, Math.floor(clamp(u.weight * level, u.low, u.high) + FRACTION_EPSILON)));
    shares.set(u.key, whole);
    given += whole;
  }
  const takers = units.filter((u) => u.takesRemainder).sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  while (given < capacity) {
    let best: ShareUnit | undefined;
    for (const u of takers) {
      const share = shares.get(u.key) ?? 0;
      if (share >= u.high) continue;
      if (!best || (share + 1) * best.weight < ((shares.get(best.key) ?? 0) + 1) * u.weight) best = u;
    }
    if (!best) break;
    shares.set(best.key, (shares.get(best.key) ?? 0) + 1);
    given += 1;
  }
  return shares;
}

/** Units with unique keys in random order; few distinct weights so that ties are common. */
function unitsArbitrary(maxUnits: number, maxWeight: number): fc.Arbitrary<ShareUnit[]> {
  return fc.array(fc.record({
    weight: fc.oneof(fc.constantFrom(1, 2, 3), fc.integer({ min: 1, max: maxWeight })),
    low: fc.integer({ min: 0, max: 5 }),
    extra: fc.option(fc.integer({ min: 0, max: 30 }), { nil: undefined }),
    takesRemainder: fc.integer({ min: 0, max: 6 }).map((n) => n !== 0),
    key: fc.string({ minLength: 1, maxLength: 6 }),
  }), { maxLength: maxUnits }).map((raw) => {
    const seen = new Set<string>();
    return raw.filter((u) => !seen.has(u.key) && seen.add(u.key)).map((u): ShareUnit => ({
      key: u.key, weight: u.weight, low: u.low, high: u.extra === undefined ? Infinity : u.low + u.extra, takesRemainder: u.takesRemainder,
    }));
  });
}

describe('fair shares: the heap remainder against the reference model', function () {
  it('property: the same shares as the reference on random units and capacities', function () {
    fc.assert(fc.property(unitsArbitrary(40, 1000), fc.integer({ min: 0, max: 2000 }), (units, extraCapacity) => {
      const capacity = units.reduce((s, u) => s + u.low, 0) + extraCapacity;
      assert.deepEqual(fairShares(units, capacity), referenceFairShares(units, capacity));
    }), { numRuns: 1000 });
  });

  it('property: the same shares with many equal units (remainders decided by key)', function () {
    fc.assert(fc.property(fc.integer({ min: 1, max: 400 }), fc.integer({ min: 1, max: 4 }), fc.integer({ min: 0, max: 5000 }), fc.integer({ min: 0, max: 2 }), (count, weights, capacity, low) => {
      const units = Array.from({ length: count }, (_, i): ShareUnit => ({ key: `ns/pod-${(i * 7919) % count}`, weight: 1 + (i % weights), low: Math.min(low, Math.floor(capacity / count)), high: Infinity, takesRemainder: i % 11 !== 5 }));
      assert.deepEqual(fairShares(units, capacity), referenceFairShares(units, capacity));
    }), { numRuns: 200 });
  });

  it('the same shares at fleet size (2,000 pods, a limit that leaves a large remainder)', function () {
    const units = Array.from({ length: 2000 }, (_, i): ShareUnit => ({ key: `ns/web-${String(i).padStart(5, '0')}`, weight: 1 + (i % 3), low: 1, high: i % 5 === 0 ? 4 : Infinity, takesRemainder: true }));
    for (const capacity of [2000, 5999, 7777]) assert.deepEqual(fairShares(units, capacity), referenceFairShares(units, capacity));
  });
});
