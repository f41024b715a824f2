/**
 * Framing of the PostgreSQL v3 protocol over arbitrary chunks: a type byte
 * and an int32 length that counts itself, or, in the startup phase, only the
 * length. The reader exposes the current message as a cursor (buffer and
 * offsets) instead of allocating a frame object per message; only a message
 * that straddles chunks is copied, and only once.
 */
import { ProtocolError } from './errors.ts';

/** PostgreSQL's own limit on a startup packet (MAX_STARTUP_PACKET_LENGTH). */
export const MAX_STARTUP_PACKET_BYTES = 10_000;

/** Default cap on a regular message (PostgreSQL's MaxAllocSize is 1 GB; a pooler needs far less). */
export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/** Type of an untyped (startup-phase) message on the cursor. */
export const UNTYPED = -1;

const EMPTY = Buffer.alloc(0);

/** Options of a frame reader. */
export interface FrameReaderOptions {
  /** Largest accepted message, length field included. */
  maxMessageBytes?: number;
  /** The first message has no type byte (a client's startup packet). */
  startupPhase?: boolean;
  /**
   * Messages longer than this (bytes, header included) whose type is marked in
   * `streamable` are delivered in pieces as their bytes arrive, so that memory
   * does not grow with message size. Default: never.
   */
  streamAbove?: number;
  /** Types that may be streamed: a 256-entry table, 1 for yes. */
  streamable?: Uint8Array;
}

/** Bytes of body a streamed message's first piece carries at least: enough to read its names and first words. */
export const STREAM_PREFIX_BYTES = 1024;

/** A table of message types for FrameReaderOptions.streamable. */
export function messageTypeTable(types: string): Uint8Array {
  const table = new Uint8Array(256);
  for (const c of types) table[c.charCodeAt(0)] = 1;
  return table;
}

const NOT_STREAMED = new Uint8Array(256);

/**
 * Turns a byte stream into whole messages. Call `push(chunk)`, then `next()`
 * until it returns false; after each true, `type`, `buffer`, `start`,
 * `bodyStart` and `end` describe one whole message inside `buffer` — or, with
 * `piece` set, a piece of a streamed message: the first piece holds its
 * header and at least STREAM_PREFIX_BYTES of its body, later ones (`bodyStart`
 * equal to `start`) only bytes, the last has `pieceLast`.
 */
export class FrameReader {
  /** Type byte of the current message, or UNTYPED in the startup phase. */
  type = 0;
  /** Buffer holding the current message (the chunk itself, or a copy for a straddling message). */
  buffer: Buffer = EMPTY;
  /** Offset of the message's first byte (type byte, or length when untyped). */
  start = 0;
  /** Offset of the body, after the length field. */
  bodyStart = 0;
  /** Offset just past the message. */
  end = 0;
  /** The cursor holds a piece of a streamed message, not a whole one. */
  piece = false;
  /** With `piece`: the piece that starts the message. */
  pieceFirst = false;
  /** With `piece`: the piece that ends the message. */
  pieceLast = false;
  /** Types that may be streamed from now on (see FrameReaderOptions). */
  streamable: Uint8Array;

  private readonly maxMessageBytes: number;
  private readonly streamAbove: number;
  /** Bytes of the streamed message still to deliver. */
  private streamRemaining = 0;
  private streamType = 0;
  /** Total size of the streamed message whose first piece is being collected in `partial`; 0 if none. */
  private partialStreamTotal = 0;
  private untyped: boolean;
  private chunk: Buffer = EMPTY;
  /** End of the current chunk's bytes (a reused read buffer is longer than one read). */
  private limit = 0;
  private offset = 0;
  private partial: Buffer | undefined;
  private partialFilled = 0;
  private header = Buffer.alloc(5);
  private headerFilled = 0;

  constructor(options: FrameReaderOptions = {}) {
    this.maxMessageBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    this.untyped = options.startupPhase ?? false;
    // A streamed message is longer than its first piece.
    this.streamAbove = Math.max(options.streamAbove ?? Number.POSITIVE_INFINITY, 5 + STREAM_PREFIX_BYTES);
    this.streamable = options.streamable ?? NOT_STREAMED;
  }

  /** True between the first and the last piece of a streamed message. */
  get streaming(): boolean {
    return this.streamRemaining > 0 || this.partialStreamTotal > 0;
  }

  /** Stops streaming types from the next message on. */
  stopStreaming(): void {
    this.streamable = NOT_STREAMED;
  }

  /**
   * Right after the first piece of a streamed message: delivers that message
   * whole instead, once the rest has come (the piece's bytes are copied). For
   * a message found, from its first piece, to be one that must be read whole.
   */
  gatherWhole(): void {
    if (!this.piece || !this.pieceFirst || this.streamRemaining === 0) throw new Error('FrameReader.gatherWhole: not right after the first piece of a streamed message');
    const have = this.end - this.start;
    this.beginPartial(this.type, have + this.streamRemaining, this.bodyStart - this.start);
    this.buffer.copy(this.partial!, 0, this.start, this.end);
    this.partialFilled = have;
    this.streamRemaining = 0;
    this.piece = false;
  }

  /** The next message will be an untyped startup-phase message (after answering SSLRequest). */
  expectUntyped(): void {
    this.untyped = true;
  }

  /**
   * Adds a chunk, or its first `length` bytes (a read into a reused buffer,
   * without a view made per read); the previous chunk must have been
   * consumed by `next()` returning false.
   */
  push(chunk: Buffer, length: number = chunk.length): void {
    if (this.offset < this.limit) throw new Error('FrameReader.push before the previous chunk was consumed');
    if (length > chunk.length) throw new RangeError(`FrameReader.push: length ${length} beyond the chunk's ${chunk.length} bytes`);
    this.chunk = chunk;
    this.limit = length;
    this.offset = 0;
  }

  /** Bytes of an incomplete message held between chunks. */
  get buffered(): number {
    return this.headerFilled + this.partialFilled;
  }

  /** Unconsumed bytes of the current chunk (after an error or a protocol switch such as TLS). */
  remaining(): Buffer {
    return this.chunk.subarray(this.offset, this.limit);
  }

  /** Moves the cursor to the next whole message; false when more bytes are needed. */
  next(): boolean {
    const chunk = this.chunk;
    const limit = this.limit;
    if (this.streamRemaining > 0) return this.continueStream(chunk);
    if (this.partial !== undefined) return this.continuePartial(chunk);
    const headerSize = this.untyped ? 4 : 5;
    if (this.headerFilled === 0 && limit - this.offset >= headerSize) {
      // Fast path: the header is inside this chunk.
      const start = this.offset;
      const type = this.untyped ? UNTYPED : chunk[start]!;
      const length = chunk.readInt32BE(this.untyped ? start : start + 1);
      const total = this.checkLength(length, headerSize);
      if (limit - start >= total) {
        this.setCursor(type, chunk, start, start + headerSize, start + total);
        this.offset = start + total;
        return true;
      }
      if (total > this.streamAbove && type !== UNTYPED && this.streamable[type] === 1) {
        const first = headerSize + STREAM_PREFIX_BYTES;
        if (limit - start >= first) {
          this.setPiece(type, chunk, start, start + headerSize, limit, true, false);
          this.streamType = type;
          this.streamRemaining = total - (limit - start);
          this.offset = limit;
          return true;
        }
        // Collect the first piece's prefix only, never the whole message.
        this.beginPartial(type, first, headerSize);
        this.partialStreamTotal = total;
        chunk.copy(this.partial!, 0, start, limit);
        this.partialFilled = limit - start;
        this.offset = limit;
        return false;
      }
      this.beginPartial(type, total, headerSize);
      chunk.copy(this.partial!, 0, start, limit);
      this.partialFilled = limit - start;
      this.offset = limit;
      return false;
    }
    // Slow path: collect a header that straddles chunks.
    const want = headerSize - this.headerFilled;
    const take = Math.min(want, limit - this.offset);
    if (take > 0) {
      chunk.copy(this.header, this.headerFilled, this.offset, this.offset + take);
      this.headerFilled += take;
      this.offset += take;
    }
    if (this.headerFilled < headerSize) return false;
    const type = this.untyped ? UNTYPED : this.header[0]!;
    const length = this.header.readInt32BE(this.untyped ? 0 : 1);
    const total = this.checkLength(length, headerSize);
    const stream = total > this.streamAbove && type !== UNTYPED && this.streamable[type] === 1;
    this.beginPartial(type, stream ? headerSize + STREAM_PREFIX_BYTES : total, headerSize);
    this.partialStreamTotal = stream ? total : 0;
    this.header.copy(this.partial!, 0, 0, headerSize);
    this.partialFilled = headerSize;
    this.headerFilled = 0;
    return this.continuePartial(chunk);
  }

  private partialType = 0;
  private partialHeaderSize = 5;

  private beginPartial(type: number, total: number, headerSize: number): void {
    this.partial = Buffer.allocUnsafe(total);
    this.partialType = type;
    this.partialHeaderSize = headerSize;
  }

  private continuePartial(chunk: Buffer): boolean {
    const partial = this.partial!;
    const take = Math.min(partial.length - this.partialFilled, this.limit - this.offset);
    if (take > 0) {
      chunk.copy(partial, this.partialFilled, this.offset, this.offset + take);
      this.partialFilled += take;
      this.offset += take;
    }
    if (this.partialFilled < partial.length) return false;
    this.partial = undefined;
    this.partialFilled = 0;
    if (this.partialStreamTotal > 0) {
      this.setPiece(this.partialType, partial, 0, this.partialHeaderSize, partial.length, true, false);
      this.streamType = this.partialType;
      this.streamRemaining = this.partialStreamTotal - partial.length;
      this.partialStreamTotal = 0;
      return true;
    }
    this.setCursor(this.partialType, partial, 0, this.partialHeaderSize, partial.length);
    return true;
  }

  /** The next piece of a streamed message: the bytes of it this chunk holds. */
  private continueStream(chunk: Buffer): boolean {
    const take = Math.min(this.streamRemaining, this.limit - this.offset);
    if (take === 0) return false;
    const start = this.offset;
    this.streamRemaining -= take;
    this.offset += take;
    this.setPiece(this.streamType, chunk, start, start, start + take, false, this.streamRemaining === 0);
    return true;
  }

  private setPiece(type: number, buffer: Buffer, start: number, bodyStart: number, end: number, first: boolean, last: boolean): void {
    this.setCursor(type, buffer, start, bodyStart, end);
    this.piece = true;
    this.pieceFirst = first;
    this.pieceLast = last;
  }

  private checkLength(length: number, headerSize: number): number {
    const total = headerSize === 4 ? length : length + 1;
    if (length < 4) throw new ProtocolError('bad-length', `invalid message length ${length}`);
    const max = headerSize === 4 ? MAX_STARTUP_PACKET_BYTES : this.maxMessageBytes;
    if (total > max) throw new ProtocolError(headerSize === 4 ? 'bad-startup' : 'message-too-large', `message of ${total} bytes exceeds the limit of ${max}`);
    return total;
  }

  private setCursor(type: number, buffer: Buffer, start: number, bodyStart: number, end: number): void {
    this.piece = false;
    this.type = type;
    this.buffer = buffer;
    this.start = start;
    this.bodyStart = bodyStart;
    this.end = end;
    // One untyped message at a time: the startup phase asks again after SSLRequest.
    if (type === UNTYPED) this.untyped = false;
  }
}

/** A whole message copied out of a reader, for tests and non-hot paths. */
export interface Frame {
  type: number;
  body: Buffer;
}

/** Feeds `chunk` and returns every whole message it completes (copies bodies). */
export function readFrames(reader: FrameReader, chunk: Buffer): Frame[] {
  reader.push(chunk);
  const frames: Frame[] = [];
  while (reader.next()) frames.push({ type: reader.type, body: Buffer.from(reader.buffer.subarray(reader.bodyStart, reader.end)) });
  return frames;
}

/** Frontend (client-to-server) message types after startup. */
export const FRONTEND_MESSAGE_TYPES: ReadonlySet<number> = new Set([...'BCdcfDEHFPpQSX'].map((c) => c.charCodeAt(0)));

const frontendTable = new Uint8Array(256);
for (const t of FRONTEND_MESSAGE_TYPES) frontendTable[t] = 1;

/** True if `type` is a message type a client may send after startup. */
export function isFrontendMessageType(type: number): boolean {
  return type >= 0 && type < 256 && frontendTable[type] === 1;
}

/** Character codes of the message types the pooler reacts to. */
export const MessageType = {
  // frontend
  bind: 0x42, // B
  close: 0x43, // C (frontend)
  copyData: 0x64, // d
  copyDone: 0x63, // c
  copyFail: 0x66, // f
  describe: 0x44, // D (frontend)
  execute: 0x45, // E (frontend)
  flush: 0x48, // H (frontend)
  functionCall: 0x46, // F
  parse: 0x50, // P
  passwordMessage: 0x70, // p
  query: 0x51, // Q
  sync: 0x53, // S (frontend)
  terminate: 0x58, // X
  // backend
  authentication: 0x52, // R
  backendKeyData: 0x4b, // K
  commandComplete: 0x43, // C (backend)
  copyInResponse: 0x47, // G
  copyOutResponse: 0x48, // H (backend)
  copyBothResponse: 0x57, // W
  errorResponse: 0x45, // E (backend)
  noticeResponse: 0x4e, // N
  parameterStatus: 0x53, // S (backend)
  readyForQuery: 0x5a, // Z
  parseComplete: 0x31, // 1
  closeComplete: 0x33, // 3
  parameterDescription: 0x74, // t
  rowDescription: 0x54, // T
  noData: 0x6e, // n
  dataRow: 0x44, // D (backend)
} as const;
