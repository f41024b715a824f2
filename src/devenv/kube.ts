/**
 * A real Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC,
 * client-certificate auth, service-account tokens) and kube-controller-manager
 * so that Deployments create ReplicaSets and Pods. There is no kubelet and no
 * scheduler: pods stay Pending unless a test writes their status itself.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { request } from 'node:https';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { KubeConfig } from '@kubernetes/client-node';
import { createCertificateAuthority, generateKeyPairPem, issueCertificate, type CertificateBundle } from '../pki/certificates.ts';
import { ManagedProcess, freePort, waitUntil, type PidRegistry } from './process.ts';
import { MissingPrerequisiteError, commandOutput } from './system.ts';
import { kubeconfigYaml, runKubectl, runKubectlAsync } from './kubectl.ts';

const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The pinned Kubernetes release, shared with scripts/build-kube.sh. */
export function kubeVersion(): string {
  return process.env.POOLKEEPER_KUBE_VERSION ?? readFileSync(join(REPO_ROOT, 'scripts', 'kube-version'), 'utf8').trim();
}

/** Where scripts/build-kube.sh caches the binaries for `version`. */
export function kubeBinDir(version = kubeVersion()): string {
  const cacheRoot = process.env.POOLKEEPER_CACHE ?? join(homedir(), '.cache', 'poolkeeper');
  return join(cacheRoot, `kube-${version}`, 'bin');
}

function kubeBinary(name: string): string {
  const path = join(kubeBinDir(), name);
  if (!existsSync(path)) throw new MissingPrerequisiteError(`${name} ${kubeVersion()} at ${path}`, 'Run `npm run setup` (it builds the Kubernetes binaries from Go modules once per machine; needs Go >= 1.26).');
  return path;
}

/** A client identity: certificate and key as PEM. */
interface ClientIdentity {
  certPem: string;
  keyPem: string;
}

/** A running control plane. */
export class KubeControlPlane {
  /** `https://127.0.0.1:<port>` of the API server. */
  readonly server: string;
  /** CA that signed the API server's serving certificate and client certificates. */
  readonly ca: CertificateBundle;
  /** Path of a kubeconfig file for kubectl, as cluster-admin. */
  readonly kubeconfigPath: string;
  readonly etcdUrl: string;
  private readonly admin: ClientIdentity;
  private readonly dir: string;
  private readonly processes: ManagedProcess[];

  private constructor(fields: { server: string; ca: CertificateBundle; admin: ClientIdentity; kubeconfigPath: string; etcdUrl: string; dir: string; processes: ManagedProcess[] }) {
    this.server = fields.server;
    this.ca = fields.ca;
    this.admin = fields.admin;
    this.kubeconfigPath = fields.kubeconfigPath;
    this.etcdUrl = fields.etcdUrl;
    this.dir = fields.dir;
    this.processes = fields.processes;
  }

  /** Generates PKI and starts etcd, kube-apiserver and kube-controller-manager. */
  static async start(runDir: string, registry: PidRegistry): Promise<KubeControlPlane> {
    const etcdBin = kubeBinary('etcd');
    const apiserverBin = kubeBinary('kube-apiserver');
    const kcmBin = kubeBinary('kube-controller-manager');
    const dir = join(runDir, 'kube');
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const file = (name: string, content: string): string => {
      const path = join(dir, name);
      writeFileSync(path, content, { mode: 0o600 });
      return path;
    };

    const ca = await createCertificateAuthority('poolkeeper-test-ca', 30);
    const serving = await issueCertificate(ca, {
      commonName: 'kube-apiserver',
      dnsNames: ['localhost', 'kubernetes', 'kubernetes.default', 'kubernetes.default.svc', 'kubernetes.default.svc.cluster.local'],
      ipAddresses: ['127.0.0.1', '10.0.0.1'],
      usage: 'server',
      validityDays: 30,
    });
    const admin = await issueCertificate(ca, { commonName: 'poolkeeper-admin', organizations: ['system:masters'], usage: 'client', validityDays: 30 });
    const kcm = await issueCertificate(ca, { commonName: 'system:kube-controller-manager', usage: 'client', validityDays: 30 });
    const serviceAccountKeys = await generateKeyPairPem();
    const caFile = file('ca.crt', ca.certPem);

    const etcdPort = await freePort();
    const etcdPeerPort = await freePort();
    const etcdUrl = `http://127.0.0.1:${etcdPort}`;
    const etcd = ManagedProcess.start({
      name: 'etcd',
      command: etcdBin,
      args: [
        '--name=poolkeeper-test', `--data-dir=${join(dir, 'etcd')}`,
        `--listen-client-urls=${etcdUrl}`, `--advertise-client-urls=${etcdUrl}`,
        `--listen-peer-urls=http://127.0.0.1:${etcdPeerPort}`, `--initial-advertise-peer-urls=http://127.0.0.1:${etcdPeerPort}`,
        `--initial-cluster=poolkeeper-test=http://127.0.0.1:${etcdPeerPort}`,
        '--unsafe-no-fsync', '--log-level=warn', '--quota-backend-bytes=2147483648',
      ],
      logFile: join(dir, 'etcd.log'),
    }, registry);
    const processes = [etcd];
    try {
      await waitUntil('etcd', async () => (await fetch(`${etcdUrl}/health`)).ok, { timeoutMs: 30_000, process: etcd });

      const apiPort = await freePort();
      const server = `https://127.0.0.1:${apiPort}`;
      const apiserver = ManagedProcess.start({
        name: 'kube-apiserver',
        command: apiserverBin,
        args: [
          `--etcd-servers=${etcdUrl}`,
          '--bind-address=127.0.0.1', '--advertise-address=127.0.0.1', `--secure-port=${apiPort}`,
          `--cert-dir=${join(dir, 'apiserver-certs')}`,
          `--tls-cert-file=${file('apiserver.crt', serving.certPem)}`, `--tls-private-key-file=${file('apiserver.key', serving.keyPem)}`,
          `--client-ca-file=${caFile}`,
          '--service-account-issuer=https://kubernetes.default.svc.cluster.local',
          `--service-account-key-file=${file('sa.pub', serviceAccountKeys.publicKeyPem)}`,
          `--service-account-signing-key-file=${file('sa.key', serviceAccountKeys.privateKeyPem)}`,
          '--service-cluster-ip-range=10.0.0.0/24',
          '--authorization-mode=Node,RBAC',
          '--allow-privileged=true',
          '--profiling=false',
          '--v=1',
        ],
        logFile: join(dir, 'kube-apiserver.log'),
      }, registry);
      processes.push(apiserver);
      const plane = new KubeControlPlane({ server, ca, admin, kubeconfigPath: '', etcdUrl, dir, processes });
      await waitUntil('kube-apiserver', async () => (await plane.get('/readyz')).status === 200, { timeoutMs: 90_000, process: apiserver, intervalMs: 250 });

      const adminKubeconfig = file('admin.kubeconfig', kubeconfigYaml('local', server, ca.certPem, 'poolkeeper-admin', admin));
      const kcmKubeconfig = file('kcm.kubeconfig', kubeconfigYaml('local', server, ca.certPem, 'system:kube-controller-manager', kcm));
      const controllerManager = ManagedProcess.start({
        name: 'kube-controller-manager',
        command: kcmBin,
        args: [
          `--kubeconfig=${kcmKubeconfig}`,
          `--authentication-kubeconfig=${kcmKubeconfig}`,
          `--authorization-kubeconfig=${kcmKubeconfig}`,
          `--service-account-private-key-file=${join(dir, 'sa.key')}`,
          `--root-ca-file=${caFile}`,
          '--use-service-account-credentials=true',
          '--leader-elect=false',
          '--bind-address=127.0.0.1',
          `--secure-port=${await freePort()}`,
          `--cert-dir=${join(dir, 'kcm-certs')}`,
          '--controllers=*',
          '--v=1',
        ],
        logFile: join(dir, 'kube-controller-manager.log'),
      }, registry);
      processes.push(controllerManager);
      const ready = new KubeControlPlane({ server, ca, admin, kubeconfigPath: adminKubeconfig, etcdUrl, dir, processes });
      // The service-account controller creating `default` proves the controllers run.
      await waitUntil('kube-controller-manager', async () => (await ready.get('/api/v1/namespaces/default/serviceaccounts/default')).status === 200, { timeoutMs: 60_000, process: controllerManager, intervalMs: 250 });
      return ready;
    } catch (err) {
      await Promise.all(processes.map((p) => p.stop(2000)));
      throw err;
    }
  }

  /** A KubeConfig for @kubernetes/client-node, as cluster-admin. */
  kubeConfig(): KubeConfig {
    const kc = new KubeConfig();
    kc.loadFromFile(this.kubeconfigPath);
    return kc;
  }

  /** A KubeConfig that authenticates with a bearer token (e.g. a ServiceAccount's). */
  kubeConfigForToken(token: string, user = 'token-user'): KubeConfig {
    const kc = new KubeConfig();
    kc.loadFromOptions({
      clusters: [{ name: 'local', server: this.server, caData: Buffer.from(this.ca.certPem).toString('base64') }],
      users: [{ name: user, token }],
      contexts: [{ name: 'local', cluster: 'local', user }],
      currentContext: 'local',
    });
    return kc;
  }

  /**
   * What a pod of ServiceAccount `namespace/name` bound to `clusterRole` would
   * find in /var/run/secrets/kubernetes.io/serviceaccount (`token`, `ca.crt`)
   * and in KUBERNETES_SERVICE_HOST/PORT: to run a binary as it runs in a
   * cluster, without a kubeconfig.
   */
  serviceAccountFiles(namespace: string, name: string, clusterRole: string): { directory: string; host: string; port: string } {
    this.kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Namespace', metadata: { name: namespace } }));
    this.kubectl(['-n', namespace, 'apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name } }));
    this.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'rbac.authorization.k8s.io/v1', kind: 'ClusterRoleBinding', metadata: { name: `${namespace}-${name}` },
      roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: clusterRole },
      subjects: [{ kind: 'ServiceAccount', namespace, name }],
    }));
    const token = this.kubectl(['-n', namespace, 'create', 'token', name, '--duration=24h']).trim();
    const directory = join(this.dir, `serviceaccount-${namespace}-${name}`);
    mkdirSync(directory, { recursive: true });
    writeFileSync(join(directory, 'token'), token, { mode: 0o600 });
    writeFileSync(join(directory, 'ca.crt'), this.ca.certPem);
    const url = new URL(this.server);
    return { directory, host: url.hostname, port: url.port };
  }

  /** The kubectl binary of the pinned release. */
  get kubectlPath(): string {
    return kubeBinary('kubectl');
  }

  /** Runs kubectl as cluster-admin and returns stdout; throws with stderr on failure. */
  kubectl(args: string[], input?: string): string {
    return runKubectl(this.kubectlPath, this.kubeconfigPath, args, input);
  }

  /**
   * kubectl without blocking the event loop: needed whenever this process
   * also serves something the API server calls (the webhook).
   */
  kubectlAsync(args: string[], input?: string): Promise<string> {
    return runKubectlAsync(this.kubectlPath, this.kubeconfigPath, args, input);
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

  /** The API server's `gitVersion` from `/version`. */
  async apiserverVersion(): Promise<string> {
    const { body } = await this.get('/version');
    return (JSON.parse(body) as { gitVersion: string }).gitVersion;
  }

  /** etcd's server version from its `/version` endpoint. */
  async etcdVersion(): Promise<string> {
    const body = (await (await fetch(`${this.etcdUrl}/version`)).json()) as { etcdserver: string };
    return body.etcdserver;
  }

  /** `vX.Y.Z` as a control-plane binary reports it with `--version`. */
  binaryVersion(name: 'kube-apiserver' | 'kube-controller-manager'): string {
    return commandOutput(kubeBinary(name), ['--version']).replace(/^Kubernetes\s+/, '');
  }

  /** kubectl's client version. */
  kubectlVersion(): string {
    return commandOutput(this.kubectlPath, ['version', '--client', '-o', 'json']).match(/"gitVersion":\s*"([^"]+)"/)?.[1] ?? 'unknown';
  }

  /** True if `/readyz` answers 200. */
  async healthy(): Promise<boolean> {
    return (await this.get('/readyz')).status === 200;
  }

  /** Log files of the control-plane processes. */
  get logDir(): string {
    return this.dir;
  }

  /** Stops the controller manager, the API server, then etcd. */
  async stop(): Promise<void> {
    for (const p of [...this.processes].reverse()) await p.stop(5000);
  }
}
