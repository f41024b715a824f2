/**
 * One client connection: the startup phase (answered by the sidecar itself),
 * then the client-to-server half of the byte pump. Messages are framed by
 * header; runs of whole messages are queued while the client has no server
 * connection and written in one cork/uncork once it has one.
 *
 * In transaction mode, the first message naming a prepared statement, or
 * using the unnamed one in a batch after the one that parsed it, switches the
 * session to rewriting (core/pool-state/prepared-statements.ts): from then on
 * its queued messages are re-framed when forwarded and statement names are
 * mapped to shared server-side ones. Sessions that do neither keep the plain
 * byte pump.
 */
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import {
  FrameReader, MessageType, NO_SETTINGS, ProtocolError, UNTYPED, authenticationOk, backendKeyData, classifySessionCommand, clientSettingsFromStartup, laterSessionCommands,
  cancelledBatchReply, changeSettings, commandComplete, errorResponse, firstTextParameter, setConfigSql, isFrontendMessageType, messageTypeTable, namesPreparedStatement, negotiateProtocolVersion, parameterStatus, parseStartupPacket, readyForQuery,
  scanStatementText, sequenceRead, startsTransaction, serverSettingsAfter, startupSettings, unnamedStatementEffect, type ClientSettings, type NoticeFields, type PinReason, type SettingChange,
  leavesOnlyAdvisoryLocks, mentionsAdvisoryLock,
  POSTGRESQL_ALPN, TLS_HANDSHAKE_RECORD, noApplicationProtocolAlert, readClientHello,
} from '../core/protocol/index.ts';
import { routeMessage, unnamedStatement, type ClientStatements } from '../core/pool-state/index.ts';
import type { SidecarMetrics } from './metrics.ts';
import { isDirectReadable } from './direct-read-socket.ts';
import { writePieces } from './native-socket.ts';
import { acceptClientTls, type ClientTls } from './client-tls.ts';
import type { NotificationHub, NotificationListener } from './notifications.ts';
import type { AcquireFailure, Pool, PoolWaiter } from './pool.ts';
import type { ServerConnection } from './server-connection.ts';
import type { PoolMode } from './settings.ts';

/** What a session needs from the sidecar around it. */
export interface ClientSessionHost {
  readonly pool: Pool;
  readonly metrics: SidecarMetrics;
  readonly logger: Logger;
  readonly mode: PoolMode;
  readonly maxMessageBytes: number;
  /** Milliseconds a client has to send its startup packet. */
  readonly loginTimeoutMs: number;
  /**
   * Who may log in: the configured database and the credentials' user now;
   * `formerUsers`: names the credentials held earlier in this sidecar's life,
   * still accepted (an app's PGUSER was read from the Secret when it started).
   */
  expectedLogin(): { user: string; formerUsers: ReadonlySet<string>; database: string };
  isDraining(): boolean;
  /** A client sent its startup packet: it is counted, drained and closed with the others from now on. */
  admit(session: ClientSession): void;
  /**
   * Registers the session under its BackendKeyData at the end of its login; returns
   * [processId, secretKey]. `backend`: the server connection it keeps for its whole
   * session (session mode), whose pid it gets; otherwise a pid that names no backend.
   */
  register(session: ClientSession, backend?: { readonly processId: number; readonly secretKey: number }): [number, number];
  unregister(session: ClientSession): void;
  /** A CancelRequest arrived on this connection; `done` once it was delivered or dropped. */
  cancel(processId: number, secretKey: Buffer, done: () => void): void;
  /** The statement a CancelRequest came for while it waited in the sidecar has just been sent to `session`'s server connection: cancel it there. */
  cancelForwarded(session: ClientSession): void;
  /** Values (as SHOW prints them) of a settings set checked on the server before, by setting name. */
  shownSettings(key: string): ReadonlyMap<string, string> | undefined;
  /** Remembers a checked settings set. */
  rememberSettings(key: string, shown: ReadonlyMap<string, string>): void;
  /** A client was pinned to its server connection (transaction mode). */
  pinned(reason: PinReason): void;
  /** Counts a client unpinned (its session state gone from its server connection). */
  unpinned(reason: PinReason): void;
  /** LISTEN/NOTIFY for transaction mode clients; undefined in session mode. */
  readonly notifications: NotificationHub | undefined;
}

type Phase = 'startup' | 'login' | 'ready' | 'closed';

const NOTHING = Buffer.alloc(0);

/**
 * What the session knows of the client's unnamed statement before it names
 * statements (transaction mode): none; `kept`, its Parse copied; `unkept`,
 * one streamed through (too large to keep) and not bound yet, so its server
 * connection is held; `unkept-bound`, the same once a batch bound it, no
 * longer held: bound again in a later transaction, the client is refused.
 */
type UnnamedStatementState = 'none' | 'kept' | 'unkept' | 'unkept-bound';
/** Messages longer than this are streamed (see FrameReader); PgBouncer's pkt_buf plays the same role. */
export const STREAM_ABOVE_BYTES = 256 * 1024;
const CLIENT_STREAMABLE = messageTypeTable('QdBPF');
/** A Terminate message, as some clients send it on a connection they give up before the startup packet. */
const TERMINATE_FIRST = Buffer.from([0x58, 0, 0, 0, 4]);
const READY_IDLE = readyForQuery('I');
/** Draining: how long a client is served as before, and how long it must be quiet to be closed (see drain). */
const DRAIN_LINGER_MS = 500;

/** A client's connection: a net.Socket, a DirectReadSocket or a NativeSocket. */
export type ClientSocket = Duplex & { setNoDelay(noDelay?: boolean): unknown };

/** A client of the sidecar. */
export class ClientSession implements PoolWaiter, NotificationListener {
  /** The client's connection: after a TLS handshake, the TLS socket over the one accepted. */
  socket: ClientSocket;
  /** TLS accepted on this connection (it arrived over TCP and the sidecar offers it). */
  private readonly tls: ClientTls | undefined;
  private encrypted = false;
  /** Nothing has been read from the client yet (a direct TLS connection shows in its first byte). */
  private firstRead = true;
  /** The start of a direct TLS connection (libpq's sslnegotiation=direct), gathered until its ClientHello is whole. */
  private directHello: Buffer | undefined;
  private phase: Phase = 'startup';
  private server: ServerConnection | undefined;
  private waiting = false;
  /** Draining (see drain): 'lingering', served as before; 'closing', closed when quiet or at its next exchange (but one right after a transaction block). */
  private drainStage: 'none' | 'lingering' | 'closing' = 'none';
  /** Closing: the one exchange still served right after a transaction block (a pool's reset) has begun. */
  private drainGraceUsed = false;
  /** Closing: an exchange the client began runs (until its next boundary), so its further messages are no new one. */
  private drainExchangeOpen = false;
  /** Draining: the client sent messages inside a transaction block since the latest boundary. */
  private drainInBlock = false;
  /** Draining: the latest boundary ended a transaction block (a COMMIT or ROLLBACK). */
  private drainBlockEnded = false;
  /** Draining: messages forwarded and answers that ended a transaction; a check that finds none since the last finds the client quiet. */
  private drainActivity = 0;
  /** A Terminate came behind messages still to answer: close once they are. */
  private terminateAtBoundary = false;
  /** ReadyForQuery messages waiting for the hub (see holdReady). */
  private readyHeld = 0;
  /** Channels of UNLISTENs sent to the server connection while listening through the hub: not yet run, and run in the present transaction. */
  private unlistensSent: string[] | undefined;
  private unlistensRun: string[] | undefined;
  private readonly reader: FrameReader;
  private readonly pendingChunks: Buffer[] = [];
  private readonly pendingTypes: number[] = [];
  /** Transaction mode: a Bind waits for the result shape of its statement, just prepared on this server connection (see routeMessage). */
  private holding = false;
  /**
   * Pinned by a session advisory lock (see followAdvisoryPin): 'due', a
   * statement took or released one since the backend was last asked whether
   * it holds any; 'kept', something else of the session's may be on the
   * connection: pinned until the client leaves.
   */
  private advisoryPin: 'none' | 'due' | 'kept' = 'none';
  /** The backend is being asked for its advisory locks (see checkAdvisoryLocks): the client's messages wait. */
  private checkingLocks = false;
  /** The client's unnamed statement takes or releases an advisory lock: bound again later, it would do so wherever it runs. */
  private unnamedAdvisory = false;
  /** The client's named statements; undefined until it names one (transaction mode only). */
  private statements: ClientStatements | undefined;
  /**
   * Until then (transaction mode): the client's unnamed statement (see
   * UnnamedStatementState; changed only by setUnnamed) and, when `kept`, its
   * latest Parse, bytes [0, unnamedLength) of unnamedParse (reused, so
   * keeping it costs a copy, not an allocation).
   */
  private unnamed: UnnamedStatementState = 'none';
  private unnamedParse: Buffer | undefined;
  private unnamedLength = 0;
  /** A Parse of the unnamed statement came since the last Sync or Query: a Bind of it now runs on the same server connection. */
  private unnamedInBatch = false;

  /**
   * The client's unnamed statement was parsed from a Parse too large to keep
   * (streamed through) and not bound yet: it exists only on the server
   * connection that ran it, so the client keeps that connection from one
   * transaction to the next until a batch binds it (or a Query, a Close or
   * another Parse replaces it). pg8000 parses every statement in a batch of
   * its own and binds it in a later one, and so does pgx's describe_exec mode;
   * holding no longer than that, an idle client does not keep a connection.
   */
  private get holdsUnkeptUnnamed(): boolean {
    return this.unnamed === 'unkept';
  }

  /** The unnamed statement is one streamed through, bound or not: it exists only on the server connection that parsed it. */
  private get unnamedUnkept(): boolean {
    return this.unnamed === 'unkept' || this.unnamed === 'unkept-bound';
  }

  /** The one place the unnamed statement's state changes; `length`: the bytes of unnamedParse kept. */
  private setUnnamed(state: UnnamedStatementState, length = 0): void {
    if ((state === 'kept') !== (length > 0)) throw new Error(`unnamed statement state ${state} with ${length} bytes kept`);
    if (state === 'unkept-bound' && this.unnamed !== 'unkept' && this.unnamed !== 'unkept-bound') throw new Error(`unnamed statement: ${this.unnamed} -> ${state}`);
    this.unnamed = state;
    this.unnamedLength = length;
  }

  /** The session began naming statements while holding such an unnamed statement: the rewriting starts with it current on its (pinned) connection. */
  private unkeptUnnamedCurrent = false;
  /** BackendKeyData sent at login; undefined until then. */
  private key: [number, number] | undefined;
  /** Run-time settings from the startup packet and the client's SETs since, applied to every server connection this client uses. */
  settings: ClientSettings = NO_SETTINGS;
  /**
   * Transaction mode: setting changes the client sent (SET, RESET, ...),
   * watched on its server connection until their transaction ends; once they
   * hold they become the client's settings instead of pinning it (see
   * resolveSettingChanges).
   */
  private settingChanges: readonly SettingChange[] | undefined;
  /** The client's latest unnamed Parse is a SET: a Bind of it in a later batch would run it unwatched, so that pins. */
  private unnamedSetting = false;
  /** Where the unnamed SET's changes begin in settingChanges (earlier ones: SETs before it in the same block). */
  private unnamedSettingFrom = 0;
  /** An unnamed Parse came since the last Sync (kept only while unnamedSetting). */
  private unnamedParsedSinceSync = false;
  /** The client's startup settings as the server showed them at its login (lower-cased names). */
  private shownAtLogin: ReadonlyMap<string, string> | undefined;
  /**
   * Reported settings (named as the server reports them) to tell the client
   * again once its transaction ends: a RESET took them to the server
   * connection's own value, reported as such, and the client's next
   * transaction has its startup value back, as its session would direct.
   */
  private restate: Set<string> | undefined;
  /**
   * The client's named prepared statements that are setting changes
   * (psycopg 3 prepares a SET it ran five times, postgres.js prepares every
   * statement): each execution between transactions is carried as the same
   * SET would be (see followSettingStatements). Undefined until there is one.
   */
  private settingStatements: Map<string, readonly SettingChange[] | { parameter: string }> | undefined;
  /** ReadyForQuery messages owed before the watched statement's batch, for a watch started once a server connection comes. */
  private settingWatchAfter = 0;
  /** The portal last bound from one of settingStatements, until its transaction ends. */
  private boundSetting: { portal: string; changes: readonly SettingChange[] } | undefined;
  /** The SET of settingChanges, parsed as the unnamed statement, was bound in its batch: it runs there (see followUnnamedSetting). */
  private unnamedSettingBound = false;
  /** At login: apply every setting to learn its value as the server shows it. */
  checkSettings = false;
  /** Session state that keeps this client on its server connection (transaction mode). */
  private pinnedBy: PinReason | undefined;
  /**
   * Transaction mode, where the session's sequence values (what currval()
   * and lastval() read: its last nextval()) are: the one server connection
   * every transaction of it ran on (null once there were two), that
   * connection's sequenceTurn when it came to this client, and whether a
   * statement ran on the connection it holds (so a nextval() of its own may
   * have come before). See checkSequenceRead.
   */
  private sequenceServer: ServerConnection | null | undefined;
  private sequenceTurn = 0;
  private ranSinceLent = false;
  /** The idle server connection the pool must lend next (the one holding the session's sequence values). */
  preferredServer: ServerConnection | undefined;
  /** A LISTEN/UNLISTEN the sidecar answers itself is under way: later messages wait. */
  private localCommand = false;
  /**
   * Between transactions of a client that listens through the hub: 'waiting'
   * while the hub sends what was notified before the next transaction starts
   * (its messages wait), 'done' once it did, until the server connection is
   * released.
   */
  private hubSync: 'none' | 'waiting' | 'done' = 'none';
  /** A CancelRequest came while the statement waited in the sidecar: it is cancelled once sent to a server connection. */
  private cancelOnForward = false;
  /** Notifications that arrived while a transaction ran: sent after it. */
  private readonly pendingNotifications: Buffer[] = [];
  private readonly host: ClientSessionHost;
  /** Reading is paused until the server's stream drains (see forward). */
  private pausedFor: Duplex | undefined;
  /** Reading is paused while the client waits for a server connection with messages queued. */
  private pausedWaiting = false;
  private loginTimer: NodeJS.Timeout | undefined;
  private readonly resumeReading = (): void => {
    if (this.pausedFor === undefined) return;
    this.pausedFor = undefined;
    if (!this.socket.destroyed) this.socket.resume();
  };

  private readonly onStreamData = (chunk: Buffer): void => this.onData(chunk, chunk.length, false);
  private readonly onSocketError = (err: Error): void => this.host.logger.debug({ err: err.message }, 'client socket error');
  private readonly onSocketClose = (): void => this.onClose();

  /** `options.tls`: accept TLS when the client asks (SSLRequest, or a direct TLS handshake); absent: answer "no", close a direct one. */
  constructor(socket: ClientSocket, host: ClientSessionHost, options: { tls?: ClientTls } = {}) {
    this.socket = socket;
    this.host = host;
    this.tls = options.tls;
    // Big queries, binds and COPY data stream through: memory does not grow with message size.
    this.reader = new FrameReader({ startupPhase: true, maxMessageBytes: host.maxMessageBytes, streamAbove: STREAM_ABOVE_BYTES, streamable: CLIENT_STREAMABLE });
    socket.setNoDelay(true);
    if (isDirectReadable(socket)) socket.setDirectReader((buffer, length, lent) => this.onData(buffer, length, lent));
    else socket.on('data', this.onStreamData);
    socket.on('error', this.onSocketError);
    socket.on('close', this.onSocketClose);
    this.loginTimer = setTimeout(() => {
      this.loginTimer = undefined;
      if (this.phase !== 'startup') return;
      host.metrics.error('login-timeout');
      this.fail({ severity: 'FATAL', code: '08P01', message: `no startup packet within ${host.loginTimeoutMs / 1000} s` });
    }, host.loginTimeoutMs);
    this.loginTimer.unref();
  }

  /** Session state that keeps this client on its server connection, if any. */
  get pinReason(): PinReason | undefined {
    return this.pinnedBy;
  }

  /** True while a server connection is lent to this client. */
  get active(): boolean {
    return this.server !== undefined;
  }

  /** The server connection in use, for CancelRequest forwarding. */
  get serverConnection(): ServerConnection | undefined {
    return this.server;
  }

  /** BackendKeyData [processId, secretKey] this client was given at login, if it got that far. */
  get backendKey(): readonly [number, number] | undefined {
    return this.key;
  }

  /**
   * Drain. A client still logging in is closed now; a logged-in one is served
   * as before for DRAIN_LINGER_MS, then closed with 57P01 when quiet (between
   * transactions, no message and no answer for DRAIN_LINGER_MS) or, if busy,
   * at its next exchange (messages sent between transactions), answered with
   * it: one exchange right after a transaction block ended still runs, once.
   * Never right behind a transaction's end: a driver may have sent its next
   * message then (asyncpg's reset when the connection goes back to its pool
   * raises out of the app's `async with pool.acquire()` after the COMMIT
   * succeeded), and node-postgres reads a FATAL that follows a ReadyForQuery
   * before the app has given the client back to its pool, emitting it as an
   * 'error' event on a client the app still holds (which ends an app with no
   * listener there). In session mode the client keeps its server connection
   * meanwhile; in transaction mode the draining pool still lends them.
   */
  drain(): void {
    if (this.phase === 'closed' || this.drainStage !== 'none') return;
    if (this.phase !== 'ready' && this.quietForDrain()) {
      this.closeForDrain();
      return;
    }
    this.drainStage = 'lingering';
    if (this.server !== undefined && this.server.tracker.status !== 'I') this.drainInBlock = true;
    this.checkDrainLater();
  }

  /** Nothing of the client's is under way or waiting: closing it now fails no statement. */
  private quietForDrain(): boolean {
    return this.readyHeld === 0 && !this.localCommand && !this.checkingLocks && !this.waiting && this.pendingTypes.length === 0 && (this.server === undefined || this.server.tracker.atBoundary);
  }

  /** Every DRAIN_LINGER_MS while draining: a client quiet since the last check is closed. */
  private checkDrainLater(): void {
    const seen = this.drainActivity;
    setTimeout(() => {
      if (this.phase === 'closed') return;
      this.drainStage = 'closing';
      if (this.drainActivity === seen && this.quietForDrain()) this.closeForDrain();
      else this.checkDrainLater();
    }, DRAIN_LINGER_MS).unref();
  }

  private closeForDrain(): void {
    this.releaseServer(true);
    this.fail({ severity: 'FATAL', code: '57P01', message: 'terminating connection: the poolkeeper sidecar is draining' });
  }

  /** Drain timeout reached: close regardless; a server mid-transaction is discarded. */
  forceClose(): void {
    if (this.phase === 'closed') return;
    this.releaseServer(false);
    this.fail({ severity: 'FATAL', code: '57P01', message: 'terminating connection: the poolkeeper sidecar drain timeout expired' });
  }

  // ---- client bytes -------------------------------------------------------

  /** Bytes [0, length) of `chunk` arrived from the client. */
  /** `lent`: `chunk` is a view of the socket's reused read buffer (DirectReadSocket), valid only during this call. */
  private onData(chunk: Buffer, length: number, lent: boolean): void {
    if (this.phase === 'closed' || this.terminateAtBoundary) return;
    if (this.firstRead || this.directHello !== undefined) {
      this.firstRead = false;
      // As PostgreSQL 17: a handshake record where the startup packet's length would be is a direct TLS connection.
      if (this.directHello !== undefined || (length > 0 && chunk[0] === TLS_HANDSHAKE_RECORD)) {
        this.onDirectTls(chunk.subarray(0, length));
        return;
      }
    }
    // PostgreSQL drops such a connection without a word (it cannot be a startup packet); so do we.
    if (this.phase === 'startup' && length >= 5 && chunk.compare(TERMINATE_FIRST, 0, 5, 0, 5) === 0 && this.reader.buffered === 0) {
      this.closeQuietly();
      return;
    }
    const reader = this.reader;
    const queuedBefore = this.pendingChunks.length;
    let runBuffer: Buffer | undefined;
    let runStart = 0;
    let runEnd = 0;
    try {
      reader.push(chunk, length);
      while (reader.next()) {
        const type = reader.type;
        // A later piece of a streamed message is bytes only, forwarded as they come.
        if (!reader.piece || reader.pieceFirst) {
          if (type === UNTYPED) {
            this.onStartupPacket(reader.buffer.subarray(reader.bodyStart, reader.end));
            if ((this.phase as Phase) === 'closed') return;
            continue;
          }
          if (!isFrontendMessageType(type)) throw new ProtocolError('unknown-message-type', `invalid frontend message type ${type}`);
          if (this.phase === 'startup') throw new ProtocolError('bad-startup', 'message before the startup packet');
          if (type === MessageType.terminate) {
            if (runBuffer !== undefined) this.pendingChunks.push(runBuffer.subarray(runStart, runEnd));
            runBuffer = undefined;
            if (this.pendingTypes.length === 0 && this.nothingOwed()) {
              this.terminate();
              return;
            }
            // PostgreSQL answers what came before a Terminate, then closes: so do we.
            this.terminateAtBoundary = true;
            break;
          }
          if (this.host.mode === 'transaction') {
            if (this.statements === undefined && (namesPreparedStatement(type, reader.buffer, reader.bodyStart, reader.end) || this.usesEarlierUnnamed(type, reader.buffer, reader.bodyStart, reader.start, reader.end, reader.piece))) {
              // Rewriting needs whole messages: a long first one (a Parse of many parameters) is read whole after all.
              if (reader.piece) {
                reader.gatherWhole();
                continue;
              }
              if (this.unnamedUnkept && this.server === undefined && unnamedStatementEffect(type, reader.buffer, reader.bodyStart, reader.end) === 'use') {
                this.refuseStatementTracking('the unnamed prepared statement, bound again in a later transaction than its Parse, is too large to track in transaction mode', 'Parse it again before each use, or use pool.mode: session');
                return;
              }
              // An unnamed statement too large to keep is current on the connection held: the rewriting cannot prepare it elsewhere.
              const unkept = this.unnamedUnkept && this.server !== undefined;
              this.startNamingStatements(runBuffer?.subarray(runStart, runEnd));
              runBuffer = undefined;
              if (unkept) {
                this.pin('unnamed-statement');
                this.unkeptUnnamedCurrent = true;
              }
            }
            if (this.unnamedSetting && this.pinnedBy === undefined) this.followUnnamedSetting(type, reader.buffer, reader.bodyStart, reader.end);
            if (this.settingStatements !== undefined && this.pinnedBy === undefined) this.followSettingStatements(type, reader.buffer, reader.bodyStart, reader.end);
            const pinnedBefore = this.pinnedBy;
            if (pinnedBefore === undefined) {
              const textStart = type === MessageType.query || type === MessageType.parse ? sqlTextStart(type, reader.buffer, reader.bodyStart, reader.end) : undefined;
              // One pass over the SQL text tells each check below whether it has anything to look for.
              const scan = textStart === undefined ? 0 : scanStatementText(reader.buffer, textStart, reader.end);
              if (textStart !== undefined && !this.checkSequenceRead(reader.buffer, textStart, reader.end, scan)) return;
              if (type === MessageType.bind || type === MessageType.execute || type === MessageType.functionCall || (type === MessageType.query && !startsTransaction(reader.buffer, reader.bodyStart, reader.end, scan))) this.ranSinceLent = true;
              if (textStart !== undefined && this.pinnedBy === undefined) {
                const nothingQueued = runBuffer === undefined && this.pendingTypes.length === 0 && this.pendingChunks.length === 0 && this.server === undefined && !this.localCommand;
                // Answered by the sidecar itself (LISTEN through the notification hub): not forwarded.
                if (this.checkSessionState(type, reader.buffer, reader.bodyStart, textStart, reader.end, scan, nothingQueued)) continue;
              }
            }
            if (this.pinnedBy === 'advisory-lock' && this.advisoryPin !== 'kept' && (type === MessageType.query || type === MessageType.parse)) this.followAdvisoryPin(type, reader.buffer, reader.bodyStart, reader.end);
            if (pinnedBefore !== undefined && (type === MessageType.query || type === MessageType.parse) && this.host.notifications?.listens(this) === true) {
              // Pinned, its UNLISTEN runs on its own server connection: what it listens on through the hub ends too.
              const textStart = sqlTextStart(type, reader.buffer, reader.bodyStart, reader.end);
              if (textStart !== undefined) {
                const later = type === MessageType.query ? laterSessionCommands(reader.buffer, textStart, reader.end) : [];
                for (const c of [classifySessionCommand(reader.buffer, textStart, reader.end), ...later]) if (c?.kind === 'unlisten') this.unlistenOnHub(c.channel);
              }
            }
          }
          this.pendingTypes.push(type);
        }
        if (reader.buffer === runBuffer && reader.start === runEnd) runEnd = reader.end;
        else {
          if (runBuffer !== undefined) this.pendingChunks.push(runBuffer.subarray(runStart, runEnd));
          runBuffer = reader.buffer;
          runStart = reader.start;
          runEnd = reader.end;
        }
      }
    } catch (error) {
      this.onProtocolError(error);
      return;
    }
    if (runBuffer !== undefined) this.pendingChunks.push(runBuffer.subarray(runStart, runEnd));
    this.forward();
    // What came before the Terminate went out and owes no ReadyForQuery (Parse/Describe/Flush): nothing more will come.
    if (this.terminateAtBoundary && this.pendingTypes.length === 0 && this.pendingChunks.length === 0 && this.nothingOwed()) {
      this.terminate();
      return;
    }
    const chunks = this.pendingChunks;
    if (chunks.length === queuedBefore) return;
    // Still queued (no server connection yet): what this read added must outlive the reused read buffer.
    if (lent) for (let i = queuedBefore; i < chunks.length; i++) chunks[i] = Buffer.from(chunks[i]!);
    // And a client that keeps sending while it waits (more than its one request) is not read
    // from until it is served; the usual single waiting message costs no pause and resume.
    if (!this.pausedWaiting && this.pendingTypes.length + chunks.length > 2 && !this.socket.destroyed) {
      this.pausedWaiting = true;
      this.socket.pause();
    }
  }

  /**
   * Transaction mode: a statement that leaves session state on the server
   * connection (SET, LISTEN, PREPARE, a temporary table, a WITH HOLD cursor)
   * pins the client to it until the client leaves; then it is reset with
   * DISCARD ALL before anyone else gets it.
   */
  private checkSessionState(type: number, buffer: Buffer, bodyStart: number, textStart: number, end: number, scan: number, nothingQueued: boolean): boolean {
    const command = classifySessionCommand(buffer, textStart, end, scan);
    if (type === MessageType.parse && (command?.kind === 'setting-parameter' || (buffer[bodyStart] !== 0 && command?.kind === 'settings') || this.settingStatements !== undefined)) {
      // A named statement, or one whose value comes bound: the setting changes only when it is executed (see followSettingStatements).
      const name = buffer.toString('utf8', bodyStart, textStart - 1);
      if (command?.kind === 'setting-parameter') {
        (this.settingStatements ??= new Map()).set(name, { parameter: command.name });
        return false;
      }
      if (name !== '' && command?.kind === 'settings') {
        (this.settingStatements ??= new Map()).set(name, command.changes);
        return false;
      }
      this.settingStatements?.delete(name);
    }
    if (command?.kind === 'setting-parameter') {
      // A simple Query has no parameter to bind: the server refuses it; whatever it is, it pins.
      this.pin('set');
      return false;
    }
    // A session command after the first statement of a simple Query pins as it would alone.
    if (type === MessageType.query && this.pinnedBy === undefined) {
      const laterCommands = laterSessionCommands(buffer, textStart, end, scan);
      const later = laterCommands.find((c) => c.kind === 'pin');
      // (A Query of setting changes only is carried as a whole.)
      if (later?.kind === 'pin' && command?.kind !== 'pin' && command?.kind !== 'listen' && command?.kind !== 'settings') this.pin(later.reason);
      for (const c of laterCommands) if (c.kind === 'unlisten') this.unlistenOnHub(c.channel);
    }
    if (command === undefined) return false;
    if (command.kind === 'settings') {
      // Its outcome is watched (see watchSettingChanges); what cannot be watched pins as before.
      if (type === MessageType.query) {
        // A simple Query is its own batch: behind queries still unanswered (a pipelining client), its outcome is the ReadyForQuery after theirs.
        this.watchSettingChanges(command.changes);
        return false;
      }
      // An unnamed Parse: its batch may end before it is bound (see followUnnamedSetting), which takes its changes back out.
      if (buffer[bodyStart] !== 0) {
        this.pin('set');
        return false;
      }
      const from = this.settingChanges?.length ?? 0;
      if (this.watchSettingChanges(command.changes)) {
        this.unnamedSettingFrom = from;
        this.unnamedSetting = true;
        this.unnamedParsedSinceSync = true;
        this.unnamedSettingBound = false;
      }
      return false;
    }
    if (command.kind === 'listen' || command.kind === 'unlisten') {
      // A lone LISTEN/UNLISTEN between transactions goes through the sidecar's one listening connection.
      const hub = this.host.notifications;
      if (type === MessageType.query && command.alone && nothingQueued && hub !== undefined && (command.kind === 'listen' ? hub.available() : hub.listens(this))) {
        this.runListenCommand(hub, command.kind, command.channel);
        return true;
      }
      if (command.kind === 'listen') this.pin('listen');
      else this.unlistenOnHub(command.channel);
      return false;
    }
    if (command.kind === 'pin') this.pin(command.reason);
    return false;
  }

  /**
   * Keeps track of the unnamed statement while the session is not rewriting:
   * remembers its latest Parse, and returns true for a Bind or Describe of it
   * with no Parse of it since the last Sync, which may land on another server
   * connection (pgx's describe_exec mode, libpq's PQprepare with an empty
   * name): the session must switch to rewriting to prepare it there.
   */
  private usesEarlierUnnamed(type: number, buffer: Buffer, bodyStart: number, start: number, end: number, piece: boolean): boolean {
    if (type === MessageType.sync) {
      this.unnamedInBatch = false;
      return false;
    }
    if (type === MessageType.query) {
      // A simple Query drops the backend's unnamed statement.
      this.unnamedInBatch = false;
      this.setUnnamed('none');
      return false;
    }
    const effect = unnamedStatementEffect(type, buffer, bodyStart, end);
    if (effect === undefined) return false;
    if (effect === 'use') {
      if (!this.unnamedUnkept) return !this.unnamedInBatch;
      // One streamed through (not kept) runs only where it was parsed: on the server connection the client still holds (see holdsUnkeptUnnamed).
      if (type === MessageType.bind) this.setUnnamed('unkept-bound');
      return !this.unnamedInBatch && this.server === undefined;
    }
    if (effect === 'close') {
      this.setUnnamed('none');
      return false;
    }
    this.unnamedInBatch = true;
    if (piece) {
      this.setUnnamed('unkept');
      return false;
    }
    const length = end - start;
    if (this.unnamedParse === undefined || this.unnamedParse.length < length) this.unnamedParse = Buffer.allocUnsafeSlow(Math.max(256, length));
    buffer.copy(this.unnamedParse, 0, start, end);
    this.setUnnamed('kept', length);
    return false;
  }

  /**
   * While the client's unnamed statement is a SET: a Bind of it with no
   * unnamed Parse since the last Sync runs the SET again where it is not
   * watched, so the client is pinned; a new unnamed statement or a simple
   * Query (which drops it) ends that.
   */
  private followUnnamedSetting(type: number, buffer: Buffer, bodyStart: number, end: number): void {
    // The SET's batch ends, or its unnamed statement is replaced, before any Bind of it: it never ran, whatever
    // else completes in that batch (libpq's PQsendPrepare of it, then another statement), so it is not carried.
    const unbound = (): void => {
      if (!this.unnamedParsedSinceSync || this.unnamedSettingBound || this.settingChanges === undefined) return;
      // Only the unnamed SET's own changes: those of earlier SETs in the same block stand.
      this.settingChanges = this.unnamedSettingFrom === 0 ? undefined : this.settingChanges.slice(0, this.unnamedSettingFrom);
    };
    if (type === MessageType.sync) {
      unbound();
      this.unnamedParsedSinceSync = false;
    } else if (type === MessageType.query) {
      unbound();
      this.unnamedSetting = false;
    } else if (type === MessageType.parse && buffer[bodyStart] === 0) {
      unbound();
      this.unnamedSetting = false;
      this.unnamedParsedSinceSync = true;
    } else if (type === MessageType.bind) {
      const portalEnd = buffer.indexOf(0, bodyStart);
      if (portalEnd >= 0 && portalEnd + 1 < end && buffer[portalEnd + 1] === 0) {
        if (this.unnamedParsedSinceSync) this.unnamedSettingBound = true;
        else this.pin('set');
      }
    }
  }

  /**
   * Follows the executions of the client's prepared setting statements: a
   * Bind of one remembers its portal (with the value bound, for
   * set_config(name, $1, false)); an Execute of that portal is watched as any
   * setting change (see watchSettingChanges).
   */
  private followSettingStatements(type: number, buffer: Buffer, bodyStart: number, end: number): void {
    const statements = this.settingStatements!;
    if (type === MessageType.bind) {
      const portalEnd = buffer.indexOf(0, bodyStart);
      const statementEnd = portalEnd < 0 || portalEnd >= end ? -1 : buffer.indexOf(0, portalEnd + 1);
      if (statementEnd < 0 || statementEnd >= end) return;
      const portal = buffer.toString('utf8', bodyStart, portalEnd);
      const entry = statements.get(buffer.toString('utf8', portalEnd + 1, statementEnd));
      let changes: readonly SettingChange[] | undefined;
      if (entry === undefined || Array.isArray(entry)) changes = entry as readonly SettingChange[] | undefined;
      else {
        // set_config(name, $1, false): replayed with the value bound now; NULL resets it, as set_config does.
        const { parameter } = entry as { parameter: string };
        const value = firstTextParameter(buffer, bodyStart, end);
        if (value === undefined) {
          this.pin('set');
          return;
        }
        changes = [value === null ? { kind: 'reset', name: parameter } : { kind: 'set', name: parameter, sql: setConfigSql(parameter, value) }];
      }
      if (changes !== undefined) this.boundSetting = { portal, changes };
      else if (this.boundSetting?.portal === portal) this.boundSetting = undefined;
    } else if (type === MessageType.execute) {
      const bound = this.boundSetting;
      const portalEnd = buffer.indexOf(0, bodyStart);
      if (bound === undefined || portalEnd < 0 || portalEnd >= end || buffer.toString('utf8', bodyStart, portalEnd) !== bound.portal) return;
      this.watchSettingChanges(bound.changes);
    } else if (type === MessageType.close) {
      // A portal lives until its transaction ends; one kept past that only makes a later Execute of it fail, and pin.
      const name = buffer.toString('utf8', bodyStart + 1, Math.max(bodyStart + 1, buffer.indexOf(0, bodyStart + 1)));
      if (buffer[bodyStart] === 0x53 /* S */) statements.delete(name);
      else if (this.boundSetting?.portal === name) this.boundSetting = undefined;
    } else if (type === MessageType.query) statements.delete('');
  }

  /**
   * Watches the setting changes of a statement about to be queued: its
   * outcome comes with the ReadyForQuery after those still owed before it
   * (forwarded and unanswered, or queued), or at the end of its transaction
   * block. One watch at a time (more changes in the same block join it),
   * and none while COPY runs: otherwise the client pins. False if it pinned.
   */
  private watchSettingChanges(changes: readonly SettingChange[]): boolean {
    const server = this.server;
    let after = 0;
    for (const t of this.pendingTypes) if (t === MessageType.sync || t === MessageType.query || t === MessageType.functionCall) after += 1;
    if (server !== undefined && server.tracker.copy !== 'none') {
      this.pin('set');
      return false;
    }
    if (this.settingChanges !== undefined) {
      // Another in the same transaction block as the one watched: both hold if it commits.
      const sameBlock = server !== undefined && after === 0 && server.tracker.watched === 'running' && server.tracker.inTransaction && server.tracker.pendingReady === 0;
      if (!sameBlock) {
        this.pin('set');
        return false;
      }
      this.settingChanges = [...this.settingChanges, ...changes];
      return true;
    }
    this.settingChanges = changes;
    this.settingWatchAfter = after;
    if (server !== undefined) server.tracker.watch(server.tracker.batchesOwed + after);
    return true;
  }

  /**
   * The watched setting changes have their outcome: if they held, the
   * client's settings (and the server connection's) include them, so the
   * next server connection gets them too; if a savepoint rollback or an
   * error after them left them uncertain, the client pins.
   */
  private resolveSettingChanges(server: ServerConnection, changes: readonly SettingChange[]): void {
    const outcome = server.tracker.watched;
    if (outcome === undefined || outcome === 'running') return;
    this.settingChanges = undefined;
    server.tracker.watched = undefined;
    if (outcome === 'ran') {
      this.host.metrics.carriedSettings.inc(changes.length);
      this.settings = changes.reduce(changeSettings, this.settings);
      // A RESET leaves the connection on its login value unless a later SET of the same Query set it again.
      const lastResets = changes.filter((c, i) => c.kind === 'reset' && !changes.slice(i + 1).some((later) => later.name === c.name));
      server.settings = lastResets.reduce((held, change) => serverSettingsAfter(held, change, server.loginSettings), this.settings);
      if (lastResets.length > 0) this.restateStartupValues(new Set(lastResets.map((c) => c.name)));
    } else if (outcome === 'uncertain') this.pin('set');
  }

  /** A RESET of the client's completed, but an error or a rollback before its transaction ended may have undone it: what its session holds is known only to its server connection. */
  onSettingsResetUncertain(): void {
    if (this.pinnedBy === undefined) this.pin('set');
  }

  /** A RESET ALL or DISCARD ALL of the client's ran: its session is back on its startup settings. */
  onSettingsReset(): void {
    // Its own RESET of one setting is resolved at the boundary.
    if (this.settingChanges?.some((c) => c.kind === 'reset') === true) return;
    this.settings = startupSettings(this.settings);
    this.restateStartupValues();
  }

  /** Marks the client's reported startup settings (`only` those, if given) to be told again after its transaction (transaction mode). */
  private restateStartupValues(only?: ReadonlySet<string>): void {
    const reported = this.host.pool.serverParameters;
    if (this.host.mode !== 'transaction' || reported === undefined) return;
    for (const name of reported.keys()) {
      const lower = name.toLowerCase();
      if (this.settings.values.has(lower) && (only === undefined || only.has(lower))) (this.restate ??= new Set()).add(name);
    }
  }

  /**
   * The ReadyForQuery that ends the client's transaction is next: a RESET,
   * RESET ALL or DISCARD ALL in it that holds is resolved now, so that the
   * client's startup values are reported before that ReadyForQuery, where a
   * direct backend reports them (a driver reads its record once its command
   * returns: asyncpg's get_settings(), libpq's PQparameterStatus).
   */
  beforeReady(server: ServerConnection): Buffer | undefined {
    if (this.host.mode !== 'transaction' || this.pendingTypes.length > 0) return undefined;
    if (this.settingChanges !== undefined) this.resolveSettingChanges(server, this.settingChanges);
    return this.restatedMessages();
  }

  /**
   * The ReadyForQuery that ends a listening client's transaction waits for a
   * round trip on the hub: PostgreSQL sends a session the notifications its
   * own transaction committed (a NOTIFY on a channel it listens on) before
   * that ReadyForQuery, and through the hub they arrive on another connection.
   * The backend that ran the transaction signalled the hub's before its
   * ReadyForQuery, so the hub's next ReadyForQuery comes after them.
   */
  holdReady(server: ServerConnection): boolean {
    if (this.advisoryCheckDue(server)) {
      this.checkAdvisoryLocks(server);
      return true;
    }
    const hub = this.host.notifications;
    if (hub === undefined || this.pendingTypes.length > 0 || this.terminateAtBoundary || this.drainStage !== 'none' || !hub.listens(this)) return false;
    this.readyHeld += 1;
    void hub.sync().then(() => {
      this.readyHeld -= 1;
      if (this.phase === 'closed') return;
      this.flushNotifications();
      this.socket.write(READY_IDLE);
      if (this.readyHeld > 0) return;
      // A Terminate or a drain that came meanwhile waited for this answer.
      if (this.terminateAtBoundary && this.pendingTypes.length === 0 && this.pendingChunks.length === 0 && this.nothingOwed()) this.terminate();
      else if (this.drainStage !== 'none') this.drainActivity += 1;
    });
    return true;
  }

  /** Between transactions: the client's startup values it was told otherwise, as a direct session would report them (a pinned client keeps the server's). */
  private sendRestated(): void {
    const messages = this.restatedMessages();
    if (messages !== undefined) this.socket.write(messages);
  }

  private restatedMessages(): Buffer | undefined {
    const names = this.restate;
    this.restate = undefined;
    if (names === undefined || this.pinnedBy !== undefined || this.phase !== 'ready') return undefined;
    const messages: Buffer[] = [];
    for (const name of names) {
      const lower = name.toLowerCase();
      messages.push(parameterStatus(name, this.shownAtLogin?.get(lower) ?? this.settings.values.get(lower) ?? ''));
    }
    return messages.length === 0 ? undefined : Buffer.concat(messages);
  }

  /**
   * A statement that calls currval() or lastval() reads the session's last
   * nextval(), which stays on the backend that ran it. Let through, it pins
   * the client (its later reads then find its later nextval()s), when its
   * answer is the session's own: a statement before it on the same server
   * connection may have called nextval(); or every transaction of the
   * client ran on that one connection and no other client had it since
   * (the client then gets that connection back if it holds none); or the
   * client ran nothing yet. Otherwise the server connection holds another
   * client's values or none: the client is told why instead of getting
   * them. False if it was refused (the session is closed).
   */
  private checkSequenceRead(buffer: Buffer, textStart: number, end: number, scan: number): boolean {
    const read = sequenceRead(buffer, textStart, end, scan);
    if (read === undefined) return true;
    const home = this.sequenceServer;
    const own = home !== undefined && home !== null && home.sequenceClient === this && home.sequenceTurn === this.sequenceTurn;
    if (read === 'reads-after-write' || this.ranSinceLent || home === undefined || (own && this.server === home)) {
      this.pin('sequence');
      return true;
    }
    if (own && this.server === undefined && !this.waiting && this.host.pool.isIdle(home)) {
      this.preferredServer = home;
      this.pin('sequence');
      return true;
    }
    this.refuseSequenceRead();
    return false;
  }

  private refuseSequenceRead(): void {
    this.host.metrics.error('sequence-read-refused');
    this.fail({
      severity: 'FATAL', code: '0A000',
      message: 'currval() and lastval() through the poolkeeper sidecar in transaction mode: this session\'s sequence values stay on the server connection of the transaction that called nextval(), and the one this statement would run on holds another client\'s or none',
      hint: 'read the value in the transaction that called nextval() (INSERT ... RETURNING, or the same BEGIN ... COMMIT block), or use pool.mode: session',
    });
  }

  private pin(reason: PinReason): void {
    // Pinned once, for its first reason: counted and logged once.
    if (this.pinnedBy !== undefined) return;
    this.pinnedBy = reason;
    this.advisoryPin = 'none';
    this.host.pinned(reason);
    this.host.logger.info({ reason }, 'client pinned to its server connection until it disconnects (session state in transaction mode)');
  }

  /**
   * Pinned by a session advisory lock, and its statements since (the one that
   * pinned it first) leave nothing else of the session's on the connection:
   * after a transaction that took or released a lock, the backend is asked
   * whether it still holds any (see checkAdvisoryLocks), and if not, the
   * client is unpinned, as a direct session holding no lock has nothing on its
   * connection (ActiveRecord's get_advisory_lock and the with_advisory_lock
   * gem take and release one per request on connections kept for the
   * process's life). Anything else keeps it pinned until it leaves: another
   * session command, set_config, INTO TEMP, a DO block that locks, and a
   * named statement that locks (bound again later, it would lock wherever it
   * runs).
   */
  private followAdvisoryPin(type: number, buffer: Buffer, bodyStart: number, end: number): void {
    const textStart = sqlTextStart(type, buffer, bodyStart, end);
    if (textStart === undefined || !leavesOnlyAdvisoryLocks(buffer, textStart, end)) {
      this.advisoryPin = 'kept';
      return;
    }
    const locks = mentionsAdvisoryLock(buffer, textStart, end);
    if (type === MessageType.parse) {
      if (buffer[bodyStart] !== 0 && locks) {
        this.advisoryPin = 'kept';
        return;
      }
      this.unnamedAdvisory = locks;
    }
    if (locks) this.advisoryPin = 'due';
  }

  /** The ReadyForQuery 'I' that ends a transaction is next: whether to ask the backend now if the client's advisory locks are all released. */
  private advisoryCheckDue(server: ServerConnection): boolean {
    return this.advisoryPin === 'due' && !this.checkingLocks && this.pinnedBy === 'advisory-lock' && this.host.mode === 'transaction' && !this.unnamedAdvisory && this.server === server &&
      this.pendingTypes.length === 0 && this.drainStage === 'none' && !this.terminateAtBoundary && this.readyHeld === 0 && !this.localCommand && !this.holding &&
      this.settingChanges === undefined && this.restate === undefined && server.cancelsInFlight === 0 && this.host.notifications?.listens(this) !== true;
  }

  /**
   * Asks the backend whether the client still holds advisory locks (see
   * followAdvisoryPin), holding back the ReadyForQuery that ended its
   * transaction meanwhile, so that the client sends nothing new until then;
   * a pipelining client that did is asked again at its next boundary.
   */
  private checkAdvisoryLocks(server: ServerConnection): void {
    this.advisoryPin = 'none';
    this.checkingLocks = true;
    this.readyHeld += 1;
    // Messages that came meanwhile were read as a pinned client's (see followAdvisoryPin): they must run where it is pinned.
    const stillFree = (): boolean => this.pendingTypes.length === 0 && this.phase !== 'closed' && this.server === server;
    this.host.pool.checkAdvisoryLocks(server, this, stillFree, (outcome) => {
      this.checkingLocks = false;
      this.readyHeld -= 1;
      if (outcome === 'lost') {
        if (this.phase !== 'closed' && this.server === server) this.onServerLost(server, 'closed while asked for its advisory locks', false);
        return;
      }
      if (this.phase === 'closed' || this.server !== server) {
        // The client left meanwhile: a connection still lent to it goes back, reset (pg_advisory_unlock_all among the rest).
        if (outcome !== 'released') this.host.pool.release(server, true, true);
        return;
      }
      if (outcome === 'released') {
        this.server = undefined;
        this.ranSinceLent = false;
        this.ownReadBufferWhileServed();
        const reason = this.pinnedBy!;
        this.pinnedBy = undefined;
        this.host.unpinned(reason);
        this.host.logger.info({ reason }, 'client unpinned: its backend holds no advisory lock and nothing else of its session');
      } else if (outcome === 'busy' && this.advisoryPin === 'none') this.advisoryPin = 'due';
      this.socket.write(READY_IDLE);
      // A Terminate that came meanwhile waited for this answer.
      if (this.terminateAtBoundary && this.pendingTypes.length === 0 && this.pendingChunks.length === 0 && this.nothingOwed()) {
        this.terminate();
        return;
      }
      this.forward();
      if (this.pausedWaiting && this.pendingTypes.length === 0) this.resumeWaiting();
    });
  }

  /**
   * An UNLISTEN that goes to the server connection: the channels this client
   * listens on through the hub end there too, once it has run and its
   * transaction did not roll back (PostgreSQL applies it at commit).
   */
  private unlistenOnHub(channel: string): void {
    if (this.host.notifications?.listens(this) === true) (this.unlistensSent ??= []).push(channel);
  }

  /** UNLISTENs sent to the server connection for channels this client listens on through the hub, not yet run. */
  get awaitingUnlistens(): boolean {
    return this.unlistensSent !== undefined && this.unlistensSent.length > 0;
  }

  /** The oldest UNLISTEN sent ran. */
  onUnlistenCompleted(): void {
    const channel = this.unlistensSent?.shift();
    if (channel !== undefined) (this.unlistensRun ??= []).push(channel);
  }

  /** The transaction of the UNLISTENs that ran ended: applied on the hub unless it rolled back. */
  onUnlistensEnded(held: boolean): void {
    const run = this.unlistensRun;
    this.unlistensRun = undefined;
    // Sent and never run (skipped after an error) with nothing more on the way: they did nothing.
    if (this.pendingTypes.length === 0 && (this.server === undefined || this.server.tracker.atBoundary)) this.unlistensSent = undefined;
    const hub = this.host.notifications;
    if (!held || run === undefined || hub === undefined) return;
    for (const channel of run) hub.unlistenLater(this, channel);
  }

  /** LISTEN/UNLISTEN answered by the sidecar once the hub listens; messages after it wait their turn. */
  private runListenCommand(hub: NotificationHub, kind: 'listen' | 'unlisten', channel: string): void {
    this.localCommand = true;
    const finish = (error: string | undefined): void => {
      this.localCommand = false;
      if (this.phase === 'closed') return;
      const reply = error === undefined ? commandComplete(kind.toUpperCase()) : errorResponse({ severity: 'ERROR', code: '55000', message: `LISTEN through the poolkeeper sidecar failed: ${error}` });
      // Notifications that came meanwhile go first, as a backend sends them before its reply.
      this.flushNotifications();
      this.socket.write(Buffer.concat([reply, readyForQuery('I')]));
      this.forward();
      if (this.pausedWaiting && this.server !== undefined) this.resumeWaiting();
    };
    if (kind === 'unlisten') {
      // What was notified before the UNLISTEN still reaches the client, as direct: the hub sends it first.
      void hub.sync().then(() => {
        hub.unlisten(this, channel);
        finish(undefined);
      });
    } else void hub.listen(this, channel).then(finish);
  }

  /** A notification for a channel this client listens on through the hub: sent between its transactions, as PostgreSQL does. */
  deliver(message: Buffer): void {
    if (this.phase !== 'ready') return;
    if (this.betweenTransactions()) this.socket.write(message);
    else this.pendingNotifications.push(message);
  }

  /** No statement of the client's is under way: a notification may go to it now (a pinned client keeps its idle server connection). */
  private betweenTransactions(): boolean {
    return !this.localCommand && (this.server === undefined || this.server.tracker.atBoundary);
  }

  /** A transaction of a listening client starts once the hub sent what was notified before it (see notifications.ts). */
  private syncNotifications(hub: NotificationHub): void {
    this.hubSync = 'waiting';
    void hub.sync().then(() => {
      if (this.hubSync !== 'waiting' || this.phase === 'closed') return;
      this.hubSync = 'done';
      this.forward();
      // Reading paused while the messages waited (the server connection may have come first): they went now.
      if (this.pausedWaiting && this.server !== undefined) this.resumeWaiting();
    });
  }

  private flushNotifications(): void {
    if (this.pendingNotifications.length === 0 || !this.betweenTransactions() || this.phase !== 'ready') return;
    this.socket.write(Buffer.concat(this.pendingNotifications));
    emptyList(this.pendingNotifications);
  }

  /**
   * After writing to the server: bytes still queued there may point into the
   * reused read buffer, and a client sending faster than the server takes
   * must not make us buffer without bound, so read no more until they drain.
   */
  private holdWhileQueued(out: Duplex): void {
    if (out.writableLength > 0 && this.pausedFor === undefined && !out.destroyed) {
      this.pausedFor = out;
      this.socket.pause();
      // 'drain' fires only past the high-water mark; an empty write's callback runs once all before it is flushed.
      out.write(NOTHING, this.resumeReading);
    }
  }

  /** The shape a held Bind waited for is known (or cannot be): route the rest. */
  private onHoldSettled(server: ServerConnection): void {
    if (!this.holding) return;
    this.holding = false;
    if (this.phase === 'closed' || this.server !== server) return;
    this.forward();
    if (this.pausedWaiting && this.pendingTypes.length === 0) this.resumeWaiting();
  }

  /** Sends queued messages to the server connection, acquiring one first if needed. */
  private forward(): void {
    if (this.localCommand || this.hubSync === 'waiting' || this.holding || this.checkingLocks) return;
    // Later pieces of a streamed message add bytes without a message type.
    if ((this.pendingTypes.length === 0 && this.pendingChunks.length === 0) || this.phase !== 'ready') return;
    if (this.drainStage !== 'none') {
      this.drainActivity += 1;
      if (this.server !== undefined && this.server.tracker.status !== 'I') this.drainInBlock = true;
      // Closing, these messages begin an exchange (see drain): refused, but for one right after a transaction block.
      if (this.drainStage === 'closing' && !this.drainExchangeOpen && (this.server === undefined ? !this.waiting : this.server.tracker.atBoundary)) {
        if (this.drainGraceUsed || !this.drainBlockEnded) {
          this.closeForDrain();
          return;
        }
        this.drainGraceUsed = true;
        this.drainExchangeOpen = true;
      }
    }
    if (this.hubSync === 'none' && (this.server === undefined || this.server.tracker.atBoundary) && this.host.notifications?.listens(this) === true) {
      this.syncNotifications(this.host.notifications);
      // The server connection is asked for meanwhile; the messages go once both are there.
      if (this.server === undefined && !this.waiting) {
        this.waiting = true;
        this.host.pool.acquire(this);
      }
      return;
    }
    const server = this.server;
    if (server === undefined) {
      // A session's backend (and the pid it was given at login) is its own until it ends: never another one.
      if (this.host.mode === 'session') {
        this.host.metrics.error('server-lost');
        this.fail({ severity: 'FATAL', code: '08006', message: 'server connection lost: the session\'s backend is gone' });
        return;
      }
      if (!this.waiting) {
        this.waiting = true;
        this.host.pool.acquire(this);
      }
      return;
    }
    if (this.statements !== undefined) {
      this.forwardRewritten(server, this.statements);
      return;
    }
    const tracker = server.tracker;
    for (const type of this.pendingTypes) tracker.clientMessage(type);
    emptyList(this.pendingTypes);
    const chunks = this.pendingChunks;
    writePieces(server.stream, chunks);
    emptyList(chunks);
    this.holdWhileQueued(server.stream);
    this.cancelIfAsked();
  }

  /** Sends the CancelRequest that came while the statement waited in the sidecar, now that it runs. */
  private cancelIfAsked(): void {
    if (!this.cancelOnForward) return;
    this.cancelOnForward = false;
    this.host.cancelForwarded(this);
  }

  /**
   * A CancelRequest found no statement running. One still waiting for a
   * server connection (transaction mode) whose held messages are one batch
   * is answered now as PostgreSQL answers a statement it cancels (see
   * cancelledBatchReply): its messages are dropped and the client leaves the
   * pool's queue, ready for its next statement ('answered'). Otherwise a
   * statement waiting in the sidecar (several batches pipelined, a batch
   * without its Sync yet, one waiting for the listening connection) is
   * cancelled as soon as it is sent, as it would have been running direct
   * ('deferred'). 'nothing': nothing waits.
   */
  cancelQueued(): 'answered' | 'deferred' | 'nothing' {
    if (this.phase !== 'ready' || this.pendingTypes.length === 0) return 'nothing';
    const reply = this.queuedCancelReply();
    if (reply === undefined) {
      this.cancelOnForward = true;
      return 'deferred';
    }
    this.host.pool.cancelWait(this);
    this.waiting = false;
    this.cancelOnForward = false;
    emptyList(this.pendingTypes);
    emptyList(this.pendingChunks);
    // What reading the dropped messages set up for their run: they never ran.
    this.settingChanges = undefined;
    this.settingWatchAfter = 0;
    this.boundSetting = undefined;
    this.unnamedSettingBound = false;
    this.ranSinceLent = false;
    // The next statement waits for the hub again (the hub's answer, if still to come, is ignored).
    this.hubSync = 'none';
    this.socket.write(reply);
    if (this.pausedWaiting) this.resumeWaiting();
    return 'answered';
  }

  /** The answer to a cancel of the held messages, if they wait for a server connection only and PostgreSQL's answer to them is known. */
  private queuedCancelReply(): Buffer | undefined {
    // A statement still being read (a streamed message), a Terminate or a drain behind it, a ReadyForQuery
    // of the previous transaction still held for the hub, or one answered by the sidecar itself come first.
    if (this.host.mode !== 'transaction' || this.server !== undefined || !this.waiting || this.reader.streaming) return undefined;
    if (this.terminateAtBoundary || this.drainStage !== 'none' || this.readyHeld > 0 || this.localCommand || this.holding) return undefined;
    return cancelledBatchReply(this.pendingTypes);
  }

  /** forward() for a session that names statements: each queued message goes through routeMessage. */
  private forwardRewritten(server: ServerConnection, statements: ClientStatements): void {
    const tracker = server.tracker;
    const editor = server.editor;
    if (!editor.active) {
      // Replies still owed to Parses and Closes already sent since the last Sync (a pipeline of unnamed
      // statements, as psycopg 3 sends before it prepares one; pgjdbc's Close of a portal and the SAVEPOINT
      // Query of autosave) are expected ahead of ours, each in the batch it belongs to.
      editor.activate(tracker.batchesOwed, tracker.unsyncedReplyTypes(), !tracker.extendedOpen, tracker.skipping);
      if (this.unkeptUnnamedCurrent) editor.unnamedCurrent = true;
      this.unkeptUnnamedCurrent = false;
    }
    const out: Buffer[] = [];
    // Messages routed; where routing stopped to hold a message (chunk index and offset), if it did.
    let routed = 0;
    let heldChunk = -1;
    let heldOffset = 0;
    try {
      const chunks = this.pendingChunks;
      for (let i = 0; i < chunks.length && heldChunk < 0; i++) {
        const chunk = chunks[i]!;
        let offset = 0;
        while (offset < chunk.length) {
          const end = offset + 1 + chunk.readInt32BE(offset + 1);
          if (routeMessage(statements, editor, chunk[offset]!, chunk, offset, offset + 5, end, out)) {
            heldChunk = i;
            heldOffset = offset;
            break;
          }
          routed += 1;
          offset = end;
        }
      }
    } catch (error) {
      this.onProtocolError(error);
      return;
    }
    // The tracker counts what the server answers: the messages sent, the sidecar's own Parse, Describe, Close and Flush included.
    for (const piece of out) {
      for (let offset = 0; offset < piece.length; offset += 1 + piece.readInt32BE(offset + 1)) tracker.clientMessage(piece[offset]!);
    }
    if (heldChunk < 0) {
      emptyList(this.pendingTypes);
      emptyList(this.pendingChunks);
    } else {
      // The rest waits for the shape of the statement just prepared (see routeMessage): kept in buffers of its own.
      this.pendingTypes.splice(0, routed);
      const rest = this.pendingChunks.slice(heldChunk).map((c, i) => Buffer.from(i === 0 ? c.subarray(heldOffset) : c));
      emptyList(this.pendingChunks);
      this.pendingChunks.push(...rest);
      this.holding = true;
      editor.hold(() => queueMicrotask(() => this.onHoldSettled(server)));
    }
    writePieces(server.stream, out);
    this.holdWhileQueued(server.stream);
    this.cancelIfAsked();
  }

  private onStartupPacket(body: Buffer): void {
    const packet = parseStartupPacket(body);
    switch (packet.kind) {
      case 'ssl-request':
        if (this.tls !== undefined && !this.encrypted) {
          // As PostgreSQL (CVE-2021-23214): bytes sent behind the SSLRequest would be read as if they came over TLS.
          if (this.reader.remaining().length > 0 || this.reader.buffered > 0) {
            this.fail({ severity: 'FATAL', code: '08P01', message: 'received unencrypted data after SSL request' });
            return;
          }
          this.startTls(this.tls);
          this.reader.expectUntyped();
          return;
        }
        // Loopback: encryption would protect nothing the pod boundary does not (see ClientTls for apps that insist).
        this.socket.write('N');
        this.reader.expectUntyped();
        return;
      case 'gssenc-request':
        this.socket.write('N');
        this.reader.expectUntyped();
        return;
      case 'cancel':
        this.phase = 'closed';
        // As PostgreSQL does, close only once the cancel was delivered: libpq takes the close to mean so.
        this.host.cancel(packet.processId, packet.secretKey, () => this.socket.end());
        return;
      case 'startup':
        break;
    }
    if (this.phase !== 'startup') throw new ProtocolError('bad-startup', 'second startup packet');
    if (this.loginTimer !== undefined) clearTimeout(this.loginTimer);
    const expected = this.host.expectedLogin();
    const user = packet.parameters.user ?? '';
    const database = packet.parameters.database ?? user;
    if (user !== expected.user && !expected.formerUsers.has(user)) {
      this.host.metrics.error('client-auth');
      this.fail({ severity: 'FATAL', code: '28000', message: `role "${user}" is not served by this sidecar`, hint: `connect as "${expected.user}"` });
      return;
    }
    if (database !== expected.database) {
      this.host.metrics.error('client-auth');
      this.fail({ severity: 'FATAL', code: '3D000', message: `database "${database}" is not served by this sidecar`, hint: `connect to "${expected.database}"` });
      return;
    }
    if (this.host.isDraining()) {
      this.fail({ severity: 'FATAL', code: '57P03', message: 'the poolkeeper sidecar is draining and accepts no new clients' });
      return;
    }
    try {
      this.settings = clientSettingsFromStartup(packet.parameters);
    } catch (error) {
      this.host.metrics.error('client-settings');
      this.fail({ severity: 'FATAL', code: '0A000', message: (error as Error).message });
      return;
    }
    this.checkSettings = this.settings.key !== '' && this.host.shownSettings(this.settings.key) === undefined;
    if (packet.minorVersion > 0 || packet.protocolOptions.length > 0) this.socket.write(negotiateProtocolVersion(0, packet.protocolOptions));
    this.phase = 'login';
    this.host.admit(this);
    // Without server parameters yet (first client), in session mode, or with settings not checked yet, log in behind a real server connection.
    if (this.host.pool.serverParameters === undefined || this.host.mode === 'session' || this.checkSettings) {
      this.waiting = true;
      this.host.pool.acquire(this);
    } else this.finishLogin();
  }

  /**
   * The first bytes of a direct TLS connection: its ClientHello, gathered
   * until whole (the login timeout bounds the wait). PostgreSQL 17 accepts it
   * only when the client offers ALPN "postgresql"; so does the sidecar, and
   * refuses the others with the TLS alert OpenSSL sends a client whose ALPN
   * list lacks it, before any certificate. Without client TLS the connection
   * is closed without a word, as PostgreSQL without ssl closes it.
   */
  private onDirectTls(bytes: Buffer): void {
    const tls = this.tls;
    if (tls === undefined) {
      this.host.metrics.error('client-protocol');
      this.host.logger.info('closing a direct TLS connection (sslnegotiation=direct): this sidecar offers no TLS to apps (spec.sidecar.clientTLS)');
      this.closeQuietly();
      return;
    }
    // Copied: a lent read buffer is overwritten by the next read.
    const hello = this.directHello === undefined ? Buffer.from(bytes) : Buffer.concat([this.directHello, bytes]);
    const reading = readClientHello(hello);
    if (reading.kind === 'incomplete') {
      this.directHello = hello;
      return;
    }
    this.directHello = undefined;
    if (reading.kind === 'client-hello' && !(reading.alpn ?? []).includes(POSTGRESQL_ALPN)) {
      this.host.metrics.error('client-protocol');
      this.host.logger.info({ alpn: reading.alpn ?? null }, 'refusing a direct TLS connection without ALPN "postgresql", as PostgreSQL 17 does');
      this.closeQuietly(noApplicationProtocolAlert());
      return;
    }
    // One this reader cannot make out goes to the TLS layer, which refuses what is not TLS; the ALPN check then follows the handshake.
    if (reading.kind === 'unreadable') this.host.logger.debug({ reason: reading.reason }, 'direct TLS: ClientHello left to the TLS layer');
    this.startTls(tls, hello);
  }

  /**
   * Moves the session onto a TLS socket over the accepted one. After an
   * SSLRequest (`direct` undefined) it answers "S" first: the client sends
   * nothing more until it reads the answer, so nothing after the SSLRequest
   * has been read from the plain socket yet. A direct TLS connection's
   * `direct` bytes, read already, go to the TLS layer first.
   */
  private startTls(tls: ClientTls, direct?: Buffer): void {
    const plain = this.socket;
    if (direct === undefined) plain.write('S');
    if (isDirectReadable(plain)) plain.setDirectReader(undefined);
    else plain.off('data', this.onStreamData);
    plain.off('error', this.onSocketError);
    plain.off('close', this.onSocketClose);
    const secure = acceptClientTls(plain, tls, direct);
    if (direct !== undefined) {
      // As PostgreSQL 17 after a direct handshake: ALPN "postgresql" or nothing.
      secure.once('secure', () => {
        if (secure.alpnProtocol === POSTGRESQL_ALPN) return;
        this.host.metrics.error('client-protocol');
        this.host.logger.info('closing a direct TLS connection that did not negotiate ALPN "postgresql"');
        secure.destroy();
      });
    }
    this.encrypted = true;
    this.socket = secure;
    plain.on('error', this.onSocketError);
    plain.once('close', () => secure.destroy());
    secure.on('data', this.onStreamData);
    // A failed handshake destroys the TLS socket, and its close ends the session.
    secure.on('error', (err: Error) => this.host.logger.debug({ err: err.message }, 'client TLS error'));
    secure.on('close', this.onSocketClose);
    this.host.metrics.clientTls();
  }

  private finishLogin(): void {
    const socket = this.socket;
    socket.cork();
    socket.write(authenticationOk());
    // The server's values, with the client's own settings as the server showed them; in session
    // mode those of the client's own backend, which logged in with its settings.
    const shown = this.settings.key === '' ? undefined : this.host.shownSettings(this.settings.key);
    this.shownAtLogin = shown;
    const parameters = this.host.mode === 'session' && this.server !== undefined ? this.server.loginParameters : this.host.pool.serverParameters;
    for (const [name, value] of parameters ?? new Map<string, string>()) {
      const own = shown?.get(name.toLowerCase());
      socket.write(parameterStatus(name, own ?? value));
    }
    // Session mode: the client's own backend, fixed for its session; it learns that backend's pid.
    const key = this.host.register(this, this.host.mode === 'session' ? this.server : undefined);
    this.key = key;
    socket.write(backendKeyData(key[0], key[1]));
    socket.write(readyForQuery('I'));
    socket.uncork();
    this.phase = 'ready';
    this.forward();
  }

  // ---- pool callbacks -----------------------------------------------------

  /** The pool lent us a server connection (with `shown`, the checked settings' values). */
  onAcquired(server: ServerConnection, shown?: readonly (string | undefined)[]): void {
    this.waiting = false;
    if (this.phase === 'closed') {
      this.host.pool.release(server, true);
      return;
    }
    this.server = server;
    this.ownReadBufferWhileServed();
    if (this.host.mode === 'transaction' && this.phase === 'ready' && !this.followSequences(server)) return;
    if (this.settingChanges !== undefined) server.tracker.watch(this.settingWatchAfter);
    if (this.checkSettings && shown !== undefined) {
      const values = new Map<string, string>();
      let i = 0;
      for (const name of this.settings.values.keys()) values.set(name, shown[i++] ?? '');
      this.host.rememberSettings(this.settings.key, values);
      this.checkSettings = false;
    }
    if (this.phase === 'login') {
      if (this.host.mode === 'transaction') this.releaseServer(true);
      this.finishLogin();
      return;
    }
    this.forward();
    if (this.pausedWaiting) this.resumeWaiting();
  }

  /** Keeps track of where the session's sequence values are (see checkSequenceRead); false if the client was refused. */
  private followSequences(server: ServerConnection): boolean {
    const preferred = this.preferredServer;
    this.preferredServer = undefined;
    if (server.sequenceClient !== this) {
      server.sequenceClient = this;
      server.sequenceTurn += 1;
    }
    if (this.sequenceServer === undefined) {
      this.sequenceServer = server;
      this.sequenceTurn = server.sequenceTurn;
    } else if (this.sequenceServer !== server) this.sequenceServer = null;
    if (preferred === undefined || preferred === server) return true;
    // The connection it was promised failed its check before use: another one holds none of its values.
    this.releaseServer(true);
    this.refuseSequenceRead();
    return false;
  }

  private resumeWaiting(): void {
    this.pausedWaiting = false;
    if (this.pausedFor === undefined && !this.socket.destroyed) this.socket.resume();
  }

  /** No server connection within poolTimeout, or draining. */
  onAcquireFailed(failure: AcquireFailure): void {
    this.waiting = false;
    const { detail, hint } = failure;
    this.fail({ severity: 'FATAL', code: failure.sqlState, message: failure.message, ...(detail !== undefined ? { detail } : {}), ...(hint !== undefined ? { hint } : {}) });
  }

  /**
   * Every ReadyForQuery owed has come, but the server connection is not at a
   * boundary (inside a transaction block, or an extended batch without Sync):
   * a Terminate waiting for its answers closes now, as PostgreSQL would; the
   * dirty server connection is discarded.
   */
  onServerAnswered(_server: ServerConnection): void {
    if (this.terminateAtBoundary && this.pendingTypes.length === 0) this.terminate();
  }

  /** ReadyForQuery 'I' with nothing outstanding. */
  onServerBoundary(server: ServerConnection): void {
    if (this.pendingTypes.length > 0) return;
    if (this.settingChanges !== undefined) this.resolveSettingChanges(server, this.settingChanges);
    if (this.terminateAtBoundary) {
      this.releaseServer(true);
      this.closeQuietly();
      return;
    }
    // Draining too: a session keeps its own until it is closed (see drain).
    if (this.host.mode === 'transaction' && this.pinnedBy === undefined && !this.holdsUnkeptUnnamed) this.releaseServer(true);
    if (this.restate !== undefined) this.sendRestated();
    // The next transaction waits for the hub again; a pinned client gets what came meanwhile now.
    if (this.hubSync === 'done') this.hubSync = 'none';
    this.flushNotifications();
    if (this.drainStage !== 'none') {
      this.drainActivity += 1;
      this.drainExchangeOpen = false;
      this.drainBlockEnded = this.drainInBlock;
      this.drainInBlock = false;
    }
  }

  /**
   * The server connection died under us. After a FATAL the server sent (the
   * client has read why), the client's connection just closes, as a direct
   * one would; otherwise the client is told.
   */
  onServerLost(_server: ServerConnection, reason: string, afterFatal: boolean): void {
    this.server = undefined;
    this.settingChanges = undefined;
    this.ownReadBufferWhileServed();
    this.host.metrics.error('server-lost');
    if (afterFatal) {
      if (this.waiting) this.host.pool.cancelWait(this);
      this.waiting = false;
      this.closeQuietly();
      return;
    }
    this.fail({ severity: 'FATAL', code: '08006', message: `server connection lost: ${reason}` });
  }

  /**
   * A client reads into a buffer of its own only while it holds a server
   * connection (its reads then go out without a copy); otherwise into the
   * shared one, so idle and waiting clients cost no read buffer.
   */
  private ownReadBufferWhileServed(): void {
    if (isDirectReadable(this.socket)) this.socket.setOwnReadBuffer(this.server !== undefined);
  }

  // ---- endings ------------------------------------------------------------

  private releaseServer(reusable: boolean): void {
    const server = this.server;
    // The next transaction waits for the hub again.
    if (this.hubSync === 'done') this.hubSync = 'none';
    if (server === undefined) return;
    this.server = undefined;
    this.ranSinceLent = false;
    this.ownReadBufferWhileServed();
    if (this.settingChanges !== undefined) {
      this.resolveSettingChanges(server, this.settingChanges);
      // Still running (the client left mid-SET): what the connection's settings are is unknown.
      if (this.settingChanges !== undefined) {
        this.settingChanges = undefined;
        reusable = false;
      }
    }
    this.host.pool.release(server, reusable && server.tracker.atBoundary, this.host.mode === 'session' || this.pinnedBy !== undefined);
  }

  /**
   * What a CancelRequest for this client should reach: the server connection
   * running its statement now, and a test that the same statement still runs.
   * An extended batch not yet closed by a forwarded Sync runs too (Execute then
   * Flush, or asyncpg's executemany, whose Sync may still wait in the socket).
   */
  cancelTarget(): { server: ServerConnection; stillRunning: () => boolean } | undefined {
    const server = this.server;
    if (server === undefined || (server.tracker.pendingReady === 0 && server.tracker.copy === 'none' && !server.tracker.extendedOpen)) return undefined;
    const readyCount = server.readyCount;
    return { server, stillRunning: () => this.server === server && server.state === 'active' && server.readyCount === readyCount };
  }

  /**
   * Nothing the client sent still owes it an answer that ends in ReadyForQuery:
   * a Terminate now ends the session (even inside a transaction block or after
   * a Parse/Describe/Flush without Sync, which never reach a boundary by
   * themselves). A COPY FROM STDIN waits for data that will not come.
   */
  private nothingOwed(): boolean {
    const server = this.server;
    if (this.readyHeld > 0) return false;
    return server === undefined || server.tracker.pendingReady === 0 || server.tracker.copy === 'in';
  }

  private terminate(): void {
    emptyList(this.pendingChunks);
    emptyList(this.pendingTypes);
    this.releaseServer(true);
    this.closeQuietly();
  }

  /**
   * The session names its first prepared statement: from now on its messages
   * are rewritten, which needs them whole, so nothing more is streamed, and
   * what is queued (streamed pieces of earlier, complete messages among it) is
   * joined into whole messages.
   */
  private startNamingStatements(run: Buffer | undefined): void {
    this.statements = new Map();
    // The unnamed statement parsed before, as the client knows it: prepared again wherever it is used.
    if (this.unnamed === 'kept') this.statements.set('', unnamedStatement(this.unnamedParse!.subarray(0, this.unnamedLength)));
    // One too large to keep is not in the map: it stays current on the connection the client is pinned to (see the caller).
    this.setUnnamed('none');
    this.unnamedParse = undefined;
    this.reader.stopStreaming();
    if (run !== undefined) this.pendingChunks.push(run);
    if (this.pendingChunks.length > 1) {
      const joined = Buffer.concat(this.pendingChunks);
      emptyList(this.pendingChunks);
      this.pendingChunks.push(joined);
    }
  }

  private refuseStatementTracking(message: string, hint: string): void {
    this.host.metrics.error('prepared-statement-refused');
    this.releaseServer(false);
    this.fail({ severity: 'FATAL', code: '0A000', message, hint });
  }

  private onProtocolError(error: unknown): void {
    const message = error instanceof Error ? error.message : String(error);
    if (!(error instanceof ProtocolError)) this.host.logger.error({ err: message }, 'unexpected error handling client data');
    this.host.metrics.error('client-protocol');
    this.host.logger.info({ err: message }, 'closing client after a protocol violation');
    this.releaseServer(false);
    this.fail({ severity: 'FATAL', code: '08P01', message: `protocol violation: ${message}` });
  }

  /** Sends a FATAL ErrorResponse and closes this client only. */
  private fail(fields: NoticeFields): void {
    if (this.phase === 'closed') return;
    if (this.waiting) this.host.pool.cancelWait(this);
    this.waiting = false;
    this.releaseServer(false);
    this.phase = 'closed';
    emptyList(this.pendingChunks);
    emptyList(this.pendingTypes);
    if (!this.socket.destroyed) this.socket.end(errorResponse(fields));
    setTimeout(() => this.socket.destroy(), 2000).unref();
    this.host.unregister(this);
  }

  /** Closes this client only; `last`: bytes written before (no ErrorResponse). */
  private closeQuietly(last?: Buffer): void {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    // As a backend that exits: once what was written is flushed the connection is gone, so a
    // client still sending (COPY data after its backend was terminated) gets an error instead of
    // a half-closed socket that reads and drops its data forever.
    const socket = this.socket;
    if (last === undefined) socket.end(() => socket.destroy());
    else socket.end(last, () => socket.destroy());
    this.host.unregister(this);
  }

  private onClose(): void {
    if (this.waiting) this.host.pool.cancelWait(this);
    this.waiting = false;
    // A client gone mid-transaction leaves a dirty server connection: release() closes it.
    this.releaseServer(true);
    this.phase = 'closed';
    this.host.unregister(this);
  }
}

/** Where the SQL text of a Query or Parse body starts (after a Parse's statement name); undefined for a malformed Parse. */
function sqlTextStart(type: number, buffer: Buffer, bodyStart: number, end: number): number | undefined {
  if (type !== MessageType.parse) return bodyStart;
  const nameEnd = buffer.indexOf(0, bodyStart);
  return nameEnd < 0 || nameEnd >= end ? undefined : nameEnd + 1;
}

/**
 * Empties `list` in place. Assigning `length = 0` is a call into V8's runtime
 * from optimized code (about 50 ns); popping the one or two elements the
 * queues usually hold is not.
 */
function emptyList(list: unknown[]): void {
  while (list.length > 0) list.pop();
}
