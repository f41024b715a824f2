/**
 * When to renew the webhook's CA and serving certificate, as a pure decision
 * on the stored validity windows and the time, so every replica reaches the
 * same answer and tests can walk a certificate's whole life in a loop.
 *
 * The CA rolls over in two steps so that no client ever sees a serving
 * certificate it does not trust: first the next CA is *staged* (appended to
 * the caBundle, still serving from the old one), then, once the bundle had
 * time to reach the API server, it is *promoted* (a serving certificate from
 * the new CA). The old CA stays in the bundle until it expires.
 */

/** A certificate's validity window. */
export interface Validity {
  notBefore: Date;
  notAfter: Date;
}

/** What is stored now, as far as the decision needs it. */
export interface StoredCertificateState {
  ca?: Validity;
  /** A staged next CA and when it entered the caBundle. */
  nextCa?: Validity & { stagedAt: Date };
  serving?: Validity & {
    /** Signed by `ca` (not by an older CA). */
    issuedByCa: boolean;
    /** Carries every DNS name and IP address the webhook is reached under. */
    namesMatch: boolean;
  };
  /** The trust bundle's certificates, and whether it holds `ca` and `nextCa`. */
  bundle: { entries: Validity[]; holdsCa: boolean; holdsNextCa: boolean };
}

/** Lifetimes and margins. */
export interface RotationPolicy {
  caValidityDays: number;
  servingValidityDays: number;
  /** Stage the next CA when the current one has less than this left. */
  caRenewBeforeDays: number;
  /** Reissue the serving certificate when it has less than this left. */
  servingRenewBeforeDays: number;
  /** How long a staged CA sits in the caBundle before certificates switch to it. */
  propagationSeconds: number;
}

/** Five-year CA, 90-day serving certificates, ten minutes for a caBundle to propagate. */
export const DEFAULT_ROTATION_POLICY: RotationPolicy = {
  caValidityDays: 5 * 365,
  servingValidityDays: 90,
  caRenewBeforeDays: 365,
  servingRenewBeforeDays: 30,
  propagationSeconds: 600,
};

/** What to do next; apply it, store it, and ask again until `None`. */
export type RotationAction =
  /** Nothing usable stored (or the CA already expired): new CA, bundle and serving certificate. */
  | 'Create'
  /** Generate the next CA and append it to the bundle; keep serving from the current one. */
  | 'StageNextCa'
  /** The staged CA has propagated: make it current and issue a serving certificate from it. */
  | 'PromoteNextCa'
  /** Issue a new serving certificate from the current CA. */
  | 'RenewServing'
  /** Rebuild the bundle: add a missing CA, drop expired ones. */
  | 'RebuildBundle'
  | 'None';

const DAY_MS = 86_400_000;

function validAt(cert: Validity, now: Date): boolean {
  return cert.notBefore.getTime() <= now.getTime() && now.getTime() < cert.notAfter.getTime();
}

/** Decides the next rotation step. */
export function planRotation(state: StoredCertificateState, now: Date, policy: RotationPolicy): RotationAction {
  const t = now.getTime();
  if (!state.ca || t >= state.ca.notAfter.getTime()) return 'Create';
  if (state.nextCa && t >= state.nextCa.notAfter.getTime()) return 'Create';
  if (!state.bundle.holdsCa || (state.nextCa && !state.bundle.holdsNextCa)) return 'RebuildBundle';
  if (state.nextCa && state.bundle.holdsNextCa && t - state.nextCa.stagedAt.getTime() >= policy.propagationSeconds * 1000) return 'PromoteNextCa';
  if (!state.nextCa && state.ca.notAfter.getTime() - t < policy.caRenewBeforeDays * DAY_MS) return 'StageNextCa';
  const serving = state.serving;
  if (!serving || !serving.issuedByCa || !serving.namesMatch || !validAt(serving, now)) return 'RenewServing';
  // Never outlive the CA that signed it: renew early if the CA would expire first.
  const deadline = Math.min(serving.notAfter.getTime(), state.ca.notAfter.getTime());
  if (deadline - t < policy.servingRenewBeforeDays * DAY_MS) return 'RenewServing';
  if (state.bundle.entries.some((entry) => t >= entry.notAfter.getTime())) return 'RebuildBundle';
  return 'None';
}
