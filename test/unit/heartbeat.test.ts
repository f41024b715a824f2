/**
 * The heartbeat a grant table asks of its sidecars: every 10 s for a small
 * fleet, slower as the fleet grows, so the fleet's heartbeats stay a bounded
 * load on the API server.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { HEARTBEAT_WRITES_PER_SECOND, MAX_HEARTBEAT_SECONDS, heartbeatSecondsFor, heartbeatTimeoutMs, sidecarPacingFor } from '../../src/core/budget/index.ts';

describe('heartbeat interval', function () {
  it('is 10 s up to 200 pods and doubles with every doubling of pods', function () {
    assert.deepEqual([0, 1, 200, 201, 400, 401, 1_000, 3_000, 10_000, 1_000_000].map(heartbeatSecondsFor), [10, 10, 10, 20, 20, 40, 80, 160, 640, 640]);
  });

  it('keeps the heartbeat writes of any fleet at or under 20 a second (below the cap) and never beats faster for more pods', function () {
    fc.assert(fc.property(fc.nat(200_000), fc.nat(200_000), (a, b) => {
      const seconds = heartbeatSecondsFor(a);
      assert.ok(a / seconds <= HEARTBEAT_WRITES_PER_SECOND || seconds === MAX_HEARTBEAT_SECONDS);
      if (a <= b) assert.ok(heartbeatSecondsFor(a) <= heartbeatSecondsFor(b));
    }));
  });

  it('counts a sidecar unresponsive after three missed heartbeats, never sooner than the configured timeout', function () {
    assert.equal(heartbeatTimeoutMs(undefined, 60_000), 60_000);
    assert.equal(heartbeatTimeoutMs(10, 60_000), 60_000);
    assert.equal(heartbeatTimeoutMs(640, 60_000), 1_920_000);
    assert.equal(heartbeatTimeoutMs(10, 1_000), 30_000);
  });

  it('spreads the status writes that follow channel acknowledgements over pods / 20 seconds, at least 1, at most a heartbeat', function () {
    assert.deepEqual(sidecarPacingFor(8), { heartbeatSeconds: 10, statusDelaySeconds: 1 });
    assert.deepEqual(sidecarPacingFor(200), { heartbeatSeconds: 10, statusDelaySeconds: 10 });
    assert.deepEqual(sidecarPacingFor(1000), { heartbeatSeconds: 80, statusDelaySeconds: 50 });
    assert.deepEqual(sidecarPacingFor(10000), { heartbeatSeconds: 640, statusDelaySeconds: 500 });
    for (const pods of [1, 7, 199, 201, 999, 4321, 99999]) {
      const { heartbeatSeconds, statusDelaySeconds } = sidecarPacingFor(pods);
      assert.ok(statusDelaySeconds >= 1 && statusDelaySeconds <= heartbeatSeconds);
      assert.ok(pods / statusDelaySeconds <= 20 || statusDelaySeconds === heartbeatSeconds, `${pods} pods: at most 20 follow-up writes a second`);
    }
  });
});
