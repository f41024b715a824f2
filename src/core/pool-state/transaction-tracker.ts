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
const COPY_FAIL = 0x66;
const COPY_IN_RESPONSE = 0x47;
const COPY_OUT_RESPONSE = 0x48;
const COPY_BOTH_RESPONSE = 0x57;
const READY_FOR_QUERY = 0x5a;
const ERROR_RESPONSE = 0x45;
const I_BYTE = 0x49;
const T_BYTE = 0x54;

/** Tracks transaction boundaries of one server connection. */
export class TransactionTracker {
  /** Status from the latest ReadyForQuery. */
  status: ReadyStatus = 'I';
  /** ReadyForQuery messages still owed by the server. */
  pendingReady = 0;
  /** Extended-protocol messages sent since the last Sync. */
  extendedOpen = false;
  /** A Parse or Close was sent since the last Sync (its reply may still be owed). */
  parseOrCloseOpen = false;
  /** COPY in progress. */
  copy: CopyState = 'none';
  /** A ReadyForQuery arrived that nothing asked for (a protocol bug on one side). */
  unexpectedReady = false;

  /** Records a frontend message forwarded to the server. */
  clientMessage(type: number): void {
    switch (type) {
      case Q:
      case F:
        this.pendingReady += 1;
        return;
      case S:
        this.pendingReady += 1;
        this.extendedOpen = false;
        this.parseOrCloseOpen = false;
        return;
      case P:
      case C:
        this.extendedOpen = true;
        this.parseOrCloseOpen = true;
        return;
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
        return this.atBoundary;
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
        return false;
      default:
        return false;
    }
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
    this.parseOrCloseOpen = false;
    this.copy = 'none';
    this.unexpectedReady = false;
  }
}
