/**
 * Where a server connection stands in the conversation, from message types
 * only: it may go back to the pool only when the last ReadyForQuery said
 * idle ('I'), every Query/Sync/FunctionCall sent has had its ReadyForQuery,
 * no extended-protocol batch is open without a Sync, and no COPY is running.
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
const PARSE_COMPLETE = 0x31;
const CLOSE_COMPLETE = 0x33;
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

/** Tracks transaction boundaries of one server connection. */
export class TransactionTracker {
  /** Status from the latest ReadyForQuery. */
  status: ReadyStatus = 'I';
  /** ReadyForQuery messages still owed by the server. */
  pendingReady = 0;
  /** Extended-protocol messages sent since the last Sync. */
  extendedOpen = false;
  /**
   * Parses and Closes sent since the last Sync whose ParseComplete/CloseComplete
   * is still owed, in order: run-length encoded as [type, count, queries,
   * type, count, queries, ...], `queries` being the Queries and FunctionCalls
   * of the unsynced batch sent before the run (a pipeline of unnamed
   * statements is one run of Parses).
   */
  private readonly unsyncedReplies: number[] = [];
  /** Queries and FunctionCalls sent since the first Parse or Close of the unsynced batch: each ends a batch of its own, whose ReadyForQuery follows the replies sent before it. */
  private unsyncedQueries = 0;
  /** COPY in progress. */
  copy: CopyState = 'none';
  /** A ReadyForQuery arrived that nothing asked for (a protocol bug on one side). */
  unexpectedReady = false;
  /** The watched statement's outcome, while one is watched (see watch). */
  watched: WatchedOutcome | undefined;
  private watchedCompleted = false;
  private watchedFailed = false;
  /** ReadyForQuery messages still to come before the watched statement's own batch begins. */
  private watchedAfter = 0;
  /** The latest command since the watch began was a ROLLBACK. */
  private watchedRolledBack = false;

  /**
   * Watches a statement: its outcome is in `watched` after the ReadyForQuery
   * that ends its batch, the one after the `after` still owed before it (a
   * pipelined client's earlier queries), or, inside a transaction block, the
   * one that ends the block.
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
    if (this.watched !== 'running' || this.watchedAfter > 0) return;
    this.watchedCompleted = true;
    // A ROLLBACK TO SAVEPOINT may undo it; one that ends the block (or a COMMIT of a failed one) does.
    if (rollback) this.watchedFailed = true;
    this.watchedRolledBack = rollback;
  }

  /** Records a frontend message forwarded to the server. */
  clientMessage(type: number): void {
    switch (type) {
      case Q:
      case F:
        this.pendingReady += 1;
        if (this.unsyncedReplies.length > 0) this.unsyncedQueries += 1;
        return;
      case S:
        this.pendingReady += 1;
        this.extendedOpen = false;
        this.unsyncedReplies.length = 0;
        this.unsyncedQueries = 0;
        return;
      case P:
      case C: {
        this.extendedOpen = true;
        const runs = this.unsyncedReplies;
        if (runs.length > 0 && runs[runs.length - 3] === type && runs[runs.length - 1] === this.unsyncedQueries) runs[runs.length - 2]! += 1;
        else runs.push(type, 1, this.unsyncedQueries);
        return;
      }
      case B:
      case E:
      case D:
      case H:
        this.extendedOpen = true;
        return;
      case COPY_DONE:
      case COPY_FAIL:
        if (this.copy === 'in') this.copy = 'none';
        return;
      default:
    }
  }

  /**
   * Records a backend message; `statusByte` is the body's first byte, needed
   * for ReadyForQuery only. Returns true when this message is a ReadyForQuery
   * that leaves the connection at a transaction boundary.
   */
  serverMessage(type: number, statusByte = 0): boolean {
    switch (type) {
      case READY_FOR_QUERY:
        if (this.pendingReady === 0) this.unexpectedReady = true;
        else this.pendingReady -= 1;
        this.status = statusByte === I_BYTE ? 'I' : statusByte === T_BYTE ? 'T' : 'E';
        this.copy = 'none';
        if (this.watched === 'running') {
          if (this.watchedAfter > 0) this.watchedAfter -= 1;
          // Inside a transaction block it holds only if the block commits: watched until it ends.
          // A transaction that ended in ROLLBACK took the statement with it.
          else if (this.status === 'I' || !this.watchedCompleted) this.watched = !this.watchedCompleted || (this.status === 'I' && this.watchedRolledBack) ? 'not-run' : this.watchedFailed ? 'uncertain' : 'ran';
        }
        return this.atBoundary;
      case PARSE_COMPLETE:
      case CLOSE_COMPLETE:
        this.replied();
        return false;
      case COPY_IN_RESPONSE:
        this.copy = 'in';
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
        if (this.watched === 'running' && this.watchedAfter === 0) this.watchedFailed = true;
        return false;
      default:
        return false;
    }
  }

  /** The oldest Parse or Close of the unsynced batch was answered. */
  private replied(): void {
    const runs = this.unsyncedReplies;
    if (runs.length === 0) return;
    if (runs[1]! > 1) runs[1]! -= 1;
    else runs.splice(0, 3);
    if (runs.length === 0) this.unsyncedQueries = 0;
  }

  /** A Parse or Close was sent since the last Sync and its reply is still owed. */
  get parseOrCloseOpen(): boolean {
    return this.unsyncedReplies.length > 0;
  }

  /**
   * The replies (ParseComplete 0x31, CloseComplete 0x33) the Parses and
   * Closes sent since the last Sync still owe, in order, each with the
   * number of ReadyForQuery that come after it before the open batch's own
   * (a Query or FunctionCall sent after it ends a batch, pgjdbc's
   * `SAVEPOINT` of autosave between a Close and a Parse).
   */
  unsyncedReplyTypes(): { type: number; batchesAfter: number }[] {
    const replies: { type: number; batchesAfter: number }[] = [];
    const runs = this.unsyncedReplies;
    for (let i = 0; i < runs.length; i += 3) {
      const type = runs[i] === P ? PARSE_COMPLETE : CLOSE_COMPLETE;
      const batchesAfter = this.unsyncedQueries - runs[i + 2]!;
      for (let n = runs[i + 1]!; n > 0; n -= 1) replies.push({ type, batchesAfter });
    }
    return replies;
  }

  /** True when the connection may be handed to another client. */
  get atBoundary(): boolean {
    return this.status === 'I' && this.pendingReady === 0 && !this.extendedOpen && this.copy === 'none' && !this.unexpectedReady;
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
    this.unsyncedReplies.length = 0;
    this.unsyncedQueries = 0;
    this.copy = 'none';
    this.unexpectedReady = false;
    this.watched = undefined;
  }
}
