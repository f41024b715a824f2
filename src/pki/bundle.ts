/**
 * PEM trust bundles: split, merge, prune, and facts about one certificate
 * (issuer, names, fingerprint) used to decide rotations.
 */
import { X509Certificate } from 'node:crypto';
import { isIP } from 'node:net';

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

/** The certificates of a PEM bundle, each as its own PEM block ending in a newline. */
export function splitPemBundle(bundle: string): string[] {
  return (bundle.match(PEM_CERTIFICATE) ?? []).map((block) => `${block}\n`);
}

/** SHA-256 fingerprint of a PEM certificate. */
export function fingerprint(certPem: string): string {
  return new X509Certificate(certPem).fingerprint256;
}

/** Validity window of a PEM certificate. */
export function validityOf(certPem: string): { notBefore: Date; notAfter: Date } {
  const cert = new X509Certificate(certPem);
  return { notBefore: new Date(cert.validFrom), notAfter: new Date(cert.validTo) };
}

/**
 * Union of bundles without duplicates or certificates expired at `now`,
 * oldest first. Monotone by design: a certificate leaves only by expiring,
 * so a replica acting on a stale read can never drop a CA still in use.
 */
export function mergeBundles(now: Date, ...bundles: string[]): string {
  const seen = new Map<string, { pem: string; notBefore: number }>();
  for (const bundle of bundles) {
    for (const pem of splitPemBundle(bundle)) {
      let cert: X509Certificate;
      try {
        cert = new X509Certificate(pem);
      } catch {
        continue; // garbage in a hand-edited caBundle must not block rotation
      }
      if (new Date(cert.validTo).getTime() <= now.getTime()) continue;
      seen.set(cert.fingerprint256, { pem, notBefore: new Date(cert.validFrom).getTime() });
    }
  }
  return [...seen.values()].sort((a, b) => a.notBefore - b.notBefore).map((e) => e.pem).join('');
}

/** True if `bundle` holds `certPem`. */
export function bundleHolds(bundle: string, certPem: string): boolean {
  const wanted = fingerprint(certPem);
  return splitPemBundle(bundle).some((pem) => {
    try {
      return fingerprint(pem) === wanted;
    } catch {
      return false;
    }
  });
}

/** True if `caPem` signed `certPem`. */
export function issuedBy(certPem: string, caPem: string): boolean {
  const cert = new X509Certificate(certPem);
  const ca = new X509Certificate(caPem);
  return cert.checkIssued(ca) && cert.verify(ca.publicKey);
}

/** True if the certificate names every DNS name and IP address given. */
export function coversNames(certPem: string, dnsNames: readonly string[], ipAddresses: readonly string[]): boolean {
  const cert = new X509Certificate(certPem);
  return dnsNames.every((name) => cert.checkHost(name, { wildcards: false }) !== undefined)
    && ipAddresses.every((ip) => isIP(ip) !== 0 && cert.checkIP(ip) !== undefined);
}
