/**
 * A real single-node Kubernetes: etcd, kube-apiserver, kube-controller-manager,
 * kube-scheduler, containerd + runc + the bridge CNI plugin and a kubelet, all
 * inside one set of namespaces (network, mount, PID) made for the run. The
 * network namespace has a bridge (10.88.0.0/16) and no uplink; the API server
 * and the node listen on the bridge address, and the `kubernetes` Service's
 * address is a DNAT rule to it (there is no kube-proxy). The host reaches the
 * API server and the pods reach the host's PostgreSQL through forwarders
 * joined by Unix sockets. Killing the namespaces' first process ends every
 * container, shim and mount with it, which is how a killed run is reaped.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { request } from 'node:https';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { KubeConfig } from '@kubernetes/client-node';
import { createCertificateAuthority, generateKeyPairPem, issueCertificate, type CertificateBundle } from '../pki/certificates.ts';
import { buildPauseImage, buildPoolkeeperImage, type ImageArchive } from './image.ts';
import { kubeBinDir, kubeVersion } from './kube.ts';
import { ManagedProcess, freePort, waitUntil, type PidRegistry } from './process.ts';
import type { ComponentStatus } from './report.ts';
import { MissingPrerequisiteError, commandOutput } from './system.ts';
import { kubeconfigYaml, runKubectl, runKubectlAsync } from './kubectl.ts';

const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const FORWARDER = join(dirname(fileURLToPath(import.meta.url)), 'real-node-forward.ts');

/** The bridge's own address: API server, kubelet and forwarded services listen here. */
export const BRIDGE_ADDRESS = '10.88.0.1';
const BRIDGE_CIDR = '10.88.0.0/16';
const SERVICE_CIDR = '10.96.0.0/16';
/** The `kubernetes` Service's ClusterIP in SERVICE_CIDR. */
const KUBERNETES_SERVICE_IP = '10.96.0.1';
const API_PORT = 6443;
/** Port on the bridge address where pods reach the host's PostgreSQL. */
export const BRIDGE_POSTGRES_PORT = 5432;
/** The node's name. */
export const NODE_NAME = 'poolkeeper-node';

/** Whether this machine can run a real node, and if not, why. */
export interface RealNodeSupport {
  ok: boolean;
  reason: string;
}

/** Debian's containerd, runc and CNI plugins, where the packages put them. */
const RUNTIME_TOOLS = [
  { path: '/usr/bin/containerd', pkg: 'containerd' },
  { path: '/usr/bin/ctr', pkg: 'containerd' },
  { path: '/usr/sbin/runc', pkg: 'runc' },
  { path: '/usr/lib/cni/bridge', pkg: 'containernetworking-plugins' },
  { path: '/usr/lib/cni/host-local', pkg: 'containernetworking-plugins' },
  { path: '/usr/lib/cni/loopback', pkg: 'containernetworking-plugins' },
  { path: '/usr/sbin/iptables', pkg: 'iptables' },
];

/**
 * Checks what a real node needs and that the kernel lets us make its
 * namespaces. With `install`, installs the missing Debian packages (root only)
 * and builds kubelet and kube-scheduler (Go) on the way.
 */
export function realNodeSupport(options: { install?: boolean } = {}): RealNodeSupport {
  if (process.env.POOLKEEPER_REAL_NODE === '0') return { ok: false, reason: 'POOLKEEPER_REAL_NODE=0' };
  if (process.platform !== 'linux') return { ok: false, reason: 'not Linux' };
  if (process.getuid?.() !== 0) return { ok: false, reason: 'not root (a kubelet and containerd need root)' };
  for (const tool of ['unshare', 'nsenter', 'ip', 'gcc', 'tar', 'gzip']) {
    if (!commandExists(tool)) return { ok: false, reason: `${tool} not found` };
  }
  if (!existsSync('/sys/fs/cgroup/memory') && !existsSync('/sys/fs/cgroup/cgroup.controllers')) return { ok: false, reason: 'no cgroup hierarchy under /sys/fs/cgroup' };
  const probe = spawnQuiet('unshare', ['--net', '--mount', '--pid', '--fork', '--propagation', 'private', 'ip', 'link', 'add', 'probe0', 'type', 'bridge']);
  if (!probe.ok) return { ok: false, reason: `cannot create network/mount/PID namespaces with a bridge: ${probe.output.trim().split('\n')[0] ?? ''}` };
  const missing = [...new Set(RUNTIME_TOOLS.filter((t) => !existsSync(t.path)).map((t) => t.pkg))];
  if (missing.length > 0) {
    if (!options.install) return { ok: false, reason: `missing Debian packages: ${missing.join(' ')}` };
    const update = spawnQuiet('apt-get', ['update', '-qq']);
    const install = update.ok && spawnQuiet('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...missing], { DEBIAN_FRONTEND: 'noninteractive' });
    if (!install || !install.ok) return { ok: false, reason: `could not install ${missing.join(' ')}: ${(install ? install.output : update.output).trim().split('\n').pop() ?? ''}` };
  }
  if (!existsSync(join(kubeBinDir(), 'kubelet')) || !existsSync(join(kubeBinDir(), 'kube-scheduler'))) {
    if (!options.install) return { ok: false, reason: `kubelet ${kubeVersion()} not built (bash scripts/build-kube.sh node)` };
    const build = spawnQuiet('bash', [join(REPO_ROOT, 'scripts', 'build-kube.sh'), 'node']);
    if (!build.ok) return { ok: false, reason: `building kubelet failed: ${build.output.trim().split('\n').slice(-3).join(' ')}` };
  }
  return { ok: true, reason: '' };
}

/** Options of a real node. */
export interface RealNodeOptions {
  /** Host port of the PostgreSQL that pods reach at BRIDGE_ADDRESS:BRIDGE_POSTGRES_PORT. */
  postgresPort?: number;
}

/** A running real node and its control plane. */
export class RealNode {
  /** `https://127.0.0.1:<port>`: the API server as the host reaches it. */
  readonly server: string;
  readonly ca: CertificateBundle;
  /** kubeconfig (cluster-admin) for the host side. */
  readonly kubeconfigPath: string;
  /** The poolkeeper image as containerd has it. */
  readonly image: ImageArchive;
  readonly dir: string;
  private readonly admin: CertificateBundle;
  private readonly processes: ManagedProcess[];
  private readonly holder: ManagedProcess;
  private readonly cgroupName: string;
  private stopped = false;

  private constructor(fields: { server: string; ca: CertificateBundle; admin: CertificateBundle; kubeconfigPath: string; image: ImageArchive; dir: string; processes: ManagedProcess[]; holder: ManagedProcess; cgroupName: string }) {
    this.server = fields.server;
    this.ca = fields.ca;
    this.admin = fields.admin;
    this.kubeconfigPath = fields.kubeconfigPath;
    this.image = fields.image;
    this.dir = fields.dir;
    this.processes = fields.processes;
    this.holder = fields.holder;
    this.cgroupName = fields.cgroupName;
  }

  /** Builds what is missing (images, kubelet), makes the namespaces and starts every component; resolves when the node is Ready. */
  static async start(runDir: string, registry: PidRegistry, options: RealNodeOptions = {}): Promise<RealNode> {
    const support = realNodeSupport({ install: true });
    if (!support.ok) throw new MissingPrerequisiteError(`a real node (${support.reason})`, 'It needs root, Linux namespaces, Debian containerd/runc/containernetworking-plugins and Go.');
    const bin = (name: string): string => join(kubeBinDir(), name);
    const dir = join(runDir, 'node');
    mkdirSync(dir, { recursive: true, mode: 0o755 });
    const file = (name: string, content: string, mode = 0o600): string => {
      const path = join(dir, name);
      mkdirSync(dirname(path), { recursive: true });
      writeFileSync(path, content, { mode });
      return path;
    };
    const image = buildPoolkeeperImage();
    const pause = buildPauseImage();

    // The namespaces' first process: mounts private tmpfs over the runtime's fixed
    // state paths, builds the bridge, then waits (and reaps orphans, as PID 1 must).
    const setup = [
      'set -e',
      'for d in /run/containerd /run/netns /var/log/pods /var/log/containers /var/lib/cni; do mkdir -p $d; mount -t tmpfs -o mode=755 tmpfs $d; done',
      'ip link set lo up',
      'ip link add cni0 type bridge',
      `ip addr add ${BRIDGE_ADDRESS}/16 dev cni0`,
      'ip link set cni0 up',
      'echo 1 > /proc/sys/net/ipv4/ip_forward',
      `iptables -t nat -A PREROUTING -d ${KUBERNETES_SERVICE_IP}/32 -p tcp --dport 443 -j DNAT --to-destination ${BRIDGE_ADDRESS}:${API_PORT}`,
      `iptables -t nat -A OUTPUT -d ${KUBERNETES_SERVICE_IP}/32 -p tcp --dport 443 -j DNAT --to-destination ${BRIDGE_ADDRESS}:${API_PORT}`,
      `touch ${join(dir, 'namespaces-ready')}`,
      'trap "exit 0" TERM',
      'while :; do sleep 3600 & wait; done',
    ].join('\n');
    const holder = ManagedProcess.start({
      name: 'namespaces',
      command: 'unshare',
      args: ['--net', '--mount', '--pid', '--fork', '--kill-child', '--propagation', 'private', '--mount-proc', 'bash', '-c', setup],
      logFile: join(dir, 'namespaces.log'),
    }, registry);
    const processes: ManagedProcess[] = [];
    // The run dir's name (poolkeeper-env-…): cgroups of runs whose directory is gone are swept below.
    const cgroupName = basename(runDir);
    removeAbandonedCgroups(dirname(runDir));
    const stopAll = async (): Promise<void> => {
      for (const p of [...processes].reverse()) await p.stop(3000);
      await holder.stop(2000);
      removeCgroups(cgroupName);
    };
    try {
      await waitUntil('network namespace', () => Promise.resolve(existsSync(join(dir, 'namespaces-ready'))), { timeoutMs: 15_000, process: holder });
      const nsPid = firstChild(holder.pid ?? 0);
      // The node's own processes share its CPU weight with the pods (see NODE_CPU_SHARES):
      // each joins the run's cpu cgroup before it execs, so its children are in it too.
      createCgroups(cgroupName);
      const joinCgroup = cpuCgroupProcs(cgroupName);
      const inCgroup = (command: string, args: string[]): { command: string; args: string[] } => (joinCgroup
        ? { command: 'sh', args: ['-c', `echo $$ > ${joinCgroup} && exec "$@"`, 'sh', command, ...args] }
        : { command, args });
      const inNs = (name: string, command: string, args: string[]): ManagedProcess => {
        const p = ManagedProcess.start({ name, ...inCgroup('nsenter', ['-t', String(nsPid), '-n', '-m', '-p', '--', command, ...args]), logFile: join(dir, `${name}.log`) }, registry);
        processes.push(p);
        return p;
      };
      const execInNs = (command: string, args: string[]): string => execFileSync('nsenter', ['-t', String(nsPid), '-n', '-m', '-p', '--', command, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

      // PKI
      const ca = await createCertificateAuthority('poolkeeper-real-node-ca', 30);
      const caFile = file('pki/ca.crt', ca.certPem, 0o644);
      const cert = async (name: string, request: Parameters<typeof issueCertificate>[1]): Promise<{ certFile: string; keyFile: string; bundle: CertificateBundle }> => {
        const bundle = await issueCertificate(ca, request);
        return { certFile: file(`pki/${name}.crt`, bundle.certPem), keyFile: file(`pki/${name}.key`, bundle.keyPem), bundle };
      };
      const serving = await cert('apiserver', {
        commonName: 'kube-apiserver',
        dnsNames: ['localhost', 'kubernetes', 'kubernetes.default', 'kubernetes.default.svc', 'kubernetes.default.svc.cluster.local'],
        ipAddresses: ['127.0.0.1', BRIDGE_ADDRESS, KUBERNETES_SERVICE_IP],
        usage: 'server',
        validityDays: 30,
      });
      const admin = await cert('admin', { commonName: 'poolkeeper-admin', organizations: ['system:masters'], usage: 'client', validityDays: 30 });
      const kcm = await cert('kcm', { commonName: 'system:kube-controller-manager', usage: 'client', validityDays: 30 });
      const scheduler = await cert('scheduler', { commonName: 'system:kube-scheduler', usage: 'client', validityDays: 30 });
      const kubelet = await cert('kubelet', { commonName: `system:node:${NODE_NAME}`, organizations: ['system:nodes'], usage: 'client', validityDays: 30 });
      const apiToKubelet = await cert('apiserver-kubelet-client', { commonName: 'kube-apiserver-kubelet-client', organizations: ['system:masters'], usage: 'client', validityDays: 30 });
      const saKeys = await generateKeyPairPem();
      const saKey = file('pki/sa.key', saKeys.privateKeyPem);
      const saPub = file('pki/sa.pub', saKeys.publicKeyPem);
      const inside = `https://${BRIDGE_ADDRESS}:${API_PORT}`;
      const kubeconfig = (name: string, server: string, id: CertificateBundle): string => file(`${name}.kubeconfig`, kubeconfigYaml('real-node', server, ca.certPem, name, id));

      // etcd and the API server
      const etcd = inNs('etcd', bin('etcd'), [
        '--name=real-node', `--data-dir=${join(dir, 'etcd')}`,
        '--listen-client-urls=http://127.0.0.1:2379', '--advertise-client-urls=http://127.0.0.1:2379',
        '--listen-peer-urls=http://127.0.0.1:2380', '--initial-advertise-peer-urls=http://127.0.0.1:2380',
        '--initial-cluster=real-node=http://127.0.0.1:2380', '--unsafe-no-fsync', '--log-level=warn',
      ]);
      const apiserver = inNs('kube-apiserver', bin('kube-apiserver'), [
        '--etcd-servers=http://127.0.0.1:2379',
        `--bind-address=${BRIDGE_ADDRESS}`, `--advertise-address=${BRIDGE_ADDRESS}`, `--secure-port=${API_PORT}`,
        `--cert-dir=${join(dir, 'apiserver-certs')}`,
        `--tls-cert-file=${serving.certFile}`, `--tls-private-key-file=${serving.keyFile}`,
        `--client-ca-file=${caFile}`,
        `--kubelet-client-certificate=${apiToKubelet.certFile}`, `--kubelet-client-key=${apiToKubelet.keyFile}`,
        '--kubelet-preferred-address-types=InternalIP',
        // No kube-proxy: the API server reaches webhook Services at their endpoints.
        '--enable-aggregator-routing=true',
        '--service-account-issuer=https://kubernetes.default.svc.cluster.local',
        `--service-account-key-file=${saPub}`, `--service-account-signing-key-file=${saKey}`,
        `--service-cluster-ip-range=${SERVICE_CIDR}`,
        '--authorization-mode=Node,RBAC',
        '--enable-admission-plugins=NodeRestriction',
        '--allow-privileged=true',
        '--profiling=false',
        '--v=1',
      ]);

      // The host's side: the API server on loopback; the pods' side: PostgreSQL on the bridge.
      const apiSock = join(dir, 'api.sock');
      const pgSock = join(dir, 'pg.sock');
      const forwards = [`unix:${apiSock}=tcp:${BRIDGE_ADDRESS}:${API_PORT}`];
      if (options.postgresPort) forwards.push(`tcp:${BRIDGE_ADDRESS}:${BRIDGE_POSTGRES_PORT}=unix:${pgSock}`);
      inNs('forward-inside', process.execPath, [FORWARDER, ...forwards]);
      const hostApiPort = await freePort();
      const hostForwards = [`tcp:127.0.0.1:${hostApiPort}=unix:${apiSock}`];
      if (options.postgresPort) hostForwards.push(`unix:${pgSock}=tcp:127.0.0.1:${options.postgresPort}`);
      processes.push(ManagedProcess.start({ name: 'forward-host', ...inCgroup(process.execPath, [FORWARDER, ...hostForwards]), logFile: join(dir, 'forward-host.log') }, registry));
      const server = `https://127.0.0.1:${hostApiPort}`;
      const kubeconfigPath = kubeconfig('admin', server, admin.bundle);
      const node = new RealNode({ server, ca, admin: admin.bundle, kubeconfigPath, image, dir, processes, holder, cgroupName });
      await waitUntil('etcd', () => Promise.resolve(etcd.running), { timeoutMs: 1000, process: etcd });
      await waitUntil('kube-apiserver', async () => (await node.get('/readyz')).status === 200, { timeoutMs: 90_000, process: apiserver, intervalMs: 250 });

      const controllerManager = inNs('kube-controller-manager', bin('kube-controller-manager'), [
        `--kubeconfig=${kubeconfig('kcm', inside, kcm.bundle)}`,
        `--authentication-kubeconfig=${join(dir, 'kcm.kubeconfig')}`, `--authorization-kubeconfig=${join(dir, 'kcm.kubeconfig')}`,
        `--service-account-private-key-file=${saKey}`, `--root-ca-file=${caFile}`,
        '--use-service-account-credentials=true', '--leader-elect=false',
        '--bind-address=127.0.0.1', '--secure-port=10257', `--cert-dir=${join(dir, 'kcm-certs')}`,
        '--controllers=*', '--v=1',
      ]);
      inNs('kube-scheduler', bin('kube-scheduler'), [
        `--kubeconfig=${kubeconfig('scheduler', inside, scheduler.bundle)}`,
        `--authentication-kubeconfig=${join(dir, 'scheduler.kubeconfig')}`, `--authorization-kubeconfig=${join(dir, 'scheduler.kubeconfig')}`,
        '--leader-elect=false', '--bind-address=127.0.0.1', '--secure-port=10259', '--v=1',
      ]);

      // containerd with the images, then the kubelet
      const sock = join(dir, 'containerd.sock');
      const cniDir = join(dir, 'cni');
      file('cni/10-poolkeeper.conflist', JSON.stringify({
        cniVersion: '1.0.0',
        name: 'poolkeeper',
        plugins: [{ type: 'bridge', bridge: 'cni0', isGateway: true, ipMasq: false, hairpinMode: true, ipam: { type: 'host-local', ranges: [[{ subnet: BRIDGE_CIDR, gateway: BRIDGE_ADDRESS }]], routes: [{ dst: '0.0.0.0/0' }], dataDir: join(dir, 'cni-ipam') } }],
      }), 0o644);
      const containerdConfig = file('containerd.toml', [
        'version = 2',
        `root = "${join(dir, 'containerd', 'root')}"`,
        `state = "${join(dir, 'containerd', 'state')}"`,
        '[grpc]',
        `  address = "${sock}"`,
        '[plugins."io.containerd.grpc.v1.cri"]',
        `  sandbox_image = "${pause.reference}"`,
        // Without CAP_SYS_RESOURCE runc cannot lower oom_score_adj below the parent's.
        '  restrict_oom_score_adj = true',
        '  [plugins."io.containerd.grpc.v1.cri".containerd]',
        '    snapshotter = "overlayfs"',
        '    default_runtime_name = "runc"',
        '    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
        '      runtime_type = "io.containerd.runc.v2"',
        '      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]',
        '        SystemdCgroup = false',
        '  [plugins."io.containerd.grpc.v1.cri".cni]',
        '    bin_dir = "/usr/lib/cni"',
        `    conf_dir = "${cniDir}"`,
        '',
      ].join('\n'));
      const containerd = inNs('containerd', '/usr/bin/containerd', ['--config', containerdConfig, '--log-level', 'warn']);
      await waitUntil('containerd', () => Promise.resolve(existsSync(sock) && execInNs('/usr/bin/ctr', ['--address', sock, 'version']).includes('Server')), { timeoutMs: 30_000, process: containerd, intervalMs: 250 });
      for (const archive of [pause, image]) execInNs('/usr/bin/ctr', ['--address', sock, '-n', 'k8s.io', 'images', 'import', archive.path]);

      const kubeletConfig = file('kubelet.yaml', [
        'apiVersion: kubelet.config.k8s.io/v1beta1',
        'kind: KubeletConfiguration',
        `address: ${BRIDGE_ADDRESS}`,
        'port: 10250',
        'readOnlyPort: 0',
        'healthzBindAddress: 127.0.0.1',
        'healthzPort: 10248',
        `containerRuntimeEndpoint: unix://${sock}`,
        'authentication:',
        '  anonymous: { enabled: false }',
        '  webhook: { enabled: false }',
        `  x509: { clientCAFile: ${caFile} }`,
        'authorization: { mode: AlwaysAllow }',
        'cgroupDriver: cgroupfs',
        `cgroupRoot: /${cgroupName}`,
        // cgroup v1 hosts: kubelet refuses them unless told otherwise.
        'failCgroupV1: false',
        'failSwapOn: false',
        // Lowering its own oom_score_adj needs CAP_SYS_RESOURCE.
        'oomScoreAdj: 0',
        `resolvConf: ${file('resolv.conf', `nameserver ${BRIDGE_ADDRESS}\n`, 0o644)}`,
        // Images come from archives, not a registry: never collect them.
        'imageGCHighThresholdPercent: 100',
        'imageGCLowThresholdPercent: 99',
        'evictionHard: { memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%" }',
        // Secret volumes refresh on the pod's sync; a short period keeps rotation quick.
        'syncFrequency: 5s',
        'serializeImagePulls: false',
        'registerNode: true',
        '',
      ].join('\n'));
      const kubeletProcess = inNs('kubelet', bin('kubelet'), [
        `--config=${kubeletConfig}`,
        `--kubeconfig=${kubeconfig('kubelet', inside, kubelet.bundle)}`,
        `--root-dir=${join(dir, 'kubelet')}`,
        `--cert-dir=${join(dir, 'kubelet-pki')}`,
        `--hostname-override=${NODE_NAME}`,
        `--node-ip=${BRIDGE_ADDRESS}`,
        '--v=1',
      ]);
      await waitUntil('kube-controller-manager', async () => (await node.get('/api/v1/namespaces/default/serviceaccounts/default')).status === 200, { timeoutMs: 60_000, process: controllerManager, intervalMs: 250 });
      await waitUntil('node Ready', async () => node.nodeReady(), { timeoutMs: 90_000, process: kubeletProcess, intervalMs: 500 });
      return node;
    } catch (err) {
      await stopAll();
      throw err;
    }
  }

  /** True once the node reports Ready. */
  async nodeReady(): Promise<boolean> {
    const res = await this.get(`/api/v1/nodes/${NODE_NAME}`);
    if (res.status !== 200) return false;
    const node = JSON.parse(res.body) as { status?: { conditions?: { type: string; status: string }[] } };
    return node.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') ?? false;
  }

  /** A KubeConfig for @kubernetes/client-node, as cluster-admin. */
  kubeConfig(): KubeConfig {
    const kc = new KubeConfig();
    kc.loadFromFile(this.kubeconfigPath);
    return kc;
  }

  /** The kubectl binary of the pinned release. */
  get kubectlPath(): string {
    return join(kubeBinDir(), 'kubectl');
  }

  /** Runs kubectl as cluster-admin; throws with stderr on failure. */
  kubectl(args: string[], input?: string): string {
    return runKubectl(this.kubectlPath, this.kubeconfigPath, args, input);
  }

  /**
   * kubectl without blocking the event loop: needed whenever this process
   * also serves something (a sampler, a forwarder) while kubectl runs.
   */
  kubectlAsync(args: string[], input?: string): Promise<string> {
    return runKubectlAsync(this.kubectlPath, this.kubeconfigPath, args, input);
  }

  /** True if containerd lists the poolkeeper image. */
  imagePresent(): boolean {
    try {
      return this.execInNs('/usr/bin/ctr', ['--address', join(this.dir, 'containerd.sock'), '-n', 'k8s.io', 'images', 'ls', '-q']).split('\n').includes(this.image.reference);
    } catch {
      return false;
    }
  }

  /** Runs a command inside the node's namespaces (network, mount, PID) and returns stdout. */
  execInNs(command: string, args: string[]): string {
    return execFileSync('nsenter', ['-t', String(firstChild(this.holder.pid ?? 0)), '-n', '-m', '-p', '--', command, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  }

  /** GET `path` on the API server as cluster-admin. */
  get(path: string): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      const req = request(`${this.server}${path}`, { ca: this.ca.certPem, cert: this.admin.certPem, key: this.admin.keyPem, timeout: 5000 }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => (body += chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      });
      req.on('timeout', () => req.destroy(new Error('timeout')));
      req.on('error', reject);
      req.end();
    });
  }

  /** Versions of the node's parts, for reports. */
  versions(): { kubelet: string; containerd: string; runc: string } {
    return {
      kubelet: commandOutput(join(kubeBinDir(), 'kubelet'), ['--version']).replace(/^Kubernetes\s+/, ''),
      containerd: commandOutput('/usr/bin/containerd', ['--version']).split(/\s+/)[2] ?? 'unknown',
      runc: commandOutput('/usr/sbin/runc', ['--version']).split('\n')[0]?.replace(/^runc version\s+/, '') ?? 'unknown',
    };
  }

  /** Log files of every component. */
  get logDir(): string {
    return this.dir;
  }

  /** Stops the kubelet first (so it does not restart what goes), then everything else; the namespaces take the containers with them. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    const kubelet = this.processes.find((p) => p.name === 'kubelet');
    await kubelet?.stop(5000);
    for (const p of [...this.processes].reverse()) await p.stop(3000);
    await this.holder.stop(2000);
    removeCgroups(this.cgroupName);
  }
}

/** Applies crds/ and deploy/ (kustomize) as a user would, and waits until the controller and webhook pods are Ready. */
export async function installPoolkeeper(node: RealNode, options: { kustomizeDir?: string } = {}): Promise<void> {
  node.kubectl(['apply', '-f', join(REPO_ROOT, 'crds')]);
  node.kubectl(['wait', '--for=condition=Established', '--timeout=60s', 'crd', '--all']);
  await node.kubectlAsync(['apply', '-k', options.kustomizeDir ?? join(REPO_ROOT, 'deploy')]);
  await node.kubectlAsync(['-n', 'poolkeeper-system', 'rollout', 'status', 'deployment/poolkeeper', '--timeout=180s']);
}

/** One line each for the kubelet, the runtime and the image, as `npm run testenv -- smoke` prints them. */
export async function probeRealNode(node: RealNode): Promise<ComponentStatus[]> {
  const v = node.versions();
  const ready = await node.nodeReady();
  const mb = (n: number): string => `${(n / 1e6).toFixed(1)} MB`;
  return [
    { name: 'kubelet (real node)', version: v.kubelet, healthy: ready, detail: `node ${NODE_NAME} ${ready ? 'Ready' : 'not Ready'} at ${BRIDGE_ADDRESS}; API ${node.server}` },
    { name: 'containerd + runc', version: `${v.containerd} / ${v.runc}`, healthy: ready, detail: 'CNI bridge 10.88.0.0/16, no uplink' },
    { name: 'poolkeeper image', version: node.image.reference.replace(/^docker\.io\//, ''), healthy: node.imagePresent(), detail: `${mb(node.image.compressedBytes)} gzipped, ${mb(node.image.uncompressedBytes)} unpacked; built without a registry` },
  ];
}

/** The host pid of the namespaces' PID 1 (unshare's only child). */
function firstChild(pid: number): number {
  const children = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  const child = children[0];
  if (!child) throw new Error(`unshare ${pid} has no child`);
  return child;
}

/** cgroup v1 hierarchies (one per controller) or the v2 root. */
function cgroupRoots(): string[] {
  if (existsSync('/sys/fs/cgroup/cgroup.controllers')) return ['/sys/fs/cgroup'];
  return readdirSync('/sys/fs/cgroup').map((c) => join('/sys/fs/cgroup', c)).filter((p) => existsSync(join(p, 'cgroup.procs')));
}

/** The node's CPU weight: as much as ten busy processes of the host. */
const NODE_CPU_SHARES = 10_240;

/** The kubelet's cgroup root must exist in every hierarchy; cpuset needs its CPUs and memory nodes filled in. */
function createCgroups(name: string): void {
  for (const root of cgroupRoots()) {
    const dir = join(root, name);
    mkdirSync(dir, { recursive: true });
    for (const f of ['cpuset.cpus', 'cpuset.mems']) {
      if (existsSync(join(dir, f)) && readFileSync(join(dir, f), 'utf8').trim() === '') writeFileSync(join(dir, f), readFileSync(join(root, f), 'utf8'));
    }
    // With cgroup v1 a group weighs as much as one process beside it: on a busy machine all
    // the pods together would get one process's share, and sidecars miss their startup probes.
    if (existsSync(join(dir, 'cpu.shares'))) writeFileSync(join(dir, 'cpu.shares'), String(NODE_CPU_SHARES));
    if (existsSync(join(dir, 'cpu.weight'))) writeFileSync(join(dir, 'cpu.weight'), String(Math.round(NODE_CPU_SHARES / 1024 * 100)));
  }
}

/** Cgroups of earlier runs (named after their run dir) whose run dir was reaped. */
function removeAbandonedCgroups(runRoot: string): void {
  const memory = cgroupRoots()[0];
  if (!memory || !existsSync(memory)) return;
  for (const entry of readdirSync(memory)) {
    if (entry.startsWith('poolkeeper-env-') && !existsSync(join(runRoot, entry))) removeCgroups(entry);
  }
}

/** The cgroup.procs file of the run's `system` cpu cgroup (beside the kubelet's kubepods), if the cpu controller has one. */
function cpuCgroupProcs(name: string): string | undefined {
  const cpu = existsSync('/sys/fs/cgroup/cgroup.controllers') ? '/sys/fs/cgroup' : '/sys/fs/cgroup/cpu';
  const system = join(cpu, name, 'system');
  if (!existsSync(join(cpu, name))) return undefined;
  mkdirSync(system, { recursive: true });
  return join(system, 'cgroup.procs');
}

/** Removes the run's cgroups, deepest first (only empty cgroups can go). */
function removeCgroups(name: string): void {
  const remove = (dir: string): void => {
    if (!existsSync(dir)) return;
    for (const entry of readdirSync(dir, { withFileTypes: true })) if (entry.isDirectory()) remove(join(dir, entry.name));
    try {
      rmdirSync(dir);
    } catch {
      // a process is still in it (the namespaces are going): the next run sweeps it
    }
  };
  for (const root of cgroupRoots()) remove(join(root, name));
}

function commandExists(name: string): boolean {
  return spawnQuiet('sh', ['-c', `command -v ${name}`]).ok;
}

function spawnQuiet(command: string, args: string[], env: NodeJS.ProcessEnv = {}): { ok: boolean; output: string } {
  try {
    const output = execFileSync(command, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env }, timeout: 600_000 });
    return { ok: true, output };
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string };
    return { ok: false, output: `${e.stdout ?? ''}${e.stderr ?? e.message}` };
  }
}
