/**
 * Protocol-level named prepared statements in transaction mode, against the
 * real PostgreSQL: node-postgres named queries from more clients than server
 * connections, pgbench -M prepared, Close and re-Parse under the same name,
 * errors inside pipelines, and server-side sharing seen in pg_prepared_statements.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { testEnvironment } from '../support/hooks.ts';
import { FileCredentialsSource, Sidecar } from '../../src/sidecar/index.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { buildStartupMessage, FrameReader, parseNoticeFields } from '../../src/core/protocol/index.ts';
import { nativeIoDeps } from '../support/sidecar-fixture.ts';

const env = testEnvironment();
const logger = pino({ level: process.env.SIDECAR_TEST_LOG ?? 'silent' });

interface Running {
  port: number;
  client(): pg.Client;
  stop(): Promise<void>;
}

async function startSidecar(postgres: PostgresServer, grant: number, maxPreparedStatements?: number): Promise<Running> {
  const role = postgres.app;
  const dir = mkdtempSync(join(tmpdir(), 'poolkeeper-creds-'));
  writeFileSync(join(dir, 'username'), role.user);
  writeFileSync(join(dir, 'password'), role.password);
  const credentials = new FileCredentialsSource({ directory: dir, logger, pollIntervalMs: 200 });
  const sidecar = new Sidecar({
    settings: {
      listenHost: '127.0.0.1', listenPort: 0,
      database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable' },
      pool: { mode: 'transaction', poolTimeout: 10, poolRecycle: 1800, poolPrePing: false, idleTimeout: 600 },
      drainTimeout: 5,
      ...(maxPreparedStatements !== undefined ? { maxPreparedStatements } : {}),
    },
    credentials, logger, metrics: new Registry(), ...nativeIoDeps(),
  });
  const { port } = await sidecar.start();
  sidecar.setGrant(grant, 1);
  return {
    port,
    client: () => new pg.Client({ host: '127.0.0.1', port, user: role.user, database: 'app' }),
    stop: async () => {
      await sidecar.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** One backend message as the raw client saw it. */
interface Reply {
  type: string;
  body: Buffer;
}

/** A bare wire-protocol client: sends exactly the messages a test builds and returns every reply up to the n-th ReadyForQuery. */
class WireClient {
  private readonly socket: Socket;
  private readonly reader = new FrameReader();
  private readonly queue: Reply[] = [];
  private wake: (() => void) | undefined;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.reader.push(chunk);
      while (this.reader.next()) this.queue.push({ type: String.fromCharCode(this.reader.type), body: Buffer.from(this.reader.buffer.subarray(this.reader.bodyStart, this.reader.end)) });
      this.wake?.();
    });
  }

  static async connect(port: number, user: string): Promise<WireClient> {
    const socket = netConnect({ host: '127.0.0.1', port });
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const client = new WireClient(socket);
    socket.write(buildStartupMessage({ user, database: 'app' }));
    await client.untilReady(1);
    return client;
  }

  /** Sends the messages without waiting for replies. */
  send(messages: Buffer[]): void {
    this.socket.write(Buffer.concat(messages));
  }

  /** Sends the messages, returns the replies' types (and bodies) up to `readyCount` ReadyForQuery. */
  async exchange(messages: Buffer[], readyCount = 1): Promise<Reply[]> {
    this.socket.write(Buffer.concat(messages));
    return this.untilReady(readyCount);
  }

  /** Sends the messages, returns the replies up to the first of type `last`. */
  async exchangeUntil(messages: Buffer[], last: string): Promise<Reply[]> {
    this.socket.write(Buffer.concat(messages));
    return this.until((queue) => queue.findIndex((m) => m.type === last));
  }

  private untilReady(readyCount: number): Promise<Reply[]> {
    return this.until((queue) => {
      let seen = 0;
      return queue.findIndex((m) => m.type === 'Z' && ++seen === readyCount);
    });
  }

  /** Waits until `lastIndex` finds the last reply wanted in the queue; returns the replies up to it. */
  private async until(lastIndex: (queue: Reply[]) => number): Promise<Reply[]> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      const index = lastIndex(this.queue);
      if (index >= 0) return this.queue.splice(0, index + 1);
      if (Date.now() > deadline) throw new Error(`no ReadyForQuery; got ${this.queue.map((m) => m.type).join('')}`);
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        setTimeout(resolve, 200);
      });
    }
  }

  close(): void {
    this.socket.end(serialize.end());
  }
}

const types = (replies: Reply[]): string => replies.map((r) => r.type).join('');
const dataValue = (reply: Reply): string => reply.body.toString('utf8', 2 + 4, 2 + 4 + reply.body.readInt32BE(2));
const errorCode = (replies: Reply[]): string | undefined => {
  const error = replies.find((r) => r.type === 'E');
  return error === undefined ? undefined : parseNoticeFields(error.body).C;
};

async function withRunningClient(target: Running, fn: (c: pg.Client) => Promise<void>): Promise<void> {
  const c = target.client();
  await c.connect();
  try {
    await fn(c);
  } finally {
    await c.end();
  }
}

function run(command: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { timeout: 60_000 }, (err, stdout, stderr) => (err ? reject(new Error(`${command}: ${err.message}\n${stderr}`)) : resolve(stdout)));
  });
}

describe('sidecar: named prepared statements in transaction mode', function () {
  let postgres: PostgresServer;
  let running: Running;
  before(async function () {
    postgres = await env.postgres();
    running = await startSidecar(postgres, 2);
  });
  after(async function () {
    await running.stop();
  });

  it('runs node-postgres named queries from 10 clients over 2 server connections, across transactions', async function () {
    const clients = Array.from({ length: 10 }, () => running.client());
    await Promise.all(clients.map((c) => c.connect()));
    try {
      await Promise.all(clients.map(async (c, k) => {
        for (let i = 0; i < 20; i += 1) {
          const add = await c.query<{ x: number }>({ name: 'add', text: 'SELECT $1::int + $2::int AS x', values: [k, i] });
          assert.equal(add.rows[0]!.x, k + i);
          const echo = await c.query<{ s: string }>({ name: 'echo', text: 'SELECT $1::text AS s', values: [`c${k}-${i}`] });
          assert.equal(echo.rows[0]!.s, `c${k}-${i}`);
          if (i % 5 === 0) {
            await c.query('BEGIN');
            const inTx = await c.query<{ x: number }>({ name: 'add', text: 'SELECT $1::int + $2::int AS x', values: [i, 1] });
            assert.equal(inTx.rows[0]!.x, i + 1);
            await c.query('COMMIT');
          }
        }
      }));
    } finally {
      await Promise.all(clients.map((c) => c.end()));
    }
  });

  it('shares one server statement per definition: pg_prepared_statements holds fewer than clients x statements', async function () {
    const clients = Array.from({ length: 6 }, () => running.client());
    await Promise.all(clients.map((c) => c.connect()));
    const seen = new Map<number, Set<string>>();
    try {
      for (let round = 0; round < 3; round += 1) {
        await Promise.all(clients.map(async (c, k) => {
          await c.query({ name: `mine-${k}`, text: 'SELECT $1::int * 2 AS x', values: [k] });
          await c.query({ name: `other-${k}`, text: 'SELECT $1::text AS t', values: ['t'] });
        }));
      }
      // Look from inside each backend (pg_prepared_statements is per backend).
      for (let i = 0; i < 8; i += 1) {
        await Promise.all(clients.slice(0, 2).map(async (c) => {
          await c.query('BEGIN');
          const pid = (await c.query<{ p: number }>('SELECT pg_backend_pid() AS p')).rows[0]!.p;
          const names = (await c.query<{ name: string }>("SELECT name FROM pg_prepared_statements WHERE name LIKE 'pk\\_%' AND statement IN ('SELECT $1::int * 2 AS x', 'SELECT $1::text AS t')")).rows.map((r) => r.name);
          await c.query('COMMIT');
          seen.set(pid, new Set(names));
        }));
      }
    } finally {
      await Promise.all(clients.map((c) => c.end()));
    }
    assert.ok(seen.size >= 1 && seen.size <= 2, `backends: ${[...seen.keys()].join(',')}`);
    for (const [pid, names] of seen) assert.ok(names.size <= 2 && names.size >= 1, `backend ${pid} holds ${[...names].join(',')}: 12 client statements, 2 definitions`);
  });

  it('Closes a statement and re-Parses the same name with different text', async function () {
    const wire = await WireClient.connect(running.port, postgres.app.user);
    try {
      let replies = await wire.exchange([
        serialize.parse({ name: 'q', text: 'SELECT $1::int + 1', types: [] }),
        serialize.bind({ statement: 'q', values: ['41'] }), serialize.execute({}), serialize.sync(),
      ]);
      assert.equal(types(replies), '12DCZ');
      assert.equal(dataValue(replies[2]!), '42');
      replies = await wire.exchange([serialize.close({ type: 'S', name: 'q' }), serialize.sync()]);
      assert.equal(types(replies), '3Z');
      replies = await wire.exchange([serialize.bind({ statement: 'q', values: ['1'] }), serialize.execute({}), serialize.sync()]);
      assert.equal(errorCode(replies), '26000', 'a closed statement no longer exists');
      replies = await wire.exchange([
        serialize.parse({ name: 'q', text: "SELECT $1::text || '!'", types: [] }),
        serialize.describe({ type: 'S', name: 'q' }),
        serialize.bind({ statement: 'q', values: ['hi'] }), serialize.execute({}), serialize.sync(),
      ]);
      assert.equal(types(replies), '1tT2DCZ');
      assert.equal(dataValue(replies[4]!), 'hi!');
      // The same name again without Close: the server's duplicate error, pipeline skipped to Sync.
      replies = await wire.exchange([
        serialize.parse({ name: 'q', text: 'SELECT 1', types: [] }),
        serialize.bind({ statement: 'q', values: ['x'] }), serialize.execute({}), serialize.sync(),
      ]);
      assert.equal(types(replies), 'EZ');
      assert.equal(errorCode(replies), '42P05');
    } finally {
      wire.close();
    }
  });

  it('keeps pipeline semantics when a named statement fails inside a pipeline', async function () {
    const wire = await WireClient.connect(running.port, postgres.app.user);
    const other = await WireClient.connect(running.port, postgres.app.user);
    try {
      // Another client prepares `SELECT $1::int` first, so our Parse of it is answered by the sidecar.
      assert.equal(types(await other.exchange([serialize.parse({ name: 'o', text: 'SELECT $1::int', types: [] }), serialize.sync()])), '1Z');
      let replies = await wire.exchange([
        serialize.parse({ name: 'good', text: 'SELECT $1::int', types: [] }),
        serialize.bind({ statement: 'good', values: ['7'] }), serialize.execute({}),
        serialize.parse({ name: 'bad', text: 'SELEC $1', types: [] }),
        serialize.bind({ statement: 'bad', values: ['1'] }), serialize.execute({}),
        serialize.parse({ name: 'skipped', text: 'SELECT $1::int', types: [] }),
        serialize.bind({ statement: 'good', values: ['8'] }), serialize.execute({}),
        serialize.sync(),
        serialize.bind({ statement: 'good', values: ['9'] }), serialize.execute({}), serialize.sync(),
      ], 2);
      assert.equal(types(replies), '12DCEZ2DCZ');
      assert.equal(errorCode(replies), '42601');
      assert.equal(dataValue(replies[2]!), '7');
      assert.equal(dataValue(replies[7]!), '9');
      // Statements whose Parse failed or was skipped do not exist, as on a plain server.
      for (const name of ['bad', 'skipped']) {
        replies = await wire.exchange([serialize.bind({ statement: name, values: ['1'] }), serialize.execute({}), serialize.sync()]);
        assert.equal(errorCode(replies), '26000', name);
      }
      // An error before a Parse the sidecar answers itself: no ParseComplete may appear.
      replies = await wire.exchange([
        serialize.bind({ statement: 'nope', values: [] }), serialize.execute({}),
        serialize.parse({ name: 'late', text: 'SELECT $1::int', types: [] }),
        serialize.sync(),
      ]);
      assert.equal(types(replies), 'EZ');
      // ... and the skipped Parse did not define `late`.
      replies = await wire.exchange([
        serialize.parse({ name: 'late', text: 'SELECT $1::int', types: [] }),
        serialize.bind({ statement: 'late', values: ['3'] }), serialize.execute({}), serialize.sync(),
      ]);
      assert.equal(types(replies), '12DCZ', replies.filter((r) => r.type === 'E').map((r) => parseNoticeFields(r.body).M).join('; '));
      assert.equal(dataValue(replies[2]!), '3');
    } finally {
      wire.close();
      other.close();
    }
  });

  it('keeps a statement known on its server connection when a DEALLOCATE of it is skipped after an error or fails (psycopg 3 sends its cache evictions inside pipelines)', async function () {
    // One server connection, so every batch below runs on the same backend.
    const one = await startSidecar(postgres, 1);
    const wire = await WireClient.connect(one.port, postgres.app.user);
    try {
      const text = 'SELECT $1::int + 100 AS n';
      const run = (name: string, value: string): Buffer[] => [serialize.bind({ statement: name, values: [value] }), serialize.execute({}), serialize.sync()];
      assert.equal(types(await wire.exchange([serialize.parse({ name: 's0', text, types: [] }), ...run('s0', '1')])), '12DCZ');
      // Skipped: the server ignores everything after the error until Sync, the DEALLOCATE too.
      let replies = await wire.exchange([
        serialize.parse({ text: 'SELECT 1/0' }), serialize.bind({}), serialize.execute({}),
        serialize.parse({ text: 'DEALLOCATE s0' }), serialize.bind({}), serialize.execute({}),
        serialize.sync(),
      ]);
      // (1/0 is folded when planned: the Bind fails.)
      assert.equal(types(replies), '1EZ');
      assert.equal(errorCode(replies), '22012');
      // A new name for the same text (psycopg 3 never reuses a name): a Parse as direct, not 42P05.
      replies = await wire.exchange([serialize.parse({ name: 's1', text, types: [] }), ...run('s1', '2')]);
      assert.equal(types(replies), '12DCZ', replies.filter((r) => r.type === 'E').map((r) => parseNoticeFields(r.body).M).join('; '));
      assert.equal(dataValue(replies[2]!), '102');
      // The skipped DEALLOCATE left s0 in place, as direct.
      replies = await wire.exchange(run('s0', '3'));
      assert.equal(types(replies), '2DCZ');
      // Failed: a DEALLOCATE in an aborted transaction is refused (25P02) and changes nothing either.
      assert.equal(types(await wire.exchange([serialize.query('BEGIN; SELECT 1/0')])), 'CEZ');
      replies = await wire.exchange([serialize.parse({ text: 'DEALLOCATE s1' }), serialize.bind({}), serialize.execute({}), serialize.sync()]);
      assert.equal(errorCode(replies), '25P02');
      assert.equal(types(await wire.exchange([serialize.query('ROLLBACK')])), 'CZ');
      replies = await wire.exchange([serialize.parse({ name: 's2', text, types: [] }), ...run('s2', '4')]);
      assert.equal(types(replies), '12DCZ', replies.filter((r) => r.type === 'E').map((r) => parseNoticeFields(r.body).M).join('; '));
      assert.equal(dataValue(replies[2]!), '104');
      // A DEALLOCATE that runs still drops the statement for this client only: s1 is gone, s2 (same text) is not.
      assert.equal(types(await wire.exchange([serialize.parse({ text: 'DEALLOCATE s1' }), serialize.bind({}), serialize.execute({}), serialize.sync()])), '12CZ');
      assert.equal(errorCode(await wire.exchange(run('s1', '5'))), '26000');
      replies = await wire.exchange(run('s2', '6'));
      assert.equal(types(replies), '2DCZ');
      assert.equal(dataValue(replies[1]!), '106');
    } finally {
      wire.close();
      await one.stop();
    }
  });

  it('answers a pipeline whose next batch Binds a statement while a Parse of the same text in the batch before is skipped after an error (no hang)', async function () {
    // The sidecar holds such a Bind until the Parse's result shape is known; skipped, that Parse
    // never gets one, and the client waited for ever. One server connection that keeps one statement:
    // the skipped Parse finds the statement there (and Closes and Parses it again), then, after another
    // statement evicted it, does not.
    const one = await startSidecar(postgres, 1, 1);
    const wire = await WireClient.connect(one.port, postgres.app.user);
    try {
      const text = 'SELECT 41 + 1 AS n';
      assert.equal(types(await wire.exchange([serialize.parse({ name: 'q', text, types: [] }), serialize.sync()])), '1Z');
      const pipeline = (name: string): Buffer[] => [
        serialize.bind({ statement: 'no_such_statement' }), serialize.parse({ name, text, types: [] }), serialize.sync(),
        serialize.bind({ statement: 'q' }), serialize.execute({}), serialize.sync(),
      ];
      let replies = await wire.exchange(pipeline('r'), 2);
      assert.equal(types(replies), 'EZ2DCZ');
      assert.equal(errorCode(replies), '26000');
      assert.equal(dataValue(replies[3]!), '42');
      assert.equal(types(await wire.exchange([serialize.parse({ name: 'other', text: 'SELECT 2', types: [] }), serialize.sync()])), '1Z');
      replies = await wire.exchange(pipeline('s'), 2);
      assert.equal(types(replies), 'EZ2DCZ');
      assert.equal(dataValue(replies[3]!), '42');
      // Neither r nor s exists, as direct.
      assert.equal(errorCode(await wire.exchange([serialize.bind({ statement: 's' }), serialize.sync()])), '26000');
    } finally {
      wire.close();
      await one.stop();
    }
  });

  it('forgets statements on DEALLOCATE ALL only if it runs: skipped after an error or refused in an aborted transaction, the client keeps its statements and the next client does not get 42P05', async function () {
    const one = await startSidecar(postgres, 1);
    const a = await WireClient.connect(one.port, postgres.app.user);
    const b = await WireClient.connect(one.port, postgres.app.user);
    try {
      const text = 'SELECT $1::int + 200 AS n';
      const run = (name: string, value: string): Buffer[] => [serialize.bind({ statement: name, values: [value] }), serialize.execute({}), serialize.sync()];
      const messages = (replies: Reply[]): string => replies.filter((r) => r.type === 'E').map((r) => parseNoticeFields(r.body).M).join('; ');
      assert.equal(types(await a.exchange([serialize.parse({ name: 'a', text, types: [] }), ...run('a', '1')])), '12DCZ');
      // Skipped: a DEALLOCATE ALL after an error in the same pipeline.
      let replies = await a.exchange([
        serialize.parse({ text: 'SELECT 1/0' }), serialize.bind({}), serialize.execute({}),
        serialize.parse({ text: 'DEALLOCATE ALL' }), serialize.bind({}), serialize.execute({}),
        serialize.sync(),
      ]);
      assert.equal(errorCode(replies), '22012');
      replies = await a.exchange(run('a', '2'));
      assert.equal(types(replies), '2DCZ', messages(replies));
      // Refused: DEALLOCATE ALL, and DEALLOCATE of the client's statement, in an aborted transaction (simple Query).
      assert.equal(types(await a.exchange([serialize.query('BEGIN; SELECT 1/0')])), 'CEZ');
      assert.equal(errorCode(await a.exchange([serialize.query('DEALLOCATE ALL')])), '25P02');
      assert.equal(errorCode(await a.exchange([serialize.query('DEALLOCATE a')])), '25P02');
      assert.equal(types(await a.exchange([serialize.query('ROLLBACK')])), 'CZ');
      replies = await a.exchange(run('a', '3'));
      assert.equal(types(replies), '2DCZ', messages(replies));
      // Another client's Parse of the same text on that server connection.
      replies = await b.exchange([serialize.parse({ name: 'b', text, types: [] }), ...run('b', '4')]);
      assert.equal(types(replies), '12DCZ', messages(replies));
      assert.equal(dataValue(replies[2]!), '204');
      // One that runs forgets the client's statements (26000 as direct), not the other client's.
      assert.equal(types(await a.exchange([serialize.query('DEALLOCATE ALL')])), 'CZ');
      assert.equal(errorCode(await a.exchange(run('a', '5'))), '26000');
      replies = await b.exchange(run('b', '6'));
      assert.equal(types(replies), '2DCZ', messages(replies));
      assert.equal(dataValue(replies[1]!), '206');
      // As a later statement of a simple Query, and a DISCARD ALL that runs, too.
      assert.equal(types(await a.exchange([serialize.parse({ name: 'a', text, types: [] }), ...run('a', '7')])), '12DCZ');
      assert.equal(types(await a.exchange([serialize.query('SELECT 1; DEALLOCATE ALL')])), 'TDCCZ');
      assert.equal(errorCode(await a.exchange(run('a', '8'))), '26000');
      assert.equal(errorCode(await b.exchange([serialize.query('DISCARD ALL')])), undefined);
      assert.equal(errorCode(await b.exchange(run('b', '9'))), '26000');
      replies = await a.exchange([serialize.parse({ name: 'a', text, types: [] }), ...run('a', '10')]);
      assert.equal(types(replies), '12DCZ', messages(replies));
    } finally {
      a.close();
      b.close();
      await one.stop();
    }
  });

  it('re-prepares on the other server connection; an injected Parse that fails shows its error in place of the Bind\'s', async function () {
    const a = running.client();
    const b = running.client();
    await a.connect();
    await b.connect();
    try {
      // Hold one server connection in a transaction so a's statement must be re-prepared on the other one.
      await a.query({ name: 'p', text: 'SELECT pg_backend_pid() AS pid, $1::int AS x', values: [1] });
      const pids = new Set<number>();
      for (let i = 0; i < 6; i += 1) {
        await b.query('BEGIN');
        const r = await a.query<{ pid: number; x: number }>({ name: 'p', text: 'SELECT pg_backend_pid() AS pid, $1::int AS x', values: [i] });
        assert.equal(r.rows[0]!.x, i);
        pids.add(r.rows[0]!.pid);
        await b.query('COMMIT');
        const r2 = await a.query<{ pid: number; x: number }>({ name: 'p', text: 'SELECT pg_backend_pid() AS pid, $1::int AS x', values: [i + 1] });
        pids.add(r2.rows[0]!.pid);
      }
      assert.equal(pids.size, 2, 'the statement ran on both server connections');
    } finally {
      await a.end();
      await b.end();
    }
    // Re-preparing can fail (the table is gone): the injected Parse's error replaces the Bind's, and the session goes on.
    const table = `prep_${Date.now()}`;
    const [c, b2, d] = [running.client(), running.client(), running.client()];
    await Promise.all([c.connect(), b2.connect(), d.connect()]);
    const pid = async (x: pg.Client): Promise<number> => (await x.query<{ p: number }>('SELECT pg_backend_pid() AS p')).rows[0]!.p;
    try {
      await c.query(`CREATE TABLE ${table} (x int)`);
      await c.query('BEGIN');
      const preparedOn = await pid(c);
      await c.query({ name: 'count', text: `SELECT count(*)::int AS n FROM ${table}`, values: [] });
      await c.query('COMMIT');
      await c.query(`DROP TABLE ${table}`);
      // Hold the backend that has the statement, free the other: c must get the other one.
      await b2.query('BEGIN');
      await d.query('BEGIN');
      const holder = (await pid(b2)) === preparedOn ? b2 : d;
      assert.equal(await pid(holder), preparedOn);
      await (holder === b2 ? d : b2).query('COMMIT');
      await assert.rejects(c.query({ name: 'count', text: `SELECT count(*)::int AS n FROM ${table}`, values: [] }), (e: { code?: string; message: string }) => e.code === '42P01' && e.message.includes(table));
      assert.equal((await c.query<{ one: number }>({ name: 'one', text: 'SELECT 1 AS one' })).rows[0]!.one, 1);
      assert.notEqual(await pid(c), preparedOn);
      await holder.query('COMMIT');
    } finally {
      await Promise.all([c.end(), b2.end(), d.end()]);
    }
  });

  it('fails a Bind of a statement whose result shape changed since its Parse with 0A000, as direct, also where the sidecar prepares it again on another server connection', async function () {
    // postgres.js caches each statement's columns and sends only Bind/Execute: a statement planned
    // again elsewhere with other columns gave it rows it decoded with the old ones ({ a: NaN }).
    const table = `reshape_${Date.now()}`;
    const wire = await WireClient.connect(running.port, postgres.app.user);
    const [b2, d] = [running.client(), running.client()];
    await Promise.all([b2.connect(), d.connect()]);
    const pid = async (x: pg.Client): Promise<number> => (await x.query<{ p: number }>('SELECT pg_backend_pid() AS p')).rows[0]!.p;
    try {
      await b2.query(`CREATE TABLE ${table} (a int); INSERT INTO ${table} VALUES (1)`);
      let replies = await wire.exchange([
        serialize.query('BEGIN'),
        serialize.parse({ name: 'q', text: `SELECT * FROM ${table}`, types: [] }),
        serialize.bind({ statement: 'q' }), serialize.execute({}), serialize.sync(),
        serialize.query('SELECT pg_backend_pid()'), serialize.query('COMMIT'),
      ], 4);
      assert.equal(types(replies), 'CZ12DCZTDCZCZ', 'no reply to the sidecar\'s own Describe reaches the client');
      assert.equal(dataValue(replies[4]!), '1');
      const preparedOn = Number(dataValue(replies[8]!));
      await b2.query(`DROP TABLE ${table}; CREATE TABLE ${table} (b text, a int); INSERT INTO ${table} VALUES ('x', 2)`);
      // On the server connection that has the statement, PostgreSQL's own revalidation refuses it.
      const sameBackend = async (expected: string | undefined): Promise<void> => {
        const r = await wire.exchange([serialize.query('BEGIN'), serialize.query('SELECT pg_backend_pid()'), serialize.bind({ statement: 'q' }), serialize.execute({}), serialize.sync(), serialize.query('ROLLBACK')], 4);
        return Number(dataValue(r.find((m) => m.type === 'D')!)) === preparedOn ? assert.equal(errorCode(r), expected) : undefined;
      };
      await sameBackend('0A000');
      // Hold the server connection that has the statement: the next Bind lands on the other one, which must prepare it again.
      await b2.query('BEGIN');
      await d.query('BEGIN');
      const holder = (await pid(b2)) === preparedOn ? b2 : d;
      assert.equal(await pid(holder), preparedOn);
      await (holder === b2 ? d : b2).query('COMMIT');
      for (const describe of [false, true]) {
        replies = await wire.exchange([
          describe ? serialize.describe({ type: 'S', name: 'q' }) : serialize.bind({ statement: 'q' }),
          ...(describe ? [] : [serialize.execute({})]),
          serialize.sync(),
        ]);
        // Direct, a Describe answers the statement's ParameterDescription before it revalidates it for the RowDescription.
        assert.equal(types(replies), describe ? 'tEZ' : 'EZ', `${describe ? 'Describe' : 'Bind'}: ${replies.map((r) => r.type + (r.type === 'D' ? dataValue(r) : '')).join(' ')}`);
        const fields = parseNoticeFields(replies.find((r) => r.type === 'E')!.body);
        assert.deepEqual([fields.C, fields.M, fields.R], ['0A000', 'cached plan must not change result type', 'RevalidateCachedQuery']);
      }
      // Prepared again under the same name, it gives the new columns.
      replies = await wire.exchange([
        serialize.close({ type: 'S', name: 'q' }),
        serialize.parse({ name: 'q', text: `SELECT * FROM ${table}`, types: [] }),
        serialize.describe({ type: 'S', name: 'q' }),
        serialize.bind({ statement: 'q' }), serialize.execute({}), serialize.sync(),
      ]);
      assert.equal(types(replies), '31tT2DCZ');
      assert.equal(dataValue(replies[5]!), 'x');
      await holder.query('COMMIT');
      // Back on the connection whose copy predates the change, the client's statement (prepared
      // again since) runs, as direct: the sidecar sees the stale copy and prepares it there again.
      await sameBackend(undefined);
    } finally {
      wire.close();
      await b2.query(`DROP TABLE IF EXISTS ${table}`).catch(() => undefined);
      await Promise.all([b2.end(), d.end()]);
    }
  });

  it('fails a statement whose result shape changed with 0A000 on every use, as direct, after the sidecar\'s Close or DEALLOCATE ALL on that server connection was skipped after an error', async function () {
    // Direct, PostgreSQL refuses the statement on every Bind and Describe until it is prepared
    // again. Through the sidecar the client got the new columns once the server connection's
    // record of its copy's shape was lost: a Close and Parse the sidecar sends to prepare the copy
    // again (a second Bind of the statement in the batch), or a DEALLOCATE ALL, skipped after the
    // batch's error, restored the copy without its shape.
    const table = `reshape_skip_${Date.now()}`;
    const wire = await WireClient.connect(running.port, postgres.app.user);
    const [b2, d] = [running.client(), running.client()];
    await Promise.all([b2.connect(), d.connect()]);
    const pid = async (x: pg.Client): Promise<number> => (await x.query<{ p: number }>('SELECT pg_backend_pid() AS p')).rows[0]!.p;
    const reshaped = (replies: Reply[], what: string): void => assert.equal(errorCode(replies), '0A000', `${what}: ${replies.map((r) => r.type + (r.type === 'D' ? dataValue(r) : '')).join(' ')}`);
    try {
      await b2.query(`CREATE TABLE ${table} (a int); INSERT INTO ${table} VALUES (1)`);
      const replies = await wire.exchange([
        serialize.query('BEGIN'),
        serialize.parse({ name: 'q', text: `SELECT * FROM ${table}`, types: [] }),
        serialize.parse({ name: 's', text: `SELECT *, 1 AS one FROM ${table}`, types: [] }),
        serialize.sync(),
        serialize.query('SELECT pg_backend_pid()'), serialize.query('COMMIT'),
      ], 4);
      assert.equal(types(replies), 'CZ11ZTDCZCZ');
      const preparedOn = Number(dataValue(replies[6]!));
      await b2.query(`DROP TABLE ${table}; CREATE TABLE ${table} (b text, a int); INSERT INTO ${table} VALUES ('x', 2)`);
      // Hold the server connection that has the statements: the wire client's batches land on the other one.
      await b2.query('BEGIN');
      await d.query('BEGIN');
      const holder = (await pid(b2)) === preparedOn ? b2 : d;
      assert.equal(await pid(holder), preparedOn);
      await (holder === b2 ? d : b2).query('COMMIT');
      const bind = (name: string): Buffer[] => [serialize.bind({ statement: name }), serialize.execute({})];
      // A Parse of a name the client has (42P05: the sidecar first prepares the statement there), then a DEALLOCATE ALL the server skips.
      const r = await wire.exchange([
        serialize.parse({ name: 'q', text: `SELECT * FROM ${table}`, types: [] }),
        serialize.parse({ text: 'DEALLOCATE ALL' }), serialize.bind({}), serialize.execute({}), serialize.sync(),
      ]);
      assert.equal(errorCode(r), '42P05');
      reshaped(await wire.exchange([...bind('q'), serialize.sync()]), 'Bind after a skipped DEALLOCATE ALL');
      // Two Binds in one batch: the first fails, the second (which the sidecar precedes by a Close and a Parse of its copy) is skipped.
      reshaped(await wire.exchange([...bind('s'), ...bind('s'), serialize.sync()]), 'two Binds');
      reshaped(await wire.exchange([...bind('s'), serialize.sync()]), 'Bind after two Binds');
      const described = await wire.exchange([serialize.describe({ type: 'S', name: 's' }), serialize.sync()]);
      reshaped(described, 'Describe after two Binds');
      assert.equal(types(described), 'tEZ');
      await holder.query('COMMIT');
    } finally {
      wire.close();
      await b2.query(`DROP TABLE IF EXISTS ${table}`).catch(() => undefined);
      await Promise.all([b2.end(), d.end()]);
    }
  });

  it('runs a statement prepared again on another server connection after its table was dropped and created again with the same columns, as direct (no 0A000)', async function () {
    // psycopg 3's tests drop and create `test_table (id text primary key)` around each test and run an
    // auto-prepared `SELECT * FROM test_table`: PostgreSQL revalidates it (same column names and types),
    // but the columns' table OID (and, after a column is dropped and added again, its number) differ.
    const table = `same_shape_${Date.now()}`;
    const wire = await WireClient.connect(running.port, postgres.app.user);
    const [b2, d] = [running.client(), running.client()];
    await Promise.all([b2.connect(), d.connect()]);
    const pid = async (x: pg.Client): Promise<number> => (await x.query<{ p: number }>('SELECT pg_backend_pid() AS p')).rows[0]!.p;
    try {
      await b2.query(`CREATE TABLE ${table} (a int, b text); INSERT INTO ${table} VALUES (1, 'x')`);
      let replies = await wire.exchange([
        serialize.query('BEGIN'),
        serialize.parse({ name: 'q', text: `SELECT * FROM ${table}`, types: [] }),
        serialize.parse({ name: 'r', text: `SELECT b FROM ${table}`, types: [] }),
        serialize.bind({ statement: 'q' }), serialize.execute({}), serialize.sync(),
        serialize.query('SELECT pg_backend_pid()'), serialize.query('COMMIT'),
      ], 4);
      assert.equal(types(replies), 'CZ112DCZTDCZCZ');
      const preparedOn = Number(dataValue(replies[9]!));
      // Same columns, new table OID; and for `r`, column b dropped and added again (new attribute number).
      await b2.query(`DROP TABLE ${table}; CREATE TABLE ${table} (a int, b text); INSERT INTO ${table} VALUES (2, 'y')`);
      await b2.query(`ALTER TABLE ${table} DROP COLUMN b; ALTER TABLE ${table} ADD COLUMN b text; UPDATE ${table} SET b = 'z'`);
      await b2.query(`ALTER TABLE ${table} DROP COLUMN a; ALTER TABLE ${table} ADD COLUMN a int; UPDATE ${table} SET a = 3`);
      // Now `SELECT *` gives (b, a): a changed result, 0A000 direct. `r` still gives (b text).
      // Hold the server connection that has the statements: the next Binds land on the other one, which prepares them again.
      await b2.query('BEGIN');
      await d.query('BEGIN');
      const holder = (await pid(b2)) === preparedOn ? b2 : d;
      assert.equal(await pid(holder), preparedOn);
      await (holder === b2 ? d : b2).query('COMMIT');
      replies = await wire.exchange([serialize.bind({ statement: 'r' }), serialize.execute({}), serialize.sync()]);
      assert.equal(types(replies), '2DCZ', replies.map((r) => r.type + (r.type === 'E' ? parseNoticeFields(r.body).M : '')).join(' '));
      assert.equal(dataValue(replies[1]!), 'z');
      replies = await wire.exchange([serialize.bind({ statement: 'q' }), serialize.execute({}), serialize.sync()]);
      assert.equal(errorCode(replies), '0A000', 'a changed result (columns reordered) is still refused');
      await holder.query('COMMIT');
      // The plain case: dropped and created again with the same columns, on both server connections.
      await b2.query(`DROP TABLE ${table}; CREATE TABLE ${table} (b text, a int); INSERT INTO ${table} VALUES ('w', 4)`);
      for (let i = 0; i < 2; i += 1) {
        await b2.query('BEGIN');
        replies = await wire.exchange([serialize.bind({ statement: 'r' }), serialize.execute({}), serialize.sync()]);
        await b2.query('COMMIT');
        assert.equal(types(replies), '2DCZ', replies.map((r) => r.type + (r.type === 'E' ? parseNoticeFields(r.body).M : '')).join(' '));
        assert.equal(dataValue(replies[1]!), 'w');
      }
    } finally {
      wire.close();
      await b2.query(`DROP TABLE IF EXISTS ${table}`).catch(() => undefined);
      await Promise.all([b2.end(), d.end()]);
    }
  });

  it('runs pgbench -M prepared -S through the sidecar with zero errors', async function () {
    const target = ['-h', '127.0.0.1', '-p', String(running.port), '-U', 'app', 'app'];
    await run('/usr/bin/pgbench', ['-i', '-s', '1', '-q', ...target]);
    const stdout = await run('/usr/bin/pgbench', ['-M', 'prepared', '-S', '-c', '6', '-t', '200', '-n', ...target]);
    assert.match(stdout, /number of transactions actually processed: 1200\/1200/);
    assert.match(stdout, /number of failed transactions: 0 /);
  });

  it('closes the least recently used server statements past maxPreparedStatements, and re-prepares them when used again', async function () {
    const small = await startSidecar(postgres, 1, 3);
    const c = small.client();
    await c.connect();
    try {
      for (let round = 0; round < 3; round += 1) {
        for (let k = 0; k < 8; k += 1) {
          const r = await c.query<{ x: number }>({ name: `s${k}`, text: `SELECT $1::int + ${k} AS x`, values: [round] });
          assert.equal(r.rows[0]!.x, round + k);
        }
      }
      const held = await c.query<{ n: number }>("SELECT count(*)::int AS n FROM pg_prepared_statements WHERE name LIKE 'pk\\_%'");
      assert.ok(held.rows[0]!.n <= 3, `the server holds ${held.rows[0]!.n} statements`);
    } finally {
      await c.end();
      await small.stop();
    }
  });

  it('takes a first named statement too long to stream by (a Parse over 256 KiB, as pgx\'s 65,535-parameter Prepare sends)', async function () {
    const wire = await WireClient.connect(running.port, postgres.app.user);
    try {
      const text = `SELECT $1::text AS a /* ${'x'.repeat(400 * 1024)} */`;
      const replies = await wire.exchange([serialize.parse({ name: 'big', text }), serialize.bind({ statement: 'big', values: ['v'] }), serialize.execute({}), serialize.sync()]);
      assert.equal(types(replies), '12DCZ');
      assert.equal(dataValue(replies.find((r) => r.type === 'D')!), 'v');
      // Kept by the session like any other: used in later transactions.
      for (let i = 0; i < 3; i++) {
        const again = await wire.exchange([serialize.bind({ statement: 'big', values: [`w${i}`] }), serialize.execute({}), serialize.sync()]);
        assert.equal(dataValue(again.find((r) => r.type === 'D')!), `w${i}`);
      }
    } finally {
      wire.close();
    }
  });

  it('takes a first named statement after unsynced unnamed Parses, as psycopg 3 sends when it prepares inside a pipeline', async function () {
    const wire = await WireClient.connect(running.port, postgres.app.user);
    try {
      const first = await wire.exchangeUntil([serialize.parse({ text: 'SELECT 1' }), serialize.bind({}), serialize.execute({}), serialize.flush()], 'C');
      assert.equal(types(first), '12DC');
      // Unanswered unnamed Parses ahead of the named one in the same write, then the named one and its use.
      const unnamed = [serialize.parse({ text: 'SELECT 2' }), serialize.bind({}), serialize.execute({})];
      const replies = await wire.exchange([...unnamed, ...unnamed, serialize.parse({ name: 'late', text: 'SELECT 3' }), serialize.bind({ statement: 'late' }), serialize.execute({}), serialize.sync()]);
      assert.equal(types(replies), '12DC12DC12DCZ');
      assert.equal(replies.filter((r) => r.type === 'D').map((r) => r.body.subarray(6).toString()).join(','), '2,2,3');
      // The statement is the session's: used in a later transaction, on whichever connection.
      const again = await wire.exchange([serialize.bind({ statement: 'late' }), serialize.execute({}), serialize.sync()]);
      assert.equal(types(again), '2DCZ');
    } finally {
      wire.close();
    }
  });

  it('takes a first named statement after an unsynced unnamed Parse and a simple Query, each reply in the batch it belongs to', async function () {
    const wire = await WireClient.connect(running.port, postgres.app.user);
    try {
      // The server holds back the ParseComplete while pg_sleep runs: still owed when the named Parse comes.
      wire.send([serialize.parse({ text: 'SELECT pg_sleep(0.5)' }), serialize.bind({}), serialize.execute({}), serialize.query('SELECT 2')]);
      await new Promise((resolve) => setTimeout(resolve, 150));
      const replies = await wire.exchange([serialize.parse({ name: 'late', text: 'SELECT 3' }), serialize.bind({ statement: 'late' }), serialize.execute({}), serialize.sync()], 2);
      assert.equal(types(replies), '12DCTDCZ12DCZ');
      assert.equal(replies.filter((r) => r.type === 'D').slice(1).map((r) => dataValue(r)).join(','), '2,3');
      const again = await wire.exchange([serialize.bind({ statement: 'late' }), serialize.execute({}), serialize.sync()]);
      assert.equal(types(again), '2DCZ');
      assert.equal(dataValue(again[1]!), '3');
      // Other clients are unaffected.
      await withRunningClient(running, async (c) => assert.equal((await c.query<{ x: number }>({ name: 'fine', text: 'SELECT 5 AS x' })).rows[0]!.x, 5));
    } finally {
      wire.close();
    }
  });

  it('takes pgjdbc\'s autosave pipeline inside a block: Close of a portal, SAVEPOINT as a simple Query, then the session\'s first named statement', async function () {
    const wire = await WireClient.connect(running.port, postgres.app.user);
    try {
      // pgjdbc with autosave=always, autocommit off and a fetch size: BEGIN, SAVEPOINT, a query read through portal C_1.
      const first = await wire.exchange([
        serialize.parse({ text: 'BEGIN' }), serialize.bind({}), serialize.execute({}), serialize.query('SAVEPOINT PGJDBC_AUTOSAVE'),
        serialize.parse({ text: 'SELECT 1' }), serialize.bind({ portal: 'C_1' }), serialize.describe({ type: 'P', name: 'C_1' }), serialize.execute({ portal: 'C_1', rows: 1 }), serialize.sync(),
      ], 2);
      assert.equal(types(first), '12CCZ12TDsZ');
      // The next statement closes the portal, sets the savepoint again and prepares its first named statement;
      // the Close and the Query reach the server before the sidecar reads the named Parse.
      wire.send([serialize.close({ type: 'P', name: 'C_1' }), serialize.query('SAVEPOINT PGJDBC_AUTOSAVE')]);
      await new Promise((resolve) => setTimeout(resolve, 150));
      const replies = await wire.exchange([serialize.parse({ name: 'S_4', text: 'ROLLBACK' }), serialize.bind({ statement: 'S_4' }), serialize.execute({}), serialize.sync()], 2);
      assert.equal(types(replies), '3CZ12CZ');
      assert.equal(replies.at(-1)!.body.toString(), 'I');
      const again = await wire.exchange([serialize.query('BEGIN'), serialize.bind({ statement: 'S_4' }), serialize.execute({}), serialize.sync()], 2);
      assert.equal(types(again), 'CZ2CZ');
      assert.equal(again.at(-1)!.body.toString(), 'I');
    } finally {
      wire.close();
    }
  });

  it('counts the Syncs a COPY FROM STDIN reads as no batch of their own: tokio-postgres\'s COPY (a Sync after its Execute, another after CopyDone), then a Close and a Parse pipelined behind it', async function () {
    const table = `tokio_copy_${process.pid}`;
    await withRunningClient(running, async (c) => void (await c.query(`CREATE TABLE ${table} (a int)`)));
    const wire = await WireClient.connect(running.port, postgres.app.user);
    try {
      // tokio-postgres prepares every statement under a name and closes it (Close + Sync) once dropped.
      assert.equal(types(await wire.exchange([serialize.parse({ name: 's1', text: `COPY ${table} FROM STDIN` }), serialize.describe({ type: 'S', name: 's1' }), serialize.sync()])), '1tnZ');
      // The COPY reads the Sync after its Execute: only the Sync after CopyDone gets a ReadyForQuery.
      assert.equal(types(await wire.exchangeUntil([serialize.bind({ statement: 's1' }), serialize.execute({}), serialize.sync()], 'G')), '2G');
      const replies = await wire.exchange([
        serialize.copyData(Buffer.from('1\n2\n')), serialize.copyDone(), serialize.sync(),
        serialize.close({ type: 'S', name: 's1' }), serialize.sync(),
        serialize.parse({ name: 's2', text: `SELECT count(*) FROM ${table}` }), serialize.describe({ type: 'S', name: 's2' }), serialize.sync(),
      ], 3);
      assert.equal(types(replies), 'CZ3Z1tTZ');
      const count = await wire.exchange([serialize.bind({ statement: 's2' }), serialize.execute({}), serialize.sync()]);
      assert.equal(types(count), '2DCZ');
      assert.equal(dataValue(count[1]!), '2');
    } finally {
      wire.close();
      await withRunningClient(running, async (c) => void (await c.query(`DROP TABLE ${table}`)));
    }
  });
});

describe('sidecar: the unnamed statement across transactions (transaction mode)', function () {
  let postgres: PostgresServer;
  let running: Running;
  before(async function () {
    postgres = await env.postgres();
    // One server connection: every client's batches land on the backend the others used last.
    running = await startSidecar(postgres, 1);
  });
  after(async function () {
    await running.stop();
  });

  it('binds the client\'s own unnamed statement in a later batch (pgx describe_exec, PQprepare with an empty name), never another client\'s; without one, 26000 as direct', async function () {
    const a = await WireClient.connect(running.port, postgres.app.user);
    const b = await WireClient.connect(running.port, postgres.app.user);
    const c = await WireClient.connect(running.port, postgres.app.user);
    try {
      // pgx's describe_exec: Parse and Describe in one batch, Bind and Execute in the next.
      const described = await a.exchange([serialize.parse({ text: 'SELECT $1::int + 1 AS n' }), serialize.describe({ type: 'S', name: '' }), serialize.sync()]);
      assert.equal(types(described), '1tTZ');
      // Meanwhile another client leaves its own unnamed statement on that backend.
      assert.equal(types(await b.exchange([serialize.parse({ text: 'SELECT \'b\' || $1::text AS n' }), serialize.sync()])), '1Z');
      for (let i = 0; i < 2; i++) {
        const bound = await a.exchange([serialize.bind({ values: ['41'] }), serialize.describe({ type: 'P', name: '' }), serialize.execute({}), serialize.sync()]);
        assert.equal(types(bound), '2TDCZ');
        assert.equal(dataValue(bound.find((r) => r.type === 'D')!), '42');
      }
      // A client that never parsed one has none, whatever the backend holds.
      const none = await c.exchange([serialize.bind({ values: ['x'] }), serialize.execute({}), serialize.sync()]);
      assert.equal(types(none), 'EZ');
      assert.equal(errorCode(none), '26000');
      // B's is still its own; a simple Query drops the client's unnamed statement, as PostgreSQL does.
      const own = await b.exchange([serialize.bind({ values: ['x'] }), serialize.execute({}), serialize.sync()]);
      assert.equal(dataValue(own.find((r) => r.type === 'D')!), 'bx');
      await a.exchange([serialize.query('SELECT 1')]);
      const dropped = await a.exchange([serialize.bind({ values: ['1'] }), serialize.execute({}), serialize.sync()]);
      assert.equal(errorCode(dropped), '26000');
      // A Parse of it that fails leaves none; the error of a Bind in a later batch is 26000, as direct.
      assert.equal(errorCode(await b.exchange([serialize.parse({ text: 'SELECT no_such_column' }), serialize.sync()])), '42703');
      assert.equal(types(await a.exchange([serialize.parse({ text: 'SELECT 7' }), serialize.sync()])), '1Z');
      assert.equal(errorCode(await b.exchange([serialize.bind({}), serialize.execute({}), serialize.sync()])), '26000');
    } finally {
      a.close();
      b.close();
      c.close();
    }
  });

  it('binds in a later batch an unnamed statement too large to keep (pg8000 parses every statement in a batch of its own), holding its server connection until a batch binds it; bound again later, 0A000', async function () {
    const a = await WireClient.connect(running.port, postgres.app.user);
    const b = await WireClient.connect(running.port, postgres.app.user);
    try {
      // Over 256 KiB: streamed through to the server, not kept by the sidecar.
      const text = `SELECT $1::text || 'a' AS n /* ${'x'.repeat(300 * 1024)} */`;
      assert.equal(types(await a.exchange([serialize.parse({ text }), serialize.sync()])), '1Z');
      // pg8000: Describe in the next batch, then Bind, Execute and Sync in the one after.
      assert.equal(types(await a.exchange([serialize.describe({ type: 'S', name: '' }), serialize.sync()])), 'tTZ');
      // Another client's statement waits: the grant is 1 and the connection holds A's statement.
      let bDone = false;
      const bQuery = b.exchange([serialize.query('SELECT 2')]).then((r) => {
        bDone = true;
        return r;
      });
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(bDone, false, 'the connection holding the unkept statement was lent to another client');
      const bound = await a.exchange([serialize.bind({ values: ['v'] }), serialize.execute({}), serialize.sync()]);
      assert.equal(types(bound), '2DCZ');
      assert.equal(dataValue(bound.find((r) => r.type === 'D')!), 'va');
      // Bound: the hold ends with that transaction.
      assert.equal(dataValue((await bQuery).find((r) => r.type === 'D')!), '2');
      // Bound again in a later transaction, on whatever connection: refused, saying why.
      const again = await a.exchangeUntil([serialize.bind({ values: ['w'] }), serialize.execute({}), serialize.sync()], 'E');
      assert.equal(types(again), 'E', 'a second Bind of an unkept statement in a later transaction was not refused');
      const fields = parseNoticeFields(again[0]!.body);
      assert.deepEqual([fields.S, fields.C], ['FATAL', '0A000']);
      assert.match(fields.M ?? '', /too large to track/);
    } finally {
      a.close();
      b.close();
    }
  });

  it('pins a client that names a statement while an unnamed one too large to keep is current: a later Bind of that one still runs', async function () {
    const a = await WireClient.connect(running.port, postgres.app.user);
    const b = await WireClient.connect(running.port, postgres.app.user);
    let aClosed = false;
    try {
      const text = `SELECT $1::text || 'a' AS n /* ${'x'.repeat(300 * 1024)} */`;
      assert.equal(types(await a.exchange([serialize.parse({ text }), serialize.sync()])), '1Z');
      assert.equal(types(await a.exchange([serialize.parse({ name: 'one', text: 'SELECT 1 AS n' }), serialize.sync()])), '1Z');
      const bound = await a.exchange([serialize.bind({ values: ['x'] }), serialize.execute({}), serialize.sync()]);
      assert.equal(types(bound), '2DCZ');
      assert.equal(dataValue(bound.find((r) => r.type === 'D')!), 'xa');
      const named = await a.exchange([serialize.bind({ statement: 'one' }), serialize.execute({}), serialize.sync()]);
      assert.equal(dataValue(named.find((r) => r.type === 'D')!), '1');
      // Pinned: the one server connection serves another client only once A leaves.
      let bDone = false;
      const bQuery = b.exchange([serialize.query('SELECT 2')]).then((r) => {
        bDone = true;
        return r;
      });
      await a.exchange([serialize.query('SELECT 1')]);
      assert.equal(bDone, false, 'the pinned connection was lent to another client');
      a.close();
      aClosed = true;
      assert.equal(dataValue((await bQuery).find((r) => r.type === 'D')!), '2');
    } finally {
      if (!aClosed) a.close();
      b.close();
    }
  });
});
