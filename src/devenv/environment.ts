/**
 * The local environment as one object: each component starts on first use,
 * in one temp directory, and everything stops on `stop()`, on process exit,
 * and on SIGINT/SIGTERM. Shared by the tests and by the demo.
 */
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KubeControlPlane } from './kube.ts';
import { NetworkNamespace } from './network-namespace.ts';
import { PgBouncerServer } from './pgbouncer.ts';
import { DEFAULT_POSTGRES_OPTIONS, PostgresServer, type PostgresOptions } from './postgres.ts';
import { PidRegistry, RUN_DIR_PREFIX, reapAbandonedRuns } from './process.ts';
import { RealNode } from './real-node.ts';
import { SshServer } from './sshd.ts';

/** Options of a local environment. */
export interface LocalEnvironmentOptions {
  postgres?: PostgresOptions;
  /** Keep the run directory (logs) after stopping. */
  keepRunDir?: boolean;
}

/** Lazily started, jointly stopped local components. */
export class LocalEnvironment {
  readonly runDir: string;
  private readonly registry: PidRegistry;
  private readonly started = new Map<string, Promise<{ stop(): Promise<void> }>>();
  private readonly onExit = (): void => this.registry.killAllSync();
  private readonly onSignal = (signal: NodeJS.Signals): void => {
    this.registry.killAllSync();
    this.removeRunDir();
    process.exit(signal === 'SIGINT' ? 130 : 143);
  };
  private stopped = false;
  private readonly options: LocalEnvironmentOptions;

  constructor(options: LocalEnvironmentOptions = {}) {
    this.options = options;
    reapAbandonedRuns();
    this.runDir = mkdtempSync(join(tmpdir(), RUN_DIR_PREFIX));
    // Servers that run as an unprivileged user need to traverse the run dir.
    chmodSync(this.runDir, 0o755);
    this.registry = new PidRegistry(this.runDir);
    process.on('exit', this.onExit);
    process.once('SIGINT', this.onSignal);
    process.once('SIGTERM', this.onSignal);
  }

  private once<T extends { stop(): Promise<void> }>(name: string, start: () => Promise<T>): Promise<T> {
    if (this.stopped) return Promise.reject(new Error('environment already stopped'));
    let started = this.started.get(name) as Promise<T> | undefined;
    if (!started) {
      started = start();
      this.started.set(name, started);
    }
    return started;
  }

  /** PostgreSQL with the configured max_connections. */
  postgres(): Promise<PostgresServer> {
    return this.once('postgres', () => PostgresServer.start(this.runDir, this.registry, this.options.postgres ?? DEFAULT_POSTGRES_OPTIONS));
  }

  /** A PostgreSQL cluster of its own for tests that reconfigure and restart it (max_connections), so the others keep theirs. */
  postgresScratch(): Promise<PostgresServer> {
    const options = { ...(this.options.postgres ?? DEFAULT_POSTGRES_OPTIONS), directoryName: 'postgres-scratch' };
    return this.once('postgres-scratch', () => PostgresServer.start(this.runDir, this.registry, options));
  }

  /** A second PostgreSQL cluster with SSL on (CA in `caPem`); separate so that `postgres()` stays plaintext. */
  postgresTls(): Promise<PostgresServer> {
    const options = { ...(this.options.postgres ?? DEFAULT_POSTGRES_OPTIONS), tls: {}, directoryName: 'postgres-tls' };
    return this.once('postgres-tls', () => PostgresServer.start(this.runDir, this.registry, options));
  }

  /**
   * A third PostgreSQL cluster, alone in a network namespace of its own and
   * reached over TCP at `postgres.tcpHost` (its `host` is its Unix socket),
   * so that `namespace.blackHole()` can make it stop answering as a lost
   * host does. Check `NetworkNamespace.unavailable()` first: it needs root.
   */
  postgresInNamespace(): Promise<{ postgres: PostgresServer; namespace: NetworkNamespace }> {
    return this.once('postgres-netns', async () => {
      const namespace = NetworkNamespace.create();
      try {
        const postgres = await PostgresServer.start(this.runDir, this.registry, { ...(this.options.postgres ?? DEFAULT_POSTGRES_OPTIONS), directoryName: 'postgres-netns', networkNamespace: namespace });
        return {
          postgres, namespace,
          stop: async () => {
            namespace.restore();
            await postgres.stop();
            namespace.delete();
          },
        };
      } catch (err) {
        namespace.delete();
        throw err;
      }
    });
  }

  /** OpenSSH server on loopback. */
  sshd(): Promise<SshServer> {
    return this.once('sshd', () => SshServer.start(this.runDir, this.registry));
  }

  /**
   * PgBouncer in front of `postgres()`, in transaction mode (the comparison
   * pooler) or session mode; started again if it has exited: PgBouncer 1.18
   * ends itself (FATAL "bad client state" in disconnect_client) when a client
   * closes its cancel connection before the cancel is sent on, as pgx does
   * past its deadline, and a later test must not inherit that.
   */
  async pgbouncer(mode: 'transaction' | 'session' = 'transaction'): Promise<PgBouncerServer> {
    const name = mode === 'transaction' ? 'pgbouncer' : 'pgbouncer-session';
    const current = this.started.get(name) as Promise<PgBouncerServer> | undefined;
    if (current !== undefined && !(await current).running) this.started.delete(name);
    return this.once(name, async () => PgBouncerServer.start(this.runDir, this.registry, await this.postgres(), { poolMode: mode, defaultPoolSize: 20 }));
  }

  /** etcd + kube-apiserver + kube-controller-manager. */
  kube(): Promise<KubeControlPlane> {
    return this.once('kube', () => KubeControlPlane.start(this.runDir, this.registry));
  }

  /**
   * A real node (kubelet, containerd, its own control plane) in namespaces of
   * its own, with `postgres()` reachable from pods; see real-node.ts.
   * Check `realNodeSupport()` first: it needs root and namespaces.
   */
  realNode(): Promise<RealNode> {
    return this.once('real-node', async () => RealNode.start(this.runDir, this.registry, { postgresPort: (await this.postgres()).port }));
  }

  /** Stops every started component (dependents first) and removes the run dir. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    const order = ['real-node', 'pgbouncer', 'pgbouncer-session', 'kube', 'sshd', 'postgres', 'postgres-tls', 'postgres-scratch', 'postgres-netns'];
    for (const name of order) {
      const started = this.started.get(name);
      if (!started) continue;
      try {
        await (await started).stop();
      } catch {
        // a component that failed to start has nothing to stop
      }
    }
    this.registry.killAllSync();
    process.off('exit', this.onExit);
    process.off('SIGINT', this.onSignal);
    process.off('SIGTERM', this.onSignal);
    this.removeRunDir();
  }

  private removeRunDir(): void {
    if (!this.options.keepRunDir) rmSync(this.runDir, { recursive: true, force: true });
  }
}
