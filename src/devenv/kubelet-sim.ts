/**
 * Plays the kubelet for the pods of one namespace, since the local control
 * plane has none: binds each opted-in pod to a node (so deletion is graceful),
 * marks it Running and Ready, mounts its credentials as files the way a
 * Secret volume does (`..data` symlink swapped atomically), mounts the SSH
 * key volume the webhook gives the sidecar of a tunnelled connection, runs
 * its sidecar in-process, and on deletion stops the app, drains the sidecar,
 * then removes the pod — the order native sidecars get.
 */
import { mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { startSidecar, type RunningSidecar } from '../bin/sidecar-main.ts';
import type { KubeControlPlane } from './kube.ts';
import { KubeHttp } from '../kube/http.ts';
import { Informer, type KubeObject } from '../kube/informer.ts';

/** One simulated pod. */
export interface SimulatedPod {
  name: string;
  uid: string;
  credentialsDir: string;
  sidecar?: RunningSidecar;
  /** Called before the sidecar drains: the app container stops first. */
  onAppStop?: () => Promise<void>;
  terminating: boolean;
  gone: boolean;
  /** Resolves once the pod has been bound and its sidecar started. */
  booted?: Promise<void>;
  /** Literal env of the pod's first app container (what the webhook injected: PGPORT, POOLKEEPER_POOL_SIZE...). */
  appEnv: Record<string, string>;
  /** The injected sidecar accepts TLS from the app (POOLKEEPER_CLIENT_TLS=self-signed). */
  clientTls?: boolean;
  /** Where the sidecar's SSH key volume is mounted on this host (the webhook's POOLKEEPER_SSH_KEY_DIR), with a tunnel. */
  sshKeyDir?: string;
}

/** Container fields the simulator reads. */
interface ContainerSpec {
  name: string;
  env?: Array<{ name: string; value?: string }>;
  volumeMounts?: Array<{ name: string; mountPath: string }>;
}

/** A Secret volume as the simulator reads it. */
interface VolumeSpec {
  name: string;
  secret?: { secretName: string; items?: Array<{ key: string; path: string }> };
}

/** A pod as the simulator reads it. */
interface PodSpecObject extends KubeObject {
  spec?: { nodeName?: string; containers?: ContainerSpec[]; initContainers?: ContainerSpec[]; volumes?: VolumeSpec[] };
}

/** Which pods get a sidecar: only those the webhook injected, or every opted-in pod (tests without a webhook). */
export type SidecarPolicy = 'injected' | 'every-pod';

function literalEnv(container: ContainerSpec | undefined): Record<string, string> {
  return Object.fromEntries((container?.env ?? []).filter((e) => e.value !== undefined).map((e) => [e.name, e.value as string]));
}

let sequence = 0;

/** Writes `files` into `dir` as kubelet's atomic writer does. */
export function writeSecretVolume(dir: string, files: Record<string, string>): void {
  sequence += 1;
  const version = join(dir, `..${Date.now()}_${sequence}`);
  mkdirSync(version);
  for (const [name, content] of Object.entries(files)) writeFileSync(join(version, name), content);
  const tmpLink = join(dir, `..data_tmp_${sequence}`);
  symlinkSync(version.split('/').pop()!, tmpLink);
  renameSync(tmpLink, join(dir, '..data'));
  for (const name of Object.keys(files)) {
    try {
      symlinkSync(join('..data', name), join(dir, name));
    } catch {
      // the file link already points through ..data
    }
  }
}

/** The simulator. */
export class KubeletSimulator {
  readonly pods = new Map<string, SimulatedPod>();
  /** Pods that did not boot, or were admitted without the sidecar (the webhook did not answer in time): what a test reports when it times out. */
  readonly failures: string[] = [];
  private readonly http: KubeHttp;
  private readonly informer: Informer<PodSpecObject>;
  private readonly root = mkdtempSync(join(tmpdir(), 'poolkeeper-kubelet-'));
  private readonly logger: Logger;
  private credentials: Record<string, string>;
  private readonly work: Promise<void>[] = [];
  /** Hook run when a pod's sidecar is up (tests start the pod's "app" here). */
  onPodReady: (pod: SimulatedPod) => void = () => undefined;

  private readonly kube: KubeControlPlane;
  private readonly namespace: string;

  private readonly policy: SidecarPolicy;

  constructor(kube: KubeControlPlane, namespace: string, credentials: { username: string; password: string }, logger: Logger, policy: SidecarPolicy = 'every-pod') {
    this.policy = policy;
    this.logger = logger;
    this.kube = kube;
    this.namespace = namespace;
    this.http = new KubeHttp(kube.kubeConfig());
    this.credentials = { ...credentials };
    this.informer = new Informer(this.http, { path: `/api/v1/namespaces/${namespace}/pods`, labelSelector: 'poolkeeper.dev/connection', logger: this.logger });
  }

  /** Starts watching the namespace's opted-in pods. */
  async start(): Promise<void> {
    this.informer.onChange((type, pod) => {
      const name = pod.metadata?.name ?? '';
      if (type === 'ADDED' && !this.pods.has(name)) {
        this.work.push(this.boot(pod).catch((err: unknown) => {
          this.failures.push(`${name}: boot failed: ${err instanceof Error ? err.message : String(err)}`);
          this.logger.warn({ err, pod: name }, 'boot failed');
        }));
      }
      if (pod.metadata?.deletionTimestamp && this.pods.get(name) && !this.pods.get(name)!.terminating) this.work.push(this.terminate(this.pods.get(name)!));
    });
    await this.informer.start();
  }

  private async boot(pod: PodSpecObject): Promise<void> {
    const name = pod.metadata?.name ?? '';
    const credentialsDir = join(this.root, name);
    mkdirSync(credentialsDir, { recursive: true });
    writeSecretVolume(credentialsDir, this.credentials);
    const sidecarContainer = [...(pod.spec?.initContainers ?? []), ...(pod.spec?.containers ?? [])].find((c) => c.name === 'poolkeeper-sidecar');
    const appContainer = pod.spec?.containers?.find((c) => c.name !== 'poolkeeper-sidecar');
    const sim: SimulatedPod = { name, uid: pod.metadata?.uid ?? '', credentialsDir, terminating: false, gone: false, appEnv: literalEnv(appContainer) };
    const sidecarEnv = literalEnv(sidecarContainer);
    const runSidecar = this.policy === 'every-pod' || sidecarContainer !== undefined;
    if (!runSidecar) this.failures.push(`${name}: admitted without the sidecar`);
    const drainTimeoutSeconds = Number(sidecarEnv.POOLKEEPER_DRAIN_TIMEOUT ?? 5);
    sim.clientTls = sidecarEnv.POOLKEEPER_CLIENT_TLS === 'self-signed';
    this.pods.set(name, sim);
    let booted!: () => void;
    sim.booted = new Promise((resolve) => (booted = resolve));
    try {
      const sshKeyMount = sidecarEnv.POOLKEEPER_SSH_KEY_DIR;
      // As kubelet: the sidecar does not start until the Secret behind its volume can be read.
      if (runSidecar && sshKeyMount !== undefined) sim.sshKeyDir = await this.mountSecretVolume(pod, sidecarContainer!, sshKeyMount, join(this.root, `${name}-ssh`));
      await this.bootPod(sim, runSidecar, Math.min(drainTimeoutSeconds, 5));
    } finally {
      booted();
    }
  }

  private async bootPod(sim: SimulatedPod, runSidecar: boolean, drainTimeoutSeconds: number): Promise<void> {
    const { name, credentialsDir } = sim;
    const base = `/api/v1/namespaces/${this.namespace}/pods/${name}`;
    await this.http.create(`${base}/binding`, { apiVersion: 'v1', kind: 'Binding', metadata: { name }, target: { apiVersion: 'v1', kind: 'Node', name: 'simulated-node' } });
    // Every simulated pod shares this host's loopback, so each sidecar takes a free port instead of the injected one.
    if (runSidecar) {
      sim.sidecar = await startSidecar({
        apiServer: this.kube.kubeConfig(), namespace: this.namespace, podName: name, listenPort: 0, adminPort: 0,
        credentialsDir, drainTimeoutSeconds, version: 'simulated', memberWaitMs: 30_000,
        ...(sim.sshKeyDir !== undefined ? { sshKeyDir: sim.sshKeyDir } : {}),
        // The pod's emptyDir for the sidecar's state (the backends it holds), as the webhook mounts it.
        stateDir: join(this.root, `${name}-state`),
        ...(sim.clientTls === true ? { clientTls: 'self-signed' as const } : {}),
      }, this.logger.child({ pod: name }));
    }
    const now = new Date().toISOString();
    await this.http.patch(`${base}/status`, { status: { phase: 'Running', conditions: [{ type: 'Ready', status: 'True', lastTransitionTime: now }] } });
    if (!sim.terminating && sim.sidecar) this.onPodReady(sim);
  }

  /**
   * Writes the Secret volume that `container` mounts at `mountPath` into
   * `dir` (its items under their paths, or every key), as kubelet does.
   */
  private async mountSecretVolume(pod: PodSpecObject, container: ContainerSpec, mountPath: string, dir: string): Promise<string> {
    const mount = container.volumeMounts?.find((m) => m.mountPath === mountPath);
    const volume = pod.spec?.volumes?.find((v) => v.name === mount?.name);
    if (!volume?.secret) throw new Error(`no Secret volume is mounted at ${mountPath} in container ${container.name}`);
    const { secretName, items } = volume.secret;
    const secret = await this.http.get<{ data?: Record<string, string> }>(`/api/v1/namespaces/${this.namespace}/secrets/${secretName}`);
    const data = secret.data ?? {};
    const files: Record<string, string> = {};
    for (const { key, path } of items ?? Object.keys(data).map((k) => ({ key: k, path: k }))) {
      if (data[key] === undefined) throw new Error(`Secret ${secretName} has no key ${key}`);
      files[path] = Buffer.from(data[key], 'base64').toString('utf8');
    }
    mkdirSync(dir, { recursive: true });
    writeSecretVolume(dir, files);
    return dir;
  }

  private async terminate(sim: SimulatedPod): Promise<void> {
    sim.terminating = true;
    await sim.booted;
    await sim.onAppStop?.();
    await sim.sidecar?.shutdown();
    await this.http.delete(`/api/v1/namespaces/${this.namespace}/pods/${sim.name}`, { apiVersion: 'v1', kind: 'DeleteOptions', gracePeriodSeconds: 0 }).catch(() => undefined);
    sim.gone = true;
  }

  /** New credentials in every pod's volume, as kubelet syncs an updated Secret. */
  rotate(credentials: { username: string; password: string }): void {
    this.credentials = { ...credentials };
    for (const pod of this.pods.values()) if (!pod.gone) writeSecretVolume(pod.credentialsDir, this.credentials);
  }

  /** Pods whose sidecar runs and that are not terminating. */
  live(): SimulatedPod[] {
    return [...this.pods.values()].filter((p) => p.sidecar && !p.terminating);
  }

  /** Stops every sidecar and the watch. */
  async stop(): Promise<void> {
    await this.informer.stop();
    await Promise.allSettled(this.work);
    await Promise.allSettled([...this.pods.values()].filter((p) => !p.gone).map(async (p) => {
      await p.onAppStop?.();
      await p.sidecar?.shutdown();
    }));
    rmSync(this.root, { recursive: true, force: true });
  }
}
