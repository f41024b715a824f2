/**
 * SCRAM channel binding as libpq does it (`channel_binding`): which SASL
 * mechanism and GS2 header a login uses, and the `tls-server-end-point`
 * binding data (RFC 5929), a hash of the server's certificate with the hash of
 * its signature algorithm (SHA-256 for MD5 and SHA-1). With it, a password
 * exchange relayed by anyone who ends the TLS connection before the server
 * (an interception with its own certificate) fails at the server.
 */
import { createHash } from 'node:crypto';

/** libpq's channel_binding values. */
export const CHANNEL_BINDING_MODES = ['disable', 'prefer', 'require'] as const;

/** One of libpq's channel_binding values. */
export type ChannelBindingMode = (typeof CHANNEL_BINDING_MODES)[number];

/** The SASL mechanism a login takes and its GS2 header, or why it cannot log in. */
export type SaslChoice =
  | { mechanism: 'SCRAM-SHA-256-PLUS'; gs2Header: 'p=tls-server-end-point,,' }
  | { mechanism: 'SCRAM-SHA-256'; gs2Header: 'y,,' | 'n,,' }
  | { refused: string; cause: 'channel-binding' | 'mechanism' };

/**
 * Picks the mechanism among those the server offers. `y` tells a server that
 * offers channel binding over this TLS connection that the client could have
 * bound but was not offered it, so a relay that strips SCRAM-SHA-256-PLUS from
 * the list is caught by the server (as libpq does).
 */
export function chooseSaslMethod(offered: readonly string[], tls: boolean, mode: ChannelBindingMode): SaslChoice {
  const plus = offered.includes('SCRAM-SHA-256-PLUS');
  if (mode !== 'disable' && tls && plus) return { mechanism: 'SCRAM-SHA-256-PLUS', gs2Header: 'p=tls-server-end-point,,' };
  if (mode === 'require') {
    return { cause: 'channel-binding', refused: tls ? 'channel binding is required (spec.database.channelBinding), but the server did not offer SCRAM-SHA-256-PLUS' : 'channel binding is required (spec.database.channelBinding), but SSL is not in use' };
  }
  if (!offered.includes('SCRAM-SHA-256')) return { cause: 'mechanism', refused: `no supported SASL mechanism among ${offered.filter(Boolean).join(', ')}` };
  return { mechanism: 'SCRAM-SHA-256', gs2Header: mode !== 'disable' && tls ? 'y,,' : 'n,,' };
}

/** Why a login that completed without SCRAM does not satisfy `mode`, if it does not. */
export function unboundLoginRefusal(mode: ChannelBindingMode, method: string): string | undefined {
  return mode === 'require' ? `channel binding is required (spec.database.channelBinding), but the server authenticated the sidecar with ${method}, which has none` : undefined;
}

// Signature algorithm OIDs (DER content bytes as hex) and the hash tls-server-end-point takes for each.
const SIGNATURE_HASHES: ReadonlyMap<string, string> = new Map([
  ['2a864886f70d010104', 'sha256'], // md5WithRSAEncryption: MD5 becomes SHA-256
  ['2a864886f70d010105', 'sha256'], // sha1WithRSAEncryption: SHA-1 becomes SHA-256
  ['2a864886f70d01010b', 'sha256'],
  ['2a864886f70d01010c', 'sha384'],
  ['2a864886f70d01010d', 'sha512'],
  ['2a864886f70d01010e', 'sha224'],
  ['2a8648ce3d0401', 'sha256'], // ecdsa-with-SHA1
  ['2a8648ce3d040301', 'sha224'],
  ['2a8648ce3d040302', 'sha256'],
  ['2a8648ce3d040303', 'sha384'],
  ['2a8648ce3d040304', 'sha512'],
]);
const RSASSA_PSS = '2a864886f70d01010a';
// Hash algorithm OIDs in RSASSA-PSS parameters.
const PSS_HASHES: ReadonlyMap<string, string> = new Map([
  ['2b0e03021a', 'sha256'], // SHA-1
  ['608648016503040201', 'sha256'],
  ['608648016503040202', 'sha384'],
  ['608648016503040203', 'sha512'],
  ['608648016503040204', 'sha224'],
]);

/** A DER element: its tag, where its content starts and ends. */
interface Element {
  tag: number;
  start: number;
  end: number;
}

function element(der: Buffer, at: number, limit: number): Element {
  if (at + 2 > limit) throw new Error('truncated certificate');
  const tag = der[at]!;
  let length = der[at + 1]!;
  let start = at + 2;
  if (length >= 0x80) {
    const bytes = length & 0x7f;
    if (bytes === 0 || bytes > 4 || start + bytes > limit) throw new Error('bad length in certificate');
    length = 0;
    for (let i = 0; i < bytes; i += 1) length = length * 256 + der[start + i]!;
    start += bytes;
  }
  if (start + length > limit) throw new Error('truncated certificate');
  return { tag, start, end: start + length };
}

function expect(der: Buffer, at: number, limit: number, tag: number): Element {
  const e = element(der, at, limit);
  if (e.tag !== tag) throw new Error(`unexpected tag 0x${e.tag.toString(16)} in certificate`);
  return e;
}

/**
 * The hash tls-server-end-point uses for a DER certificate, from its signature
 * algorithm; undefined when that algorithm names none (Ed25519, Ed448), for
 * which PostgreSQL cannot bind either.
 */
export function endPointHash(der: Buffer): string | undefined {
  const certificate = expect(der, 0, der.length, 0x30);
  const tbs = expect(der, certificate.start, certificate.end, 0x30);
  const algorithm = expect(der, tbs.end, certificate.end, 0x30);
  const oid = expect(der, algorithm.start, algorithm.end, 0x06);
  const oidHex = der.subarray(oid.start, oid.end).toString('hex');
  if (oidHex !== RSASSA_PSS) return SIGNATURE_HASHES.get(oidHex);
  // RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier DEFAULT sha1, ... }
  if (oid.end >= algorithm.end) return 'sha256';
  const params = expect(der, oid.end, algorithm.end, 0x30);
  if (params.start >= params.end || der[params.start] !== 0xa0) return 'sha256';
  const explicit = element(der, params.start, params.end);
  const hashAlgorithm = expect(der, explicit.start, explicit.end, 0x30);
  const hashOid = expect(der, hashAlgorithm.start, hashAlgorithm.end, 0x06);
  return PSS_HASHES.get(der.subarray(hashOid.start, hashOid.end).toString('hex'));
}

/**
 * The `c=` attribute of SCRAM's client-final-message: the GS2 header, and for
 * SCRAM-SHA-256-PLUS the server certificate's tls-server-end-point hash.
 * Throws when the certificate's signature algorithm names no hash.
 */
export function channelBindingAttribute(gs2Header: string, serverCertificateDer?: Buffer): string {
  if (!gs2Header.startsWith('p=')) return Buffer.from(gs2Header).toString('base64');
  if (serverCertificateDer === undefined || serverCertificateDer.length === 0) throw new Error('channel binding needs the server\'s certificate, and the TLS connection has none');
  const hash = endPointHash(serverCertificateDer);
  if (hash === undefined) throw new Error('the server certificate\'s signature algorithm names no hash for channel binding (tls-server-end-point), as with Ed25519: set spec.database.channelBinding to disable, or give the server an RSA or ECDSA certificate');
  return Buffer.concat([Buffer.from(gs2Header), createHash(hash).update(serverCertificateDer).digest()]).toString('base64');
}
