/**
 * Wiring of the sidecar binary: waits for its PoolMember, builds the pool
 * from it, runs the PoolMember agent, and drains on SIGTERM.
 */
import { join } from 'node:path';
import type { Logger } from 'pino';
import { Registry, collectDefaultMetrics } from 'prom-client';
import { API_GROUP, API_VERSION, type PoolMember } from '../api/index.ts';
import { isStatus, KubeHttp, type ApiServerAccess } from '../kube/http.ts';
import { PoolMemberAgent } from '../sidecar/control-plane.ts';
import { BackendLedger } from '../sidecar/backend-ledger.ts';
import { StateFile } from '../sidecar/state-file.ts';
import { DATABASE_CA, MountedFile } from '../sidecar/mounted-file.ts';
import { sshPrivateKeyKind } from '../sidecar/tunnel.ts';
import { loadNativeSocketIo } from '../sidecar/native-socket.ts';
import { FileCredentialsSource, Sidecar, type SidecarSettings } from '../sidecar/index.ts';

/** The ledger's file name in the state directory. */
export const BACKEND_LEDGER_FILE = 'backends.json';
/** The usernames the credentials held before (see Sidecar's formerUsers), in the state directory. */
export const FORMER_USERS_FILE = 'former-users.json';

/** Everything the sidecar binary is configured with. */
export interface SidecarConfig {
  /** The API server: a KubeConfig, or the pod's ServiceAccount (InClusterAccess). */
  apiServer: ApiServerAccess;
  namespace: string;
  podName: string;
  listenPort: number;
  /** Also listen on a Unix-domain socket in this directory (the shared volume the webhook mounts when asked). */
  listenSocketDir?: string;
  adminPort: number;
  credentialsDir: string;
  sshKeyDir?: string;
  /** PEM file of the CA that signed the database server's certificate (spec.database.caSecretRef). */
  caFile?: string;
  drainTimeoutSeconds: number;
  /** A directory that outlives the sidecar process (the pod's emptyDir): the backend ledger goes there. */
  stateDir?: string;
  /** Use the native socket I/O where it is built (default true); false: Node's streams. */
  nativeIo?: boolean;
  version: string;
  /** 'self-signed': accept TLS from apps with a certificate made at start (spec.sidecar.clientTLS: SelfSigned). */
  clientTls?: 'self-signed';
  /** How long to wait for the controller to create this pod's PoolMember. */
  memberWaitMs?: number;
}

/** A running sidecar binary. */
export interface RunningSidecar {
  sidecar: Sidecar;
  agent: PoolMemberAgent;
  port: number;
  adminPort: number | undefined;
  /** SIGTERM behaviour: drain, report drained, stop. */
  shutdown(): Promise<void>;
}

async function waitForMember(http: KubeHttp, config: SidecarConfig, logger: Logger): Promise<PoolMember> {
  const path = `/apis/${API_GROUP}/${API_VERSION}/namespaces/${config.namespace}/poolmembers/${config.podName}`;
  const deadline = Date.now() + (config.memberWaitMs ?? 120_000);
  let logged = false;
  for (;;) {
    try {
      return await http.get<PoolMember>(path);
    } catch (err) {
      if (!isStatus(err, 404) || Date.now() > deadline) throw err;
      if (!logged) logger.info({ poolMember: config.podName }, 'waiting for the controller to create this pod\'s PoolMember');
      logged = true;
      await new Promise((r) => setTimeout(r, 250));
    }
  }
}

function stringsIn(value: unknown): string[] {
  return Array.isArray(value) ? value.filter((v): v is string => typeof v === 'string') : [];
}

/** Starts the sidecar: pool, admin endpoints and the PoolMember agent. */
export async function startSidecar(config: SidecarConfig, logger: Logger): Promise<RunningSidecar> {
  const http = new KubeHttp(config.apiServer);
  const member = await waitForMember(http, config, logger);
  const spec = member.spec;
  const settings: SidecarSettings = {
    listenHost: '127.0.0.1',
    listenPort: config.listenPort,
    ...(config.listenSocketDir ? { listenSocketDir: config.listenSocketDir } : {}),
    database: {
      host: spec.database.host, port: spec.database.port, dbname: spec.database.dbname, sslMode: spec.database.sslMode,
      ...(spec.database.channelBinding !== undefined ? { channelBinding: spec.database.channelBinding } : {}),
    },
    pool: { ...spec.pool },
    drainTimeout: config.drainTimeoutSeconds,
    admin: { host: '0.0.0.0', port: config.adminPort },
  };
  let sshPrivateKey: MountedFile | undefined;
  if (spec.sshTunnel) {
    if (!config.sshKeyDir) throw new Error('the PoolMember names an SSH tunnel but no SSH key directory is mounted (POOLKEEPER_SSH_KEY_DIR)');
    // Read again when the Secret behind it changes: a rotated key is used from the next SSH connection on.
    sshPrivateKey = new MountedFile({ path: join(config.sshKeyDir, 'ssh-privatekey'), kind: await sshPrivateKeyKind(), logger });
    settings.sshTunnel = { ...spec.sshTunnel, privateKey: sshPrivateKey.current() };
  }
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'poolkeeper_sidecar_process_' });
  const credentials = new FileCredentialsSource({ directory: config.credentialsDir, logger });
  const ledger = config.stateDir ? new BackendLedger(join(config.stateDir, BACKEND_LEDGER_FILE), logger) : undefined;
  const usersFile = config.stateDir ? new StateFile({ path: join(config.stateDir, FORMER_USERS_FILE), what: 'former usernames', logger }) : undefined;
  const formerUsers = usersFile ? { load: (): string[] => stringsIn(usersFile.read()), save: (users: readonly string[]): void => usersFile.write(users) } : undefined;
  const native = config.nativeIo === false ? undefined : loadNativeSocketIo();
  if (native !== undefined && 'reason' in native) logger.warn({ reason: native.reason }, 'native socket I/O unavailable: using Node.js streams');
  const nativeIo = native !== undefined && 'io' in native ? native.io : undefined;
  // The sidecar's event loop is its own and nothing reads its utilization: one poll(2) fewer per wake-up.
  const quietLoop = nativeIo?.quietLoop() ?? false;
  logger.info({ nativeIo: nativeIo !== undefined, quietLoop, clientTls: config.clientTls ?? 'disabled' }, 'socket I/O');
  const clientTls = config.clientTls === 'self-signed' ? await (await import('../sidecar/client-tls.ts')).selfSignedClientTls() : undefined;
  // Checked again at each server login: a rotated CA Secret reaches new connections without a restart.
  const databaseCa = config.caFile ? new MountedFile({ path: config.caFile, kind: DATABASE_CA, logger }) : undefined;
  const sidecar = new Sidecar({
    settings, credentials, logger, metrics: registry,
    ...(ledger ? { ledger } : {}), ...(nativeIo ? { nativeIo } : {}), ...(clientTls ? { clientTls } : {}), ...(databaseCa ? { databaseCa } : {}), ...(sshPrivateKey ? { sshPrivateKey } : {}),
    ...(formerUsers ? { formerUsers } : {}),
  });
  const { port, adminPort } = await sidecar.start();
  const bastion = (t: PoolMember['spec']['sshTunnel']): string => (t ? `${t.user}@${t.host}:${t.port}` : 'none');
  // Said once per change, not on every grant that comes with the same spec.
  let tunnelWarned = bastion(spec.sshTunnel);
  const agent = new PoolMemberAgent({
    http, namespace: config.namespace, podName: config.podName, target: sidecar, logger, version: config.version,
    drainGraceMs: config.drainTimeoutSeconds * 1000,
    waitingClients: () => sidecar.waitingClients,
    onSpec: (next) => {
      sidecar.updatePoolSettings({ ...next.pool });
      if (next.sshTunnel) sidecar.updateTunnelHostKey(next.sshTunnel.hostKey);
      // Only the host key applies live: the bastion's address and user (or a tunnel added or removed) are those of the start.
      if (bastion(next.sshTunnel) !== tunnelWarned) {
        tunnelWarned = bastion(next.sshTunnel);
        logger.warn({ sshTunnel: tunnelWarned, inUse: bastion(spec.sshTunnel) }, 'the SSH tunnel changed: it applies when the pod restarts');
      }
      const db = next.database;
      if (db.host !== spec.database.host || db.port !== spec.database.port || db.dbname !== spec.database.dbname || db.sslMode !== spec.database.sslMode || db.channelBinding !== spec.database.channelBinding) {
        logger.warn({ database: db }, 'the database target changed: it applies when the pod restarts');
      }
    },
  });
  await agent.start();
  logger.info({ port, adminPort, connection: spec.connection }, 'sidecar ready');
  return {
    sidecar,
    agent,
    port,
    adminPort,
    async shutdown(): Promise<void> {
      logger.info('draining');
      await sidecar.drain();
      if (!(await agent.flush())) logger.warn('could not write the drained status: the controller holds this pod\'s connections for the departure hold');
      await agent.stop();
      await sidecar.close();
      logger.info('drained; exiting');
    },
  };
}
