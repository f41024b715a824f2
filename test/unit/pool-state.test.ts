/**
 * The server-connection state machine and the transaction-boundary tracker.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { InvalidTransitionError, SERVER_CONNECTION_STATES, TransactionTracker, holdsBackend, transition, type ServerConnectionState } from '../../src/core/pool-state/index.ts';

const code = (c: string): number => c.charCodeAt(0);

function client(t: TransactionTracker, types: string): void {
  for (const c of types) t.clientMessage(code(c));
}

function ready(t: TransactionTracker, status: 'I' | 'T' | 'E'): boolean {
  return t.serverMessage(code('Z'), code(status));
}

describe('server connection state machine', function () {
  it('allows the normal life: connecting, idle, active, idle, resetting, idle, closing, closed', function () {
    let s: ServerConnectionState = 'connecting';
    for (const to of ['idle', 'active', 'idle', 'resetting', 'idle', 'active', 'resetting', 'active', 'closing', 'closed'] as const) s = transition(s, to);
    assert.equal(s, 'closed');
  });

  it('throws on impossible transitions', function () {
    assert.throws(() => transition('closed', 'idle'), InvalidTransitionError);
    assert.throws(() => transition('closing', 'active'), InvalidTransitionError);
    assert.throws(() => transition('closing', 'idle'), InvalidTransitionError);
    assert.throws(() => transition('idle', 'connecting'), InvalidTransitionError);
    assert.throws(() => transition('active', 'active'), /cannot go from active to active/);
  });

  it('property: closed is terminal and reachable from every other state', function () {
    fc.assert(fc.property(fc.constantFrom(...SERVER_CONNECTION_STATES), fc.constantFrom(...SERVER_CONNECTION_STATES), (from, to) => {
      if (from === 'closed') assert.throws(() => transition(from, to), InvalidTransitionError);
      else assert.equal(transition(from, 'closed'), 'closed');
    }));
    assert.equal(holdsBackend('closing'), true);
    assert.equal(holdsBackend('closed'), false);
  });
});

describe('transaction tracker', function () {
  it('simple query in autocommit: boundary at ReadyForQuery I', function () {
    const t = new TransactionTracker();
    client(t, 'Q');
    assert.equal(t.atBoundary, false);
    for (const m of 'TDC') t.serverMessage(code(m));
    assert.equal(ready(t, 'I'), true);
  });

  it('explicit transaction: T keeps the connection, E keeps it, I releases it', function () {
    const t = new TransactionTracker();
    client(t, 'Q');
    assert.equal(ready(t, 'T'), false);
    assert.equal(t.inTransaction, true);
    client(t, 'Q');
    t.serverMessage(code('E'));
    assert.equal(ready(t, 'E'), false);
    client(t, 'Q'); // ROLLBACK
    assert.equal(ready(t, 'I'), true);
  });

  it('extended protocol: nothing is releasable until the Sync has been answered', function () {
    const t = new TransactionTracker();
    client(t, 'PBDE');
    assert.equal(t.atBoundary, false);
    client(t, 'H'); // Flush does not close the batch
    for (const m of '12TDC') t.serverMessage(code(m));
    assert.equal(t.atBoundary, false);
    client(t, 'S');
    assert.equal(ready(t, 'I'), true);
  });

  it('pipelined syncs: one ReadyForQuery per Sync; boundary only after the last', function () {
    const t = new TransactionTracker();
    client(t, 'PBESPBESBES');
    assert.equal(t.pendingReady, 3);
    assert.equal(ready(t, 'I'), false);
    assert.equal(ready(t, 'I'), false);
    assert.equal(ready(t, 'I'), true);
  });

  it('error in a pipeline: server skips to Sync, answers one ReadyForQuery', function () {
    const t = new TransactionTracker();
    client(t, 'PBES');
    t.serverMessage(code('E'));
    assert.equal(ready(t, 'I'), true);
  });

  it('owed ParseComplete/CloseComplete of the unsynced batch: each with the ReadyForQuery that come after it before the open batch\'s own', function () {
    const t = new TransactionTracker();
    // pgjdbc with autosave: Close of a portal, SAVEPOINT as a simple Query, then a Parse (before any Sync).
    client(t, 'CQP');
    assert.deepEqual(t.unsyncedReplyTypes(), [{ type: 0x33, batchesAfter: 1 }, { type: 0x31, batchesAfter: 0 }]);
    client(t, 'PQ');
    assert.deepEqual(t.unsyncedReplyTypes().map((r) => r.batchesAfter), [2, 1, 1]);
    t.serverMessage(code('3'));
    assert.deepEqual(t.unsyncedReplyTypes(), [{ type: 0x31, batchesAfter: 1 }, { type: 0x31, batchesAfter: 1 }]);
    client(t, 'S');
    assert.deepEqual(t.unsyncedReplyTypes(), []);
  });

  it('COPY FROM STDIN: not releasable while copying, boundary after CopyDone and ReadyForQuery', function () {
    const t = new TransactionTracker();
    client(t, 'Q');
    t.serverMessage(code('G'));
    assert.equal(t.copy, 'in');
    client(t, 'ddd');
    assert.equal(t.atBoundary, false);
    client(t, 'c');
    t.serverMessage(code('C'));
    assert.equal(ready(t, 'I'), true);
  });

  it('COPY TO STDOUT: copy state ends with the server CopyDone', function () {
    const t = new TransactionTracker();
    client(t, 'Q');
    t.serverMessage(code('H'));
    assert.equal(t.copy, 'out');
    t.serverMessage(code('d'));
    t.serverMessage(code('c'));
    assert.equal(t.copy, 'none');
    t.serverMessage(code('C'));
    assert.equal(ready(t, 'I'), true);
  });

  it('decides a watched SET at its first ReadyForQuery: ran, not run, or uncertain when an error or a transaction block followed it', function () {
    const outcome = (replies: string, status: 'I' | 'T' | 'E'): string | undefined => {
      const t = new TransactionTracker();
      t.watch();
      client(t, 'Q');
      for (const r of replies) {
        if (r === 'C') t.commandCompleted();
        else t.serverMessage(code(r));
      }
      ready(t, status);
      // A later batch does not change it.
      client(t, 'Q');
      t.serverMessage(code('E'));
      ready(t, 'I');
      return t.watched;
    };
    assert.equal(outcome('C', 'I'), 'ran');
    assert.equal(outcome('E', 'I'), 'not-run', 'the SET failed');
    assert.equal(outcome('', 'I'), 'not-run', 'Parse and Describe only');
    assert.equal(outcome('CE', 'I'), 'uncertain', 'a later statement of the batch failed: rolled back, or not if a COMMIT came between');
    assert.equal(outcome('CC', 'T'), 'uncertain', 'a BEGIN came after it');
    // Inside a transaction block: decided when the block ends, by how it ends.
    const block = (after: (t: TransactionTracker) => void): string | undefined => {
      const t = new TransactionTracker();
      t.watch();
      client(t, 'Q');
      t.commandCompleted();
      ready(t, 'T');
      assert.equal(t.watched, 'running', 'still inside the block');
      after(t);
      return t.watched;
    };
    const commit = (t: TransactionTracker, rollback = false): void => {
      client(t, 'Q');
      t.commandCompleted(rollback);
      ready(t, 'I');
    };
    assert.equal(block((t) => commit(t)), 'ran', 'COMMIT');
    assert.equal(block((t) => commit(t, true)), 'not-run', 'ROLLBACK (or COMMIT of a failed block) took it with it');
    assert.equal(block((t) => {
      client(t, 'Q');
      t.commandCompleted(true);
      ready(t, 'T');
      commit(t);
    }), 'uncertain', 'ROLLBACK TO SAVEPOINT, then COMMIT: it may be undone');
    // Behind one query still owed: that query's error and ReadyForQuery are not the SET's.
    const piped = new TransactionTracker();
    piped.watch(1);
    client(piped, 'QQ');
    piped.serverMessage(code('E'));
    ready(piped, 'I');
    assert.equal(piped.watched, 'running');
    piped.commandCompleted();
    ready(piped, 'I');
    assert.equal(piped.watched, 'ran');
    const fresh = new TransactionTracker();
    fresh.watch();
    fresh.reset();
    assert.equal(fresh.watched, undefined, 'a connection handed out again watches nothing');
  });

  it('an unsolicited ReadyForQuery makes the connection non-reusable', function () {
    const t = new TransactionTracker();
    assert.equal(ready(t, 'I'), false);
    assert.equal(t.unexpectedReady, true);
    t.reset();
    assert.equal(t.atBoundary, true);
  });

  it('property: after any client batch ending in Sync and all its ReadyForQuery I, the connection is at a boundary', function () {
    fc.assert(fc.property(fc.array(fc.constantFrom('P', 'B', 'E', 'D', 'C', 'H', 'S', 'Q'), { maxLength: 30 }), (types) => {
      const t = new TransactionTracker();
      client(t, [...types, 'S'].join(''));
      const owed = t.pendingReady;
      for (let i = 0; i < owed; i += 1) assert.equal(ready(t, 'I'), i === owed - 1);
    }));
  });
});
