/**
 * The protocol framing: whole messages out of any chunking, a length guard,
 * startup-phase parsing and the sidecar's own backend messages.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  CANCEL_REQUEST_CODE, FrameReader, GSSENC_REQUEST_CODE, ProtocolError, SSL_REQUEST_CODE, UNTYPED,
  authenticationOk, backendKeyData, buildSpecialRequest, buildStartupMessage, errorResponse, isFrontendMessageType,
  negotiateProtocolVersion, noticeResponse, parameterStatus, parseNoticeFields, parseParameterStatus, parseStartupPacket,
  parseStatementName, readFrames, readyForQuery, type Frame, STREAM_PREFIX_BYTES, messageTypeTable,
} from '../../src/core/protocol/index.ts';

function typed(type: string, body: Buffer): Buffer {
  const out = Buffer.alloc(5 + body.length);
  out[0] = type.charCodeAt(0);
  out.writeInt32BE(4 + body.length, 1);
  body.copy(out, 5);
  return out;
}

function readAll(reader: FrameReader, chunks: Buffer[]): Frame[] {
  return chunks.flatMap((c) => readFrames(reader, c));
}

describe('protocol framing', function () {
  const stream = Buffer.concat([
    typed('Q', Buffer.from('SELECT 1\0')),
    typed('S', Buffer.alloc(0)),
    typed('d', Buffer.alloc(300, 7)),
    typed('X', Buffer.alloc(0)),
  ]);
  const expected = [
    { type: 'Q'.charCodeAt(0), body: Buffer.from('SELECT 1\0') },
    { type: 'S'.charCodeAt(0), body: Buffer.alloc(0) },
    { type: 'd'.charCodeAt(0), body: Buffer.alloc(300, 7) },
    { type: 'X'.charCodeAt(0), body: Buffer.alloc(0) },
  ];

  it('yields the same messages when the stream is split at every byte offset', function () {
    for (let cut = 0; cut <= stream.length; cut += 1) {
      const frames = readAll(new FrameReader(), [stream.subarray(0, cut), stream.subarray(cut)]);
      assert.deepEqual(frames, expected, `split at ${cut}`);
    }
  });

  it('yields the same messages when every message arrives one byte at a time', function () {
    const chunks = [...stream].map((b) => Buffer.from([b]));
    assert.deepEqual(readAll(new FrameReader(), chunks), expected);
  });

  it('reads an untyped startup packet split at every offset, then typed messages', function () {
    const startup = buildStartupMessage({ user: 'app', database: 'app' });
    const all = Buffer.concat([startup, typed('Q', Buffer.from('x\0'))]);
    for (let cut = 0; cut <= all.length; cut += 1) {
      const frames = readAll(new FrameReader({ startupPhase: true }), [all.subarray(0, cut), all.subarray(cut)]);
      assert.equal(frames.length, 2, `split at ${cut}`);
      assert.equal(frames[0]!.type, UNTYPED);
      assert.deepEqual(parseStartupPacket(frames[0]!.body), { kind: 'startup', majorVersion: 3, minorVersion: 0, parameters: { user: 'app', database: 'app' }, protocolOptions: [] });
      assert.equal(frames[1]!.type, 'Q'.charCodeAt(0));
    }
  });

  it('returns whole messages as views of the chunk when they fit (no copy)', function () {
    const reader = new FrameReader();
    reader.push(stream);
    assert.equal(reader.next(), true);
    assert.equal(reader.buffer, stream);
    assert.deepEqual([reader.start, reader.bodyStart, reader.end], [0, 5, 14]);
  });

  it('refuses a message longer than the limit with a typed error, before buffering it', function () {
    const reader = new FrameReader({ maxMessageBytes: 100 });
    reader.push(typed('d', Buffer.alloc(96)).subarray(0, 5));
    assert.throws(() => reader.next(), (e: unknown) => e instanceof ProtocolError && e.kind === 'message-too-large');
    const ok = new FrameReader({ maxMessageBytes: 100 });
    assert.equal(readFrames(ok, typed('d', Buffer.alloc(95))).length, 1);
  });

  it('refuses a length below 4 and a startup packet over 10000 bytes', function () {
    const bad = Buffer.from([0x51, 0, 0, 0, 3]);
    assert.throws(() => readFrames(new FrameReader(), bad), (e: unknown) => e instanceof ProtocolError && e.kind === 'bad-length');
    const huge = Buffer.alloc(8);
    huge.writeInt32BE(10_001, 0);
    assert.throws(() => readFrames(new FrameReader({ startupPhase: true }), huge), (e: unknown) => e instanceof ProtocolError && e.kind === 'bad-startup');
  });

  it('property: any messages, any chunking, the same messages out', function () {
    const messageArb = fc.record({ type: fc.integer({ min: 0x20, max: 0x7e }), body: fc.uint8Array({ maxLength: 600 }) });
    fc.assert(fc.property(fc.array(messageArb, { maxLength: 12 }), fc.array(fc.integer({ min: 1, max: 700 }), { maxLength: 30 }), (messages, cuts) => {
      const bytes = Buffer.concat(messages.map((m) => typed(String.fromCharCode(m.type), Buffer.from(m.body))));
      const chunks: Buffer[] = [];
      let offset = 0;
      for (const size of cuts) {
        if (offset >= bytes.length) break;
        chunks.push(bytes.subarray(offset, offset + size));
        offset += size;
      }
      chunks.push(bytes.subarray(offset));
      const reader = new FrameReader();
      const frames = readAll(reader, chunks);
      assert.deepEqual(frames, messages.map((m) => ({ type: m.type, body: Buffer.from(m.body) })));
      assert.equal(reader.buffered, 0);
    }), { numRuns: 300 });
  });

  it('property: reads into one reused buffer, pushed with their length, give the same messages', function () {
    const messageArb = fc.record({ type: fc.integer({ min: 0x20, max: 0x7e }), body: fc.uint8Array({ maxLength: 600 }) });
    fc.assert(fc.property(fc.array(messageArb, { maxLength: 12 }), fc.array(fc.integer({ min: 1, max: 700 }), { maxLength: 30 }), fc.integer({ min: 0, max: 255 }), (messages, cuts, garbage) => {
      const bytes = Buffer.concat(messages.map((m) => typed(String.fromCharCode(m.type), Buffer.from(m.body))));
      // Like DirectReadSocket: every read lands at offset 0 of the same buffer, stale bytes after it.
      const readBuffer = Buffer.alloc(700, garbage);
      const reader = new FrameReader();
      const frames: Frame[] = [];
      let offset = 0;
      for (let c = 0; offset < bytes.length; c += 1) {
        const size = Math.min(cuts[c] ?? 700, bytes.length - offset);
        bytes.copy(readBuffer, 0, offset, offset + size);
        offset += size;
        reader.push(readBuffer, size);
        while (reader.next()) frames.push({ type: reader.type, body: Buffer.from(reader.buffer.subarray(reader.bodyStart, reader.end)) });
        assert.equal(reader.remaining().length, 0);
      }
      assert.deepEqual(frames, messages.map((m) => ({ type: m.type, body: Buffer.from(m.body) })));
      assert.equal(reader.buffered, 0);
    }), { numRuns: 300 });
    assert.throws(() => new FrameReader().push(Buffer.alloc(4), 5), RangeError);
  });

  it('property: random bytes either frame or throw ProtocolError, never anything else', function () {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 200 }), fc.boolean(), (bytes, startup) => {
      const reader = new FrameReader({ startupPhase: startup, maxMessageBytes: 1000 });
      try {
        const frames = readFrames(reader, Buffer.from(bytes));
        for (const f of frames) {
          if (f.type === UNTYPED) {
            try {
              parseStartupPacket(f.body);
            } catch (e) {
              assert.ok(e instanceof ProtocolError);
            }
          }
        }
      } catch (e) {
        assert.ok(e instanceof ProtocolError, String(e));
      }
    }), { numRuns: 500 });
  });

  it('knows the frontend message types', function () {
    for (const t of 'BCdcfDEHFPpQSX') assert.equal(isFrontendMessageType(t.charCodeAt(0)), true, t);
    for (const t of 'ZKRTAa\0') assert.equal(isFrontendMessageType(t.charCodeAt(0)), false, t);
  });
});

describe('startup-phase parsing', function () {
  it('recognises SSLRequest, GSSENCRequest and CancelRequest', function () {
    const body = (b: Buffer): Buffer => b.subarray(4);
    assert.deepEqual(parseStartupPacket(body(buildSpecialRequest(SSL_REQUEST_CODE))), { kind: 'ssl-request' });
    assert.deepEqual(parseStartupPacket(body(buildSpecialRequest(GSSENC_REQUEST_CODE))), { kind: 'gssenc-request' });
    const key = Buffer.from([1, 2, 3, 4]);
    assert.deepEqual(parseStartupPacket(body(buildSpecialRequest(CANCEL_REQUEST_CODE, 4242, key))), { kind: 'cancel', processId: 4242, secretKey: key });
  });

  it('separates _pq_ protocol options from parameters and keeps the minor version', function () {
    const packet = parseStartupPacket(buildStartupMessage({ user: 'u', '_pq_.x': '1', application_name: 'a' }, (3 << 16) | 2).subarray(4));
    assert.deepEqual(packet, { kind: 'startup', majorVersion: 3, minorVersion: 2, parameters: { user: 'u', application_name: 'a' }, protocolOptions: ['_pq_.x'] });
  });

  it('refuses protocol 2, a missing user, an unterminated list and trailing bytes', function () {
    const kind = (k: string) => (e: unknown) => e instanceof ProtocolError && e.kind === k;
    assert.throws(() => parseStartupPacket(buildStartupMessage({ user: 'u' }, 2 << 16).subarray(4)), kind('unsupported-protocol'));
    assert.throws(() => parseStartupPacket(buildStartupMessage({ database: 'd' }).subarray(4)), kind('bad-startup'));
    const unterminated = buildStartupMessage({ user: 'u' }).subarray(4);
    assert.throws(() => parseStartupPacket(unterminated.subarray(0, unterminated.length - 1)), ProtocolError);
    assert.throws(() => parseStartupPacket(Buffer.concat([unterminated, Buffer.from([1])])), kind('bad-startup'));
    assert.throws(() => parseStartupPacket(Buffer.alloc(2)), kind('bad-startup'));
  });
});

describe('backend messages the sidecar sends', function () {
  it('encodes AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery', function () {
    assert.deepEqual(authenticationOk(), Buffer.from([0x52, 0, 0, 0, 8, 0, 0, 0, 0]));
    assert.deepEqual(readyForQuery('T'), Buffer.from([0x5a, 0, 0, 0, 5, 0x54]));
    const [ps] = readFrames(new FrameReader(), parameterStatus('server_version', '15.8'));
    assert.deepEqual(parseParameterStatus(ps!.body), ['server_version', '15.8']);
    const [k] = readFrames(new FrameReader(), backendKeyData(7, -2));
    assert.deepEqual([k!.type, k!.body.readInt32BE(0), k!.body.readInt32BE(4)], [0x4b, 7, -2]);
    const [v] = readFrames(new FrameReader(), negotiateProtocolVersion(0, ['_pq_.x']));
    assert.equal(v!.body.readInt32BE(4), 1);
    // The whole version, as PostgreSQL sends it: libpq 18 reads a bare minor as a downgrade below 3.0.
    assert.equal(v!.body.readInt32BE(0), 196608);
  });

  it('encodes ErrorResponse and NoticeResponse with SQLSTATE and round-trips the fields', function () {
    const [e] = readFrames(new FrameReader(), errorResponse({ severity: 'FATAL', code: '53300', message: 'no server connection within 30 s', hint: 'raise the grant' }));
    assert.equal(e!.type, 0x45);
    assert.deepEqual(parseNoticeFields(e!.body), { S: 'FATAL', V: 'FATAL', C: '53300', M: 'no server connection within 30 s', H: 'raise the grant' });
    const [n] = readFrames(new FrameReader(), noticeResponse({ severity: 'NOTICE', code: '00000', message: 'hi' }));
    assert.equal(n!.type, 0x4e);
    assert.throws(() => errorResponse({ severity: 'ERROR', code: 'bad', message: 'x' }));
  });

  it('reads the statement name of a Parse message', function () {
    const named = typed('P', Buffer.from('s1\0SELECT 1\0\0\0'));
    assert.equal(parseStatementName(named, 5, named.length), 's1');
    const unnamed = typed('P', Buffer.from('\0SELECT 1\0\0\0'));
    assert.equal(parseStatementName(unnamed, 5, unnamed.length), '');
    const broken = typed('P', Buffer.from('abc'));
    assert.throws(() => parseStatementName(broken, 5, broken.length), ProtocolError);
  });
});

describe('FrameReader streaming', function () {
  const message = (type: string, bodyLength: number, fill: number): Buffer => {
    const m = Buffer.alloc(5 + bodyLength, fill);
    m[0] = type.charCodeAt(0);
    m.writeInt32BE(4 + bodyLength, 1);
    return m;
  };

  /**
   * Feeds `stream` to `reader` in chunks of the sizes `cuts` cycles through,
   * hands `visit` every message or piece the reader yields, and returns the
   * messages rebuilt from what `visit` kept (whole, or pieces joined).
   */
  const feed = (reader: FrameReader, stream: Buffer, cuts: readonly number[], visit: () => 'skip' | 'keep', afterPush: () => void = () => undefined): Buffer[] => {
    const rebuilt: Buffer[] = [];
    let current: Buffer[] = [];
    let offset = 0;
    let cut = 0;
    while (offset < stream.length) {
      const size = Math.min(cuts[cut++ % cuts.length]!, stream.length - offset);
      reader.push(stream.subarray(offset, offset + size));
      offset += size;
      while (reader.next()) {
        if (visit() === 'skip') continue;
        const bytes = Buffer.from(reader.buffer.subarray(reader.start, reader.end));
        if (!reader.piece) {
          assert.equal(current.length, 0);
          rebuilt.push(bytes);
          continue;
        }
        if (reader.pieceFirst) assert.equal(current.length, 0, 'a first piece starts a message');
        current.push(bytes);
        if (reader.pieceLast) {
          rebuilt.push(Buffer.concat(current));
          current = [];
        }
      }
      afterPush();
    }
    return rebuilt;
  };

  it('delivers big streamable messages in pieces (a first piece with the header and a prefix), others whole, for any chunking', function () {
    const streamAbove = 4096;
    fc.assert(fc.property(
      fc.array(fc.record({ type: fc.constantFrom('D', 'd', 'Z', 'C'), size: fc.oneof(fc.nat(100), fc.integer({ min: 4000, max: 20_000 })) }), { minLength: 1, maxLength: 8 }),
      fc.array(fc.integer({ min: 1, max: 3000 }), { minLength: 1, maxLength: 40 }),
      (specs, cuts) => {
        const messages = specs.map((m, i) => message(m.type, m.size, i + 1));
        const stream = Buffer.concat(messages);
        const reader = new FrameReader({ streamAbove, streamable: messageTypeTable('Dd') });
        const rebuilt = feed(reader, stream, cuts, () => {
          if (!reader.piece) {
            const length = reader.end - reader.start;
            assert.ok(!('Dd'.includes(String.fromCharCode(reader.type)) && length > streamAbove), 'a big streamable message comes in pieces');
          } else if (reader.pieceFirst) {
            assert.equal(reader.bodyStart, reader.start + 5);
            assert.ok(reader.end - reader.bodyStart >= STREAM_PREFIX_BYTES, 'the first piece carries the prefix');
          } else assert.equal(reader.bodyStart, reader.start);
          return 'keep';
        }, () => {
          // Never more buffered than a header and a prefix, whatever the message size.
          assert.ok(reader.buffered <= 5 + STREAM_PREFIX_BYTES || !reader.streaming);
        });
        assert.deepEqual(rebuilt.map((b) => b.toString('hex')), messages.map((b) => b.toString('hex')));
      },
    ), { numRuns: 200 });
  });

  it('delivers a streamed message whole when asked at its first piece (the sidecar must rewrite it), the others unchanged, for any chunking', function () {
    const streamAbove = 4096;
    fc.assert(fc.property(
      fc.array(fc.record({ type: fc.constantFrom('P', 'D', 'Z'), size: fc.oneof(fc.nat(100), fc.integer({ min: 4000, max: 20_000 })) }), { minLength: 1, maxLength: 8 }),
      fc.array(fc.integer({ min: 1, max: 3000 }), { minLength: 1, maxLength: 40 }),
      (specs, cuts) => {
        const messages = specs.map((m, i) => message(m.type, m.size, i + 1));
        const stream = Buffer.concat(messages);
        const reader = new FrameReader({ streamAbove, streamable: messageTypeTable('PD') });
        const rebuilt = feed(reader, stream, cuts, () => {
          // Parses are gathered whole; Ds keep streaming.
          if (reader.piece && reader.pieceFirst && reader.type === 0x50) {
            reader.gatherWhole();
            return 'skip';
          }
          if (reader.piece) assert.notEqual(reader.type, 0x50);
          return 'keep';
        });
        assert.deepEqual(rebuilt.map((b) => b.toString('hex')), messages.map((b) => b.toString('hex')));
      },
    ), { numRuns: 200 });
    assert.throws(() => new FrameReader().gatherWhole(), /first piece/);
  });
});
