/**
 * The answer to a cancel of messages still waiting for a server connection:
 * PostgreSQL's error for a cancelled statement and what one held batch owes,
 * or nothing where that answer is not known.
 */
import assert from 'node:assert/strict';
import { FrameReader, QUERY_CANCELED_ERROR, cancelledBatchReply, parseNoticeFields } from '../../src/core/protocol/index.ts';

/** Types of the messages, one letter each. */
const types = (letters: string): number[] => [...letters].map((c) => c.charCodeAt(0));

/** The reply's messages: type letters (ReadyForQuery with its status) and the fields of its ErrorResponse. */
function read(reply: Buffer): { types: string; error: Record<string, string> | undefined } {
  const reader = new FrameReader();
  reader.push(reply);
  let seen = '';
  let error: Record<string, string> | undefined;
  while (reader.next()) {
    const type = String.fromCharCode(reader.type);
    const body = reader.buffer.subarray(reader.bodyStart, reader.end);
    seen += type === 'Z' ? `Z${body.toString()}` : type;
    if (type === 'E') error = parseNoticeFields(Buffer.from(body));
  }
  return { types: seen, error };
}

describe('cancelledBatchReply', function () {
  it('sends PostgreSQL\'s fields for a statement a CancelRequest cancelled', function () {
    assert.deepEqual(read(QUERY_CANCELED_ERROR).error, {
      S: 'ERROR', V: 'ERROR', C: '57014', M: 'canceling statement due to user request', F: 'postgres.c', L: '3349', R: 'ProcessInterrupts',
    });
  });

  it('answers one simple Query or FunctionCall with the error and ReadyForQuery idle', function () {
    for (const held of ['Q', 'F']) assert.equal(read(cancelledBatchReply(types(held))!).types, 'EZI', held);
  });

  it('answers one extended batch ending in its Sync with the error and that Sync\'s ReadyForQuery (the rest is discarded)', function () {
    for (const held of ['PBDES', 'BES', 'PDS', 'PBDEHS', 'CPBES', 'PBEPBES']) {
      assert.equal(read(cancelledBatchReply(types(held))!).types, 'EZI', held);
    }
  });

  it('leaves alone what is not one batch it can answer as PostgreSQL would', function () {
    const cases: Record<string, string> = {
      '': 'nothing held',
      QQ: 'two simple Queries pipelined: the second runs after the first is cancelled',
      PBESPBES: 'two Syncs: the second batch runs after the first',
      QPBES: 'a Query, then a batch',
      PBESQ: 'a batch, then a Query',
      PBE: 'no Sync yet: the batch may go on',
      PBEH: 'Flush without Sync',
      S: 'a Sync alone: no statement to cancel',
      DS: 'a Describe alone: nothing a cancel stops direct',
      CS: 'a Close alone',
      PBEdS: 'COPY data in the batch',
      cS: 'CopyDone',
      fS: 'CopyFail',
      d: 'CopyData alone',
      FQ: 'a FunctionCall, then a Query',
    };
    for (const [held, why] of Object.entries(cases)) assert.equal(cancelledBatchReply(types(held)), undefined, why);
  });
});
