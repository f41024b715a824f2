/**
 * The startup phase of a client connection: the untyped first message is a
 * StartupMessage, an SSLRequest, a GSSENCRequest or a CancelRequest.
 */
import { ProtocolError } from './errors.ts';

/** Protocol 3.0 as the StartupMessage encodes it (major << 16 | minor). */
export const PROTOCOL_3_0 = 196608;
/** Request codes of the special startup packets. */
export const SSL_REQUEST_CODE = 80877103;
export const GSSENC_REQUEST_CODE = 80877104;
export const CANCEL_REQUEST_CODE = 80877102;

/** A parsed startup-phase message. */
export type StartupPacket =
  | { kind: 'startup'; majorVersion: number; minorVersion: number; parameters: Record<string, string>; protocolOptions: string[] }
  | { kind: 'ssl-request' }
  | { kind: 'gssenc-request' }
  | { kind: 'cancel'; processId: number; secretKey: Buffer };

/**
 * Parses the body of a startup-phase message (the bytes after the int32
 * length). Throws ProtocolError on anything malformed.
 */
export function parseStartupPacket(body: Buffer): StartupPacket {
  if (body.length < 4) throw new ProtocolError('bad-startup', 'startup packet too short');
  const code = body.readInt32BE(0);
  if (code === SSL_REQUEST_CODE) {
    if (body.length !== 4) throw new ProtocolError('bad-startup', 'malformed SSLRequest');
    return { kind: 'ssl-request' };
  }
  if (code === GSSENC_REQUEST_CODE) {
    if (body.length !== 4) throw new ProtocolError('bad-startup', 'malformed GSSENCRequest');
    return { kind: 'gssenc-request' };
  }
  if (code === CANCEL_REQUEST_CODE) {
    // Protocol 3.2 allows keys up to 256 bytes; 3.0 uses 4.
    if (body.length < 12 || body.length > 8 + 256) throw new ProtocolError('bad-startup', 'malformed CancelRequest');
    return { kind: 'cancel', processId: body.readInt32BE(4), secretKey: Buffer.from(body.subarray(8)) };
  }
  const majorVersion = code >>> 16;
  const minorVersion = code & 0xffff;
  if (majorVersion !== 3) throw new ProtocolError('unsupported-protocol', `unsupported frontend protocol ${majorVersion}.${minorVersion}: server supports 3.0`);
  const entries = new Map<string, string>();
  const protocolOptions: string[] = [];
  let offset = 4;
  for (;;) {
    if (offset >= body.length) throw new ProtocolError('bad-startup', 'startup packet not terminated');
    if (body[offset] === 0) {
      offset += 1;
      break;
    }
    const [name, afterName] = readCString(body, offset);
    const [value, afterValue] = readCString(body, afterName);
    offset = afterValue;
    if (name.startsWith('_pq_.')) protocolOptions.push(name);
    else entries.set(name, value);
  }
  if (offset !== body.length) throw new ProtocolError('bad-startup', 'trailing bytes after startup parameters');
  // fromEntries defines own properties, so a key like __proto__ stays plain data.
  const parameters = Object.fromEntries(entries) as Record<string, string>;
  if (parameters.user === undefined || parameters.user === '') throw new ProtocolError('bad-startup', 'no PostgreSQL user name specified in startup packet');
  return { kind: 'startup', majorVersion, minorVersion, parameters, protocolOptions };
}

/** Reads a NUL-terminated UTF-8 string; returns it and the offset after the NUL. */
export function readCString(buffer: Buffer, offset: number, end: number = buffer.length): [string, number] {
  const nul = buffer.indexOf(0, offset);
  if (nul < 0 || nul >= end) throw new ProtocolError('malformed-body', 'unterminated string');
  return [buffer.toString('utf8', offset, nul), nul + 1];
}

/** Encodes a StartupMessage (tests and the sidecar's own probes). */
export function buildStartupMessage(parameters: Record<string, string>, version: number = PROTOCOL_3_0): Buffer {
  const parts: Buffer[] = [];
  for (const [k, v] of Object.entries(parameters)) parts.push(Buffer.from(`${k}\0${v}\0`, 'utf8'));
  parts.push(Buffer.from([0]));
  const payload = Buffer.concat(parts);
  const out = Buffer.alloc(8 + payload.length);
  out.writeInt32BE(out.length, 0);
  out.writeInt32BE(version, 4);
  payload.copy(out, 8);
  return out;
}

/** Encodes an SSLRequest, GSSENCRequest or CancelRequest. */
export function buildSpecialRequest(code: number, processId?: number, secretKey?: Buffer): Buffer {
  const key = code === CANCEL_REQUEST_CODE ? (secretKey ?? Buffer.alloc(4)) : Buffer.alloc(0);
  const out = Buffer.alloc(8 + (code === CANCEL_REQUEST_CODE ? 4 + key.length : 0));
  out.writeInt32BE(out.length, 0);
  out.writeInt32BE(code, 4);
  if (code === CANCEL_REQUEST_CODE) {
    out.writeInt32BE(processId ?? 0, 8);
    key.copy(out, 12);
  }
  return out;
}
