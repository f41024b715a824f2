#!/usr/bin/env node
/**
 * The one binary of the image: `poolkeeper controller`, `poolkeeper webhook`
 * or `poolkeeper sidecar`.
 * The only place that reads process.env; everything else gets its
 * configuration passed in.
 */
import { hostname } from 'node:os';
import pino from 'pino';
import { Registry, collectDefaultMetrics } from 'prom-client';
import { AdminServer } from '../ops/admin-server.ts';
import { startWebhook, webhookConfigFromEnv } from '../webhook/runtime.ts';
import { loadKubeConfig } from './kubeconfig.ts';
import { startController } from './controller-main.ts';
import { startSidecar } from './sidecar-main.ts';

const VERSION = '0.1.0';
const env = process.env;
const logger = pino({ level: env.POOLKEEPER_LOG_LEVEL ?? 'info', base: { component: process.argv[2] ?? 'poolkeeper' }, redact: ['password', '*.password', 'privateKey', '*.privateKey'] });

function required(name: string): string {
  const value = env[name];
  if (!value) {
    logger.fatal(`environment variable ${name} is required`);
    process.exit(2);
  }
  return value;
}

function repairMode(value: string): 'evict' | 'report' | 'off' {
  if (value === 'evict' || value === 'report' || value === 'off') return value;
  logger.fatal(`POOLKEEPER_REPAIR must be evict, report or off, got ${value}`);
  process.exit(2);
}

function onTerminate(shutdown: () => Promise<void>): void {
  let terminating = false;
  const handler = (signal: string): void => {
    if (terminating) return;
    terminating = true;
    logger.info({ signal }, 'terminating');
    shutdown().then(() => process.exit(0), (err: unknown) => {
      logger.error({ err }, 'shutdown failed');
      process.exit(1);
    });
  };
  process.on('SIGTERM', handler);
  process.on('SIGINT', handler);
}

const command = process.argv[2];
switch (command) {
  case 'controller': {
    const running = await startController({
      kubeConfig: loadKubeConfig(env.KUBECONFIG),
      namespace: env.POD_NAMESPACE ?? 'poolkeeper-system',
      identity: env.POD_NAME ?? hostname(),
      metricsPort: Number(env.POOLKEEPER_METRICS_PORT ?? 8080),
      leaderElection: env.POOLKEEPER_LEADER_ELECTION !== 'false',
      repair: repairMode(env.POOLKEEPER_REPAIR ?? 'evict'),
      manageSidecarAccess: env.POOLKEEPER_MANAGE_SIDECAR_RBAC !== 'false',
    }, logger);
    onTerminate(() => running.shutdown());
    break;
  }
  case 'sidecar': {
    const running = await startSidecar({
      kubeConfig: loadKubeConfig(env.KUBECONFIG),
      namespace: required('POOLKEEPER_POD_NAMESPACE'),
      podName: required('POOLKEEPER_POD_NAME'),
      listenPort: Number(env.POOLKEEPER_LISTEN_PORT ?? 6432),
      adminPort: Number(env.POOLKEEPER_ADMIN_PORT ?? 9187),
      credentialsDir: env.POOLKEEPER_CREDENTIALS_DIR ?? '/var/run/poolkeeper/credentials',
      sshKeyDir: env.POOLKEEPER_SSH_KEY_DIR,
      caFile: env.POOLKEEPER_DB_CA_FILE,
      drainTimeoutSeconds: Number(env.POOLKEEPER_DRAIN_TIMEOUT ?? 30),
      version: VERSION,
    }, logger);
    onTerminate(() => running.shutdown());
    break;
  }
  case 'webhook': {
    const registry = new Registry();
    collectDefaultMetrics({ register: registry, prefix: 'poolkeeper_webhook_process_' });
    const running = await startWebhook(loadKubeConfig(env.KUBECONFIG), webhookConfigFromEnv(env, VERSION), logger, registry);
    let stopping = false;
    const admin = new AdminServer({ registry, healthy: () => !stopping, readiness: () => ({ ready: !stopping, reasons: [] }) });
    await admin.listen('0.0.0.0', Number(env.POOLKEEPER_METRICS_PORT ?? 8081));
    onTerminate(async () => {
      stopping = true;
      await running.stop();
      await admin.close();
    });
    break;
  }
  default:
    console.error('usage: poolkeeper <controller|webhook|sidecar>\n\n  controller  the budget controller (leader-elected) and missing-sidecar repair\n  webhook     the sidecar injection webhook (every replica serves)\n  sidecar     the pooling sidecar of one pod');
    process.exit(command === '--help' || command === '-h' ? 0 : 2);
}
