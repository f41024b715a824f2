/**
 * The answer to a CancelRequest for a statement that never reached a server
 * connection (it waits in the sidecar for one): what PostgreSQL sends for a
 * statement it cancels, for the held messages it can be told exactly.
 */
import { MessageType } from './frames.ts';
import { errorResponse, readyForQuery } from './server-messages.ts';

/**
 * PostgreSQL's error for a statement cancelled by a CancelRequest
 * (ProcessInterrupts in postgres.c), with the fields it sends; the line is
 * that of PostgreSQL 15.18 (the version the tests compare with).
 */
export const QUERY_CANCELED_ERROR = errorResponse({
  severity: 'ERROR', code: '57014', message: 'canceling statement due to user request', file: 'postgres.c', line: '3349', routine: 'ProcessInterrupts',
});

/** Messages of an extended-protocol batch before its Sync. */
const EXTENDED = new Set<number>([MessageType.parse, MessageType.bind, MessageType.describe, MessageType.execute, MessageType.close, MessageType.flush]);
/** Those of them that run a statement (or prepare one): a batch of none of these has nothing a cancel would stop. */
const RUNS = new Set<number>([MessageType.parse, MessageType.bind, MessageType.execute]);

/**
 * What PostgreSQL would answer held messages (their types, in order) whose
 * statement a CancelRequest cancelled at its first message, or undefined
 * where that answer is not one batch's: one simple Query (or FunctionCall)
 * gets the error and ReadyForQuery; one extended batch ending in its Sync
 * gets the error, its other messages are discarded up to that Sync, which
 * gets ReadyForQuery. Anything else is undefined, and the caller lets the
 * cancel reach the statement once it runs instead: several batches
 * pipelined, a batch whose Sync has not come, one with no Parse, Bind or
 * Execute (a cancel direct would not stop it either), COPY messages. The
 * status is idle: messages wait for a server connection only between
 * transactions (a client in a transaction block keeps its own).
 */
export function cancelledBatchReply(types: readonly number[]): Buffer | undefined {
  const count = types.length;
  if (count === 0) return undefined;
  if (count === 1 && (types[0] === MessageType.query || types[0] === MessageType.functionCall)) return CANCELLED_IDLE;
  if (types[count - 1] !== MessageType.sync) return undefined;
  let runs = false;
  for (let i = 0; i < count - 1; i++) {
    const type = types[i]!;
    if (!EXTENDED.has(type)) return undefined;
    if (RUNS.has(type)) runs = true;
  }
  return runs ? CANCELLED_IDLE : undefined;
}

const CANCELLED_IDLE = Buffer.concat([QUERY_CANCELED_ERROR, readyForQuery('I')]);
