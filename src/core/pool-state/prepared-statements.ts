/**
 * Protocol-level named prepared statements in transaction mode.
 *
 * A client's statement lives in its session, not on a server connection: each
 * session maps its statement names to a definition (query text and parameter
 * type OIDs, the bytes of its Parse after the name). On the wire the name is
 * rewritten to `pk_<sha256 of the definition>`, so identical statements from
 * different clients share one server-side statement per server connection.
 * Each server connection remembers which of those names it has prepared
 * (a bounded LRU; an evicted one is closed on the server).
 *
 * Rewriting, per frontend message of a session that uses named statements:
 * - Parse q: remember q; if the server connection already has the statement,
 *   send instead a Close of a portal that does not exist and turn its
 *   CloseComplete into the client's ParseComplete. The server answers it in
 *   order and skips it after an error like any pipelined message, so the
 *   synthetic reply lands exactly where the real one would, with no model of
 *   every response type. Otherwise send Parse under the server name.
 * - Bind / Describe 'S' of q: rewrite the name; if this server connection lacks
 *   the statement (the client got another one in a later transaction), inject
 *   its Parse first and swallow that ParseComplete. If the injected Parse
 *   fails, the server skips to Sync: the client sees that error in place of
 *   the Bind's, and the pipeline semantics hold because the server applies them.
 * - Close 'S' q: forget q in the session; send a Close of a nonexistent portal,
 *   whose CloseComplete is the client's. The shared statement stays (others may
 *   use it); the LRU evicts it in time.
 * - Parse of a name the session already has: the server must answer 42P05; we
 *   make sure the connection holds the old statement and send its Parse again.
 *
 * The unnamed statement outlives a Sync too: PostgreSQL keeps it until the
 * next Parse of it, a Close of it or a simple Query, and pgx (describe_exec,
 * Prepare with an empty name) and libpq's PQprepare with an empty name Bind it
 * in a later batch, which may land on another server connection, holding
 * another client's unnamed statement. So a session keeps its own under the
 * name '' (the Parse as it sent it), and the editor knows whether its server
 * connection's unnamed statement is the client's; before a Bind or Describe of
 * it where it is not, the client's Parse is injected (reply swallowed), or,
 * when the client has none, a Close of it, so that the Bind fails as direct.
 *
 * A statement's result shape (its RowDescription, or NoData) is fixed when it
 * is parsed: direct, a Bind of it after a schema change that alters that shape
 * fails with 0A000 "cached plan must not change result type", and the client
 * prepares it again. A Parse the sidecar injects on another server connection
 * plans it against the schema as it is now, so each Parse the sidecar sends for
 * a named statement is followed by a Describe of it (replies swallowed) that
 * records its shape (see resultShape): the client's in the session, the
 * server connection's in its cache. A Bind of a statement whose shape there differs from the client's
 * is sent as a Bind of a statement that does not exist, and that error is
 * turned into PostgreSQL's 0A000, so the server skips to Sync as it would
 * direct; a Describe of it gets the ParameterDescription first, as direct (see
 * describeReshaped). Where the Parse is injected right before the Bind, the session holds
 * the Bind until the shape is known (one round trip, on that server
 * connection's first use of the statement).
 *
 * Responses are edited by matching ParseComplete/CloseComplete in order
 * against the Parses and Closes sent (`ResponseEditor`). The maps are updated
 * when a message is sent; an expectation not met by the ReadyForQuery of its
 * batch failed, or was skipped after an earlier error, and its update is
 * undone (a statement it would have created is forgotten, an eviction or a
 * client Close reverted). Sessions that never name a statement nor use the
 * unnamed one across batches take none of this path.
 */
import { createHash } from 'node:crypto';
import {
  MessageType, ProtocolError, buildClosePortal, buildCloseStatement, buildParse, classifySessionCommand, laterSessionCommands, parseBindMessage, scanStatementText, splitStatements, TEXT_SEVERAL_STATEMENTS,
  parseParseMessage, parseTargetMessage, renameBind, statementNameBytes, buildDescribeStatement, errorResponse,
} from '../protocol/index.ts';
import { serialize } from 'pg-protocol';

/** Default bound on the statements one server connection keeps prepared. */
export const DEFAULT_MAX_SERVER_STATEMENTS = 1000;

/** A portal name no client uses: closing it is a no-op that still answers CloseComplete. */
export const NONEXISTENT_PORTAL = 'pk_no_such_portal';

/** Prefix of server-side statement names. */
export const SERVER_STATEMENT_PREFIX = 'pk_';

/** A client's statement as the sidecar keeps it. */
export interface ClientStatement {
  /** Name on every server connection. */
  readonly serverName: string;
  /** `serverName` as a Bind carries it (UTF-8 and a NUL): every Bind of the statement is renamed to it. */
  readonly serverNameBytes: Buffer;
  /** Parse message under `serverName`, ready to inject. */
  readonly parse: Buffer;
  /** The server answered the client's Parse with ParseComplete (until then it may still fail). */
  confirmed: boolean;
  /** Run of messages between two Syncs (see ResponseEditor.syncRun) the client's Parse was sent in. */
  batch: number;
  /** Its result shape as parsed for the client (RowDescription body, empty for NoData), once the server described it. */
  shape?: Buffer | undefined;
}

/** A session's named statements, by the client's name. */
export type ClientStatements = Map<string, ClientStatement>;

/** Server-side name of a statement definition (query text, NUL, parameter types). */
export function serverStatementName(definition: Buffer): string {
  return SERVER_STATEMENT_PREFIX + createHash('sha256').update(definition).digest('hex').slice(0, 32);
}

/** Makes the session's record of a Parse's definition (copies what it keeps). */
export function clientStatement(definition: Buffer): ClientStatement {
  const serverName = serverStatementName(definition);
  return { serverName, serverNameBytes: statementNameBytes(serverName), parse: buildParse(serverName, definition), confirmed: false, batch: -1 };
}

/** The server-side statement names one server connection has prepared, least recently used first. */
export class ServerStatementCache {
  readonly capacity: number;
  private readonly names = new Map<string, true>();
  /** Result shapes of the statements held, where known (see ClientStatement.shape). */
  private readonly shapes = new Map<string, Buffer>();
  /** Statements whose shape is on its way (see awaitShape). */
  private readonly awaiting = new Set<string>();

  constructor(capacity: number = DEFAULT_MAX_SERVER_STATEMENTS) {
    if (!Number.isInteger(capacity) || capacity < 1) throw new Error(`invalid prepared statement capacity ${capacity}`);
    this.capacity = capacity;
  }

  /** Statements held. */
  get size(): number {
    return this.names.size;
  }

  has(name: string): boolean {
    return this.names.has(name);
  }

  /** Marks `name` as just used. */
  touch(name: string): void {
    if (this.names.delete(name)) this.names.set(name, true);
  }

  /** Adds `name`; returns the names evicted to stay within capacity, least recently used first. */
  add(name: string): string[] {
    this.names.delete(name);
    this.names.set(name, true);
    const evicted: string[] = [];
    // A new Parse: its shape comes with its Describe's answer, which replaces the one kept
    // (see delete). Until then the shape kept is the last one the server answered: a Parse
    // skipped after an error, or failed, changes nothing on the server, and a Close of the
    // name before it, skipped too, is undone by restore (which must find that shape).
    while (this.names.size > this.capacity) {
      const oldest = this.names.keys().next().value!;
      this.names.delete(oldest);
      evicted.push(oldest);
    }
    return evicted;
  }

  /** Puts back a name whose Close the server skipped (it may exceed capacity until the next add). */
  restore(name: string): void {
    this.names.set(name, true);
  }

  /** Forgets `name`; its shape is kept, for a restore when the Close or DEALLOCATE turns out skipped. */
  delete(name: string): void {
    this.names.delete(name);
    this.awaiting.delete(name);
  }

  /** The server forgot everything (DISCARD ALL); shapes are kept as by delete. */
  clear(): void {
    this.names.clear();
  }

  /** The result shape of statement `name` here, if known. */
  shape(name: string): Buffer | undefined {
    return this.names.has(name) ? this.shapes.get(name) : undefined;
  }

  /** Records the result shape statement `name` was parsed with here. */
  setShape(name: string, shape: Buffer): void {
    this.awaiting.delete(name);
    // Also while a Close, DEALLOCATE or DISCARD ALL sent after the Parse has the name
    // deleted: skipped after an error, it is restored, with this shape.
    this.shapes.set(name, shape);
  }

  /** A Parse of `name` is sent with no Describe after it: the shape kept (of an earlier statement of that name) is not its own. */
  forgetShape(name: string): void {
    this.shapes.delete(name);
  }

  /** A Parse of `name` and a Describe of it were just sent here: its shape is unknown until the Describe's answer. */
  awaitShape(name: string): void {
    // The shape it had stays until then: a Parse skipped after an error leaves the old statement.
    this.awaiting.add(name);
  }

  /** A Parse of `name` sent here awaits its Describe's answer (another statement's Bind must wait for it to compare shapes). */
  shapePending(name: string): boolean {
    return this.awaiting.has(name);
  }

  /** Nothing sent is unanswered: no shape is on its way any more. */
  settledShapes(): void {
    this.awaiting.clear();
    // Shapes outlive their names (see delete) only while few, and are dropped only now, when
    // no skipped Close, DEALLOCATE or DISCARD ALL can restore a name any more.
    if (this.shapes.size > 2 * this.capacity) for (const n of [...this.shapes.keys()]) if (!this.names.has(n)) this.shapes.delete(n);
  }

  /** Names, least recently used first (tests, metrics). */
  list(): string[] {
    return [...this.names.keys()];
  }
}

/** What to do with a ParseComplete or CloseComplete from the server. */
export type ReplyEdit = 'forward' | 'swallow' | 'parse-complete';


/**
 * A statement name no client uses: a Bind of it fails (26000, naming it), and
 * that error is turned into PostgreSQL's own for a statement whose result
 * shape changed (see routeMessage's Bind).
 */
export const RESHAPED_STATEMENT = 'pk_cached_plan_must_not_change_result_type';

/** PostgreSQL's error for a Bind of a statement whose result shape changed since its Parse (RevalidateCachedQuery in plancache.c; drivers re-prepare on that routine). */
export const RESHAPED_ERROR = errorResponse({
  severity: 'ERROR', code: '0A000', message: 'cached plan must not change result type', file: 'plancache.c', line: '717', routine: 'RevalidateCachedQuery',
});
const RESHAPED_MARKER = Buffer.from(`"${RESHAPED_STATEMENT}"`);

/** An ErrorResponse body: is it the server's answer to a Bind of RESHAPED_STATEMENT (to be replaced by RESHAPED_ERROR)? */
export function isReshapedError(buffer: Buffer, bodyStart: number, end: number): boolean {
  const at = buffer.indexOf(RESHAPED_MARKER, bodyStart);
  return at >= 0 && at < end;
}

const FLUSH = Buffer.from([0x48, 0, 0, 0, 4]);
/** A Bind of RESHAPED_STATEMENT: it fails, and its error becomes RESHAPED_ERROR. */
const BIND_RESHAPED = serialize.bind({ statement: RESHAPED_STATEMENT });
/** RESHAPED_STATEMENT as a Bind carries it. */
const RESHAPED_STATEMENT_BYTES = statementNameBytes(RESHAPED_STATEMENT);
/** The receiver of a Describe's shape that is not kept (see ResponseEditor.describeParametersOnly). */
const IGNORE_SHAPE = (): void => undefined;
/** Not a reply type: an entry met by a CommandComplete (see ResponseEditor.expectCommand). */
const COMMAND_WATCH = 0;
/** Not a reply type: a simple Query, undone only if the server skipped it (see ResponseEditor.expectQuery). */
const QUERY_SENT = 1;

interface ExpectedReply {
  /** ParseComplete, CloseComplete, COMMAND_WATCH for a command whose CommandComplete (one of `tags`) is awaited, or QUERY_SENT. */
  type: number;
  tags?: readonly string[];
  edit: ReplyEdit;
  /** Index of the Sync/Query batch the message belongs to. */
  batch: number;
  /** Reverts what sending the message assumed, if it failed (`failed`) or the server skipped it after an earlier error. */
  undo: ((failed: boolean) => void) | undefined;
  /** Sent right after another expected message or at a batch's start: an error before its reply is its own. */
  adjacent: boolean;
  /** Runs when the reply arrives. */
  done?: (() => void) | undefined;
  /** A Parse followed by the sidecar's Describe of it: receives the statement's shape (see ResponseEditor.described). */
  describe?: ((shape: Buffer) => void) | undefined;
  /** With `describe`: the server statement whose shape it receives. */
  shapeOf?: string | undefined;
}

/**
 * Pairs ParseComplete/CloseComplete from the server with the Parses and
 * Closes the sidecar sent, in order, and says which to forward, swallow or
 * turn into ParseComplete. Active only while a session that names
 * statements uses the connection.
 */
export class ResponseEditor {
  readonly statements: ServerStatementCache;
  private expected: ExpectedReply[] = [];
  private head = 0;
  private sentBatches = 0;
  private answeredBatches = 0;
  private sentSyncs = 0;
  private isActive = false;
  /** The expected reply that was next when the batch being answered got its ErrorResponse. */
  private erred: ExpectedReply | undefined;
  /**
   * The server connection's unnamed statement is the client's (or neither has
   * one). False when a client starts using the connection: another client's
   * may be there. Kept by routeMessage.
   */
  unnamedCurrent = false;
  /** The last message sent was an expected one, or a batch's end: see ExpectedReply.adjacent. Kept by routeMessage. */
  afterTracked = false;
  /**
   * Receives the shape of the statement whose Describe is answered next (set when its ParseComplete arrives); 1 before ParameterDescription, 2 after;
   * 3 before the ParameterDescription of a client's Describe of a reshaped statement, which goes to the client (see describeParametersOnly).
   */
  private describing: ((shape: Buffer) => void) | undefined;
  private describeStage = 0;
  /** The server statement whose shape `describing` receives. */
  private describingName: string | undefined;
  /** The session holds a Bind until the shape of the statement injected before it is known: runs once it is, or once it cannot be (an error in the open batch). */
  private holdSettled: (() => void) | undefined;
  /** The Bind held was routed once already: routed again, it goes on without waiting. */
  heldFor: string | undefined;
  /** An ErrorResponse came for the batch still being sent: the server skips what follows until Sync, so nothing sent now is answered before it. */
  private erredInOpenBatch = false;

  constructor(statements: ServerStatementCache) {
    this.statements = statements;
  }

  /** True while replies are edited. */
  get active(): boolean {
    return this.isActive;
  }

  /** Replies still expected (tests). */
  get pending(): number {
    return this.expected.length - this.head;
  }

  /**
   * Starts editing. `outstandingBatches` is the number of batches sent
   * before whose end the server still owes (see
   * TransactionTracker.batchesOwed): their replies pass unedited.
   * `unsyncedReplies` are the ParseComplete/CloseComplete types the Parses and
   * Closes already sent since the last Sync owe, in order, each with the
   * number of batches that end after it before the open batch's own (a
   * Query sent after it closed an earlier batch): they are expected first in
   * their batch, and forwarded. `skipping`: an extended message failed and
   * no Sync was sent since (the server discards what comes until one is).
   */
  activate(outstandingBatches: number, unsyncedReplies: readonly { type: number; batchesAfter: number }[] = [], atBatchStart = false, skipping = false): void {
    this.describing = undefined;
    this.describeStage = 0;
    this.holdSettled = undefined;
    this.heldFor = undefined;
    this.erredInOpenBatch = skipping;
    this.expected = [];
    this.head = 0;
    this.sentBatches = outstandingBatches;
    this.answeredBatches = 0;
    this.sentSyncs = 0;
    this.isActive = true;
    this.erred = undefined;
    this.unnamedCurrent = false;
    this.afterTracked = atBatchStart && unsyncedReplies.length === 0;
    for (const { type, batchesAfter } of unsyncedReplies) this.expected.push({ type, edit: 'forward', batch: outstandingBatches - batchesAfter, undo: undefined, adjacent: false });
  }

  /** Stops editing (the connection goes back to the pool, at a boundary). */
  deactivate(): void {
    this.isActive = false;
    this.describing = undefined;
    this.holdSettled = undefined;
    this.expected = [];
    this.head = 0;
  }

  /**
   * Index of the run of messages up to the next Sync being sent: after an
   * error in an extended message the server skips the rest of it, simple
   * Queries included.
   */
  get syncRun(): number {
    return this.sentSyncs;
  }

  /** A Sync (`sync`), Query or FunctionCall was sent: it closes a batch. */
  batchSent(sync = false): void {
    this.sentBatches += 1;
    if (sync) this.sentSyncs += 1;
    this.afterTracked = true;
  }

  /**
   * A Parse was sent; `undo` reverts what it assumed if it fails or the server skips it; `done` runs when it succeeds;
   * `describe`: a Describe of the statement follows it, whose replies are swallowed and give the statement's shape.
   */
  expectParse(edit: 'forward' | 'swallow', undo?: (failed: boolean) => void, done?: () => void, describe?: (shape: Buffer) => void, shapeOf?: string): void {
    this.expected.push({ type: MessageType.parseComplete, edit, batch: this.sentBatches, undo, done, describe, shapeOf, adjacent: this.afterTracked });
    // The Describe sent after it is not tracked.
    this.afterTracked = describe === undefined;
  }

  /** The session holds its next message until the shape of the statement just injected is known; `settled` runs then. */
  hold(settled: () => void): void {
    this.holdSettled = settled;
  }

  /**
   * A Parse of server statement `name` that the sidecar follows by a Describe was sent, and
   * its shape is still to come: its reply is awaited, or its Describe's. (Scans the replies
   * awaited: called only where ServerStatementCache.shapePending says so, and to end a hold.)
   */
  awaitsShape(name: string): boolean {
    if (this.describing !== undefined && this.describingName === name) return true;
    for (let i = this.head; i < this.expected.length; i += 1) if (this.expected[i]!.shapeOf === name) return true;
    return false;
  }

  /** Nothing sent now would be answered before the next Sync (an error of this batch came already): holding would wait for ever. */
  get skipping(): boolean {
    return this.erredInOpenBatch;
  }

  private settle(): void {
    const settled = this.holdSettled;
    this.holdSettled = undefined;
    settled?.();
  }

  /**
   * A ParameterDescription (0x74), RowDescription (0x54) or NoData (0x6e)
   * arrived: true if it answers the sidecar's Describe (swallow it).
   */
  described(type: number, buffer: Buffer, bodyStart: number, end: number): boolean {
    const receive = this.describing;
    if (receive === undefined) return false;
    if (this.describeStage === 1 || this.describeStage === 3) {
      if (type !== MessageType.parameterDescription) throw new ProtocolError('malformed-body', `server sent ${String.fromCharCode(type)} where ParameterDescription was expected`);
      const forward = this.describeStage === 3;
      this.describeStage = 2;
      return !forward;
    }
    this.describing = undefined;
    this.describeStage = 0;
    if (receive === IGNORE_SHAPE) return true;
    receive(type === MessageType.noData ? Buffer.alloc(0) : resultShape(buffer, bodyStart, end));
    this.settle();
    return true;
  }

  /**
   * The next Describe answered is the client's own of a statement whose result shape changed
   * (see describeReshaped): its ParameterDescription goes to the client, its RowDescription or
   * NoData (the copy's new shape) does not.
   */
  describeParametersOnly(): void {
    this.describing = IGNORE_SHAPE;
    this.describeStage = 3;
    this.describingName = undefined;
  }

  /** A Close was sent; `undo` reverts what it assumed if the server skips it; `done` runs when its reply arrives. */
  expectClose(edit: ReplyEdit, undo?: (failed: boolean) => void, done?: () => void): void {
    this.expected.push({ type: MessageType.closeComplete, edit, batch: this.sentBatches, undo, done, adjacent: this.afterTracked });
    this.afterTracked = true;
  }

  /**
   * A DEALLOCATE sent as SQL (by Parse or Query): its effect on the maps was
   * applied when sent; `undo` reverts it unless a CommandComplete with one of
   * `tags` (`DEALLOCATE`, `DEALLOCATE ALL`, `DISCARD ALL`) comes for it before the
   * ReadyForQuery of its batch (it failed, or was skipped after an earlier error).
   */
  expectCommand(tags: readonly string[], undo: () => void): void {
    this.expected.push({ type: COMMAND_WATCH, tags, edit: 'forward', batch: this.sentBatches, undo, adjacent: false });
  }

  /**
   * A simple Query was sent, closing the batch: `undo` reverts what sending it
   * assumed if the server skipped it (after an error in an extended message
   * of its batch, it is discarded until Sync: its ReadyForQuery does not come,
   * the Sync's ends its batch too). Whether it ran or failed, it ran.
   */
  expectQuery(undo: () => void): void {
    this.expected.push({ type: QUERY_SENT, edit: 'forward', batch: this.sentBatches, undo, adjacent: false });
  }

  /** A CommandComplete with `tag` arrived: the command awaited next, if it is one of its tags, ran. Returns true if it was one. */
  commandCompleted(tag: string): boolean {
    const next = this.expected[this.head];
    if (next === undefined || next.type !== COMMAND_WATCH || next.batch > this.answeredBatches || next.tags?.includes(tag) !== true) return false;
    this.head += 1;
    this.compact();
    return true;
  }

  /**
   * An ErrorResponse arrived: remembers which expected reply was next in the
   * batch it belongs to (the first error only). `skipping`: it answers an
   * extended message with no Sync sent after it, so the server discards what
   * is sent until one is (see TransactionTracker.skipping); without it, an
   * error of the batch still open is taken for one.
   */
  error(skipping = this.answeredBatches === this.sentBatches): void {
    const next = this.expected[this.head];
    if (this.erred === undefined && next !== undefined && next.batch === this.answeredBatches) this.erred = next;
    this.describing = undefined;
    this.describeStage = 0;
    // An error of the batch still open (the one a held Bind belongs to), or before a Query that did not end the batch: the server skips the rest of it.
    if (skipping) {
      this.erredInOpenBatch = true;
      this.settle();
    }
  }

  /** A ParseComplete (0x31) or CloseComplete (0x33) arrived: what to do with it. */
  reply(type: number): ReplyEdit {
    // A reply after an awaited command in the same batch: the server went past it, so it ran.
    while (this.expected[this.head]?.type === COMMAND_WATCH && this.expected[this.head]!.batch <= this.answeredBatches) this.head += 1;
    const next = this.expected[this.head];
    // Nothing expected in the batch being answered: it was sent before editing began.
    if (next === undefined || next.batch > this.answeredBatches) return 'forward';
    if (next.type !== type) throw new ProtocolError('malformed-body', `server sent ${String.fromCharCode(type)} where ${String.fromCharCode(next.type)} was expected`);
    this.head += 1;
    this.compact();
    next.done?.();
    if (next.describe !== undefined && type === MessageType.parseComplete) {
      this.describing = next.describe;
      this.describeStage = 1;
      this.describingName = next.shapeOf;
    }
    return next.edit;
  }

  /**
   * ReadyForQuery arrived: what was expected in the batch it ends and did not
   * come was skipped after an error. That is a suffix of the batch, so undoing
   * it newest first restores exactly the state the server kept. `batches`:
   * how many batches it ends (more than one when the server skipped Queries
   * after an error in an extended message: see TransactionTracker.readyBatches);
   * all of the later ones were skipped.
   */
  ready(batches = 1): void {
    const answered = this.answeredBatches + batches - 1;
    this.answeredBatches += batches;
    this.describing = undefined;
    this.describeStage = 0;
    this.erredInOpenBatch = false;
    if (this.answeredBatches === this.sentBatches) this.statements.settledShapes();
    this.describingName = undefined;
    const first = this.head;
    while (this.head < this.expected.length && this.expected[this.head]!.batch <= answered) this.head += 1;
    // The first one missing failed itself if nothing untracked was sent between it and the last reply seen.
    const erred = this.erred;
    this.erred = undefined;
    for (let i = this.head - 1; i >= first; i -= 1) {
      const entry = this.expected[i]!;
      // The Query whose own ReadyForQuery this is ran.
      if (entry.type === QUERY_SENT && entry.batch === answered) continue;
      entry.undo?.(entry === erred && entry.adjacent);
    }
    this.compact();
    // A message held for the shape of a Parse of an earlier batch that the server skipped
    // after an error, or that failed: that shape never comes. It is routed again, afresh.
    if (this.holdSettled !== undefined && this.heldFor !== undefined && !this.awaitsShape(this.heldFor)) {
      this.heldFor = undefined;
      this.settle();
    }
  }

  private compact(): void {
    if (this.head === this.expected.length) {
      this.expected.length = 0;
      this.head = 0;
    } else if (this.head > 64 && this.head * 2 > this.expected.length) {
      this.expected = this.expected.slice(this.head);
      this.head = 0;
    }
  }
}

const STATEMENT_TARGET = 0x53;

const CLOSE_NONEXISTENT_PORTAL = buildClosePortal(NONEXISTENT_PORTAL);
const FORGET_ALL_TAGS = ['DEALLOCATE ALL', 'DISCARD ALL'];
const CLOSE_UNNAMED_STATEMENT = buildCloseStatement('');

/**
 * Rewrites one frontend message of a session that names statements, for the
 * server connection whose editor and statement cache are given; appends what
 * to send to `out` (views of `buffer` where unchanged) and records the replies
 * to edit. `buffer[start..end)` is the whole message, `bodyStart` its body.
 * Returns true when the message was not routed yet: what `out` got must be
 * sent, then the message routed again once the editor's hold settles (see
 * ResponseEditor.hold).
 */
export function routeMessage(
  client: ClientStatements, editor: ResponseEditor,
  type: number, buffer: Buffer, start: number, bodyStart: number, end: number, out: Buffer[],
): boolean {
  const server = editor.statements;
  switch (type) {
    case MessageType.parse: {
      const parsed = parseParseMessage(buffer, bodyStart, end);
      if (parsed.name === '') {
        const textStart = end - parsed.definition.length;
        const routed = routeSessionCommand(client, editor, textStart, buffer, out, 'parse');
        if (routed === true) return false;
        parseUnnamed(client, editor, buffer.subarray(start, end), out);
        // The command itself runs at the Execute of the statement: its CommandComplete comes after the ParseComplete.
        if (routed !== false) editor.expectCommand(routed.tags, routed.undo);
        return false;
      }
      const existing = client.get(parsed.name);
      const statement = clientStatement(Buffer.from(parsed.definition));
      // A Parse of a name whose Parse before an earlier, still unanswered Sync
      // had other text is a retry after that one failed (a pipelined fix):
      // the new text is what the client means. Otherwise the server must
      // refuse the duplicate (42P05) and skip to Sync: make it. (With only
      // simple Queries between them, the first one's failure would make the
      // server skip those Queries and this Parse too.)
      if (existing !== undefined && (existing.confirmed || existing.serverName === statement.serverName || existing.batch === editor.syncRun)) {
        ensurePrepared(existing, editor, out);
        out.push(existing.parse);
        editor.expectParse('forward');
        return false;
      }
      const name = parsed.name;
      statement.batch = editor.syncRun;
      client.set(name, statement);
      // Only this Parse's own entry: a later retry under the same name may have replaced it.
      const forgetClient = (): void => {
        if (client.get(name) === statement) {
          if (existing !== undefined) client.set(name, existing);
          else client.delete(name);
        }
      };
      const confirm = (): void => {
        statement.confirmed = true;
      };
      const describe = buildDescribeStatement(statement.serverName);
      const shaped = (shape: Buffer): void => {
        statement.shape = shape;
        server.setShape(statement.serverName, shape);
      };
      if (server.has(statement.serverName)) {
        // Parse it again, as the server would for this client direct: a plan
        // cached before a schema change must not outlive the client's Parse.
        server.touch(statement.serverName);
        out.push(buildCloseStatement(statement.serverName));
        editor.expectClose('swallow', () => server.restore(statement.serverName));
        server.awaitShape(statement.serverName);
        out.push(statement.parse, describe);
        // Failed, the Close before it ran: the server lacks the statement. Skipped after an
        // earlier error, so was the Close: the server keeps the statement it had.
        editor.expectParse('forward', (failed) => {
          if (failed) server.delete(statement.serverName);
          forgetClient();
        }, confirm, shaped, statement.serverName);
        return false;
      }
      addToServer(statement.serverName, editor, out);
      server.awaitShape(statement.serverName);
      out.push(statement.parse, describe);
      editor.expectParse('forward', () => {
        server.delete(statement.serverName);
        forgetClient();
      }, confirm, shaped, statement.serverName);
      return false;
    }
    case MessageType.bind: {
      const bind = parseBindMessage(buffer, bodyStart, end);
      // Its reply is not tracked, whatever was injected before it.
      if (bind.statement === '') {
        ensureUnnamed(client, editor, out);
        out.push(buffer.subarray(start, end));
        editor.afterTracked = false;
        return false;
      }
      const statement = client.get(bind.statement);
      // Unknown names go through as they are: the server answers 26000 like it would have.
      if (statement === undefined) {
        out.push(buffer.subarray(start, end));
        editor.afterTracked = false;
        return false;
      }
      if (holdForShape(statement, editor, out)) return true;
      // Direct, the client's statement would fail revalidation: the server fails this Bind instead, and skips to Sync.
      out.push(renameBind(buffer, start, bind, end, reshapedHere(statement, editor) ? RESHAPED_STATEMENT_BYTES : statement.serverNameBytes));
      editor.afterTracked = false;
      return false;
    }
    case MessageType.describe:
    case MessageType.close: {
      const target = parseTargetMessage(buffer, bodyStart, end);
      const named = target.target === STATEMENT_TARGET && target.name !== '';
      if (type === MessageType.close) {
        if (named) {
          const previous = client.get(target.name);
          client.delete(target.name);
          out.push(CLOSE_NONEXISTENT_PORTAL);
          editor.expectClose('forward', previous === undefined ? undefined : () => void client.set(target.name, previous));
        } else if (target.target === STATEMENT_TARGET) {
          // Neither the client nor the server connection has an unnamed statement after it.
          const previous = client.get('');
          const wasCurrent = editor.unnamedCurrent;
          client.delete('');
          editor.unnamedCurrent = true;
          out.push(buffer.subarray(start, end));
          editor.expectClose('forward', () => {
            if (previous !== undefined) client.set('', previous);
            editor.unnamedCurrent = wasCurrent;
          });
        } else {
          out.push(buffer.subarray(start, end));
          editor.expectClose('forward');
        }
        return false;
      }
      if (target.target === STATEMENT_TARGET && target.name === '') ensureUnnamed(client, editor, out);
      const statement = named ? client.get(target.name) : undefined;
      if (statement === undefined) out.push(buffer.subarray(start, end));
      else {
        if (holdForShape(statement, editor, out)) return true;
        // Direct, describing a statement revalidates it too.
        if (reshapedHere(statement, editor)) describeReshaped(statement, editor, out);
        else out.push(buildDescribeStatement(statement.serverName));
      }
      editor.afterTracked = false;
      return false;
    }
    case MessageType.query: {
      const routed = routeSessionCommand(client, editor, bodyStart, buffer, out, 'query');
      if (routed !== true) out.push(buffer.subarray(start, end));
      if (routed !== true && routed !== false) editor.expectCommand(routed.tags, routed.undo);
      // A simple Query drops the backend's unnamed statement: the client's is gone too (unless the server skips the Query).
      const previousUnnamed = client.get('');
      const wasCurrent = editor.unnamedCurrent;
      client.delete('');
      editor.unnamedCurrent = true;
      editor.expectQuery(() => {
        if (previousUnnamed !== undefined) client.set('', previousUnnamed);
        editor.unnamedCurrent = wasCurrent;
      });
      editor.batchSent();
      return false;
    }
    case MessageType.sync:
    case MessageType.functionCall:
      out.push(buffer.subarray(start, end));
      editor.batchSent(type === MessageType.sync);
      return false;
    default:
      out.push(buffer.subarray(start, end));
      editor.afterTracked = false;
      return false;
  }
}

/** A command sent as it is whose effect, applied already, is reverted unless a CommandComplete with one of `tags` comes. */
interface AwaitedCommand {
  tags: readonly string[];
  undo: () => void;
}

/**
 * DEALLOCATE ALL / DISCARD ALL: forgets the session's named statements and the
 * server connection's; returns what puts them back (the unnamed statement is
 * not theirs to drop).
 */
function forgetAll(client: ClientStatements, server: ServerStatementCache): () => void {
  const named = [...client].filter(([name]) => name !== '');
  const held = server.list();
  for (const [name] of named) client.delete(name);
  server.clear();
  return () => {
    for (const [name, statement] of named) client.set(name, statement);
    for (const name of held) server.restore(name);
  };
}

/**
 * DEALLOCATE and DISCARD sent as SQL by a session that names statements
 * (psycopg 3 does after a rollback and on cache eviction). The server holds
 * the session's statements under shared names, so:
 * - DEALLOCATE of one of the session's statements forgets it and drops the
 *   shared statement on this connection instead (injecting it first where a
 *   Parse may be injected; a simple Query on a connection that lacks it falls
 *   back to DEALLOCATE ALL, whose tag then says so);
 * - DEALLOCATE ALL and DISCARD ALL forget all of the session's statements; the
 *   server's are forgotten too, and until the command's completion is seen the
 *   connection's statements are uncertain (it is not reused if it never comes).
 * Returns true if it wrote the message (or its replacement) to `out`; an
 * AwaitedCommand when the message goes on as it is and its CommandComplete
 * must then be awaited (see ResponseEditor.expectCommand).
 */
function routeSessionCommand(client: ClientStatements, editor: ResponseEditor, textStart: number, buffer: Buffer, out: Buffer[], kind: 'parse' | 'query'): boolean | AwaitedCommand {
  const textEnd = buffer.indexOf(0, textStart);
  const end = textEnd < 0 ? textStart : textEnd;
  const scan = scanStatementText(buffer, textStart, end);
  const first = classifySessionCommand(buffer, textStart, end, scan);
  // In a multi-statement Query, a later DEALLOCATE ALL or DISCARD ALL drops the shared statements too;
  // a DEALLOCATE of one of the session's statements among other statements is sent with its name rewritten.
  const later = kind === 'query' ? laterSessionCommands(buffer, textStart, end, scan) : [];
  const forgetsAll = later.some((c) => c.kind === 'deallocate-all' || c.kind === 'discard-all');
  if (kind === 'query' && !forgetsAll && (scan & TEXT_SEVERAL_STATEMENTS) !== 0 && (first?.kind === 'deallocate' || later.some((c) => c.kind === 'deallocate'))) {
    const ranges = splitStatements(buffer, textStart, end);
    if (ranges.length > 1) return deallocatesAmongStatements(client, editor, buffer, textStart, end, ranges, out);
  }
  const command = forgetsAll ? { kind: 'discard-all' as const } : first;
  if (command === undefined) return false;
  const server = editor.statements;
  if (command.kind === 'deallocate-all' || command.kind === 'discard-all') {
    // Forgotten now (later messages of the batch must see it done), remembered again if it does not run.
    // (In a multi-statement Query either may be the one that forgets.)
    const tags = kind === 'query' ? FORGET_ALL_TAGS : [command.kind === 'discard-all' ? 'DISCARD ALL' : 'DEALLOCATE ALL'];
    return { tags, undo: forgetAll(client, server) };
  }
  if (command.kind !== 'deallocate') return false;
  const statement = client.get(command.name);
  if (statement === undefined) return false;
  if (kind === 'query') {
    // Reverted unless the command runs (it fails in an aborted transaction, and is skipped after an error in an unsynced batch).
    const deallocate = deallocateShared(client, server, command.name, statement);
    out.push(serialize.query(deallocate.sql));
    editor.expectCommand([deallocate.tag], deallocate.undo);
    return true;
  }
  client.delete(command.name);
  const restore = (): void => void client.set(command.name, statement);
  const sql = `DEALLOCATE ${statement.serverName}`;
  // Whether the server holds the statement when the DEALLOCATE comes: it does if it had it, or once an injected Parse of it succeeds.
  let held = server.has(statement.serverName);
  if (held) server.touch(statement.serverName);
  else {
    addToServer(statement.serverName, editor, out);
    server.forgetShape(statement.serverName);
    out.push(statement.parse);
    editor.expectParse('swallow', () => server.delete(statement.serverName), () => {
      held = true;
    });
  }
  server.delete(statement.serverName);
  // The server's unnamed statement is now the sidecar's rewrite: not one to replay elsewhere.
  const previousUnnamed = client.get('');
  const wasCurrent = editor.unnamedCurrent;
  client.delete('');
  editor.unnamedCurrent = true;
  // As in parseUnnamed: after an untracked message, a no-op Close first tells failed from skipped.
  if (!editor.afterTracked) {
    out.push(CLOSE_NONEXISTENT_PORTAL);
    editor.expectClose('swallow');
  }
  out.push(buildParse('', Buffer.from(`${sql}\0\0\0`, 'utf8')));
  // A DEALLOCATE that failed or was skipped after an earlier error (psycopg 3 sends its
  // cache evictions inside a pipeline) left the statement on the server: it stays known,
  // or a later Parse of the same definition there would get 42P05. Skipped, it also left
  // the previous unnamed statement in place (failed, PostgreSQL dropped it).
  editor.expectParse('forward', (failed) => {
    restore();
    if (held) server.restore(statement.serverName);
    if (!failed && previousUnnamed !== undefined) client.set('', previousUnnamed);
    editor.unnamedCurrent = failed || wasCurrent;
  });
  return true;
}

/** A session's DEALLOCATE rewritten for the server connection: the SQL sent, the tag its CommandComplete carries, and what puts things back if that never comes. */
interface SharedDeallocate {
  sql: string;
  tag: 'DEALLOCATE' | 'DEALLOCATE ALL';
  undo: () => void;
}

/**
 * A DEALLOCATE of the session's statement `name` sent as SQL: the session
 * forgets it and the connection drops the shared statement; where the
 * connection does not hold it, DEALLOCATE ALL drops the connection's
 * statements instead (the client's other statements stay its own, prepared
 * again where used).
 */
function deallocateShared(client: ClientStatements, server: ServerStatementCache, name: string, statement: ClientStatement): SharedDeallocate {
  client.delete(name);
  if (server.has(statement.serverName)) {
    server.delete(statement.serverName);
    return {
      sql: `DEALLOCATE ${statement.serverName}`,
      tag: 'DEALLOCATE',
      undo: () => {
        client.set(name, statement);
        server.restore(statement.serverName);
      },
    };
  }
  const held = server.list();
  server.clear();
  return {
    sql: 'DEALLOCATE ALL',
    tag: 'DEALLOCATE ALL',
    undo: () => {
      for (const heldName of held) server.restore(heldName);
      client.set(name, statement);
    },
  };
}

/**
 * A multi-statement Query with DEALLOCATEs of the session's statements among
 * other statements (psqlODBC wraps each in a savepoint inside a transaction:
 * `SAVEPOINT _per_query_svp_;DEALLOCATE "_PLAN0x…";RELEASE _per_query_svp_`):
 * sent with each such DEALLOCATE naming the shared statement on this
 * connection, or, where the connection does not hold it, `DEALLOCATE ALL`
 * (as for a lone DEALLOCATE); each reverted unless its CommandComplete comes.
 * DEALLOCATEs of names the session never prepared go as they are, and fail
 * as direct. Returns false when the Query holds none of the session's.
 */
function deallocatesAmongStatements(client: ClientStatements, editor: ResponseEditor, buffer: Buffer, textStart: number, end: number, ranges: ReadonlyArray<[number, number]>, out: Buffer[]): boolean {
  const server = editor.statements;
  const parts: string[] = [];
  const awaited: SharedDeallocate[] = [];
  let copiedTo = textStart;
  for (const [from, to] of ranges) {
    const command = classifySessionCommand(buffer, from, to);
    if (command?.kind !== 'deallocate') continue;
    const statement = client.get(command.name);
    if (statement === undefined) continue;
    parts.push(buffer.toString('utf8', copiedTo, from));
    copiedTo = to;
    const deallocate = deallocateShared(client, server, command.name, statement);
    parts.push(deallocate.sql);
    awaited.push(deallocate);
  }
  if (awaited.length === 0) return false;
  parts.push(buffer.toString('utf8', copiedTo, end));
  out.push(serialize.query(parts.join('')));
  for (const { tag, undo } of awaited) editor.expectCommand([tag], undo);
  return true;
}

/**
 * The client's Parse of the unnamed statement, forwarded as it is and kept as
 * the client's unnamed statement. If it fails, PostgreSQL has dropped the
 * previous one (neither side has one); if it is skipped after an earlier
 * error, the previous one stays. Only a Parse sent right after another tracked
 * message tells the two apart from the replies (an error before its reply is
 * its own), so after an untracked message (Bind, Execute, Describe) a Close of
 * a portal that does not exist goes first, its reply swallowed.
 */
function parseUnnamed(client: ClientStatements, editor: ResponseEditor, message: Buffer, out: Buffer[]): void {
  if (!editor.afterTracked) {
    out.push(CLOSE_NONEXISTENT_PORTAL);
    editor.expectClose('swallow');
  }
  const previous = client.get('');
  const wasCurrent = editor.unnamedCurrent;
  const statement = unnamedStatement(message, editor.syncRun);
  client.set('', statement);
  editor.unnamedCurrent = true;
  out.push(message);
  editor.expectParse('forward', (failed) => {
    if (client.get('') === statement) {
      if (failed || previous === undefined) client.delete('');
      else client.set('', previous);
    }
    editor.unnamedCurrent = failed || wasCurrent;
  }, () => {
    statement.confirmed = true;
  });
}

/** The unnamed statement's name as a Bind carries it: the NUL alone. */
const UNNAMED_BYTES = statementNameBytes('');

/** The client's unnamed statement, kept to be prepared again on another server connection. */
export function unnamedStatement(parse: Buffer, batch = -1): ClientStatement {
  return { serverName: '', serverNameBytes: UNNAMED_BYTES, parse: Buffer.from(parse), confirmed: false, batch };
}

/**
 * Before a Bind or Describe of the unnamed statement: unless the server
 * connection's unnamed statement is the client's, prepares the client's there
 * (reply swallowed), or closes the server's when the client has none, so that
 * the server answers 26000 as it would direct.
 */
function ensureUnnamed(client: ClientStatements, editor: ResponseEditor, out: Buffer[]): void {
  if (editor.unnamedCurrent) return;
  const statement = client.get('');
  editor.unnamedCurrent = true;
  const undo = (): void => {
    editor.unnamedCurrent = false;
  };
  if (statement === undefined) {
    out.push(CLOSE_UNNAMED_STATEMENT);
    editor.expectClose('swallow', undo);
  } else {
    out.push(statement.parse);
    editor.expectParse('swallow', undo);
  }
}

/**
 * Before a Bind or Describe of a client's statement: prepares it here if
 * needed. Returns true when it was prepared here only now, against the schema
 * as it is, while the client's shape is known: the message waits for the new
 * statement's shape (a Flush makes the server answer at once).
 */
function holdForShape(statement: ClientStatement, editor: ResponseEditor, out: Buffer[]): boolean {
  if (statement.shape !== undefined && !editor.skipping && editor.statements.shapePending(statement.serverName) && editor.awaitsShape(statement.serverName)) {
    // Another Parse of the same text (another client name, or another client) was just
    // sent here and prepares it again: compare with the shape that one gets. (If an error
    // makes the server skip it, the ReadyForQuery of its batch ends the hold.)
    out.push(FLUSH);
    editor.heldFor = statement.serverName;
    return true;
  }
  if (statement.shape === undefined || editor.heldFor === statement.serverName || editor.skipping) {
    editor.heldFor = undefined;
    ensurePrepared(statement, editor, out);
    return false;
  }
  if (reshapedHere(statement, editor)) {
    // This connection's copy may be the stale one (prepared before a schema change the
    // client's own Parse came after): prepare it again here against the schema as it is,
    // and compare that. Only a client's statement older than the schema gets 0A000.
    const server = editor.statements;
    server.delete(statement.serverName);
    out.push(buildCloseStatement(statement.serverName));
    editor.expectClose('swallow', () => server.restore(statement.serverName));
  }
  if (!editor.statements.has(statement.serverName)) {
    ensurePrepared(statement, editor, out);
    out.push(FLUSH);
    editor.heldFor = statement.serverName;
    return true;
  }
  editor.heldFor = undefined;
  ensurePrepared(statement, editor, out);
  return false;
}

/**
 * A RowDescription body as a result shape: a copy with each column's table OID
 * and attribute number zeroed. PostgreSQL's check (equalTupleDescs on the
 * result's descriptor) compares the columns' names, types and typmods, not
 * where they come from: a table dropped and created again with the same
 * columns, or a column dropped and added again, leaves a prepared statement
 * valid direct. (The format codes of a statement's Describe are always 0.)
 */
export function resultShape(buffer: Buffer, bodyStart: number, end: number): Buffer {
  const shape = Buffer.from(buffer.subarray(bodyStart, end));
  if (shape.length < 2) throw new ProtocolError('malformed-body', 'RowDescription without a field count');
  let at = 2;
  for (let field = shape.readUInt16BE(0); field > 0; field -= 1) {
    const nameEnd = shape.indexOf(0, at);
    if (nameEnd < 0 || nameEnd + 19 > shape.length) throw new ProtocolError('malformed-body', 'RowDescription field truncated');
    // name\0, table OID (4), attribute number (2), type OID (4), type size (2), typmod (4), format (2)
    shape.fill(0, nameEnd + 1, nameEnd + 7);
    at = nameEnd + 19;
  }
  return shape;
}

/**
 * A Describe of a statement whose result shape changed since the client's Parse: direct,
 * PostgreSQL answers its ParameterDescription, then fails with 0A000 where it revalidates
 * the statement for its RowDescription (and skips to Sync). The copy here (same parameter
 * types) gives the first: a Describe of it whose RowDescription or NoData is swallowed (a
 * no-op Close before it tells the editor when its replies come); a Bind of
 * RESHAPED_STATEMENT after it gives the second.
 */
function describeReshaped(statement: ClientStatement, editor: ResponseEditor, out: Buffer[]): void {
  out.push(CLOSE_NONEXISTENT_PORTAL);
  editor.expectClose('swallow', undefined, () => editor.describeParametersOnly());
  out.push(buildDescribeStatement(statement.serverName), BIND_RESHAPED);
}

/** The statement's result shape on this server connection differs from the one it was parsed with for the client. */
function reshapedHere(statement: ClientStatement, editor: ResponseEditor): boolean {
  const here = editor.statements.shape(statement.serverName);
  if (statement.shape === undefined || here === undefined || here === statement.shape) return false;
  if (!here.equals(statement.shape)) return true;
  // The same shape: one Buffer for both from now on, so the next Bind's check compares references.
  statement.shape = here;
  return false;
}

/** Injects the statement's Parse and a Describe of it (replies swallowed; the shape recorded) if this server connection lacks it. */
function ensurePrepared(statement: ClientStatement, editor: ResponseEditor, out: Buffer[]): void {
  const server = editor.statements;
  if (server.has(statement.serverName)) {
    server.touch(statement.serverName);
    return;
  }
  addToServer(statement.serverName, editor, out);
  server.awaitShape(statement.serverName);
  out.push(statement.parse, buildDescribeStatement(statement.serverName));
  editor.expectParse('swallow', () => server.delete(statement.serverName), undefined, (shape) => server.setShape(statement.serverName, shape), statement.serverName);
}

/** Records `name` as prepared on the server, closing the least recently used statement past capacity. */
function addToServer(name: string, editor: ResponseEditor, out: Buffer[]): void {
  const server = editor.statements;
  for (const evicted of server.add(name)) {
    out.push(buildCloseStatement(evicted));
    editor.expectClose('swallow', () => server.restore(evicted));
  }
}
