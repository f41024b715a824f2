/**
 * The login check of each DatabaseConnection: its own credentials, against
 * its own database, once per credentials generation (and again after a
 * failure, or when an answer is old), never answered from another
 * DatabaseConnection's result on the same server. The same login reads the
 * server's connection settings, so every connection also learns the real
 * max_connections.
 */
import { credentialsAdvice } from '../core/credentials.ts';
import type { ServerSettings } from '../core/budget/index.ts';
import { steadyNow } from '../ops/clock.ts';
import type { Verification, VerificationFailure } from '../core/conditions/connection.ts';
import { redactSecrets } from '../core/conditions/redact.ts';
import type { DiscoveryTarget, LimitDiscovery } from './limit-discovery.ts';

/** A check's answer: the verification and, when the login worked, the server's settings. */
export interface CheckResult {
  verification: Verification;
  settings?: ServerSettings;
}

/** Timings of the verifier, in milliseconds. */
export interface VerifierOptions {
  /** How soon a failed check is tried again. */
  retryFailedMs?: number;
  /** How long a successful check stands while nothing changes (a password changed on the server alone). */
  recheckMs?: number;
}

/** SQLSTATE classes and codes of the failures a user can fix in the spec or the Secret. */
export function classifyLoginError(err: unknown): { reason: VerificationFailure; message: string } {
  const e = err as { code?: unknown; message?: unknown };
  const code = typeof e.code === 'string' ? e.code : undefined;
  const text = typeof e.message === 'string' ? e.message : String(err);
  if (code === '28P01' || code === '28000') return { reason: 'CredentialsRejected', message: `the server rejected the login: "${text}" (SQLSTATE ${code})` };
  if (code === '3D000') return { reason: 'DatabaseNotFound', message: `the server has no such database: "${text}" (SQLSTATE ${code})` };
  if (code && /^[0-9A-Z]{5}$/.test(code)) return { reason: 'ConnectionFailed', message: `the server refused the connection: "${text}" (SQLSTATE ${code})` };
  return { reason: 'ConnectionFailed', message: `cannot reach the server: ${code && !text.includes(code) ? `${code}: ` : ''}${text}` };
}

/**
 * Runs and remembers the checks. A check that is only due again (same
 * fingerprint, its answer old) is answered from the last result at once and
 * runs in the background: a server that does not answer (a host black-holed
 * from the controller's network) must not hold every rebalance for the
 * connect timeout each time its failed check is retried. `onRefreshed` is
 * told when a background check changed the answer, so its server is
 * reconciled again.
 */
export class ConnectionVerifier {
  private readonly discovery: LimitDiscovery;
  /** How soon a failed check is tried again (ms). */
  readonly retryFailedMs: number;
  private readonly recheckMs: number;
  private readonly onRefreshed: ((key: string) => void) | undefined;
  private readonly results = new Map<string, { fingerprint: string; at: number; result: CheckResult }>();
  /** Connections whose check runs in the background now. */
  private readonly refreshing = new Set<string>();

  constructor(discovery: LimitDiscovery, options: VerifierOptions = {}, onRefreshed?: (key: string) => void) {
    this.discovery = discovery;
    this.retryFailedMs = options.retryFailedMs ?? 15_000;
    this.recheckMs = options.recheckMs ?? 10 * 60_000;
    this.onRefreshed = onRefreshed;
  }

  /**
   * The check of connection `key` against `target`. `fingerprint` names what
   * was checked (credentials generation, address, database, TLS, tunnel): a
   * new one checks again at once, and is waited for.
   */
  async check(key: string, fingerprint: string, target: DiscoveryTarget, now = steadyNow()): Promise<CheckResult> {
    const previous = this.results.get(key);
    if (previous && previous.fingerprint === fingerprint) {
      const age = now - previous.at;
      const ok = previous.result.verification.state === 'ok';
      if (age < (ok ? this.recheckMs : this.retryFailedMs)) return previous.result;
      if (!this.refreshing.has(key)) {
        this.refreshing.add(key);
        void this.run(key, fingerprint, target, now).then((result) => {
          this.refreshing.delete(key);
          if (result !== undefined && !sameAnswer(previous.result, result)) this.onRefreshed?.(key);
        });
      }
      return previous.result;
    }
    // Superseded by a later check of another fingerprint: its answer is the one that stands.
    return (await this.run(key, fingerprint, target, now)) ?? this.results.get(key)!.result;
  }

  /** Runs one check and remembers it, unless a check of another fingerprint was remembered meanwhile (then undefined). */
  private async run(key: string, fingerprint: string, target: DiscoveryTarget, now: number): Promise<CheckResult | undefined> {
    let result: CheckResult;
    try {
      const settings = await this.discovery.check(target);
      this.discovery.remember(target.serverKey, settings, now);
      result = { verification: { state: 'ok' }, settings };
    } catch (err) {
      const failure = classifyLoginError(err);
      const advice = failure.reason === 'CredentialsRejected' ? credentialsAdvice(target.username, target.password) : undefined;
      const message = advice === undefined ? failure.message : `${failure.message}; ${advice}`;
      // A server message may echo what it was sent; it never gets the password, but be sure.
      result = { verification: { state: 'failed', reason: failure.reason, message: redactSecrets(message, [target.password]) } };
    }
    const latest = this.results.get(key);
    if (latest !== undefined && latest.fingerprint !== fingerprint && latest.at > now) return undefined;
    this.results.set(key, { fingerprint, at: now, result });
    return result;
  }

  /** Makes the results of `keys` due: the next check of each runs again (the server may have changed under them). */
  expire(keys: Iterable<string>): void {
    for (const key of keys) {
      const entry = this.results.get(key);
      if (entry) entry.at = -Infinity;
    }
  }

  /** The last result for `key`, whatever its age. */
  last(key: string): CheckResult | undefined {
    return this.results.get(key)?.result;
  }

  /** Forgets connections that are gone. */
  retain(keys: ReadonlySet<string>): void {
    for (const key of this.results.keys()) if (!keys.has(key)) this.results.delete(key);
  }
}

/** Whether two checks gave the same answer: the same verification and the same server settings. */
function sameAnswer(a: CheckResult, b: CheckResult): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}
