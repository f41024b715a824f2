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
 *
 * A socket created with `copyReads` reads into one buffer shared by every
 * such socket, and hands its reader a copy of each read, until it is told
 * to keep a buffer of its own (setOwnReadBuffer: a client while it holds a
 * server connection); then it lends views as above. An idle, waiting or
 * half-open client thus costs no 64 KB of its own, so thousands of them
 * stay within the sidecar's memory limit, while a client streaming a large
 * query or COPY goes through without a copy or an allocation per read.
 * Server connections (as many as the grant) always keep their own buffer.
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

  private sharedBuffer: Buffer | undefined;

  /** The one buffer that sockets with `copyReads` read into (each read is copied out before the next). */
  shared(): Buffer {
    this.sharedBuffer ??= Buffer.allocUnsafe(READ_BUFFER_BYTES);
    return this.sharedBuffer;
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

/**
 * Receives one read: bytes [0, length) of `buffer`. `lent`: a view of the
 * socket's own buffer, valid only until the call returns (or while the
 * socket stays paused); otherwise a copy the reader may keep.
 */
export type DirectReader = (buffer: Buffer, length: number, lent: boolean) => void;

/** A stream whose reads can be delivered straight to one handler. */
export interface DirectReadable {
  /** Sets (or clears, with undefined) the handler that gets reads instead of 'data' events. */
  setDirectReader(reader: DirectReader | undefined): void;
  /** Whether reads go to a buffer of the socket's own (lent) or the shared one (copied); only for sockets made with copyReads. */
  setOwnReadBuffer(own: boolean): void;
}

/** True if `stream` supports direct reads. */
export function isDirectReadable(stream: object): stream is DirectReadable {
  return typeof (stream as Partial<DirectReadable>).setDirectReader === 'function' && typeof (stream as Partial<DirectReadable>).setOwnReadBuffer === 'function';
}

/**
 * Which buffer each next read goes into (see the module comment): the
 * socket's own, lent to its reader, or, with copyReads while no own buffer
 * is wanted, the pool's shared one, whose reads are copied out.
 */
export class ReadTarget {
  private readonly pool: ReadBufferPool | undefined;
  private readonly sharedBuffer: Buffer | undefined;
  private own: Buffer | undefined;
  private ownWanted: boolean;

  /** `copyReads` needs `pool` (its shared buffer); without either, the socket keeps a buffer of its own. */
  constructor(pool: ReadBufferPool | undefined, copyReads: boolean) {
    this.pool = pool;
    this.sharedBuffer = copyReads ? pool?.shared() : undefined;
    this.ownWanted = this.sharedBuffer === undefined;
    if (this.ownWanted) this.own = pool?.take() ?? Buffer.allocUnsafe(READ_BUFFER_BYTES);
  }

  /** True if a read into `buffer` is lent to the reader (not the shared buffer, which is copied out). */
  lends(buffer: Buffer): boolean {
    return buffer !== this.sharedBuffer;
  }

  /** With copyReads: whether reads from the next one on go to an own buffer. */
  wantOwn(own: boolean): void {
    if (this.sharedBuffer !== undefined) this.ownWanted = own;
  }

  /** The buffer for the next read; `paused`: the socket is paused (its reader may hold views of the own buffer). */
  next(paused: boolean): Buffer {
    const shared = this.sharedBuffer;
    if (shared === undefined) return this.own!;
    if (this.ownWanted) {
      this.own ??= this.pool!.take();
      return this.own;
    }
    // A paused socket's reader may still hold views of its own buffer (writes not yet drained): keep it until reads resume.
    if (this.own !== undefined && paused) return this.own;
    if (this.own !== undefined) {
      this.pool!.give(this.own);
      this.own = undefined;
    }
    return shared;
  }

  /** The socket closed: nothing reads into its own buffer any more, which goes back to the pool. */
  release(): void {
    if (this.own !== undefined) this.pool?.give(this.own);
    this.own = undefined;
  }
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
  private readonly target: ReadTarget;

  /**
   * `buffers`: where the read buffer comes from and goes back to on 'close';
   * `handle`: an accepted connection's libuv handle, taken over by adoptAcceptedSocket();
   * `copyReads`: read into the pool's shared buffer and deliver copies, until setOwnReadBuffer(true).
   */
  constructor(options: { buffers?: ReadBufferPool; handle?: object; copyReads?: boolean } = {}) {
    const { buffers, handle } = options;
    const target = new ReadTarget(buffers, options.copyReads === true && buffers !== undefined);
    const self: { socket?: DirectReadSocket } = {};
    const first = target.next(false);
    const deliver = (bytes: number, into: Uint8Array): boolean => self.socket!.deliver(bytes, into as Buffer);
    // Node asks a function for the buffer of every next read (lib/internal/stream_base_commons.js).
    const onread = target.lends(first) ? { buffer: first, callback: deliver } : { buffer: () => target.next(self.socket?.isPaused() === true), callback: deliver };
    // `handle` is how net.Server itself builds accepted sockets; @types/node does not list it.
    super(handle === undefined ? { onread } : ({ handle, onread, readable: true, writable: true } as ConstructorParameters<typeof Socket>[0]));
    self.socket = this;
    this.target = target;
    // After 'close' the handle is gone: nothing reads into the buffer any more.
    if (buffers !== undefined) this.once('close', () => target.release());
  }

  setDirectReader(reader: DirectReader | undefined): void {
    this.reader = reader;
  }

  /**
   * With copyReads: true, reads from the next one on go to a buffer of this
   * socket's own and are lent; false, back to the shared buffer and copies
   * (the own buffer returns to the pool once no view of it can be held).
   */
  setOwnReadBuffer(own: boolean): void {
    this.target.wantOwn(own);
  }

  /** True: keep reading (pausing is the reader's call, through pause()). */
  private deliver(bytes: number, buffer: Buffer): boolean {
    const reader = this.reader;
    if (reader === undefined) this.emit('data', Buffer.from(buffer.subarray(0, bytes)));
    else if (this.target.lends(buffer)) reader(buffer, bytes, true);
    // The shared buffer is overwritten by the next read of any socket: the reader gets its own copy.
    else reader(Buffer.from(buffer.subarray(0, bytes)), bytes, false);
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
export function adoptAcceptedSocket(socket: Socket, buffers?: ReadBufferPool, options: { copyReads?: boolean } = {}): Socket {
  const handle = takeUnreadHandle(socket);
  if (handle === undefined) {
    socket.resume();
    return socket;
  }
  return new DirectReadSocket(buffers === undefined ? { handle } : { handle, buffers, copyReads: options.copyReads === true });
}

/**
 * Detaches the libuv handle (Node's private `_handle`) of a connected socket
 * that has read nothing yet (accepted with `pauseOnConnect`, or connected
 * while paused), and destroys the now handle-less socket without closing the
 * connection; `accept(handle)` may refuse it first (undefined: nothing taken).
 * Undefined if the socket is not in that shape (already reading, or Node's
 * internals changed).
 */
export function takeUnreadHandle(socket: Socket, accept: (handle: object) => boolean = () => true): object | undefined {
  const internals = socket as unknown as NodeSocketInternals;
  const handle = internals._handle;
  const adoptable = handle !== null && typeof handle === 'object' && typeof handle.useUserBuffer === 'function' &&
    typeof handle.readStart === 'function' && socket.readableFlowing === false && socket.readableLength === 0 && !socket.destroyed;
  if (!adoptable || !accept(handle)) return undefined;
  internals._handle = null;
  socket.destroy();
  return handle;
}
