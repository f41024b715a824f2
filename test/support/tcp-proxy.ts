/**
 * A loopback TCP proxy that tests can freeze (stop moving bytes without
 * closing anything) or cut, to produce real stalls and disconnections.
 */
import { createConnection, createServer, type Server, type Socket } from 'node:net';

/**
 * Joins two sockets both ways, each closing the other, and keeps them in
 * `sockets` while open (so that a test can cut them all).
 */
export function pipeBoth(client: Socket, upstream: Socket, sockets: Set<Socket>): void {
  for (const s of [client, upstream]) {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => s.destroy());
  }
  client.pipe(upstream);
  upstream.pipe(client);
  client.on('close', () => upstream.destroy());
  upstream.on('close', () => client.destroy());
}

/** A proxy from 127.0.0.1:<port> to a target. */
export class TcpProxy {
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  private frozen = false;
  /** Bytes held back (see hold), in the order they came; undefined while bytes move. */
  private heldBack: { to: Socket; chunk: Buffer }[] | undefined;
  private readonly targetHost: string;
  private readonly targetPort: number;
  port = 0;

  constructor(targetHost: string, targetPort: number) {
    this.targetHost = targetHost;
    this.targetPort = targetPort;
  }

  /** Starts listening on a free port. */
  async start(): Promise<number> {
    this.server = createServer((client) => {
      const upstream = createConnection({ host: this.targetHost, port: this.targetPort });
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on('close', () => this.sockets.delete(s));
        s.on('error', () => s.destroy());
      }
      const pump = (from: Socket, to: Socket): void => {
        from.on('data', (chunk: Buffer) => {
          if (this.frozen) return;
          if (this.heldBack !== undefined) this.heldBack.push({ to, chunk });
          else to.write(chunk);
        });
        from.on('close', () => to.destroy());
      };
      pump(client, upstream);
      pump(upstream, client);
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    const address = this.server.address();
    this.port = typeof address === 'object' && address ? address.port : 0;
    return this.port;
  }

  /** Drops every byte from now on, in both directions, keeping connections open. */
  freeze(): void {
    this.frozen = true;
  }

  /** Moves bytes again (for new data). */
  thaw(): void {
    this.frozen = false;
  }

  /** Holds every byte from now on, in both directions, until `deliver`: a slow network, nothing lost. */
  hold(): void {
    this.heldBack ??= [];
  }

  /** Delivers what `hold` held back, in order, and moves bytes again. */
  deliver(): void {
    const held = this.heldBack ?? [];
    this.heldBack = undefined;
    for (const { to, chunk } of held) if (!to.destroyed) to.write(chunk);
  }

  /** Destroys every open connection. */
  cutAll(): void {
    for (const s of this.sockets) s.destroy();
  }

  /** Stops the proxy. */
  async stop(): Promise<void> {
    this.cutAll();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}
