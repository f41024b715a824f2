/**
 * The Kubernetes machinery the controller stands on, against the real API
 * server: the informer (list, watch, relist, stall watchdog) and Lease-based
 * leader election between two candidates.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { KubeConfig } from '@kubernetes/client-node';
import pino from 'pino';
import { KubeHttp } from '../../src/kube/http.ts';
import { Informer, type KubeObject } from '../../src/kube/informer.ts';
import { LeaderElector } from '../../src/kube/leader-election.ts';
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
    const target = new URL(kube.server);
    const proxy = new TcpProxy(target.hostname, Number(target.port));
    await proxy.start();
    const kc = kube.kubeConfig();
    const viaProxy = new KubeConfig();
    viaProxy.loadFromOptions({
      clusters: kc.clusters.map((c) => ({ ...c, server: `https://127.0.0.1:${proxy.port}` })),
      users: kc.users, contexts: kc.contexts, currentContext: kc.currentContext,
    });
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
});
