/**
 * The admin HTTP endpoints: /metrics (Prometheus text), /healthz (the
 * process runs), /readyz (accepting clients: listening, not draining, the
 * tunnel up if there is one).
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Registry } from 'prom-client';

/** What /readyz reports. */
export interface Readiness {
  ready: boolean;
  reasons: string[];
}

/** A small HTTP server for probes and scraping. */
export class AdminServer {
  private readonly server: Server;

  constructor(deps: { registry: Registry; readiness: () => Readiness; healthy: () => boolean }) {
    this.server = createServer((req, res) => {
      const path = (req.url ?? '/').split('?')[0];
      if (path === '/metrics') {
        deps.registry.metrics().then((text) => {
          res.writeHead(200, { 'content-type': deps.registry.contentType });
          res.end(text);
        }, (err: Error) => {
          res.writeHead(500);
          res.end(err.message);
        });
        return;
      }
      if (path === '/healthz') {
        const ok = deps.healthy();
        res.writeHead(ok ? 200 : 503, { 'content-type': 'text/plain' });
        res.end(ok ? 'ok\n' : 'stopped\n');
        return;
      }
      if (path === '/readyz') {
        const r = deps.readiness();
        res.writeHead(r.ready ? 200 : 503, { 'content-type': 'application/json' });
        res.end(`${JSON.stringify(r)}\n`);
        return;
      }
      res.writeHead(404);
      res.end();
    });
  }

  /** Listens; resolves with the bound port. */
  listen(host: string, port: number): Promise<number> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => resolve((this.server.address() as AddressInfo).port));
    });
  }

  /** Stops listening. */
  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
