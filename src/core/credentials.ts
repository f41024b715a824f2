/**
 * The credentials generation: a short stable hash of a Secret's data, computed
 * the same way by the controller (from the API) and the sidecar (from its
 * mounted files), so each can tell which credentials the other uses.
 */
import { createHash } from 'node:crypto';

/** sha256 over `key=value\n` lines in sorted key order; first 16 hex chars. */
export function credentialsGeneration(data: Readonly<Record<string, string | Uint8Array>>): string {
  const hash = createHash('sha256');
  for (const key of Object.keys(data).sort()) {
    const value = data[key];
    hash.update(`${key}=`);
    hash.update(typeof value === 'string' ? Buffer.from(value, 'utf8') : (value ?? new Uint8Array()));
    hash.update('\n');
  }
  return hash.digest('hex').slice(0, 16);
}
