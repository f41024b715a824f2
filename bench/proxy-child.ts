/**
 * One proxy under test in a process of its own, so that the bench can read
 * its CPU time and RSS from /proc: the sidecar (`sidecar`) or a plain Node.js
 * byte pipe to PostgreSQL (`pipe`: no parsing, no pooling, one upstream
 * connection per client), the floor of what any proxy in this runtime costs.
 *
 *   node bench/proxy-child.ts '<json ProxyChildConfig>'
 *
 * Prints one JSON line `{"port": N}` on stdout once listening; exits when its
 * IPC channel or stdin closes (the bench went away).
 */
import { connect, createServer, type Socket } from 'node:net';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { credentialsGeneration } from '../src/core/credentials.ts';
import { Sidecar, StaticCredentialsSource } from '../src/sidecar/index.ts';
import { loadNativeSocketIo } from '../src/sidecar/native-socket.ts';
import type { PoolMode } from '../src/sidecar/settings.ts';

/** What the bench asks the child to run. */
export interface ProxyChildConfig {
  kind: 'sidecar' | 'pipe';
  /** PostgreSQL to forward to. */
  host: string;
  port: number;
  user: string;
  password: string;
  dbname: string;
  /** Sidecar only. */
  mode?: PoolMode;
  /** Sidecar only: the grant (server connections). */
  grant?: number;
  /** Sidecar only: also listen on a Unix-domain socket in this directory (when the sidecar supports it). */
  socketDir?: string;
  /** Sidecar only: false for Node's streams instead of the native socket I/O (default: native where built). */
  nativeIo?: boolean;
}

function pipe(config: ProxyChildConfig): Promise<number> {
  const server = createServer({ noDelay: true }, (client: Socket) => {
    const upstream = connect({ host: config.host, port: config.port, noDelay: true });
    client.pipe(upstream);
    upstream.pipe(client);
    const close = (): void => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', close).on('close', close);
    upstream.on('error', close).on('close', close);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve((server.address() as { port: number }).port)));
}

async function sidecar(config: ProxyChildConfig): Promise<number> {
  const credentials = new StaticCredentialsSource({ username: config.user, password: config.password, generation: credentialsGeneration({ username: config.user, password: config.password }) });
  const settings = {
    listenHost: '127.0.0.1', listenPort: 0,
    ...(config.socketDir === undefined ? {} : { listenSocketDir: config.socketDir }),
    database: { host: config.host, port: config.port, dbname: config.dbname, sslMode: 'disable' as const },
    pool: { mode: config.mode ?? 'transaction', poolTimeout: 30, poolRecycle: 3600, poolPrePing: true, idleTimeout: 600 },
    drainTimeout: 5,
  };
  const native = config.nativeIo === false ? undefined : loadNativeSocketIo();
  if (native !== undefined && 'reason' in native) process.stderr.write(`proxy-child: ${native.reason}\n`);
  const nativeIo = native !== undefined && 'io' in native ? native.io : undefined;
  // As the sidecar's entry point does.
  nativeIo?.quietLoop();
  const instance = new Sidecar({ settings, credentials, logger: pino({ level: 'warn' }), metrics: new Registry(), ...(nativeIo ? { nativeIo } : {}) });
  const { port } = await instance.start();
  instance.setGrant(config.grant ?? 20, 1);
  return port;
}

const config = JSON.parse(process.argv[2] ?? '{}') as ProxyChildConfig;
const port = config.kind === 'pipe' ? await pipe(config) : await sidecar(config);
process.stdout.write(`${JSON.stringify({ port })}\n`);
process.on('disconnect', () => process.exit(0));
process.stdin.on('end', () => process.exit(0)).on('error', () => process.exit(0)).resume();
