/**
 * When the controller reconciles a server: a change after a quiet spell at
 * once, a burst of changes once it ends; while a plan waits for
 * acknowledgements, the last one awaited at once and the others not at all;
 * otherwise acknowledgements spaced by four plans.
 */
import assert from 'node:assert/strict';
import { CHANGE_QUIET_MS, RECONCILE_SPACING_MS, ReconcileSchedule, type ScheduleClock } from '../../src/controller/reconcile-schedule.ts';

/** A clock that moves only when told, and a queue that records when each server was queued. */
function harness(planMs = 100): { schedule: ReconcileSchedule; runs: Array<{ at: number; server: string }>; advance: (ms: number) => void; now: () => number } {
  let now = 0;
  const timers: Array<{ at: number; fn: () => void; cancelled: boolean }> = [];
  const clock: ScheduleClock = {
    now: () => now,
    after(delayMs, fn) {
      const timer = { at: now + delayMs, fn, cancelled: false };
      timers.push(timer);
      return { cancel: () => (timer.cancelled = true) };
    },
  };
  const runs: Array<{ at: number; server: string }> = [];
  // A delayed add runs when its time comes, the earliest pending one per server, as the work queue does.
  const pending = new Map<string, number>();
  const sink = {
    add: (server: string) => runs.push({ at: now, server }),
    addAfter: (server: string, delayMs: number) => {
      const due = now + delayMs;
      if ((pending.get(server) ?? Infinity) <= due) return;
      pending.set(server, due);
      clock.after(delayMs, () => {
        if (pending.get(server) !== due) return;
        pending.delete(server);
        runs.push({ at: now, server });
      });
    },
  };
  const advance = (ms: number): void => {
    const until = now + ms;
    for (;;) {
      const due = timers.filter((t) => !t.cancelled && t.at <= until).sort((a, b) => a.at - b.at)[0];
      if (!due) break;
      due.cancelled = true;
      now = due.at;
      due.fn();
    }
    now = until;
  };
  return { schedule: new ReconcileSchedule(sink, () => planMs, clock), runs, advance, now: () => now };
}

describe('reconcile schedule', function () {
  it('runs a change after a quiet spell at once, and a burst of changes once, when it goes quiet', function () {
    const { schedule, runs, advance } = harness();
    schedule.changed('s');
    assert.deepEqual(runs, [{ at: 0, server: 's' }], 'the first change runs at once');
    // A scale-up's pods: one every 10 ms for 100 ms (four plans are 400 ms).
    for (let i = 0; i < 10; i += 1) {
      advance(10);
      schedule.changed('s');
    }
    assert.equal(runs.length, 1, 'nothing while the burst goes on');
    advance(CHANGE_QUIET_MS - 1);
    assert.equal(runs.length, 1);
    advance(1);
    assert.deepEqual(runs.at(-1), { at: 100 + CHANGE_QUIET_MS, server: 's' }, 'once it has been quiet');
    advance(10_000);
    assert.equal(runs.length, 2);
  });

  it('runs a burst that does not end at its longest wait: four plans, at least 200 ms', function () {
    const { schedule, runs, advance } = harness(400);
    schedule.changed('s');
    for (let i = 0; i < 400; i += 1) {
      advance(10);
      schedule.changed('s');
    }
    // The burst began at 10 ms; four plans of 400 ms.
    assert.deepEqual(runs.map((r) => r.at), [0, 10 + 1_600, 10 + 1_600 + 1_600]);
    const { schedule: fast, runs: fastRuns, advance: fastAdvance } = harness(10);
    fast.changed('s');
    for (let i = 0; i < 30; i += 1) {
      fastAdvance(10);
      fast.changed('s');
    }
    assert.deepEqual(fastRuns.map((r) => r.at), [0, 10 + RECONCILE_SPACING_MS]);
  });

  it('while a plan waits for acknowledgements, runs once the last one arrives and not before', function () {
    const { schedule, runs, advance } = harness(500);
    schedule.started('s');
    schedule.finished('s', new Set(['a', 'b', 'c']));
    schedule.answered('s', 'a');
    schedule.answered('s', 'x');
    schedule.answered('s');
    advance(5_000);
    assert.deepEqual(runs, [], 'no reconcile for some of them, a pod not awaited, or an echo');
    schedule.answered('s', 'b');
    schedule.answered('s', 'c');
    assert.deepEqual(runs, [{ at: 5_000, server: 's' }], 'the last one awaited runs at once');
  });

  it('counts the answers heard while the reconcile ran: all in, it runs again at once', function () {
    const { schedule, runs } = harness();
    schedule.started('s');
    schedule.answered('s', 'a');
    schedule.answered('s', 'b');
    assert.deepEqual(runs, []);
    schedule.finished('s', new Set(['a', 'b']));
    assert.equal(runs.length, 1);
    schedule.started('s');
    schedule.answered('s', 'a');
    schedule.finished('s', new Set(['a', 'b']));
    assert.equal(runs.length, 1, 'b is still awaited');
  });

  it('leaves the last answer to the end of a burst of changes under way', function () {
    const { schedule, runs, advance } = harness();
    schedule.started('s');
    schedule.finished('s', new Set(['a']));
    schedule.changed('s');
    advance(10);
    schedule.changed('s');
    assert.equal(runs.length, 1);
    schedule.answered('s', 'a');
    assert.equal(runs.length, 1, 'the burst reconciles');
    advance(CHANGE_QUIET_MS);
    assert.equal(runs.length, 2);
  });

  it('spaces acknowledgements and echoes by four plans when nothing is awaited', function () {
    const { schedule, runs, advance } = harness(300);
    schedule.started('s');
    schedule.finished('s', new Set());
    schedule.answered('s', 'a');
    schedule.answered('s');
    advance(1_199);
    assert.deepEqual(runs, []);
    advance(1);
    assert.deepEqual(runs, [{ at: 1_200, server: 's' }]);
    // Heard while a settled reconcile ran: spaced from its start.
    schedule.started('s');
    schedule.answered('s');
    advance(100);
    schedule.finished('s', new Set());
    advance(1_099);
    assert.equal(runs.length, 1);
    advance(1);
    assert.equal(runs.length, 2);
  });
});
