/**
 * node-postgres and raw wire-protocol scenarios, run by
 * test/integration/drivers.test.ts as `node test/drivers/node-postgres.ts '<json config>'`;
 * prints one JSON object. Each step records its value or its SQLSTATE, for
 * comparison with a direct connection.
 */
import { connect as netConnect, type Socket } from 'node:net';
import pg from 'pg';
import { serialize } from 'pg-protocol';

interface Login { host: string; port: number; user: string; password: string; dbname: string }
interface Config { target: Login; suffix: string; mode: 'direct' | 'transaction' | 'session'; poolSize: number }

type Step = { ok: true; value: unknown } | { ok: false; sqlstate: string; message: string; severity?: string };

const config = JSON.parse(process.argv[2] ?? '{}') as Config;

async function step(fn: () => Promise<unknown>): Promise<Step> {
  try {
    return { ok: true, value: await fn() };
  } catch (error) {
    const e = error as { code?: string; message?: string; severity?: string };
    return { ok: false, sqlstate: e.code ?? 'client', message: String(e.message ?? error).split('\n')[0]!, ...(e.severity ? { severity: e.severity } : {}) };
  }
}

async function client(): Promise<pg.Client> {
  const c = new pg.Client({ host: config.target.host, port: config.target.port, user: config.target.user, password: config.target.password, database: config.target.dbname });
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

async function backendPid(c: pg.Client): Promise<number> {
  return (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
}

/**
 * In transaction mode, makes `pid` the only idle server connection: holders
 * take every connection of the pool in open transactions, then the one on
 * `pid` lets go. The caller's next transaction runs there. Returns the release
 * of the others, or undefined when no holder reached `pid`.
 */
async function steerTo(pid: number): Promise<(() => Promise<void>) | undefined> {
  const holders: { c: pg.Client; pid: number }[] = [];
  for (let i = 0; i < config.poolSize; i += 1) {
    const c = await client();
    await c.query('BEGIN');
    holders.push({ c, pid: await backendPid(c) });
  }
  const release = async (h: { c: pg.Client }): Promise<void> => {
    await h.c.query('COMMIT');
    await h.c.end();
  };
  const target = holders.find((h) => h.pid === pid);
  const others = holders.filter((h) => h !== target);
  if (!target) {
    await Promise.all(others.map(release));
    return undefined;
  }
  await release(target);
  return async () => {
    await Promise.all(others.map(release));
  };
}

/** A statement named by one client, shared by its text with another client after a schema change. */
async function sharedStatementSchemaChange(): Promise<Record<string, unknown>> {
  const table = `drv_shared_${config.suffix}`;
  const text = `SELECT * FROM ${table}`;
  const a = await client();
  const out: Record<string, unknown> = {};
  try {
    await a.query(`CREATE TABLE ${table} (a int)`);
    await a.query(`INSERT INTO ${table} VALUES (1)`);
    await a.query('BEGIN');
    out.aFirst = await step(async () => (await a.query<{ a: unknown }>({ name: 'drv_qa', text })).rows);
    const pid = await backendPid(a);
    await a.query('COMMIT');
    out.alter = await step(async () => (await a.query(`ALTER TABLE ${table} ALTER COLUMN a TYPE bigint`)).command);
    const b = await client();
    try {
      const release = config.mode === 'transaction' ? await steerTo(pid) : undefined;
      out.steeredToSameBackend = release !== undefined;
      out.bFirst = await step(async () => (await b.query<{ a: unknown }>({ name: 'drv_qb', text })).rows);
      await release?.();
      out.bAgain = await step(async () => (await b.query<{ a: unknown }>({ name: 'drv_qb', text })).rows);
    } finally {
      await b.end();
    }
  } finally {
    await a.query(`DROP TABLE IF EXISTS ${table}`).catch(() => undefined);
    await a.end();
  }
  return out;
}

/** A multi-values insert with 40,000 parameters (more than a signed 16-bit count). */
async function manyParameters(): Promise<Record<string, unknown>> {
  const table = `drv_many_${config.suffix}`;
  const c = await client();
  const rows = 40_000;
  try {
    await c.query(`CREATE TABLE ${table} (a int)`);
    const placeholders = Array.from({ length: rows }, (_, i) => `($${i + 1})`).join(',');
    const values = Array.from({ length: rows }, (_, i) => i);
    return {
      insert: await step(async () => (await c.query(`INSERT INTO ${table} (a) VALUES ${placeholders}`, values)).rowCount),
      after: await step(async () => (await c.query<{ n: string }>(`SELECT count(*) AS n FROM ${table}`)).rows[0]!.n),
    };
  } finally {
    await c.query(`DROP TABLE IF EXISTS ${table}`).catch(() => undefined);
    await c.end();
  }
}

/** Backend messages as (type, body), from raw bytes. */
class Replies {
  private buffer = Buffer.alloc(0);
  readonly messages: { type: string; body: Buffer }[] = [];
  bytes = 0;

  push(chunk: Buffer): void {
    this.bytes += chunk.length;
    this.buffer = Buffer.concat([this.buffer, chunk]);
    while (this.buffer.length >= 5) {
      const length = this.buffer.readInt32BE(1);
      if (this.buffer.length < 1 + length) break;
      this.messages.push({ type: String.fromCharCode(this.buffer[0]!), body: this.buffer.subarray(5, 1 + length) });
      this.buffer = this.buffer.subarray(1 + length);
    }
  }
}

/** Feeds `socket` into a Replies until `done` holds, the socket closes, or `timeoutMs`. */
function collect(socket: Socket, done: (r: Replies) => boolean, timeoutMs = 5000): Promise<{ replies: Replies; closed: boolean }> {
  const replies = new Replies();
  return new Promise((resolve) => {
    const finish = (closed: boolean): void => {
      clearTimeout(timer);
      socket.removeAllListeners('data');
      resolve({ replies, closed });
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    socket.on('data', (chunk: Buffer) => {
      replies.push(chunk);
      if (done(replies)) finish(false);
    });
    socket.once('close', () => finish(true));
    socket.on('error', () => undefined);
  });
}

function errorCode(body: Buffer): string | undefined {
  for (let i = 0; i < body.length && body[i] !== 0;) {
    const field = String.fromCharCode(body[i]!);
    const end = body.indexOf(0, i + 1);
    if (field === 'C') return body.toString('utf8', i + 1, end);
    i = end + 1;
  }
  return undefined;
}

function errorMessage(body: Buffer): string | undefined {
  for (let i = 0; i < body.length && body[i] !== 0;) {
    const field = String.fromCharCode(body[i]!);
    const end = body.indexOf(0, i + 1);
    if (field === 'M') return body.toString('utf8', i + 1, end);
    i = end + 1;
  }
  return undefined;
}

/** A failed named Parse, then a Parse of the same name in the same pipeline, over a logged-in connection's socket. */
async function reparseAfterFailedParse(): Promise<Record<string, unknown>> {
  const c = await client();
  // node-postgres did the login; from here its socket is driven by hand.
  const socket = (c as unknown as { connection: { stream: Socket } }).connection.stream;
  socket.removeAllListeners('data');
  const ready = (r: Replies): boolean => r.messages.filter((m) => m.type === 'Z').length >= 2;
  const pending = collect(socket, ready);
  socket.write(Buffer.concat([
    serialize.parse({ name: 'drv_rp', text: 'SELECT $1::drv_no_such_type', types: [] }),
    serialize.sync(),
    serialize.parse({ name: 'drv_rp', text: 'SELECT 1 AS one', types: [] }),
    serialize.bind({ statement: 'drv_rp' }),
    serialize.execute({}),
    serialize.sync(),
  ]));
  const { replies } = await pending;
  socket.destroy();
  return {
    types: replies.messages.map((m) => m.type).join(''),
    errors: replies.messages.filter((m) => m.type === 'E').map((m) => errorCode(m.body)),
  };
}

async function rawSocket(): Promise<Socket> {
  const socket = netConnect({ host: config.target.host, port: config.target.port });
  await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
  return socket;
}

/** Terminate ('X', length 4) as the very first bytes: a silent close, as PostgreSQL does. */
async function terminateFirst(): Promise<Record<string, unknown>> {
  const socket = await rawSocket();
  const pending = collect(socket, () => false, 3000);
  socket.write(Buffer.from([0x58, 0, 0, 0, 4]));
  const { replies, closed } = await pending;
  socket.destroy();
  return { bytesReceived: replies.bytes, closed, types: replies.messages.map((m) => m.type).join('') };
}

function startupMessage(version: number, parameters: Record<string, string>): Buffer {
  const payload = Buffer.from(`${Object.entries(parameters).map(([k, v]) => `${k}\0${v}\0`).join('')}\0`, 'utf8');
  const out = Buffer.alloc(8 + payload.length);
  out.writeInt32BE(out.length, 0);
  out.writeInt32BE(version, 4);
  payload.copy(out, 8);
  return out;
}

/** The first reply to a StartupMessage asking for a newer minor version or a `_pq_.` option. */
async function negotiate(version: number, extra: Record<string, string>): Promise<Record<string, unknown>> {
  const socket = await rawSocket();
  const pending = collect(socket, (r) => r.messages.length >= 1, 3000);
  socket.write(startupMessage(version, { user: config.target.user, database: config.target.dbname, ...extra }));
  const { replies, closed } = await pending;
  socket.destroy();
  const first = replies.messages[0];
  if (!first) return { type: null, closed };
  if (first.type === 'E') return { type: 'E', sqlstate: errorCode(first.body), message: errorMessage(first.body) };
  if (first.type !== 'v') return { type: first.type };
  const count = first.body.readInt32BE(4);
  const options = first.body.toString('utf8', 8).split('\0').slice(0, count);
  return { type: 'v', version: first.body.readInt32BE(0), options };
}

async function protocolVersions(): Promise<Record<string, unknown>> {
  return {
    '3.2': await negotiate(196610, {}),
    '3.9999': await negotiate((3 << 16) | 9999, {}),
    '_pq_.foo': await negotiate(196608, { '_pq_.foo': 'bar' }),
  };
}

/**
 * A Query and a Terminate written together (node-postgres's pool ends an idle
 * client that way while its last query is still in flight): PostgreSQL
 * answers the query, then closes.
 */
async function terminateAfterQuery(): Promise<Record<string, unknown>> {
  const c = await client();
  const socket = (c as unknown as { connection: { stream: Socket } }).connection.stream;
  socket.removeAllListeners('data');
  const pending = collect(socket, () => false, 5000);
  socket.write(Buffer.concat([serialize.query('SELECT pg_sleep(0.05), 42'), serialize.end()]));
  const { replies, closed } = await pending;
  socket.destroy();
  return { types: replies.messages.map((m) => m.type).join(''), closed };
}

/**
 * The server ends the client's backend (pg_terminate_backend) with a query
 * queued behind: PostgreSQL sends FATAL 57P01 and closes the connection, so
 * node-postgres fails the queued query with its own "Connection terminated".
 */
async function serverTerminated(): Promise<Record<string, unknown>> {
  const c = await client();
  const first = step(async () => (await c.query('SELECT pg_terminate_backend(pg_backend_pid())')).rowCount);
  const second = step(async () => (await c.query<{ one: number }>('SELECT 1 AS one')).rows[0]!.one);
  const out = { terminate: await first, queued: await second };
  await c.end().catch(() => undefined);
  return out;
}

/** Runs one scenario, bounded: a hang is recorded as such and the others still run. */
async function bounded(name: string, fn: () => Promise<Record<string, unknown>>): Promise<Record<string, unknown>> {
  console.error(`begin ${name}`);
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<Record<string, unknown>>((resolve) => {
    timer = setTimeout(() => resolve({ hang: `no answer within ${SCENARIO_TIMEOUT_MS / 1000} s` }), SCENARIO_TIMEOUT_MS);
  });
  try {
    return await Promise.race([fn(), hang]);
  } finally {
    clearTimeout(timer);
  }
}

const SCENARIO_TIMEOUT_MS = 10_000;
const result = {
  sharedStatementSchemaChange: await bounded('sharedStatementSchemaChange', sharedStatementSchemaChange),
  manyParameters: await bounded('manyParameters', manyParameters),
  reparseAfterFailedParse: await bounded('reparseAfterFailedParse', reparseAfterFailedParse),
  terminateFirst: await bounded('terminateFirst', terminateFirst),
  protocolVersions: await bounded('protocolVersions', protocolVersions),
  serverTerminated: await bounded('serverTerminated', serverTerminated),
  terminateAfterQuery: await bounded('terminateAfterQuery', terminateAfterQuery),
};
console.log(JSON.stringify(result));
// A hung scenario leaves its connection open.
process.exit(0);
