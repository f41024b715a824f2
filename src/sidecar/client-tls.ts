/**
 * TLS between an app and its sidecar (spec.sidecar.clientTLS: SelfSigned).
 *
 * The sidecar listens on the pod's loopback, where encryption protects
 * nothing; by default it answers SSLRequest "no". Some apps cannot be told
 * otherwise: a connection URL with `sslmode=require` baked into an image or a
 * provider's Secret, a driver whose TLS option starts the handshake whatever
 * the answer. For those the sidecar can answer "yes" with a certificate it
 * makes at start (and serve clients that start the handshake at once,
 * PostgreSQL 17's direct negotiation: see ClientSession). Nobody can verify
 * it, so clients that verify (sslmode=verify-ca, verify-full, or a root
 * certificate libpq finds) refuse it with their own clear error.
 */
import { createSecureContext, TLSSocket, type SecureContext } from 'node:tls';
import type { Duplex } from 'node:stream';

/** What the sidecar needs to accept TLS from apps. */
export interface ClientTls {
  readonly context: SecureContext;
}

/** Days the self-made certificate is valid: longer than any pod lives between restarts. */
const SELF_SIGNED_VALIDITY_DAYS = 3650;

/**
 * A key and a self-signed certificate for localhost, 127.0.0.1 and ::1, made
 * now. The X.509 toolkit is loaded only here, so sidecars without client TLS
 * do not pay its memory.
 */
export async function selfSignedClientTls(): Promise<ClientTls> {
  const { createCertificateAuthority, issueCertificate } = await import('../pki/certificates.ts');
  const ca = await createCertificateAuthority('poolkeeper sidecar (self-signed)', SELF_SIGNED_VALIDITY_DAYS);
  const leaf = await issueCertificate(ca, {
    commonName: 'localhost', dnsNames: ['localhost'], ipAddresses: ['127.0.0.1', '::1'], usage: 'server', validityDays: SELF_SIGNED_VALIDITY_DAYS,
  });
  return { context: createSecureContext({ cert: `${leaf.certPem}\n${ca.certPem}`, key: leaf.keyPem, minVersion: 'TLSv1.2' }) };
}

/**
 * Starts the server side of a TLS handshake over `socket`: an app's
 * connection that was just answered "S", or a direct TLS one whose first
 * bytes, `alreadyRead`, were read to tell (they go to the TLS layer first).
 * Everything read from `socket` from now on belongs to the TLS layer.
 * `socket` must have no 'data' listener left.
 */
export function acceptClientTls(socket: Duplex, tls: ClientTls, alreadyRead?: Buffer): TLSSocket {
  if (alreadyRead !== undefined && alreadyRead.length > 0) {
    // Back into the stream's buffer, which a new TLSSocket takes in before reading the connection, from a
    // net.Socket or a stream it wraps (a NativeSocket) alike; paused first, so that a stream still flowing
    // does not emit them to nobody. Both kinds are exercised by test:streams and the default run.
    socket.pause();
    socket.unshift(alreadyRead);
  }
  // ALPN: a client that offers any must offer "postgresql" (OpenSSL refuses it otherwise, as PostgreSQL does);
  // after an SSLRequest one that offers none is served too, as by PostgreSQL 17.
  return new TLSSocket(socket, { isServer: true, secureContext: tls.context, ALPNProtocols: ['postgresql'] });
}
