/**
 * A byte-for-byte stream forwarder between TCP and Unix sockets, run as its
 * own process on either side of the real node's network namespace: a Unix
 * socket path is reachable from every network namespace, so one forwarder
 * inside and one outside join a port on the namespace's bridge to a port on
 * the host's loopback without giving the namespace an uplink.
 *
 * Usage: node real-node-forward.ts LISTEN=CONNECT ...
 * where each side is `tcp:HOST:PORT` or `unix:PATH`.
 */
import { createServer, connect, type Socket } from 'node:net';
import { rmSync } from 'node:fs';

/** One side of a forward. */
export type Endpoint = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

/** Parses `tcp:HOST:PORT` or `unix:PATH`. */
export function parseEndpoint(text: string): Endpoint {
  if (text.startsWith('unix:')) return { kind: 'unix', path: text.slice(5) };
  const m = text.match(/^tcp:(.+):(\d+)$/);
  if (!m?.[1] || !m[2]) throw new Error(`not an endpoint: ${text} (tcp:HOST:PORT or unix:PATH)`);
  return { kind: 'tcp', host: m[1], port: Number(m[2]) };
}

/** Formats an endpoint for the command line. */
export function formatEndpoint(e: Endpoint): string {
  return e.kind === 'unix' ? `unix:${e.path}` : `tcp:${e.host}:${e.port}`;
}

function open(e: Endpoint): Socket {
  return e.kind === 'unix' ? connect({ path: e.path }) : connect({ host: e.host, port: e.port });
}

function forward(listen: Endpoint, target: Endpoint): Promise<void> {
  const server = createServer((client) => {
    client.setNoDelay?.(true);
    const upstream = open(target);
    if (target.kind === 'tcp') upstream.setNoDelay(true);
    const closeBoth = (): void => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', closeBoth);
    upstream.on('error', closeBoth);
    // Half-closes pass through, so a client's Terminate-then-FIN reaches the server as sent.
    client.pipe(upstream);
    upstream.pipe(client);
    client.on('close', () => upstream.end());
    upstream.on('close', () => client.end());
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    if (listen.kind === 'unix') {
      rmSync(listen.path, { force: true });
      server.listen(listen.path, () => resolve());
    } else {
      server.listen(listen.port, listen.host, () => resolve());
    }
  });
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const pairs = process.argv.slice(2).map((arg) => {
    const [l, c] = arg.split('=');
    if (!l || !c) throw new Error(`usage: real-node-forward.ts LISTEN=CONNECT ... (got ${arg})`);
    return [parseEndpoint(l), parseEndpoint(c)] as const;
  });
  await Promise.all(pairs.map(([l, c]) => forward(l, c)));
  console.log(`forwarding ${process.argv.slice(2).join(' ')}`);
  process.on('SIGTERM', () => process.exit(0));
}
