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

/** Receives one read; `chunk` is only valid until the call returns. */
export type DirectReader = (chunk: Buffer) => void;

/** A stream whose reads can be delivered straight to one handler. */
export interface DirectReadable {
  /** Sets (or clears, with undefined) the handler that gets reads instead of 'data' events. */
  setDirectReader(reader: DirectReader | undefined): void;
}

/** True if `stream` supports direct reads. */
export function isDirectReadable(stream: object): stream is DirectReadable {
  return stream instanceof DirectReadSocket;
}

/** A net.Socket reading into one reused buffer; connect it like any Socket. */
export class DirectReadSocket extends Socket implements DirectReadable {
  private reader: DirectReader | undefined;

  constructor() {
    const buffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
    const self: { socket?: DirectReadSocket } = {};
    super({ onread: { buffer, callback: (bytes: number, into: Uint8Array) => self.socket!.deliver(bytes, into as Buffer) } });
    self.socket = this;
  }

  setDirectReader(reader: DirectReader | undefined): void {
    this.reader = reader;
  }

  /** True: keep reading (pausing is the reader's call, through pause()). */
  private deliver(bytes: number, buffer: Buffer): boolean {
    const reader = this.reader;
    if (reader !== undefined) reader(buffer.subarray(0, bytes));
    else this.emit('data', Buffer.from(buffer.subarray(0, bytes)));
    return true;
  }
}
