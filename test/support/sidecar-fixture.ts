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

/** What a test may choose for a sidecar; everything else has test defaults. */
export interface TestSidecarOptions {
  mode?: PoolMode;
  grant?: number;
  role?: PostgresRole;
  pool?: Partial<SidecarSettings['pool']>;
  /** Extra settings (TLS mode, limits, admin server, tunnel). */
  settings?: Partial<Omit<SidecarSettings, 'pool'>>;
  logger?: Logger;
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
  const sidecar = new Sidecar({ settings, credentials, logger, metrics: registry });
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
