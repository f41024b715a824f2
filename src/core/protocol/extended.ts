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

function cStringEnd(buffer: Buffer, offset: number, end: number): number {
  const nul = buffer.indexOf(0, offset);
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
  const buffers = parts.map((p) => (typeof p === 'string' ? Buffer.from(p, 'utf8') : p));
  const bodyLength = buffers.reduce((n, b) => n + b.length, 0);
  const out = Buffer.allocUnsafe(5 + bodyLength);
  out[0] = type;
  out.writeInt32BE(4 + bodyLength, 1);
  let offset = 5;
  for (const b of buffers) offset += b.copy(out, offset);
  return out;
}

/** Parse of `definition` (text, NUL, parameter types) under `name`. */
export function buildParse(name: string, definition: Buffer): Buffer {
  return frame(PARSE, [`${name}\0`, definition]);
}

/** The Bind message at `start..end` with its statement name replaced by `statement`. */
export function renameBind(buffer: Buffer, start: number, bind: ParsedBind, end: number, statement: string): Buffer {
  return frame(BIND, [buffer.subarray(start + 5, bind.statementStart), `${statement}\0`, buffer.subarray(bind.afterStatement, end)]);
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
