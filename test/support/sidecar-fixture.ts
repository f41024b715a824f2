/**
 * A Sidecar started in-process against a PostgreSQL of the local environment,
 * with its credentials in a temp directory, as the integration tests and the
 * driver tests run it.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino, type Logger } from 'pino';
import { Registry } from 'prom-client';
import { FileCredentialsSource, Sidecar, type PoolMode, type SidecarSettings } from '../../src/sidecar/index.ts';
import type { PostgresRole, PostgresServer } from '../../src/devenv/postgres.ts';
import { loadNativeSocketIo, type NativeSocketIo } from '../../src/sidecar/native-socket.ts';
import type { ClientTls } from '../../src/sidecar/client-tls.ts';

/** What a test may choose for a sidecar; everything else has test defaults. */
export interface TestSidecarOptions {
  mode?: PoolMode;
  grant?: number;
  role?: PostgresRole;
  pool?: Partial<SidecarSettings['pool']>;
  /** Extra settings (TLS mode, limits, admin server, tunnel). */
  settings?: Partial<Omit<SidecarSettings, 'pool'>>;
  logger?: Logger;
  /** Native socket I/O (default: on, unless POOLKEEPER_TEST_NATIVE_IO=off); false: Node's streams. */
  nativeIo?: boolean;
  /** Accept TLS from clients (spec.sidecar.clientTLS). */
  clientTls?: ClientTls;
}

/**
 * The native socket I/O the tests run the sidecar with: on unless
 * POOLKEEPER_TEST_NATIVE_IO=off. Wanted but not built is an error, so that a
 * missing build cannot quietly test the other path only.
 */
export function testNativeIo(wanted: boolean = process.env.POOLKEEPER_TEST_NATIVE_IO !== 'off'): NativeSocketIo | undefined {
  if (!wanted) return undefined;
  const loaded = loadNativeSocketIo();
  if ('reason' in loaded) throw new Error(`${loaded.reason} (or set POOLKEEPER_TEST_NATIVE_IO=off)`);
  return loaded.io;
}

/** testNativeIo() as Sidecar dependencies: `{ nativeIo }`, or nothing for Node's streams. */
export function nativeIoDeps(wanted?: boolean): { nativeIo?: NativeSocketIo } {
  const nativeIo = testNativeIo(wanted);
  return nativeIo ? { nativeIo } : {};
}

/** A started sidecar and how to reach and stop it. */
export interface TestSidecar {
  sidecar: Sidecar;
  port: number;
  adminPort: number | undefined;
  registry: Registry;
  credentialsDir: string;
  /** The role the sidecar logs in upstream with (its clients need no password on loopback). */
  role: PostgresRole;
  stop(): Promise<void>;
}

/** Starts a sidecar in front of `postgres` with a grant already given. */
export async function startTestSidecar(postgres: PostgresServer, options: TestSidecarOptions = {}): Promise<TestSidecar> {
  const role = options.role ?? postgres.app;
  const logger = options.logger ?? pino({ level: process.env.SIDECAR_TEST_LOG ?? 'silent' });
  const credentialsDir = mkdtempSync(join(tmpdir(), 'poolkeeper-creds-'));
  writeFileSync(join(credentialsDir, 'username'), role.user);
  writeFileSync(join(credentialsDir, 'password'), role.password);
  const credentials = new FileCredentialsSource({ directory: credentialsDir, logger, pollIntervalMs: 200 });
  const registry = new Registry();
  const settings: SidecarSettings = {
    listenHost: '127.0.0.1', listenPort: 0,
    database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable' },
    drainTimeout: 5,
    ...options.settings,
    pool: { mode: options.mode ?? 'transaction', poolTimeout: 10, poolRecycle: 1800, poolPrePing: false, idleTimeout: 600, ...options.pool },
  };
  const sidecar = new Sidecar({ settings, credentials, logger, metrics: registry, ...nativeIoDeps(options.nativeIo), ...(options.clientTls ? { clientTls: options.clientTls } : {}) });
  const { port, adminPort } = await sidecar.start();
  sidecar.setGrant(options.grant ?? 5, 1);
  return {
    sidecar, port, adminPort, registry, credentialsDir, role,
    stop: async () => {
      await sidecar.close();
      rmSync(credentialsDir, { recursive: true, force: true });
    },
  };
}
