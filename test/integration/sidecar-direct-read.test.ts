/**
 * Server connections over plaintext TCP read into one reused buffer
 * (DirectReadSocket). These tests use sslMode 'disable' so that path is the
 * one exercised, including a client too slow to take a large result at once:
 * the sidecar must pause the server rather than let the reused buffer be
 * overwritten under bytes still queued for the client.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { connect as netConnect, type Socket } from 'node:net';
import pg from 'pg';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { testEnvironment } from '../support/hooks.ts';
import { Sidecar, StaticCredentialsSource } from '../../src/sidecar/index.ts';
import { credentialsGeneration } from '../../src/core/credentials.ts';
import { FrameReader, buildStartupMessage } from '../../src/core/protocol/index.ts';

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

function query(sql: string): Buffer {
  const text = Buffer.from(`${sql}\0`, 'utf8');
  const header = Buffer.alloc(5);
  header[0] = 0x51;
  header.writeInt32BE(4 + text.length, 1);
  return Buffer.concat([header, text]);
}

describe('sidecar server connections with direct reads (sslMode disable)', () => {
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
      credentials, logger: pino({ level: 'silent' }), metrics: new Registry(),
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
});
