/**
 * A loopback front for the real API server that a test switches between
 * states: `down` (nothing listens: connection refused), `stub` (a TLS server
 * that answers every request with the statuses given, e.g. 429 while storage
 * initializes, then 503) and `up` (bytes pass to the real API server).
 * A KubeConfig for the front skips server verification, since the stub is not
 * the API server's certificate; the client certificate still authenticates.
 */
import { createServer as createHttpsServer, type Server as HttpsServer } from 'node:https';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { KubeConfig } from '@kubernetes/client-node';
import { createCertificateAuthority, issueCertificate } from '../../src/pki/certificates.ts';
import { pipeBoth } from './tcp-proxy.ts';

/** What the front does with a new connection. */
export type FrontState = 'down' | 'stub' | 'up';

/** The front. */
export class ApiFront {
  private readonly target: URL;
  private server: Server | undefined;
  private stub: HttpsServer | undefined;
  private stubPort = 0;
  private readonly sockets = new Set<Socket>();
  private stubStatuses: number[] = [429];
  private stubIndex = 0;
  state: FrontState = 'down';
  port = 0;
  /** Requests the stub answered. */
  stubbed = 0;

  constructor(apiServer: string) {
    this.target = new URL(apiServer);
  }

  /** Picks a free port and starts the stub; the front stays `down`. */
  async start(): Promise<void> {
    const ca = await createCertificateAuthority('api-front-test-ca', 1);
    const leaf = await issueCertificate(ca, { commonName: '127.0.0.1', ipAddresses: ['127.0.0.1'], usage: 'server', validityDays: 1 });
    this.stub = createHttpsServer({ cert: leaf.certPem, key: leaf.keyPem }, (req, res) => {
      this.stubbed += 1;
      const code = this.stubStatuses[this.stubIndex++ % this.stubStatuses.length] ?? 500;
      const reason = code === 429 ? 'TooManyRequests' : 'ServiceUnavailable';
      const message = code === 429 ? 'storage is (re)initializing' : 'the server is currently unable to handle the request';
      req.resume();
      res.writeHead(code, { 'content-type': 'application/json', ...(code === 429 ? { 'retry-after': '1' } : {}) });
      res.end(JSON.stringify({ kind: 'Status', apiVersion: 'v1', status: 'Failure', message, reason, code }));
    });
    await new Promise<void>((resolve) => this.stub!.listen(0, '127.0.0.1', resolve));
    const address = this.stub.address();
    this.stubPort = typeof address === 'object' && address ? address.port : 0;
    await this.listen(0);
    await this.close();
  }

  private async listen(port: number): Promise<void> {
    this.server = createServer((client) => {
      const upstream = this.state === 'stub'
        ? createConnection({ host: '127.0.0.1', port: this.stubPort })
        : createConnection({ host: this.target.hostname, port: Number(this.target.port) });
      pipeBoth(client, upstream, this.sockets);
    });
    await new Promise<void>((resolve) => this.server!.listen(port, '127.0.0.1', resolve));
    const address = this.server.address();
    this.port = typeof address === 'object' && address ? address.port : 0;
  }

  private async close(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    for (const s of this.sockets) s.destroy();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  /** Switches state; open connections are cut so clients reconnect into the new state. */
  async set(state: FrontState, stubStatuses?: number[]): Promise<void> {
    if (stubStatuses) {
      this.stubStatuses = stubStatuses;
      this.stubIndex = 0;
    }
    this.state = state;
    await this.close();
    if (state !== 'down') await this.listen(this.port);
  }

  /** A KubeConfig like `base` that talks to the front. */
  kubeConfig(base: KubeConfig): KubeConfig {
    const kc = new KubeConfig();
    kc.loadFromOptions({
      clusters: base.clusters.map((c) => ({ name: c.name, server: `https://127.0.0.1:${this.port}`, skipTLSVerify: true })),
      users: base.users, contexts: base.contexts, currentContext: base.currentContext,
    });
    return kc;
  }

  /** Stops everything. */
  async stop(): Promise<void> {
    await this.close();
    this.stub?.closeAllConnections();
    await new Promise<void>((resolve) => (this.stub ? this.stub.close(() => resolve()) : resolve()));
  }
}
