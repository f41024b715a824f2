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

/**
 * What looks wrong in a login the server refused, without saying what it is:
 * a user name or password that begins or ends with white space (most often
 * the newline of a file made with `echo` and `kubectl create secret
 * --from-file`, which base64 keeps). The server compares every byte; the
 * advice names the key, never the value.
 */
export function credentialsAdvice(username: string, password: string): string | undefined {
  const says = (value: string, key: string): string | undefined => {
    if (/[\r\n]$/.test(value)) return `the ${key} in the credentials Secret ends with a newline (a file made with echo, or kubectl create secret --from-file): the server compares it with the newline; write it without one (printf, or --from-literal)`;
    if (/^\s|\s$/.test(value)) return `the ${key} in the credentials Secret begins or ends with white space, which the server compares too`;
    return undefined;
  };
  return says(password, 'password') ?? says(username, 'user name');
}
