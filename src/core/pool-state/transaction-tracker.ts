/**
 * Where a server connection stands in the conversation, from message types
 * only: it may go back to the pool only when the last ReadyForQuery said
 * idle ('I'), every Query/Sync/FunctionCall sent has had its ReadyForQuery,
 * no extended-protocol batch is open without a Sync, and no COPY is running.
 *
 * Which ReadyForQuery are owed follows PostgreSQL's rule (postgres.c): after
 * an ErrorResponse to an extended-protocol message (Parse, Bind, Describe,
 * Execute, Close) the backend discards every message until the next Sync,
 * simple Queries and FunctionCalls included, so their ReadyForQuery never
 * come; an error in a simple Query (or FunctionCall, or at Sync) skips
 * nothing, and each ends with its own ReadyForQuery. To tell which message an
 * ErrorResponse answers, the tracker keeps the messages sent whose last reply
 * is still owed, in order, and counts those replies: ParseComplete,
 * BindComplete, CloseComplete, RowDescription or NoData (Describe),
 * CommandComplete, EmptyQueryResponse, PortalSuspended or the ErrorResponse
 * itself (Execute), ReadyForQuery (Query, FunctionCall, Sync).
 *
 * A COPY FROM STDIN (copyfromparse.c) reads the messages sent after its
 * Query or Execute up to the first CopyDone or CopyFail, ignoring the Syncs
 * and Flushes among them; CopyData, CopyDone and CopyFail outside a COPY are
 * ignored. A client may send all of it before the CopyInResponse that says
 * the statement was a COPY, so CopyData, CopyDone and CopyFail are kept in
 * the queue too while it is not known whether a COPY will read them.
 */

/** Status byte of ReadyForQuery. */
export type ReadyStatus = 'I' | 'T' | 'E';

/** COPY sub-protocol in progress, if any. */
export type CopyState = 'none' | 'in' | 'out' | 'both';

const Q = 0x51;
const S = 0x53;
const F = 0x46;
const P = 0x50;
const B = 0x42;
const E = 0x45;
const D = 0x44;
const C = 0x43;
const H = 0x48;
const COPY_DONE = 0x63;
const COPY_DATA = 0x64;
const PARSE_COMPLETE = 0x31;
const BIND_COMPLETE = 0x32;
const CLOSE_COMPLETE = 0x33;
const ROW_DESCRIPTION = 0x54;
const NO_DATA = 0x6e;
const EMPTY_QUERY_RESPONSE = 0x49;
const PORTAL_SUSPENDED = 0x73;
const COPY_FAIL = 0x66;
const COPY_IN_RESPONSE = 0x47;
const COPY_OUT_RESPONSE = 0x48;
const COPY_BOTH_RESPONSE = 0x57;
const READY_FOR_QUERY = 0x5a;
const ERROR_RESPONSE = 0x45;
const I_BYTE = 0x49;
const T_BYTE = 0x54;

/**
 * What became of a watched statement (a client's SET), decided when its
 * transaction ends: `ran` (completed, no error or rollback after it, and its
 * transaction committed: it took effect for the session), `not-run` (it never
 * completed, or its transaction ended in ROLLBACK), `uncertain` (it
 * completed, but an error or a ROLLBACK TO SAVEPOINT followed, which may or
 * may not undo it).
 */
export type WatchedOutcome = 'running' | 'ran' | 'not-run' | 'uncertain';

/**
 * Kinds of entries in TransactionTracker's queue: Parse, Close, another
 * extended message (Bind, Describe, Execute), Query or FunctionCall, Sync,
 * and the COPY messages a COPY not yet begun may read: CopyData, CopyDone or
 * CopyFail. Those two are owed no reply; they leave the queue when the COPY
 * before them begins, or when every message before them was answered.
 */
const OWED_PARSE = P;
const OWED_CLOSE = C;
const OWED_EXTENDED = B;
const OWED_QUERY = Q;
const OWED_SYNC = S;
const OWED_COPY_DATA = COPY_DATA;
const OWED_COPY_END = COPY_DONE;

/** Tracks transaction boundaries of one server connection. */
export class TransactionTracker {
  /** Status from the latest ReadyForQuery. */
  status: ReadyStatus = 'I';
  /** ReadyForQuery messages still owed by the server. */
  pendingReady = 0;
  /** Extended-protocol messages sent since the last Sync. */
  extendedOpen = false;
  /**
   * Client batches (each Query, FunctionCall and Sync closes one) that the
   * latest ReadyForQuery ended: 1, plus the Queries and FunctionCalls the
   * server skipped after an error in an extended message before that Sync,
   * plus the Syncs a COPY FROM STDIN read before it.
   */
  readyBatches = 1;
  /**
   * Messages sent whose last reply is still owed, oldest first, run-length
   * encoded in `owed[owedHead..owedEnd)` as [kind, count, kind, count, ...]
   * (kinds: OWED_*). The array is reused as it is, never shrunk: no
   * allocation per message once it has grown to a client's deepest pipeline.
   */
  private readonly owed: number[] = [];
  private owedHead = 0;
  private owedEnd = 0;
  /** An extended message failed and no Sync was sent since: the server discards what comes until one is. */
  private skippingToSync = false;
  /** Queries and FunctionCalls skipped since the latest ReadyForQuery: the next one ends their batches too. */
  private skippedBatches = 0;
  /**
   * Syncs a COPY FROM STDIN read since the latest ReadyForQuery (libpq and
   * tokio-postgres send one right after the Execute of a COPY): they get no
   * ReadyForQuery, so the next one ends their batches too.
   */
  private syncsReadByCopy = 0;
  /** COPY in progress; a COPY FROM STDIN only until the client's CopyDone or CopyFail (none if it sent one before the CopyInResponse). */
  copy: CopyState = 'none';
  /** The COPY FROM STDIN running on the server had CopyData sent for it. */
  private copyDataSent = false;
  /**
   * Syncs sent among the CopyData of the COPY FROM STDIN running on the
   * server. The COPY reads them, unless it fails before them: the server
   * then answers each with a ReadyForQuery. Which it read, the replies do not
   * tell.
   */
  private syncsAmongCopyData = 0;
  /**
   * The ReadyForQuery still to come cannot be counted: one arrived that
   * nothing asked for (a protocol bug on one side), or a COPY FROM STDIN with
   * Syncs among its data failed (see syncsAmongCopyData). The connection is
   * never at a boundary again: it is closed, not reused.
   */
  readyCountLost = false;
  /** The watched statement's outcome, while one is watched (see watch). */
  watched: WatchedOutcome | undefined;
  private watchedCompleted = false;
  private watchedFailed = false;
  /** Client batches still to end before the watched statement's own batch begins. */
  private watchedAfter = 0;
  /** The latest command since the watch began was a ROLLBACK. */
  private watchedRolledBack = false;

  /**
   * Watches a statement: its outcome is in `watched` after the ReadyForQuery
   * that ends its batch, the one after the `after` batches still owed before
   * it (a pipelined client's earlier queries: see batchesOwed), or, inside a
   * transaction block, the one that ends the block.
   */
  watch(after = 0): void {
    this.watched = 'running';
    this.watchedCompleted = false;
    this.watchedFailed = false;
    this.watchedRolledBack = false;
    this.watchedAfter = after;
  }

  /** Records a CommandComplete (not passed to serverMessage: the connection reads its tag); `rollback`: its tag is ROLLBACK. */
  commandCompleted(rollback = false): void {
    // The last reply of an Execute (of a simple Query, its ReadyForQuery is).
    this.extendedReplied();
    // A COPY FROM STDIN that completed read every Sync sent among its data.
    this.syncsAmongCopyData = 0;
    if (this.watched !== 'running' || this.watchedAfter > 0) return;
    this.watchedCompleted = true;
    // A ROLLBACK TO SAVEPOINT may undo it; one that ends the block (or a COMMIT of a failed one) does.
    if (rollback) this.watchedFailed = true;
    this.watchedRolledBack = rollback;
  }

  /** Records a frontend message sent to the server (every one, the sidecar's own included). */
  clientMessage(type: number): void {
    switch (type) {
      case Q:
      case F:
        // Discarded by the server, it gets no ReadyForQuery of its own: the Sync's ends its batch.
        if (this.skippingToSync) this.skippedBatches += 1;
        else {
          this.pendingReady += 1;
          this.owe(OWED_QUERY);
        }
        return;
      case S:
        // Read by a COPY FROM STDIN, a Sync is ignored (libpq sends one right after the Execute of a COPY, another after CopyDone).
        if (this.copy === 'in') {
          if (this.copyDataSent) this.syncsAmongCopyData += 1;
          this.syncsReadByCopy += 1;
          return;
        }
        this.pendingReady += 1;
        this.extendedOpen = false;
        this.skippingToSync = false;
        this.owe(OWED_SYNC);
        return;
      case P:
      case C:
        this.extendedOpen = true;
        if (!this.skippingToSync) this.owe(type);
        return;
      case B:
      case E:
      case D:
        this.extendedOpen = true;
        if (!this.skippingToSync) this.owe(OWED_EXTENDED);
        return;
      case H:
        this.extendedOpen = true;
        return;
      case COPY_DATA:
        if (this.copy === 'in') this.copyDataSent = true;
        else this.oweCopyMessage(OWED_COPY_DATA);
        return;
      case COPY_DONE:
      case COPY_FAIL:
        if (this.copy === 'in') this.copy = 'none';
        else this.oweCopyMessage(OWED_COPY_END);
        return;
      default:
    }
  }

  /**
   * Records a backend message; `statusByte` is the body's first byte, needed
   * for ReadyForQuery only. Returns true when this message is a ReadyForQuery
   * that leaves the connection at a transaction boundary. (CommandComplete
   * goes to commandCompleted instead; ParameterDescription, DataRow and the
   * asynchronous messages need not come here.)
   */
  serverMessage(type: number, statusByte = 0): boolean {
    switch (type) {
      case READY_FOR_QUERY: {
        if (this.pendingReady === 0) this.readyCountLost = true;
        else {
          this.pendingReady -= 1;
          this.readyReplied();
        }
        const batches = 1 + this.skippedBatches + this.syncsReadByCopy;
        this.readyBatches = batches;
        this.skippedBatches = 0;
        this.syncsReadByCopy = 0;
        this.status = statusByte === I_BYTE ? 'I' : statusByte === T_BYTE ? 'T' : 'E';
        this.copy = 'none';
        this.syncsAmongCopyData = 0;
        if (this.watched === 'running') {
          if (this.watchedAfter >= batches) this.watchedAfter -= batches;
          else {
            this.watchedAfter = 0;
            // Inside a transaction block it holds only if the block commits: watched until it ends.
            // A transaction that ended in ROLLBACK took the statement with it.
            if (this.status === 'I' || !this.watchedCompleted) this.watched = !this.watchedCompleted || (this.status === 'I' && this.watchedRolledBack) ? 'not-run' : this.watchedFailed ? 'uncertain' : 'ran';
          }
        }
        return this.atBoundary;
      }
      case PARSE_COMPLETE:
      case BIND_COMPLETE:
      case CLOSE_COMPLETE:
      case ROW_DESCRIPTION:
      case NO_DATA:
      case EMPTY_QUERY_RESPONSE:
      case PORTAL_SUSPENDED:
        this.extendedReplied();
        return false;
      case COPY_IN_RESPONSE:
        this.copyInBegan();
        return false;
      case COPY_OUT_RESPONSE:
        this.copy = 'out';
        return false;
      case COPY_BOTH_RESPONSE:
        this.copy = 'both';
        return false;
      case COPY_DONE:
        if (this.copy === 'out') this.copy = 'none';
        return false;
      case ERROR_RESPONSE:
        // An error ends COPY IN on the server side; ReadyForQuery follows.
        if (this.copy === 'in') this.copy = 'none';
        // It may have come before some of the Syncs among its data were read: those get a ReadyForQuery each.
        if (this.syncsAmongCopyData > 0) this.readyCountLost = true;
        this.syncsAmongCopyData = 0;
        if (this.watched === 'running' && this.watchedAfter === 0) this.watchedFailed = true;
        // It answers an extended message: the server discards what follows until Sync.
        if (this.owedHead < this.owedEnd && this.owed[this.owedHead] !== OWED_QUERY && this.owed[this.owedHead] !== OWED_SYNC) this.skipToSync();
        return false;
      default:
        return false;
    }
  }

  /** Adds a message to the owed queue (joining the last run if of the same kind). */
  private owe(kind: number): void {
    const owed = this.owed;
    const end = this.owedEnd;
    if (end > this.owedHead && owed[end - 2] === kind) owed[end - 1]! += 1;
    else {
      owed[end] = kind;
      owed[end + 1] = 1;
      this.owedEnd = end + 2;
    }
  }

  /** The oldest owed message got its last reply. */
  private dropOldest(): void {
    const owed = this.owed;
    const head = this.owedHead;
    if (owed[head + 1]! > 1) owed[head + 1]! -= 1;
    else this.advanceTo(head + 2);
  }

  /**
   * A CopyData, CopyDone or CopyFail sent with no COPY FROM STDIN known to
   * read it: queued for the COPY that an owed Query or Execute may begin
   * (with nothing owed, or after an error the server discards until Sync,
   * none can).
   */
  private oweCopyMessage(kind: number): void {
    if (this.owedHead < this.owedEnd && !this.skippingToSync) this.owe(kind);
  }

  /** Forgets the owed messages before index `head` (of the run-length array). */
  private advanceTo(head: number): void {
    const end = this.owedEnd;
    // COPY messages with every message before them answered: no COPY reads them.
    while (head < end && (this.owed[head] === OWED_COPY_DATA || this.owed[head] === OWED_COPY_END)) head += 2;
    if (head >= end) {
      this.owedHead = 0;
      this.owedEnd = 0;
    } else if (head >= 64 && head * 2 >= end) {
      // A client that never lets the queue empty: moved down in place now and then.
      this.owed.copyWithin(0, head, end);
      this.owedEnd = end - head;
      this.owedHead = 0;
    } else this.owedHead = head;
  }

  /** A last reply of an extended message arrived (one that answers a Query's statement, were a Query next, is not). */
  private extendedReplied(): void {
    const head = this.owedHead;
    if (head >= this.owedEnd) return;
    const kind = this.owed[head];
    if (kind !== OWED_QUERY && kind !== OWED_SYNC) this.dropOldest();
  }

  /** A ReadyForQuery arrived for the oldest Query, FunctionCall or Sync owed. */
  private readyReplied(): void {
    const owed = this.owed;
    const end = this.owedEnd;
    let head = this.owedHead;
    // Extended messages before it that got no reply counted (none, unless a reply type is not known here), and COPY messages.
    while (head < end && owed[head] !== OWED_QUERY && owed[head] !== OWED_SYNC) head += 2;
    this.owedHead = head;
    if (head < end) this.dropOldest();
    else this.advanceTo(head);
  }

  /**
   * The oldest owed message, an extended one, failed: the server discards
   * every message until the next Sync. Their replies (and the ReadyForQuery
   * of the Queries and FunctionCalls among them) never come.
   */
  private skipToSync(): void {
    const owed = this.owed;
    const end = this.owedEnd;
    let head = this.owedHead;
    let skipped = 0;
    while (head < end && owed[head] !== OWED_SYNC) {
      if (owed[head] === OWED_QUERY) skipped += owed[head + 1]!;
      head += 2;
    }
    this.pendingReady -= skipped;
    this.skippedBatches += skipped;
    // No Sync sent yet: what is sent until one is gets discarded too.
    if (head >= end) this.skippingToSync = true;
    this.advanceTo(head);
  }

  /**
   * A COPY FROM STDIN began (its Query or Execute is the oldest owed
   * message): it reads the messages sent after it until the first CopyDone
   * or CopyFail, ignoring Syncs and Flushes. The Syncs already sent before
   * that get no ReadyForQuery (those after a CopyData only if the COPY does
   * not fail first: syncsAmongCopyData), and an extended batch stays open
   * until a Sync after the COPY. If the client sent its CopyDone or
   * CopyFail already, the COPY waits for nothing more from it.
   */
  private copyInBegan(): void {
    const owed = this.owed;
    const end = this.owedEnd;
    const head = this.owedHead;
    let write = head + 2;
    let read = head + 2;
    let readByCopy = 0;
    let amongData = 0;
    let dataSent = false;
    let ended = false;
    for (; read < end && !ended; read += 2) {
      const kind = owed[read]!;
      if (kind === OWED_SYNC) {
        readByCopy += owed[read + 1]!;
        if (dataSent) amongData += owed[read + 1]!;
        continue;
      }
      if (kind === OWED_COPY_DATA) {
        dataSent = true;
        continue;
      }
      if (kind === OWED_COPY_END) {
        ended = true;
        continue;
      }
      // A message the COPY cannot read (the server ends the session on it): kept as it is.
      write = this.keep(write, read);
    }
    let syncAfter = false;
    for (; read < end; read += 2) {
      if (owed[read] === OWED_SYNC) syncAfter = true;
      write = this.keep(write, read);
    }
    if (head < end) this.owedEnd = write;
    this.copy = ended ? 'none' : 'in';
    this.copyDataSent = dataSent;
    this.syncsAmongCopyData = amongData;
    this.pendingReady -= readByCopy;
    this.syncsReadByCopy += readByCopy;
    if (readByCopy > 0 && !syncAfter && head < end && owed[head] !== OWED_QUERY) this.extendedOpen = true;
  }

  /** Moves the queue entry at `read` down to `write`, joining the run before it if of the same kind; returns the next write index. */
  private keep(write: number, read: number): number {
    const owed = this.owed;
    if (owed[write - 2] === owed[read]) {
      owed[write - 1]! += owed[read + 1]!;
      return write;
    }
    owed[write] = owed[read]!;
    owed[write + 1] = owed[read + 1]!;
    return write + 2;
  }

  /**
   * Client batches whose end is still owed: the ReadyForQuery owed plus the
   * Queries and FunctionCalls skipped after an error and the Syncs a COPY
   * read, whose batches the next one ends (the `after` of watch, the
   * outstanding batches of ResponseEditor.activate).
   */
  get batchesOwed(): number {
    return this.pendingReady + this.skippedBatches + this.syncsReadByCopy;
  }

  /** An extended message failed and no Sync was sent since: the server discards everything sent until one is. */
  get skipping(): boolean {
    return this.skippingToSync;
  }

  /**
   * The replies (ParseComplete 0x31, CloseComplete 0x33) the Parses and
   * Closes sent since the last Sync still owe, in order, each with the
   * number of client batches that end after it before the open batch's own
   * (a Query or FunctionCall sent after it ends a batch, pgjdbc's
   * `SAVEPOINT` of autosave between a Close and a Parse).
   */
  unsyncedReplyTypes(): { type: number; batchesAfter: number }[] {
    const owed = this.owed;
    const end = this.owedEnd;
    let start = end;
    while (start > this.owedHead && owed[start - 2] !== OWED_SYNC) start -= 2;
    let queries = 0;
    for (let i = start; i < end; i += 2) if (owed[i] === OWED_QUERY) queries += owed[i + 1]!;
    const replies: { type: number; batchesAfter: number }[] = [];
    for (let i = start; i < end; i += 2) {
      const kind = owed[i]!;
      if (kind === OWED_QUERY) queries -= owed[i + 1]!;
      if (kind !== OWED_PARSE && kind !== OWED_CLOSE) continue;
      const type = kind === OWED_PARSE ? PARSE_COMPLETE : CLOSE_COMPLETE;
      for (let n = owed[i + 1]!; n > 0; n -= 1) replies.push({ type, batchesAfter: queries });
    }
    return replies;
  }

  /** True when the connection may be handed to another client. */
  get atBoundary(): boolean {
    return this.status === 'I' && this.pendingReady === 0 && !this.extendedOpen && this.copy === 'none' && !this.readyCountLost;
  }

  /** True inside a transaction block, failed or not. */
  get inTransaction(): boolean {
    return this.status !== 'I';
  }

  /** Forgets everything (a fresh login or after the sidecar's own reset query). */
  reset(): void {
    this.status = 'I';
    this.pendingReady = 0;
    this.extendedOpen = false;
    this.readyBatches = 1;
    this.owedHead = 0;
    this.owedEnd = 0;
    this.skippingToSync = false;
    this.skippedBatches = 0;
    this.syncsReadByCopy = 0;
    this.copy = 'none';
    this.copyDataSent = false;
    this.syncsAmongCopyData = 0;
    this.readyCountLost = false;
    this.watched = undefined;
  }
}
