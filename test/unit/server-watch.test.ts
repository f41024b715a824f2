import assert from 'node:assert/strict';
import { pino } from 'pino';
import type { DiscoveryTarget, HeldLogin } from '../../src/controller/limit-discovery.ts';
import { ServerWatch } from '../../src/controller/server-watch.ts';

/** A login that ends when the test says so. */
class FakeLogin implements HeldLogin {
  closed = false;
  private end: () => void = () => undefined;
  readonly lost = new Promise<void>((resolve) => {
    this.end = resolve;
  });

  serverGone(): void {
    this.end();
  }

  close(): Promise<void> {
    this.closed = true;
    return Promise.resolve();
  }
}

const target: DiscoveryTarget = { serverKey: 'db:5432', host: 'db', port: 5432, dbname: 'app', sslMode: 'disable', username: 'app', password: 'pw' };
const tick = (ms = 0): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

describe('server watch', function () {
  it('holds one login per server, and a new one only when the target changes', async function () {
    const logins: FakeLogin[] = [];
    const watch = new ServerWatch({ hold: () => Promise.resolve(logins[logins.push(new FakeLogin()) - 1]!), onLost: () => undefined, logger: pino({ level: 'silent' }) });
    watch.ensure('db', 'fp1', target);
    watch.ensure('db', 'fp1', target);
    await tick();
    assert.equal(logins.length, 1);
    watch.ensure('db', 'fp2', target);
    await tick();
    assert.equal(logins.length, 2);
    assert.equal(logins[0]!.closed, true, 'the login of the former target is closed');
    watch.drop('db');
    await tick();
    assert.equal(logins[1]!.closed, true);
    assert.equal(watch.size, 0);
  });

  it('tells only once the server answers again after its login ended, and holds the new login', async function () {
    this.timeout(10_000);
    const logins: FakeLogin[] = [];
    let down = false;
    let refused = 0;
    const told: string[] = [];
    const watch = new ServerWatch({
      hold: () => {
        if (down) {
          refused += 1;
          return Promise.reject(new Error('ECONNREFUSED'));
        }
        return Promise.resolve(logins[logins.push(new FakeLogin()) - 1]!);
      },
      onLost: (server) => told.push(server),
      logger: pino({ level: 'silent' }),
    });
    watch.ensure('db', 'fp', target);
    await tick();
    down = true;
    logins[0]!.serverGone();
    await tick(1_000);
    assert.deepEqual(told, [], 'not told while the server refuses');
    assert.ok(refused >= 1, 'tried again while it was down');
    down = false;
    const deadline = Date.now() + 5_000;
    while (told.length === 0 && Date.now() < deadline) await tick(50);
    assert.deepEqual(told, ['db']);
    assert.equal(logins.length, 2, 'a new login is held');
    assert.equal(watch.size, 1);
    // That login watches in turn; released, its end tells nothing.
    await watch.releaseAll();
    assert.equal(logins[1]!.closed, true);
    logins[1]!.serverGone();
    await tick(700);
    assert.deepEqual(told, ['db']);
  });

  it('gives up a login that could not be opened, so the next successful check tries again', async function () {
    let attempts = 0;
    const watch = new ServerWatch({
      hold: () => {
        attempts += 1;
        return Promise.reject(new Error('too many connections'));
      },
      onLost: () => undefined,
      logger: pino({ level: 'silent' }),
    });
    watch.ensure('db', 'fp', target);
    await tick();
    assert.equal(watch.size, 0);
    watch.ensure('db', 'fp', target);
    await tick();
    assert.equal(attempts, 2);
  });
});
