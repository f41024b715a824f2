/**
 * The sidecar's PoolMember agent against the real API server: grants are
 * applied as they arrive, and a shrink that comes with `drain: true` (a
 * terminating pod) waits for the drain grace so the app can finish its
 * requests, while the status keeps the old acknowledgement meanwhile.
 */
import assert from 'node:assert/strict';
import pino from 'pino';
import type { PoolMember } from '../../src/api/index.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import { KubeHttp } from '../../src/kube/http.ts';
import { PoolMemberAgent } from '../../src/sidecar/control-plane.ts';
import { ApiFront } from '../support/api-front.ts';
import { testEnvironment } from '../support/hooks.ts';
import { ObedientSidecarDouble, eventually, freshNamespace, installCrds } from '../support/budget-fixture.ts';

describe('PoolMember agent', function () {
  let kube: KubeControlPlane;
  let namespace: string;

  before(async function () {
    kube = await testEnvironment().kube();
    await installCrds(kube);
    namespace = freshNamespace('agent');
    kube.kubectl(['create', 'namespace', namespace]);
  });

  function writeSpec(connections: number, generation: number, drain: boolean): void {
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'PoolMember', metadata: { name: 'pod-a', namespace },
      spec: {
        connection: 'db', grant: { connections, generation }, processesPerPod: 1, drain,
        database: { host: '127.0.0.1', port: 5432, dbname: 'app', sslMode: 'disable' },
        pool: { mode: 'transaction', poolTimeout: 30, poolRecycle: 3600, poolPrePing: false, idleTimeout: 600 },
      },
    }));
  }

  function member(): PoolMember {
    return JSON.parse(kube.kubectl(['-n', namespace, 'get', 'pm', 'pod-a', '-o', 'json'])) as PoolMember;
  }

  /** An agent (heartbeat a minute away) that reaches the API server through a front the test switches, its grant of 5 acknowledged; stopped after `body`. */
  async function withFrontedAgent(body: (parts: { front: ApiFront; double: ObedientSidecarDouble; agent: PoolMemberAgent }) => Promise<void>): Promise<void> {
    writeSpec(5, 1, false);
    const front = new ApiFront(kube.server);
    await front.start();
    await front.set('up');
    const double = new ObedientSidecarDouble();
    const agent = new PoolMemberAgent({ http: new KubeHttp(front.kubeConfig(kube.kubeConfig())), namespace, podName: 'pod-a', target: double, logger: pino({ level: 'silent' }), version: 'test', heartbeatMs: 60_000 });
    await agent.start();
    try {
      await eventually('grant acknowledged', () => member().status?.acknowledgedConnections === 5);
      await body({ front, double, agent });
    } finally {
      await agent.stop();
      await front.stop();
    }
  }

  it('applies grants at once, and defers a draining shrink by the grace period', async function () {
    writeSpec(5, 1, false);
    const double = new ObedientSidecarDouble();
    const agent = new PoolMemberAgent({ http: new KubeHttp(kube.kubeConfig()), namespace, podName: 'pod-a', target: double, logger: pino({ level: 'silent' }), version: 'test', drainGraceMs: 1500 });
    await agent.start();
    try {
      await eventually('grant 5 acknowledged', () => member().status?.acknowledgedConnections === 5);
      writeSpec(3, 2, false);
      await eventually('plain shrink to 3 acknowledged', () => member().status?.acknowledgedGeneration === 2 && member().status?.acknowledgedConnections === 3);
      const drainAt = Date.now();
      writeSpec(0, 3, true);
      await eventually('the agent saw generation 3', () => agent.generation === 3);
      assert.equal(double.status().acknowledgedConnections, 3, 'still serving with the old grant');
      assert.equal(member().status?.acknowledgedGeneration, 2, 'the old acknowledgement stands, so the controller keeps the reservation');
      await eventually('drain shrink applied after the grace', () => member().status?.acknowledgedGeneration === 3 && member().status?.acknowledgedConnections === 0);
      assert.ok(Date.now() - drainAt >= 1400, 'applied only after the grace period');
    } finally {
      await agent.stop();
    }
  });

  it('sends the waiting clients with its heartbeats, and never writes for a change of them alone', async function () {
    writeSpec(5, 1, false);
    const double = new ObedientSidecarDouble();
    let waiting = 0;
    let reads = 0;
    const agent = new PoolMemberAgent({
      http: new KubeHttp(kube.kubeConfig()), namespace, podName: 'pod-a', target: double, logger: pino({ level: 'silent' }), version: 'test', heartbeatMs: 1000,
      waitingClients: () => {
        reads += 1;
        return waiting;
      },
    });
    await agent.start();
    try {
      await eventually('grant acknowledged with 0 waiting', () => member().status?.acknowledgedConnections === 5 && member().status?.waitingClients === 0);
      waiting = 3;
      const readsBefore = reads;
      await eventually('the next heartbeat says 3 waiting', () => member().status?.waitingClients === 3, 10_000);
      // Only status writes read the number: one per heartbeat, none of its own.
      assert.ok(reads - readsBefore <= 3, `read ${reads - readsBefore} times`);
      assert.match(kube.kubectl(['-n', namespace, 'get', 'pm', 'pod-a']), /WAITING[\s\S]*pod-a\s+5\s+5\s+3\s/);
    } finally {
      await agent.stop();
    }
  });

  it('writes a change of database reachability at once, not at the next heartbeat, as a DatabaseReachable condition', async function () {
    writeSpec(5, 1, false);
    const double = new ObedientSidecarDouble();
    const agent = new PoolMemberAgent({ http: new KubeHttp(kube.kubeConfig()), namespace, podName: 'pod-a', target: double, logger: pino({ level: 'silent' }), version: 'test', heartbeatMs: 60_000 });
    await agent.start();
    try {
      await eventually('grant acknowledged', () => member().status?.acknowledgedConnections === 5);
      assert.equal(member().status?.conditions, undefined, 'nothing reported before a login');
      const since = Date.parse('2026-01-02T03:04:05Z');
      double.setReachability({ reachable: false, reason: 'LoginFailed', message: 'SQLSTATE 28P01: password authentication failed for user "app"', since });
      // The heartbeat is a minute away: only a write of its own shows it this soon.
      await eventually('the condition written', () => member().status?.conditions?.[0]?.status === 'False', 5_000);
      assert.deepEqual(member().status?.conditions, [{ type: 'DatabaseReachable', status: 'False', reason: 'LoginFailed', message: 'SQLSTATE 28P01: password authentication failed for user "app"', lastTransitionTime: '2026-01-02T03:04:05Z' }]);
      assert.match(kube.kubectl(['-n', namespace, 'get', 'pm', 'pod-a']), /REACHABLE[\s\S]*pod-a\s+5\s+5\s+(\d+\s+)?False\s/);
      double.setReachability({ reachable: true, reason: 'LoggedIn', message: 'logged in as app', since: since + 5_000 });
      await eventually('reachable again', () => member().status?.conditions?.[0]?.status === 'True', 5_000);
      assert.equal(member().status?.conditions?.[0]?.lastTransitionTime, '2026-01-02T03:04:10Z');
    } finally {
      await agent.stop();
    }
    // The sidecar restarts (a new container of the pod): what the earlier one said goes until it logs in.
    const restarted = new PoolMemberAgent({ http: new KubeHttp(kube.kubeConfig()), namespace, podName: 'pod-a', target: new ObedientSidecarDouble(), logger: pino({ level: 'silent' }), version: 'test', heartbeatMs: 60_000 });
    await restarted.start();
    try {
      await eventually('the earlier report removed', () => member().status?.conditions === undefined, 5_000);
    } finally {
      await restarted.stop();
    }
  });

  it('writes a status the API server turned away (429 with Retry-After, then no answer at all) again within seconds, not at the next heartbeat', async function () {
    await withFrontedAgent(async ({ front, double }) => {
      // API Priority and Fairness turns every request away: the change's write gets 429.
      await front.set('stub', [429]);
      const stubbedBefore = front.stubbed;
      double.setReachability({ reachable: false, reason: 'LoginFailed', message: 'refused', since: Date.now() });
      await eventually('the write turned away', () => front.stubbed > stubbedBefore, 5_000);
      await new Promise((r) => setTimeout(r, 1500));
      await front.set('up');
      const upAt = Date.now();
      // The heartbeat is a minute away.
      await eventually('the condition written after the 429', () => member().status?.conditions?.[0]?.status === 'False', 10_000);
      console.log(`      written ${((Date.now() - upAt) / 1000).toFixed(2)} s after the API server accepted requests again`);
      // Now nothing answers at all (connection refused), then the server is back.
      await front.set('down');
      double.setReachability({ reachable: true, reason: 'LoggedIn', message: 'logged in as app', since: Date.now() });
      await new Promise((r) => setTimeout(r, 2000));
      await front.set('up');
      await eventually('the condition written after the outage', () => member().status?.conditions?.[0]?.status === 'True', 15_000);
    });
  });

  it('keeps writing its drained status while the API server turns it away (429, then no answer) before it lets the sidecar exit, so that the controller does not hold the pod\'s share for the departure hold', async function () {
    await withFrontedAgent(async ({ front, double, agent }) => {
      // The pod terminates while the API server is overloaded: the drain's own write and the final one get 429.
      await front.set('stub', [429]);
      const stubbedBefore = front.stubbed;
      double.setDrained();
      // (A longer window than the sidecar's own 4 s: a loaded machine must not fail the test.)
      const flushed = agent.flush(15_000);
      await eventually('the final write turned away', () => front.stubbed > stubbedBefore + 1, 5_000);
      await front.set('down');
      await new Promise((r) => setTimeout(r, 1500));
      await front.set('up');
      assert.equal(await flushed, true, 'the final status was written');
      await agent.stop();
      assert.equal(member().status?.drained, true, 'the controller can read that the pod drained');
    });
  });

  it('beats as often as its grant table says, at a random point of the new interval', async function () {
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'PoolGrant', metadata: { name: 'db', namespace }, spec: { connection: 'db', generation: 1, perPod: 5, heartbeatSeconds: 1 } }));
    writeSpec(5, 1, false);
    const agent = new PoolMemberAgent({ http: new KubeHttp(kube.kubeConfig()), namespace, podName: 'pod-a', target: new ObedientSidecarDouble(), logger: pino({ level: 'silent' }), version: 'test' });
    await agent.start();
    try {
      await eventually('acknowledged', () => member().status?.acknowledgedConnections === 5);
      await new Promise((r) => setTimeout(r, 1500));
      // Without the table's 1 s the next beat would come 10 s after the last write.
      const before = member().status?.heartbeatTime;
      await eventually('a heartbeat within 4 s', () => member().status?.heartbeatTime !== before, 4_000);
    } finally {
      await agent.stop();
      kube.kubectl(['-n', namespace, 'delete', 'poolgrant', 'db']);
    }
  });

  it('does not grow to its PoolMember\'s older grant when its grant table goes, and takes a new table that covers it', async function () {
    const table = (generation: number, perPod: number): void => {
      kube.kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'PoolGrant', metadata: { name: 'db', namespace }, spec: { connection: 'db', generation, perPod } }));
    };
    // On the table from generation 3; its own grant (8) is from before the switch.
    table(3, 4);
    writeSpec(8, 1, false);
    kube.kubectl(['-n', namespace, 'patch', 'pm', 'pod-a', '--type=merge', '-p', JSON.stringify({ spec: { tableFrom: 3 } })]);
    const double = new ObedientSidecarDouble();
    const agent = new PoolMemberAgent({ http: new KubeHttp(kube.kubeConfig()), namespace, podName: 'pod-a', target: double, logger: pino({ level: 'silent' }), version: 'test' });
    await agent.start();
    try {
      await eventually('the table\'s 4 acknowledged', () => member().status?.acknowledgedConnections === 4 && member().status?.tableGeneration === 3);
      kube.kubectl(['-n', namespace, 'delete', 'poolgrant', 'db']);
      await new Promise((r) => setTimeout(r, 1500));
      assert.equal(double.status().acknowledgedConnections, 4, 'kept at the table\'s 4, not grown to the PoolMember\'s 8');
      // A new table that covers the pod (its generation past tableFrom) gives its grant again.
      table(5, 6);
      await eventually('the new table\'s 6 acknowledged', () => member().status?.acknowledgedConnections === 6 && member().status?.tableGeneration === 5);
    } finally {
      await agent.stop();
      kube.kubectl(['-n', namespace, 'delete', 'poolgrant', 'db', '--ignore-not-found']);
    }
  });
});
