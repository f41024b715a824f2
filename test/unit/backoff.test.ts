import assert from 'node:assert/strict';
import { ApiReachability, Backoff, describeApiError } from '../../src/kube/backoff.ts';
import { KubeApiError } from '../../src/kube/http.ts';

describe('retry backoff', function () {
  it('grows exponentially up to its maximum and starts over after a success', function () {
    const backoff = new Backoff({ initialMs: 100, maxMs: 1000, jitter: 0 });
    assert.deepEqual([backoff.next(), backoff.next(), backoff.next(), backoff.next(), backoff.next()], [100, 200, 400, 800, 1000]);
    backoff.reset();
    assert.equal(backoff.next(), 100);
  });

  it('keeps jittered delays within [delay * (1 - jitter), delay]', function () {
    const backoff = new Backoff({ initialMs: 1000, maxMs: 1000, jitter: 0.2 });
    for (let i = 0; i < 100; i++) {
      const d = backoff.next();
      assert.ok(d >= 800 && d <= 1000, String(d));
    }
  });

  it('wakes every waiting retry when the API server answers again after an outage', async function () {
    const reachability = new ApiReachability();
    reachability.failed(Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:6443'), { code: 'ECONNREFUSED' }));
    const started = Date.now();
    const sleeps = [reachability.sleep(30_000), reachability.sleep(30_000)];
    setTimeout(() => reachability.succeeded(), 50);
    await Promise.all(sleeps);
    assert.ok(Date.now() - started < 1000);
  });

  it('does not treat a 4xx (other than 429) as an outage', async function () {
    const reachability = new ApiReachability();
    reachability.failed(new KubeApiError(403, 'Forbidden', 'GET /x: 403 Forbidden: no'));
    const started = Date.now();
    const sleep = reachability.sleep(200);
    reachability.succeeded();
    await sleep;
    assert.ok(Date.now() - started >= 150, 'slept its full delay');
  });

  it('describes errors in one line', function () {
    assert.equal(describeApiError(new KubeApiError(429, 'TooManyRequests', 'GET /apis/x: 429 TooManyRequests: storage is (re)initializing\nmore')), 'GET /apis/x: 429 TooManyRequests: storage is (re)initializing');
    assert.equal(describeApiError(Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' })), 'ECONNRESET: socket hang up');
  });
});
