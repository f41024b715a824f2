/** Condition helpers: transition times move only with status changes. */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { conditionTime, conditionsEqual, findCondition, isConditionTrue, removeCondition, setCondition, setConditions, type ConditionUpdate } from '../../src/core/conditions/index.ts';

const t0 = new Date('2026-01-01T00:00:00.123Z');
const t1 = new Date('2026-01-01T00:05:00.999Z');

describe('conditions', function () {
  it('formats times with second precision', function () {
    assert.equal(conditionTime(t0), '2026-01-01T00:00:00Z');
  });

  it('appends a new condition with the generation and time', function () {
    const list = setCondition(undefined, { type: 'Ready', status: 'True', reason: 'Allocated', message: 'ok' }, 3, t0);
    assert.deepEqual(list, [{ type: 'Ready', status: 'True', reason: 'Allocated', message: 'ok', observedGeneration: 3, lastTransitionTime: '2026-01-01T00:00:00Z' }]);
  });

  it('keeps lastTransitionTime when the status is unchanged, updating reason, message and generation', function () {
    const first = setCondition([], { type: 'Ready', status: 'False', reason: 'Waiting', message: 'a' }, 1, t0);
    const second = setCondition(first, { type: 'Ready', status: 'False', reason: 'Pending', message: 'b' }, 2, t1);
    assert.deepEqual(second, [{ type: 'Ready', status: 'False', reason: 'Pending', message: 'b', observedGeneration: 2, lastTransitionTime: '2026-01-01T00:00:00Z' }]);
  });

  it('moves lastTransitionTime when the status changes, in place', function () {
    const list = setConditions([], [
      { type: 'Ready', status: 'False', reason: 'Waiting', message: '' },
      { type: 'Oversubscribed', status: 'False', reason: 'WithinLimit', message: '' },
    ], 1, t0);
    const next = setCondition(list, { type: 'Ready', status: 'True', reason: 'Allocated', message: '' }, 1, t1);
    assert.deepEqual(next.map((c) => [c.type, c.lastTransitionTime]), [['Ready', '2026-01-01T00:05:00Z'], ['Oversubscribed', '2026-01-01T00:00:00Z']]);
    assert.equal(list[0]!.status, 'False', 'the input list is not modified');
  });

  it('finds, tests and removes conditions', function () {
    const list = setCondition([], { type: 'Degraded', status: 'True', reason: 'NoAck', message: '' }, 1, t0);
    assert.equal(findCondition(list, 'Degraded')?.reason, 'NoAck');
    assert.equal(findCondition(list, 'Ready'), undefined);
    assert.ok(isConditionTrue(list, 'Degraded'));
    assert.ok(!isConditionTrue(list, 'Ready'));
    assert.deepEqual(removeCondition(list, 'Degraded'), []);
  });

  it('property: re-asserting the same state (one update per type) is a fixed point (no needless status writes)', function () {
    const update = fc.record({
      type: fc.constantFrom('Ready', 'Oversubscribed', 'Degraded'),
      status: fc.constantFrom('True' as const, 'False' as const, 'Unknown' as const),
      reason: fc.constantFrom('A', 'B'),
      message: fc.string(),
    });
    fc.assert(fc.property(fc.array(update), fc.uniqueArray(update, { selector: (u) => u.type }), fc.nat(10), (before: ConditionUpdate[], updates: ConditionUpdate[], generation) => {
      const once = setConditions(setConditions([], before, generation, t0), updates, generation, t1);
      const twice = setConditions(once, updates, generation, new Date('2027-01-01T00:00:00Z'));
      assert.ok(conditionsEqual(once, twice));
      assert.equal(new Set(once.map((c) => c.type)).size, once.length, 'one condition per type');
    }));
  });
});
