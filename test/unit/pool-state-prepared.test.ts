/**
 * Named prepared statements in transaction mode, as pure logic: the LRU of
 * server statements, the reply editor, and a model check. A small model of
 * PostgreSQL's extended protocol (statements, errors skipping to Sync, DEALLOCATE
 * and DEALLOCATE ALL sent as SQL by Parse or by simple Query) runs
 * random client batches twice: directly on one backend, and through
 * routeMessage + ResponseEditor on whichever of several backends each batch
 * lands. The client must see the same replies either way. A schema change
 * step changes the result shape of one query text: a statement parsed before
 * it fails each Bind of it with 0A000, and each Describe after its
 * ParameterDescription, as PostgreSQL's revalidation does (named statements only).
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { serialize } from 'pg-protocol';
import {
  RESHAPED_STATEMENT, ResponseEditor, ServerStatementCache, TransactionTracker, resultShape, routeMessage, serverStatementName, type ClientStatements,
} from '../../src/core/pool-state/index.ts';
import { parseBindMessage, parseParseMessage, parseTargetMessage } from '../../src/core/protocol/index.ts';

/** A reply as the client sees it: type and, for Bind and Describe, the text of the statement used. */
interface ModelReply {
  type: string;
  text?: string;
}

/** The database's schema: each change gives 'SELECT 1' another result shape. */
const schema = { version: 0 };
const shapeOf = (text: string): string => (text === 'SELECT 1' ? `${text}#${schema.version}` : text);

/** Table OIDs given out: each description names another (a table dropped and created again with the same columns is the same shape). */
let tableOids = 16_384;

/** A RowDescription body of one text column named after the shape. */
function rowDescription(shape: string): Buffer {
  const fixed = Buffer.alloc(18);
  fixed.writeUInt32BE((tableOids += 1), 0);
  fixed.writeInt16BE(tableOids % 7, 4);
  fixed.writeUInt32BE(25, 6);
  fixed.writeInt16BE(-1, 10);
  fixed.writeInt32BE(-1, 12);
  return Buffer.concat([Buffer.from([0, 1]), Buffer.from(`${shape}\0`), fixed]);
}

/** Gives the editor a ParameterDescription or RowDescription of the model: true if it was the answer to its own Describe. */
function describedAs(editor: ResponseEditor, reply: ModelReply): boolean {
  const body = reply.type === 'T' ? rowDescription(reply.text ?? '') : Buffer.alloc(2);
  return editor.described(reply.type.charCodeAt(0), body, 0, body.length);
}

/** The named-statement part of a PostgreSQL backend. */
class ModelBackend {
  readonly statements = new Map<string, string>();
  /** Result shape of each statement, fixed at its Parse. */
  private readonly shapes = new Map<string, string>();
  private failed = false;
  /** The text of the statement the unnamed portal runs, if bound. */
  private portal: string | undefined;

  /** Runs frontend messages (whole, concatenated), returns the replies. */
  run(messages: Buffer[]): ModelReply[] {
    const replies: ModelReply[] = [];
    for (const m of messages) {
      const type = String.fromCharCode(m[0]!);
      if (type === 'Q') {
        // A simple Query is skipped after an error too, until Sync.
        if (this.failed) continue;
        const reply = this.one(type, m)!;
        replies.push(reply, { type: 'Z' });
        continue;
      }
      if (type === 'S') {
        this.failed = false;
        // The unnamed statement stays past Sync, as in PostgreSQL: a later batch may Bind it.
        replies.push({ type: 'Z' });
        continue;
      }
      if (this.failed) continue;
      const reply = this.one(type, m);
      if (reply === undefined) continue;
      if (reply.type === 'E') this.failed = true;
      replies.push(reply);
      // Describe of a statement: ParameterDescription, then its RowDescription (the shape),
      // which revalidates it: a statement whose shape changed fails there (0A000).
      if (reply.type === 't') {
        const name = parseTargetMessage(m, 5, m.length).name;
        const invalid = this.revalidate(name);
        if (invalid) {
          this.failed = true;
          replies.push(invalid);
        } else replies.push({ type: 'T', text: name === '' ? shapeOf(this.statements.get('')!) : this.shapes.get(name)! });
      }
    }
    return replies;
  }

  private one(type: string, m: Buffer): ModelReply | undefined {
    switch (type) {
      case 'P': {
        const { name, definition } = parseParseMessage(m, 5, m.length);
        const text = definition.toString('utf8', 0, definition.indexOf(0));
        // PostgreSQL drops the previous unnamed statement before it parses the new one.
        if (name === '') this.statements.delete('');
        if (text.includes('bad')) return { type: 'E' };
        if (name !== '' && this.statements.has(name)) return { type: 'E' };
        this.statements.set(name, text);
        this.shapes.set(name, shapeOf(text));
        return { type: '1' };
      }
      case 'B': {
        const name = parseBindMessage(m, 5, m.length).statement;
        const invalid = this.revalidate(name);
        const text = invalid ? undefined : this.statements.get(name);
        this.portal = text;
        if (invalid) return invalid;
        // A DEALLOCATE names the statement as the server knows it: not compared.
        return { type: '2', ...(text!.startsWith('DEALLOCATE') ? {} : { text }) };
      }
      case 'E': {
        // Only DEALLOCATE runs here (other statements' rows and tags are not modelled: SELECT).
        const text = this.portal;
        if (text === undefined || !text.startsWith('DEALLOCATE ')) return { type: 'C', text: 'SELECT' };
        return this.deallocate(text.slice('DEALLOCATE '.length));
      }
      case 'Q': {
        const text = m.toString('utf8', 5, m.length - 1);
        this.statements.delete('');
        this.portal = undefined;
        return this.deallocate(text.slice('DEALLOCATE '.length));
      }
      case 'D': {
        const name = parseTargetMessage(m, 5, m.length).name;
        const text = this.statements.get(name);
        if (text === undefined) return { type: 'E' };
        return { type: 't', ...(text.startsWith('DEALLOCATE') ? {} : { text }) };
      }
      case 'C': {
        const { target, name } = parseTargetMessage(m, 5, m.length);
        if (target === 0x53) this.statements.delete(name);
        return { type: '3' };
      }
      default:
        return undefined;
    }
  }

  /** An error if statement `name` cannot be used: it does not exist (the sidecar's RESHAPED_STATEMENT stands for 0A000), or its shape changed. */
  private revalidate(name: string): ModelReply | undefined {
    const text = this.statements.get(name);
    if (text === undefined) return name === RESHAPED_STATEMENT ? { type: 'E', text: 'reshaped' } : { type: 'E' };
    // Not modelled for the unnamed statement: the sidecar does not check its shape where it prepares it again.
    return name === '' || shapeOf(text) === this.shapes.get(name) ? undefined : { type: 'E', text: 'reshaped' };
  }

  private deallocate(name: string): ModelReply {
    if (name === 'ALL') {
      for (const n of [...this.statements.keys()]) if (n !== '') this.statements.delete(n);
      return { type: 'C', text: 'DEALLOCATE ALL' };
    }
    if (!this.statements.has(name)) return { type: 'E' };
    this.statements.delete(name);
    return { type: 'C', text: 'DEALLOCATE' };
  }
}

type Step =
  | { kind: 'deallocate'; name: string; query: boolean }
  | { kind: 'parse'; name: string; text: string }
  | { kind: 'bind'; name: string }
  | { kind: 'describe'; name: string }
  | { kind: 'close'; name: string }
  | { kind: 'schema-change' };

function encode(step: Step): Buffer | Buffer[] {
  switch (step.kind) {
    case 'deallocate': {
      const sql = `DEALLOCATE ${step.name}`;
      // Closed after use: a DEALLOCATE the sidecar rewrote is not kept to be bound again in a later batch.
      return step.query ? serialize.query(sql) : [serialize.parse({ text: sql }), serialize.bind({}), serialize.execute({}), serialize.close({ type: 'S', name: '' })];
    }
    case 'parse': return serialize.parse({ name: step.name, text: step.text });
    case 'bind': return serialize.bind({ statement: step.name });
    case 'describe': return serialize.describe({ type: 'S', name: step.name });
    case 'close': return serialize.close({ type: 'S', name: step.name });
    case 'schema-change': return Buffer.alloc(0);
  }
}

const nameArb = fc.constantFrom('', 'a', 'b', 'c');
const textArb = fc.constantFrom('SELECT 1', 'SELECT 2', 'SELECT 3', 'bad', 'SELECT 4');
const stepArb: fc.Arbitrary<Step> = fc.oneof(
  fc.record({ kind: fc.constant('parse' as const), name: nameArb, text: textArb }),
  fc.record({ kind: fc.constant('bind' as const), name: nameArb }),
  fc.record({ kind: fc.constant('describe' as const), name: nameArb }),
  fc.record({ kind: fc.constant('close' as const), name: nameArb }),
  fc.record({ kind: fc.constant('deallocate' as const), name: fc.constantFrom('a', 'b', 'ALL'), query: fc.boolean() }),
);
/** A batch, or a schema change between batches. */
const schemaChangeArb = fc.constant({ kind: 'schema-change' as const });
/** Batches of one of several sessions, each ending with Sync, and the backend it lands on. */
const batchArb = fc.record({ session: fc.nat(2), backend: fc.nat(2), steps: fc.array(stepArb, { maxLength: 6 }) });

/**
 * Runs a batch through the sidecar's rewriting on `backend`, returns what the
 * client sees. A TransactionTracker counts what is sent and answered, as on a
 * server connection: it tells the editor how many batches each ReadyForQuery
 * ends (a Query after an error in an extended message is skipped, its
 * ReadyForQuery with it) and when the server skips what is sent.
 */
function throughSidecar(client: ClientStatements, backend: ModelBackend, editor: ResponseEditor, messages: Buffer[]): ModelReply[] {
  const tracker = new TransactionTracker();
  editor.activate(0, [], true);
  const seen: ModelReply[] = [];
  let next = 0;
  while (next < messages.length) {
    const out: Buffer[] = [];
    let held = false;
    editor.hold(() => {
      held = false;
    });
    for (; next < messages.length; next += 1) {
      const m = messages[next]!;
      if (routeMessage(client, editor, m[0]!, m, 0, 5, m.length, out)) {
        held = true;
        break;
      }
    }
    for (const m of out) tracker.clientMessage(m[0]!);
    // Server statement names map back to texts through the backend itself.
    for (const reply of backend.run(out)) {
      if (reply.type === 'C') tracker.commandCompleted();
      else if (reply.type === 'Z') tracker.serverMessage(0x5a, 0x49);
      else tracker.serverMessage(reply.type.charCodeAt(0));
      if (reply.type === '1' || reply.type === '3') {
        const edit = editor.reply(reply.type.charCodeAt(0));
        if (edit === 'swallow') continue;
        seen.push(edit === 'parse-complete' ? { type: '1' } : reply);
      } else if ((reply.type === 't' || reply.type === 'T') && describedAs(editor, reply)) {
        continue;
      } else {
        if (reply.type === 'E') editor.error(tracker.skipping);
        if (reply.type === 'Z') editor.ready(tracker.readyBatches);
        // (A simple-Query DEALLOCATE of a statement this connection lacks runs as DEALLOCATE ALL, and its tag says so: tags are not compared.)
        if (reply.type === 'C') {
          // As the server connection does: a DEALLOCATE ALL the editor did not await forgets the statements now.
          if (!editor.commandCompleted(reply.text!) && reply.text === 'DEALLOCATE ALL') editor.statements.clear();
          seen.push({ type: 'C' });
          continue;
        }
        seen.push(reply);
      }
    }
    assert.equal(held, false, 'a held message is released by the replies to what went before it');
  }
  assert.equal(editor.pending, 0, 'every expected reply accounted for by the end of the batch');
  assert.equal(tracker.atBoundary, true, 'every ReadyForQuery accounted for');
  editor.deactivate();
  return seen;
}

/** A session's maps on one server connection, editing from the start: `send` routes a message, `prepare` a named statement the server accepted. */
function activeSession(): { cache: ServerStatementCache; editor: ResponseEditor; client: ClientStatements; out: Buffer[]; send: (m: Buffer) => boolean; prepare: (name: string, text: string) => void } {
  const cache = new ServerStatementCache();
  const editor = new ResponseEditor(cache);
  const client: ClientStatements = new Map();
  editor.activate(0);
  const out: Buffer[] = [];
  const send = (m: Buffer): boolean => routeMessage(client, editor, m[0]!, m, 0, 5, m.length, out);
  const prepare = (name: string, text: string): void => {
    send(serialize.parse({ name, text }));
    send(serialize.sync());
    assert.equal(editor.reply(0x31), 'forward');
    editor.ready();
  };
  return { cache, editor, client, out, send, prepare };
}

describe('prepared statements (pure)', function () {
  it('ServerStatementCache evicts the least recently used name', function () {
    const cache = new ServerStatementCache(2);
    assert.deepEqual(cache.add('a'), []);
    assert.deepEqual(cache.add('b'), []);
    cache.touch('a');
    assert.deepEqual(cache.add('c'), ['b']);
    assert.deepEqual(cache.list(), ['a', 'c']);
    cache.clear();
    assert.equal(cache.size, 0);
    assert.throws(() => new ServerStatementCache(0));
  });

  it('keeps a statement\'s shape through a Parse, Close or DEALLOCATE ALL that is undone, and records one whose name a later message deleted', function () {
    const cache = new ServerStatementCache(2);
    const one = Buffer.from([0, 1]);
    const two = Buffer.from([0, 2]);
    cache.add('a');
    cache.setShape('a', one);
    // A Close of it, then a Parse of it again, both skipped after an error: undone newest first.
    cache.delete('a');
    cache.add('a');
    cache.awaitShape('a');
    cache.delete('a');
    cache.restore('a');
    cache.settledShapes();
    assert.deepEqual(cache.shape('a'), one, 'the shape the server\'s statement has');
    // A Parse whose Describe is answered while a DEALLOCATE ALL sent after it has the names cleared, then skipped.
    cache.add('b');
    cache.awaitShape('b');
    const held = cache.list();
    cache.clear();
    cache.setShape('b', two);
    for (const name of held) cache.restore(name);
    assert.deepEqual(cache.shape('b'), two);
    assert.deepEqual(cache.shape('a'), one);
    // A Parse with no Describe after it: the shape of the earlier statement of that name is not its own.
    cache.delete('b');
    cache.add('b');
    cache.forgetShape('b');
    assert.equal(cache.shape('b'), undefined);
  });

  it('takes a result shape from a RowDescription without the columns\' table OIDs and attribute numbers, as PostgreSQL\'s revalidation', function () {
    // name, table OID, attribute number, type OID, type size, typmod, format
    const field = (name: string, table: number, attnum: number, type: number, typmod: number): Buffer => {
      const fixed = Buffer.alloc(18);
      fixed.writeUInt32BE(table, 0);
      fixed.writeInt16BE(attnum, 4);
      fixed.writeUInt32BE(type, 6);
      fixed.writeInt16BE(-1, 10);
      fixed.writeInt32BE(typmod, 12);
      return Buffer.concat([Buffer.from(`${name}\0`), fixed]);
    };
    const body = (...fields: Buffer[]): Buffer => {
      const count = Buffer.alloc(2);
      count.writeUInt16BE(fields.length);
      return Buffer.concat([Buffer.from('xx'), count, ...fields, Buffer.from('yy')]);
    };
    const shape = (b: Buffer): Buffer => resultShape(b, 2, b.length - 2);
    const before = shape(body(field('id', 16_384, 1, 25, -1), field('n', 16_384, 2, 1043, 14)));
    // The table dropped and created again, a column dropped and added again: same shape.
    assert.ok(before.equals(shape(body(field('id', 16_999, 1, 25, -1), field('n', 16_999, 3, 1043, 14)))));
    // Another name, type or typmod, or another column count: another shape.
    assert.ok(!before.equals(shape(body(field('id', 16_384, 1, 25, -1), field('m', 16_384, 2, 1043, 14)))));
    assert.ok(!before.equals(shape(body(field('id', 16_384, 1, 25, -1), field('n', 16_384, 2, 25, 14)))));
    assert.ok(!before.equals(shape(body(field('id', 16_384, 1, 25, -1), field('n', 16_384, 2, 1043, 24)))));
    assert.ok(!before.equals(shape(body(field('id', 16_384, 1, 25, -1)))));
    assert.equal(shape(body()).length, 2);
    assert.throws(() => resultShape(Buffer.from([0, 1, 0x61, 0]), 0, 4), /truncated/);
  });

  it('names server statements by definition only, within PostgreSQL identifier length', function () {
    const one = parseParseMessage(serialize.parse({ name: 'x', text: 'SELECT $1', types: [23] }), 5, serialize.parse({ name: 'x', text: 'SELECT $1', types: [23] }).length).definition;
    const same = parseParseMessage(serialize.parse({ name: 'y', text: 'SELECT $1', types: [23] }), 5, serialize.parse({ name: 'y', text: 'SELECT $1', types: [23] }).length).definition;
    const otherTypes = parseParseMessage(serialize.parse({ name: 'x', text: 'SELECT $1', types: [25] }), 5, serialize.parse({ name: 'x', text: 'SELECT $1', types: [25] }).length).definition;
    assert.equal(serverStatementName(one), serverStatementName(same));
    assert.notEqual(serverStatementName(one), serverStatementName(otherTypes));
    assert.ok(serverStatementName(one).length <= 63);
  });

  it('passes replies to messages sent before activation unedited', function () {
    const editor = new ResponseEditor(new ServerStatementCache());
    editor.activate(1);
    editor.expectParse('swallow');
    assert.equal(editor.reply(0x31), 'forward', 'from the earlier batch');
    editor.ready();
    assert.equal(editor.reply(0x31), 'swallow');
  });

  it('forgets a statement whose Parse was skipped after an error', function () {
    const cache = new ServerStatementCache();
    const editor = new ResponseEditor(cache);
    const client: ClientStatements = new Map();
    editor.activate(0);
    const out: Buffer[] = [];
    const failing = serialize.bind({ statement: 'nothing' });
    routeMessage(client, editor, 0x42, failing, 0, 5, failing.length, out);
    const parse = serialize.parse({ name: 'q', text: 'SELECT 1' });
    routeMessage(client, editor, 0x50, parse, 0, 5, parse.length, out);
    assert.ok(client.has('q'));
    assert.equal(cache.size, 1);
    editor.ready();
    assert.equal(client.has('q'), false);
    assert.equal(cache.size, 0);
  });

  it('forgets the statements on a DEALLOCATE ALL sent as SQL only once its CommandComplete says it ran', function () {
    const { cache, editor, client, send, prepare } = activeSession();
    prepare('a', 'SELECT 1');
    const before = cache.list();
    // Skipped after an error: DEALLOCATE ALL, then a Parse of a new statement in the same batch.
    send(serialize.parse({ text: 'DEALLOCATE ALL' }));
    assert.equal(client.has('a'), false, 'later messages of the batch see it done');
    assert.equal(cache.size, 0);
    send(serialize.parse({ name: 'b', text: 'SELECT 2' }));
    send(serialize.sync());
    editor.error();
    editor.ready();
    assert.equal(client.has('a'), true);
    assert.equal(client.has('b'), false);
    assert.deepEqual(cache.list(), before);
    // Ran: its CommandComplete confirms it, and the Parse after it keeps its statement.
    send(serialize.parse({ text: 'DEALLOCATE ALL' }));
    send(serialize.bind({}));
    send(serialize.execute({}));
    send(serialize.parse({ name: 'b', text: 'SELECT 2' }));
    send(serialize.sync());
    assert.equal(editor.reply(0x31), 'forward');
    assert.equal(editor.commandCompleted('DISCARD ALL'), false, 'another command');
    assert.equal(editor.commandCompleted('DEALLOCATE ALL'), true);
    assert.equal(editor.reply(0x31), 'forward');
    editor.ready();
    assert.equal(client.has('a'), false);
    assert.equal(client.has('b'), true);
    assert.deepEqual(cache.list(), [client.get('b')!.serverName]);
  });

  it('rewrites a DEALLOCATE of the session\'s statement among other statements of one Query (psqlODBC\'s savepoint around it), and undoes it unless it ran', function () {
    const { cache, editor, client, out, send, prepare } = activeSession();
    prepare('_PLAN0x1', 'SELECT 1');
    const serverName = client.get('_PLAN0x1')!.serverName;
    const sentText = (): string => out.at(-1)!.subarray(5, out.at(-1)!.length - 1).toString('utf8');
    const savepointed = 'SAVEPOINT _per_query_svp_;DEALLOCATE "_PLAN0x1";RELEASE _per_query_svp_';
    // Skipped (the transaction had failed): the statement stays the session's, and the server's.
    out.length = 0;
    send(serialize.query(savepointed));
    assert.equal(sentText(), `SAVEPOINT _per_query_svp_;DEALLOCATE ${serverName};RELEASE _per_query_svp_`);
    assert.equal(client.has('_PLAN0x1'), false, 'later messages see it done');
    editor.error();
    editor.ready();
    assert.equal(client.has('_PLAN0x1'), true);
    assert.deepEqual(cache.list(), [serverName]);
    // Ran: its CommandComplete confirms it.
    send(serialize.query(savepointed));
    assert.equal(editor.commandCompleted('DEALLOCATE'), true);
    editor.ready();
    assert.equal(client.has('_PLAN0x1'), false);
    assert.deepEqual(cache.list(), []);
    // A name the session never prepared goes as it is (the server answers 26000, as direct).
    out.length = 0;
    send(serialize.query('SAVEPOINT s;DEALLOCATE other;RELEASE s'));
    assert.equal(sentText(), 'SAVEPOINT s;DEALLOCATE other;RELEASE s');
    editor.ready();
    // Unquoted, the name folds to lower case: not the session's _PLAN0x2, as direct.
    prepare('_PLAN0x2', 'SELECT 2');
    out.length = 0;
    send(serialize.query('SELECT 1; DEALLOCATE _PLAN0x2'));
    assert.equal(sentText(), 'SELECT 1; DEALLOCATE _PLAN0x2');
    editor.ready();
    // Held by the session but not on this server connection (its statement prepared on another): DEALLOCATE ALL there, as for a lone DEALLOCATE.
    cache.delete(client.get('_PLAN0x2')!.serverName);
    out.length = 0;
    send(serialize.query('SELECT 1; DEALLOCATE "_PLAN0x2"'));
    assert.equal(sentText(), 'SELECT 1; DEALLOCATE ALL');
    assert.equal(editor.commandCompleted('DEALLOCATE ALL'), true);
    editor.ready();
    assert.equal(client.has('_PLAN0x2'), false);
  });

  it('takes a re-Parse of a name whose Parse in an earlier unanswered batch failed as the retry it is', function () {
    const cache = new ServerStatementCache();
    const editor = new ResponseEditor(cache);
    const client: ClientStatements = new Map();
    editor.activate(0);
    const out: Buffer[] = [];
    const send = (m: Buffer): void => void routeMessage(client, editor, m[0]!, m, 0, 5, m.length, out);
    send(serialize.parse({ name: 'a', text: 'SELECT 1::no_such_type' }));
    send(serialize.sync());
    send(serialize.parse({ name: 'a', text: 'SELECT 1' }));
    send(serialize.sync());
    const retry = client.get('a')!;
    assert.equal(out[out.length - 3], retry.parse, 'the retry sends its own text');
    // The server: an error for the first batch, ParseComplete for the second.
    editor.ready();
    assert.equal(client.get('a'), retry, 'the failed first Parse does not undo the retry');
    assert.equal(editor.reply(0x31), 'forward');
    editor.ready();
    assert.equal(client.get('a')!.confirmed, true);
    // In one batch, the second Parse is the duplicate the server refuses (42P05).
    send(serialize.parse({ name: 'b', text: 'SELECT 2' }));
    send(serialize.parse({ name: 'b', text: 'SELECT 3' }));
    assert.equal(out[out.length - 1], client.get('b')!.parse, 'the first text, sent again to draw 42P05');
  });

  it('ends a hold for the shape of a Parse of an earlier batch at that batch\'s ReadyForQuery when an error made the server skip it', function () {
    const cache = new ServerStatementCache();
    const editor = new ResponseEditor(cache);
    const client: ClientStatements = new Map();
    editor.activate(0, [], true);
    const out: Buffer[] = [];
    const send = (m: Buffer): boolean => routeMessage(client, editor, m[0]!, m, 0, 5, m.length, out);
    const noColumns = Buffer.from([0, 0]);
    send(serialize.parse({ name: 'q', text: 'SELECT 1' }));
    send(serialize.sync());
    assert.equal(editor.reply(0x31), 'forward');
    assert.equal(editor.described(0x74, noColumns, 0, 2), true);
    assert.equal(editor.described(0x54, noColumns, 0, 2), true);
    editor.ready();
    // One pipeline: a failing Bind, a Parse of the same text under another name, Sync; then a Bind of q.
    send(serialize.bind({ statement: 'zz' }));
    send(serialize.parse({ name: 'r', text: 'SELECT 1' }));
    send(serialize.sync());
    assert.equal(send(serialize.bind({ statement: 'q' })), true, 'held for the shape r\'s Parse gets');
    let settled = false;
    editor.hold(() => {
      settled = true;
    });
    // The server: 26000 for the Bind, the rest of the batch skipped, ReadyForQuery.
    editor.error(false);
    assert.equal(settled, false);
    editor.ready();
    assert.equal(settled, true, 'r\'s shape never comes');
    out.length = 0;
    assert.equal(send(serialize.bind({ statement: 'q' })), false);
    assert.equal(parseBindMessage(out.at(-1)!, 5, out.at(-1)!.length).statement, client.get('q')!.serverName);
  });

  it('model check: clients see what a backend of their own would answer, on any backend, with a tiny LRU', function () {
    fc.assert(fc.property(fc.array(fc.oneof({ arbitrary: batchArb, weight: 6 }, { arbitrary: schemaChangeArb, weight: 1 }), { minLength: 1, maxLength: 25 }), (batches) => {
      const direct = [new ModelBackend(), new ModelBackend(), new ModelBackend()];
      const backends = [new ModelBackend(), new ModelBackend(), new ModelBackend()];
      const editors = backends.map(() => new ResponseEditor(new ServerStatementCache(2)));
      const sessions: ClientStatements[] = [0, 1, 2].map((): ClientStatements => new Map());
      schema.version = 0;
      for (const batch of batches) {
        if ('kind' in batch) {
          schema.version += 1;
          continue;
        }
        // A simple Query anywhere: after an error in an extended message the server skips it, and its ReadyForQuery with it.
        const steps = batch.steps;
        const messages = [...steps.flatMap(encode), serialize.sync()];
        const expected = direct[batch.session]!.run(messages).map((r) => (r.type === 'C' ? { type: 'C' } : r));
        const actual = throughSidecar(sessions[batch.session]!, backends[batch.backend]!, editors[batch.backend]!, messages);
        assert.deepEqual(actual, expected, `steps ${JSON.stringify(steps)}`);
        for (const [i, editor] of editors.entries()) {
          // The cache knows exactly the backend's statements, and evicted ones are closed.
          const onBackend = [...backends[i]!.statements.keys()].filter((n) => n !== '').sort();
          assert.deepEqual(editor.statements.list().sort(), onBackend, `backend ${i}`);
          assert.ok(onBackend.length <= 2, 'within capacity');
        }
      }
    }), {
      // MODEL_RUNS and MODEL_SEED: a longer or a given run, locally.
      numRuns: Number(process.env.MODEL_RUNS ?? 5000), ...(process.env.MODEL_SEED ? { seed: Number(process.env.MODEL_SEED) } : {}),
      examples: [
        // A second Bind of a statement the schema change reshaped, whose copy the sidecar closes and parses again, skipped after the first Bind's 0A000.
        [[{ session: 0, backend: 0, steps: [{ kind: 'parse', name: 'b', text: 'SELECT 1' }] }, { kind: 'schema-change' }, { session: 0, backend: 2, steps: [{ kind: 'bind', name: 'b' }, { kind: 'bind', name: 'b' }] }, { session: 0, backend: 2, steps: [{ kind: 'describe', name: 'b' }] }]],
        // A Parse of a name the client has (the sidecar prepares the statement there first), then a DEALLOCATE ALL skipped after the 42P05.
        [[{ session: 0, backend: 1, steps: [{ kind: 'parse', name: 'c', text: 'SELECT 1' }] }, { kind: 'schema-change' }, { session: 0, backend: 0, steps: [{ kind: 'parse', name: 'c', text: 'SELECT 1' }, { kind: 'deallocate', name: 'ALL', query: false }] }, { session: 0, backend: 0, steps: [{ kind: 'bind', name: 'c' }] }]],
      ],
    });
  });
});
