/**
 * The Kubernetes machinery the controller stands on, against the real API
 * server: the informer (list, watch, relist, stall watchdog) and Lease-based
 * leader election between two candidates.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { KubeConfig } from '@kubernetes/client-node';
import pino from 'pino';
import { KubeHttp, type WatchEvent, type WatchHandle } from '../../src/kube/http.ts';
import { Informer, type KubeObject } from '../../src/kube/informer.ts';
import { LeaderElector, type ElectionClock } from '../../src/kube/leader-election.ts';
import { testEnvironment } from '../support/hooks.ts';
import { TcpProxy } from '../support/tcp-proxy.ts';

const logger = pino({ level: 'silent' });

async function eventually(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A TCP proxy in front of the API server, to freeze or cut, and a KubeConfig that goes through it. */
async function behindProxy(server: string, kc: KubeConfig): Promise<{ proxy: TcpProxy; viaProxy: KubeConfig }> {
  const target = new URL(server);
  const proxy = new TcpProxy(target.hostname, Number(target.port));
  await proxy.start();
  const viaProxy = new KubeConfig();
  viaProxy.loadFromOptions({
    clusters: kc.clusters.map((c) => ({ ...c, server: `https://127.0.0.1:${proxy.port}` })),
    users: kc.users, contexts: kc.contexts, currentContext: kc.currentContext,
  });
  return { proxy, viaProxy };
}

describe('kube machinery', function () {
  let namespace: string;

  before(async function () {
    const kube = await testEnvironment().kube();
    namespace = `km-${randomBytes(3).toString('hex')}`;
    kube.kubectl(['create', 'namespace', namespace]);
  });

  it('informer: lists, then sees creates, updates and deletes through its watch', async function () {
    const kube = await testEnvironment().kube();
    const http = new KubeHttp(kube.kubeConfig());
    kube.kubectl(['-n', namespace, 'create', 'configmap', 'before', '--from-literal=a=1']);
    const informer = new Informer<KubeObject & { data?: Record<string, string> }>(http, { path: `/api/v1/namespaces/${namespace}/configmaps`, logger });
    const events: string[] = [];
    informer.onChange((type, obj) => events.push(`${type} ${obj.metadata?.name ?? ''}`));
    await informer.start();
    try {
      assert.ok(informer.get(namespace, 'before'), 'synced after start');
      kube.kubectl(['-n', namespace, 'create', 'configmap', 'after', '--from-literal=a=1']);
      kube.kubectl(['-n', namespace, 'patch', 'configmap', 'after', '-p', '{"data":{"a":"2"}}']);
      kube.kubectl(['-n', namespace, 'delete', 'configmap', 'before']);
      await eventually('watch events', () => events.includes('DELETED before') && informer.get(namespace, 'after')?.data?.a === '2');
      assert.deepEqual(events.filter((e) => e.endsWith('after')), ['ADDED after', 'MODIFIED after']);
    } finally {
      await informer.stop();
    }
  });

  it('informer: a stalled watch is detected, restarted, and catches up', async function () {
    const kube = await testEnvironment().kube();
    const kc = kube.kubeConfig();
    const { proxy, viaProxy } = await behindProxy(kube.server, kc);
    const informer = new Informer<KubeObject>(new KubeHttp(viaProxy), { path: `/api/v1/namespaces/${namespace}/configmaps`, labelSelector: 'stall=test', stallTimeoutMs: 1500, logger });
    await informer.start();
    try {
      proxy.freeze();
      kube.kubectl(['-n', namespace, 'create', 'configmap', 'during-stall', '--from-literal=a=1']);
      kube.kubectl(['-n', namespace, 'label', 'configmap', 'during-stall', 'stall=test']);
      await eventually('the watchdog to fire', () => informer.stats.stalls >= 1);
      proxy.cutAll();
      proxy.thaw();
      await eventually('the informer to catch up', () => informer.get(namespace, 'during-stall') !== undefined);
    } finally {
      await informer.stop();
      await proxy.stop();
    }
  });

  it('informer: stop() while its next watch is being opened ends that watch at once, not at its stall timeout', async function () {
    const kube = await testEnvironment().kube();
    // The real client, held at the start of its second watch (the first ends after a second) until the test lets it go on.
    let gateReached: (() => void) | undefined;
    const reached = new Promise<void>((resolve) => (gateReached = resolve));
    let openGate: (() => void) | undefined;
    const gate = new Promise<void>((resolve) => (openGate = resolve));
    let watches = 0;
    class HeldHttp extends KubeHttp {
      override async watch<T>(path: string, onEvent: (event: WatchEvent<T>) => void, onActivity?: () => void, signal?: AbortSignal): Promise<WatchHandle> {
        watches += 1;
        if (watches !== 2) return super.watch<T>(path, onEvent, onActivity, signal);
        gateReached!();
        await gate;
        // This one would run for minutes unless stopped.
        return super.watch<T>(path.replace('timeoutSeconds=1', 'timeoutSeconds=300'), onEvent, onActivity, signal);
      }
    }
    const informer = new Informer<KubeObject>(new HeldHttp(kube.kubeConfig()), { path: `/api/v1/namespaces/${namespace}/configmaps`, watchTimeoutSeconds: 1, stallTimeoutMs: 30_000, logger });
    await informer.start();
    await reached;
    const stopping = informer.stop();
    openGate!();
    const started = Date.now();
    await stopping;
    assert.ok(Date.now() - started < 3000, `stop() took ${Date.now() - started} ms`);
  });

  it('leader election: one of two candidates leads; when it stops, the other takes over', async function () {
    const kube = await testEnvironment().kube();
    const http = new KubeHttp(kube.kubeConfig());
    const options = { namespace, name: 'poolkeeper-test-leader', leaseDurationMs: 3000, renewDeadlineMs: 2000, retryPeriodMs: 200, logger };
    const a = new LeaderElector(http, { ...options, identity: 'a' });
    const b = new LeaderElector(http, { ...options, identity: 'b' });
    a.start();
    await eventually('a to lead', () => a.isLeader);
    b.start();
    await new Promise((r) => setTimeout(r, 800));
    assert.equal(b.isLeader, false, 'b must not lead while a renews');
    await a.stop();
    await eventually('b to take over', () => b.isLeader, 10_000);
    assert.equal(a.isLeader, false);
    await b.stop();
  });

  /** The system's clocks with the wall clock moved by `offsetMs` (changeable), as on a node whose clock is off. */
  function skewedClock(offsetMs: number): ElectionClock & { offsetMs: number } {
    const clock = { offsetMs, wallMs: () => Date.now() + clock.offsetMs, monotonicMs: () => performance.now() };
    return clock;
  }

  it('leader election: a standby whose clock runs ten minutes ahead does not take a lease its holder renews', async function () {
    const kube = await testEnvironment().kube();
    const http = new KubeHttp(kube.kubeConfig());
    const options = { namespace, name: 'poolkeeper-test-skew-ahead', leaseDurationMs: 2000, renewDeadlineMs: 1500, retryPeriodMs: 200, logger };
    const a = new LeaderElector(http, { ...options, identity: 'a' });
    const b = new LeaderElector(http, { ...options, identity: 'b', clock: skewedClock(600_000) });
    a.start();
    try {
      await eventually('a to lead', () => a.isLeader);
      b.start();
      // Three lease durations: with renewTime compared to its own clock, b took the lease at its first round.
      const until = Date.now() + 6000;
      while (Date.now() < until) {
        assert.equal(b.isLeader, false, 'b must not lead while a renews');
        assert.equal(a.isLeader, true, 'a must keep leading');
        await new Promise((r) => setTimeout(r, 50));
      }
      await a.stop();
      await eventually('b to take over once a releases', () => b.isLeader, 10_000);
    } finally {
      await a.stop();
      await b.stop();
    }
  });

  it('leader election: a lease left by a holder whose clock ran ten minutes ahead is taken once it stops changing for its duration', async function () {
    const kube = await testEnvironment().kube();
    const http = new KubeHttp(kube.kubeConfig());
    const name = 'poolkeeper-test-skew-crashed';
    // What a holder on a node ten minutes ahead left behind when it crashed (no release).
    const ahead = new Date(Date.now() + 600_000).toISOString().replace('Z', '000Z');
    await http.create(`/apis/coordination.k8s.io/v1/namespaces/${namespace}/leases`, {
      apiVersion: 'coordination.k8s.io/v1', kind: 'Lease', metadata: { name, namespace },
      spec: { holderIdentity: 'crashed', leaseDurationSeconds: 2, acquireTime: ahead, renewTime: ahead, leaseTransitions: 0 },
    });
    const b = new LeaderElector(http, { namespace, name, identity: 'b', leaseDurationMs: 2000, renewDeadlineMs: 1500, retryPeriodMs: 200, logger });
    const started = Date.now();
    b.start();
    try {
      // Judged by renewTime against b's clock, the lease stayed valid for ten minutes.
      await eventually('b to take the abandoned lease', () => b.isLeader, 10_000);
      const waited = Date.now() - started;
      assert.ok(waited >= 2000, `b must wait out the lease's duration from when it first saw it (took it after ${waited} ms)`);
    } finally {
      await b.stop();
    }
  });

  it('leader election: a leader whose renewal hangs on the network steps down within the renew deadline, even with its wall clock stepped back', async function () {
    const kube = await testEnvironment().kube();
    const kc = kube.kubeConfig();
    const { proxy, viaProxy } = await behindProxy(kube.server, kc);
    const options = { namespace, name: 'poolkeeper-test-hung-renewal', leaseDurationMs: 3000, renewDeadlineMs: 2000, retryPeriodMs: 200, logger };
    const clock = skewedClock(0);
    const a = new LeaderElector(new KubeHttp(viaProxy), { ...options, identity: 'a', clock });
    const b = new LeaderElector(new KubeHttp(kc), { ...options, identity: 'b' });
    a.start();
    try {
      await eventually('a to lead', () => a.isLeader);
      b.start();
      await new Promise((r) => setTimeout(r, 500));
      // An NTP step back of a minute, then packets to the API server stop (no RST: requests hang until their 30 s timeout).
      clock.offsetMs = -60_000;
      proxy.freeze();
      const frozenAt = Date.now();
      let both = 0;
      let steppedDown = Infinity;
      while (!b.isLeader) {
        if (a.isLeader && b.isLeader) both += 1;
        if (!a.isLeader && steppedDown === Infinity) steppedDown = Date.now() - frozenAt;
        assert.ok(Date.now() - frozenAt < 15_000, 'b must take over within a few lease durations');
        await new Promise((r) => setTimeout(r, 20));
      }
      assert.equal(a.isLeader, false, 'a must have stepped down before b leads');
      assert.ok(steppedDown <= 2000 + 500, `a stepped down ${steppedDown} ms after the network stopped (renew deadline 2000 ms)`);
      assert.equal(both, 0, 'never two leaders');
    } finally {
      proxy.cutAll();
      proxy.thaw();
      await Promise.all([a.stop(), b.stop()]);
      await proxy.stop();
    }
  });
});
