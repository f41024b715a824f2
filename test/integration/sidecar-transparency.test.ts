/**
 * The sidecar behaves like a direct connection where pooling could make it
 * differ: startup settings per client, cancels that reach only the statement
 * they were meant for, session state in transaction mode, DEALLOCATE and
 * DISCARD sent as SQL, protocol version negotiation, big Parse messages, and
 * clients that must get an answer whatever fails underneath.
 */
import assert from 'node:assert/strict';
import { connect as netConnect, type Socket } from 'node:net';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import { testEnvironment } from '../support/hooks.ts';
import { startTestSidecar, type TestSidecar } from '../support/sidecar-fixture.ts';
import { TcpProxy } from '../support/tcp-proxy.ts';
import { CANCEL_REQUEST_CODE, FrameReader, buildSpecialRequest, buildStartupMessage, parseNoticeFields } from '../../src/core/protocol/index.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';

const env = testEnvironment();

function client(running: TestSidecar, extra: Partial<pg.ClientConfig> = {}): pg.Client {
  const c = new pg.Client({ host: '127.0.0.1', port: running.port, user: running.role.user, database: 'app', ...extra });
  // A test that fails leaves clients to be cut by the sidecar's stop: that must not become an uncaught error.
  c.on('error', () => undefined);
  return c;
}

async function withSidecar(postgres: PostgresServer, options: Parameters<typeof startTestSidecar>[1], body: (running: TestSidecar) => Promise<void>): Promise<void> {
  const running = await startTestSidecar(postgres, options);
  try {
    await body(running);
  } finally {
    await running.stop();
  }
}

/** Sends a CancelRequest for `c` and resolves when the sidecar closes the cancel connection. */
function sendCancel(port: number, c: pg.Client): Promise<void> {
  const keys = c as unknown as { processID: number; secretKey: number };
  const key = Buffer.alloc(4);
  key.writeInt32BE(keys.secretKey);
  return new Promise((resolve) => {
    const socket = netConnect({ host: '127.0.0.1', port });
    socket.on('error', () => resolve());
    socket.on('close', () => resolve());
    socket.resume();
    socket.write(buildSpecialRequest(CANCEL_REQUEST_CODE, keys.processID, key));
  });
}

/** Opens a raw socket, writes `bytes`, and collects what comes back until the server closes or `ms` pass. */
function rawExchange(port: number, bytes: Buffer, ms = 1000): Promise<{ data: Buffer; closed: boolean }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    const socket: Socket = netConnect({ host: '127.0.0.1', port });
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ data: Buffer.concat(chunks), closed: false });
    }, ms);
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('error', () => undefined);
    socket.on('close', () => {
      clearTimeout(timer);
      resolve({ data: Buffer.concat(chunks), closed: true });
    });
    socket.write(bytes);
  });
}

/**
 * A bare client logged in through the sidecar: sends the bytes a test builds,
 * waits for a reply type, and tells when the sidecar closes the connection.
 */
async function wireSession(port: number, user: string): Promise<{
  send: (bytes: Buffer[]) => void; until: (type: string, ms?: number) => Promise<Buffer | undefined>; closedWithin: (ms: number) => Promise<boolean>; key: Buffer;
  replies: (ready: number, quietMs?: number) => Promise<string>;
}> {
  const socket = netConnect({ host: '127.0.0.1', port });
  await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
  const reader = new FrameReader();
  const seen: { type: string; body: Buffer }[] = [];
  let closed = false;
  socket.on('error', () => undefined);
  socket.on('close', () => { closed = true; });
  socket.on('data', (chunk: Buffer) => {
    reader.push(chunk);
    while (reader.next()) seen.push({ type: String.fromCharCode(reader.type), body: Buffer.from(reader.buffer.subarray(reader.bodyStart, reader.end)) });
  });
  const until = async (type: string, ms = 5000): Promise<Buffer | undefined> => {
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      const index = seen.findIndex((m) => m.type === type);
      if (index >= 0) return seen.splice(0, index + 1)[index]!.body;
      await new Promise((r) => setTimeout(r, 10));
    }
    return undefined;
  };
  const closedWithin = async (ms: number): Promise<boolean> => {
    const deadline = Date.now() + ms;
    while (!closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    const result = closed;
    socket.destroy();
    return result;
  };
  /** The types of every message received (taken), once `ready` ReadyForQuery have come and nothing more for `quietMs` (a ReadyForQuery's status follows its 'Z'). */
  const replies = async (ready: number, quietMs = 300): Promise<string> => {
    const deadline = Date.now() + 5000;
    while (Date.now() < deadline && seen.filter((m) => m.type === 'Z').length < ready) await new Promise((r) => setTimeout(r, 10));
    await new Promise((r) => setTimeout(r, quietMs));
    return seen.splice(0).map((m) => (m.type === 'Z' ? `Z${m.body.toString()}` : m.type)).join('');
  };
  socket.write(buildStartupMessage({ user, database: 'app' }));
  const key = await until('K');
  assert.ok(key, 'BackendKeyData');
  assert.ok(await until('Z'), 'logged in');
  return { send: (bytes) => socket.write(Buffer.concat(bytes)), until, closedWithin, key, replies };
}

type WireSession = Awaited<ReturnType<typeof wireSession>>;

/**
 * With grant 1: while `w` stays connected, another client logs in and passes
 * `check` on the one server connection; then `w` runs a query and ends as usual.
 */
async function nextClientThenGoOn(running: TestSidecar, w: WireSession, name: string, check: (next: pg.Client) => Promise<void>): Promise<void> {
  const next = client(running, { connectionTimeoutMillis: 5000 });
  try {
    await next.connect();
    await check(next);
  } catch (error) {
    if (error instanceof assert.AssertionError) throw error;
    assert.fail(`${name}: the next client got no server connection (${(error as Error).message})`);
  } finally {
    await next.end().catch(() => undefined);
  }
  w.send([serialize.query('SELECT 2')]);
  assert.equal(await w.replies(1, 50), 'TDCZI', `${name}: the client's next query`);
  w.send([serialize.end()]);
  assert.equal(await w.closedWithin(3000), true);
}

describe('sidecar transparency', function () {
  let postgres: PostgresServer;
  let observer: pg.Client;

  before(async function () {
    postgres = await env.postgres();
    observer = new pg.Client({ host: postgres.host, port: postgres.port, user: postgres.superuser.user, password: postgres.superuser.password, database: 'app' });
    await observer.connect();
  });

  after(async function () {
    await observer?.end();
  });

  describe('startup settings', function () {
    it('applies each client\'s options, TimeZone and application_name on whichever server connection serves it, and never to another client', async function () {
      await withSidecar(postgres, { grant: 2 }, async (running) => {
        const tokyo = client(running, { options: '-c statement_timeout=1234 -c search_path=foo,public -c TimeZone=Asia/Tokyo', application_name: 'orders-web' });
        await tokyo.connect();
        const plain = client(running);
        await plain.connect();
        try {
          // What a direct connection with the same options shows.
          const direct = new pg.Client({ host: postgres.host, port: postgres.port, user: running.role.user, password: running.role.password, database: 'app', options: '-c search_path=foo,public' });
          await direct.connect();
          const directPath = (await direct.query<{ sp: string }>("SELECT current_setting('search_path') AS sp")).rows[0]!.sp;
          await direct.end();
          const clients = [tokyo, plain];
          for (let round = 0; round < 20; round++) {
            const [a, b] = await Promise.all(clients.map((c) => c.query<{ st: string; sp: string; tz: string; app: string; pid: number }>(
              "SELECT current_setting('statement_timeout') AS st, current_setting('search_path') AS sp, current_setting('TimeZone') AS tz, current_setting('application_name') AS app, pg_backend_pid() AS pid")));
            assert.deepEqual([a!.rows[0]!.st, a!.rows[0]!.sp, a!.rows[0]!.tz, a!.rows[0]!.app], ['1234ms', directPath, 'Asia/Tokyo', 'orders-web']);
            assert.equal(b!.rows[0]!.st, '0');
            assert.notEqual(b!.rows[0]!.tz, 'Asia/Tokyo');
            assert.notEqual(b!.rows[0]!.app, 'orders-web');
          }
          const shown = await tokyo.query<{ t: string }>("SELECT '2020-01-01 00:00:00+00'::timestamptz::text AS t");
          assert.equal(shown.rows[0]!.t, '2020-01-01 09:00:00+09');
          // pg_stat_activity names the client while it runs a statement.
          const sleeping = tokyo.query('SELECT pg_sleep(0.5)');
          await new Promise((r) => setTimeout(r, 200));
          const seen = await observer.query<{ app: string }>("SELECT application_name AS app FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(0.5)' AND state = 'active'");
          assert.deepEqual(seen.rows.map((r) => r.app), ['orders-web']);
          await sleeping;
        } finally {
          await tokyo.end();
          await plain.end();
        }
      });
    });

    it('keeps 12 clients with 12 different statement_timeouts apart on 2 server connections', async function () {
      await withSidecar(postgres, { grant: 2 }, async (running) => {
        const clients = Array.from({ length: 12 }, (_, i) => client(running, { options: `-c statement_timeout=${1001 + i}` }));
        await Promise.all(clients.map((c) => c.connect()));
        try {
          await Promise.all(clients.map(async (c, i) => {
            for (let round = 0; round < 15; round++) {
              const r = await c.query<{ statement_timeout: string }>('SHOW statement_timeout');
              assert.equal(r.rows[0]!.statement_timeout, `${1001 + i}ms`);
            }
          }));
        } finally {
          await Promise.all(clients.map((c) => c.end()));
        }
      });
    });

    it('refuses a setting the server refuses with the server\'s own error, and a replication connection by name', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const bad = client(running, { options: '-c no_such_setting_at_all=1' });
        await assert.rejects(bad.connect(), (e: { code?: string; message: string }) => e.code === '42704' && e.message.includes('no_such_setting_at_all'));
        const badValue = client(running, { options: '-c statement_timeout=soon' });
        await assert.rejects(badValue.connect(), (e: { code?: string; message: string }) => e.code === '22023' && e.message.includes('statement_timeout'));
        const replication = client(running, { replication: 'database' } as pg.ClientConfig);
        await assert.rejects(replication.connect(), (e: { code?: string; message: string }) => e.code === '0A000' && e.message.includes('replication'));
        // The sidecar still serves others.
        const good = client(running);
        await good.connect();
        assert.equal((await good.query<{ n: number }>('SELECT 1 AS n')).rows[0]!.n, 1);
        await good.end();
      });
    });
    it('session mode: RESET, RESET ALL and DISCARD ALL return to the client\'s startup values, as direct; a client with other settings gets its own backend', async function () {
      await withSidecar(postgres, { mode: 'session', grant: 1 }, async (running) => {
        const show = async (c: pg.Client): Promise<[string, string]> => {
          const r = await c.query<{ st: string; app: string }>("SELECT current_setting('statement_timeout') AS st, current_setting('application_name') AS app");
          return [r.rows[0]!.st, r.rows[0]!.app];
        };
        const own = client(running, { options: '-c statement_timeout=1234', application_name: 'reset-test' });
        await own.connect();
        let ownPid: number;
        try {
          ownPid = (await own.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
          // Set at login, as direct: not by a SET the sidecar ran.
          const sources = await own.query<{ name: string; source: string }>("SELECT name, source FROM pg_settings WHERE name IN ('statement_timeout', 'application_name') ORDER BY name");
          assert.deepEqual(sources.rows, [{ name: 'application_name', source: 'client' }, { name: 'statement_timeout', source: 'client' }]);
          for (const reset of ['RESET statement_timeout', 'RESET ALL', 'DISCARD ALL']) {
            await own.query("SET statement_timeout = 4321; SET application_name = 'changed'");
            await own.query(reset);
            assert.deepEqual(await show(own), ['1234ms', reset === 'RESET statement_timeout' ? 'changed' : 'reset-test'], reset);
          }
        } finally {
          await own.end();
        }
        // Another client with the same settings gets the same backend back.
        const same = client(running, { options: '-c statement_timeout=1234', application_name: 'reset-test' });
        await same.connect();
        try {
          assert.equal((await same.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid, ownPid);
        } finally {
          await same.end();
        }
        const plain = client(running);
        await plain.connect();
        try {
          assert.deepEqual(await show(plain), ['0', '']);
          // It named no application: the server's default, as direct.
          assert.equal((await plain.query<{ source: string }>("SELECT source FROM pg_settings WHERE name = 'application_name'")).rows[0]!.source, 'default');
          await plain.query('SET statement_timeout = 4321; RESET ALL');
          assert.deepEqual(await show(plain), ['0', '']);
        } finally {
          await plain.end();
        }
        // The client's own client_encoding, not the UTF8 the sidecar's own logins use.
        const latin1 = await rawExchange(running.port, buildStartupMessage({ user: running.role.user, database: 'app', client_encoding: 'LATIN1' }), 500);
        assert.ok(latin1.data.includes(Buffer.from('client_encoding\0LATIN1\0')), 'ParameterStatus client_encoding LATIN1');
        // A setting the server refuses at login: its error, detail included, as direct.
        const bad = client(running, { options: '-c DateStyle=foo' });
        await assert.rejects(bad.connect(), (e: { code?: string; message: string; detail?: string }) => e.code === '22023' && e.message.includes('DateStyle') && (e.detail ?? '').includes('foo'));
      });
    });
  });

  describe('session state in transaction mode', function () {
    it('carries a client\'s SET (simple or extended, as pgjdbc sends it at login) to every server connection it uses, without pinning, and never to another client', async function () {
      // One server connection, shared: without the reset, the next client would see what the setter left.
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const setter = client(running, { options: '-c statement_timeout=1234' });
        const plain = client(running);
        await setter.connect();
        await plain.connect();
        const show = async (c: pg.Client): Promise<{ st: string; app: string; digits: string; pid: number }> => {
          const r = await c.query<{ st: string; app: string; digits: string; pid: number }>(
            "SELECT current_setting('statement_timeout') AS st, current_setting('application_name') AS app, current_setting('extra_float_digits') AS digits, pg_backend_pid() AS pid");
          return r.rows[0]!;
        };
        try {
          const plainBefore = await show(plain);
          await setter.query('SET statement_timeout = 4321');
          // pgjdbc's login: SETs through the extended protocol, in an unnamed statement.
          await setter.query({ text: 'SET extra_float_digits = 3', queryMode: 'extended' } as pg.QueryConfig);
          await setter.query({ text: "SET application_name = 'PostgreSQL JDBC Driver'", queryMode: 'extended' } as pg.QueryConfig);
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="set"} 0/);
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_carried_settings_total'), /_total 3\b/);
          for (let round = 0; round < 3; round++) {
            const own = await show(setter);
            assert.deepEqual([own.st, own.app, own.digits], ['4321ms', 'PostgreSQL JDBC Driver', '3'], `round ${round}`);
            const other = await show(plain);
            assert.deepEqual([other.st, other.app, other.digits], [plainBefore.st, plainBefore.app, plainBefore.digits], `round ${round}: another client saw the setter's settings`);
            assert.equal(other.pid, own.pid, 'one shared backend');
          }
          // The backend dies: a new one gets the client's SETs too.
          const { pid } = await show(plain);
          await observer.query('SELECT pg_terminate_backend($1)', [pid]);
          await new Promise((r) => setTimeout(r, 200));
          const after = await show(setter);
          assert.notEqual(after.pid, pid);
          assert.deepEqual([after.st, after.app, after.digits], ['4321ms', 'PostgreSQL JDBC Driver', '3']);
          // RESET goes back to the client's startup value, as direct; SET ... TO DEFAULT too.
          await setter.query('RESET statement_timeout');
          assert.equal((await show(setter)).st, '1234ms');
          await setter.query('SET extra_float_digits TO DEFAULT');
          assert.equal((await show(setter)).digits, '1');
          assert.equal((await show(setter)).app, 'PostgreSQL JDBC Driver');
          // A SET the server refuses changes nothing, and pins nothing.
          await assert.rejects(setter.query("SET statement_timeout = 'soon'"), (e: { code?: string }) => e.code === '22023');
          assert.equal((await show(setter)).st, '1234ms');
          // pgjdbc's setTransactionIsolation (Spring's @Transactional(isolation = ...)): carried too.
          await setter.query({ text: 'SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY', queryMode: 'extended' } as pg.QueryConfig);
          const isolation = "SELECT current_setting('transaction_isolation') AS i, current_setting('transaction_read_only') AS r";
          assert.deepEqual((await setter.query<{ i: string; r: string }>(isolation)).rows[0], { i: 'serializable', r: 'on' });
          assert.deepEqual((await plain.query<{ i: string; r: string }>(isolation)).rows[0], { i: 'read committed', r: 'off' });
          // A SET prepared under a name (psycopg 3 after five runs, postgres.js always): carried each time it is executed.
          // The second run of set-2222 is a Bind alone: its Parse came with the first.
          for (const value of ['2222', '3333', '2222']) {
            await setter.query({ name: `set-${value}`, text: `SET statement_timeout = ${value}` });
            assert.equal((await show(setter)).st, `${value}ms`);
          }
          const named = await show(setter);
          await observer.query('SELECT pg_terminate_backend($1)', [named.pid]);
          await new Promise((r) => setTimeout(r, 200));
          assert.equal((await show(setter)).st, '2222ms', 'the named SET as the client last ran it, on a new backend');
          assert.equal((await show(plain)).st, plainBefore.st);
          await setter.query('RESET statement_timeout');
          // set_config with its value bound (row-level security set up per request), unnamed and named: carried with that value.
          await setter.query("SELECT set_config('statement_timeout', $1, false)", ['1111']);
          assert.equal((await show(setter)).st, '1111ms');
          await setter.query({ name: 'tenant', text: "SELECT set_config('statement_timeout', $1::text, false)", values: ['1212'] });
          const bound = await show(setter);
          assert.equal(bound.st, '1212ms');
          await observer.query('SELECT pg_terminate_backend($1)', [bound.pid]);
          await new Promise((r) => setTimeout(r, 200));
          assert.equal((await show(setter)).st, '1212ms', 'the bound value, on a new backend');
          assert.equal((await show(plain)).st, plainBefore.st);
          // NULL resets it, as set_config does: back to the startup value.
          await setter.query({ name: 'tenant', text: "SELECT set_config('statement_timeout', $1::text, false)", values: [null] });
          assert.equal((await show(setter)).st, '1234ms');
          // SET SCHEMA is SET search_path of its own grammar.
          await setter.query("SET SCHEMA 'pg_catalog'");
          assert.equal((await setter.query<{ p: string }>("SELECT current_setting('search_path') AS p")).rows[0]!.p, 'pg_catalog');
          assert.notEqual((await plain.query<{ p: string }>("SELECT current_setting('search_path') AS p")).rows[0]!.p, 'pg_catalog');
          // Several SETs in one Query, nothing else: carried together.
          await setter.query("SET work_mem = '5MB'; SET lock_timeout = '7s'");
          const memory = "SELECT current_setting('work_mem') AS w, current_setting('lock_timeout') AS l";
          assert.deepEqual((await setter.query<{ w: string; l: string }>(memory)).rows[0], { w: '5MB', l: '7s' });
          assert.notDeepEqual((await plain.query<{ w: string; l: string }>(memory)).rows[0], { w: '5MB', l: '7s' });
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="set"} 0/);
          // RESET ALL: back to the startup settings, its SETs forgotten.
          await setter.query('RESET ALL');
          assert.deepEqual((await setter.query<{ i: string; r: string }>(isolation)).rows[0], { i: 'read committed', r: 'off' });
          const reset = await show(setter);
          assert.deepEqual([reset.st, reset.app, reset.digits], ['1234ms', '', '1']);
          assert.deepEqual(await show(plain).then((r) => [r.st, r.app, r.digits]), [plainBefore.st, plainBefore.app, plainBefore.digits]);
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="set"} 0/);
        } finally {
          await setter.end();
          await plain.end();
        }
      });
    });

    it('carries a SET that ends in a -- comment without hiding what follows it when the sidecar replays it', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const setter = client(running);
        const other = client(running, { options: '-c search_path=pg_catalog,public' });
        await setter.connect();
        await other.connect();
        try {
          const defaultPath = (await setter.query<{ search_path: string }>('SHOW search_path')).rows[0]!.search_path;
          await setter.query('SET statement_timeout = 4321 -- why');
          // The one server connection takes the other client's search_path; the setter's replay must undo it.
          assert.equal((await other.query<{ search_path: string }>('SHOW search_path')).rows[0]!.search_path, 'pg_catalog,public');
          const r = await setter.query<{ st: string; path: string }>("SELECT current_setting('statement_timeout') AS st, current_setting('search_path') AS path");
          assert.deepEqual(r.rows[0], { st: '4321ms', path: defaultPath });
        } finally {
          await setter.end();
          await other.end();
        }
      });
    });

    it('takes a RESET ALL that a rollback undid for what it is: the client keeps its settings, and no other client gets them', async function () {
      await withSidecar(postgres, { grant: 2 }, async (running) => {
        const resetter = client(running, { options: '-c search_path=pg_catalog,public' });
        const plain = client(running);
        await resetter.connect();
        await plain.connect();
        const path = async (c: pg.Client): Promise<string> => (await c.query<{ search_path: string }>('SHOW search_path')).rows[0]!.search_path;
        try {
          const defaultPath = await path(plain);
          await resetter.query('SET statement_timeout = 4321');
          // Rolled back with the statement after it, as in a transaction block: the session keeps what it had, as direct.
          await assert.rejects(resetter.query('RESET ALL; SELECT 1/0'), (e: { code?: string }) => e.code === '22012');
          await resetter.query('BEGIN');
          await resetter.query('RESET ALL');
          await resetter.query('ROLLBACK');
          assert.equal(await path(plain), defaultPath, 'another client got the settings of the one whose RESET ALL was rolled back');
          assert.equal(await path(resetter), 'pg_catalog,public');
          assert.equal((await resetter.query<{ statement_timeout: string }>('SHOW statement_timeout')).rows[0]!.statement_timeout, '4321ms');
          assert.equal(await path(plain), defaultPath);
        } finally {
          await resetter.end();
          await plain.end();
        }
      });
    });

    it('does not carry a SET parsed as the unnamed statement but never bound (replaced by another unnamed Parse, or its batch ended), as direct', async function () {
      // libpq's pipeline mode: PQsendPrepare(conn, "", "SET ...") then PQsendQueryParams of something else
      // sends Parse(SET), Parse, Bind, Execute, Sync: the SET never runs, but a command completes in its batch.
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const w = await wireSession(running.port, running.role.user);
        const value = (row: Buffer): string => row.toString('utf8', 6, 6 + row.readInt32BE(2));
        const show = async (): Promise<[string, number]> => {
          w.send([serialize.query("SELECT current_setting('statement_timeout'), pg_backend_pid()")]);
          const row = (await w.until('D'))!;
          assert.ok(await w.until('Z'));
          const first = value(row);
          const pid = Number(row.toString('utf8', 6 + first.length + 4, 6 + first.length + 4 + row.readInt32BE(6 + first.length)));
          return [first, pid];
        };
        try {
          const [before] = await show();
          w.send([
            serialize.parse({ name: '', text: 'SET statement_timeout = 4321', types: [] }),
            serialize.parse({ name: '', text: 'SELECT 1', types: [] }),
            serialize.bind({}), serialize.execute({}), serialize.sync(),
          ]);
          assert.ok(await w.until('C'), 'SELECT 1 ran');
          assert.ok(await w.until('Z'));
          // Parsed, not bound, batch over.
          w.send([serialize.parse({ name: '', text: 'SET statement_timeout = 5432', types: [] }), serialize.sync()]);
          assert.ok(await w.until('Z'));
          const [same, pid] = await show();
          assert.equal(same, before);
          // Another backend: the sidecar gives it the client's settings, which must not include either SET.
          await observer.query('SELECT pg_terminate_backend($1)', [pid]);
          await new Promise((r) => setTimeout(r, 200));
          const [after, newPid] = await show();
          assert.notEqual(newPid, pid);
          assert.equal(after, before, 'a SET that never ran was replayed on the next server connection');
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="set"} 0/);
          // The same SET bound and run is carried.
          w.send([serialize.parse({ name: '', text: 'SET statement_timeout = 4321', types: [] }), serialize.bind({}), serialize.execute({}), serialize.sync()]);
          assert.ok(await w.until('Z'));
          await observer.query('SELECT pg_terminate_backend($1)', [newPid]);
          await new Promise((r) => setTimeout(r, 200));
          assert.equal((await show())[0], '4321ms');
        } finally {
          await w.closedWithin(0);
        }
      });
    });

    it('does not carry a SET of transaction_isolation, transaction_read_only or transaction_deferrable, which ends with its transaction as direct (replayed, it would fail the client)', async function () {
      // One server connection, and another client with other startup settings, so the setter's next transaction needs its settings applied.
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const setter = client(running);
        const other = client(running, { application_name: 'other' });
        await setter.connect();
        await other.connect();
        try {
          await setter.query("SET transaction_isolation = 'serializable'");
          await setter.query({ text: 'SET SESSION transaction_read_only = on', queryMode: 'extended' } as pg.QueryConfig);
          await setter.query('SET transaction_deferrable TO on');
          await setter.query('SET extra_float_digits = 2');
          await other.query('SELECT 1');
          const r = await setter.query<{ iso: string; ro: string; df: string; digits: string }>(
            "SELECT current_setting('transaction_isolation') AS iso, current_setting('transaction_read_only') AS ro, current_setting('transaction_deferrable') AS df, current_setting('extra_float_digits') AS digits");
          assert.deepEqual(r.rows[0], { iso: 'read committed', ro: 'off', df: 'off', digits: '2' });
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="set"} 0/);
        } finally {
          await setter.end();
          await other.end();
        }
      });
    });

    it('pins a client that SETs idle_session_timeout, so that the timeout ends the client\'s session as direct, not the pool\'s idle server connections', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const idler = client(running);
        const errors: string[] = [];
        idler.on('error', (e: Error & { code?: string }) => errors.push(e.code ?? e.message));
        await idler.connect();
        try {
          await idler.query('SET idle_session_timeout = 300');
          await new Promise((r) => setTimeout(r, 1000));
          assert.ok(errors.includes('57P05'), `the client's session should have ended as direct, got ${JSON.stringify(errors)}`);
          await assert.rejects(idler.query('SELECT 1'));
        } finally {
          await idler.end().catch(() => undefined);
        }
      });
    });

    it('pins a client that SETs temp_buffers, which a server connection that ever held a temporary table refuses (carried to one, it failed the client)', async function () {
      await withSidecar(postgres, { grant: 3 }, async (running) => {
        const setter = client(running);
        await setter.connect();
        try {
          await setter.query("SET temp_buffers = '32MB'");
          // Other clients use temporary tables at once, on every server connection the setter does not hold.
          await Promise.all(Array.from({ length: 3 }, async (_, i) => {
            const user = client(running);
            await user.connect();
            try {
              await user.query('BEGIN');
              await user.query(`CREATE TEMP TABLE scratch${i} (a int)`);
              await user.query(`INSERT INTO scratch${i} VALUES (1)`);
              await user.query('SELECT pg_sleep(0.3)');
              await user.query('COMMIT');
            } finally {
              await user.end();
            }
          }));
          await new Promise((r) => setTimeout(r, 200));
          assert.equal((await setter.query<{ temp_buffers: string }>('SHOW temp_buffers')).rows[0]!.temp_buffers, '32MB');
        } finally {
          await setter.end();
        }
      });
    });

    it('pins a client whose SET the replay would read otherwise: a backslash under standard_conforming_strings off, a change of client_encoding', async function () {
      await withSidecar(postgres, { grant: 3 }, async (running) => {
        const legacy = client(running);
        const latin = client(running);
        await legacy.connect();
        await latin.connect();
        try {
          await legacy.query('SET standard_conforming_strings = off');
          await legacy.query("SET application_name = 'a\\'b'");
          await latin.query("SET client_encoding = 'LATIN1'");
          // Others take the free server connections in turn, and bring their own settings to them.
          for (let i = 0; i < 3; i++) {
            const other = client(running, { options: '-c myapp.city=Z\u00fcrich' });
            await other.connect();
            try {
              assert.equal((await other.query<{ city: string }>("SELECT current_setting('myapp.city') AS city")).rows[0]!.city, 'Z\u00fcrich');
            } finally {
              await other.end();
            }
          }
          const r = await legacy.query<{ app: string; scs: string }>("SELECT current_setting('application_name') AS app, current_setting('standard_conforming_strings') AS scs");
          assert.deepEqual(r.rows[0], { app: "a'b", scs: 'off' });
          assert.equal((await latin.query<{ enc: string }>("SELECT current_setting('client_encoding') AS enc")).rows[0]!.enc, 'LATIN1');
        } finally {
          await legacy.end();
          await latin.end();
        }
      });
    });

    it('carries a SET of client_encoding to UTF-8 without pinning (ruby-pg sends one after connecting in every Rails application), and pins one to any other encoding', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const rails = client(running);
        const names = client(running);
        const other = client(running);
        await rails.connect();
        await names.connect();
        await other.connect();
        const encoding = async (c: pg.Client): Promise<string> => (await c.query<{ enc: string }>("SELECT current_setting('client_encoding') AS enc")).rows[0]!.enc;
        try {
          // libpq's PQsetClientEncoding, as ruby-pg and ActiveRecord call it.
          await rails.query("set client_encoding to 'UTF8'");
          await rails.query("set client_encoding to 'unicode'");
          await names.query("SET NAMES 'utf-8'");
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="set"} 0/);
          // One server connection, taken in turn: nobody holds it between statements.
          for (let round = 0; round < 3; round++) {
            assert.equal(await encoding(rails), 'UTF8', `round ${round}`);
            assert.equal(await encoding(other), 'UTF8', `round ${round}`);
            assert.equal(await encoding(names), 'UTF8', `round ${round}: the client's SET holds wherever it runs`);
            assert.equal((await names.query<{ city: string }>("SELECT 'Z\u00fcrich' AS city")).rows[0]!.city, 'Z\u00fcrich');
          }
          // To any other encoding it still pins.
          await other.query("SET client_encoding = 'LATIN1'");
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="set"} 1/);
        } finally {
          await rails.end();
          await names.end();
          await other.end();
        }
      });
    });

    it('applies a client\'s startup settings beyond ASCII as they are on a server connection another client left in LATIN1', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        // Its login check applies its settings, LATIN1 among them, to the one server connection.
        const latin1 = await rawExchange(running.port, buildStartupMessage({ user: running.role.user, database: 'app', client_encoding: 'LATIN1' }), 500);
        assert.ok(latin1.data.includes(Buffer.from('client_encoding\0LATIN1\0')));
        const zurich = client(running, { options: '-c myapp.city=Z\u00fcrich' });
        await zurich.connect();
        try {
          assert.deepEqual((await zurich.query<{ city: string; enc: string }>("SELECT current_setting('myapp.city') AS city, current_setting('client_encoding') AS enc")).rows[0], { city: 'Z\u00fcrich', enc: 'UTF8' });
        } finally {
          await zurich.end();
        }
      });
    });

    it('pins a client that SETs seed, so that its random() sequence goes on as direct and no other client draws from it', async function () {
      await observer.query('SET seed = 0.5');
      const direct: number[] = [];
      for (let i = 0; i < 3; i++) direct.push((await observer.query<{ r: number }>('SELECT random() AS r')).rows[0]!.r);
      await observer.query('RESET seed');
      await withSidecar(postgres, { grant: 2 }, async (running) => {
        const seeded = client(running);
        const other = client(running);
        await seeded.connect();
        await other.connect();
        try {
          await seeded.query('SET seed = 0.5');
          const seen: number[] = [];
          for (let i = 0; i < 3; i++) {
            seen.push((await seeded.query<{ r: number }>('SELECT random() AS r')).rows[0]!.r);
            const drawn = (await other.query<{ r: number }>('SELECT random() AS r')).rows[0]!.r;
            assert.ok(!direct.includes(drawn), 'another client drew from the seeded sequence');
          }
          assert.deepEqual(seen, direct);
        } finally {
          await seeded.end();
          await other.end();
        }
      });
    });

    it('never lets currval() or lastval() read another client\'s nextval(): a read its own server connection cannot answer is refused with an error saying why (DBD::Pg\'s last_insert_id)', async function () {
      const table = `pk_seq_${process.pid}_a`;
      await withSidecar(postgres, { grant: 3 }, async (running) => {
        await observer.query(`DROP TABLE IF EXISTS ${table}; CREATE TABLE ${table} (id serial PRIMARY KEY, who text); GRANT ALL ON ${table}, ${table}_id_seq TO ${running.role.user}`);
        const a = client(running);
        const b = client(running);
        const c = client(running);
        await a.connect();
        await b.connect();
        await c.connect();
        try {
          const insert = async (who: pg.Client, name: string): Promise<number> => (await who.query<{ id: number }>(`INSERT INTO ${table} (who) VALUES ($1) RETURNING id`, [name])).rows[0]!.id;
          const currval = `SELECT currval('${table}_id_seq')::int AS v`;
          // Each statement its own transaction: both on the one idle server connection, b's nextval after a's.
          const aId = await insert(a, 'a');
          const bId = await insert(b, 'b');
          // Direct, a reads its own id; the shared backend holds b's: a is told, not given b's.
          await assert.rejects(a.query(currval), (e: { code?: string; message: string }) => e.code === '0A000' && /currval\(\) and lastval\(\)/.test(e.message));
          assert.notEqual(aId, bId);
          // b's own values are on the connection it had alone: read as direct (and b stays there).
          assert.equal((await b.query<{ v: number }>(currval)).rows[0]!.v, bId);
          assert.equal((await b.query<{ v: number }>('SELECT lastval()::int AS v')).rows[0]!.v, bId);
          // In the transaction of its nextval, a read is always the client's own (whatever connection it moved from).
          await c.query('BEGIN');
          const cId = await insert(c, 'c');
          assert.equal((await c.query<{ v: number }>(currval)).rows[0]!.v, cId);
          await c.query('COMMIT');
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="sequence"} 2/);
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_errors_total'), /kind="sequence-read-refused"} 1/);
        } finally {
          await Promise.all([a.end(), b.end(), c.end()]);
          await observer.query(`DROP TABLE IF EXISTS ${table}`);
        }
      });
    });

    it('keeps currval() the client\'s own across transactions once it reads it: it gets its server connection back and is pinned there, so another client\'s nextval() never reaches it', async function () {
      const table = `pk_seq_${process.pid}_b`;
      await withSidecar(postgres, { grant: 2 }, async (running) => {
        await observer.query(`DROP TABLE IF EXISTS ${table}; CREATE TABLE ${table} (id serial PRIMARY KEY, who text); GRANT ALL ON ${table}, ${table}_id_seq TO ${running.role.user}`);
        const a = client(running);
        const b = client(running);
        await a.connect();
        await b.connect();
        try {
          const insert = async (who: pg.Client, name: string): Promise<number> => (await who.query<{ id: number }>(`INSERT INTO ${table} (who) VALUES ($1) RETURNING id`, [name])).rows[0]!.id;
          const read = async (who: pg.Client, named: boolean): Promise<number> => (await who.query<{ v: number }>(named ? { name: 'last-id', text: 'SELECT currval($1::regclass)::int AS v', values: [`${table}_id_seq`] } : { text: `SELECT currval('${table}_id_seq')::int AS v` })).rows[0]!.v;
          // a's nextval on one connection, b's transaction on the other, which ends last: the top of the idle stack.
          await a.query('BEGIN');
          await b.query('BEGIN');
          const { pid: aPid } = (await a.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!;
          let aId = await insert(a, 'a');
          await a.query('COMMIT');
          await b.query('COMMIT');
          // DBD::Pg's last_insert_id with AutoCommit on: its own transaction, a named statement; a gets its connection back.
          assert.equal(await read(a, true), aId);
          assert.equal((await a.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid, aPid);
          let bId = await insert(b, 'b');
          for (let round = 0; round < 3; round++) {
            aId = await insert(a, 'a');
            bId = await insert(b, 'b');
            assert.equal(await read(a, round % 2 === 0), aId, `round ${round}: a read another client's nextval`);
            assert.equal(await read(b, round % 2 === 1), bId, `round ${round}: b read another client's nextval`);
          }
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="sequence"} 2/);
        } finally {
          await Promise.all([a.end(), b.end()]);
          await observer.query(`DROP TABLE IF EXISTS ${table}`);
        }
      });
    });

    it('carries a SET pipelined behind a query still unanswered (postgres.js sends queries issued together so), and one pipelined inside a transaction block that commits', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const w = await wireSession(running.port, running.role.user);
        const timeout = async (): Promise<[string, number]> => {
          w.send([serialize.query("SELECT current_setting('statement_timeout') || ' ' || pg_backend_pid()")]);
          const row = (await w.until('D'))!;
          assert.ok(await w.until('Z'));
          const [value, pid] = row.toString('utf8', 6, 6 + row.readInt32BE(2)).split(' ');
          return [value!, Number(pid)];
        };
        const pinned = async (): Promise<string> => running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients');
        try {
          // One write: the SET's outcome is the second ReadyForQuery, not the first.
          w.send([serialize.query('SELECT pg_sleep(0.05)'), serialize.query('SET statement_timeout = 4321'), serialize.query('SELECT 1')]);
          for (let i = 0; i < 3; i++) assert.ok(await w.until('Z'), `ReadyForQuery ${i + 1}`);
          assert.match(await pinned(), /reason="set"} 0/);
          const [value, pid] = await timeout();
          assert.equal(value, '4321ms');
          await observer.query('SELECT pg_terminate_backend($1)', [pid]);
          await new Promise((r) => setTimeout(r, 200));
          assert.deepEqual((await timeout())[0], '4321ms', 'carried to the next backend');
          // A failing query ahead of it in the pipeline does not make the SET's outcome its own.
          w.send([serialize.query('SELECT 1/0'), serialize.query('SET statement_timeout = 1234')]);
          assert.ok(await w.until('Z'));
          assert.ok(await w.until('Z'));
          assert.match(await pinned(), /reason="set"} 0/);
          const [failedAhead, failedPid] = await timeout();
          assert.equal(failedAhead, '1234ms');
          await observer.query('SELECT pg_terminate_backend($1)', [failedPid]);
          await new Promise((r) => setTimeout(r, 200));
          assert.equal((await timeout())[0], '1234ms', 'carried to the next backend too');
          // Inside a transaction block, pipelined: carried once the block commits.
          w.send([serialize.query('BEGIN'), serialize.query('SET statement_timeout = 5555'), serialize.query('COMMIT')]);
          for (let i = 0; i < 3; i++) assert.ok(await w.until('Z'));
          assert.match(await pinned(), /reason="set"} 0/);
          const [inBlock, blockPid] = await timeout();
          assert.equal(inBlock, '5555ms');
          await observer.query('SELECT pg_terminate_backend($1)', [blockPid]);
          await new Promise((r) => setTimeout(r, 200));
          assert.equal((await timeout())[0], '5555ms', 'carried from the committed block to the next backend');
        } finally {
          await w.closedWithin(0);
        }
      });
    });

    it('carries a SET inside a transaction block that commits, drops one rolled back, and pins one a savepoint rollback leaves in doubt', async function () {
      await withSidecar(postgres, { grant: 2 }, async (running) => {
        const setter = client(running);
        const others = Array.from({ length: 4 }, () => client(running));
        await setter.connect();
        await Promise.all(others.map((c) => c.connect()));
        const timeout = async (c: pg.Client): Promise<string> => (await c.query<{ statement_timeout: string }>('SHOW statement_timeout')).rows[0]!.statement_timeout;
        const pinned = async (): Promise<string> => running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients');
        try {
          // pgjdbc with autocommit off (Hibernate's setSchema per session) sends its SETs inside the transaction.
          await setter.query('BEGIN');
          await setter.query('SET statement_timeout = 4321');
          await setter.query({ text: "SET application_name = 'in-block'", queryMode: 'extended' } as pg.QueryConfig);
          await setter.query('COMMIT');
          assert.match(await pinned(), /reason="set"} 0/);
          for (let round = 0; round < 5; round++) {
            const [own, ...seen] = await Promise.all([setter, ...others].map((c) => timeout(c)));
            assert.equal(own, '4321ms');
            for (const t of seen) assert.equal(t, '0');
          }
          assert.equal((await setter.query<{ a: string }>("SELECT current_setting('application_name') AS a")).rows[0]!.a, 'in-block');
          await setter.query('BEGIN');
          await setter.query('SET statement_timeout = 1111');
          await setter.query('ROLLBACK');
          assert.equal(await timeout(setter), '4321ms', 'rolled back with its transaction, as direct');
          assert.match(await pinned(), /reason="set"} 0/);
          // Undone by a savepoint rollback, or not: only its server connection knows.
          await setter.query('BEGIN');
          await setter.query('SAVEPOINT s');
          await setter.query('SET statement_timeout = 2222');
          await setter.query('ROLLBACK TO SAVEPOINT s');
          await setter.query('COMMIT');
          assert.match(await pinned(), /reason="set"} 1/);
          assert.equal(await timeout(setter), '4321ms');
          const seen = await Promise.all(others.map((c) => timeout(c)));
          for (const t of seen) assert.equal(t, '0');
          await setter.end();
          await new Promise((r) => setTimeout(r, 100));
          const after = await Promise.all(others.map((c) => timeout(c)));
          for (const t of after) assert.equal(t, '0');
        } finally {
          await Promise.all(others.map((c) => c.end()));
        }
      });
    });

    it('pins on session state a first-word reader would miss: set_config(..., false), a DO block, SELECT INTO TEMP, a later statement of a multi-statement Query', async function () {
      const ways: [string, string, string][] = [
        ["SELECT set_config('statement_timeout', '4321', false), 1", 'set', 'SHOW statement_timeout'],
        ["DO $$ BEGIN PERFORM set_config('statement_timeout', '4321', false); END $$", 'set', 'SHOW statement_timeout'],
        ['SELECT 1; SET statement_timeout = 4321', 'set', 'SHOW statement_timeout'],
        ['/* app=web */ SET statement_timeout = 4321; SELECT 1', 'set', 'SHOW statement_timeout'],
        ['SELECT 1 AS a INTO TEMP leftover', 'temp-table', "SELECT count(*)::text AS statement_timeout FROM pg_class WHERE relname = 'leftover' AND relpersistence = 't'"],
      ];
      // One server connection: without the pin, the next client would get the same backend and see what was left.
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        for (const [sql, reason, check] of ways) {
          const setter = client(running);
          await setter.connect();
          await setter.query(sql);
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), new RegExp(`reason="${reason}"} 1`), sql);
          if (check.startsWith('SHOW')) assert.equal((await setter.query<{ statement_timeout: string }>(check)).rows[0]!.statement_timeout, '4321ms', sql);
          await setter.end();
          const next = client(running);
          await next.connect();
          const seen = (await next.query<{ statement_timeout: string }>(check)).rows[0]!.statement_timeout;
          assert.equal(seen, '0', `${sql}: the next client saw ${seen}`);
          await next.end();
        }
      });
    });

    it('does not pin RESET ALL (asyncpg sends it when its pool takes a connection back) and gives each client its own settings after it', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const withTimeout = client(running, { options: '-c statement_timeout=1234' });
        await withTimeout.connect();
        try {
          await withTimeout.query('SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;');
          await withTimeout.query('RESET ALL');
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="set"} 0/);
          // Its next transaction gets its startup setting back, as RESET ALL gives it direct.
          assert.equal((await withTimeout.query<{ statement_timeout: string }>('SHOW statement_timeout')).rows[0]!.statement_timeout, '1234ms');
        } finally {
          await withTimeout.end();
        }
        const plain = client(running);
        await plain.connect();
        try {
          assert.equal((await plain.query<{ statement_timeout: string }>('SHOW statement_timeout')).rows[0]!.statement_timeout, '0');
        } finally {
          await plain.end();
        }
      });
    });

    it('reports a client\'s startup values again after RESET ALL, DISCARD ALL or RESET name, as its session would direct, not the server connection\'s', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const c = client(running, { application_name: 'restate-web', options: '-c TimeZone=Asia/Tokyo' });
        const reported = new Map<string, string>();
        (c as unknown as { connection: { on(event: 'parameterStatus', listener: (m: { parameterName: string; parameterValue: string }) => void): void } }).connection
          .on('parameterStatus', (m) => reported.set(m.parameterName, m.parameterValue));
        await c.connect();
        try {
          for (const sql of ['RESET ALL', 'DISCARD ALL', 'RESET application_name', 'RESET TimeZone', 'SET TimeZone TO DEFAULT']) {
            await c.query(sql);
            await c.query('SELECT 1');
            // Direct, the session's default is its startup value: nothing changes, or it is reported as that.
            assert.deepEqual([reported.get('application_name'), reported.get('TimeZone')], ['restate-web', 'Asia/Tokyo'], sql);
            const shown = (await c.query<{ a: string; t: string }>("SELECT current_setting('application_name') AS a, current_setting('TimeZone') AS t")).rows[0];
            assert.deepEqual(shown, { a: 'restate-web', t: 'Asia/Tokyo' }, sql);
          }
        } finally {
          await c.end();
        }
      });
    });

    it('reports a client\'s startup values again before the ReadyForQuery of its RESET, RESET ALL or DISCARD ALL, where a direct backend reports them', async function () {
      // A driver reads its record once the command returns (asyncpg's get_settings() right after
      // `await con.execute('RESET ALL')`): a value reported after the ReadyForQuery comes too late.
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const c = client(running, { application_name: 'restate-ready', options: '-c TimeZone=Asia/Tokyo' });
        const reported = new Map<string, string>();
        const atReady: (string | undefined)[][] = [];
        const connection = (c as unknown as { connection: { on(event: string, listener: (m: { parameterName: string; parameterValue: string }) => void): void } }).connection;
        connection.on('parameterStatus', (m) => reported.set(m.parameterName, m.parameterValue));
        connection.on('readyForQuery', () => atReady.push([reported.get('application_name'), reported.get('TimeZone')]));
        await c.connect();
        try {
          for (const sql of ['SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;', 'RESET ALL', 'DISCARD ALL', 'RESET application_name', 'RESET TimeZone', 'SET TimeZone TO DEFAULT']) {
            atReady.length = 0;
            await c.query(sql);
            assert.deepEqual(atReady, [['restate-ready', 'Asia/Tokyo']], sql);
          }
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="set"} 0/);
        } finally {
          await c.end();
        }
      });
    });

    it('keeps set_config(..., true) unpinned: it ends with the transaction', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const c = client(running);
        await c.connect();
        try {
          await c.query("SELECT set_config('statement_timeout', '4321', true)");
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="set"} 0/);
        } finally {
          await c.end();
        }
      });
    });

    it('delivers NOTIFY to clients that LISTEN, through one listening connection, without pinning them', async function () {
      await withSidecar(postgres, { grant: 3 }, async (running) => {
        const listeners = [client(running), client(running)];
        const notifier = client(running);
        await Promise.all([...listeners, notifier].map((c) => c.connect()));
        try {
          const received: string[][] = [[], []];
          listeners.forEach((c, i) => c.on('notification', (n) => received[i]!.push(`${n.channel}:${n.payload ?? ''}`)));
          await listeners[0]!.query('LISTEN orders');
          await listeners[1]!.query('LISTEN "Orders"');
          await listeners[1]!.query('LISTEN orders');
          // Listeners keep running transactions on the shared connections meanwhile.
          for (let i = 0; i < 5; i++) {
            await notifier.query(`NOTIFY orders, 'n${i}'`);
            await Promise.all(listeners.map((c) => c.query('SELECT 1')));
          }
          await notifier.query(`SELECT pg_notify('Orders', 'upper')`);
          const started = Date.now();
          while ((received[0]!.length < 5 || received[1]!.length < 6) && Date.now() - started < 3000) await new Promise((r) => setTimeout(r, 20));
          assert.deepEqual(received[0], ['orders:n0', 'orders:n1', 'orders:n2', 'orders:n3', 'orders:n4']);
          assert.deepEqual([...received[1]!].sort(), ['Orders:upper', 'orders:n0', 'orders:n1', 'orders:n2', 'orders:n3', 'orders:n4']);
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="listen"} 0/);
          // UNLISTEN ends delivery to that client only.
          await listeners[0]!.query('UNLISTEN orders');
          await notifier.query(`NOTIFY orders, 'after'`);
          await new Promise((r) => setTimeout(r, 300));
          assert.equal(received[0].length, 5);
          assert.ok(received[1]!.includes('orders:after'));
          // LISTEN inside a transaction block keeps PostgreSQL's semantics on the client's own connection.
          await listeners[0]!.query('BEGIN');
          await listeners[0]!.query('LISTEN inside');
          await listeners[0]!.query('COMMIT');
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="listen"} 1/);
          // The listening connection counts against the grant: never more than 3 backends.
          assert.ok(running.sidecar.status().heldConnections <= 3);
        } finally {
          await Promise.all([...listeners, notifier].map((c) => c.end()));
        }
      });
    });

    it('ends a client\'s channels on the listening connection at an UNLISTEN that goes to its server connection: pipelined behind its earlier statement (tokio-postgres closes each statement it ran), in a block, pinned; and keeps them when its transaction rolls back', async function () {
      await withSidecar(postgres, { grant: 3 }, async (running) => {
        const notifier = client(running);
        await notifier.connect();
        const sessions: WireSession[] = [];
        try {
          const cases: [string, Buffer[][]][] = [
            // The UNLISTEN arrives while the client still holds a server connection for the Close before it.
            ['pipelined', [[serialize.parse({ name: 's0', text: 'SELECT 1' }), serialize.sync()], [serialize.close({ type: 'S', name: 's0' }), serialize.sync(), serialize.query('UNLISTEN pipelined')]]],
            ['in_block', [[serialize.query('BEGIN')], [serialize.query('UNLISTEN in_block')], [serialize.query('COMMIT')]]],
            ['pinned', [[serialize.query('SELECT 1; SET application_name = \'pinned\'')], [serialize.query('UNLISTEN pinned')]]],
            ['star_beside', [[serialize.query('SELECT 1; UNLISTEN *')]]],
          ];
          // PostgreSQL applies an UNLISTEN when its transaction commits: rolled back, the channel still delivers.
          const undone: [string, Buffer[][]][] = [
            ['rolled_back', [[serialize.query('BEGIN')], [serialize.query('UNLISTEN rolled_back')], [serialize.query('ROLLBACK')]]],
            ['failed_block', [[serialize.query('BEGIN; UNLISTEN failed_block')], [serialize.query('SELECT 1/0')], [serialize.query('COMMIT')]]],
          ];
          for (const [channel, steps] of cases) {
            const w = await wireSession(running.port, running.role.user);
            sessions.push(w);
            w.send([serialize.query(`LISTEN ${channel}`)]);
            assert.equal(await w.replies(1, 50), 'CZI', `${channel}: LISTEN`);
            await notifier.query(`NOTIFY ${channel}, 'before'`);
            assert.ok(await w.until('A'), `${channel}: the notification before UNLISTEN`);
            for (const step of steps) {
              w.send(step);
              const replies = await w.replies(step.filter((m) => m[0] === 0x51 || m[0] === 0x53).length, 50);
              assert.ok(!replies.includes('E') && !replies.includes('A'), `${channel}: ${replies}`);
            }
            await notifier.query(`NOTIFY ${channel}, 'after'`);
            assert.equal(await w.until('A', 500), undefined, `${channel}: a notification after UNLISTEN`);
          }
          for (const [channel, steps] of undone) {
            const w = await wireSession(running.port, running.role.user);
            sessions.push(w);
            w.send([serialize.query(`LISTEN ${channel}`)]);
            assert.equal(await w.replies(1, 50), 'CZI', `${channel}: LISTEN`);
            for (const step of steps) {
              w.send(step);
              await w.replies(step.filter((m) => m[0] === 0x51 || m[0] === 0x53).length, 50);
            }
            await notifier.query(`NOTIFY ${channel}, 'after'`);
            assert.ok(await w.until('A', 2000), `${channel}: the notification after an UNLISTEN that was rolled back`);
          }
        } finally {
          await notifier.end();
          for (const w of sessions) {
            w.send([serialize.end()]);
            await w.closedWithin(1000);
          }
        }
      });
    });

    it('delivers a notification committed before a listening client\'s next statement ahead of that statement\'s answer, as PostgreSQL does', async function () {
      await withSidecar(postgres, { grant: 3 }, async (running) => {
        const listener = client(running);
        const notifier = client(running);
        await Promise.all([listener, notifier].map((c) => c.connect()));
        try {
          const received: string[] = [];
          listener.on('notification', (n) => received.push(n.payload ?? ''));
          await listener.query('LISTEN ordering');
          // pgx's TestConnOnNotification: NOTIFY from another client, then any statement; the notification must be in by its end.
          const late: number[] = [];
          for (let i = 0; i < 100; i++) {
            await notifier.query(`NOTIFY ordering, 'n${i}'`);
            // A simple Query, and an extended one (several messages that wait for the listening connection's answer together).
            const answered = i % 2 === 0 ? listener.query<{ n: number }>('SELECT 1 AS n') : listener.query<{ n: number }>('SELECT $1::int AS n', [i]);
            const result = await Promise.race([answered, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`statement ${i} of the listener got no answer`)), 5000).unref())]);
            assert.equal(result.rows[0]!.n, i % 2 === 0 ? 1 : i);
            if (!received.includes(`n${i}`)) late.push(i);
          }
          assert.deepEqual(late, [], 'notifications that came after the next statement\'s answer');
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="listen"} 0/);
          // Pinned later by session state, the client keeps its server connection and still gets them, as promptly.
          await listener.query('SET application_name = \'pinned listener\'');
          const latePinned: number[] = [];
          for (let i = 0; i < 20; i++) {
            await notifier.query(`NOTIFY ordering, 'p${i}'`);
            await listener.query('SELECT 1');
            if (!received.includes(`p${i}`)) latePinned.push(i);
          }
          assert.deepEqual(latePinned, [], 'notifications to the pinned client that came late or never');
          // UNLISTEN: what was notified before it still arrives, by the time it is answered (lib/pq's TestListenerUnlisten).
          const unlistener = client(running);
          await unlistener.connect();
          try {
            const got: string[] = [];
            unlistener.on('notification', (n) => got.push(n.payload ?? ''));
            const lost: number[] = [];
            for (let i = 0; i < 30; i++) {
              await unlistener.query('LISTEN again');
              await notifier.query(`NOTIFY again, 'u${i}'`);
              await unlistener.query('UNLISTEN again');
              if (!got.includes(`u${i}`)) lost.push(i);
            }
            assert.deepEqual(lost, [], 'notifications sent before UNLISTEN that never came');
          } finally {
            await unlistener.end();
          }
          // And while idle, at once.
          await notifier.query(`NOTIFY ordering, 'idle'`);
          const started = Date.now();
          while (!received.includes('idle') && Date.now() - started < 3000) await new Promise((r) => setTimeout(r, 10));
          assert.ok(received.includes('idle'), 'an idle pinned client gets notifications');
        } finally {
          await Promise.all([listener, notifier].map((c) => c.end()));
        }
      });
    });

    it('delivers a listening client\'s own NOTIFY before the answer of the transaction that sent it, as PostgreSQL does', async function () {
      await withSidecar(postgres, { grant: 3 }, async (running) => {
        const listener = client(running);
        await listener.connect();
        try {
          const received: string[] = [];
          listener.on('notification', (n) => received.push(n.payload ?? ''));
          await listener.query('LISTEN own');
          // psycopg's test_notify_handlers: LISTEN, NOTIFY, and the notification is there once the NOTIFY returns.
          const late: string[] = [];
          const steps: [string, (i: number) => Promise<unknown>][] = [
            ['simple', (i) => listener.query(`NOTIFY own, 's${i}'`)],
            ['extended', (i) => listener.query('SELECT pg_notify($1, $2)', ['own', `e${i}`])],
            ['block', (i) => listener.query(`BEGIN; NOTIFY own, 'b${i}'; COMMIT`)],
          ];
          for (let i = 0; i < 40; i++) {
            for (const [name, step] of steps) {
              await step(i);
              const payload = `${name[0]}${i}`;
              if (!received.includes(payload)) late.push(payload);
            }
          }
          assert.deepEqual(late, [], 'own notifications that came after the answer of the statement that sent them');
          assert.match(await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients'), /reason="listen"} 0/);
          // A notification of a channel the client does not listen on never comes, and its answer is not held up.
          await listener.query(`NOTIFY elsewhere, 'x'`);
          await listener.query('SELECT 1');
          assert.ok(!received.includes('x'));
          // A Terminate sent as soon as the NOTIFY's CommandComplete arrives: the rest of its answer
          // (the notification, then ReadyForQuery) still comes before the close, as direct.
          const query = (sql: string): Buffer => {
            const body = Buffer.from(`${sql}\0`);
            const head = Buffer.alloc(5);
            head[0] = 0x51;
            head.writeInt32BE(body.length + 4, 1);
            return Buffer.concat([head, body]);
          };
          const cut: string[] = [];
          for (let i = 0; i < 20; i++) {
            const types = await new Promise<string>((resolve, reject) => {
              const socket = netConnect({ host: '127.0.0.1', port: running.port });
              let seen = Buffer.alloc(0);
              let parsed = 0;
              let kinds = '';
              let step = 0;
              socket.on('data', (chunk: Buffer) => {
                seen = Buffer.concat([seen, chunk]);
                while (seen.length - parsed >= 5 && seen.length - parsed >= 1 + seen.readInt32BE(parsed + 1)) {
                  const type = String.fromCharCode(seen[parsed]!);
                  parsed += 1 + seen.readInt32BE(parsed + 1);
                  if (step === 2) kinds += type;
                  if (type === 'Z' && step < 2) socket.write(query(step++ === 0 ? 'LISTEN own_terminate' : `NOTIFY own_terminate, 't${i}'`));
                  else if (type === 'C' && step === 2) socket.write(Buffer.from([0x58, 0, 0, 0, 4]));
                }
              });
              socket.on('error', reject);
              socket.on('close', () => resolve(kinds));
              socket.write(buildStartupMessage({ user: running.role.user, database: 'app' }));
            });
            if (types !== 'CAZ') cut.push(types);
          }
          assert.deepEqual(cut, [], 'answers to a NOTIFY followed by a Terminate that did not end with the notification and ReadyForQuery');
        } finally {
          await listener.end();
        }
      });
    });

    it('serves DEALLOCATE and DEALLOCATE ALL sent as SQL without breaking other clients\' named statements', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const a = client(running);
        const b = client(running);
        await a.connect();
        await b.connect();
        try {
          const named = { name: 'q_shared', text: 'SELECT $1::int + 1 AS n', values: [1] };
          assert.equal((await a.query<{ n: number }>(named)).rows[0]!.n, 2);
          assert.equal((await b.query<{ n: number }>({ ...named, values: [2] })).rows[0]!.n, 3);
          // A drops its statement by SQL: B's, shared on the server, stays usable.
          await a.query('DEALLOCATE q_shared');
          await assert.rejects(a.query('DEALLOCATE q_shared'), (e: { code?: string }) => e.code === '26000');
          assert.equal((await b.query<{ n: number }>({ ...named, values: [5] })).rows[0]!.n, 6);
          // DEALLOCATE ALL from A on the only server connection: B's statement is prepared again for it.
          await a.query('DEALLOCATE ALL');
          for (let i = 0; i < 5; i++) assert.equal((await b.query<{ n: number }>({ ...named, values: [i] })).rows[0]!.n, i + 1);
          await a.query('DISCARD ALL');
          assert.equal((await b.query<{ n: number }>({ ...named, values: [9] })).rows[0]!.n, 10);
        } finally {
          await a.end();
          await b.end();
        }
      });
    });

    it('lets a new client prepare a statement another prepared before a schema change', async function () {
      await observer.query('DROP TABLE IF EXISTS pk_schema_change; CREATE TABLE pk_schema_change (a int); INSERT INTO pk_schema_change VALUES (1); GRANT ALL ON pk_schema_change TO app');
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const a = client(running);
        await a.connect();
        assert.deepEqual((await a.query({ name: 'sa', text: 'SELECT * FROM pk_schema_change' })).rows, [{ a: 1 }]);
        await observer.query('ALTER TABLE pk_schema_change ALTER COLUMN a TYPE bigint');
        const b = client(running);
        await b.connect();
        try {
          assert.deepEqual((await b.query({ name: 'sb', text: 'SELECT * FROM pk_schema_change' })).rows, [{ a: '1' }]);
        } finally {
          await a.end();
          await b.end();
        }
      });
    });
  });

  describe('cancels', function () {
    /** Sends a CancelRequest with a wire session's key; resolves with what came back on the cancel connection once the sidecar closed it, and when. */
    const cancelWire = (port: number, key: Buffer): Promise<{ reply: Buffer; closedAt: number }> => new Promise((resolve) => {
      const chunks: Buffer[] = [];
      const socket = netConnect({ host: '127.0.0.1', port });
      socket.on('data', (c: Buffer) => chunks.push(c));
      socket.on('error', () => undefined);
      socket.on('close', () => resolve({ reply: Buffer.concat(chunks), closedAt: Date.now() }));
      socket.write(buildSpecialRequest(CANCEL_REQUEST_CODE, key.readInt32BE(0), key.subarray(4, 8)));
    });
    const metric = async (running: TestSidecar, pattern: RegExp): Promise<number> => Number(pattern.exec(await running.registry.metrics())?.[1] ?? -1);

    it('answers at once a cancel of a statement still waiting for a server connection (a simple Query, an extended batch), with PostgreSQL\'s error; the statement never runs and the client goes on', async function () {
      // PostgreSQL's own error for a cancelled statement, as the reference.
      const direct = new pg.Client({ host: '127.0.0.1', port: postgres.port, user: postgres.app.user, password: postgres.app.password, database: 'app' });
      await direct.connect();
      const cancelled = direct.query('SELECT pg_sleep(5)').then(() => undefined, (e: pg.DatabaseError) => e);
      await new Promise((r) => setTimeout(r, 200));
      await sendCancel(postgres.port, direct);
      const reference = (await cancelled)!;
      await direct.end();
      assert.equal(reference.code, '57014');
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const holder = client(running);
        await holder.connect();
        const w = await wireSession(running.port, running.role.user);
        try {
          const batches: [string, Buffer[]][] = [
            ['simple Query', [serialize.query('SELECT pg_sleep(5)')]],
            ['extended batch', [serialize.parse({ name: '', text: 'SELECT pg_sleep(5)', types: [] }), serialize.bind({}), serialize.describe({ type: 'P', name: '' }), serialize.execute({}), serialize.sync()]],
          ];
          for (const [name, batch] of batches) {
            // The one server connection runs a long statement: the client's waits in the sidecar.
            const holding = holder.query('SELECT pg_sleep(1.5)');
            await new Promise((r) => setTimeout(r, 200));
            w.send(batch);
            await new Promise((r) => setTimeout(r, 200));
            assert.equal(await metric(running, /poolkeeper_sidecar_clients\{state="waiting"\} (\d+)/), 1, `${name}: queued`);
            const timedBefore = await metric(running, /poolkeeper_sidecar_client_wait_seconds_count (\d+)/);
            const sent = Date.now();
            const { reply, closedAt } = await cancelWire(running.port, w.key);
            assert.equal(reply.length, 0, `${name}: the cancel connection is closed without a reply, as PostgreSQL closes it`);
            const error = await w.until('E', 1000);
            assert.ok(error, `${name}: no 57014 while the grant is busy`);
            assert.ok(Date.now() - sent < 500, `${name}: answered after ${Date.now() - sent} ms (poolTimeout is 10 s, the holder sleeps 1.5 s)`);
            assert.ok(closedAt - sent < 500, `${name}: cancel connection closed after ${closedAt - sent} ms`);
            const fields = parseNoticeFields(error);
            assert.deepEqual({ ...fields, L: undefined }, { S: reference.severity, V: reference.severity, C: '57014', M: reference.message, F: reference.file, L: undefined, R: reference.routine }, `${name}: the fields PostgreSQL sends`);
            assert.equal((await w.until('Z', 1000))?.toString(), 'I', `${name}: ReadyForQuery idle`);
            // Out of the queue: the client waits for nothing, and no server connection is taken for it later.
            assert.equal(await metric(running, /poolkeeper_sidecar_clients\{state="waiting"\} (\d+)/), 0, `${name}: still queued`);
            await holding;
            assert.equal(await w.replies(0, 300), '', `${name}: the cancelled statement was sent after all`);
            // A wait that ended in a cancel is not a wait for a server connection that came (nor is a poolTimeout's).
            assert.equal(await metric(running, /poolkeeper_sidecar_client_wait_seconds_count (\d+)/), timedBefore, `${name}: a server connection was handed out meanwhile`);
            // The next statement runs as usual.
            w.send([serialize.query('SELECT 42')]);
            assert.equal(await w.replies(1), 'TDCZI', `${name}: the next statement`);
          }
          assert.equal(await metric(running, /poolkeeper_sidecar_cancel_requests_total\{result="answered"\} (\d+)/), 2);
        } finally {
          await holder.end();
          w.send([serialize.end()]);
          await w.closedWithin(2000);
        }
      });
    });

    it('a driver\'s cancel (node-postgres) of its statement queued behind a busy grant gets 57014 at once; its next statement runs', async function () {
      await withSidecar(postgres, { grant: 2 }, async (running) => {
        const holders = [client(running), client(running)];
        const waiter = client(running);
        await Promise.all([...holders, waiter].map((c) => c.connect()));
        try {
          const holding = holders.map((h) => h.query('SELECT pg_sleep(2)'));
          await new Promise((r) => setTimeout(r, 200));
          const started = Date.now();
          const sleeping = waiter.query('SELECT pg_sleep(5)').then(() => 'completed', (e: Error & { code?: string }) => e.code ?? e.message);
          await new Promise((r) => setTimeout(r, 100));
          await sendCancel(running.port, waiter);
          assert.equal(await sleeping, '57014');
          assert.ok(Date.now() - started < 1000, `cancelled after ${Date.now() - started} ms, while the grant was busy`);
          assert.equal((await waiter.query<{ n: number }>('SELECT 1 AS n')).rows[0]!.n, 1, 'the next statement is not cancelled');
          await Promise.all(holding);
        } finally {
          await Promise.all([...holders, waiter].map((c) => c.end()));
        }
      });
    });

    it('held messages it cannot answer as PostgreSQL would (two Queries pipelined) keep waiting: the first is cancelled once it reaches a server connection (lib/pq\'s TestContextCancelQuery), the second runs', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const holder = client(running);
        await holder.connect();
        const w = await wireSession(running.port, running.role.user);
        try {
          await holder.query('BEGIN');
          w.send([serialize.query('SELECT pg_sleep(5)'), serialize.query('SELECT 2')]);
          await new Promise((r) => setTimeout(r, 200));
          const { reply } = await cancelWire(running.port, w.key);
          assert.equal(reply.length, 0);
          assert.equal(await w.replies(0, 300), '', 'answered while no server connection was free');
          const started = Date.now();
          await holder.query('COMMIT');
          assert.equal(await w.replies(2), 'TEZITDCZI');
          assert.ok(Date.now() - started < 3000, 'cancelled, not run to its end');
          assert.equal(await metric(running, /poolkeeper_sidecar_cancel_requests_total\{result="answered"\} (\d+)/), -1, 'not answered by the sidecar');
        } finally {
          await holder.end();
          w.send([serialize.end()]);
          await w.closedWithin(2000);
        }
      });
    });

    it('a cancelled client whose server connection was being checked before use (pre-ping) gets none: the connection goes to the next client waiting', async function () {
      const proxy = new TcpProxy(postgres.host, postgres.port);
      const port = await proxy.start();
      try {
        await withSidecar(postgres, { grant: 1, pool: { poolPrePing: true, poolTimeout: 4 }, settings: { prePingAfterIdle: 0.1, database: { host: '127.0.0.1', port, dbname: 'app', sslMode: 'disable' } } }, async (running) => {
          const w = await wireSession(running.port, running.role.user);
          const next = client(running);
          await next.connect();
          try {
            w.send([serialize.query('SELECT 1')]);
            assert.equal(await w.replies(1), 'TDCZI');
            await new Promise((r) => setTimeout(r, 300));
            // The idle connection's pre-ping is not answered yet: the client's statement waits on its check.
            proxy.hold();
            w.send([serialize.query('SELECT pg_sleep(5)')]);
            await new Promise((r) => setTimeout(r, 200));
            await cancelWire(running.port, w.key);
            assert.equal(await w.replies(1, 0), 'EZI', 'the cancelled statement is answered while its connection is checked');
            const served = next.query<{ n: number }>('SELECT 3 AS n');
            await new Promise((r) => setTimeout(r, 200));
            proxy.deliver();
            const started = Date.now();
            assert.equal((await served).rows[0]!.n, 3, 'the next client waiting got the checked connection');
            assert.ok(Date.now() - started < 2000, `served after ${Date.now() - started} ms`);
            w.send([serialize.query('SELECT 4')]);
            assert.equal(await w.replies(1), 'TDCZI', 'the cancelled client goes on');
          } finally {
            proxy.deliver();
            await next.end();
            w.send([serialize.end()]);
            await w.closedWithin(2000);
          }
        });
      } finally {
        await proxy.stop();
      }
    });

    for (const mode of ['transaction', 'session'] as const) {
      it(`cancels only the statement in flight, never a bystander's (${mode} mode, random cancels)`, async function () {
        this.timeout(60_000);
        // Session mode lends a server connection per client: one each, as direct.
        await withSidecar(postgres, { grant: mode === 'session' ? 9 : 4, mode }, async (running) => {
          const target = client(running);
          const bystanders = Array.from({ length: 8 }, () => client(running));
          await target.connect();
          await Promise.all(bystanders.map((c) => c.connect()));
          let stop = false;
          let bystanderCancelled = 0;
          let bystanderStatements = 0;
          let targetCancelled = 0;
          let targetStatements = 0;
          let cancels = 0;
          const loop = async (c: pg.Client, onCancel: () => void, onDone: () => void): Promise<void> => {
            while (!stop) {
              try {
                await c.query('SELECT pg_sleep(0.01)');
              } catch (error) {
                if ((error as { code?: string }).code === '57014') onCancel();
                else throw error;
              }
              onDone();
            }
          };
          const loops = [
            loop(target, () => targetCancelled++, () => targetStatements++),
            ...bystanders.map((c) => loop(c, () => bystanderCancelled++, () => bystanderStatements++)),
          ];
          const canceller = (async () => {
            const until = Date.now() + 15_000;
            while (Date.now() < until && cancels < 150) {
              await new Promise((r) => setTimeout(r, Math.random() * 15));
              await sendCancel(running.port, target);
              cancels++;
            }
          })();
          await canceller;
          stop = true;
          await Promise.all(loops);
          await target.end();
          await Promise.all(bystanders.map((c) => c.end()));
          assert.ok(cancels >= 100, `only ${cancels} cancels sent`);
          assert.ok(bystanderStatements > 100, `bystanders ran only ${bystanderStatements} statements`);
          assert.equal(bystanderCancelled, 0, `${bystanderCancelled} bystander statements cancelled (${cancels} cancels)`);
          const counted = await running.registry.metrics();
          const forwarded = Number(/poolkeeper_sidecar_cancel_requests_total\{result="forwarded"\} (\d+)/.exec(counted)?.[1] ?? 0);
          // A statement still waiting for a server connection is answered by the sidecar itself.
          const answered = Number(/poolkeeper_sidecar_cancel_requests_total\{result="answered"\} (\d+)/.exec(counted)?.[1] ?? 0);
          // PostgreSQL signals a cancelled backend twice (its pid and its process group), so now
          // and then one cancel also ends the next statement, direct as well (about 1.1 per cancel here).
          assert.ok(targetCancelled > 0 && forwarded + answered <= cancels && targetCancelled <= forwarded * 1.5 + answered, `target: ${targetCancelled} cancelled of ${targetStatements} statements, ${forwarded} forwarded, ${answered} answered, ${cancels} sent`);
        });
      });
    }
  });

  describe('backend identity', function () {
    const keysOf = (c: pg.Client): { processID: number; secretKey: number } => c as unknown as { processID: number; secretKey: number };
    const backendPid = async (c: pg.Client): Promise<number> => (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;

    it('session mode: BackendKeyData carries the pid of the client\'s own backend; NOTIFY, cancel and pg_terminate_backend agree with it', async function () {
      await withSidecar(postgres, { grant: 3, mode: 'session' }, async (running) => {
        const a = client(running);
        const b = client(running);
        await Promise.all([a.connect(), b.connect()]);
        try {
          const [pidA, pidB] = [await backendPid(a), await backendPid(b)];
          assert.deepEqual([keysOf(a).processID, keysOf(b).processID], [pidA, pidB], 'PQbackendPID must be pg_backend_pid(), as direct');
          // The secret is the sidecar's own, never the server's.
          const serverSecrets = (running.sidecar.pool as unknown as { servers: Set<{ secretKey: number }> }).servers;
          for (const c of [a, b]) assert.ok(![...serverSecrets].some((s) => s.secretKey === keysOf(c).secretKey), 'the server\'s secret reached the client');
          // A client recognises its own notifications by the sender's pid (psycopg, libpq, asyncpg do).
          const received: { processId: number; payload: string | undefined }[] = [];
          a.on('notification', (n) => received.push({ processId: n.processId, payload: n.payload }));
          await a.query('LISTEN identity');
          await a.query("NOTIFY identity, 'self'");
          await b.query("NOTIFY identity, 'other'");
          const started = Date.now();
          while (received.length < 2 && Date.now() - started < 3000) await new Promise((r) => setTimeout(r, 20));
          assert.deepEqual(received, [{ processId: keysOf(a).processID, payload: 'self' }, { processId: keysOf(b).processID, payload: 'other' }]);
          // Cancel still reaches the statement, through the sidecar's key.
          const sleeping = a.query('SELECT pg_sleep(30)').then(() => 'finished', (e: { code?: string }) => e.code);
          await new Promise((r) => setTimeout(r, 200));
          await sendCancel(running.port, a);
          assert.equal(await sleeping, '57014');
          // pg_terminate_backend(PQbackendPID) from another session ends this one with the server's FATAL.
          const ended = new Promise<void>((resolve) => a.once('end', () => resolve()));
          const terminated = await b.query<{ t: boolean }>('SELECT pg_terminate_backend($1) AS t', [keysOf(a).processID]);
          assert.equal(terminated.rows[0]!.t, true);
          const after = await a.query('SELECT 1').then(() => 'answered', (e: { code?: string; message: string }) => e.code ?? e.message);
          assert.notEqual(after, 'answered');
          await ended;
          // On itself: the server's own error, as direct.
          const self = await b.query('SELECT pg_terminate_backend(pg_backend_pid())').then(() => 'answered', (e: { code?: string }) => e.code);
          assert.equal(self, '57P01');
        } finally {
          await Promise.all([a.end().catch(() => undefined), b.end().catch(() => undefined)]);
        }
      });
    });

    it('session mode: a backend reused by the next client gets it a fresh secret; the previous client\'s key cancels nothing', async function () {
      await withSidecar(postgres, { grant: 1, mode: 'session' }, async (running) => {
        const first = client(running);
        await first.connect();
        const old = { ...keysOf(first) };
        assert.equal(old.processID, await backendPid(first));
        await first.end();
        const second = client(running);
        await second.connect();
        try {
          // Grant 1: the same backend, after DISCARD ALL.
          assert.equal(keysOf(second).processID, old.processID);
          assert.equal(await backendPid(second), old.processID);
          assert.notEqual(keysOf(second).secretKey, old.secretKey);
          const sleeping = second.query('SELECT pg_sleep(1)').then(() => 'finished', (e: { code?: string }) => e.code);
          await new Promise((r) => setTimeout(r, 200));
          const stale = Buffer.alloc(4);
          stale.writeInt32BE(old.secretKey);
          await rawExchange(running.port, buildSpecialRequest(CANCEL_REQUEST_CODE, old.processID, stale));
          assert.equal(await sleeping, 'finished', 'a cancel with the previous client\'s key reached the next client\'s statement');
          const again = second.query('SELECT pg_sleep(30)').then(() => 'finished', (e: { code?: string }) => e.code);
          await new Promise((r) => setTimeout(r, 200));
          await sendCancel(running.port, second);
          assert.equal(await again, '57014');
        } finally {
          await second.end();
        }
      });
    });

    it('transaction mode: the BackendKeyData pid names no backend (there is no fixed one), so pg_terminate_backend of it ends nothing; cancel works', async function () {
      await withSidecar(postgres, { grant: 2, mode: 'transaction' }, async (running) => {
        const c = client(running);
        await c.connect();
        try {
          const pid = keysOf(c).processID;
          assert.ok(pid >= 2 ** 22, `pid ${pid} could be a live process`);
          assert.notEqual(pid, await backendPid(c));
          const terminated = await c.query<{ t: boolean }>('SELECT pg_terminate_backend($1) AS t', [pid]);
          assert.equal(terminated.rows[0]!.t, false);
          const sleeping = c.query('SELECT pg_sleep(30)').then(() => 'finished', (e: { code?: string }) => e.code);
          await new Promise((r) => setTimeout(r, 200));
          await sendCancel(running.port, c);
          assert.equal(await sleeping, '57014');
        } finally {
          await c.end();
        }
      });
    });
  });

  describe('protocol edges', function () {
    it('answers protocol 3.2, a test version and _pq_ options with NegotiateProtocolVersion 3.0, then logs in', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        for (const version of [196610, (3 << 16) | 9999]) {
          const startup = buildStartupMessage({ user: running.role.user, database: 'app', '_pq_.test_option': 'x' }, version);
          const { data } = await rawExchange(running.port, startup, 800);
          const reader = new FrameReader();
          reader.push(data);
          assert.ok(reader.next(), 'a reply');
          assert.equal(String.fromCharCode(reader.type), 'v');
          assert.equal(reader.buffer.readInt32BE(reader.bodyStart), 196608);
          assert.equal(reader.buffer.readInt32BE(reader.bodyStart + 4), 1);
          assert.ok(reader.next(), 'then a login');
          assert.equal(String.fromCharCode(reader.type), 'R');
        }
      });
    });

    it('closes without a word a connection whose first bytes are a Terminate, as PostgreSQL does', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const { data, closed } = await rawExchange(running.port, Buffer.from([0x58, 0, 0, 0, 4]));
        assert.equal(closed, true);
        assert.equal(data.length, 0);
      });
    });

    it('passes a Parse with 40,000 parameters (more than a signed 16-bit count)', async function () {
      await withSidecar(postgres, { grant: 1 }, async (running) => {
        const c = client(running);
        await c.connect();
        try {
          const values = Array.from({ length: 40_000 }, (_, i) => i);
          const placeholders = values.map((_, i) => `$${i + 1}::int`).join(',');
          const r = await c.query<{ n: number }>(`SELECT array_length(ARRAY[${placeholders}], 1) AS n`, values);
          assert.equal(r.rows[0]!.n, 40_000);
        } finally {
          await c.end();
        }
      });
    });

    it('closes a client that sends no startup packet within loginTimeout', async function () {
      await withSidecar(postgres, { grant: 1, settings: { loginTimeout: 0.3 } }, async (running) => {
        const half = buildStartupMessage({ user: running.role.user, database: 'app' }).subarray(0, 6);
        const started = Date.now();
        const { closed } = await rawExchange(running.port, half, 3000);
        assert.equal(closed, true);
        assert.ok(Date.now() - started < 2000);
      });
    });

    it('refuses clients beyond maxClientConnections with 53300 and serves the rest', async function () {
      await withSidecar(postgres, { grant: 1, settings: { maxClientConnections: 2 } }, async (running) => {
        const a = client(running);
        const b = client(running);
        await a.connect();
        await b.connect();
        const c = client(running);
        await assert.rejects(c.connect(), (e: { code?: string }) => e.code === '53300');
        assert.equal((await a.query<{ n: number }>('SELECT 1 AS n')).rows[0]!.n, 1);
        await a.end();
        await b.end();
      });
    });
  });

  describe('clients always get an answer', function () {
    it('a CancelRequest reaches a statement run by Execute without Sync (Flush, or asyncpg executemany whose Sync is still on its way), as direct', async function () {
      for (const mode of ['transaction', 'session'] as const) {
        await withSidecar(postgres, { grant: 1, mode }, async (running) => {
          const w = await wireSession(running.port, running.role.user);
          w.send([serialize.parse({ name: '', text: 'SELECT pg_sleep(5)', types: [] }), serialize.bind({}), serialize.flush()]);
          assert.ok(await w.until('2'), 'BindComplete');
          w.send([serialize.execute({}), serialize.flush()]);
          await new Promise((r) => setTimeout(r, 300));
          const started = Date.now();
          await new Promise<void>((resolve) => {
            const socket = netConnect({ host: '127.0.0.1', port: running.port });
            socket.on('error', () => resolve());
            socket.on('close', () => resolve());
            socket.resume();
            socket.write(buildSpecialRequest(CANCEL_REQUEST_CODE, w.key.readInt32BE(0), w.key.subarray(4, 8)));
          });
          const error = await w.until('E', 4000);
          assert.ok(error, `${mode}: the statement was not cancelled`);
          assert.equal(parseNoticeFields(error).C, '57014');
          assert.ok(Date.now() - started < 3000, `${mode}: cancelled after ${Date.now() - started} ms`);
          w.send([serialize.sync()]);
          assert.ok(await w.until('Z'), 'ReadyForQuery after Sync');
          w.send([serialize.end()]);
          assert.equal(await w.closedWithin(3000), true);
        });
      }
    });

    it('a Terminate with no reply owed closes at once, inside a transaction block or after Parse/Describe/Flush without Sync (asyncpg close() after a client-side encoding error); the dirty server connection is not reused', async function () {
      const parseDescribeFlush = [serialize.parse({ name: '', text: 'SELECT $1::int AS n', types: [] }), serialize.describe({ type: 'S', name: '' }), serialize.flush()];
      const cases: { name: string; before: (w: Awaited<ReturnType<typeof wireSession>>) => Promise<void> }[] = [
        { name: 'BEGIN', before: async (w) => {
          w.send([serialize.query('BEGIN')]);
          assert.equal((await w.until('Z'))?.toString(), 'T');
        } },
        { name: 'Parse/Describe/Flush', before: async (w) => {
          w.send(parseDescribeFlush);
          assert.ok(await w.until('T'), 'RowDescription');
        } },
        { name: 'Parse/Describe/Flush, then a simple Query', before: async (w) => {
          w.send(parseDescribeFlush);
          assert.ok(await w.until('T'), 'RowDescription');
          w.send([serialize.query('SELECT 1')]);
          assert.ok(await w.until('Z'), 'ReadyForQuery');
        } },
        { name: 'BEGIN and a Terminate written together', before: () => Promise.resolve() },
      ];
      for (const mode of ['transaction', 'session'] as const) {
        await withSidecar(postgres, { grant: 1, mode }, async (running) => {
          for (const c of cases) {
            const w = await wireSession(running.port, running.role.user);
            await c.before(w);
            w.send(c.name === 'BEGIN and a Terminate written together' ? [serialize.query('BEGIN; SELECT 1'), serialize.end()] : [serialize.end()]);
            assert.equal(await w.closedWithin(3000), true, `${mode}, ${c.name}: the sidecar did not close the connection after Terminate`);
          }
          // The one server connection was discarded, not handed on inside a transaction or an unsynced batch.
          const next = client(running);
          await next.connect();
          try {
            assert.equal((await next.query<{ n: number }>('SELECT 1 AS n')).rows[0]!.n, 1);
            assert.equal((await next.query<{ s: boolean }>('SELECT now() = statement_timestamp() AS s')).rows[0]!.s, true, `${mode}: the next client ran inside a transaction left open`);
          } finally {
            await next.end();
          }
        });
      }
    });

    it('an error in an extended message with simple Queries pipelined before its Sync (PostgreSQL skips them): one ReadyForQuery, and the only server connection is free for the next client at once', async function () {
      const parse = (text: string, name = ''): Buffer => serialize.parse({ name, text, types: [] });
      const run = (statement = '', values: string[] = []): Buffer[] => [serialize.bind({ statement, values }), serialize.execute({})];
      // The second row divides by zero as it runs: an error in Execute, after a DataRow.
      const failsAtRow2 = 'SELECT 1/(1-x) FROM generate_series(0,1) x';
      const cases: { name: string; sent: Buffer[][]; replies: string; ready: number }[] = [
        { name: 'the Parse fails', sent: [[parse('SELEC 1'), ...run(), serialize.query('SELECT 1'), serialize.sync()]], replies: 'EZI', ready: 1 },
        { name: 'the Bind fails, two Queries after it', sent: [[parse('SELECT $1::int'), ...run('', ['x']), serialize.query('SELECT 1'), serialize.query('SELECT 2'), serialize.sync()]], replies: '1EZI', ready: 1 },
        { name: 'the Execute fails after a row', sent: [[parse(failsAtRow2), ...run(), serialize.query('SELECT 1'), serialize.sync()]], replies: '12DEZI', ready: 1 },
        { name: 'the Query comes after the error did', sent: [[parse('SELEC 1'), ...run(), serialize.flush()], [serialize.query('SELECT 1')], [serialize.sync()]], replies: 'EZI', ready: 1 },
        { name: 'a named statement\'s Parse fails (the sidecar sends it with a Describe of its own)', sent: [[parse('SELEC 1', 'q'), ...run('q'), serialize.query('SELECT 1'), serialize.sync()]], replies: 'EZI', ready: 1 },
        { name: 'a named statement\'s Bind fails', sent: [[parse('SELECT $1::int', 'r'), ...run('r', ['x']), serialize.query('SELECT 1'), serialize.sync()]], replies: '1EZI', ready: 1 },
        // Mirror cases, where nothing is skipped: a failed simple Query ends with its own ReadyForQuery; a Query after the Sync runs.
        { name: 'the Query fails, extended messages after it', sent: [[serialize.query(failsAtRow2), parse('SELECT 1'), ...run(), serialize.sync()]], replies: 'TDEZI12DCZI', ready: 2 },
        { name: 'the Parse fails, a Query after the Sync', sent: [[parse('SELEC 1'), ...run(), serialize.sync(), serialize.query('SELECT 1')]], replies: 'EZITDCZI', ready: 2 },
      ];
      await withSidecar(postgres, { grant: 1, pool: { poolTimeout: 3 } }, async (running) => {
        for (const c of cases) {
          const w = await wireSession(running.port, running.role.user);
          for (const [i, bytes] of c.sent.entries()) {
            w.send(bytes);
            if (i < c.sent.length - 1) await w.until('E');
          }
          const expected = c.sent.length > 1 ? c.replies.slice(1) : c.replies;
          assert.equal(await w.replies(c.ready), expected, `${c.name}: replies`);
          // While that client stays connected, another one logs in and runs a query on the one server connection; the first goes on as usual.
          await nextClientThenGoOn(running, w, c.name, async (next) => {
            assert.equal((await next.query<{ n: number }>('SELECT 1 AS n')).rows[0]!.n, 1, c.name);
          });
        }
        // A SET skipped so did not run: the client's setting stays as it was, as direct.
        const w = await wireSession(running.port, running.role.user);
        w.send([parse('SELEC 1'), ...run(), serialize.query('SET statement_timeout = 4321'), serialize.sync(), serialize.query('SHOW statement_timeout')]);
        const row = await w.until('D');
        assert.ok(row);
        assert.equal(row.toString('utf8', 6, 6 + row.readInt32BE(2)), '0', 'the skipped SET took effect');
        assert.equal(await w.replies(1, 50), 'CZI');
        w.send([serialize.end()]);
        assert.equal(await w.closedWithin(3000), true);
      });
    });

    it('COPY FROM STDIN by Execute as libpq sends it (a Sync after the Execute, which the COPY ignores, another after CopyDone): one ReadyForQuery, and the only server connection is free for the next client at once', async function () {
      await withSidecar(postgres, { grant: 1, pool: { poolTimeout: 3 } }, async (running) => {
        const setup = client(running);
        await setup.connect();
        await setup.query('DROP TABLE IF EXISTS copy_by_execute; CREATE TABLE copy_by_execute (a int)');
        await setup.end();
        for (const rows of ['1\n2\n', 'x\n']) {
          const w = await wireSession(running.port, running.role.user);
          w.send([serialize.parse({ name: '', text: 'COPY copy_by_execute FROM STDIN', types: [] }), serialize.bind({}), serialize.execute({}), serialize.sync()]);
          assert.ok(await w.until('G'), 'CopyInResponse');
          w.send([serialize.copyData(Buffer.from(rows)), serialize.copyDone(), serialize.sync()]);
          // Good rows: CommandComplete; a bad one: the COPY's error, the server skips to the Sync after CopyDone.
          assert.equal(await w.replies(1), rows === 'x\n' ? 'EZI' : 'CZI', rows);
          const next = client(running, { connectionTimeoutMillis: 5000 });
          try {
            await next.connect();
            assert.equal((await next.query<{ n: string }>('SELECT count(*) AS n FROM copy_by_execute')).rows[0]!.n, '2');
          } catch (error) {
            assert.fail(`the next client got no server connection (${(error as Error).message})`);
          } finally {
            await next.end().catch(() => undefined);
          }
          w.send([serialize.query('SELECT 2')]);
          assert.equal(await w.replies(1, 50), 'TDCZI', 'the client\'s next query');
          w.send([serialize.end()]);
          assert.equal(await w.closedWithin(3000), true);
        }
      });
    });

    it('COPY FROM STDIN sent whole before its CopyInResponse, in each order PostgreSQL accepts: the ReadyForQuery it sends, and the only server connection is reused by the next client at once', async function () {
      const copy = (): Buffer[] => [serialize.parse({ name: '', text: 'COPY copy_whole FROM STDIN', types: [] }), serialize.bind({}), serialize.execute({})];
      const rows = serialize.copyData(Buffer.from('1\n2\n'));
      const bad = serialize.copyData(Buffer.from('x\n'));
      const done = serialize.copyDone();
      const sync = serialize.sync();
      // `added`: rows the COPY wrote.
      const cases: { name: string; sent: Buffer[]; replies: string; ready: number; added: number }[] = [
        { name: 'libpq\'s order (a Sync after the Execute, another after CopyDone)', sent: [...copy(), sync, rows, done, sync], replies: '12GCZI', ready: 1, added: 2 },
        { name: 'no Sync after the Execute', sent: [...copy(), rows, done, sync], replies: '12GCZI', ready: 1, added: 2 },
        { name: 'CopyFail', sent: [...copy(), sync, rows, serialize.copyFail('given up'), sync], replies: '12GEZI', ready: 1, added: 0 },
        { name: 'bad data', sent: [...copy(), sync, bad, done, sync], replies: '12GEZI', ready: 1, added: 0 },
        { name: 'two Syncs after CopyDone', sent: [...copy(), sync, rows, done, sync, sync], replies: '12GCZIZI', ready: 2, added: 2 },
        { name: 'two COPYs in one batch', sent: [...copy(), sync, rows, done, ...copy(), sync, rows, done, sync], replies: '12GC12GCZI', ready: 1, added: 4 },
        { name: 'a simple Query\'s COPY with a Sync after it', sent: [serialize.query('COPY copy_whole FROM STDIN'), rows, done, sync], replies: 'GCZIZI', ready: 2, added: 2 },
      ];
      await withSidecar(postgres, { grant: 1, pool: { poolTimeout: 3 } }, async (running) => {
        const setup = client(running);
        await setup.connect();
        await setup.query('DROP TABLE IF EXISTS copy_whole; CREATE TABLE copy_whole (a int)');
        const backend = (await setup.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
        await setup.end();
        let expected = 0;
        for (const c of cases) {
          const w = await wireSession(running.port, running.role.user);
          w.send(c.sent);
          assert.equal(await w.replies(c.ready), c.replies, `${c.name}: replies`);
          expected += c.added;
          // While that client stays connected, another one logs in and runs on the one server connection, the same backend.
          await nextClientThenGoOn(running, w, c.name, async (next) => {
            const row = (await next.query<{ pid: number; n: string }>('SELECT pg_backend_pid() AS pid, (SELECT count(*) FROM copy_whole) AS n')).rows[0]!;
            assert.equal(row.n, String(expected), `${c.name}: rows`);
            assert.equal(row.pid, backend, `${c.name}: the server connection was replaced`);
          });
        }
      });
    });

    it('COPY FROM STDIN that fails with a Sync among its data (the ReadyForQuery to come cannot be counted): the client gets what PostgreSQL sends and keeps its server connection, which is closed after it, never handed on', async function () {
      const copy = [serialize.parse({ name: '', text: 'COPY copy_sync_among FROM STDIN', types: [] }), serialize.bind({}), serialize.execute({}), serialize.sync()];
      // Bad data: the COPY fails on its first CopyData, so the server answers the Sync after it and the one after CopyDone.
      const data = [serialize.copyData(Buffer.from('x\n')), serialize.sync(), serialize.copyData(Buffer.from('1\n')), serialize.copyDone(), serialize.sync()];
      await withSidecar(postgres, { grant: 1, pool: { poolTimeout: 1 } }, async (running) => {
        const setup = client(running);
        await setup.connect();
        await setup.query('DROP TABLE IF EXISTS copy_sync_among; CREATE TABLE copy_sync_among (a int)');
        let backend = (await setup.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
        await setup.end();
        for (const whole of [false, true]) {
          const name = whole ? 'sent whole' : 'data sent after CopyInResponse';
          const w = await wireSession(running.port, running.role.user);
          if (whole) w.send([...copy, ...data]);
          else {
            w.send(copy);
            assert.ok(await w.until('G'), 'CopyInResponse');
            w.send(data);
          }
          assert.equal(await w.replies(2), whole ? '12GEZIZI' : 'EZIZI', name);
          w.send([serialize.query('SELECT 2')]);
          assert.equal(await w.replies(1, 50), 'TDCZI', `${name}: the client's next query`);
          // The connection stays with the client: another client waits for it, in vain here.
          const waiting = client(running);
          await assert.rejects(waiting.connect().then(() => waiting.query('SELECT 1')), (e: { code?: string }) => e.code === '53300', `${name}: another client was handed the server connection`);
          await waiting.end().catch(() => undefined);
          w.send([serialize.end()]);
          assert.equal(await w.closedWithin(3000), true);
          // Then it is closed, not reused: the next client gets a new backend, in a clean state.
          const next = client(running);
          await next.connect();
          try {
            const row = (await next.query<{ pid: number; n: number }>('SELECT pg_backend_pid() AS pid, 1 AS n')).rows[0]!;
            assert.equal(row.n, 1);
            assert.notEqual(row.pid, backend, `${name}: the server connection was reused`);
            backend = row.pid;
          } finally {
            await next.end();
          }
        }
      });
    });

    it('a pre-ping on a connection that went silent (a NAT dropped it) ends in 53300 within poolTimeout, not a hang', async function () {
      const proxy = new TcpProxy(postgres.host, postgres.port);
      const port = await proxy.start();
      try {
        await withSidecar(postgres, { grant: 1, pool: { poolPrePing: true, poolTimeout: 2 }, settings: { prePingAfterIdle: 0.1, database: { host: '127.0.0.1', port, dbname: 'app', sslMode: 'disable' } } }, async (running) => {
          const c = client(running);
          await c.connect();
          try {
            await c.query('SELECT 1');
            await new Promise((r) => setTimeout(r, 300));
            proxy.freeze();
            const started = Date.now();
            await assert.rejects(c.query('SELECT 1'), (e: { code?: string; message: string }) => e.code === '53300' && /check before use/.test(e.message));
            assert.ok(Date.now() - started < 4000, `answered after ${Date.now() - started} ms`);
          } finally {
            await c.end().catch(() => undefined);
          }
        });
      } finally {
        await proxy.stop();
      }
    });

    it('a pre-ping on a connection cut underneath serves the client on a new connection', async function () {
      const proxy = new TcpProxy(postgres.host, postgres.port);
      const port = await proxy.start();
      try {
        await withSidecar(postgres, { grant: 1, pool: { poolPrePing: true, poolTimeout: 5 }, settings: { prePingAfterIdle: 0.1, database: { host: '127.0.0.1', port, dbname: 'app', sslMode: 'disable' } } }, async (running) => {
          const c = client(running);
          await c.connect();
          try {
            await c.query('SELECT 1');
            await new Promise((r) => setTimeout(r, 300));
            proxy.cutAll();
            assert.equal((await c.query<{ n: number }>('SELECT 2 AS n')).rows[0]!.n, 2);
          } finally {
            await c.end().catch(() => undefined);
          }
        });
      } finally {
        await proxy.stop();
      }
    });

    it('session mode: a client still sending COPY data when its backend is terminated gets its connection closed, as direct (pgjdbc\'s CopyTest.testLockReleaseOnCancelFailure)', async function () {
      await withSidecar(postgres, { grant: 1, mode: 'session' }, async (running) => {
        // Like pgjdbc's writer: it neither reads nor answers the sidecar's FIN while it sends.
        const socket = netConnect({ host: '127.0.0.1', port: running.port, allowHalfOpen: true });
        await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
        const reader = new FrameReader();
        const seen: string[] = [];
        let pid = 0;
        let failed = false;
        let closed = false;
        socket.on('error', () => { failed = true; });
        socket.on('close', () => { closed = true; });
        socket.on('data', (chunk: Buffer) => {
          reader.push(chunk);
          while (reader.next()) {
            seen.push(String.fromCharCode(reader.type));
            if (reader.type === 0x4b) pid = reader.buffer.readInt32BE(reader.bodyStart);
          }
        });
        const waitFor = async (type: string): Promise<void> => {
          const deadline = Date.now() + 5000;
          while (!seen.includes(type) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
          assert.ok(seen.includes(type), `no ${type} in ${seen.join('')}`);
        };
        socket.write(buildStartupMessage({ user: running.role.user, database: 'app' }));
        await waitFor('Z');
        socket.write(serialize.query('CREATE TEMP TABLE copy_target (a int, b int, c int); COPY copy_target FROM STDIN WITH (FORMAT csv)'));
        await waitFor('G');
        const terminated = await observer.query<{ t: boolean }>('SELECT pg_terminate_backend($1) AS t', [pid]);
        assert.equal(terminated.rows[0]!.t, true);
        // Direct, the backend is gone and the writes fail within moments; the sidecar must not read and drop them forever.
        const row = serialize.copyData(Buffer.from(',,\n'.repeat(1000)));
        const started = Date.now();
        while (!failed && !closed && Date.now() - started < 5000) {
          if (!socket.write(row)) await new Promise((r) => setTimeout(r, 5));
          else await new Promise((r) => setImmediate(r));
        }
        const outcome = failed || closed ? 'connection ended' : 'writes still accepted';
        socket.destroy();
        assert.equal(outcome, 'connection ended');
        assert.ok(seen.includes('E'), 'the server\'s FATAL reached the client');
      });
    });

    it('keeps a backend counted until it is gone: a client that vanishes mid-statement has it cancelled, not left running', async function () {
      await withSidecar(postgres, { grant: 2 }, async (running) => {
        const c = client(running, { application_name: 'vanishing-client' });
        await c.connect();
        const sleeping = c.query('SELECT pg_sleep(20)').catch(() => undefined);
        await new Promise((r) => setTimeout(r, 300));
        (c as unknown as { connection: { stream: Socket } }).connection.stream.destroy();
        await sleeping;
        const started = Date.now();
        let alive = 1;
        while (alive > 0 && Date.now() - started < 5000) {
          await new Promise((r) => setTimeout(r, 100));
          alive = Number((await observer.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'vanishing-client'")).rows[0]!.n);
        }
        assert.equal(alive, 0, 'the backend still runs pg_sleep(20)');
        assert.ok(Date.now() - started < 3000);
        assert.equal(running.sidecar.status().heldConnections <= 2, true);
      });
    });
  });
});

describe('sidecar memory under big messages', function () {
  let postgres: PostgresServer;

  before(async function () {
    postgres = await env.postgres();
  });

  /** A simple Query message. */
  function queryMessage(sql: string): Buffer {
    const text = Buffer.from(`${sql}\0`);
    const header = Buffer.alloc(5);
    header[0] = 0x51;
    header.writeInt32BE(4 + text.length, 1);
    return Buffer.concat([header, text]);
  }

  /**
   * Logs a raw client in through the sidecar; it keeps no data, only counts
   * bytes and the ReadyForQuery messages that end a chunk (every response ends so).
   */
  async function rawLogin(running: TestSidecar): Promise<{ socket: Socket; received: () => number; readyCount: () => number }> {
    let bytes = 0;
    let ready = 0;
    let window = Buffer.alloc(0);
    // Read into one reused buffer: the clients' own garbage would otherwise count as the sidecar's buffers.
    const socket = netConnect({
      host: '127.0.0.1', port: running.port,
      onread: {
        buffer: Buffer.alloc(64 * 1024),
        callback: (n: number, buffer: Uint8Array): boolean => {
          const chunk = Buffer.from(buffer.buffer, buffer.byteOffset, n);
          bytes += n;
          window = Buffer.concat([window, chunk.subarray(Math.max(0, n - 6))]).subarray(-6);
          if (window.length === 6 && window[0] === 0x5a && window.readInt32BE(1) === 5) ready++;
          return true;
        },
      },
    });
    socket.on('error', () => undefined);
    socket.write(buildStartupMessage({ user: running.role.user, database: 'app' }));
    const started = Date.now();
    while (ready < 1 && Date.now() - started < 5000) await new Promise((r) => setTimeout(r, 20));
    return { socket, received: () => bytes, readyCount: () => ready };
  }

  it('streams 4 x 32 MiB values to clients and 4 x 32 MiB queries to the server without holding them whole', async function () {
    this.timeout(120_000);
    await withSidecar(postgres, { grant: 4 }, async (running) => {
      const size = 32 * 1024 * 1024;
      const baseline = process.memoryUsage().arrayBuffers;
      let peak = baseline;
      const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().arrayBuffers)), 20);
      try {
        // Reads: each client asks for one big value and counts it as it comes.
        const readers = await Promise.all(Array.from({ length: 4 }, () => rawLogin(running)));
        for (const r of readers) r.socket.write(queryMessage(`SELECT repeat('x', ${size})`));
        // Writes: each client sends one big Query (a string literal of `size` bytes) in 64 KiB pieces.
        const writers = await Promise.all(Array.from({ length: 4 }, () => rawLogin(running)));
        await Promise.all(writers.map(async (w) => {
          const text = Buffer.from("SELECT length('");
          const close = Buffer.from("')\0");
          const header = Buffer.alloc(5);
          header[0] = 0x51;
          header.writeInt32BE(4 + text.length + size + close.length, 1);
          w.socket.write(Buffer.concat([header, text]));
          const piece = Buffer.alloc(64 * 1024, 0x79);
          for (let sent = 0; sent < size; sent += piece.length) {
            if (!w.socket.write(piece)) await new Promise((r) => w.socket.once('drain', r));
          }
          w.socket.write(close);
        }));
        const started = Date.now();
        while ([...readers, ...writers].some((c) => c.readyCount() < 2) && Date.now() - started < 90_000) await new Promise((r) => setTimeout(r, 100));
        for (const r of readers) assert.ok(r.received() > size, `a reader got ${r.received()} bytes`);
        for (const w of writers) assert.equal(w.readyCount(), 2, 'a writer got its answer');
        for (const c of [...readers, ...writers]) c.socket.destroy();
      } finally {
        clearInterval(sampler);
      }
      const grownMiB = (peak - baseline) / 1024 / 1024;
      // Held whole, 8 messages of 32 MiB would be 256 MiB here, and even one would be 32.
      assert.ok(grownMiB < 16, `buffers grew by ${grownMiB.toFixed(0)} MiB`);
    });
  });
});
