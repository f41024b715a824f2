/**
 * The controller's login check of a DatabaseConnection against a real
 * PostgreSQL behind a front the test switches between "accepts and never
 * answers" (a host black-holed from the controller's network) and "forwards".
 * A check only due again must not hold the reconcile that asks for it: it is
 * answered from the last result and runs in the background, and a changed
 * answer is reported so that the server is reconciled again.
 */
import assert from 'node:assert/strict';
import { createServer, connect, type Server, type Socket } from 'node:net';
import pino from 'pino';
import { LimitDiscovery, type DiscoveryTarget } from '../../src/controller/limit-discovery.ts';
import { ConnectionVerifier } from '../../src/controller/verifier.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { eventually } from '../support/budget-fixture.ts';
import { testEnvironment } from '../support/hooks.ts';

/** A TCP front on loopback that either holds connections without a byte or forwards them to PostgreSQL. */
class SwitchableFront {
  mode: 'silent' | 'forward' = 'silent';
  private readonly server: Server;
  private readonly sockets = new Set<Socket>();
  private readonly postgres: PostgresServer;

  constructor(postgres: PostgresServer) {
    this.postgres = postgres;
    this.server = createServer((socket) => {
      this.sockets.add(socket);
      socket.on('close', () => this.sockets.delete(socket));
      socket.on('error', () => undefined);
      if (this.mode === 'silent') return;
      const upstream = connect({ host: this.postgres.host, port: this.postgres.port });
      upstream.on('error', () => socket.destroy());
      socket.on('close', () => upstream.destroy());
      upstream.on('close', () => socket.destroy());
      socket.pipe(upstream).pipe(socket);
    });
  }

  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    const address = this.server.address();
    if (address === null || typeof address === 'string') throw new Error('no port');
    return address.port;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

describe('the login check of a DatabaseConnection', function () {
  let postgres: PostgresServer;
  let front: SwitchableFront;
  let target: DiscoveryTarget;

  before(async function () {
    postgres = await testEnvironment().postgres();
  });

  beforeEach(async function () {
    front = new SwitchableFront(postgres);
    const port = await front.listen();
    target = { serverKey: `127.0.0.1:${port}`, host: '127.0.0.1', port, dbname: 'app', sslMode: 'disable', username: postgres.app.user, password: postgres.app.password };
  });

  afterEach(async function () {
    await front.close();
  });

  it('answers a check only due again from the last result at once, runs it in the background, and reports a changed answer', async function () {
    const discovery = new LimitDiscovery({ logger: pino({ level: 'silent' }), connectTimeoutMs: 2_000 });
    const refreshed: string[] = [];
    const verifier = new ConnectionVerifier(discovery, { retryFailedMs: 0 }, (key) => refreshed.push(key));
    // The first check of a fingerprint is waited for: the server never answers, so it fails by the timeout.
    const first = await verifier.check('shop/orders', 'f1', target);
    assert.equal(first.verification.state, 'failed');
    assert.match(first.verification.state === 'failed' ? first.verification.message : '', /timeout/i);
    // Due again at once (retryFailedMs 0): the same answer, not a new check's, while one runs behind it.
    const again = await verifier.check('shop/orders', 'f1', target);
    assert.equal(again, first, 'answered from the last result');
    // The server is reachable again. The background check under way times out with the same answer (nothing
    // to report); one started after it logs in, and that change is reported, once.
    front.mode = 'forward';
    await eventually('a background check reported the new answer', async () => {
      assert.equal((await verifier.check('shop/orders', 'f1', target)).verification.state, refreshed.length > 0 ? 'ok' : 'failed');
      return refreshed.length > 0;
    }, 15_000);
    assert.deepEqual(refreshed, ['shop/orders']);
    const now = await verifier.check('shop/orders', 'f1', target);
    assert.equal(now.verification.state, 'ok');
    assert.equal(now.settings?.maxConnections, postgres.options.maxConnections);
  });

  it('waits for the check of a new fingerprint (new credentials), whatever the last answer', async function () {
    front.mode = 'forward';
    const discovery = new LimitDiscovery({ logger: pino({ level: 'silent' }), connectTimeoutMs: 2_000 });
    const verifier = new ConnectionVerifier(discovery, {});
    const ok = await verifier.check('shop/orders', 'f1', target);
    assert.equal(ok.verification.state, 'ok');
    const rotated = await verifier.check('shop/orders', 'f2', { ...target, password: 'not-the-password' });
    assert.equal(rotated.verification.state, 'failed');
    assert.equal(rotated.verification.state === 'failed' ? rotated.verification.reason : '', 'CredentialsRejected');
    assert.ok(!JSON.stringify(rotated).includes('not-the-password'), 'the password is not in the answer');
    // The password with the newline `echo` leaves in a file: the condition says so, and not what the password is.
    const echoed = await verifier.check('shop/orders', 'f3', { ...target, password: `${postgres.app.password}\n` });
    assert.match(echoed.verification.state === 'failed' ? echoed.verification.message : '', /SQLSTATE 28P01\); the password in the credentials Secret ends with a newline/);
    assert.ok(!JSON.stringify(echoed).includes(postgres.app.password), 'the password is not in the answer');
  });
});
