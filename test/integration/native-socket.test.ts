/**
 * The native socket I/O (native/socket-io.c behind NativeSocket) on real
 * loopback and Unix-domain connections: what the sidecar relies on from a
 * socket (direct reads into lent or shared buffers, writes the kernel takes
 * only in part, pause, end, reset, destroy with a write pending) must hold
 * exactly as with Node's own sockets.
 */
import { steadyNow } from '../../src/ops/clock.ts';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect as netConnect, createServer, Socket, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ReadBufferPool } from '../../src/sidecar/direct-read-socket.ts';
import type { NativeSocket} from '../../src/sidecar/native-socket.ts';
import { adoptUnreadSocket, batchClock, writeRange, type NativeSocketIo } from '../../src/sidecar/native-socket.ts';
import { checkOwnBufferLending, echo, type SeenRead } from '../support/read-buffer-checks.ts';
import { testNativeIo } from '../support/sidecar-fixture.ts';

/** A server whose accepted connections become NativeSockets, handed to `onSocket`. */
async function nativeServer(io: NativeSocketIo, onSocket: (socket: NativeSocket) => void, options: { buffers?: ReadBufferPool; copyReads?: boolean; path?: string } = {}): Promise<{ server: Server; connect: (allowHalfOpen?: boolean) => Promise<Socket> }> {
  const server = createServer({ pauseOnConnect: true }, (socket) => {
    const native = adoptUnreadSocket(io, socket, options);
    assert.ok(native, 'the accepted connection was not adopted');
    onSocket(native);
  });
  await new Promise<void>((resolve) => (options.path ? server.listen(options.path, resolve) : server.listen(0, '127.0.0.1', resolve)));
  const connect = async (allowHalfOpen = false): Promise<Socket> => {
    const client = options.path ? netConnect({ path: options.path }) : netConnect({ host: '127.0.0.1', port: (server.address() as { port: number }).port, allowHalfOpen });
    await new Promise<void>((resolve, reject) => client.once('connect', resolve).once('error', reject));
    return client;
  };
  return { server, connect };
}

/** A native socket whose peer does not read until `client` is resumed: for writes the kernel cannot take at once. */
async function withPausedPeer(io: NativeSocketIo, fn: (adopted: NativeSocket, client: Socket) => Promise<void>): Promise<void> {
  let adopted: NativeSocket | undefined;
  const { server, connect } = await nativeServer(io, (native) => (adopted = native));
  const client = await connect();
  client.pause();
  try {
    await new Promise((r) => setTimeout(r, 20));
    await fn(adopted!, client);
  } finally {
    client.destroy();
    await closeServer(server);
  }
}

function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

function pattern(length: number, seed: number): Buffer {
  const payload = Buffer.alloc(length);
  for (let i = 0; i < length; i += 1) payload[i] = (i * 31 + seed) % 251;
  return payload;
}

/** Resumes `socket` and resolves with the first `length` bytes (or more) it reads. */
function receive(socket: Socket, length: number): Promise<Buffer> {
  const received: Buffer[] = [];
  let total = 0;
  const all = new Promise<Buffer>((resolve) => socket.on('data', (chunk: Buffer) => {
    received.push(chunk);
    total += chunk.length;
    if (total >= length) resolve(Buffer.concat(received));
  }));
  socket.resume();
  return all;
}

describe('NativeSocket (native socket I/O)', () => {
  let io: NativeSocketIo;

  before(() => {
    io = testNativeIo(true)!;
  });

  it('echoes through a lent buffer, queueing what the kernel does not take, and returns its buffer to the pool on close', async () => {
    const buffers = new ReadBufferPool();
    const known = Buffer.allocUnsafe(64 * 1024);
    buffers.give(known);
    const adopted: NativeSocket[] = [];
    const { server, connect } = await nativeServer(io, (native) => {
      adopted.push(native);
      native.setDirectReader((buffer, length, lent) => {
        assert.ok(lent);
        native.write(Buffer.from(buffer.subarray(0, length)));
      });
    }, { buffers });
    const client = await connect();
    try {
      const payload = pattern(3_000_000, 7);
      assert.ok((await echo(client, payload)).equals(payload));
      const closed = new Promise<void>((resolve) => adopted[0]!.once('close', () => resolve()));
      client.end();
      await closed;
      assert.equal(buffers.take(), known, 'the read buffer went back to the pool on close');
    } finally {
      client.destroy();
      await closeServer(server);
    }
  });

  it('with copyReads, many connections share one read buffer and each reader keeps intact copies', async () => {
    const buffers = new ReadBufferPool();
    let lentReads = 0;
    const { server, connect } = await nativeServer(io, (native) => {
      native.setDirectReader((buffer, length, lent) => {
        if (lent) lentReads += 1;
        const kept = buffer.subarray(0, length);
        setTimeout(() => native.write(kept), 5);
      });
    }, { buffers, copyReads: true });
    const clients = await Promise.all(Array.from({ length: 20 }, () => connect()));
    try {
      await Promise.all(clients.map(async (client, n) => {
        const payload = Buffer.alloc(200_000, n + 1);
        assert.ok((await echo(client, payload)).equals(payload), `client ${n} got back other bytes than it sent`);
      }));
      assert.equal(lentReads, 0, 'reads of the shared buffer were lent instead of copied');
    } finally {
      for (const c of clients) c.destroy();
      await closeServer(server);
    }
  });

  it('with copyReads, the reads of one poll go into the shared buffer side by side and come in one call, each intact', async () => {
    const buffers = new ReadBufferPool();
    // A microtask runs once the call into JavaScript returns: reads with the same count came in the same call.
    let calls = 0;
    let counting = false;
    const seen: { client: number; call: number; text: string }[] = [];
    const { server, connect } = await nativeServer(io, (native) => {
      native.setDirectReader((buffer, length) => {
        if (!counting) {
          counting = true;
          queueMicrotask(() => {
            calls += 1;
            counting = false;
          });
        }
        const text = buffer.toString('latin1', 0, length);
        seen.push({ client: Number(text.slice(0, 2)), call: calls, text });
      });
    }, { buffers, copyReads: true });
    const clients = await Promise.all(Array.from({ length: 8 }, () => connect()));
    try {
      await new Promise((r) => setTimeout(r, 20));
      // Each 3 KB, so that the 64 KB buffer holds all eight; sent while the event loop is held, so one poll finds them all.
      const payloads = clients.map((_, n) => `${String(n).padStart(2, '0')}${String.fromCharCode(65 + n).repeat(3000)}`);
      clients.forEach((client, n) => client.write(payloads[n]!));
      const until = Date.now() + 30;
      while (Date.now() < until);
      const deadline = Date.now() + 5_000;
      while (seen.length < 8 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
      assert.deepEqual(seen.map((s) => s.client).sort(), [0, 1, 2, 3, 4, 5, 6, 7]);
      for (const s of seen) assert.equal(s.text, payloads[s.client], `client ${s.client}'s read was overwritten or cut`);
      assert.equal(new Set(seen.map((s) => s.call)).size, 1, 'the reads into the shared buffer came in more than one call');
    } finally {
      for (const c of clients) c.destroy();
      await closeServer(server);
    }
  });

  it('with copyReads, lends reads of a buffer of its own while asked to, and gives it back afterwards', async () => {
    const buffers = new ReadBufferPool();
    const known = Buffer.allocUnsafe(64 * 1024);
    buffers.give(known);
    const reads: SeenRead[] = [];
    let adopted: NativeSocket | undefined;
    const { server, connect } = await nativeServer(io, (native) => {
      adopted = native;
      native.setDirectReader((buffer, length, lent) => {
        reads.push({ lent, own: buffer === known, text: buffer.subarray(0, length).toString() });
        native.write(Buffer.from('k'));
      });
    }, { buffers, copyReads: true });
    const client = await connect();
    try {
      await checkOwnBufferLending(client, () => adopted!, reads, buffers, known);
    } finally {
      client.destroy();
      await closeServer(server);
    }
  });

  it('writes 16 MB to a peer that does not read for a while: queued in order, a write callback once flushed, nothing lost', async () => {
    await withPausedPeer(io, async (adopted, client) => {
      const pieces = Array.from({ length: 64 }, (_, i) => pattern(256 * 1024, i));
      let tookAll = true;
      for (const piece of pieces) tookAll = adopted.write(piece) && tookAll;
      assert.ok(adopted.writableLength > 0, 'the kernel took 16 MB at once: nothing was queued');
      assert.equal(tookAll, false, 'write() did not ask the caller to wait');
      let flushed = false;
      adopted.write(Buffer.alloc(0), () => (flushed = true));
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(flushed, false, 'the write callback ran before the peer read anything');
      assert.ok((await receive(client, 64 * 256 * 1024)).equals(Buffer.concat(pieces)), 'the bytes arrived out of order or changed');
      await new Promise((r) => setTimeout(r, 20));
      assert.ok(flushed, 'the write callback did not run once everything was flushed');
      assert.equal(adopted.writableLength, 0);
    });
  });

  it('writes ranges of a buffer by offset and length, at once or queued behind a peer that does not read, byte for byte', async () => {
    await withPausedPeer(io, async (adopted, client) => {
      const source = pattern(1024 * 1024, 3);
      // Ranges of every shape: empty, one byte, at either end, and 16 MB in all, so that the kernel stops taking them.
      const ranges: [number, number][] = [[0, 0], [5, 6], [1024 * 1024 - 7, 1024 * 1024]];
      for (let i = 0; i < 16; i += 1) ranges.push([i * 1000, 1024 * 1024 - i * 999]);
      for (const [start, end] of ranges) writeRange(adopted, source, start, end);
      assert.ok(adopted.writableLength > 0, 'the kernel took 16 MB at once: nothing was queued');
      const expected = Buffer.concat(ranges.map(([start, end]) => source.subarray(start, end)));
      assert.ok((await receive(client, expected.length)).equals(expected), 'the bytes arrived out of order or changed');
      const handle = (adopted as unknown as { handle: Parameters<NativeSocketIo['write']>[0] }).handle;
      assert.throws(() => io.write(handle, source, 1024 * 1024 - 1, 2), RangeError);
      assert.throws(() => io.write(handle, source, -1, 1), RangeError);
    });
  });

  it('gives the pool one clock reading for all the events of a poll, and the steady clock otherwise', async () => {
    const now = batchClock(io);
    const before = steadyNow();
    assert.ok(Math.abs(now() - before) <= 1);
    const readings: number[][] = [];
    const { server, connect } = await nativeServer(io, (native) => native.setDirectReader(() => {
      const first = now();
      // Time passes within the batch, yet its reading stays.
      const until = steadyNow() + 3;
      while (steadyNow() < until);
      readings.push([first, now(), steadyNow()]);
    }));
    const client = await connect();
    try {
      client.write('x');
      while (readings.length === 0) await new Promise((r) => setTimeout(r, 5));
      const [first, second, after] = readings[0]!;
      assert.equal(second, first);
      assert.ok(after! - first! >= 3 && first! >= before);
      await new Promise((r) => setTimeout(r, 5));
      assert.ok(now() >= after!, 'outside a batch the clock is read again');
    } finally {
      client.destroy();
      await closeServer(server);
    }
  });

  it('reads nothing while paused and everything after resume', async () => {
    const reads: string[] = [];
    let adopted: NativeSocket | undefined;
    const { server, connect } = await nativeServer(io, (native) => {
      adopted = native;
      native.setDirectReader((buffer, length) => reads.push(buffer.subarray(0, length).toString()));
      native.pause();
    });
    const client = await connect();
    try {
      client.write('held');
      await new Promise((r) => setTimeout(r, 100));
      assert.deepEqual(reads, []);
      assert.ok(adopted!.isPaused());
      adopted!.resume();
      await new Promise((r) => setTimeout(r, 100));
      assert.deepEqual(reads, ['held']);
    } finally {
      client.destroy();
      await closeServer(server);
    }
  });

  it('sees the peer end the connection (end, then close), and its own end() arrives after its data', async () => {
    const events: string[] = [];
    let adopted: NativeSocket | undefined;
    const { server, connect } = await nativeServer(io, (native) => {
      adopted = native;
      native.on('data', (chunk: Buffer) => events.push(`data ${chunk.toString()}`));
      native.on('end', () => events.push('end'));
      native.on('close', () => events.push('close'));
    });
    // Half-open, so that the peer can still send after our end.
    const client = await connect(true);
    try {
      const fromPeer: Buffer[] = [];
      const peerEnded = new Promise<void>((resolve) => client.on('data', (c: Buffer) => fromPeer.push(c)).on('end', resolve));
      adopted!.write(Buffer.from('bye'));
      adopted!.end(Buffer.from('!'));
      await peerEnded;
      assert.equal(Buffer.concat(fromPeer).toString(), 'bye!');
      const closed = new Promise<void>((resolve) => adopted!.once('close', () => resolve()));
      client.end('last');
      await closed;
      assert.deepEqual(events, ['data last', 'end', 'close']);
    } finally {
      client.destroy();
      await closeServer(server);
    }
  });

  it('reports a reset by the peer as ECONNRESET, then closes', async () => {
    let adopted: NativeSocket | undefined;
    const { server, connect } = await nativeServer(io, (native) => (adopted = native));
    const client = await connect();
    try {
      await new Promise((r) => setTimeout(r, 20));
      const failed = new Promise<Error & { code?: string }>((resolve) => adopted!.once('error', resolve));
      const closed = new Promise<void>((resolve) => adopted!.once('close', () => resolve()));
      client.resetAndDestroy();
      const error = await failed;
      assert.equal(error.code, 'ECONNRESET');
      await closed;
      assert.ok(adopted!.destroyed);
    } finally {
      await closeServer(server);
    }
  });

  it('fails a write still pending when destroyed, and delivers nothing afterwards', async () => {
    let adopted: NativeSocket | undefined;
    const reads: number[] = [];
    const { server, connect } = await nativeServer(io, (native) => {
      adopted = native;
      native.setDirectReader((_b, length) => reads.push(length));
    });
    const client = await connect();
    client.pause();
    try {
      await new Promise((r) => setTimeout(r, 20));
      let result: Error | null | undefined;
      adopted!.write(pattern(32 * 1024 * 1024, 1), (error?: Error | null) => (result = error));
      assert.ok(adopted!.writableLength > 0);
      adopted!.destroy();
      await new Promise((r) => setTimeout(r, 50));
      assert.ok(result instanceof Error, 'the pending write was not failed');
      client.write('after');
      await new Promise((r) => setTimeout(r, 50));
      assert.deepEqual(reads, []);
    } finally {
      client.destroy();
      await closeServer(server);
    }
  });

  it('works over a Unix-domain socket, where TCP_NODELAY does not apply', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'poolkeeper-native-'));
    const { server, connect } = await nativeServer(io, (native) => {
      native.setNoDelay(true);
      native.setDirectReader((buffer, length) => native.write(Buffer.from(buffer.subarray(0, length))));
    }, { path: join(dir, 'echo.sock') });
    const client = await connect();
    try {
      const payload = pattern(500_000, 3);
      assert.ok((await echo(client, payload)).equals(payload));
    } finally {
      client.destroy();
      await closeServer(server);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('takes over an outgoing connection made while paused, as the sidecar connects to PostgreSQL', async () => {
    const server = createServer((peer) => peer.on('data', (chunk: Buffer) => peer.write(chunk)));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const socket = new Socket().pause();
    socket.connect({ host: '127.0.0.1', port: (server.address() as { port: number }).port });
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const native = adoptUnreadSocket(io, socket);
    assert.ok(native, 'the connected socket was not adopted');
    try {
      const got = new Promise<string>((resolve) => native.once('data', (chunk: Buffer) => resolve(chunk.toString())));
      native.write(Buffer.from('ping'));
      assert.equal(await got, 'ping');
      assert.ok(socket.destroyed, 'the Node socket was left open beside the native one');
    } finally {
      native.destroy();
      await closeServer(server);
    }
  });

  it('relay() (the bench\'s floor) sends every read on in C, waits for a peer that does not read without losing or reordering a byte, and still reports the end', async () => {
    const adopted: NativeSocket[] = [];
    const { server, connect } = await nativeServer(io, (native) => adopted.push(native), { buffers: new ReadBufferPool() });
    const sender = await connect();
    const receiver = await connect();
    receiver.pause();
    try {
      await new Promise((r) => setTimeout(r, 20));
      assert.equal(adopted.length, 2);
      const [fromSender, toReceiver] = adopted as [NativeSocket, NativeSocket];
      fromSender.relayTo(toReceiver);
      toReceiver.relayTo(fromSender);
      // More than both sockets' kernel buffers: the relay must hold the rest and stop reading until the receiver reads.
      const payload = pattern(16 * 1024 * 1024, 3);
      sender.write(payload);
      await new Promise((r) => setTimeout(r, 200));
      assert.ok((await receive(receiver, payload.length)).equals(payload), 'the relayed bytes changed or came out of order');
      const back = new Promise<Buffer>((resolve) => sender.once('data', (chunk: Buffer) => resolve(chunk)));
      receiver.write('pong');
      assert.equal((await back).toString(), 'pong');
      const ended = new Promise<void>((resolve) => fromSender.once('close', () => resolve()));
      sender.end();
      await ended;
    } finally {
      sender.destroy();
      receiver.destroy();
      for (const socket of adopted) socket.destroy();
      await closeServer(server);
    }
  });

  it('quietLoop() turns off libuv\'s idle-time metrics (one poll fewer per wake-up), in a process of its own', async () => {
    // The idle time of a loop that only waits for a timer: about all of it with the metrics on, none once they are off.
    const idleMs = (quiet: boolean): Promise<{ quiet: unknown; idle: number }> => new Promise((resolve, reject) => {
      const module = fileURLToPath(new URL('../../src/sidecar/native-socket.ts', import.meta.url));
      const script = `
        import { performance } from 'node:perf_hooks';
        import { loadNativeSocketIo } from ${JSON.stringify(module)};
        const loaded = loadNativeSocketIo();
        const quiet = ${quiet} ? loaded.io.quietLoop() : undefined;
        const start = performance.eventLoopUtilization();
        setTimeout(() => console.log(JSON.stringify({ quiet, idle: performance.eventLoopUtilization(start).idle })), 200);`;
      execFile(process.execPath, ['--input-type=module', '-e', script], (error: Error | null, stdout: string) => (error ? reject(error) : resolve(JSON.parse(stdout) as { quiet: unknown; idle: number })));
    });
    const [on, off] = await Promise.all([idleMs(false), idleMs(true)]);
    assert.ok(on.idle > 100, `with the metrics on, the loop's idle time grows while it waits (${on.idle} ms)`);
    assert.equal(off.quiet, true);
    assert.equal(off.idle, 0);
  });
});
