/**
 * A TCP socket that reads into one buffer of its own, reused for every read
 * (net.Socket's `onread` option): no Buffer allocation and no Readable
 * stream machinery per read on the server-to-client hot path.
 *
 * Until a direct reader is set (during the upstream login) each read is
 * copied and emitted as an ordinary 'data' event, so stream-based code works
 * unchanged. A direct reader gets a view of the shared buffer that is valid
 * only until it returns: whatever it keeps, or leaves queued in a write, it
 * must copy, or it must pause this socket until that write has drained
 * (paused, the socket does not read, so the buffer is not overwritten).
 */
import { Socket } from 'node:net';

/** Bytes read per read(2): one buffer of this size per socket. */
const READ_BUFFER_BYTES = 64 * 1024;

/**
 * Recycles the read buffers of closed DirectReadSockets: a fresh 64 KB
 * buffer per client connection is a malloc plus external memory that makes
 * V8 collect sooner, which doubled the CPU per connection under `pgbench -C`.
 */
export class ReadBufferPool {
  private readonly free: Buffer[] = [];
  private readonly maxKept: number;

  /** `maxKept`: buffers kept for reuse at most (beyond that, closed sockets' buffers are left to the GC). */
  constructor(maxKept = 256) {
    this.maxKept = maxKept;
  }

  /** A buffer for a new socket. */
  take(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafe(READ_BUFFER_BYTES);
  }

  /** Returns the buffer of a socket that can no longer read into it (closed). */
  give(buffer: Buffer): void {
    if (this.free.length < this.maxKept) this.free.push(buffer);
  }
}

/** Receives one read: bytes [0, length) of `buffer`, only valid until the call returns. */
export type DirectReader = (buffer: Buffer, length: number) => void;

/** A stream whose reads can be delivered straight to one handler. */
export interface DirectReadable {
  /** Sets (or clears, with undefined) the handler that gets reads instead of 'data' events. */
  setDirectReader(reader: DirectReader | undefined): void;
}

/** True if `stream` supports direct reads. */
export function isDirectReadable(stream: object): stream is DirectReadable {
  return stream instanceof DirectReadSocket;
}

/** What adoption needs of Node's private handle of a net.Socket (lib/net.js, Node 24). */
interface NodeSocketInternals {
  _handle?: { useUserBuffer?: unknown; readStart?: unknown } | null;
}

/**
 * A net.Socket reading into one reused buffer: connect it like any Socket,
 * or get one for an accepted connection from adoptAcceptedSocket().
 */
export class DirectReadSocket extends Socket implements DirectReadable {
  private reader: DirectReader | undefined;

  /**
   * `buffers`: where the read buffer comes from and goes back to on 'close';
   * `handle`: an accepted connection's libuv handle, taken over by adoptAcceptedSocket().
   */
  constructor(options: { buffers?: ReadBufferPool; handle?: object } = {}) {
    const { buffers, handle } = options;
    const buffer = buffers?.take() ?? Buffer.allocUnsafe(READ_BUFFER_BYTES);
    const self: { socket?: DirectReadSocket } = {};
    const onread = { buffer, callback: (bytes: number, into: Uint8Array) => self.socket!.deliver(bytes, into as Buffer) };
    // `handle` is how net.Server itself builds accepted sockets; @types/node does not list it.
    super(handle === undefined ? { onread } : ({ handle, onread, readable: true, writable: true } as ConstructorParameters<typeof Socket>[0]));
    self.socket = this;
    // After 'close' the handle is gone: nothing reads into the buffer any more.
    if (buffers !== undefined) this.once('close', () => buffers.give(buffer));
  }

  setDirectReader(reader: DirectReader | undefined): void {
    this.reader = reader;
  }

  /** True: keep reading (pausing is the reader's call, through pause()). */
  private deliver(bytes: number, buffer: Buffer): boolean {
    const reader = this.reader;
    if (reader !== undefined) reader(buffer, bytes);
    else this.emit('data', Buffer.from(buffer.subarray(0, bytes)));
    return true;
  }
}

/**
 * Turns a socket accepted by a net.Server created with `pauseOnConnect: true`
 * into a DirectReadSocket on the same connection: net.Server has no `onread`
 * option, so the accepted libuv handle (Node's private `_handle`) moves to a
 * new socket built with one, the way net.Server builds its own. The original
 * socket is left without a handle and destroyed (closing nothing). If the
 * socket is not in the expected shape (already reading, or Node's internals
 * changed), it is resumed and returned unchanged: the ordinary stream path.
 */
export function adoptAcceptedSocket(socket: Socket, buffers?: ReadBufferPool): Socket {
  const internals = socket as unknown as NodeSocketInternals;
  const handle = internals._handle;
  const adoptable = handle !== null && typeof handle === 'object' && typeof handle.useUserBuffer === 'function' &&
    typeof handle.readStart === 'function' && socket.readableFlowing === false && socket.readableLength === 0 && !socket.destroyed;
  if (!adoptable) {
    socket.resume();
    return socket;
  }
  internals._handle = null;
  socket.destroy();
  return new DirectReadSocket(buffers === undefined ? { handle } : { handle, buffers });
}
