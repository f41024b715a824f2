/**
 * A TLS interception in front of a PostgreSQL server, on loopback: it answers
 * a client's SSLRequest itself, ends the client's TLS with a certificate of
 * its own, opens TLS of its own to the server and relays the plaintext both
 * ways, recording what the client sent. A client that does not verify the
 * server's certificate (sslmode=require) cannot tell it from the server;
 * SCRAM channel binding can, since each side binds a different certificate.
 */
import { createServer, connect as netConnect, type Server, type Socket } from 'node:net';
import { connect as tlsConnect, TLSSocket } from 'node:tls';
import { createCertificateAuthority, issueCertificate } from '../../src/pki/certificates.ts';

const SSL_REQUEST_CODE = 80877103;

/** Reads exactly `n` bytes from a socket that is not flowing yet. */
function readExactly(socket: Socket, n: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    let got = Buffer.alloc(0);
    const onData = (chunk: Buffer): void => {
      got = Buffer.concat([got, chunk]);
      if (got.length < n) return;
      socket.off('data', onData);
      socket.off('error', reject);
      socket.pause();
      if (got.length > n) socket.unshift(got.subarray(n));
      resolve(got.subarray(0, n));
    };
    socket.on('data', onData);
    socket.once('error', reject);
  });
}

/** The interception. */
export class TlsInterceptor {
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  private readonly target: { host: string; port: number };
  port = 0;
  /** Decrypted bytes each client sent, per connection, in order. */
  readonly fromClients: Buffer[][] = [];

  constructor(target: { host: string; port: number }) {
    this.target = target;
  }

  /** Listens on a free port with a certificate of its own for 127.0.0.1. */
  async start(): Promise<void> {
    const ca = await createCertificateAuthority('interception', 1);
    const leaf = await issueCertificate(ca, { commonName: '127.0.0.1', ipAddresses: ['127.0.0.1'], usage: 'server', validityDays: 1 });
    this.server = createServer((client) => {
      this.sockets.add(client);
      client.on('close', () => this.sockets.delete(client));
      client.on('error', () => undefined);
      void this.relay(client, leaf.certPem, leaf.keyPem).catch(() => client.destroy());
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    const address = this.server.address();
    this.port = typeof address === 'object' && address ? address.port : 0;
  }

  private async relay(client: Socket, cert: string, key: string): Promise<void> {
    const first = await readExactly(client, 8);
    if (first.readInt32BE(4) !== SSL_REQUEST_CODE) throw new Error('the interception only relays clients that ask for TLS');
    client.write('S');
    const clientTls = new TLSSocket(client, { isServer: true, cert, key });
    const upstream = netConnect(this.target.port, this.target.host);
    this.sockets.add(upstream);
    upstream.on('close', () => this.sockets.delete(upstream));
    upstream.on('error', () => clientTls.destroy());
    await new Promise<void>((resolve, reject) => upstream.once('connect', resolve).once('error', reject));
    upstream.write(first);
    const answer = await readExactly(upstream, 1);
    if (answer[0] !== 0x53) throw new Error('the server does not offer TLS');
    const serverTls = tlsConnect({ socket: upstream, rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => serverTls.once('secureConnect', resolve).once('error', reject));
    const sent: Buffer[] = [];
    this.fromClients.push(sent);
    clientTls.on('data', (chunk: Buffer) => {
      sent.push(chunk);
      serverTls.write(chunk);
    });
    serverTls.on('data', (chunk: Buffer) => clientTls.write(chunk));
    clientTls.on('close', () => serverTls.destroy());
    serverTls.on('close', () => clientTls.destroy());
    clientTls.on('error', () => serverTls.destroy());
    serverTls.on('error', () => clientTls.destroy());
  }

  /**
   * Types of the messages a client sent after its startup packet, per
   * connection: 'p' is a password, SASL or GSS response.
   */
  messageTypes(): string[][] {
    return this.fromClients.map((chunks) => {
      const bytes = Buffer.concat(chunks);
      const types: string[] = [];
      let at = bytes.length >= 4 ? bytes.readInt32BE(0) : bytes.length; // the startup packet has no type byte
      while (at + 5 <= bytes.length) {
        types.push(String.fromCharCode(bytes[at]!));
        at += 1 + bytes.readInt32BE(at + 1);
      }
      return types;
    });
  }

  /** Stops listening and cuts every relayed connection. */
  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}
