/**
 * A connected socket whose reads and writes are native system calls
 * (native/socket-io.c) instead of Node's stream path, behind the same Duplex
 * and DirectReadable interfaces the sidecar uses for a DirectReadSocket.
 *
 * Reads: the native side reads into a buffer this class lends it; the reads
 * of all sockets that one poll of the event loop found ready come in one call
 * (SocketEvents); the bytes reach the direct reader exactly as a
 * DirectReadSocket delivers them (lent views of the socket's own buffer, or
 * copies out of the shared one). Writes: when nothing is queued, write()
 * (or writeRange(), for a run inside a buffer) makes one write(2) straight
 * away; what the kernel does not take, and every write while something is
 * queued or corked, goes through the Writable machinery (_write/_writev),
 * which waits for the socket to become writable.
 *
 * A plain TCP or Unix-domain connection only: TLS and SSH channels keep
 * Node's streams.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Duplex } from 'node:stream';
import { getSystemErrorName } from 'node:util';
import type { Socket } from 'node:net';
import { ReadTarget, takeUnreadHandle, type DirectReadable, type DirectReader, type ReadBufferPool } from './direct-read-socket.ts';
import { steadyNow } from '../ops/clock.ts';

/** An open native socket (opaque). */
export type NativeHandle = object & { readonly __nativeSocket: unique symbol };

/** The functions of the native module (native/socket-io.c). */
export interface NativeSocketIo {
  /** Events the native side queues at most before it delivers them. */
  readonly queueEvents: number;
  /**
   * Once, before open(): every event of every socket is written into `queue`
   * (queue[0] events, then socket id, kind, value and offset of each) and `dispatch()`
   * is called once after each poll of the event loop that found any.
   */
  listen(dispatch: () => void, queue: Int32Array): void;
  /** Watches a duplicate of `fd`; its events carry `id`. */
  open(fd: number, id: number): NativeHandle;
  /** Reads go into `buffer`; `shared`: other sockets read into it too (each read at an offset of its own within a batch). */
  setBuffer(handle: NativeHandle, buffer: Buffer, shared: boolean): void;
  reading(handle: NativeHandle, on: boolean): void;
  /**
   * One write(2) of `chunk`, or of `length` bytes of it from `offset`:
   * undefined if all were written, else the bytes written, or -errno.
   */
  write(handle: NativeHandle, chunk: Buffer, offset?: number, length?: number): number | undefined;
  waitWritable(handle: NativeHandle): void;
  shutdown(handle: NativeHandle): number;
  setNoDelay(handle: NativeHandle, on: boolean): number;
  close(handle: NativeHandle): void;
  /**
   * Turns off libuv's idle-time metrics, which cost one more poll(2) each
   * time the event loop goes idle; performance.eventLoopUtilization() then
   * no longer advances. False if this libuv's layout is not known.
   */
  quietLoop(): boolean;
  /**
   * TCP keepalives (idle, interval, count) and TCP_USER_TIMEOUT on socket
   * `fd`: 0, or -errno.
   */
  tcpKeepalive(fd: number, idleSeconds: number, intervalSeconds: number, count: number, userTimeoutMs: number): number;
  /**
   * Every read of `from` is sent on to `to` by the native side, with no
   * JavaScript; only an end or an error is delivered. `from` must read into a
   * buffer of its own. The sidecar does not use it: the bench measures with
   * it what any proxy in this event loop costs at least.
   */
  relay(from: NativeHandle, to: NativeHandle): void;
}

const EVENT_DATA = 0;
const EVENT_EOF = 1;
const EVENT_ERROR = 2;
const EVENT_WRITABLE = 3;
const EAGAIN = -11;
/** `offset`: where in the socket's buffer a read's bytes start (0 but in the shared buffer). */
type EventHandler = (kind: number, value: number, offset: number) => void;
/** Int32s per queued event: socket id, kind, value, offset. */
const EVENT_INTS = 4;

/**
 * The sockets of one loaded native module, by the id their events carry, and
 * the one function the module calls with the events of each poll: entering
 * JavaScript costs about a microsecond of CPU, and under load one poll finds
 * several sockets ready.
 */
class SocketEvents {
  private readonly handlers = new Map<number, EventHandler>();
  private readonly queue: Int32Array;
  private nextId = 1;
  /** While a batch is delivered: its clock reading (ms since the epoch) once taken, else 0. */
  private batchTime = 0;
  private batching = false;

  constructor(io: NativeSocketIo) {
    this.queue = new Int32Array(1 + EVENT_INTS * io.queueEvents);
    io.listen(() => this.dispatch(), this.queue);
  }

  /** Registers a socket's handler; the id to open it with. */
  add(handler: EventHandler): number {
    let id = this.nextId;
    while (this.handlers.has(id)) id = id >= 0x7fffffff ? 1 : id + 1;
    this.nextId = id >= 0x7fffffff ? 1 : id + 1;
    this.handlers.set(id, handler);
    return id;
  }

  /**
   * steadyNow(), read at most once per batch of events while one is being
   * delivered: the pool reads the clock when it lends a connection and when it
   * takes it back, twice per transaction, and a batch holds several.
   */
  now(): number {
    if (!this.batching) return steadyNow();
    if (this.batchTime === 0) this.batchTime = steadyNow();
    return this.batchTime;
  }

  /** A closed socket: events still queued for it are dropped. */
  remove(id: number): void {
    this.handlers.delete(id);
  }

  private dispatch(): void {
    const queue = this.queue;
    const count = queue[0]!;
    // One socket's failure must not lose the others' reads: the first error is thrown once all are delivered.
    let failed = false;
    let failure: unknown;
    this.batching = true;
    this.batchTime = 0;
    for (let i = 0, at = 1; i < count; i += 1, at += EVENT_INTS) {
      const handler = this.handlers.get(queue[at]!);
      if (handler === undefined) continue;
      try {
        handler(queue[at + 1]!, queue[at + 2]!, queue[at + 3]!);
      } catch (error) {
        if (!failed) failure = error;
        failed = true;
      }
    }
    this.batching = false;
    if (failed) throw failure;
  }
}

const socketEvents = new WeakMap<NativeSocketIo, SocketEvents>();

/** The SocketEvents of `io`, set up on first use. */
function eventsOf(io: NativeSocketIo): SocketEvents {
  let events = socketEvents.get(io);
  if (events === undefined) {
    events = new SocketEvents(io);
    socketEvents.set(io, events);
  }
  return events;
}

/**
 * A clock for the pool (steadyNow's): while the native sockets' events
 * of one poll are handled, one reading for all of them (see SocketEvents.now).
 */
export function batchClock(io: NativeSocketIo): () => number {
  const events = eventsOf(io);
  return () => events.now();
}

/**
 * Writes `pieces` in order, as one write: a NativeSocket gets them joined
 * (one system call, and none of the Writable buffering that cork() and
 * uncork() go through); another stream is corked around them.
 */
export function writePieces(out: Duplex, pieces: readonly Buffer[]): void {
  if (pieces.length === 1) out.write(pieces[0]!);
  else if (pieces.length > 1) {
    if (out instanceof NativeSocket) {
      out.write(Buffer.concat(pieces));
      return;
    }
    out.cork();
    for (const piece of pieces) out.write(piece);
    out.uncork();
  }
}

/** Writes bytes [start, end) of `buffer` to `out`, as `out.write(buffer.subarray(start, end))` (a NativeSocket makes no view). */
export function writeRange(out: Duplex, buffer: Buffer, start: number, end: number): void {
  if (out instanceof NativeSocket) out.writeRange(buffer, start, end);
  else out.write(buffer.subarray(start, end));
}

/** Where scripts/build-native.sh puts the module, under the package root. */
const MODULE_FILE = join('build', 'socket-io.node');

/**
 * The built module in the nearest directory above this file that has one:
 * the package root, from src/sidecar, from dist/sidecar in the image, and
 * from a compiled copy of the sources inside the repository.
 */
function findNativeModule(): string | undefined {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let level = 0; level < 6; level += 1) {
    const candidate = join(dir, MODULE_FILE);
    if (existsSync(candidate)) return candidate;
    const parent = dirname(dir);
    if (parent === dir) break;
    dir = parent;
  }
  return undefined;
}

/**
 * Loads the native module; the reason it cannot be used otherwise (not
 * built, another platform, a load error), for the caller to log.
 */
export function loadNativeSocketIo(path: string | undefined = findNativeModule()): { io: NativeSocketIo } | { reason: string } {
  if (process.platform !== 'linux') return { reason: `native socket I/O is built for Linux only (this is ${process.platform})` };
  if (path === undefined) return { reason: `native socket I/O not built (no ${MODULE_FILE} above ${dirname(fileURLToPath(import.meta.url))}); run scripts/build-native.sh` };
  try {
    const loaded = createRequire(import.meta.url)(path) as NativeSocketIo;
    if (typeof loaded.open !== 'function' || typeof loaded.write !== 'function') return { reason: `${path} is not the native socket module` };
    return { io: loaded };
  } catch (error) {
    return { reason: `native socket I/O not loaded (${(error as Error).message.split('\n')[0]}); run scripts/build-native.sh` };
  }
}

/** An Error as Node's sockets give them: `code` (ECONNRESET, EPIPE...), `errno`, `syscall`. */
function systemError(negativeErrno: number, syscall: string): Error {
  let code: string;
  try {
    code = getSystemErrorName(negativeErrno);
  } catch {
    code = `E${-negativeErrno}`;
  }
  return Object.assign(new Error(`${syscall} ${code}`), { code, errno: negativeErrno, syscall });
}

/** What a Node socket's private libuv handle offers here (lib/net.js, Node 24). */
interface NodeHandle {
  fd?: number;
  close?: (callback?: () => void) => void;
}

/** The file descriptor of a Node socket's libuv handle, if it has one (Unix). */
export function socketDescriptor(socket: Socket): number | undefined {
  const handle = (socket as unknown as { _handle?: object | null })._handle;
  return handle ? handleDescriptor(handle) : undefined;
}

/** The file descriptor of a libuv handle, if it has one (Unix). */
function handleDescriptor(handle: object): number | undefined {
  const fd = (handle as NodeHandle).fd;
  return typeof fd === 'number' && fd >= 0 && typeof (handle as NodeHandle).close === 'function' ? fd : undefined;
}

/**
 * Moves a connection that has read nothing yet (accepted with
 * `pauseOnConnect`, or connected while paused) from its Node socket to a
 * NativeSocket: the native side takes a duplicate of the descriptor, then
 * Node's handle is closed, which takes it out of the event loop. Undefined
 * (the socket untouched) if the socket is not in that shape.
 */
export function adoptUnreadSocket(io: NativeSocketIo, socket: Socket, options: { buffers?: ReadBufferPool; copyReads?: boolean } = {}): NativeSocket | undefined {
  const handle = takeUnreadHandle(socket, (h) => handleDescriptor(h) !== undefined);
  if (handle === undefined) return undefined;
  try {
    return new NativeSocket(io, handleDescriptor(handle)!, options);
  } finally {
    // The native side holds its own duplicate (or failed and holds nothing): ours goes either way.
    (handle as NodeHandle).close!();
  }
}

/** A Duplex over a NativeSocketIo handle (see the module comment). */
export class NativeSocket extends Duplex implements DirectReadable {
  private readonly io: NativeSocketIo;
  private readonly events: SocketEvents;
  private readonly id: number;
  private readonly handle: NativeHandle;
  private readonly target: ReadTarget;
  private reader: DirectReader | undefined;
  /** The buffer the native side reads into now. */
  private current: Buffer;
  private readingWanted = true;
  private sawEnd = false;
  private nativeClosed = false;
  /** A write the kernel took only part of: the rest goes once the socket is writable. */
  private unfinished: { chunk: Buffer; callback: (error?: Error | null) => void } | undefined;

  /** `fd`: a connected socket's descriptor (duplicated; the caller closes its own). */
  constructor(io: NativeSocketIo, fd: number, options: { buffers?: ReadBufferPool; copyReads?: boolean } = {}) {
    super({ allowHalfOpen: false, decodeStrings: true });
    this.io = io;
    this.target = new ReadTarget(options.buffers, options.copyReads === true);
    this.events = eventsOf(io);
    this.id = this.events.add((kind, value, offset) => this.onEvent(kind, value, offset));
    try {
      this.handle = io.open(fd, this.id);
    } catch (error) {
      this.events.remove(this.id);
      throw error;
    }
    this.current = this.target.next(false);
    io.setBuffer(this.handle, this.current, !this.target.lends(this.current));
    // The Readable side flows from the start: data never goes through push(), only the end does.
    super.resume();
    io.reading(this.handle, true);
    this.once('close', () => this.target.release());
  }

  setDirectReader(reader: DirectReader | undefined): void {
    this.reader = reader;
  }

  setOwnReadBuffer(own: boolean): void {
    this.target.wantOwn(own);
  }

  /** Reads go on to `to` natively from now on (NativeSocketIo.relay): for the bench's floor of a proxy. */
  relayTo(to: NativeSocket): void {
    this.io.relay(this.handle, to.handle);
  }

  /** TCP_NODELAY (nothing on a Unix-domain socket). */
  setNoDelay(noDelay = true): this {
    if (!this.nativeClosed) this.io.setNoDelay(this.handle, noDelay);
    return this;
  }

  /** Stops reading (nothing is read, so a lent buffer is not overwritten) until resume(). */
  override pause(): this {
    this.readingWanted = false;
    if (!this.nativeClosed && !this.sawEnd) this.io.reading(this.handle, false);
    return this;
  }

  override resume(): this {
    this.readingWanted = true;
    if (!this.nativeClosed && !this.sawEnd) this.io.reading(this.handle, true);
    return this;
  }

  override isPaused(): boolean {
    return !this.readingWanted;
  }

  override write(chunk: unknown, encoding?: unknown, callback?: unknown): boolean {
    // The usual case: nothing queued, a whole Buffer, no callback: one write(2) and done.
    if (callback === undefined && encoding === undefined && !this.nativeClosed && this.unfinished === undefined && Buffer.isBuffer(chunk) &&
      chunk.length > 0 && this.writableLength === 0 && this.writableCorked === 0 && !this.writableEnded) {
      const written = this.io.write(this.handle, chunk);
      if (written === undefined) return true;
      if (written > 0) return super.write(chunk.subarray(written));
      // EAGAIN, or an error that _write meets again and reports the stream's way.
    }
    return super.write(chunk, encoding as BufferEncoding, callback as (error?: Error | null) => void);
  }

  /** As write(buffer.subarray(start, end)), without the view where the bytes go out at once. */
  writeRange(buffer: Buffer, start: number, end: number): boolean {
    if (end > start && !this.nativeClosed && this.unfinished === undefined && this.writableLength === 0 && this.writableCorked === 0 && !this.writableEnded) {
      const written = this.io.write(this.handle, buffer, start, end - start);
      if (written === undefined) return true;
      if (written > 0) return super.write(buffer.subarray(start + written, end));
      return super.write(buffer.subarray(start, end));
    }
    return this.write(buffer.subarray(start, end));
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.writeOrWait(chunk, callback);
  }

  override _writev(chunks: { chunk: Buffer }[], callback: (error?: Error | null) => void): void {
    this.writeOrWait(chunks.length === 1 ? chunks[0]!.chunk : Buffer.concat(chunks.map((c) => c.chunk)), callback);
  }

  override _final(callback: (error?: Error | null) => void): void {
    if (!this.nativeClosed) this.io.shutdown(this.handle);
    callback();
  }

  override _read(): void {
    // Reads are driven by the native side (pause/resume), not by the Readable machinery.
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.closeNative();
    const unfinished = this.unfinished;
    this.unfinished = undefined;
    unfinished?.callback(error ?? new Error('socket closed before the write completed'));
    callback(error);
  }

  private writeOrWait(chunk: Buffer, callback: (error?: Error | null) => void): void {
    if (this.nativeClosed) {
      callback(new Error('write after the socket closed'));
      return;
    }
    if (chunk.length === 0) {
      callback();
      return;
    }
    const written = this.io.write(this.handle, chunk);
    if (written === undefined) {
      callback();
      return;
    }
    if (written < 0 && written !== EAGAIN) {
      callback(systemError(written, 'write'));
      return;
    }
    this.unfinished = { chunk: written > 0 ? chunk.subarray(written) : chunk, callback };
    this.io.waitWritable(this.handle);
  }

  private onEvent(kind: number, value: number, offset: number): void {
    if (this.nativeClosed) return;
    if (kind === EVENT_DATA) {
      const buffer = this.current;
      const reader = this.reader;
      const lent = this.target.lends(buffer);
      if (reader === undefined) this.emit('data', Buffer.from(buffer.subarray(offset, offset + value)));
      else if (lent) reader(buffer, value, true);
      // The shared buffer is read into again after this batch, by any socket: the reader gets its own copy.
      else reader(Buffer.from(buffer.subarray(offset, offset + value)), value, false);
      if (this.nativeClosed) return;
      const next = this.target.next(!this.readingWanted);
      if (next !== this.current) {
        this.current = next;
        this.io.setBuffer(this.handle, next, !this.target.lends(next));
      }
    } else if (kind === EVENT_WRITABLE) {
      const unfinished = this.unfinished;
      if (unfinished === undefined) return;
      this.unfinished = undefined;
      this.writeOrWait(unfinished.chunk, unfinished.callback);
    } else if (kind === EVENT_EOF) {
      this.sawEnd = true;
      this.push(null);
    } else if (kind === EVENT_ERROR) {
      this.destroy(systemError(value, 'read'));
    }
  }

  private closeNative(): void {
    if (this.nativeClosed) return;
    this.nativeClosed = true;
    this.events.remove(this.id);
    this.io.close(this.handle);
  }
}
