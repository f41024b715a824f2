/**
 * The server-connection state machine, the transaction-boundary tracker, and
 * the outcome of commands PostgreSQL applies at commit.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { InvalidTransitionError, SERVER_CONNECTION_STATES, SERVER_CONNECTION_TRANSITIONS, TransactionTracker, holdsBackend, outcomeAfter, transition, type CommandOutcome, type OutcomeEvent, type ServerConnectionState } from '../../src/core/pool-state/index.ts';

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

  it('allows exactly the changes of its table, each of the 36 pairs', function () {
    for (const from of SERVER_CONNECTION_STATES) {
      for (const to of SERVER_CONNECTION_STATES) {
        if (SERVER_CONNECTION_TRANSITIONS[from].includes(to)) assert.equal(transition(from, to), to, `${from} -> ${to}`);
        else assert.throws(() => transition(from, to), InvalidTransitionError, `${from} -> ${to}`);
      }
    }
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

  /** Replies as the tracker gets them: CommandComplete through commandCompleted, ReadyForQuery with status I. Returns the last ReadyForQuery's boundary. */
  function server(t: TransactionTracker, types: string): boolean {
    let boundary = false;
    for (const m of types) {
      if (m === 'C') t.commandCompleted();
      else if (m === 'Z') boundary = ready(t, 'I');
      else t.serverMessage(code(m));
    }
    return boundary;
  }

  it('a Query after a failed extended message, before the Sync: the server skips it, one ReadyForQuery ends both batches', function () {
    // The Parse fails.
    const t = new TransactionTracker();
    client(t, 'PBEQS');
    assert.equal(t.pendingReady, 2);
    server(t, 'E');
    assert.equal(t.pendingReady, 1, 'the Query\'s ReadyForQuery will not come');
    assert.equal(t.batchesOwed, 2);
    assert.equal(server(t, 'Z'), true);
    assert.equal(t.readyBatches, 2);
    assert.equal(t.batchesOwed, 0);
    // The Bind fails, the Execute after some rows; several Queries skipped; a FunctionCall too.
    for (const [replies, batches] of [['1E', 3], ['12DDE', 3]] as const) {
      const u = new TransactionTracker();
      client(u, 'PBEQFS');
      assert.equal(server(u, replies), false);
      assert.equal(u.pendingReady, 1);
      assert.equal(server(u, 'Z'), true, replies);
      assert.equal(u.readyBatches, batches);
    }
    // The error came before the Query was sent: the Query is skipped as it goes.
    const late = new TransactionTracker();
    client(late, 'PBE');
    server(late, 'E');
    assert.equal(late.skipping, true);
    client(late, 'QQ');
    assert.equal(late.pendingReady, 0);
    assert.equal(late.batchesOwed, 2);
    assert.equal(late.atBoundary, false, 'no Sync yet');
    client(late, 'PBES');
    assert.equal(late.skipping, false);
    assert.equal(server(late, 'Z'), true);
    assert.equal(late.readyBatches, 3);
    // After the Sync's ReadyForQuery all is normal again.
    client(late, 'Q');
    assert.equal(server(late, 'TDCZ'), true);
    assert.equal(late.readyBatches, 1);
  });

  it('a failed simple Query skips nothing: each Query and Sync still gets its ReadyForQuery', function () {
    // The Query fails before the extended messages after it are answered.
    const t = new TransactionTracker();
    client(t, 'QPBES');
    server(t, 'TDE');
    assert.equal(t.pendingReady, 2);
    assert.equal(server(t, 'Z'), false);
    assert.equal(server(t, '12C'), false);
    assert.equal(server(t, 'Z'), true);
    // A Query after the Sync of a failed batch: its own ReadyForQuery.
    const u = new TransactionTracker();
    client(u, 'PBESQ');
    server(u, 'E');
    assert.equal(u.pendingReady, 2);
    assert.equal(server(u, 'Z'), false);
    assert.equal(server(u, 'CZ'), true, 'the Query ran: CommandComplete, ReadyForQuery');
    // A Query that fails between two extended batches, each with a Sync.
    const v = new TransactionTracker();
    client(v, 'PBESQPBES');
    server(v, '12CZ');
    server(v, 'E');
    assert.equal(v.pendingReady, 2);
    server(v, 'Z12C');
    assert.equal(server(v, 'Z'), true);
    // An error at Sync (a deferred constraint at commit) skips nothing either.
    const w = new TransactionTracker();
    client(w, 'PBESQ');
    server(w, '12CE');
    assert.equal(w.pendingReady, 2);
    server(w, 'Z');
    assert.equal(server(w, 'CZ'), true);
  });

  it('counts the last reply of each extended message: Describe (ParameterDescription, RowDescription or NoData), empty query, suspended portal', function () {
    // Every extended message answered, then the Query fails: nothing skipped.
    const t = new TransactionTracker();
    client(t, 'PDBDEPDBEBEQS');
    server(t, '1tT2TD' + 'C' + '1tn2I' + '2s' + 'E');
    assert.equal(t.pendingReady, 2, 'the error is the Query\'s');
    server(t, 'Z');
    assert.equal(server(t, 'Z'), true);
    // The same, one reply short: the error is the last Execute's, and the Query is skipped.
    const u = new TransactionTracker();
    client(u, 'PDBDEPDBEBEQS');
    server(u, '1tT2TD' + 'C' + '1tn2I' + '2' + 'E');
    assert.equal(u.pendingReady, 1);
    assert.equal(server(u, 'Z'), true);
  });

  it('property: random pipelines with random failures and COPY FROM STDIN sent in any order, replies arriving at any time, against a model of PostgreSQL\'s skip-to-Sync rule', function () {
    /** A message the client sends; `copy`: a Query or Execute that is a COPY FROM STDIN; `fail`: for CopyData and CopyDone, the COPY fails on reading it. */
    type Sent = { type: string; fail: boolean; variant: number; copy?: boolean };
    /** A backend reply: the message it answers (the one whose reading made the server send it); for ReadyForQuery, the client batches it ends; for a COPY's error, from which message on a Sync among its data makes the ReadyForQuery count unknowable. */
    type Reply = { type: string; from: number; batches: number; lostFrom?: number };
    /**
     * PostgreSQL as postgres.c and copyfromparse.c answer (checked against a
     * real server, every order of COPY messages): after an error in an
     * extended message, everything until Sync is discarded; a COPY FROM STDIN
     * reads the messages after its Query or Execute until CopyDone or
     * CopyFail, ignoring Sync and Flush, and ends at the first error; CopyData,
     * CopyDone and CopyFail outside a COPY are ignored (the batch of a Sync
     * a COPY read ends with the next ReadyForQuery). Also: whether the
     * server discards until Sync after each message, and whether a COPY
     * begun by a Query (whose ReadyForQuery comes after the COPY) then runs.
     */
    const backend = (messages: Sent[]): { replies: Reply[]; ignoringAfter: boolean[]; queryCopyingAfter: boolean[] } => {
      const replies: Reply[] = [];
      const ignoringAfter: boolean[] = [];
      const queryCopyingAfter: boolean[] = [];
      let ignoring = false;
      let skipped = 0;
      let copying: { by: string; from: number; lostFrom: number } | undefined;
      const step = ({ type, fail, variant, copy }: Sent, from: number): void => {
        const reply = (types: string, extra: Partial<Reply> = {}): void => {
          for (const r of types) replies.push({ type: r, from, batches: r === 'Z' ? 1 + skipped : 0, ...extra });
          if (types.includes('Z')) skipped = 0;
        };
        if (copying !== undefined) {
          const by = copying.by;
          if (type === 'c' && !fail) reply(by === 'Q' ? 'CZ' : 'C');
          else if (type === 'f' || (type === 'c' || type === 'd') && fail) {
            reply('E', { lostFrom: copying.lostFrom });
            if (by === 'Q') reply('Z');
            ignoring = by === 'E';
          } else {
            // A Sync the COPY reads gets no ReadyForQuery: the next one ends its batch.
            if (type === 'S') skipped += 1;
            return;
          }
          copying = undefined;
          return;
        }
        if (ignoring && type !== 'S') {
          if (type === 'Q' || type === 'F') skipped += 1;
          return;
        }
        if (copy === true && !fail) {
          reply('G');
          // The first Sync after the first CopyData, up to the COPY's end.
          let lostFrom = Infinity;
          let data = false;
          for (let i = from + 1; i < messages.length && !'cf'.includes(messages[i]!.type); i += 1) {
            if (messages[i]!.type === 'd') data = true;
            else if (messages[i]!.type === 'S' && data) {
              lostFrom = i;
              break;
            }
          }
          copying = { by: type, from, lostFrom };
          return;
        }
        switch (type) {
          case 'S':
            ignoring = false;
            reply(fail ? 'EZ' : 'Z');
            return;
          case 'Q':
            reply(fail ? ['E', 'TDE', 'CE'][variant % 3]! + 'Z' : ['TDDCZ', 'IZ', 'CCZ'][variant % 3]!);
            return;
          case 'F':
            reply(fail ? 'EZ' : 'VZ');
            return;
          case 'H':
          case 'd':
          case 'c':
          case 'f':
            return;
          default:
        }
        if (fail) {
          reply(type === 'E' && variant % 2 === 1 ? 'DDE' : 'E');
          ignoring = true;
          return;
        }
        switch (type) {
          case 'P': reply('1'); return;
          case 'B': reply('2'); return;
          case 'C': reply('3'); return;
          case 'D': reply(['tT', 'tn', 'T', 'n'][variant % 4]!); return;
          case 'E': reply(['DDC', 'C', 'I', 'Ds'][variant % 4]!); return;
          default:
        }
      };
      messages.forEach((m, from) => {
        step(m, from);
        ignoringAfter.push(ignoring);
        queryCopyingAfter.push(copying?.by === 'Q');
      });
      return { replies, ignoringAfter, queryCopyingAfter };
    };
    const rare = (n: number): fc.Arbitrary<boolean> => fc.integer({ min: 0, max: n }).map((i) => i === 0);
    const messageArb = fc.record({
      type: fc.constantFrom('P', 'B', 'D', 'E', 'C', 'Q', 'F', 'S', 'H', 'P', 'B', 'E', 'S', 'd', 'c', 'f'),
      fail: rare(5),
      variant: fc.nat(3),
    }).map((m): Sent[] => [m]);
    // A COPY FROM STDIN by a Query or by Parse, Bind, Execute: its data, Syncs and Flushes in any order, then CopyDone or CopyFail.
    const copyArb = fc.record({
      by: fc.constantFrom('Q', 'E'),
      startFails: rare(5),
      body: fc.array(fc.record({ type: fc.constantFrom('d', 'd', 'S', 'H'), fail: rare(4) }), { maxLength: 5 }),
      end: fc.constantFrom('c', 'c', 'f'),
      endFails: rare(4),
    }).map(({ by, startFails, body, end, endFails }): Sent[] => [
      ...(by === 'E' ? [{ type: 'P', fail: false, variant: 0 }, { type: 'B', fail: false, variant: 0 }] : []),
      { type: by, fail: startFails, variant: 0, copy: true },
      ...body.map((m) => ({ type: m.type, fail: m.type === 'd' && m.fail, variant: 0 })),
      { type: end, fail: end === 'c' && endFails, variant: 0 },
    ]);
    const bodyArb = fc.array(fc.oneof({ arbitrary: messageArb, weight: 6 }, { arbitrary: copyArb, weight: 1 }), { maxLength: 24 }).map((items) => items.flat());
    const show = (messages: Sent[]): string => messages.map((m) => (m.copy === true ? 'copy-' : '') + m.type + (m.fail ? '!' : '')).join(' ');
    fc.assert(fc.property(bodyArb, fc.array(fc.boolean(), { maxLength: 100 }), (body, schedule) => {
      const messages = [...body, { type: 'S', fail: false, variant: 0 }];
      const { replies, ignoringAfter, queryCopyingAfter } = backend(messages);
      const t = new TransactionTracker();
      let sent = 0;
      let delivered = 0;
      // A COPY failed after Syncs among its data had been sent: how many it read, no reply tells.
      let lost = false;
      const send = (): void => {
        t.clientMessage(code(messages[sent]!.type));
        sent += 1;
      };
      const deliver = (): void => {
        const r = replies[delivered]!;
        delivered += 1;
        if (r.lostFrom !== undefined && sent > r.lostFrom) lost = true;
        if (r.type === 'C') t.commandCompleted();
        else if (r.type === 'Z') {
          ready(t, 'I');
          if (!lost) assert.equal(t.readyBatches, r.batches, 'batches ended by this ReadyForQuery');
        } else t.serverMessage(code(r.type));
        assert.equal(t.readyCountLost, lost, `count lost after ${show(messages.slice(0, sent))}`);
      };
      const check = (): void => {
        const produced = replies.filter((r) => r.from < sent);
        // Never handed on while the server still owes replies to what was sent.
        if (t.atBoundary) assert.equal(delivered, produced.length, `at a boundary with replies owed after ${show(messages.slice(0, sent))}`);
        if (lost) return;
        const owedZ = produced.slice(delivered).filter((r) => r.type === 'Z').length;
        // (Until a COPY with Syncs among its data fails, its Syncs are taken as read.)
        const uncertain = produced.slice(delivered).some((r) => r.lostFrom !== undefined && sent > r.lostFrom);
        if (!uncertain) assert.ok(t.pendingReady >= owedZ, `never fewer ReadyForQuery expected than will come, after ${show(messages.slice(0, sent))}`);
        if (delivered === produced.length) {
          // Caught up: the server has answered everything it got; nothing more is owed until more is sent (but a COPY's Query).
          assert.equal(t.pendingReady, sent > 0 && queryCopyingAfter[sent - 1]! ? 1 : 0, `caught up after ${show(messages.slice(0, sent))}`);
          assert.deepEqual(t.unsyncedReplyTypes(), []);
          assert.equal(t.skipping, sent > 0 && ignoringAfter[sent - 1]!, `skipping after ${show(messages.slice(0, sent))}`);
        }
      };
      for (const step of schedule) {
        const canDeliver = delivered < replies.length && replies[delivered]!.from < sent;
        if ((step || !canDeliver) && sent < messages.length) send();
        else if (canDeliver) deliver();
        check();
      }
      while (sent < messages.length) {
        send();
        check();
      }
      while (delivered < replies.length) {
        deliver();
        check();
      }
      assert.equal(t.atBoundary, !lost, show(messages));
      if (!lost) assert.equal(t.batchesOwed, 0);
    }), { numRuns: 4000 });
  });

  it('a pipeline kept full for ever: the queue of owed replies stays bounded, in place', function () {
    const t = new TransactionTracker();
    const inFlight = 40;
    for (let i = 0; i < inFlight; i += 1) client(t, 'PBEQS');
    for (let i = 0; i < 5000; i += 1) {
      client(t, 'PBEQS');
      // The oldest batch: every seventh fails at its Parse, and its Query is skipped.
      if (i % 7 === 0) {
        server(t, 'E');
        assert.equal(server(t, 'Z'), false);
        assert.equal(t.readyBatches, 2);
      } else {
        server(t, '12DCCZ');
        assert.equal(t.readyBatches, 1);
        server(t, 'Z');
      }
      assert.equal(t.pendingReady, 2 * inFlight);
    }
    assert.ok((t as unknown as { owed: number[] }).owed.length < 4 * 8 * (inFlight + 1), 'the queue array grew without bound');
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

  it('COPY FROM STDIN by Execute: the Syncs the COPY reads are ignored (libpq sends one after the Execute, another after CopyDone)', function () {
    const t = new TransactionTracker();
    client(t, 'PBES');
    server(t, '12G');
    assert.equal(t.pendingReady, 0, 'the Sync sent with the Execute is read by the COPY');
    assert.equal(t.atBoundary, false);
    client(t, 'dddS');
    assert.equal(t.pendingReady, 0, 'nor one sent during the COPY');
    client(t, 'cS');
    assert.equal(t.pendingReady, 1);
    assert.equal(server(t, 'C'), false);
    assert.equal(server(t, 'Z'), true);
    // Bad data: the COPY fails, the server skips to the Sync after CopyDone.
    const bad = new TransactionTracker();
    client(bad, 'PBES');
    server(bad, '12G');
    client(bad, 'dd');
    server(bad, 'E');
    assert.equal(bad.copy, 'none');
    client(bad, 'cS');
    assert.equal(server(bad, 'Z'), true);
    // The error comes once CopyDone and the Sync are sent.
    const late = new TransactionTracker();
    client(late, 'PBES');
    server(late, '12G');
    client(late, 'dcS');
    server(late, 'E');
    assert.equal(server(late, 'Z'), true);
    // A simple Query's COPY with other Queries pipelined behind it: they are not Syncs, each has its ReadyForQuery.
    const simple = new TransactionTracker();
    client(simple, 'QQ');
    server(simple, 'G');
    client(simple, 'dc');
    server(simple, 'CZ');
    assert.equal(simple.pendingReady, 1);
    assert.equal(server(simple, 'TDCZ'), true);
  });

  it('COPY FROM STDIN sent whole before its CopyInResponse: the Syncs up to its CopyDone or CopyFail are read by it, those after get their ReadyForQuery (as a real server answers each order)', function () {
    // Client messages (d: CopyData, c: CopyDone, f: CopyFail), then the server's replies to them all.
    const cases: [string, string, string][] = [
      ['PBESdcS', '12GCZ', 'libpq\'s order, all at once'],
      ['PBEdcS', '12GCZ', 'no Sync after the Execute'],
      ['PBESdfS', '12GEZ', 'CopyFail'],
      ['PBESddcS', '12GEZ', 'bad data (the error comes after the first CopyData)'],
      ['PBESdcSS', '12GCZZ', 'two Syncs after CopyDone'],
      ['PBESdcPBESdcS', '12GC12GCZ', 'two COPYs in one batch'],
      ['PBESdcSPBESdcS', '12GCZ12GCZ', 'two COPYs, each with its Sync'],
      ['PBESdSdcS', '12GCZ', 'a Sync among the data of a COPY that succeeds'],
      ['QdcS', 'GCZZ', 'a simple Query\'s COPY, a Sync after it'],
      ['QdfS', 'GEZZ', 'a simple Query\'s COPY failed by the client'],
      ['PBESdcS', '12EZZ', 'the COPY fails before it begins: the server discards to the first Sync, the rest runs'],
    ];
    for (const [sent, replies, name] of cases) {
      const t = new TransactionTracker();
      client(t, sent);
      const last = replies.lastIndexOf('Z');
      for (const [i, r] of [...replies].entries()) {
        const boundary = server(t, r);
        if (r === 'Z') assert.equal(boundary, i === last, `${name}: ReadyForQuery ${i}`);
      }
      assert.equal(t.atBoundary, true, name);
      assert.equal(t.readyCountLost, false, name);
    }
    // A failed COPY (by the client's CopyFail) skips the Query after it to the Sync, as an error in an Execute does.
    const skips = new TransactionTracker();
    client(skips, 'PBESdfQS');
    server(skips, '12GE');
    assert.equal(server(skips, 'Z'), true);
    // The batches of the Sync the COPY read, of the Query skipped and of the last Sync.
    assert.equal(skips.readyBatches, 3);
    // A COPY's ReadyForQuery ends the batch of the Sync sent after its Execute too (libpq, tokio-postgres).
    const copied = new TransactionTracker();
    client(copied, 'PBESdcSCS');
    assert.equal(copied.batchesOwed, 3);
    server(copied, '12G');
    assert.equal(copied.batchesOwed, 3, 'the Sync the COPY read ends its batch with the next ReadyForQuery');
    server(copied, 'CZ');
    assert.equal(copied.readyBatches, 2);
    assert.equal(copied.batchesOwed, 1);
    assert.equal(server(copied, '3Z'), true);
    assert.equal(copied.readyBatches, 1);
    // The CopyDone came before the CopyInResponse: the COPY waits for nothing more from the client.
    const done = new TransactionTracker();
    client(done, 'PBEdc');
    server(done, '12G');
    assert.equal(done.copy, 'none');
    assert.equal(done.atBoundary, false, 'the batch is open until a Sync');
    server(done, 'C');
    client(done, 'S');
    assert.equal(server(done, 'Z'), true);
  });

  it('a COPY FROM STDIN that fails with Syncs sent among its data: how many it read before failing no reply tells, so the connection is never at a boundary again', function () {
    // A real server answers the same messages with one ReadyForQuery when the COPY fails at CopyDone (a unique
    // violation found when the rows are flushed), two when it fails at the first CopyData (bad data).
    for (const replies of ['12GEZ', '12GEZZ']) {
      const t = new TransactionTracker();
      client(t, 'PBESdSdcS');
      for (const r of replies) assert.equal(server(t, r), false, replies);
      assert.equal(t.readyCountLost, true);
    }
    // Sent after the CopyInResponse, the same.
    const after = new TransactionTracker();
    client(after, 'PBES');
    server(after, '12G');
    client(after, 'dSdcS');
    server(after, 'EZ');
    assert.equal(after.readyCountLost, true);
    assert.equal(after.atBoundary, false);
    // A Sync before the first CopyData (libpq's, after the Execute) is read whatever the COPY does.
    const libpq = new TransactionTracker();
    client(libpq, 'PBESSHdcS');
    assert.equal(server(libpq, '12GEZ'), true);
    // As is a Sync sent after the error came.
    const late = new TransactionTracker();
    client(late, 'PBES');
    server(late, '12G');
    client(late, 'd');
    server(late, 'E');
    client(late, 'SdcS');
    assert.equal(server(late, 'Z'), false);
    assert.equal(server(late, 'Z'), true);
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
    // A SET Query skipped after an error in an extended message before it: not run, decided at the Sync's ReadyForQuery.
    for (const errorFirst of [false, true]) {
      const skipped = new TransactionTracker();
      client(skipped, 'PBE');
      if (errorFirst) skipped.serverMessage(code('E'));
      skipped.watch(skipped.batchesOwed);
      client(skipped, 'QS');
      if (!errorFirst) skipped.serverMessage(code('E'));
      assert.equal(skipped.watched, 'running');
      ready(skipped, 'I');
      assert.equal(skipped.watched, 'not-run', errorFirst ? 'error came first' : 'error came after');
    }
    // Behind a skipped Query, in the batch after the Sync that ended it: watched on.
    const later = new TransactionTracker();
    client(later, 'PBEQS');
    later.watch(later.batchesOwed);
    client(later, 'Q');
    later.serverMessage(code('E'));
    ready(later, 'I');
    assert.equal(later.watched, 'running', 'two batches ended, the watched one is the third');
    later.commandCompleted();
    ready(later, 'I');
    assert.equal(later.watched, 'ran');
    const fresh = new TransactionTracker();
    fresh.watch();
    fresh.reset();
    assert.equal(fresh.watched, undefined, 'a connection handed out again watches nothing');
  });

  it('an unsolicited ReadyForQuery makes the connection non-reusable', function () {
    const t = new TransactionTracker();
    assert.equal(ready(t, 'I'), false);
    assert.equal(t.readyCountLost, true);
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

describe('outcome of a command applied at commit (RESET, UNLISTEN)', function () {
  /** The server's reports after the command, and what is known when the transaction ends. */
  const rows: Array<[string, OutcomeEvent[], CommandOutcome]> = [
    ['committed: nothing after it', [], 'clean'],
    ['more commands, then COMMIT', ['command', 'command'], 'clean'],
    ['a ROLLBACK ends the transaction', ['rollback'], 'rolled-back'],
    ['an error, then the ROLLBACK a failed block needs', ['error', 'rollback'], 'rolled-back'],
    ['an error, then COMMIT (PostgreSQL rolls back, the tag says ROLLBACK)', ['error', 'rollback'], 'rolled-back'],
    ['a ROLLBACK TO SAVEPOINT, then more commands', ['rollback', 'command'], 'doubtful'],
    ['an error that a ROLLBACK TO SAVEPOINT recovers, then COMMIT', ['error', 'rollback', 'command'], 'doubtful'],
    ['an error in a pipeline, nothing after it', ['error'], 'doubtful'],
    ['a ROLLBACK TO SAVEPOINT, more commands, then ROLLBACK', ['rollback', 'command', 'rollback'], 'rolled-back'],
  ];
  for (const [name, events, expected] of rows) {
    it(`${name}: ${expected}`, function () {
      let outcome: CommandOutcome | undefined = 'clean';
      for (const event of events) outcome = outcomeAfter(outcome, event);
      assert.equal(outcome, expected);
    });
  }

  it('no such command in the transaction: stays unknown whatever comes', function () {
    for (const event of ['error', 'rollback', 'command'] as const) assert.equal(outcomeAfter(undefined, event), undefined);
  });

  it('an error always leaves it doubtful, and only a later ROLLBACK settles it', function () {
    fc.assert(fc.property(fc.array(fc.constantFrom<OutcomeEvent>('error', 'rollback', 'command')), (events) => {
      let outcome: CommandOutcome | undefined = 'clean';
      for (const event of events) outcome = outcomeAfter(outcome, event);
      const lastError = events.lastIndexOf('error');
      const lastRollback = events.lastIndexOf('rollback');
      if (lastError >= 0 && lastRollback < lastError) assert.equal(outcome, 'doubtful');
      if (lastRollback === events.length - 1 && lastRollback >= 0) assert.equal(outcome, 'rolled-back');
      if (lastError < 0 && lastRollback < 0) assert.equal(outcome, 'clean');
    }));
  });
});
