/**
 * Sidecars in front of a PostgreSQL server for running a driver's own test
 * suite through them (docs/compatibility.md): one in transaction mode and one
 * in session mode, on fixed ports, kept running until SIGINT or SIGTERM.
 *
 *   npx node test/support/suite-sidecars.ts --pg-port 47432 --user u --password p --db d \
 *     --transaction-port 47440 --session-port 47441 [--pg-host 127.0.0.1] [--grant 20]
 *     [--socket-dir DIR] [--client-tls]
 *
 * With --socket-dir each also listens on a Unix socket in DIR/transaction and
 * DIR/session; with --client-tls each accepts TLS from clients with a
 * self-signed certificate (spec.sidecar.clientTLS: SelfSigned).
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { selfSignedClientTls } from '../../src/sidecar/client-tls.ts';
import { FileCredentialsSource, Sidecar, type PoolMode } from '../../src/sidecar/index.ts';
import { nativeIoDeps } from './sidecar-fixture.ts';

const { values } = parseArgs({
  options: {
    'pg-host': { type: 'string', default: '127.0.0.1' },
    'pg-port': { type: 'string' },
    user: { type: 'string' },
    password: { type: 'string', default: '' },
    db: { type: 'string' },
    grant: { type: 'string', default: '20' },
    'transaction-port': { type: 'string' },
    'session-port': { type: 'string' },
    'socket-dir': { type: 'string' },
    'client-tls': { type: 'boolean', default: false },
  },
});
const required = (name: 'pg-port' | 'user' | 'db' | 'transaction-port' | 'session-port'): string => {
  const value = values[name];
  if (value === undefined) throw new Error(`--${name} is required`);
  return value;
};

const logger = pino({ level: process.env.SIDECAR_LOG ?? 'warn' });
const credentialsDir = mkdtempSync(join(tmpdir(), 'poolkeeper-suite-creds-'));
writeFileSync(join(credentialsDir, 'username'), required('user'));
writeFileSync(join(credentialsDir, 'password'), values.password);
const clientTls = values['client-tls'] ? await selfSignedClientTls() : undefined;

const start = async (mode: PoolMode, port: number): Promise<Sidecar> => {
  const socketDir = values['socket-dir'] === undefined ? undefined : join(values['socket-dir'], mode);
  if (socketDir !== undefined) mkdirSync(socketDir, { recursive: true });
  const sidecar = new Sidecar({
    settings: {
      listenHost: '127.0.0.1', listenPort: port,
      ...(socketDir === undefined ? {} : { listenSocketDir: socketDir }),
      database: { host: values['pg-host'], port: Number(required('pg-port')), dbname: required('db'), sslMode: 'disable' },
      drainTimeout: 5,
      pool: { mode, poolTimeout: 30, poolRecycle: 1800, poolPrePing: false, idleTimeout: 600 },
    },
    credentials: new FileCredentialsSource({ directory: credentialsDir, logger, pollIntervalMs: 500 }),
    logger, metrics: new Registry(), ...nativeIoDeps(), ...(clientTls ? { clientTls } : {}),
  });
  await sidecar.start();
  sidecar.setGrant(Number(values.grant), 1);
  console.log(`${mode}: 127.0.0.1:${port}${socketDir === undefined ? '' : ` and ${socketDir}`}${clientTls ? ', client TLS' : ''}`);
  return sidecar;
};

const sidecars = [await start('transaction', Number(required('transaction-port'))), await start('session', Number(required('session-port')))];
const stop = async (): Promise<void> => {
  await Promise.all(sidecars.map((s) => s.close()));
  rmSync(credentialsDir, { recursive: true, force: true });
  process.exit(0);
};
process.on('SIGINT', () => void stop());
process.on('SIGTERM', () => void stop());
