/**
 * Server connections over plaintext TCP read into one reused buffer
 * (DirectReadSocket). These tests use sslMode 'disable' so that path is the
 * one exercised, including a client too slow to take a large result at once:
 * the sidecar must pause the server rather than let the reused buffer be
 * overwritten under bytes still queued for the client.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { connect as netConnect, createServer, type Socket } from 'node:net';
import pg from 'pg';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { testEnvironment } from '../support/hooks.ts';
import { Sidecar, StaticCredentialsSource } from '../../src/sidecar/index.ts';
import { DirectReadSocket, ReadBufferPool, adoptAcceptedSocket } from '../../src/sidecar/direct-read-socket.ts';
import { credentialsGeneration } from '../../src/core/credentials.ts';
import { FrameReader, buildStartupMessage } from '../../src/core/protocol/index.ts';
import { checkOwnBufferLending, echo, type SeenRead } from '../support/read-buffer-checks.ts';
import { nativeIoDeps } from '../support/sidecar-fixture.ts';

const env = testEnvironment();

/** Reads from `socket` until a ReadyForQuery arrives; returns the whole messages before it. */
function untilReady(socket: Socket, reader: FrameReader): Promise<{ type: number; body: Buffer }[]> {
  return new Promise((resolve, reject) => {
    const messages: { type: number; body: Buffer }[] = [];
    const onData = (chunk: Buffer): void => {
      reader.push(chunk);
      while (reader.next()) {
        if (reader.type === 0x5a) {
          socket.off('data', onData);
          socket.off('error', reject);
          resolve(messages);
          return;
        }
        messages.push({ type: reader.type, body: Buffer.from(reader.buffer.subarray(reader.bodyStart, reader.end)) });
      }
    };
    socket.on('data', onData);
    socket.once('error', reject);
  });
}

function message(type: number, body: Buffer): Buffer {
  const header = Buffer.alloc(5);
  header[0] = type;
  header.writeInt32BE(4 + body.length, 1);
  return Buffer.concat([header, body]);
}

function query(sql: string): Buffer {
  return message(0x51, Buffer.from(`${sql}\0`, 'utf8'));
}

/** Every message from a server socket, handed out one ReadyForQuery-terminated batch at a time. */
class Replies {
  private readonly reader = new FrameReader();
  private readonly batches: { type: number; body: Buffer }[][] = [];
  private current: { type: number; body: Buffer }[] = [];
  private waiting: (() => void) | undefined;

  constructor(socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.reader.push(chunk);
      while (this.reader.next()) {
        if (this.reader.type === 0x5a) {
          this.batches.push(this.current);
          this.current = [];
          this.waiting?.();
        } else this.current.push({ type: this.reader.type, body: Buffer.from(this.reader.buffer.subarray(this.reader.bodyStart, this.reader.end)) });
      }
    });
  }

  /** The messages up to the next ReadyForQuery. */
  async next(): Promise<{ type: number; body: Buffer }[]> {
    while (this.batches.length === 0) await new Promise<void>((resolve) => (this.waiting = resolve));
    return this.batches.shift()!;
  }
}

/** The error messages among `messages` (ErrorResponse bodies as text). */
function errors(messages: { type: number; body: Buffer }[]): string[] {
  return messages.filter((m) => m.type === 0x45).map((m) => m.body.toString('utf8'));
}

describe('adoptAcceptedSocket', () => {
  it('moves a paused accepted connection to a DirectReadSocket that reads, writes, pauses and closes', async () => {
    const adopted: Socket[] = [];
    const buffers = new ReadBufferPool();
    const known = Buffer.allocUnsafe(64 * 1024);
    buffers.give(known);
    const server = createServer({ pauseOnConnect: true }, (socket) => {
      const own = adoptAcceptedSocket(socket, buffers);
      adopted.push(own);
      // An echo that copies each read: the buffer is reused by the next one, and write() may queue.
      if (own instanceof DirectReadSocket) own.setDirectReader((buffer, length) => own.write(Buffer.from(buffer.subarray(0, length))));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as { port: number }).port;
    const client = netConnect({ host: '127.0.0.1', port });
    try {
      await new Promise<void>((resolve, reject) => client.once('connect', resolve).once('error', reject));
      const payload = Buffer.alloc(300_000);
      for (let i = 0; i < payload.length; i += 1) payload[i] = (i * 31) % 251;
      const echoed = await echo(client, payload);
      assert.equal(adopted.length, 1);
      assert.ok(adopted[0] instanceof DirectReadSocket, 'the accepted connection was not adopted (fell back to the stream path)');
      assert.ok(echoed.equals(payload));
      const closed = new Promise<void>((resolve) => adopted[0]!.once('close', () => resolve()));
      client.end();
      await closed;
      assert.equal(buffers.take(), known, 'the read buffer went back to the pool on close');
    } finally {
      client.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });

  it('with copyReads, many connections share one read buffer and each reader keeps intact copies', async () => {
    const buffers = new ReadBufferPool();
    const adopted: Socket[] = [];
    let lentReads = 0;
    const server = createServer({ pauseOnConnect: true }, (socket) => {
      const own = adoptAcceptedSocket(socket, buffers, { copyReads: true });
      adopted.push(own);
      // Keeps every read as given and echoes it later, after other connections have read: a view of a shared buffer would be overwritten.
      if (own instanceof DirectReadSocket) own.setDirectReader((buffer, length, lent) => {
        if (lent) lentReads += 1;
        const kept = buffer.subarray(0, length);
        setTimeout(() => own.write(kept), 5);
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as { port: number }).port;
    const clients = Array.from({ length: 20 }, () => netConnect({ host: '127.0.0.1', port }));
    try {
      await Promise.all(clients.map((c) => new Promise<void>((resolve, reject) => c.once('connect', resolve).once('error', reject))));
      await Promise.all(clients.map(async (client, n) => {
        const payload = Buffer.alloc(200_000, n + 1);
        assert.ok((await echo(client, payload)).equals(payload), `client ${n} got back other bytes than it sent`);
      }));
      assert.ok(adopted.every((s) => s instanceof DirectReadSocket));
      assert.equal(lentReads, 0, 'reads of the shared buffer were lent instead of copied');
      const closed = adopted.map((s) => new Promise<void>((resolve) => s.once('close', () => resolve())));
      for (const c of clients) c.end();
      await Promise.all(closed);
      assert.notEqual(buffers.take(), buffers.shared(), 'the shared buffer was handed out as a socket\'s own');
    } finally {
      for (const c of clients) c.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });

  it('with copyReads, lends reads of a buffer of its own while asked to, and gives it back afterwards', async () => {
    const buffers = new ReadBufferPool();
    const known = Buffer.allocUnsafe(64 * 1024);
    buffers.give(known);
    const reads: SeenRead[] = [];
    let adopted: DirectReadSocket | undefined;
    const server = createServer({ pauseOnConnect: true }, (socket) => {
      const s = adoptAcceptedSocket(socket, buffers, { copyReads: true });
      if (!(s instanceof DirectReadSocket)) return;
      adopted = s;
      s.setDirectReader((buffer, length, lent) => {
        reads.push({ lent, own: buffer === known, text: buffer.subarray(0, length).toString() });
        s.write('k');
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as { port: number }).port;
    const client = netConnect({ host: '127.0.0.1', port });
    try {
      await new Promise<void>((resolve, reject) => client.once('connect', resolve).once('error', reject));
      await checkOwnBufferLending(client, () => adopted!, reads, buffers, known);
    } finally {
      client.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });

  it('falls back to the stream path, resumed, for a socket that is already reading', async () => {
    const server = createServer((socket) => {
      const own = adoptAcceptedSocket(socket);
      assert.equal(own, socket);
      own.on('data', (chunk: Buffer) => own.end(chunk));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as { port: number }).port;
    const client = netConnect({ host: '127.0.0.1', port });
    try {
      const reply = await new Promise<string>((resolve, reject) => {
        client.once('error', reject).once('data', (chunk: Buffer) => resolve(chunk.toString()));
        client.write('ping');
      });
      assert.equal(reply, 'ping');
    } finally {
      client.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
});

for (const native of [false, true]) describe(`sidecar server connections with direct reads (sslMode disable, ${native ? 'native socket I/O' : 'Node.js streams'})`, () => {
  let sidecar: Sidecar;
  let port: number;
  let user: string;

  before(async () => {
    const postgres = await env.postgres();
    const { app } = postgres;
    user = app.user;
    const credentials = new StaticCredentialsSource({ username: app.user, password: app.password, generation: credentialsGeneration({ username: app.user, password: app.password }) });
    sidecar = new Sidecar({
      settings: {
        listenHost: '127.0.0.1', listenPort: 0,
        database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable' },
        pool: { mode: 'transaction', poolTimeout: 10, poolRecycle: 1800, poolPrePing: true, idleTimeout: 600 },
        drainTimeout: 5,
      },
      credentials, logger: pino({ level: 'silent' }), metrics: new Registry(), ...nativeIoDeps(native),
    });
    ({ port } = await sidecar.start());
    sidecar.setGrant(2, 1);
  });

  after(async () => {
    await sidecar.close();
  });

  it('serves simple, extended and transaction traffic from several clients', async () => {
    const clients = Array.from({ length: 6 }, () => new pg.Client({ host: '127.0.0.1', port, user, database: 'app' }));
    await Promise.all(clients.map((c) => c.connect()));
    try {
      await Promise.all(clients.map(async (c, i) => {
        for (let n = 0; n < 30; n += 1) {
          const simple = await c.query<{ v: number }>(`SELECT ${i * 1000 + n} AS v`);
          assert.equal(simple.rows[0]?.v, i * 1000 + n);
          const extended = await c.query<{ v: number }>('SELECT $1::int + 1 AS v', [n]);
          assert.equal(extended.rows[0]?.v, n + 1);
        }
        await c.query('BEGIN');
        const inside = await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
        const again = await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
        await c.query('COMMIT');
        assert.equal(inside.rows[0]?.pid, again.rows[0]?.pid);
      }));
    } finally {
      await Promise.all(clients.map((c) => c.end()));
    }
  });

  it('delivers a large result intact to a client that stops reading for a while', async () => {
    const socket = netConnect({ host: '127.0.0.1', port });
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    try {
      const reader = new FrameReader();
      socket.write(buildStartupMessage({ user, database: 'app' }));
      await untilReady(socket, reader);
      const rows = 120_000;
      // About 8 MB: far beyond the socket buffers, so writes to us must queue.
      socket.write(query(`SELECT i, md5(i::text) FROM generate_series(1, ${rows}) AS i`));
      socket.pause();
      // Meanwhile the other server connection keeps serving someone else.
      const other = new pg.Client({ host: '127.0.0.1', port, user, database: 'app' });
      await other.connect();
      for (let n = 0; n < 20; n += 1) assert.equal((await other.query<{ v: string }>('SELECT $1::text AS v', [`x${n}`])).rows[0]?.v, `x${n}`);
      await other.end();
      await new Promise((r) => setTimeout(r, 300));
      const resultDone = untilReady(socket, reader);
      socket.resume();
      const messages = await resultDone;
      const dataRows = messages.filter((m) => m.type === 0x44);
      assert.equal(dataRows.length, rows);
      for (let index = 0; index < dataRows.length; index += 1) {
        const body = dataRows[index]!.body;
        // DataRow: int16 column count, then (int32 length, bytes) per column.
        const firstLength = body.readInt32BE(2);
        const i = Number(body.subarray(6, 6 + firstLength).toString());
        const digest = body.subarray(10 + firstLength, 10 + firstLength + body.readInt32BE(6 + firstLength)).toString();
        assert.equal(i, index + 1);
        assert.equal(digest, createHash('md5').update(String(i)).digest('hex'));
      }
    } finally {
      socket.destroy();
    }
  });

  it('forwards a large COPY FROM STDIN intact while the server is too busy to take it', async () => {
    const socket = netConnect({ host: '127.0.0.1', port });
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    try {
      const replies = new Replies(socket);
      socket.write(buildStartupMessage({ user, database: 'app' }));
      await replies.next();
      socket.write(query('BEGIN; CREATE TEMP TABLE copied (i int, v text) ON COMMIT DROP'));
      assert.deepEqual(errors(await replies.next()), []);
      const rows = 250_000;
      const pieces: Buffer[] = [];
      for (let first = 1; first <= rows; first += 1000) {
        let text = '';
        for (let i = first; i < first + 1000 && i <= rows; i += 1) text += `${i}\t${createHash('md5').update(String(i)).digest('hex')}\n`;
        pieces.push(message(0x64, Buffer.from(text)));
      }
      // About 10 MB sent at once behind a sleeping server: the sidecar's writes to it must queue, so the
      // sidecar has to stop reading the client rather than reuse its read buffer under queued bytes.
      socket.write(Buffer.concat([query('SELECT pg_sleep(0.5)'), query('COPY copied FROM STDIN'), ...pieces, message(0x63, Buffer.alloc(0))]));
      assert.deepEqual(errors(await replies.next()), []);
      assert.deepEqual(errors(await replies.next()), []);
      socket.write(query("SELECT count(*) || ',' || count(DISTINCT i) || ',' || min(i) || ',' || max(i) || ',' || count(*) FILTER (WHERE v <> md5(i::text)) FROM copied"));
      const result = await replies.next();
      assert.deepEqual(errors(result), []);
      const row = result.find((m) => m.type === 0x44)!.body;
      assert.equal(row.subarray(6, 6 + row.readInt32BE(2)).toString(), `${rows},${rows},1,${rows},0`);
      socket.write(query('COMMIT'));
      assert.deepEqual(errors(await replies.next()), []);
    } finally {
      socket.destroy();
    }
  });
});
