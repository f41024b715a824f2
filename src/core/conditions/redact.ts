/**
 * Keeps secrets out of what the controller writes where anyone with read
 * access sees it (status, Events, logs): the known secret values themselves,
 * and the password of any URL with credentials (`scheme://user:password@`).
 * Pure.
 */

const URL_USERINFO = /([a-z][a-z0-9+.-]*:\/\/[^/\s:@]*):[^@\s/]*@/gi;

/** `text` with every occurrence of `secrets` and every URL password replaced by `***`. */
export function redactSecrets(text: string, secrets: readonly string[] = []): string {
  let out = text.replace(URL_USERINFO, '$1:***@');
  // Longest first, so a secret that contains another is replaced whole.
  for (const secret of [...secrets].filter((s) => s.length >= 3).sort((a, b) => b.length - a.length)) {
    out = out.split(secret).join('***');
  }
  return out;
}
