/**
 * The transaction tracker's count of ReadyForQuery against PostgreSQL itself:
 * COPY FROM STDIN sent in every order a server accepts (its data before or
 * after the CopyInResponse; Syncs before the data, among it, after CopyDone;
 * CopyFail, bad data, a COPY that fails at its end or never begins), straight
 * to the server over its Unix socket. A tracker watches what is sent and
 * answered, as the sidecar's does, and must be at a boundary once the server
 * has answered everything and never before, or know that it cannot count.
 */
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { serialize } from 'pg-protocol';
import { testEnvironment } from '../support/hooks.ts';
import { TransactionTracker } from '../../src/core/pool-state/index.ts';
import { FrameReader, buildStartupMessage } from '../../src/core/protocol/index.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';

const env = testEnvironment();

/** Client messages by letter: P/U/p a Parse of a COPY (into copy_rows, into copy_unique, into a missing table), Q/V its simple Query form, T the tables' set-up, d/x/u CopyData (rows, a bad row, a duplicate key), c CopyDone, f CopyFail, q a SELECT. */
const MESSAGES: Record<string, () => Buffer> = {
  P: () => serialize.parse({ name: '', text: 'COPY copy_rows FROM STDIN', types: [] }),
  U: () => serialize.parse({ name: '', text: 'COPY copy_unique FROM STDIN', types: [] }),
  p: () => serialize.parse({ name: '', text: 'COPY copy_missing FROM STDIN', types: [] }),
  B: () => serialize.bind({}),
  E: () => serialize.execute({}),
  S: () => serialize.sync(),
  H: () => serialize.flush(),
  Q: () => serialize.query('COPY copy_rows FROM STDIN'),
  V: () => serialize.query('COPY copy_unique FROM STDIN'),
  q: () => serialize.query('SELECT 1'),
  T: () => serialize.query('DROP TABLE IF EXISTS copy_rows, copy_unique; CREATE TABLE copy_rows (a int); CREATE TABLE copy_unique (a int PRIMARY KEY)'),
  d: () => serialize.copyData(Buffer.from('1\n2\n')),
  x: () => serialize.copyData(Buffer.from('x\n')),
  u: () => serialize.copyData(Buffer.from('7\n7\n')),
  c: () => serialize.copyDone(),
  f: () => serialize.copyFail('given up'),
};

const NAMES: Record<string, string> = {
  P: 'Parse', U: 'Parse (into a unique key)', p: 'Parse (a missing table)', B: 'Bind', E: 'Execute', S: 'Sync', H: 'Flush', Q: 'Query', V: 'Query (into a unique key)',
  q: 'Query (SELECT)', T: 'Query (set-up)', d: 'CopyData', x: 'CopyData (a bad row)', u: 'CopyData (a duplicate key)', c: 'CopyDone', f: 'CopyFail',
};

/** The messages of `letters`, by name. */
function named(letters: string): string {
  return [...letters].map((l) => NAMES[l]).join(' ');
}

/** The message type byte each letter sends. */
function typeOf(letter: string): number {
  return MESSAGES[letter]!()[0]!;
}

/**
 * Logs in over the Unix socket, sends `before`, and once a CopyInResponse
 * came, `after` (if any); feeds a tracker both sides and returns the replies
 * (ReadyForQuery with its status) once the server is quiet.
 */
async function converse(postgres: PostgresServer, before: string, after: string | undefined): Promise<{ replies: string; tracker: TransactionTracker; boundaryTooEarly: boolean }> {
  const socket = connect({ path: postgres.socketPath });
  await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
  const tracker = new TransactionTracker();
  const reader = new FrameReader();
  const seen: string[] = [];
  let loggedIn = false;
  let boundaryTooEarly = false;
  let last = Date.now();
  socket.on('data', (chunk: Buffer) => {
    reader.push(chunk);
    while (reader.next()) {
      const type = reader.type;
      const letter = String.fromCharCode(type);
      last = Date.now();
      if (!loggedIn) {
        loggedIn = letter === 'Z';
        continue;
      }
      if (tracker.atBoundary) boundaryTooEarly = true;
      if (letter === 'C') tracker.commandCompleted();
      else tracker.serverMessage(type, reader.buffer[reader.bodyStart]);
      seen.push(letter === 'Z' ? `Z${String.fromCharCode(reader.buffer[reader.bodyStart]!)}` : letter);
    }
  });
  const send = (letters: string): void => {
    for (const l of letters) tracker.clientMessage(typeOf(l));
    socket.write(Buffer.concat([...letters].map((l) => MESSAGES[l]!())));
  };
  const waitFor = async (test: () => boolean): Promise<void> => {
    const deadline = Date.now() + 5000;
    while (!test() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    assert.ok(test(), `timed out; replies so far: ${seen.join('')}`);
  };
  try {
    socket.write(buildStartupMessage({ user: postgres.superuser.user, database: 'app' }));
    await waitFor(() => loggedIn);
    send(before);
    if (after !== undefined) {
      await waitFor(() => seen.includes('G'));
      send(after);
    }
    await waitFor(() => seen.length > 0 && Date.now() - last > 250);
    return { replies: seen.join(''), tracker, boundaryTooEarly };
  } finally {
    socket.destroy();
  }
}

describe('transaction tracker against PostgreSQL: COPY FROM STDIN in every order', function () {
  let postgres: PostgresServer;

  before(async function () {
    postgres = await env.postgres();
    assert.match((await converse(postgres, 'T', undefined)).replies, /ZI$/);
  });

  // [what is sent ('|': the rest once CopyInResponse came), what PostgreSQL answers, whether the tracker can count it]
  const cases: [string, string, 'counted' | 'lost'][] = [
    ['PBES|dcS', '12GCZI', 'counted'],
    ['PBESdcS', '12GCZI', 'counted'],
    ['PBE|dcS', '12GCZI', 'counted'],
    ['PBEdcS', '12GCZI', 'counted'],
    ['PBEHdcS', '12GCZI', 'counted'],
    ['PBES|dfS', '12GEZI', 'counted'],
    ['PBESdfS', '12GEZI', 'counted'],
    ['PBEdfS', '12GEZI', 'counted'],
    ['PBES|xcS', '12GEZI', 'counted'],
    ['PBESxdcS', '12GEZI', 'counted'],
    ['UBESucS', '12GEZI', 'counted'],
    ['pBESdcS', '12EZIZI', 'counted'],
    ['pBEdcS', '12EZI', 'counted'],
    ['PBESdcSS', '12GCZIZI', 'counted'],
    ['PBESdcqS', '12GCTDCZIZI', 'counted'],
    ['PBESdfqS', '12GEZI', 'counted'],
    ['PBESdcSPBESdcS', '12GCZI12GCZI', 'counted'],
    ['PBESdcPBESdcS', '12GC12GCZI', 'counted'],
    ['PBES|dSdcS', '12GCZI', 'counted'],
    ['PBESdSdcS', '12GCZI', 'counted'],
    ['PBES|dHdcS', '12GCZI', 'counted'],
    ['Q|dc', 'GCZI', 'counted'],
    ['Qdc', 'GCZI', 'counted'],
    ['QdcS', 'GCZIZI', 'counted'],
    ['Q|dSc', 'GCZI', 'counted'],
    ['QxcS', 'GEZIZI', 'counted'],
    ['QdfS', 'GEZIZI', 'counted'],
    // A Sync among the data of a COPY that fails: answered if read after the failure, which comes at the bad row or at the end.
    ['PBES|xSdcS', '12GEZIZI', 'lost'],
    ['PBESxSdcS', '12GEZIZI', 'lost'],
    ['UBES|uSdcS', '12GEZI', 'lost'],
    ['UBESuSdcS', '12GEZI', 'lost'],
    ['Q|xSdcS', 'GEZIZIZI', 'lost'],
    ['VuSdcS', 'GEZIZI', 'lost'],
  ];
  for (const [sent, replies, outcome] of cases) {
    const [before, after] = sent.split('|');
    const ready = replies.split('Z').length - 1;
    it(`${named(before!)}${after === undefined ? '' : `, after CopyInResponse ${named(after)}`}: ${ready} ReadyForQuery${outcome === 'lost' ? ', not countable' : ''}`, async function () {
      const result = await converse(postgres, before!, after);
      assert.equal(result.replies, replies);
      assert.equal(result.boundaryTooEarly, false, 'at a boundary with replies still to come');
      assert.equal(result.tracker.readyCountLost, outcome === 'lost');
      assert.equal(result.tracker.atBoundary, outcome === 'counted');
    });
  }
});
