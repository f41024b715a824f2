/**
 * Reading and rewriting the extended-protocol messages that name prepared
 * statements, checked against pg-protocol's own serializer.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { serialize } from 'pg-protocol';
import {
  PARSE_COMPLETE, ProtocolError, buildClosePortal, buildCloseStatement, buildDescribeStatement, buildParse, firstTextParameter, namesPreparedStatement,
  parseBindMessage, parseParseMessage, parseTargetMessage, renameBind, statementNameBytes,
} from '../../src/core/protocol/index.ts';

const at = (message: Buffer): [number, Buffer, number, number] => [message[0]!, message, 5, message.length];

describe('extended protocol: named statements', function () {
  it('reads a Parse parameter count as unsigned (up to 65,535 types, as PostgreSQL accepts)', function () {
    for (const count of [0, 1, 32_767, 32_768, 40_000, 65_535]) {
      const message = serialize.parse({ name: 'big', text: 'INSERT 1', types: new Array<number>(count).fill(23) });
      const parsed = parseParseMessage(...at(message).slice(1) as [Buffer, number, number]);
      assert.equal(parsed.name, 'big');
      assert.equal(parsed.definition.length, 'INSERT 1'.length + 1 + 2 + 4 * count);
    }
  });

  it('tells named from unnamed Parse, Bind, Describe and Close', function () {
    const named = [
      serialize.parse({ name: 's1', text: 'SELECT 1' }),
      serialize.bind({ statement: 's1' }),
      serialize.bind({ portal: 'p', statement: 's1' }),
      serialize.describe({ type: 'S', name: 's1' }),
      serialize.close({ type: 'S', name: 's1' }),
    ];
    const unnamed = [
      serialize.parse({ text: 'SELECT 1' }),
      serialize.bind({}),
      serialize.bind({ portal: 'p' }),
      serialize.describe({ type: 'S', name: '' }),
      serialize.describe({ type: 'P', name: 'p' }),
      serialize.close({ type: 'P', name: 'p' }),
      serialize.execute({}),
      serialize.sync(),
      serialize.query('SELECT 1'),
    ];
    for (const m of named) assert.equal(namesPreparedStatement(...at(m)), true, m.toString('latin1'));
    for (const m of unnamed) assert.equal(namesPreparedStatement(...at(m)), false, m.toString('latin1'));
  });

  it('reads the first parameter of a Bind as text, null for NULL, and nothing for binary or no parameters', function () {
    const first = (message: Buffer): string | null | undefined => firstTextParameter(message, 5, message.length);
    assert.equal(first(serialize.bind({ portal: 'p', statement: 's', values: ['acme', 'x'] })), 'acme');
    assert.equal(first(serialize.bind({ values: ['žluť'] })), 'žluť');
    assert.equal(first(serialize.bind({ values: [null] })), null);
    assert.equal(first(serialize.bind({ values: [] })), undefined);
    assert.equal(first(serialize.bind({ values: [Buffer.from('bin')] })), undefined, 'a Buffer value goes in binary');
    fc.assert(fc.property(fc.uint8Array({ maxLength: 40 }), (bytes) => {
      const body = Buffer.concat([Buffer.from([0x42, 0, 0, 0, 0]), Buffer.from(bytes)]);
      const value = firstTextParameter(body, 5, body.length);
      assert.ok(value === undefined || value === null || typeof value === 'string');
    }));
  });

  it('splits a Parse into name and definition, and builds it again under another name', function () {
    const original = serialize.parse({ name: 'mine', text: 'SELECT $1::int, $2', types: [23, 25] });
    const parsed = parseParseMessage(original, 5, original.length);
    assert.equal(parsed.name, 'mine');
    assert.deepEqual(buildParse('mine', parsed.definition), original);
    const renamed = buildParse('pk_x', parsed.definition);
    assert.deepEqual(renamed, serialize.parse({ name: 'pk_x', text: 'SELECT $1::int, $2', types: [23, 25] }));
  });

  it('renames the statement of a Bind and keeps its portal, formats and values, wherever the Bind sits in its read', function () {
    const noNul = (maxLength: number): fc.Arbitrary<string> => fc.string({ maxLength, unit: 'grapheme' }).filter((s) => !s.includes('\0'));
    fc.assert(fc.property(noNul(8), noNul(12), fc.array(fc.option(fc.string({ maxLength: 20 }), { nil: null }), { maxLength: 5 }), fc.uint8Array({ maxLength: 9 }), fc.uint8Array({ maxLength: 9 }), (portal, serverName, values, before, after) => {
      const bind = serialize.bind({ portal, statement: 'client-name', values });
      const read = Buffer.concat([before, bind, after]);
      const start = before.length;
      const parsed = parseBindMessage(read, start + 5, start + bind.length);
      assert.equal(parsed.statement, 'client-name');
      assert.deepEqual(renameBind(read, start, parsed, start + bind.length, statementNameBytes(serverName)), serialize.bind({ portal, statement: serverName, values }));
    }));
  });

  it('builds Describe and Close messages as pg-protocol does', function () {
    assert.deepEqual(buildDescribeStatement('pk_1'), serialize.describe({ type: 'S', name: 'pk_1' }));
    assert.deepEqual(buildCloseStatement('pk_1'), serialize.close({ type: 'S', name: 'pk_1' }));
    assert.deepEqual(buildClosePortal('none'), serialize.close({ type: 'P', name: 'none' }));
    const target = serialize.describe({ type: 'S', name: 'q' });
    assert.deepEqual(parseTargetMessage(target, 5, target.length), { target: 0x53, name: 'q' });
    assert.deepEqual(PARSE_COMPLETE, Buffer.from('3100000004', 'hex'));
  });

  it('rejects malformed bodies with a ProtocolError', function () {
    const parse = serialize.parse({ name: 'a', text: 'SELECT 1', types: [23] });
    assert.throws(() => parseParseMessage(parse, 5, parse.length - 1), ProtocolError);
    assert.throws(() => parseParseMessage(Buffer.from('P\0\0\0\x06ab', 'latin1'), 5, 7), ProtocolError);
    assert.throws(() => parseBindMessage(Buffer.from('B\0\0\0\x06p\0', 'latin1'), 5, 7), ProtocolError);
    assert.throws(() => parseTargetMessage(Buffer.from('D\0\0\0\x05S', 'latin1'), 5, 6), ProtocolError);
  });
});
