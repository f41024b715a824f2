/**
 * One proxy under test in a process of its own, so that the bench can read
 * its CPU time and RSS from /proc: the sidecar (`sidecar`) or a plain Node.js
 * byte pipe to PostgreSQL (`pipe`: no parsing, no pooling, one upstream
 * connection per client), the floor of what any proxy in this runtime costs,
 * or the same pipe on the sidecar's native socket I/O (`native-pipe`: one
 * JavaScript call per read, as the sidecar makes, and nothing else), the
 * floor of the sidecar's own design, or a relay in C on Node's event loop
 * (`c-relay`: no JavaScript per read at all), the floor of any proxy hosted
 * in Node.js.
 *
 *   node bench/proxy-child.ts '<json ProxyChildConfig>'
 *
 * Prints one JSON line `{"port": N}` on stdout once listening; exits when its
 * IPC channel or stdin closes (the bench went away).
 */
import { Socket, connect, createServer } from 'node:net';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { credentialsGeneration } from '../src/core/credentials.ts';
import { Sidecar, StaticCredentialsSource } from '../src/sidecar/index.ts';
import { ReadBufferPool } from '../src/sidecar/direct-read-socket.ts';
import { adoptUnreadSocket, loadNativeSocketIo, writeRange, type NativeSocket, type NativeSocketIo } from '../src/sidecar/native-socket.ts';
import type { PoolMode } from '../src/sidecar/settings.ts';

/** What the bench asks the child to run. */
export interface ProxyChildConfig {
  kind: 'sidecar' | 'pipe' | 'native-pipe' | 'c-relay';
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

/**
 * The pipe on NativeSocket: what the sidecar's I/O costs without its parsing
 * and pooling; `inC`: the native side relays the bytes, JavaScript sees only the ends.
 */
function nativePipe(config: ProxyChildConfig, io: NativeSocketIo, inC: boolean): Promise<number> {
  const relay = (from: NativeSocket, to: NativeSocket): void => {
    if (inC) {
      from.relayTo(to);
      return;
    }
    from.setDirectReader((buffer, length) => {
      writeRange(to, buffer, 0, length);
      // What the kernel did not take may point into the lent read buffer: read no more until it is written.
      if (to.writableLength > 0) {
        from.pause();
        to.write(Buffer.alloc(0), () => from.resume());
      }
    });
  };
  const buffers = new ReadBufferPool();
  const server = createServer({ noDelay: true, pauseOnConnect: true }, (accepted: Socket) => {
    const client = adoptUnreadSocket(io, accepted, { buffers });
    if (client === undefined) throw new Error('native-pipe: the accepted socket could not be adopted');
    // Nothing is read from the client before its bytes have somewhere to go.
    client.pause();
    const socket = new Socket().pause().setNoDelay(true);
    socket.connect({ host: config.host, port: config.port });
    socket.once('connect', () => {
      const upstream = adoptUnreadSocket(io, socket, { buffers });
      if (upstream === undefined) throw new Error('native-pipe: the upstream socket could not be adopted');
      const close = (): void => {
        client.destroy();
        upstream.destroy();
      };
      client.setNoDelay(true);
      relay(client, upstream);
      relay(upstream, client);
      client.resume();
      client.on('error', close).on('close', close);
      upstream.on('error', close).on('close', close);
    });
    socket.once('error', () => client.destroy());
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
function loadedNativeIo(): NativeSocketIo {
  const native = loadNativeSocketIo();
  if ('reason' in native) throw new Error(`proxy-child: ${native.reason}`);
  native.io.quietLoop();
  return native.io;
}

const port = config.kind === 'pipe' ? await pipe(config) : config.kind === 'native-pipe' || config.kind === 'c-relay' ? await nativePipe(config, loadedNativeIo(), config.kind === 'c-relay') : await sidecar(config);
process.stdout.write(`${JSON.stringify({ port })}\n`);
process.on('disconnect', () => process.exit(0));
process.stdin.on('end', () => process.exit(0)).on('error', () => process.exit(0)).resume();
