/**
 * A sidecar in a process of its own, so that its RSS is its own and it can be
 * SIGKILLed: the Sidecar class as `poolkeeper sidecar` runs it, with the
 * PoolMember agent replaced by IPC messages from the parent (grant, drain,
 * status), since fault runs without an API server have no PoolMember to
 * watch. Started by `SidecarProcess` in sidecar-process.ts with its settings
 * in the environment variable POOLKEEPER_CHILD_SIDECAR (JSON).
 */
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { join } from 'node:path';
import { BACKEND_LEDGER_FILE } from '../../src/bin/sidecar-main.ts';
import { BackendLedger } from '../../src/sidecar/backend-ledger.ts';
import { FileCredentialsSource, Sidecar, type SidecarSettings } from '../../src/sidecar/index.ts';
import { testNativeIo } from './sidecar-fixture.ts';

/** What the parent passes in POOLKEEPER_CHILD_SIDECAR. */
export interface ChildSidecarConfig {
  settings: SidecarSettings;
  credentialsDir: string;
  grant: number;
  /** The pod's state directory (the backend ledger), kept across restarts of this child. */
  stateDir?: string;
}

/** Messages from the parent. */
export type ToChild = { kind: 'grant'; connections: number; generation: number } | { kind: 'drain' } | { kind: 'status' } | { kind: 'close' };

/** Messages to the parent. */
export type FromChild =
  | { kind: 'ready'; port: number; adminPort: number | undefined }
  | { kind: 'status'; held: number; acknowledgedConnections: number; draining: boolean; drained: boolean }
  | { kind: 'drained'; at: number }
  | { kind: 'closed' };

const send = (message: FromChild): void => {
  process.send?.(message);
};

const config = JSON.parse(process.env.POOLKEEPER_CHILD_SIDECAR ?? '{}') as ChildSidecarConfig;
const logger = pino({ level: process.env.POOLKEEPER_CHILD_SIDECAR_LOG ?? 'info' });
const credentials = new FileCredentialsSource({ directory: config.credentialsDir, logger, pollIntervalMs: 500 });
const ledger = config.stateDir ? new BackendLedger(join(config.stateDir, BACKEND_LEDGER_FILE), logger) : undefined;
const nativeIo = testNativeIo();
const sidecar = new Sidecar({ settings: config.settings, credentials, logger, metrics: new Registry(), ...(ledger ? { ledger } : {}), ...(nativeIo ? { nativeIo } : {}) });
const { port, adminPort } = await sidecar.start();
sidecar.setGrant(config.grant, 1);
process.on('message', (raw) => {
  const message = raw as ToChild;
  switch (message.kind) {
    case 'grant':
      sidecar.setGrant(message.connections, message.generation);
      break;
    case 'drain':
      void sidecar.drain().then(() => send({ kind: 'drained', at: Date.now() }));
      break;
    case 'status': {
      const s = sidecar.status();
      send({ kind: 'status', held: s.heldConnections, acknowledgedConnections: s.acknowledgedConnections, draining: s.draining, drained: s.drained });
      break;
    }
    case 'close':
      void sidecar.close().then(() => {
        send({ kind: 'closed' });
        process.exit(0);
      });
      break;
  }
});
// The parent going away (even SIGKILLed) must not leave this process behind.
process.on('disconnect', () => process.exit(0));
send({ kind: 'ready', port, adminPort });
