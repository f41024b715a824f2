/**
 * The controller at fleet scale, on the real local API server: N pods created
 * through the API (no kubelet, no real sidecars), one in-process acknowledger
 * that watches the PoolMembers and PoolGrants and writes each PoolMember's
 * status as its sidecar would (acknowledged = held = granted; a sidecar that
 * reads grant tables, unless --legacy-sidecars), and the controller in a child
 * process so that its CPU time, peak RSS and API writes are its own.
 *
 * Per size, with a fixed maxConnections of 3 x pods (reserve 0, one consumer,
 * minPerPod 1, so every pod's target is 3), it measures the time from an event
 * to every live pod's grant written AND acknowledged at its fair share:
 *   create       N pods created (once)
 *   limit-down   maxConnections halved
 *   limit-up     maxConnections restored
 *   scale-up     10% more pods
 *   delete       those pods deleted
 *   acks-only    every sidecar writes its status once, nothing else changes:
 *                the API server's cost of one rebalance's acknowledgements,
 *                the floor under limit-down and limit-up
 *   idle         10 s with nothing changing (writes and CPU only)
 * The safety invariant (sum over existing pods of max(granted, acknowledged,
 * held) <= limit) is checked on every PoolMember and pod event; while a
 * lowered limit is being reached, the sum must not grow.
 *
 *   node bench/controller-scale.ts [--pods 100,1000] [--connections 1] [--rounds 5] [--heartbeat-ms 0] [--legacy-sidecars] [--no-channel] [--json FILE]
 */
import { fork, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import pino from 'pino';
import type { PoolGrant, PoolMember } from '../src/api/index.ts';
import { grantTableOf, memberGrantInForce, tableAccount, type ChannelAcknowledgement, type GrantTable } from '../src/core/budget/index.ts';
import { READS_TABLES_ANNOTATION } from '../src/core/inject/model.ts';
import { AcknowledgementSender } from '../src/sidecar/acknowledgement-sender.ts';
import { compileEntries, compiledDir } from '../src/devenv/compile.ts';
import { LocalEnvironment } from '../src/devenv/environment.ts';
import type { KubeControlPlane } from '../src/devenv/kube.ts';
import { eventually, installCrds } from '../src/devenv/scenario.ts';
import { KubeHttp } from '../src/kube/http.ts';
import { Informer, type KubeObject } from '../src/kube/informer.ts';

/** One line of the result: an event type at one size. */
export interface ControllerResult {
  pods: number;
  connections: number;
  event: string;
  /** Events measured. */
  samples: number;
  p50_ms: number | null;
  p99_ms: number | null;
  /** Of p50_ms, the bench's own action (creating or deleting the pods, patching the limit): the rest is the controller's and the sidecars'. */
  action_p50_ms: number | null;
  /** Controller CPU seconds per event (user + system), until settled plus a quiet second. */
  cpu_s: number;
  /** The same for the API server and etcd together, kube-controller-manager, and the bench process (the stand-in sidecars, and the pods it creates or deletes): all share the machine's cores. */
  apiserver_etcd_cpu_s: number;
  kcm_cpu_s: number;
  bench_cpu_s: number;
  /** Controller peak RSS during these events. */
  rss_mb: number;
  /** Controller API writes (POST, PUT, PATCH, DELETE) per event. */
  writes: number;
  /** Reconciles per event, and the wall time they took together (planning and writes). */
  reconciles: number;
  reconcile_s: number;
  /** PoolMember status writes by the stand-in sidecars per event, until settled. */
  sidecar_status_writes: number;
  /** Acknowledgements the stand-in sidecars sent over the channel per event, until settled. */
  sidecar_channel_acks: number;
  violations: number;
}

import type { ChildMessage, ServiceAccountFiles } from './controller-child.ts';

const PER_POD = 3;
const QUIET_MS = 1_000;
const mb = (bytes: number): string => (bytes / 2 ** 20).toFixed(0);
const IDLE_MS = 10_000;
const CREATE_CONCURRENCY = 16;
/** Acknowledgements in flight at once: a fleet acknowledges in parallel, one process stands in for it. */
const ACK_CONCURRENCY = 64;

/** The NODE_OPTIONS deploy/ gives the controller container: the bench runs it as deployed. */
function deployedNodeOptions(): string {
  const manifest = readFileSync(new URL('../deploy/base/deployment.yaml', import.meta.url), 'utf8');
  const controller = manifest.slice(manifest.indexOf('- name: controller'), manifest.indexOf('- name: webhook'));
  const value = /- name: NODE_OPTIONS\n\s+value: (.+)\n/.exec(controller)?.[1];
  if (value === undefined) throw new Error('deploy/base/deployment.yaml: the controller container has no NODE_OPTIONS');
  return value.trim();
}

/** The controller in a child process, and a way to read its counters since the last read. */
class ControllerProcess {
  private readonly child: ChildProcess;
  private waiting: ((m: ChildMessage) => void) | undefined;
  readonly ready: Promise<void>;

  constructor(access: ServiceAccountFiles, verbose: boolean, channel = true) {
    // Compiled, as the image runs it: type stripping alone adds tens of MB of RSS.
    const [compiled] = compileEntries(['bench/controller-child.ts'], compiledDir('bench-controller'));
    const nodeOptions = process.env.BENCH_CONTROLLER_NODE_OPTIONS ?? deployedNodeOptions();
    this.child = fork(compiled!, [JSON.stringify(access), ...(verbose ? ['--verbose'] : []), ...(channel ? [] : ['--no-channel'])], { execArgv: nodeOptions.split(' ').filter(Boolean), stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    this.ready = new Promise((resolve, reject) => {
      this.child.once('exit', (code) => reject(new Error(`controller child exited with ${code}`)));
      this.child.on('message', (m: ChildMessage) => {
        if (m.type === 'ready') resolve();
        else this.waiting?.(m);
      });
    });
  }

  /** CPU seconds, peak RSS and writes since the previous mark. */
  mark(): Promise<Extract<ChildMessage, { type: 'mark' }>> {
    return new Promise((resolve) => {
      this.waiting = (m) => {
        this.waiting = undefined;
        if (m.type === 'mark') resolve(m);
      };
      this.child.send({ type: 'mark' });
    });
  }

  async stop(): Promise<void> {
    if (this.child.exitCode !== null) return;
    const exited = new Promise((resolve) => this.child.once('exit', resolve));
    this.child.send({ type: 'stop' });
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 15_000);
    await exited;
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------- acknowledger and invariant

/** Runs `work` over `items` with at most `limit` at a time. */
async function pool<T>(items: readonly T[], limit: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const item = items[next]!;
      next += 1;
      await work(item);
    }
  }));
}

type MemberObject = PoolMember & KubeObject;

/**
 * Every pod's sidecar, as one process: acknowledges each new grant at once
 * (holding exactly what it is granted), writing the status a sidecar writes.
 * Also keeps the running sum of reservations for the invariant.
 */
class Acknowledger {
  readonly members: Informer<MemberObject>;
  readonly tables: Informer<PoolGrant & KubeObject>;
  readonly pods: Informer<KubeObject>;
  /** Sidecars of the previous version: they never report tableGeneration, so they stay on their PoolMember's grant. */
  private readonly legacy: boolean;
  private readonly http: KubeHttp;
  private readonly namespace: string;
  private readonly queue = new Set<string>();
  private readonly inFlight = new Set<string>();
  private active = 0;
  private readonly heartbeatMs: number;
  private heartbeat: NodeJS.Timeout | undefined;
  /** Reservation counted per PoolMember name; 0 when its pod does not exist. */
  private readonly counted = new Map<string, number>();
  private readonly livePodUids = new Set<string>();
  total = 0;
  /** The bound the sum must respect: the limit, or while a lowered limit is being reached, the lowest sum seen since. */
  private ceiling = Infinity;
  limit = Infinity;
  violations = 0;
  maxOverLimit = 0;
  statusWrites = 0;
  channelAcks = 0;
  /** What the controller confirmed over the acknowledgement channel, per PoolMember name. */
  private readonly sent = new Map<string, { tableGeneration: number; connections: number }>();
  /** Names whose next acknowledgement must be a status write (a heartbeat, or the acks-only event). */
  private readonly durable = new Set<string>();
  private readonly sender = new AcknowledgementSender(ACK_CONCURRENCY);

  constructor(http: KubeHttp, namespace: string, heartbeatMs: number, legacy: boolean) {
    this.http = http;
    this.namespace = namespace;
    this.heartbeatMs = heartbeatMs;
    this.legacy = legacy;
    const logger = pino({ level: 'silent' });
    this.members = new Informer<MemberObject>(http, { path: `/apis/poolkeeper.dev/v1alpha1/namespaces/${namespace}/poolmembers`, logger });
    this.tables = new Informer<PoolGrant & KubeObject>(http, { path: `/apis/poolkeeper.dev/v1alpha1/namespaces/${namespace}/poolgrants`, logger });
    this.pods = new Informer<KubeObject>(http, { path: `/api/v1/namespaces/${namespace}/pods`, logger });
  }

  async start(): Promise<void> {
    this.members.onChange((type, member) => {
      const name = member.metadata.name ?? '';
      this.recount(name);
      if (type !== 'DELETED' && !this.acknowledged(member)) this.enqueue(name);
    });
    // One table write changes the grant of many pods: each sidecar whose number changed acknowledges.
    this.tables.onChange(() => {
      for (const m of this.members.list()) {
        const name = m.metadata.name ?? '';
        this.recount(name);
        if (!this.acknowledged(m)) this.enqueue(name);
      }
    });
    this.pods.onChange((type, pod) => {
      const uid = pod.metadata?.uid ?? '';
      if (type === 'DELETED') this.livePodUids.delete(uid);
      else this.livePodUids.add(uid);
      this.recount(pod.metadata?.name ?? '');
    });
    await Promise.all([this.members.start(), this.tables.start(), this.pods.start()]);
    if (this.heartbeatMs > 0) {
      this.heartbeat = setInterval(() => this.rewriteAll(), this.heartbeatMs);
    }
  }

  /** Writes every PoolMember's status once more, as a heartbeat would: what the acknowledgements of one rebalance cost the API server alone. */
  rewriteAll(): void {
    for (const m of this.members.list()) {
      this.durable.add(m.metadata.name ?? '');
      this.enqueue(m.metadata.name ?? '');
    }
  }

  /** Sets the limit the bench just wrote; a lower one is reached only as shrinks are acknowledged. */
  setLimit(limit: number): void {
    this.ceiling = limit < this.limit ? Math.max(limit, this.total) : limit;
    this.limit = limit;
  }

  /** Converted once per PoolGrant version: the settled check and every event read it for each pod. */
  private readonly converted = new Map<string, { resourceVersion: string; table: GrantTable }>();

  private table(member: PoolMember): GrantTable | undefined {
    const t = this.tables.get(this.namespace, member.spec.connection);
    if (!t) return undefined;
    const cached = this.converted.get(member.spec.connection);
    if (cached && cached.resourceVersion === t.metadata.resourceVersion) return cached.table;
    const table = grantTableOf(t.spec);
    this.converted.set(member.spec.connection, { resourceVersion: t.metadata.resourceVersion ?? '', table });
    return table;
  }

  /** The grant in force: from the table once it covers the pod, else the PoolMember's. */
  private grantOf(member: PoolMember): ReturnType<typeof memberGrantInForce> {
    return memberGrantInForce({ name: member.metadata.name ?? '', grant: member.spec.grant, tableFrom: member.spec.tableFrom }, this.table(member));
  }

  /**
   * The sidecar has acknowledged the grant in force (and, unless legacy, said
   * it reads tables): from its latest acknowledgement, sent over the channel or
   * written in its status, as the controller counts it (tableAccount).
   */
  private acknowledged(member: PoolMember): boolean {
    const s = member.status;
    const sent = this.sent.get(member.metadata.name ?? '');
    // A PoolMember created on its table may have answered over the channel only.
    if (!s && !sent) return false;
    if (!this.legacy && s !== undefined && s.tableGeneration === undefined) return false;
    const grant = this.grantOf(member);
    if (!grant.fromTable || !grant.entry) return s?.acknowledgedGeneration === grant.generation;
    const fromChannel = sent !== undefined && (s === undefined || sent.tableGeneration >= (s.tableGeneration ?? -1));
    const ack = fromChannel || s === undefined
      ? { tableGeneration: sent?.tableGeneration, connections: sent?.connections ?? 0 }
      : { tableGeneration: s.tableGeneration, connections: s.acknowledgedConnections ?? 0 };
    const tableFrom = member.spec.tableFrom ?? Infinity;
    // The sidecar's own view: it holds this number from a table at or after the change that set it.
    return (ack.tableGeneration ?? -1) >= Math.max(tableFrom, grant.entry.since ?? 0) && ack.connections === grant.connections;
  }

  private recount(name: string): void {
    const member = this.members.get(this.namespace, name);
    const owner = member?.metadata.ownerReferences?.[0]?.uid;
    const value = member && owner && this.livePodUids.has(owner) ? this.countOf(member) : 0;
    this.total += value - (this.counted.get(name) ?? 0);
    if (value === 0) this.counted.delete(name);
    else this.counted.set(name, value);
    this.ceiling = Math.max(this.limit, Math.min(this.ceiling, this.total));
    if (this.total > this.ceiling) {
      this.violations += 1;
      this.maxOverLimit = Math.max(this.maxOverLimit, this.total - this.ceiling);
    }
  }

  /**
   * What a pod may hold by what is durable: on a table that records changes in
   * flight, the table's count (the controller writes there which
   * acknowledgements it used, whether they came over the channel or not);
   * else max(grant, acknowledged, held) from the status.
   */
  private countOf(member: PoolMember): number {
    const force = this.grantOf(member);
    const table = this.table(member);
    const s = member.status;
    if (force.fromTable && table?.recordsChanges === true && force.entry) {
      const ack = s?.acknowledgedGeneration === undefined ? undefined : { tableGeneration: s.tableGeneration, connections: s.acknowledgedConnections ?? 0, held: s.heldConnections ?? 0 };
      return tableAccount(force.entry, table, member.spec.tableFrom ?? 0, ack).reservation;
    }
    return Math.max(force.connections, s?.acknowledgedConnections ?? 0, s?.heldConnections ?? 0);
  }

  /** Sends the acknowledgement to the controller directly, as a sidecar does when its table names one; true once recorded. */
  private sendOverChannel(member: PoolMember, connections: number, tableGeneration: number): Promise<boolean> {
    const to = this.tables.get(this.namespace, member.spec.connection)?.spec.acknowledgeTo;
    const key = member.spec.acknowledgementKey;
    const podUid = member.metadata.ownerReferences?.[0]?.uid;
    if (!to || !key || !podUid) return Promise.resolve(false);
    const ack: ChannelAcknowledgement = { namespace: this.namespace, pod: member.metadata.name ?? '', podUid, tableGeneration, generation: tableGeneration, connections, held: connections };
    return this.sender.send(to, ack, key);
  }

  private enqueue(name: string): void {
    this.queue.add(name);
    this.drainQueue();
  }

  private drainQueue(): void {
    while (this.active < ACK_CONCURRENCY) {
      let name: string | undefined;
      for (const n of this.queue) {
        if (this.inFlight.has(n)) continue;
        name = n;
        break;
      }
      if (name === undefined) return;
      this.queue.delete(name);
      this.inFlight.add(name);
      this.active += 1;
      void this.acknowledge(name).finally(() => {
        this.inFlight.delete(name);
        this.active -= 1;
        this.drainQueue();
      });
    }
  }

  private async acknowledge(name: string): Promise<void> {
    const member = this.members.get(this.namespace, name);
    if (!member) return;
    const { connections, generation, fromTable } = this.grantOf(member);
    // As the sidecar's agent: a table change that leaves this pod's number alone is not applied,
    // so its status keeps the generations it acknowledged (a heartbeat repeats them).
    const previous = member.status;
    const unchanged = previous !== undefined && this.acknowledged(member);
    const durable = this.durable.delete(name);
    // As the agent: what it acknowledged last, over the channel or in its status.
    const sent = this.sent.get(name);
    // As the agent: the first answer of a PoolMember created on its table goes over the channel too.
    const channelOk = previous === undefined ? member.spec.tableFrom !== undefined && !this.legacy : previous.tableGeneration !== undefined;
    if (!durable && fromTable && !unchanged && channelOk) {
      if (await this.sendOverChannel(member, connections, generation)) {
        this.channelAcks += 1;
        this.sent.set(name, { tableGeneration: generation, connections });
        return;
      }
    }
    const status = {
      acknowledgedGeneration: unchanged ? Math.max(previous.acknowledgedGeneration ?? generation, sent?.tableGeneration ?? 0) : generation, acknowledgedConnections: connections, heldConnections: connections,
      credentialsGeneration: member.spec.credentialsGeneration ?? '', draining: false, drained: false,
      heartbeatTime: new Date().toISOString().replace(/\.\d+Z$/, 'Z'), sidecarVersion: 'bench',
      ...(this.legacy ? {} : { tableGeneration: unchanged ? Math.max(previous.tableGeneration ?? 0, sent?.tableGeneration ?? 0) : fromTable ? generation : 0 }),
    };
    this.statusWrites += 1;
    await this.http.patch(`/apis/poolkeeper.dev/v1alpha1/namespaces/${this.namespace}/poolmembers/${name}/status`, { status }).catch(() => undefined);
  }

  /** All `podCount` pods are seen, and each has a PoolMember whose grant is acknowledged and is its fair share of `limit`. */
  settled(limit: number, podCount: number): boolean {
    if (this.queue.size > 0 || this.active > 0) return false;
    const pods = this.pods.list();
    // Until the watch has shown the event itself, the old state may look settled.
    if (pods.length !== podCount) return false;
    // One round over every pod, starting at the one that failed the last check: it most likely
    // still does, and those before it passed then. Scanning from the first pod 20 times a second
    // would take, at 10,000 pods, CPU that the API server on the same cores needs.
    let sum = 0;
    let low = Infinity;
    let high = 0;
    for (let i = 0; i < pods.length; i += 1) {
      const at = (this.scanFrom + i) % pods.length;
      const pod = pods[at]!;
      const member = this.members.get(this.namespace, pod.metadata?.name ?? '');
      if (!member || member.metadata.ownerReferences?.[0]?.uid !== pod.metadata?.uid || !this.acknowledged(member)) {
        this.scanFrom = at;
        return false;
      }
      const c = this.grantOf(member).connections;
      sum += c;
      low = Math.min(low, c);
      high = Math.max(high, c);
    }
    return pods.length === 0 || (sum === limit && high - low <= 1);
  }

  /** Where the last settled() check found a pod not settled. */
  private scanFrom = 0;

  async stop(): Promise<void> {
    clearInterval(this.heartbeat);
    this.sender.close();
    await Promise.all([this.members.stop(), this.tables.stop(), this.pods.stop()]);
  }
}

// ---------------------------------------------------------------- one size

/**
 * CPU seconds (user + system) so far of the local API server, etcd and
 * kube-controller-manager (the processes whose command line names the
 * environment's directory `dir`), and of this process (the stand-in sidecars
 * and the bench's own requests).
 */
function otherCpu(dir: string): { apiServer: number; etcd: number; controllerManager: number; bench: number } {
  const byName: Record<string, number> = {};
  for (const pid of readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      if (!readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(dir)) continue;
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const name = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
      // utime and stime, fields 14 and 15, in clock ticks (100 a second).
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      byName[name] = (byName[name] ?? 0) + (Number(fields[11]) + Number(fields[12])) / 100;
    } catch {
      // Exited meanwhile.
    }
  }
  const self = process.cpuUsage();
  return { apiServer: byName['kube-apiserver'] ?? 0, etcd: byName.etcd ?? 0, controllerManager: byName['kube-controller'] ?? 0, bench: (self.user + self.system) / 1e6 };
}

function percentile(sorted: readonly number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)] ?? 0;
}

async function runSize(kube: KubeControlPlane, args: { pods: number; connections: number; rounds: number; heartbeatMs: number; legacy: boolean; verbose: boolean; channel: boolean }): Promise<ControllerResult[]> {
  const http = new KubeHttp(kube.kubeConfig());
  const namespace = `scale-${args.pods}-${Date.now().toString(36)}`;
  const limit = PER_POD * args.pods;
  const connectionNames = Array.from({ length: args.connections }, (_, i) => `db-${i}`);
  await http.create('/api/v1/namespaces', { apiVersion: 'v1', kind: 'Namespace', metadata: { name: namespace } });
  await http.create(`/api/v1/namespaces/${namespace}/secrets`, { apiVersion: 'v1', kind: 'Secret', metadata: { name: 'creds' }, stringData: { username: 'app', password: 'secret' } });
  const connectionBody = (name: string, max: number): unknown => ({
    apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name, namespace },
    spec: {
      // A host of its own per size: a server the controller reconciles for this run only.
      database: { host: `${namespace}.db.invalid`, port: 5432, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'creds' } },
      maxConnections: max, reserve: 0, consumers: [{ name: 'web', selector: { matchLabels: { app: 'web' } }, minPerPod: 1 }],
      // The bench's sidecars report no drain before their pods are deleted: their connections are
      // modelled as closed at once, as a real sidecar's drain closes them, not held as a lost node's.
      departureHoldSeconds: 0,
    },
  });
  for (const name of connectionNames) await http.create(`/apis/poolkeeper.dev/v1alpha1/namespaces/${namespace}/databaseconnections`, connectionBody(name, limit));
  // Pods need the namespace's default ServiceAccount, which kube-controller-manager creates.
  await eventually('default ServiceAccount', () => http.get(`/api/v1/namespaces/${namespace}/serviceaccounts/default`).then(() => true, () => false), 30_000);

  const acknowledger = new Acknowledger(http, namespace, args.heartbeatMs, args.legacy);
  await acknowledger.start();
  acknowledger.setLimit(limit);
  // As in a cluster: the pod's ServiceAccount token, no kubeconfig (and no client library loaded for one).
  const controller = new ControllerProcess(kube.serviceAccountFiles('poolkeeper-system', 'poolkeeper-controller', 'cluster-admin'), args.verbose, args.channel);
  await controller.ready;
  await controller.mark();

  let serial = 0;
  const createPods = async (count: number): Promise<string[]> => {
    const names = Array.from({ length: count }, () => `web-${String((serial += 1)).padStart(5, '0')}`);
    await pool(names, CREATE_CONCURRENCY, async (name) => {
      const connection = connectionNames[Number(name.slice(4)) % connectionNames.length]!;
      await http.create(`/api/v1/namespaces/${namespace}/pods`, {
        // As the injector stamps them: a sidecar of this version reads tables, so its PoolMember starts on one.
        apiVersion: 'v1', kind: 'Pod', metadata: { name, labels: { app: 'web', 'poolkeeper.dev/connection': connection }, ...(args.legacy ? {} : { annotations: { [READS_TABLES_ANNOTATION]: 'true' } }) },
        spec: { containers: [{ name: 'app', image: 'example.invalid/app:1' }], terminationGracePeriodSeconds: 0 },
      });
    });
    return names;
  };
  const deletePods = (names: readonly string[]): Promise<void> => pool(names, CREATE_CONCURRENCY, async (name) => {
    await http.delete(`/api/v1/namespaces/${namespace}/pods/${name}`, { apiVersion: 'v1', kind: 'DeleteOptions', gracePeriodSeconds: 0 });
  });
  const setLimit = async (max: number): Promise<void> => {
    acknowledger.setLimit(max);
    await Promise.all(connectionNames.map((name) => http.patch(`/apis/poolkeeper.dev/v1alpha1/namespaces/${namespace}/databaseconnections/${name}`, { spec: { maxConnections: max } })));
  };

  const samples = new Map<string, { ms: number[]; actionMs: number[]; cpuS: number; others: { apiEtcd: number; kcm: number; bench: number }; reconciles: number; reconcileS: number; rssMb: number; writes: number; statusWrites: number; channelAcks: number; violations: number; kinds: Record<string, number> }>();
  const measure = async (event: string, expectedLimit: number, podCount: number, action: () => Promise<unknown>): Promise<void> => {
    const violationsBefore = acknowledger.violations;
    const statusWritesBefore = acknowledger.statusWrites;
    const channelAcksBefore = acknowledger.channelAcks;
    const othersBefore = otherCpu(kube.logDir);
    const started = performance.now();
    await action();
    const actionMs = performance.now() - started;
    await eventually(`${event} at ${args.pods} pods`, () => acknowledger.settled(expectedLimit, podCount), 600_000);
    const ms = performance.now() - started;
    const statusWrites = acknowledger.statusWrites - statusWritesBefore;
    const channelAcks = acknowledger.channelAcks - channelAcksBefore;
    await new Promise((r) => setTimeout(r, QUIET_MS));
    const mark = await controller.mark();
    const othersAfter = otherCpu(kube.logDir);
    const others = { apiEtcd: othersAfter.apiServer + othersAfter.etcd - othersBefore.apiServer - othersBefore.etcd, kcm: othersAfter.controllerManager - othersBefore.controllerManager, bench: othersAfter.bench - othersBefore.bench };
    const entry = samples.get(event) ?? { ms: [], actionMs: [], cpuS: 0, others: { apiEtcd: 0, kcm: 0, bench: 0 }, reconciles: 0, reconcileS: 0, rssMb: 0, writes: 0, statusWrites: 0, channelAcks: 0, violations: 0, kinds: {} };
    entry.reconciles += mark.reconciles;
    entry.reconcileS += mark.reconcileS;
    entry.others = { apiEtcd: entry.others.apiEtcd + others.apiEtcd, kcm: entry.others.kcm + others.kcm, bench: entry.others.bench + others.bench };
    entry.ms.push(ms);
    entry.actionMs.push(actionMs);
    entry.statusWrites += statusWrites;
    entry.channelAcks += channelAcks;
    entry.cpuS += mark.cpuS;
    entry.rssMb = Math.max(entry.rssMb, mark.peakRssMb);
    entry.writes += mark.writes;
    entry.violations += acknowledger.violations - violationsBefore;
    for (const [k, v] of Object.entries(mark.writesByKind)) entry.kinds[k] = (entry.kinds[k] ?? 0) + v;
    samples.set(event, entry);
    console.error(`  ${args.pods} pods: ${event} ${(ms / 1000).toFixed(2)} s (the bench's action ${(actionMs / 1000).toFixed(2)} s), ${mark.writes} controller writes, ${mark.reconciles} reconciles (${mark.reconcileS.toFixed(2)} s), ${statusWrites} sidecar status writes, ${channelAcks} channel acks, cpu ${mark.cpuS.toFixed(2)} s (API server + etcd ${others.apiEtcd.toFixed(2)} s, kube-controller-manager ${others.kcm.toFixed(2)} s, bench ${others.bench.toFixed(2)} s), peak rss ${mark.peakRssMb.toFixed(0)} MB (now: heap ${mb(mark.memory.heapUsed)} of ${mb(mark.memory.heapTotal)}, external ${mb(mark.memory.external)}, array buffers ${mb(mark.memory.arrayBuffers)} MB)`);
  };

  const results: ControllerResult[] = [];
  try {
    await measure('create', limit, args.pods, () => createPods(args.pods));
    const step = Math.max(1, Math.round(args.pods / 10));
    const half = Math.floor(limit / 2);
    for (let round = 0; round < args.rounds; round += 1) {
      await measure('limit-down', half, args.pods, () => setLimit(half));
      await measure('limit-up', limit, args.pods, () => setLimit(limit));
      let added: string[] = [];
      await measure('scale-up', limit, args.pods + step, async () => (added = await createPods(step)));
      await measure('delete', limit, args.pods, () => deletePods(added));
      // The floor under a rebalance: one status write per pod and nothing else to do.
      await measure('acks-only', limit, args.pods, () => Promise.resolve(acknowledger.rewriteAll()));
    }
    // Nothing changes: whatever the controller does now is overhead.
    await controller.mark();
    const idleViolations = acknowledger.violations;
    await new Promise((r) => setTimeout(r, IDLE_MS));
    const idle = await controller.mark();
    samples.set('idle', { ms: [], actionMs: [], cpuS: idle.cpuS, others: { apiEtcd: 0, kcm: 0, bench: 0 }, reconciles: idle.reconciles, reconcileS: idle.reconcileS, rssMb: idle.peakRssMb, writes: idle.writes, statusWrites: 0, channelAcks: 0, violations: acknowledger.violations - idleViolations, kinds: idle.writesByKind });
    for (const [event, s] of samples) {
      const sorted = [...s.ms].sort((a, b) => a - b);
      const count = Math.max(1, s.ms.length);
      results.push({
        pods: args.pods, connections: args.connections, event, samples: s.ms.length,
        p50_ms: sorted.length ? Math.round(percentile(sorted, 0.5)) : null,
        p99_ms: sorted.length ? Math.round(percentile(sorted, 0.99)) : null,
        action_p50_ms: s.actionMs.length ? Math.round(percentile([...s.actionMs].sort((a, b) => a - b), 0.5)) : null,
        cpu_s: Number((s.cpuS / count).toFixed(3)),
        apiserver_etcd_cpu_s: Number((s.others.apiEtcd / count).toFixed(2)), kcm_cpu_s: Number((s.others.kcm / count).toFixed(2)), bench_cpu_s: Number((s.others.bench / count).toFixed(2)),
        rss_mb: Math.round(s.rssMb), writes: Math.round(s.writes / count), reconciles: Number((s.reconciles / count).toFixed(1)), reconcile_s: Number((s.reconcileS / count).toFixed(2)),
        sidecar_status_writes: Math.round(s.statusWrites / count), sidecar_channel_acks: Math.round(s.channelAcks / count), violations: s.violations,
      });
      console.error(`  ${args.pods} pods: ${event} writes by kind (total): ${JSON.stringify(s.kinds)}`);
    }
  } finally {
    await controller.stop();
    await acknowledger.stop();
    // Remove this size's objects now, so the next size's controller does not list them.
    await http.request('DELETE', `/api/v1/namespaces/${namespace}/pods`, { apiVersion: 'v1', kind: 'DeleteOptions', gracePeriodSeconds: 0 }).catch(() => undefined);
    await http.request('DELETE', `/apis/poolkeeper.dev/v1alpha1/namespaces/${namespace}/poolmembers`).catch(() => undefined);
    await http.request('DELETE', `/apis/poolkeeper.dev/v1alpha1/namespaces/${namespace}/poolgrants`).catch(() => undefined);
    await http.request('DELETE', `/apis/poolkeeper.dev/v1alpha1/namespaces/${namespace}/databaseconnections`).catch(() => undefined);
    await http.delete(`/api/v1/namespaces/${namespace}`).catch(() => undefined);
    (http as { close?: () => void }).close?.();
  }
  return results;
}

/** Latency of one PATCH through KubeHttp, one at a time (what a sequential grant write costs). */
async function patchLatency(kube: KubeControlPlane, count: number): Promise<{ p50_ms: number; p99_ms: number }> {
  const http = new KubeHttp(kube.kubeConfig());
  const path = '/api/v1/namespaces/default/configmaps';
  await http.create(path, { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'bench-patch-latency' }, data: { n: '0' } }).catch(() => undefined);
  const times: number[] = [];
  for (let i = 0; i < count + 20; i += 1) {
    const started = performance.now();
    await http.patch(`${path}/bench-patch-latency`, { data: { n: String(i) } });
    if (i >= 20) times.push(performance.now() - started);
  }
  await http.delete(`${path}/bench-patch-latency`).catch(() => undefined);
  (http as { close?: () => void }).close?.();
  times.sort((a, b) => a - b);
  return { p50_ms: Number(percentile(times, 0.5).toFixed(2)), p99_ms: Number(percentile(times, 0.99).toFixed(2)) };
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      pods: { type: 'string', default: '100,1000' },
      connections: { type: 'string', default: '1' },
      rounds: { type: 'string', default: '5' },
      'heartbeat-ms': { type: 'string', default: '0' },
      'legacy-sidecars': { type: 'boolean', default: false },
      'no-channel': { type: 'boolean', default: false },
      json: { type: 'string' },
      verbose: { type: 'boolean', default: false },
    },
  });
  const sizes = values.pods.split(',').map((s) => Number(s.trim())).filter((n) => n > 0);
  const connections = Number(values.connections);
  const env = new LocalEnvironment();
  const results: ControllerResult[] = [];
  let patch: { p50_ms: number; p99_ms: number } | undefined;
  try {
    const kube = await env.kube();
    await installCrds(kube);
    patch = await patchLatency(kube, 200);
    console.error(`PATCH latency, one at a time: p50 ${patch.p50_ms} ms, p99 ${patch.p99_ms} ms`);
    for (const pods of sizes) {
      console.error(`${pods} pods, ${connections} DatabaseConnection(s), limit ${PER_POD * pods}:`);
      results.push(...await runSize(kube, { pods, connections, rounds: Number(values.rounds), heartbeatMs: Number(values['heartbeat-ms']), legacy: values['legacy-sidecars'], verbose: values.verbose, channel: !values['no-channel'] }));
    }
  } finally {
    await env.stop();
  }
  const header = ['pods', 'dbc', 'event', 'n', 'p50 s', 'p99 s', 'of which action', 'cpu s/event', 'api+etcd/kcm/bench cpu s', 'reconciles (s)', 'rss MB', 'writes/event', 'sidecar status/ack', 'violations'];
  const rows = results.map((r) => [r.pods, r.connections, r.event, r.samples, r.p50_ms === null ? '-' : (r.p50_ms / 1000).toFixed(2), r.p99_ms === null ? '-' : (r.p99_ms / 1000).toFixed(2), r.action_p50_ms === null ? '-' : (r.action_p50_ms / 1000).toFixed(2), r.cpu_s.toFixed(2), r.event === 'idle' ? '-' : `${r.apiserver_etcd_cpu_s.toFixed(1)}/${r.kcm_cpu_s.toFixed(1)}/${r.bench_cpu_s.toFixed(1)}`, `${r.reconciles} (${r.reconcile_s.toFixed(1)})`, r.rss_mb, r.writes, `${r.sidecar_status_writes}/${r.sidecar_channel_acks}`, r.violations].map(String));
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  for (const row of [header, ...rows]) console.log(row.map((cell, i) => cell.padStart(widths[i]!)).join('  '));
  console.log(`PATCH, one at a time: p50 ${patch?.p50_ms ?? '-'} ms, p99 ${patch?.p99_ms ?? '-'} ms`);
  if (values.json) writeFileSync(values.json, `${JSON.stringify({ controller: results, api_patch_ms: patch }, null, 2)}\n`);
}

await main();
