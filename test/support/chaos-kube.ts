/**
 * Fault scenarios with the control plane: a Deployment of opted-in pods whose
 * sidecars (the kubelet simulator runs them in this process, as the demo
 * does) draw on one DatabaseConnection with a fleet limit, and the controller
 * as a black box (`poolkeeper controller` in a child process, so it can be
 * SIGKILLed). The controller and the sidecars reach the API server through a
 * TCP proxy that can refuse connections, which is how an API server outage
 * looks to them. Used by `npm run chaos` after the sidecar-only scenarios.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { openSync, closeSync, readFileSync, writeFileSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { KubeConfig } from '@kubernetes/client-node';
import { pino } from 'pino';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import { KubeletSimulator } from '../../src/devenv/kubelet-sim.ts';
import { freePort } from '../../src/devenv/process.ts';
import { createWorkload, eventually, installCrds } from '../../src/devenv/scenario.ts';
import { CHAOS_ROLE, type ChaosLab, type FaultContext, type Fleet, type Scenario } from './chaos.ts';
import { pipeBoth } from './tcp-proxy.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const POOLKEEPER = new URL('../../src/bin/poolkeeper.ts', import.meta.url).pathname;

/** A TCP proxy in front of the API server that can go down (connections refused and cut) and come back on the same port. */
class ApiProxy {
  port = 0;
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  private readonly target: { host: string; port: number };

  constructor(target: { host: string; port: number }) {
    this.target = target;
  }

  async up(): Promise<void> {
    const server = createServer((client) => {
      const upstream = createConnection(this.target);
      pipeBoth(client, upstream, this.sockets);
    });
    this.server = server;
    await new Promise<void>((resolve) => server.listen(this.port, '127.0.0.1', resolve));
    const address = server.address();
    this.port = typeof address === 'object' && address ? address.port : 0;
  }

  async down(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    for (const s of this.sockets) s.destroy();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

/** The controller binary in a child process of its own process group. */
class ControllerProcess {
  private child: ChildProcess | undefined;
  private readonly env: NodeJS.ProcessEnv;
  private readonly logFile: string;

  constructor(env: NodeJS.ProcessEnv, logFile: string) {
    this.env = env;
    this.logFile = logFile;
  }

  start(): void {
    const log = openSync(this.logFile, 'a');
    const child = spawn(process.execPath, [POOLKEEPER, 'controller'], { detached: true, stdio: ['ignore', log, log], env: { ...process.env, ...this.env } });
    closeSync(log);
    this.child = child;
    const pid = child.pid!;
    const reap = (): void => {
      try {
        process.kill(-pid, 'SIGKILL');
      } catch {
        // gone already
      }
    };
    process.once('exit', reap);
    child.once('exit', () => process.off('exit', reap));
  }

  async kill(): Promise<void> {
    const child = this.child;
    if (child?.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    process.kill(-child.pid, 'SIGKILL');
    await exited;
  }
}

let namespaces = 0;

/** The running fleet of one scenario, and what its fault needs. */
interface KubeFleet extends Fleet {
  kube: KubeControlPlane;
  namespace: string;
  proxy: ApiProxy;
  controller: ControllerProcess;
  kubelet: KubeletSimulator;
  /** `kubectl apply` of the DatabaseConnection with a fleet limit. */
  setLimit(limit: number): Promise<void>;
  /** True once every live pod's sidecar holds `perPod` acknowledged for the newest grant. */
  allAt(perPod: number, pods: number): boolean;
}

async function startFleet(lab: ChaosLab, replicas: number, limit: number, logDir: string): Promise<KubeFleet> {
  const kube = await lab.env.kube();
  await installCrds(kube);
  namespaces += 1;
  const namespace = `chaos-${namespaces}`;
  const password = readFileSync(join(lab.credentialsDir, 'password'), 'utf8');
  createWorkload(kube, { namespace, connection: 'db', deployment: 'web', replicas, secret: 'creds', username: CHAOS_ROLE, password });
  const connection = (max: number): string => JSON.stringify({
    apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'db', namespace },
    spec: {
      database: { host: lab.postgres.host, port: lab.postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'creds' } },
      maxConnections: max, reserve: 0, consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } }],
      pool: { mode: 'transaction', poolTimeout: 3, poolPrePing: true },
    },
  });
  kube.kubectl(['apply', '-f', '-'], connection(limit));
  const target = new URL(kube.server);
  const proxy = new ApiProxy({ host: target.hostname, port: Number(target.port) });
  await proxy.up();
  const kubeconfigFile = join(logDir, `${namespace}.kubeconfig`);
  writeFileSync(kubeconfigFile, readFileSync(kube.kubeconfigPath, 'utf8').replace(kube.server, `https://127.0.0.1:${proxy.port}`), { mode: 0o600 });
  const proxied = new KubeConfig();
  proxied.loadFromFile(kubeconfigFile);
  // The simulated kubelet and its sidecars reach the API server through the proxy too.
  const throughProxy = Object.assign(Object.create(kube) as KubeControlPlane, { kubeConfig: () => proxied });
  const controller = new ControllerProcess({
    KUBECONFIG: kubeconfigFile, POD_NAMESPACE: namespace, POD_NAME: 'chaos-controller', POOLKEEPER_LEADER_ELECTION: 'false',
    POOLKEEPER_REPAIR: 'off', POOLKEEPER_METRICS_PORT: String(await freePort()), POOLKEEPER_LOG_LEVEL: 'info',
  }, join(logDir, `controller-${namespace}.log`));
  controller.start();
  const kubelet = new KubeletSimulator(throughProxy, namespace, { username: CHAOS_ROLE, password }, pino({ level: 'silent' }));
  await kubelet.start();
  const allAt = (perPod: number, pods: number): boolean => {
    const live = kubelet.live();
    return live.length === pods && live.every((p) => p.sidecar?.sidecar.status().acknowledgedConnections === perPod);
  };
  await eventually('initial grants', () => allAt(Math.floor(limit / replicas), replicas), 90_000);
  return {
    kube, namespace, proxy, controller, kubelet, limit, allAt,
    port: (worker) => {
      const ports = kubelet.live().map((p) => p.sidecar?.port).filter((p) => p !== undefined);
      return ports[worker % Math.max(1, ports.length)] ?? 1;
    },
    setLimit: async (max) => {
      await kube.kubectlAsync(['apply', '-f', '-'], connection(max));
    },
    stop: async () => {
      await kubelet.stop();
      await controller.kill();
      await proxy.down();
      await kube.kubectlAsync(['delete', 'namespace', namespace, '--wait=false']).catch(() => undefined);
    },
  };
}

/** A fleet scenario: `inject` gets the fleet started for it. */
function fleetScenario(args: { name: string; replicas: number; limit: number; expectedErrors?: boolean; inject: (ctx: FaultContext, fleet: KubeFleet) => Promise<void> }): Scenario {
  let fleet: KubeFleet | undefined;
  return {
    name: args.name,
    clients: 9,
    ...(args.expectedErrors ? { expectedErrors: true } : {}),
    fleet: async (lab, options) => {
      fleet = await startFleet(lab, args.replicas, args.limit, options.logDir);
      return fleet;
    },
    inject: (ctx) => args.inject(ctx, fleet!),
  };
}

/** The Kubernetes faults, after the sidecar-only ones. */
export const KUBE_SCENARIOS: Scenario[] = [
  fleetScenario({
    name: 'API server unreachable 60 s (3 pods, fleet limit 12)',
    replicas: 3,
    limit: 12,
    async inject(ctx, fleet) {
      await fleet.proxy.down();
      await sleep(ctx.quick ? 10_000 : 60_000);
      await fleet.proxy.up();
      ctx.healed();
      // How soon the controller acts again: a limit change right after the outage.
      const started = Date.now();
      await fleet.setLimit(9);
      try {
        await eventually('the new grant after the outage', () => fleet.allAt(3, 3), 60_000);
        // Every sidecar acknowledged 3: from now on the fleet must stay under the new limit.
        ctx.setLimit(9);
        ctx.note(`a limit change right after the outage reached every sidecar in ${((Date.now() - started) / 1000).toFixed(1)} s`);
      } catch {
        ctx.miss('the controller acting at once after the outage: a limit change did not reach every sidecar within 60 s');
      }
    },
  }),
  fleetScenario({
    name: 'controller SIGKILL mid-rebalance (scale 3 -> 6, fleet limit 12)',
    replicas: 3,
    limit: 12,
    async inject(ctx, fleet) {
      const started = Date.now();
      await fleet.kube.kubectlAsync(['-n', fleet.namespace, 'scale', 'deployment/web', '--replicas=6']);
      // Kill it while it shrinks the old pods' grants and hands the new pods theirs.
      await eventually('the rebalance to start', () => fleet.kubelet.live().some((p) => (p.sidecar?.sidecar.status().acknowledgedConnections ?? 4) < 4), 30_000).catch(() => ctx.note('the rebalance had not started when the controller was killed'));
      await fleet.controller.kill();
      await sleep(2000);
      fleet.controller.start();
      ctx.healed();
      try {
        await eventually('every pod at 2', () => fleet.allAt(2, 6), 90_000);
        ctx.note(`all 6 pods held their grant of 2 ${((Date.now() - started) / 1000).toFixed(1)} s after the scale`);
      } catch {
        ctx.miss('every pod holding its grant within 90 s of the controller restart');
      }
    },
  }),
];
