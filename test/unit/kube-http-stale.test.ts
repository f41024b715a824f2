/**
 * KubeHttp against an HTTPS server that drops a kept-alive connection
 * instead of answering the next request on it (what an API server or a load
 * balancer that closed an idle connection looks like to the client that just
 * reused it): the request is sent again, once, on a new connection, except a
 * POST, which could create twice. The webhook's DatabaseConnection lookup
 * goes through it: a failed lookup admits a pod without its sidecar.
 */
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:https';
import type { Socket } from 'node:net';
import { KubeHttp } from '../../src/kube/http.ts';
import { createCertificateAuthority, issueCertificate } from '../../src/pki/certificates.ts';

describe('KubeHttp on a kept-alive connection the server dropped', () => {
  let server: Server;
  let http: KubeHttp;
  const served: string[] = [];

  before(async () => {
    const ca = await createCertificateAuthority('test-ca', 1);
    const leaf = await issueCertificate(ca, { commonName: '127.0.0.1', ipAddresses: ['127.0.0.1'], usage: 'server', validityDays: 1 });
    const requestsOnSocket = new WeakMap<Socket, number>();
    server = createServer({ cert: leaf.certPem, key: leaf.keyPem }, (req, res) => {
      const n = (requestsOnSocket.get(req.socket) ?? 0) + 1;
      requestsOnSocket.set(req.socket, n);
      // The second request on a connection finds it gone, as if the server had closed it while idle.
      if (n === 2) {
        req.socket.destroy();
        return;
      }
      served.push(`${req.method} ${req.url}`);
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ kind: 'Thing', path: req.url }));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as { port: number }).port;
    http = new KubeHttp({
      getCurrentCluster: () => ({ server: `https://127.0.0.1:${port}` }),
      applyToHTTPSOptions: (options) => {
        options.ca = ca.certPem;
        return Promise.resolve();
      },
    });
  });

  after(async () => {
    http.close();
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  it('sends a GET again on a new connection and answers it', async () => {
    served.length = 0;
    assert.deepEqual(await http.get('/first'), { kind: 'Thing', path: '/first' });
    // Reuses the kept-alive connection, which the server drops.
    assert.deepEqual(await http.get('/second'), { kind: 'Thing', path: '/second' });
    assert.deepEqual(served, ['GET /first', 'GET /second']);
  });

  it('does not send a POST twice: the caller gets the error', async () => {
    http.close();
    served.length = 0;
    await http.get('/warm');
    await assert.rejects(http.create('/things', { a: 1 }), /ECONNRESET|socket hang up/);
    assert.deepEqual(served, ['GET /warm']);
  });
});
