/**
 * One logged-in server connection and the server-to-client half of the byte
 * pump. Bytes are framed by header only; whole messages are forwarded as
 * runs of the original chunk inside one cork/uncork, and only ReadyForQuery,
 * ErrorResponse and the COPY messages are looked at.
 */
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import { serialize } from 'pg-protocol';
import { RESHAPED_ERROR, ResponseEditor, ServerStatementCache, isReshapedError, outcomeAfter, transition, TransactionTracker, type CommandOutcome, type ServerConnectionState } from '../core/pool-state/index.ts';
import { FrameReader, MessageType, NO_SETTINGS, PARSE_COMPLETE, messageTypeTable, parseNoticeFields, type ClientSettings } from '../core/protocol/index.ts';
import { isDirectReadable } from './direct-read-socket.ts';
import { writePieces, writeRange } from './native-socket.ts';

/** Whoever currently uses the connection: a client session. */
export interface ServerConnectionUser {
  /** Where server bytes go. */
  readonly socket: Duplex;
  /** The server reached a transaction boundary (ReadyForQuery 'I', nothing outstanding). */
  onServerBoundary(server: ServerConnection): void;
  /** Every ReadyForQuery owed has come, yet the connection is not at a boundary (a transaction block, an unsynced batch). */
  onServerAnswered?(server: ServerConnection): void;
  /** The server connection died while in use; `afterFatal`: the server had sent the client a FATAL error first. */
  onServerLost(server: ServerConnection, reason: string, afterFatal: boolean): void;
  /** A RESET or DISCARD ALL completed and its transaction committed: the session's settings went back to the connection's login settings. */
  onSettingsReset?(): void;
  /** A RESET completed, but an error or a rollback followed before the transaction ended: whether it still holds is unknown. */
  onSettingsResetUncertain?(): void;
  /** UNLISTENs the client sent to the server connection wait for their CommandComplete (only then are tags compared). */
  readonly awaitingUnlistens?: boolean;
  /** An UNLISTEN the client sent ran (its CommandComplete came), in order. */
  onUnlistenCompleted?(): void;
  /**
   * The transaction of the UNLISTENs that ran ended: `held` false if it was
   * rolled back (they did nothing, as direct), true if it committed or that
   * is not known (an error or a ROLLBACK followed by more commands).
   */
  onUnlistensEnded?(held: boolean): void;
  /**
   * A ReadyForQuery 'I' is about to be forwarded (the server's messages before it are known):
   * messages to send the client before it, as the backend of a direct session would have.
   */
  beforeReady?(server: ServerConnection): Buffer | undefined;
  /**
   * That ReadyForQuery 'I' is next: true if the user sends it itself, later
   * (the pump then leaves it out).
   */
  holdReady?(server: ServerConnection): boolean;
}

/** How one of the sidecar's own statements ended. */
export interface InternalResult {
  /** Ended with ReadyForQuery 'I' and no error. */
  ok: boolean;
  /** Fields of the first ErrorResponse, if any. */
  error?: Record<string, string>;
  /** Columns of the first DataRow, if any (NULL as undefined). */
  row?: (string | undefined)[];
}

/** Callbacks into the pool. */
export interface ServerConnectionEvents {
  stateChanged(server: ServerConnection, from: ServerConnectionState, to: ServerConnectionState): void;
  /**
   * The socket closed. `serverEnded`: the server closed its side first, so
   * its backend has exited; otherwise (the transport failed, or we gave up)
   * the backend may live on and must be counted until confirmed gone.
   */
  closed(server: ServerConnection, serverEnded: boolean): void;
  transactionCompleted(): void;
  /** Cancel the statement running on this backend (it is being closed mid-statement). */
  cancel(server: ServerConnection): void;
}

const NOTHING = Buffer.alloc(0);
/** DataRow and CopyData: the only big messages a server sends, and none the pump must read. */
const SERVER_STREAMABLE = messageTypeTable('Dd');
/** While a closing backend lingers, its statement is cancelled again this often. */
const CLOSE_RECANCEL_MS = 5_000;
/** A closing connection whose server never closes it is dropped after this long. */
const CLOSE_GIVE_UP_MS = 60_000;
/** Types the tracker needs to see, and CommandComplete (see onCommandComplete); everything else is only forwarded. */
const TRACKED = new Uint8Array(256);
for (const c of 'ZEGHWcC') TRACKED[c.charCodeAt(0)] = 1;
// The last replies of extended messages (ParseComplete, BindComplete, CloseComplete, RowDescription, NoData,
// EmptyQueryResponse, PortalSuspended): counted, to tell which message an ErrorResponse answers (see TransactionTracker).
for (const c of '123TnIs') TRACKED[c.charCodeAt(0)] = 2;
/** Tags of the commands that drop every prepared statement of the backend, with their NUL. */
const DEALLOCATE_ALL_TAG = Buffer.from('DEALLOCATE ALL\0');
const DEALLOCATE_TAG = Buffer.from('DEALLOCATE\0');
const DISCARD_ALL_TAG = Buffer.from('DISCARD ALL\0');
const RESET_TAG = Buffer.from('RESET\0');
const ROLLBACK_TAG = Buffer.from('ROLLBACK\0');
const UNLISTEN_TAG = Buffer.from('UNLISTEN\0');

/**
 * The CommandComplete body at `buffer[bodyStart..end)` is `tag` (with its NUL).
 * A byte loop: every CommandComplete is checked against several tags, and
 * Buffer.compare validates its arguments on each call.
 */
function tagIs(tag: Buffer, buffer: Buffer, bodyStart: number, end: number): boolean {
  const length = tag.length;
  if (end - bodyStart !== length) return false;
  for (let i = 0; i < length; i++) if (buffer[bodyStart + i] !== tag[i]) return false;
  return true;
}

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
  /** Client settings the backend got at login: what RESET ALL and DISCARD ALL return it to. */
  readonly loginSettings: ClientSettings;
  /** ParameterStatus values of its login. */
  readonly loginParameters: ReadonlyMap<string, string>;
  /** Client settings applied on this backend (see core/protocol/client-settings.ts). */
  settings: ClientSettings;
  /** CancelRequests sent for this backend whose delivery the server has not confirmed: it is not lent to another client meanwhile. */
  cancelsInFlight = 0;
  /** ReadyForQuery messages received: a cancel is forwarded only while the statement it was meant for still runs. */
  readyCount = 0;
  /**
   * Transaction mode: the client it was last lent to, whose session's
   * sequence values (currval, lastval) it may hold, and how many times it
   * went to a client other than the one before (see ClientSession's
   * sequence reads). Forgotten when DISCARD ALL resets the backend.
   */
  sequenceClient: object | undefined;
  sequenceTurn = 0;
  private currentState: ServerConnectionState = 'connecting';
  private user: ServerConnectionUser | undefined;
  private readonly reader: FrameReader;
  private readonly events: ServerConnectionEvents;
  private readonly logger: Logger;
  /** The server sent EOF (a backend closes its socket only as it exits). */
  private serverEnded = false;
  /** The server sent a FATAL (or PANIC) error: it is about to close, and the client was told why. */
  private fatalSeen = false;
  /** Why the transport failed, in words for the client, when it did. */
  private transportFailure: string | undefined;
  private internalQuery: { result: InternalResult; done: (result: InternalResult) => void } | undefined;
  /** A client's RESET (or DISCARD ALL) completed: it holds once its transaction commits (see core/pool-state/command-outcome.ts). */
  private resetOutcome: CommandOutcome | undefined;
  /** The same for the UNLISTENs of the client's transaction (see ServerConnectionUser.onUnlistensEnded). */
  private unlistenOutcome: CommandOutcome | undefined;
  /** Reading is paused until the client's socket drains (see onData). */
  private pausedFor: Duplex | undefined;
  private readonly resumeReading = (): void => {
    const out = this.pausedFor;
    if (out === undefined) return;
    this.pausedFor = undefined;
    if (!this.stream.destroyed) this.stream.resume();
  };

  constructor(fields: {
    id: number; stream: Duplex; credentialsGeneration: string; now: number; processId: number; secretKey: number; maxMessageBytes: number; maxPreparedStatements?: number;
    loginSettings?: ClientSettings; loginParameters?: ReadonlyMap<string, string>; events: ServerConnectionEvents; logger: Logger;
  }) {
    this.id = fields.id;
    this.loginSettings = fields.loginSettings ?? NO_SETTINGS;
    this.settings = this.loginSettings;
    this.loginParameters = fields.loginParameters ?? new Map();
    this.statements = new ServerStatementCache(fields.maxPreparedStatements);
    this.editor = new ResponseEditor(this.statements);
    this.stream = fields.stream;
    this.credentialsGeneration = fields.credentialsGeneration;
    this.createdAt = fields.now;
    this.idleSince = fields.now;
    this.processId = fields.processId;
    this.secretKey = fields.secretKey;
    // Big rows and COPY data stream through to the client as they arrive.
    this.reader = new FrameReader({ maxMessageBytes: fields.maxMessageBytes, streamAbove: 256 * 1024, streamable: SERVER_STREAMABLE });
    this.events = fields.events;
    this.logger = fields.logger;
    if (isDirectReadable(this.stream)) this.stream.setDirectReader((buffer, length) => this.onData(buffer, length));
    else this.stream.on('data', (chunk: Buffer) => this.onData(chunk, chunk.length));
    this.stream.on('error', (err: Error & { code?: string }) => {
      // A reset comes from the server's side of the connection: its socket is gone, and a backend closes it only as it exits.
      if (err.code === 'ECONNRESET' || err.code === 'EPIPE') this.serverEnded = true;
      if (err.code === 'ETIMEDOUT') {
        // TCP keepalives or the user timeout gave up (SERVER_KEEPALIVE): the host, or the network to it, is gone.
        this.transportFailure = 'the database host stopped answering (no TCP acknowledgement within the keepalive timeout)';
        this.logger.warn({ server: this.id, err: err.message }, 'server connection timed out: the database host stopped answering');
      } else this.logger.debug({ server: this.id, err: err.message }, 'server connection error');
    });
    this.stream.on('end', () => (this.serverEnded = true));
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
    this.resetOutcome = undefined;
    this.unlistenOutcome = undefined;
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
   * Runs one of the sidecar's own statements (pre-ping `;`, `DISCARD ALL`,
   * client settings) in state `resetting`; `done` gets whether it ended with
   * ReadyForQuery 'I', the first error and the first row. If the connection
   * dies first, `done` runs with ok false once it is closed.
   */
  runInternal(sql: string, done: (result: InternalResult) => void): void {
    this.setState('resetting');
    this.tracker.reset();
    this.internalQuery = { result: { ok: true }, done };
    this.stream.write(serialize.query(sql));
  }

  /**
   * Sends Terminate and closes. The backend counts until the server closes
   * the connection, which it does only once it has read the Terminate: a
   * backend still running a statement would live on behind a socket we
   * dropped, so that statement is cancelled first (and again while it lingers).
   */
  close(reason: string): void {
    if (this.currentState === 'closing' || this.currentState === 'closed') return;
    const running = this.currentState === 'resetting' || this.tracker.pendingReady > 0 || this.tracker.copy !== 'none';
    this.logger.debug({ server: this.id, reason, running }, 'closing server connection');
    this.setState('closing');
    this.user = undefined;
    const internal = this.internalQuery;
    this.internalQuery = undefined;
    this.resumeReading();
    internal?.done({ ok: false, error: { M: reason } });
    if (this.stream.destroyed) return;
    if (running) this.events.cancel(this);
    this.stream.end(serialize.end());
    // Keep reading: the server's own close is what ends the count.
    this.stream.resume();
    const retry = setInterval(() => this.events.cancel(this), CLOSE_RECANCEL_MS).unref();
    // A server that never answers (a frozen network) must not hold a slot forever.
    const giveUp = setTimeout(() => this.stream.destroy(), CLOSE_GIVE_UP_MS).unref();
    this.stream.once('close', () => {
      clearInterval(retry);
      clearTimeout(giveUp);
    });
  }

  private onClose(): void {
    if (this.currentState === 'closed') return;
    const user = this.user;
    this.user = undefined;
    const internal = this.internalQuery;
    this.internalQuery = undefined;
    this.setState('closed');
    // After a FATAL the backend has exited, whatever the transport says.
    this.events.closed(this, this.serverEnded || this.fatalSeen);
    const reason = this.transportFailure ?? 'the server closed the connection';
    internal?.done({ ok: false, error: { M: reason } });
    user?.onServerLost(this, reason, this.fatalSeen);
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
    // A ReadyForQuery came in this read.
    let ready = false;
    let runBuffer: Buffer | undefined;
    let runStart = 0;
    let runEnd = 0;
    // Cork only once a second run appears: the usual reply is one run, one write.
    let corked = false;
    try {
      reader.push(chunk, length);
      while (reader.next()) {
        const type = reader.type;
        const tracked = TRACKED[type];
        if (tracked === 1) {
          if (type === MessageType.readyForQuery) {
            ready = true;
            boundary = this.readyReceived(user, reader.buffer[reader.bodyStart]!);
            const before = tracker.atBoundary ? user.beforeReady?.(this) : undefined;
            if (before !== undefined) {
              if (!corked) {
                out.cork();
                corked = true;
              }
              if (runBuffer !== undefined) writeRange(out, runBuffer, runStart, runEnd);
              runBuffer = undefined;
              out.write(before);
            }
            if (tracker.atBoundary && user.holdReady?.(this) === true) {
              if (runBuffer !== undefined) writeRange(out, runBuffer, runStart, runEnd);
              runBuffer = undefined;
              continue;
            }
          } else if (type === MessageType.commandComplete) this.onCommandComplete(reader.buffer, reader.bodyStart, reader.end);
          else {
            if (type === MessageType.errorResponse) this.errorReceived(reader.buffer, reader.bodyStart);
            tracker.serverMessage(type);
          }
        } else if (tracked === 2) tracker.serverMessage(type);
        if (reader.buffer === runBuffer && reader.start === runEnd) runEnd = reader.end;
        else {
          if (runBuffer !== undefined) {
            if (!corked) {
              out.cork();
              corked = true;
            }
            writeRange(out, runBuffer, runStart, runEnd);
          }
          runBuffer = reader.buffer;
          runStart = reader.start;
          runEnd = reader.end;
        }
      }
    } catch (error) {
      if (runBuffer !== undefined) writeRange(out, runBuffer, runStart, runEnd);
      if (corked) out.uncork();
      this.logger.warn({ server: this.id, err: (error as Error).message }, 'malformed data from the server');
      this.stream.destroy();
      return;
    }
    if (runBuffer !== undefined) writeRange(out, runBuffer, runStart, runEnd);
    if (corked) out.uncork();
    this.afterForwarding(out, user, boundary, ready);
  }

  private afterForwarding(out: Duplex, user: ServerConnectionUser, boundary: boolean, ready: boolean): void {
    const tracker = this.tracker;
    // Bytes left queued may point into a reused read buffer, and a slow client
    // must not make us buffer without bound: read no more until they drain.
    if (out.writableLength > 0 && this.pausedFor === undefined && !out.destroyed) {
      this.pausedFor = out;
      this.stream.pause();
      // 'drain' fires only past the high-water mark; an empty write's callback runs once all before it is flushed.
      out.write(NOTHING, this.resumeReading);
    }
    if (this.user !== user) return;
    // Re-check: the client may have sent more while we forwarded.
    if (boundary && tracker.atBoundary) user.onServerBoundary(this);
    else if (ready && tracker.pendingReady === 0) user.onServerAnswered?.(this);
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
    // A ReadyForQuery came in this read.
    let ready = false;
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
        const tracked = TRACKED[type];
        // Replies to the sidecar's own Parse, Describe and Close count too: the tracker saw them sent.
        if (tracked === 2) tracker.serverMessage(type);
        if (tracked === 1) {
          if (type === MessageType.readyForQuery) {
            ready = true;
            boundary = this.readyReceived(user, reader.buffer[reader.bodyStart]!);
            if (editor.active) editor.ready(tracker.readyBatches);
            const before = tracker.atBoundary ? user.beforeReady?.(this) : undefined;
            if (before !== undefined) {
              flushRun();
              pieces.push(before);
            }
            if (tracker.atBoundary && user.holdReady?.(this) === true) {
              flushRun();
              continue;
            }
          } else if (type === MessageType.commandComplete) this.onCommandComplete(reader.buffer, reader.bodyStart, reader.end);
          else {
            if (type === MessageType.errorResponse) {
              this.errorReceived(reader.buffer, reader.bodyStart);
              tracker.serverMessage(type);
              // Tells a failed Parse from one skipped after an earlier error; whether the server now discards what is sent until a Sync.
              if (editor.active) editor.error(tracker.skipping);
              // A Bind the sidecar failed on purpose (its statement's result shape changed): PostgreSQL's own error for that.
              if (isReshapedError(reader.buffer, reader.bodyStart, reader.end)) {
                flushRun();
                pieces.push(RESHAPED_ERROR);
                continue;
              }
            } else tracker.serverMessage(type);
          }
        } else if ((type === MessageType.parseComplete || type === MessageType.closeComplete) && editor.active) {
          const edit = editor.reply(type);
          if (edit !== 'forward') {
            flushRun();
            if (edit === 'parse-complete') pieces.push(PARSE_COMPLETE);
            continue;
          }
        } else if ((type === MessageType.parameterDescription || type === MessageType.rowDescription || type === MessageType.noData) && editor.active && editor.described(type, reader.buffer, reader.bodyStart, reader.end)) {
          // The sidecar's own Describe of a statement it parsed: its shape is recorded, the client never asked.
          flushRun();
          continue;
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
    writePieces(out, pieces);
    this.afterForwarding(out, user, boundary, ready);
  }

  /**
   * DEALLOCATE ALL and DISCARD ALL drop every prepared statement of the
   * backend, whoever sent them; DISCARD ALL also resets its settings (to
   * those of its login). Read
   * from the server's reply, so a command that failed changes nothing.
   */
  private onCommandComplete(buffer: Buffer, bodyStart: number, end: number): void {
    const watching = this.tracker.watched === 'running' || this.resetOutcome !== undefined || this.unlistenOutcome !== undefined;
    const rollback = watching && tagIs(ROLLBACK_TAG, buffer, bodyStart, end);
    this.tracker.commandCompleted(rollback);
    const event = rollback ? 'rollback' : 'command';
    this.unlistenOutcome = outcomeAfter(this.unlistenOutcome, event);
    this.resetOutcome = outcomeAfter(this.resetOutcome, event);
    const user = this.user;
    if (user?.awaitingUnlistens === true && tagIs(UNLISTEN_TAG, buffer, bodyStart, end)) {
      this.unlistenOutcome ??= 'clean';
      user.onUnlistenCompleted?.();
    }
    // After RESET ALL the backend is on its login settings: the next client's settings are applied
    // again (asyncpg sends RESET ALL when its pool takes a connection back). A client's RESET holds
    // once its transaction commits (see resolveReset); the sidecar's own at once.
    if (tagIs(RESET_TAG, buffer, bodyStart, end)) {
      this.settingsReset();
      return;
    }
    // A DEALLOCATE a session sent ran: what the sidecar assumed when sending it holds (see ResponseEditor.expectCommand).
    if (this.editor.active && tagIs(DEALLOCATE_TAG, buffer, bodyStart, end)) {
      this.editor.commandCompleted('DEALLOCATE');
      return;
    }
    const discard = tagIs(DISCARD_ALL_TAG, buffer, bodyStart, end);
    if (!discard && !tagIs(DEALLOCATE_ALL_TAG, buffer, bodyStart, end)) return;
    // One the session's rewriting awaited forgot the statements when it was sent (Parses after it in
    // its batch may have added some since); any other forgets them now.
    if (!this.editor.active || !this.editor.commandCompleted(discard ? 'DISCARD ALL' : 'DEALLOCATE ALL')) this.statements.clear();
    if (discard) this.settingsReset();
  }

  /** An ErrorResponse: a FATAL one means the backend exits; any may have undone the client's RESET or UNLISTEN. */
  private errorReceived(buffer: Buffer, bodyStart: number): void {
    if (isFatal(buffer, bodyStart)) this.fatalSeen = true;
    this.resetOutcome = outcomeAfter(this.resetOutcome, 'error');
    this.unlistenOutcome = outcomeAfter(this.unlistenOutcome, 'error');
  }

  private settingsReset(): void {
    if (this.user === undefined) this.settings = this.loginSettings;
    else this.resetOutcome ??= 'clean';
  }

  /** Bookkeeping of a ReadyForQuery in either read path; true when it leaves the connection at a boundary. */
  private readyReceived(user: ServerConnectionUser, statusByte: number): boolean {
    this.readyCount += 1;
    const boundary = this.tracker.serverMessage(MessageType.readyForQuery, statusByte);
    if (boundary) this.events.transactionCompleted();
    if (this.resetOutcome !== undefined && this.tracker.status === 'I') this.resolveReset(user);
    if (this.unlistenOutcome !== undefined && this.tracker.status === 'I') {
      const held = this.unlistenOutcome !== 'rolled-back';
      this.unlistenOutcome = undefined;
      user.onUnlistensEnded?.(held);
    }
    return boundary;
  }

  /**
   * The transaction of a client's RESET or DISCARD ALL ended: with nothing
   * in between that may have rolled it back, the backend is on its login
   * settings and so is the client's session; rolled back, nothing changed;
   * otherwise the client pins, as for a SET whose outcome is uncertain.
   */
  private resolveReset(user: ServerConnectionUser): void {
    const outcome = this.resetOutcome;
    this.resetOutcome = undefined;
    if (outcome === 'clean') {
      this.settings = this.loginSettings;
      user.onSettingsReset?.();
    } else if (outcome === 'doubtful') user.onSettingsResetUncertain?.();
  }

  private onDataWithoutUser(chunk: Buffer, length: number): void {
    const reader = this.reader;
    try {
      reader.push(chunk, length);
      while (reader.next()) {
        const type = reader.type;
        const internal = this.internalQuery;
        if (internal !== undefined) {
          const result = internal.result;
          if (type === MessageType.errorResponse) {
            if (isFatal(reader.buffer, reader.bodyStart)) this.fatalSeen = true;
            result.ok = false;
            result.error ??= parseNoticeFields(reader.buffer.subarray(reader.bodyStart, reader.end));
          } else if (type === MessageType.dataRow && result.row === undefined && !reader.piece) result.row = readDataRow(reader.buffer, reader.bodyStart, reader.end);
          else if (type === MessageType.commandComplete) this.onCommandComplete(reader.buffer, reader.bodyStart, reader.end);
          else if (type === MessageType.readyForQuery) {
            this.readyCount += 1;
            this.internalQuery = undefined;
            if (reader.buffer[reader.bodyStart] !== 0x49) result.ok = false;
            internal.done(result);
          }
        } else if (type === MessageType.errorResponse) {
          if (isFatal(reader.buffer, reader.bodyStart)) this.fatalSeen = true;
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

/** Columns of a DataRow body (NULL as undefined). */
function readDataRow(buffer: Buffer, bodyStart: number, end: number): (string | undefined)[] {
  const columns: (string | undefined)[] = [];
  const count = buffer.readUInt16BE(bodyStart);
  let offset = bodyStart + 2;
  for (let i = 0; i < count && offset + 4 <= end; i++) {
    const length = buffer.readInt32BE(offset);
    offset += 4;
    if (length < 0) columns.push(undefined);
    else {
      columns.push(buffer.toString('utf8', offset, offset + length));
      offset += length;
    }
  }
  return columns;
}

const FATAL = Buffer.from('SFATAL\0');
const PANIC = Buffer.from('SPANIC\0');

/** True if the ErrorResponse body at `bodyStart` has severity FATAL or PANIC (its first field, as PostgreSQL sends it). */
function isFatal(buffer: Buffer, bodyStart: number): boolean {
  return buffer.compare(FATAL, 0, 7, bodyStart, bodyStart + 7) === 0 || buffer.compare(PANIC, 0, 7, bodyStart, bodyStart + 7) === 0;
}
