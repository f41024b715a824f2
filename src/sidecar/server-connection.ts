/**
 * One logged-in server connection and the server-to-client half of the byte
 * pump. Bytes are framed by header only; whole messages are forwarded as
 * runs of the original chunk inside one cork/uncork, and only ReadyForQuery,
 * ErrorResponse and the COPY messages are looked at.
 */
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import { serialize } from 'pg-protocol';
import { ResponseEditor, ServerStatementCache, transition, TransactionTracker, type ServerConnectionState } from '../core/pool-state/index.ts';
import { FrameReader, PARSE_COMPLETE, parseNoticeFields } from '../core/protocol/index.ts';
import { isDirectReadable } from './direct-read-socket.ts';

/** Whoever currently uses the connection: a client session. */
export interface ServerConnectionUser {
  /** Where server bytes go. */
  readonly socket: Duplex;
  /** The server reached a transaction boundary (ReadyForQuery 'I', nothing outstanding). */
  onServerBoundary(server: ServerConnection): void;
  /** The server connection died while in use. */
  onServerLost(server: ServerConnection, reason: string): void;
}

/** Callbacks into the pool. */
export interface ServerConnectionEvents {
  stateChanged(server: ServerConnection, from: ServerConnectionState, to: ServerConnectionState): void;
  /** The socket closed; the backend no longer counts. */
  closed(server: ServerConnection): void;
  transactionCompleted(): void;
}

const NOTHING = Buffer.alloc(0);
const READY_FOR_QUERY = 0x5a;
const ERROR_RESPONSE = 0x45;
const PARSE_COMPLETE_TYPE = 0x31;
const CLOSE_COMPLETE_TYPE = 0x33;
/** Types the tracker needs to see; everything else is only forwarded. */
const TRACKED = new Uint8Array(256);
for (const c of 'ZEGHWc') TRACKED[c.charCodeAt(0)] = 1;

/** A pooled connection to PostgreSQL. */
export class ServerConnection {
  readonly id: number;
  readonly stream: Duplex;
  readonly credentialsGeneration: string;
  readonly createdAt: number;
  readonly processId: number;
  readonly secretKey: number;
  readonly tracker = new TransactionTracker();
  /** Server-side named statements this backend holds (see core/pool-state/prepared-statements.ts). */
  readonly statements: ServerStatementCache;
  /** Edits ParseComplete/CloseComplete while a session that names statements uses the connection. */
  readonly editor: ResponseEditor;
  /** When it last became idle (ms). */
  idleSince: number;
  private currentState: ServerConnectionState = 'connecting';
  private user: ServerConnectionUser | undefined;
  private readonly reader: FrameReader;
  private readonly events: ServerConnectionEvents;
  private readonly logger: Logger;
  private internalQuery: { ok: boolean; done: (ok: boolean) => void } | undefined;
  /** Reading is paused until the client's socket drains (see onData). */
  private pausedFor: Duplex | undefined;
  private readonly resumeReading = (): void => {
    const out = this.pausedFor;
    if (out === undefined) return;
    this.pausedFor = undefined;
    if (!this.stream.destroyed) this.stream.resume();
  };

  constructor(fields: { id: number; stream: Duplex; credentialsGeneration: string; now: number; processId: number; secretKey: number; maxMessageBytes: number; maxPreparedStatements?: number; events: ServerConnectionEvents; logger: Logger }) {
    this.id = fields.id;
    this.statements = new ServerStatementCache(fields.maxPreparedStatements);
    this.editor = new ResponseEditor(this.statements);
    this.stream = fields.stream;
    this.credentialsGeneration = fields.credentialsGeneration;
    this.createdAt = fields.now;
    this.idleSince = fields.now;
    this.processId = fields.processId;
    this.secretKey = fields.secretKey;
    this.reader = new FrameReader({ maxMessageBytes: fields.maxMessageBytes });
    this.events = fields.events;
    this.logger = fields.logger;
    if (isDirectReadable(this.stream)) this.stream.setDirectReader((buffer, length) => this.onData(buffer, length));
    else this.stream.on('data', (chunk: Buffer) => this.onData(chunk, chunk.length));
    this.stream.on('error', (err: Error) => this.logger.debug({ server: this.id, err: err.message }, 'server connection error'));
    this.stream.on('close', () => this.onClose());
    this.stream.resume();
  }

  /** Current state. */
  get state(): ServerConnectionState {
    return this.currentState;
  }

  /** The only way the state changes (throws on an impossible transition). */
  setState(to: ServerConnectionState): void {
    const from = this.currentState;
    this.currentState = transition(from, to);
    this.events.stateChanged(this, from, to);
  }

  /** Lends the connection to a client. */
  attach(user: ServerConnectionUser): void {
    this.setState('active');
    this.user = user;
  }

  /** Takes the connection back from its client. */
  detach(): void {
    this.user = undefined;
    this.editor.deactivate();
    this.resumeReading();
  }

  /** The client currently using it. */
  get attachedUser(): ServerConnectionUser | undefined {
    return this.user;
  }

  /** Writes client bytes (already framed and tracked by the caller). */
  write(chunk: Buffer): void {
    this.stream.write(chunk);
  }

  /**
   * Runs one of the sidecar's own statements (pre-ping `;`, `DISCARD ALL`)
   * in state `resetting`; `done(true)` if it ended with ReadyForQuery 'I'.
   */
  runInternal(sql: string, done: (ok: boolean) => void): void {
    this.setState('resetting');
    this.tracker.reset();
    // DISCARD ALL drops every prepared statement of the backend.
    if (/^\s*discard\s+all/i.test(sql)) this.statements.clear();
    this.internalQuery = { ok: true, done };
    this.stream.write(serialize.query(sql));
  }

  /** Sends Terminate and closes; the backend counts until the socket is closed. */
  close(reason: string): void {
    if (this.currentState === 'closing' || this.currentState === 'closed') return;
    this.logger.debug({ server: this.id, reason }, 'closing server connection');
    this.setState('closing');
    this.user = undefined;
    this.internalQuery = undefined;
    if (!this.stream.destroyed) {
      this.stream.end(serialize.end());
      // A server that ignores Terminate must not hold a slot forever.
      setTimeout(() => this.stream.destroy(), 5000).unref();
    }
  }

  private onClose(): void {
    if (this.currentState === 'closed') return;
    const user = this.user;
    this.user = undefined;
    const internal = this.internalQuery;
    this.internalQuery = undefined;
    this.setState('closed');
    this.events.closed(this);
    internal?.done(false);
    user?.onServerLost(this, 'the server closed the connection');
  }

  /** Bytes [0, length) of `chunk` arrived from the server. */
  private onData(chunk: Buffer, length: number): void {
    const user = this.user;
    if (user === undefined) {
      this.onDataWithoutUser(chunk, length);
      return;
    }
    if (this.editor.active) {
      this.onDataEditing(chunk, length, user);
      return;
    }
    const reader = this.reader;
    const out = user.socket;
    const tracker = this.tracker;
    let boundary = false;
    let runBuffer: Buffer | undefined;
    let runStart = 0;
    let runEnd = 0;
    // Cork only once a second run appears: the usual reply is one run, one write.
    let corked = false;
    try {
      reader.push(chunk, length);
      while (reader.next()) {
        const type = reader.type;
        if (TRACKED[type] === 1) {
          if (type === READY_FOR_QUERY) {
            boundary = tracker.serverMessage(type, reader.buffer[reader.bodyStart]);
            if (boundary) this.events.transactionCompleted();
          } else tracker.serverMessage(type);
        }
        if (reader.buffer === runBuffer && reader.start === runEnd) runEnd = reader.end;
        else {
          if (runBuffer !== undefined) {
            if (!corked) {
              out.cork();
              corked = true;
            }
            out.write(runBuffer.subarray(runStart, runEnd));
          }
          runBuffer = reader.buffer;
          runStart = reader.start;
          runEnd = reader.end;
        }
      }
    } catch (error) {
      if (runBuffer !== undefined) out.write(runBuffer.subarray(runStart, runEnd));
      if (corked) out.uncork();
      this.logger.warn({ server: this.id, err: (error as Error).message }, 'malformed data from the server');
      this.stream.destroy();
      return;
    }
    if (runBuffer !== undefined) out.write(runBuffer.subarray(runStart, runEnd));
    if (corked) out.uncork();
    this.afterForwarding(out, user, boundary);
  }

  private afterForwarding(out: Duplex, user: ServerConnectionUser, boundary: boolean): void {
    const tracker = this.tracker;
    // Bytes left queued may point into a reused read buffer, and a slow client
    // must not make us buffer without bound: read no more until they drain.
    if (out.writableLength > 0 && this.pausedFor === undefined && !out.destroyed) {
      this.pausedFor = out;
      this.stream.pause();
      // 'drain' fires only past the high-water mark; an empty write's callback runs once all before it is flushed.
      out.write(NOTHING, this.resumeReading);
    }
    // Re-check: the client may have sent more while we forwarded.
    if (boundary && tracker.atBoundary && this.user === user) user.onServerBoundary(this);
  }

  /**
   * onData for a session that names statements: ParseComplete and
   * CloseComplete go through the editor (forwarded, swallowed or turned into
   * ParseComplete); ReadyForQuery tells it a batch is over.
   */
  private onDataEditing(chunk: Buffer, length: number, user: ServerConnectionUser): void {
    const reader = this.reader;
    const out = user.socket;
    const tracker = this.tracker;
    const editor = this.editor;
    let boundary = false;
    const pieces: Buffer[] = [];
    let runBuffer: Buffer | undefined;
    let runStart = 0;
    let runEnd = 0;
    const flushRun = (): void => {
      if (runBuffer !== undefined) pieces.push(runBuffer.subarray(runStart, runEnd));
      runBuffer = undefined;
    };
    try {
      reader.push(chunk, length);
      while (reader.next()) {
        const type = reader.type;
        if (TRACKED[type] === 1) {
          if (type === READY_FOR_QUERY) {
            boundary = tracker.serverMessage(type, reader.buffer[reader.bodyStart]);
            if (boundary) this.events.transactionCompleted();
            if (editor.active) editor.ready();
          } else tracker.serverMessage(type);
        } else if ((type === PARSE_COMPLETE_TYPE || type === CLOSE_COMPLETE_TYPE) && editor.active) {
          const edit = editor.reply(type);
          if (edit !== 'forward') {
            flushRun();
            if (edit === 'parse-complete') pieces.push(PARSE_COMPLETE);
            continue;
          }
        }
        if (reader.buffer === runBuffer && reader.start === runEnd) runEnd = reader.end;
        else {
          flushRun();
          runBuffer = reader.buffer;
          runStart = reader.start;
          runEnd = reader.end;
        }
      }
    } catch (error) {
      this.logger.warn({ server: this.id, err: (error as Error).message }, 'malformed or unexpected data from the server');
      this.stream.destroy();
      return;
    }
    flushRun();
    if (pieces.length === 1) out.write(pieces[0]!);
    else if (pieces.length > 1) {
      out.cork();
      for (const piece of pieces) out.write(piece);
      out.uncork();
    }
    this.afterForwarding(out, user, boundary);
  }

  private onDataWithoutUser(chunk: Buffer, length: number): void {
    const reader = this.reader;
    try {
      reader.push(chunk, length);
      while (reader.next()) {
        const type = reader.type;
        const internal = this.internalQuery;
        if (internal !== undefined) {
          if (type === ERROR_RESPONSE) internal.ok = false;
          if (type === READY_FOR_QUERY) {
            this.internalQuery = undefined;
            internal.done(internal.ok && reader.buffer[reader.bodyStart] === 0x49);
          }
        } else if (type === ERROR_RESPONSE) {
          // An idle connection gets an error only when the server is about to drop it.
          const fields = parseNoticeFields(reader.buffer.subarray(reader.bodyStart, reader.end));
          this.logger.info({ server: this.id, code: fields.C, message: fields.M }, 'idle server connection got an error');
          this.close('error while idle');
        }
      }
    } catch (error) {
      this.logger.warn({ server: this.id, err: (error as Error).message }, 'malformed data from the server');
      this.stream.destroy();
    }
  }
}
