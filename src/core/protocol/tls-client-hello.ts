/**
 * Reading the ALPN protocols out of a TLS ClientHello, for PostgreSQL 17's
 * direct TLS negotiation (libpq's sslnegotiation=direct): the client starts
 * the handshake without an SSLRequest, and the server must refuse one that
 * does not offer ALPN "postgresql" (a client of some other protocol that was
 * pointed at the port, or a proxy that does not know what it carries).
 * OpenSSL already refuses a ClientHello whose ALPN list lacks it; one with no
 * ALPN extension at all it would accept, so that case is read here first.
 */

/** First byte of a TLS handshake record: a connection that starts with it is a direct TLS one (a startup packet that long cannot exist). */
export const TLS_HANDSHAKE_RECORD = 0x16;

/** The ALPN protocol PostgreSQL 17 registers and requires on direct TLS connections. */
export const POSTGRESQL_ALPN = 'postgresql';

/** Bytes of ClientHello records gathered at most before giving up on reading them (real ones are a few KB). */
export const MAX_CLIENT_HELLO_BYTES = 64 * 1024;

const RECORD_HEADER = 5;
const HANDSHAKE_CLIENT_HELLO = 1;
const EXTENSION_ALPN = 16;

/** What the first bytes of a direct TLS connection say. */
export type ClientHelloReading =
  /** More bytes are needed. */
  | { kind: 'incomplete' }
  /** A whole ClientHello; `alpn`: the protocols it offers, undefined without the ALPN extension. */
  | { kind: 'client-hello'; alpn: readonly string[] | undefined }
  /** Not a ClientHello this reader understands: the TLS layer is left to judge (and refuse) it. */
  | { kind: 'unreadable'; reason: string };

/**
 * Reads the ClientHello at the start of `bytes` (what the client sent first),
 * reassembled from as many handshake records as it spans.
 */
export function readClientHello(bytes: Buffer): ClientHelloReading {
  const pieces: Buffer[] = [];
  let gathered = 0;
  let needed: number | undefined;
  let offset = 0;
  while (needed === undefined || gathered < needed) {
    if (offset + RECORD_HEADER > bytes.length) return tooLongOr(bytes, { kind: 'incomplete' });
    if (bytes[offset] !== TLS_HANDSHAKE_RECORD) return { kind: 'unreadable', reason: `a TLS record of type ${bytes[offset]} before the ClientHello's end` };
    const length = bytes.readUInt16BE(offset + 3);
    if (length === 0) return { kind: 'unreadable', reason: 'an empty handshake record' };
    if (offset + RECORD_HEADER + length > bytes.length) return tooLongOr(bytes, { kind: 'incomplete' });
    pieces.push(bytes.subarray(offset + RECORD_HEADER, offset + RECORD_HEADER + length));
    gathered += length;
    offset += RECORD_HEADER + length;
    if (needed === undefined && gathered >= 4) {
      const head = pieces.length === 1 ? pieces[0]! : Buffer.concat(pieces);
      if (head[0] !== HANDSHAKE_CLIENT_HELLO) return { kind: 'unreadable', reason: `handshake message ${head[0]} instead of a ClientHello` };
      needed = 4 + head.readUIntBE(1, 3);
      if (needed > MAX_CLIENT_HELLO_BYTES) return { kind: 'unreadable', reason: `a ClientHello of ${needed} bytes` };
    }
  }
  const message = pieces.length === 1 ? pieces[0]! : Buffer.concat(pieces);
  return parseClientHello(message.subarray(4, needed));
}

function tooLongOr(bytes: Buffer, reading: ClientHelloReading): ClientHelloReading {
  return bytes.length > MAX_CLIENT_HELLO_BYTES ? { kind: 'unreadable', reason: `no whole ClientHello in ${bytes.length} bytes` } : reading;
}

/** The body of a ClientHello handshake message (RFC 8446 4.1.2; RFC 5246 7.4.1.2 for the optional extensions). */
function parseClientHello(body: Buffer): ClientHelloReading {
  const malformed: ClientHelloReading = { kind: 'unreadable', reason: 'a malformed ClientHello' };
  let at = 2 + 32; // legacy_version, random
  if (at + 1 > body.length) return malformed;
  at += 1 + body[at]!; // legacy_session_id
  if (at + 2 > body.length) return malformed;
  at += 2 + body.readUInt16BE(at); // cipher_suites
  if (at + 1 > body.length) return malformed;
  at += 1 + body[at]!; // legacy_compression_methods
  if (at === body.length) return { kind: 'client-hello', alpn: undefined }; // no extensions (TLS 1.2 allows it)
  if (at + 2 > body.length) return malformed;
  const end = at + 2 + body.readUInt16BE(at);
  if (end !== body.length) return malformed;
  at += 2;
  while (at < end) {
    if (at + 4 > end) return malformed;
    const type = body.readUInt16BE(at);
    const length = body.readUInt16BE(at + 2);
    const dataStart = at + 4;
    const dataEnd = dataStart + length;
    if (dataEnd > end) return malformed;
    if (type === EXTENSION_ALPN) {
      if (length < 2 || dataStart + 2 + body.readUInt16BE(dataStart) !== dataEnd) return malformed;
      const protocols: string[] = [];
      for (let p = dataStart + 2; p < dataEnd;) {
        const nameEnd = p + 1 + body[p]!;
        if (body[p] === 0 || nameEnd > dataEnd) return malformed;
        protocols.push(body.toString('latin1', p + 1, nameEnd));
        p = nameEnd;
      }
      return { kind: 'client-hello', alpn: protocols };
    }
    at = dataEnd;
  }
  return { kind: 'client-hello', alpn: undefined };
}

/**
 * A fatal TLS alert no_application_protocol (RFC 7301 3.2), in a plaintext
 * record: what OpenSSL sends a client whose ALPN list lacks the server's
 * protocol, and what a direct TLS client without ALPN gets from the sidecar.
 */
export function noApplicationProtocolAlert(): Buffer {
  // Record type alert (21), legacy version TLS 1.2, length 2; level fatal (2), description 120.
  return Buffer.from([21, 3, 3, 0, 2, 2, 120]);
}
