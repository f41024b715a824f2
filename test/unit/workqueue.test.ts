import assert from 'node:assert/strict';
import { WorkQueue } from '../../src/kube/workqueue.ts';

const tick = (ms = 5): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('WorkQueue', function () {
  it('de-duplicates a key that is waiting', async function () {
    const queue = new WorkQueue();
    const seen: string[] = [];
    queue.add('a');
    queue.add('a');
    queue.add('b');
    const running = queue.run(1, async (key) => {
      seen.push(key);
      await tick();
    });
    await tick(50);
    queue.shutDown();
    await running;
    assert.deepEqual(seen, ['a', 'b']);
  });

  it('never processes one key twice at once, and reprocesses a key added meanwhile', async function () {
    const queue = new WorkQueue();
    let concurrent = 0;
    let maxConcurrent = 0;
    let runs = 0;
    const running = queue.run(4, async () => {
      concurrent += 1;
      maxConcurrent = Math.max(maxConcurrent, concurrent);
      runs += 1;
      if (runs === 1) queue.add('k');
      await tick(10);
      concurrent -= 1;
    });
    queue.add('k');
    await tick(80);
    queue.shutDown();
    await running;
    assert.equal(maxConcurrent, 1);
    assert.equal(runs, 2);
  });

  it('retries a failing key with growing delays, then forgets after success', async function () {
    const queue = new WorkQueue({ baseDelayMs: 10, maxDelayMs: 1000 });
    const times: number[] = [];
    const errors: string[] = [];
    const running = queue.run(1, () => {
      times.push(Date.now());
      if (times.length < 4) return Promise.reject(new Error(`fail ${times.length}`));
      return Promise.resolve();
    }, (key, err) => errors.push(`${key}: ${(err as Error).message}`));
    queue.add('x');
    for (let i = 0; i < 100 && times.length < 4; i += 1) await tick(10);
    queue.shutDown();
    await running;
    assert.equal(times.length, 4);
    assert.deepEqual(errors, ['x: fail 1', 'x: fail 2', 'x: fail 3']);
    const gaps = times.slice(1).map((t, i) => t - times[i]!);
    assert.ok(gaps[2]! >= gaps[0]!, `backoff grows: ${gaps.join(', ')}`);
  });

  it('requeues after the delay a handler asks for, earliest pending delay winning', async function () {
    const queue = new WorkQueue();
    let runs = 0;
    const running = queue.run(1, () => {
      runs += 1;
      return Promise.resolve(runs === 1 ? { requeueAfterMs: 20 } : undefined);
    });
    queue.addAfter('r', 10_000);
    queue.addAfter('r', 5);
    for (let i = 0; i < 50 && runs < 2; i += 1) await tick(10);
    queue.shutDown();
    await running;
    assert.equal(runs, 2);
  });
});
