/**
 * The extended-protocol messages the pooler rewrites for named prepared
 * statements (Parse, Bind, Describe, Close): a cheap test for "does this
 * message name a statement" that reads one or two bytes, and builders for the
 * rewritten messages. Unnamed statements are never parsed beyond that test.
 */
import { ProtocolError } from './errors.ts';

const PARSE = 0x50;
const BIND = 0x42;
const DESCRIBE = 0x44;
const CLOSE = 0x43;
const STATEMENT_TARGET = 0x53; // 'S'

const STATEMENT_MESSAGES = new Uint8Array(256);
for (const t of [PARSE, BIND, DESCRIBE, CLOSE]) STATEMENT_MESSAGES[t] = 1;

/** ParseComplete, as the server sends it. */
export const PARSE_COMPLETE: Buffer = Buffer.from([0x31, 0, 0, 0, 4]);

/** CloseComplete, as the server sends it. */
export const CLOSE_COMPLETE: Buffer = Buffer.from([0x33, 0, 0, 0, 4]);

/**
 * True if the frontend message (`type`, body at `bodyStart..end`) is a Parse,
 * a Bind, or a statement Describe/Close that names a non-empty prepared
 * statement. Reads at most the portal name of a Bind; everything else is one
 * or two byte comparisons.
 */
export function namesPreparedStatement(type: number, buffer: Buffer, bodyStart: number, end: number): boolean {
  if (STATEMENT_MESSAGES[type] !== 1 || bodyStart >= end) return false;
  switch (type) {
    case PARSE:
      return buffer[bodyStart] !== 0;
    case BIND: {
      const portalEnd = buffer[bodyStart] === 0 ? bodyStart : buffer.indexOf(0, bodyStart);
      return portalEnd >= 0 && portalEnd + 1 < end && buffer[portalEnd + 1] !== 0;
    }
    default:
      return buffer[bodyStart] === STATEMENT_TARGET && bodyStart + 1 < end && buffer[bodyStart + 1] !== 0;
  }
}

/** What a frontend message does to the unnamed prepared statement (see unnamedStatementEffect). */
export type UnnamedEffect = 'parse' | 'use' | 'close';

/**
 * 'parse' for a Parse of the unnamed statement, 'use' for a Bind or a
 * statement Describe of it, 'close' for a statement Close of it; undefined
 * for anything else. Reads the same bytes as namesPreparedStatement.
 */
export function unnamedStatementEffect(type: number, buffer: Buffer, bodyStart: number, end: number): UnnamedEffect | undefined {
  if (STATEMENT_MESSAGES[type] !== 1 || bodyStart >= end) return undefined;
  switch (type) {
    case PARSE:
      return buffer[bodyStart] === 0 ? 'parse' : undefined;
    case BIND: {
      const portalEnd = buffer[bodyStart] === 0 ? bodyStart : buffer.indexOf(0, bodyStart);
      return portalEnd >= 0 && portalEnd + 1 < end && buffer[portalEnd + 1] === 0 ? 'use' : undefined;
    }
    default:
      if (buffer[bodyStart] !== STATEMENT_TARGET || bodyStart + 1 >= end || buffer[bodyStart + 1] !== 0) return undefined;
      return type === DESCRIBE ? 'use' : 'close';
  }
}

/** Bytes a string is searched for its NUL in JavaScript before Buffer.indexOf takes over (a call into C++ costs more than a short loop). */
const SHORT_STRING = 64;

function cStringEnd(buffer: Buffer, offset: number, end: number): number {
  const loopEnd = Math.min(end, offset + SHORT_STRING);
  for (let i = offset; i < loopEnd; i++) if (buffer[i] === 0) return i;
  const nul = loopEnd < end ? buffer.indexOf(0, loopEnd) : -1;
  if (nul < 0 || nul >= end) throw new ProtocolError('malformed-body', 'unterminated string in an extended-protocol message');
  return nul;
}

/** A Parse message split into the statement name and what defines the statement. */
export interface ParsedParse {
  name: string;
  /** Query text, its NUL and the parameter type OIDs: the bytes that make two statements the same. */
  definition: Buffer;
}

/** Splits a Parse body. `definition` is a view into `buffer`; copy it to keep it. */
export function parseParseMessage(buffer: Buffer, bodyStart: number, end: number): ParsedParse {
  const nameEnd = cStringEnd(buffer, bodyStart, end);
  const textEnd = cStringEnd(buffer, nameEnd + 1, end);
  if (end - (textEnd + 1) < 2) throw new ProtocolError('malformed-body', 'Parse message without a parameter count');
  // Unsigned: PostgreSQL accepts up to 65,535 parameters.
  const count = buffer.readUInt16BE(textEnd + 1);
  if (textEnd + 3 + 4 * count !== end) throw new ProtocolError('malformed-body', 'Parse message with a bad parameter type list');
  return { name: buffer.toString('utf8', bodyStart, nameEnd), definition: buffer.subarray(nameEnd + 1, end) };
}

/** A Bind message split around its statement name. */
export interface ParsedBind {
  statement: string;
  /** Offset of the statement name inside the buffer. */
  statementStart: number;
  /** Offset just past the statement name's NUL. */
  afterStatement: number;
}

/** Finds the statement name of a Bind body (after the portal name). */
export function parseBindMessage(buffer: Buffer, bodyStart: number, end: number): ParsedBind {
  const portalEnd = cStringEnd(buffer, bodyStart, end);
  const statementEnd = cStringEnd(buffer, portalEnd + 1, end);
  return { statement: buffer.toString('utf8', portalEnd + 1, statementEnd), statementStart: portalEnd + 1, afterStatement: statementEnd + 1 };
}

/**
 * The first parameter of a Bind body as text: null for SQL NULL, undefined
 * when it is sent in binary or the body is malformed or has no parameters.
 */
export function firstTextParameter(buffer: Buffer, bodyStart: number, end: number): string | null | undefined {
  const portalEnd = buffer.indexOf(0, bodyStart);
  const statementEnd = portalEnd < 0 || portalEnd >= end ? -1 : buffer.indexOf(0, portalEnd + 1);
  if (statementEnd < 0 || statementEnd >= end) return undefined;
  let i = statementEnd + 1;
  if (i + 2 > end) return undefined;
  const formats = buffer.readInt16BE(i);
  if (formats < 0 || i + 2 + 2 * formats > end) return undefined;
  // One format code applies to every parameter; several, one each.
  if (formats > 0 && buffer.readInt16BE(i + 2) !== 0) return undefined;
  i += 2 + 2 * formats;
  if (i + 2 > end || buffer.readInt16BE(i) < 1) return undefined;
  i += 2;
  if (i + 4 > end) return undefined;
  const length = buffer.readInt32BE(i);
  if (length === -1) return null;
  if (length < 0 || i + 4 + length > end) return undefined;
  return buffer.toString('utf8', i + 4, i + 4 + length);
}

/** Target ('S' statement or 'P' portal) and name of a Describe or Close body. */
export function parseTargetMessage(buffer: Buffer, bodyStart: number, end: number): { target: number; name: string } {
  if (end - bodyStart < 2) throw new ProtocolError('malformed-body', 'Describe/Close message too short');
  const nameEnd = cStringEnd(buffer, bodyStart + 1, end);
  if (nameEnd + 1 !== end) throw new ProtocolError('malformed-body', 'trailing bytes after a Describe/Close name');
  return { target: buffer[bodyStart]!, name: buffer.toString('utf8', bodyStart + 1, nameEnd) };
}

function frame(type: number, parts: readonly (Buffer | string)[]): Buffer {
  let bodyLength = 0;
  for (const part of parts) bodyLength += typeof part === 'string' ? Buffer.byteLength(part, 'utf8') : part.length;
  const out = Buffer.allocUnsafe(5 + bodyLength);
  out[0] = type;
  out.writeInt32BE(4 + bodyLength, 1);
  let offset = 5;
  for (const part of parts) offset += typeof part === 'string' ? out.write(part, offset, 'utf8') : part.copy(out, offset);
  return out;
}

/** Parse of `definition` (text, NUL, parameter types) under `name`. */
export function buildParse(name: string, definition: Buffer): Buffer {
  return frame(PARSE, [`${name}\0`, definition]);
}

/**
 * The Bind message at `start..end` with its statement name replaced by the
 * name whose bytes, NUL included, are `name`. Copied straight from `buffer`,
 * with no views made: it runs for every Bind of a named statement in
 * transaction mode.
 */
export function renameBind(buffer: Buffer, start: number, bind: ParsedBind, end: number, name: Buffer): Buffer {
  const portal = bind.statementStart - (start + 5);
  const bodyLength = portal + name.length + (end - bind.afterStatement);
  const out = Buffer.allocUnsafe(5 + bodyLength);
  out[0] = BIND;
  out.writeInt32BE(4 + bodyLength, 1);
  buffer.copy(out, 5, start + 5, bind.statementStart);
  name.copy(out, 5 + portal);
  buffer.copy(out, 5 + portal + name.length, bind.afterStatement, end);
  return out;
}

/** A statement name as a Bind carries it: its UTF-8 bytes and a NUL. */
export function statementNameBytes(name: string): Buffer {
  return Buffer.from(`${name}\0`, 'utf8');
}

/** Describe of statement `name`. */
export function buildDescribeStatement(name: string): Buffer {
  return frame(DESCRIBE, [`S${name}\0`]);
}

/** Close of statement `name`. */
export function buildCloseStatement(name: string): Buffer {
  return frame(CLOSE, [`S${name}\0`]);
}

/** Close of portal `name` (closing a portal that does not exist is not an error: it still answers CloseComplete). */
export function buildClosePortal(name: string): Buffer {
  return frame(CLOSE, [`P${name}\0`]);
}
