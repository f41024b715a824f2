/**
 * Typed protocol errors: the pump maps each kind to a SQLSTATE and a metric
 * label, so a malformed stream closes one client with a clear ErrorResponse.
 */

/** What was wrong with the bytes. */
export type ProtocolErrorKind =
  | 'message-too-large'
  | 'bad-length'
  | 'unknown-message-type'
  | 'bad-startup'
  | 'unsupported-protocol'
  | 'malformed-body';

/** A violation of the PostgreSQL v3 wire protocol by the peer. */
export class ProtocolError extends Error {
  readonly kind: ProtocolErrorKind;

  constructor(kind: ProtocolErrorKind, message: string) {
    super(message);
    this.name = 'ProtocolError';
    this.kind = kind;
  }
}
