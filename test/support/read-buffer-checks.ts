/**
 * Checks shared by the tests of the sockets that read into lent buffers
 * (DirectReadSocket on Node's streams, NativeSocket on the native I/O).
 */
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import type { DirectReadable, ReadBufferPool } from '../../src/sidecar/direct-read-socket.ts';

/** One read as the socket's reader saw it. */
export interface SeenRead {
  lent: boolean;
  /** It landed in the pool's buffer `known` (the own buffer the socket took). */
  own: boolean;
  text: string;
}

/**
 * Sends a..e from `client` (each answered by one byte) while the adopted
 * socket is asked for an own buffer after 'a' and gives it up after 'c':
 * reads of the shared buffer are copies, reads of the own buffer are lent,
 * and the own buffer (`known`, the pool's only free one) goes back to the pool.
 */
export async function checkOwnBufferLending(client: Socket, adopted: () => DirectReadable, reads: readonly SeenRead[], buffers: ReadBufferPool, known: Buffer): Promise<void> {
  const send = (text: string): Promise<void> => new Promise<void>((resolve) => {
    client.once('data', () => resolve());
    client.write(text);
  });
  await send('a');
  adopted().setOwnReadBuffer(true);
  // The buffer of each read is chosen after the one before: 'b' still lands in the shared one.
  await send('b');
  await send('c');
  adopted().setOwnReadBuffer(false);
  await send('d');
  await send('e');
  assert.deepEqual(reads.map((r) => r.text), ['a', 'b', 'c', 'd', 'e']);
  assert.deepEqual(reads.map((r) => r.lent), [false, false, true, true, false], JSON.stringify(reads));
  assert.ok(reads[2]!.own && reads[3]!.own, 'the own buffer came from the pool');
  assert.equal(buffers.take(), known, 'the own buffer went back to the pool once it was no longer wanted');
}

/** Writes `payload` and collects as many bytes back. */
export function echo(client: Socket, payload: Buffer): Promise<Buffer> {
  const received: Buffer[] = [];
  let length = 0;
  return new Promise<Buffer>((resolve) => {
    client.on('data', (chunk: Buffer) => {
      received.push(chunk);
      length += chunk.length;
      if (length >= payload.length) resolve(Buffer.concat(received));
    });
    client.write(payload);
  });
}
