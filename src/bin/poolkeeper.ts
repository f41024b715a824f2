#!/usr/bin/env node
/**
 * The one binary of the image: `poolkeeper controller` or `poolkeeper sidecar`.
 * The only place that reads process.env; everything else gets its
 * configuration passed in.
 */
import { hostname } from 'node:os';
import pino from 'pino';
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
      drainTimeoutSeconds: Number(env.POOLKEEPER_DRAIN_TIMEOUT ?? 30),
      version: VERSION,
    }, logger);
    onTerminate(() => running.shutdown());
    break;
  }
  default:
    console.error('usage: poolkeeper <controller|sidecar>\n\n  controller  the budget controller (and, with the webhook, injection)\n  sidecar     the pooling sidecar of one pod');
    process.exit(command === '--help' || command === '-h' ? 0 : 2);
}
