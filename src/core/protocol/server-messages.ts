/**
 * Builders for the few backend messages the sidecar sends itself (its own
 * login handshake and its own errors) and readers for the few it inspects.
 */
import { ProtocolError } from './errors.ts';
import { readCString } from './startup.ts';

function message(type: string, body: Buffer): Buffer {
  const out = Buffer.allocUnsafe(5 + body.length);
  out[0] = type.charCodeAt(0);
  out.writeInt32BE(4 + body.length, 1);
  body.copy(out, 5);
  return out;
}

/** AuthenticationOk: the client is logged in. */
export function authenticationOk(): Buffer {
  return message('R', Buffer.from([0, 0, 0, 0]));
}

/** ParameterStatus: a run-time parameter the client should know (server_version, client_encoding, ...). */
export function parameterStatus(name: string, value: string): Buffer {
  return message('S', Buffer.from(`${name}\0${value}\0`, 'utf8'));
}

/** BackendKeyData: what the client must quote in a CancelRequest. */
export function backendKeyData(processId: number, secretKey: number): Buffer {
  const body = Buffer.alloc(8);
  body.writeInt32BE(processId, 0);
  body.writeInt32BE(secretKey, 4);
  return message('K', body);
}

/** CommandComplete with its command tag. */
export function commandComplete(tag: string): Buffer {
  return message('C', Buffer.from(`${tag}\0`, 'utf8'));
}

/** Transaction status of ReadyForQuery: idle, in a transaction block, in a failed one. */
export type TransactionStatus = 'I' | 'T' | 'E';

/** ReadyForQuery with its transaction status byte. */
export function readyForQuery(status: TransactionStatus): Buffer {
  return message('Z', Buffer.from(status, 'latin1'));
}

/**
 * NegotiateProtocolVersion: the newest protocol version we speak (major 3,
 * `newestMinor`) and the options we ignored. The field is the whole version
 * (196608 for 3.0), as PostgreSQL sends it; libpq 18 reads a bare minor as a
 * downgrade to a pre-3 protocol and refuses it.
 */
export function negotiateProtocolVersion(newestMinor: number, unsupportedOptions: readonly string[]): Buffer {
  const head = Buffer.alloc(8);
  head.writeInt32BE((3 << 16) | newestMinor, 0);
  head.writeInt32BE(unsupportedOptions.length, 4);
  return message('v', Buffer.concat([head, ...unsupportedOptions.map((o) => Buffer.from(`${o}\0`, 'utf8'))]));
}

/** Fields of an ErrorResponse or NoticeResponse. */
export interface NoticeFields {
  severity: 'ERROR' | 'FATAL' | 'PANIC' | 'WARNING' | 'NOTICE' | 'DEBUG' | 'INFO' | 'LOG';
  /** Five-character SQLSTATE. */
  code: string;
  message: string;
  detail?: string;
  hint?: string;
  /** Source file, line and routine of the server code that raised it (drivers may act on the routine). */
  file?: string;
  line?: string;
  routine?: string;
}

function noticeBody(fields: NoticeFields): Buffer {
  if (!/^[0-9A-Z]{5}$/.test(fields.code)) throw new Error(`invalid SQLSTATE ${fields.code}`);
  const parts = [`S${fields.severity}`, `V${fields.severity}`, `C${fields.code}`, `M${fields.message}`];
  if (fields.detail !== undefined) parts.push(`D${fields.detail}`);
  if (fields.hint !== undefined) parts.push(`H${fields.hint}`);
  if (fields.file !== undefined) parts.push(`F${fields.file}`);
  if (fields.line !== undefined) parts.push(`L${fields.line}`);
  if (fields.routine !== undefined) parts.push(`R${fields.routine}`);
  return Buffer.from(`${parts.map((p) => p.replace(/\0/g, '')).join('\0')}\0\0`, 'utf8');
}

/** ErrorResponse with severity, SQLSTATE and message. */
export function errorResponse(fields: NoticeFields): Buffer {
  return message('E', noticeBody(fields));
}

/** NoticeResponse with severity, SQLSTATE and message. */
export function noticeResponse(fields: NoticeFields): Buffer {
  return message('N', noticeBody(fields));
}

/** Parses the body of an ErrorResponse/NoticeResponse into its one-letter fields. */
export function parseNoticeFields(body: Buffer): Record<string, string> {
  const fields: Record<string, string> = {};
  let offset = 0;
  while (offset < body.length && body[offset] !== 0) {
    const code = String.fromCharCode(body[offset]!);
    const [value, next] = readCString(body, offset + 1);
    fields[code] = value;
    offset = next;
  }
  if (offset >= body.length) throw new ProtocolError('malformed-body', 'unterminated notice fields');
  return fields;
}

/** Parses a ParameterStatus body. */
export function parseParameterStatus(body: Buffer): [string, string] {
  const [name, next] = readCString(body, 0);
  const [value] = readCString(body, next);
  return [name, value];
}

/**
 * Name of the prepared statement in a Parse message body (empty for the
 * unnamed statement); reads only up to the first NUL.
 */
export function parseStatementName(buffer: Buffer, bodyStart: number, end: number): string {
  const nul = buffer.indexOf(0, bodyStart);
  if (nul < 0 || nul >= end) throw new ProtocolError('malformed-body', 'Parse message without a statement name');
  return nul === bodyStart ? '' : buffer.toString('utf8', bodyStart, nul);
}
