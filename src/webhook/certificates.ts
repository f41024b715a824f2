/**
 * The webhook's self-managed serving CA and certificate. One Secret holds
 * them for every replica; any replica may create or rotate it, and optimistic
 * concurrency (create fails with 409 if it exists, replace carries the
 * resourceVersion) makes racing replicas converge on one CA: the loser
 * re-reads and adopts the winner's. The caBundle of the
 * MutatingWebhookConfiguration only ever grows by a CA before any serving
 * certificate uses it, and loses a CA only when it has expired.
 */
import { PatchStrategy, setHeaderOptions, type AdmissionregistrationV1Api, type CoreV1Api, type V1Secret } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import { bundleHolds, coversNames, issuedBy, mergeBundles, splitPemBundle, validityOf } from '../pki/bundle.ts';
import { createCertificateAuthority, issueCertificate, type CertificateBundle } from '../pki/certificates.ts';
import { planRotation, type RotationAction, type RotationPolicy, type StoredCertificateState } from '../pki/rotation.ts';

/** Annotation on the Secret: when the staged next CA entered the caBundle. */
export const NEXT_CA_STAGED_AT_ANNOTATION = 'poolkeeper.dev/next-ca-staged-at';
/** Backdating absorbs clock skew between the replicas and the API server. */
const BACKDATE_MS = 5 * 60 * 1000;
const DAY_MS = 86_400_000;
const MAX_ATTEMPTS = 8;

/** What a replica serves with and what clients must trust. */
export interface ServingMaterial {
  certPem: string;
  keyPem: string;
  /** Every CA clients should trust now (PEM bundle). */
  caBundlePem: string;
}

/** Where the certificates live and whom they name. */
export interface SelfManagedCertificateOptions {
  namespace: string;
  secretName: string;
  webhookConfigurationName: string;
  /** Names the API server reaches the webhook under, e.g. `poolkeeper-webhook.poolkeeper-system.svc`. */
  dnsNames: string[];
  ipAddresses: string[];
  policy: RotationPolicy;
}

/** The Kubernetes APIs the manager uses. */
export interface CertificateApis {
  core: CoreV1Api;
  admission: AdmissionregistrationV1Api;
}

/** The Secret's contents, decoded. */
interface StoredCertificates {
  ca?: CertificateBundle;
  nextCa?: CertificateBundle & { stagedAt: Date };
  serving?: CertificateBundle;
  bundle: string;
}

/** HTTP status of a client-node error, if it is one. */
export function apiStatus(err: unknown): number | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'number' ? code : undefined;
}

function decode(secret: V1Secret, key: string): string | undefined {
  const value = secret.data?.[key];
  return value === undefined ? undefined : Buffer.from(value, 'base64').toString('utf8');
}

function bundleOf(certPem: string | undefined, keyPem: string | undefined): CertificateBundle | undefined {
  if (!certPem || !keyPem) return undefined;
  try {
    return { certPem, keyPem, notAfter: validityOf(certPem).notAfter };
  } catch {
    return undefined; // unparseable: treated as absent, so it is regenerated
  }
}

function parseSecret(secret: V1Secret): StoredCertificates {
  const stagedAt = secret.metadata?.annotations?.[NEXT_CA_STAGED_AT_ANNOTATION];
  const next = bundleOf(decode(secret, 'next-ca.crt'), decode(secret, 'next-ca.key'));
  const ca = bundleOf(decode(secret, 'ca.crt'), decode(secret, 'ca.key'));
  const serving = bundleOf(decode(secret, 'tls.crt'), decode(secret, 'tls.key'));
  return {
    ...(ca ? { ca } : {}),
    ...(next && stagedAt && !Number.isNaN(Date.parse(stagedAt)) ? { nextCa: { ...next, stagedAt: new Date(stagedAt) } } : {}),
    ...(serving ? { serving } : {}),
    bundle: decode(secret, 'ca-bundle.crt') ?? '',
  };
}

function safe<T>(fn: () => T, fallback: T): T {
  try {
    return fn();
  } catch {
    return fallback;
  }
}

/** Creates and rotates the webhook's CA and serving certificate in one shared Secret. */
export class SelfManagedCertificates {
  private readonly apis: CertificateApis;
  private readonly options: SelfManagedCertificateOptions;
  private readonly logger: Logger;

  constructor(apis: CertificateApis, options: SelfManagedCertificateOptions, logger: Logger) {
    if (options.policy.servingValidityDays <= options.policy.servingRenewBeforeDays) throw new Error('servingValidityDays must exceed servingRenewBeforeDays');
    if (options.policy.caValidityDays <= options.policy.caRenewBeforeDays) throw new Error('caValidityDays must exceed caRenewBeforeDays');
    this.apis = apis;
    this.options = options;
    this.logger = logger;
  }

  /** The decision inputs for what is stored. */
  stateOf(stored: StoredCertificates): StoredCertificateState {
    const { dnsNames, ipAddresses } = this.options;
    const validity = (b: CertificateBundle): { notBefore: Date; notAfter: Date } => validityOf(b.certPem);
    const entries = splitPemBundle(stored.bundle).flatMap((pem) => safe(() => [validityOf(pem)], []));
    return {
      ...(stored.ca ? { ca: validity(stored.ca) } : {}),
      ...(stored.nextCa ? { nextCa: { ...validity(stored.nextCa), stagedAt: stored.nextCa.stagedAt } } : {}),
      ...(stored.serving ? {
        serving: {
          ...validity(stored.serving),
          issuedByCa: stored.ca !== undefined && safe(() => issuedBy(stored.serving!.certPem, stored.ca!.certPem), false),
          namesMatch: safe(() => coversNames(stored.serving!.certPem, dnsNames, ipAddresses), false),
        },
      } : {}),
      bundle: {
        entries,
        holdsCa: stored.ca !== undefined && safe(() => bundleHolds(stored.bundle, stored.ca!.certPem), false),
        holdsNextCa: stored.nextCa !== undefined && safe(() => bundleHolds(stored.bundle, stored.nextCa!.certPem), false),
      },
    };
  }

  private async issueServing(ca: CertificateBundle, now: Date): Promise<CertificateBundle> {
    const notBefore = new Date(now.getTime() - BACKDATE_MS);
    // Never outlive the CA.
    const caDaysLeft = (ca.notAfter.getTime() - notBefore.getTime()) / DAY_MS;
    const validityDays = Math.min(this.options.policy.servingValidityDays, caDaysLeft);
    return issueCertificate(ca, {
      commonName: this.options.dnsNames[0] ?? 'poolkeeper-webhook',
      dnsNames: this.options.dnsNames,
      ipAddresses: this.options.ipAddresses,
      usage: 'server',
      validityDays,
      notBefore,
    });
  }

  private newCa(now: Date): Promise<CertificateBundle> {
    return createCertificateAuthority(`poolkeeper-webhook-ca-${now.toISOString()}`, this.options.policy.caValidityDays, new Date(now.getTime() - BACKDATE_MS));
  }

  /** Applies one rotation step to `stored`. */
  private async apply(action: RotationAction, stored: StoredCertificates, now: Date): Promise<StoredCertificates> {
    switch (action) {
      case 'Create': {
        const ca = await this.newCa(now);
        return { ca, serving: await this.issueServing(ca, now), bundle: mergeBundles(now, stored.bundle, ca.certPem) };
      }
      case 'StageNextCa': {
        const next = await this.newCa(now);
        return { ...stored, nextCa: { ...next, stagedAt: now }, bundle: mergeBundles(now, stored.bundle, next.certPem) };
      }
      case 'PromoteNextCa': {
        const ca = stored.nextCa!;
        return { ca, serving: await this.issueServing(ca, now), bundle: mergeBundles(now, stored.bundle, ca.certPem) };
      }
      case 'RenewServing':
        return { ...stored, serving: await this.issueServing(stored.ca!, now) };
      case 'RebuildBundle':
        return { ...stored, bundle: mergeBundles(now, stored.bundle, stored.ca?.certPem ?? '', stored.nextCa?.certPem ?? '') };
      case 'None':
        return stored;
    }
  }

  private secretBody(stored: StoredCertificates, resourceVersion?: string): V1Secret {
    const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');
    const data: Record<string, string> = { 'ca-bundle.crt': b64(stored.bundle) };
    if (stored.ca) Object.assign(data, { 'ca.crt': b64(stored.ca.certPem), 'ca.key': b64(stored.ca.keyPem) });
    if (stored.serving) Object.assign(data, { 'tls.crt': b64(stored.serving.certPem), 'tls.key': b64(stored.serving.keyPem) });
    if (stored.nextCa) Object.assign(data, { 'next-ca.crt': b64(stored.nextCa.certPem), 'next-ca.key': b64(stored.nextCa.keyPem) });
    return {
      apiVersion: 'v1',
      kind: 'Secret',
      type: 'kubernetes.io/tls',
      metadata: {
        name: this.options.secretName,
        namespace: this.options.namespace,
        labels: { 'app.kubernetes.io/name': 'poolkeeper', 'app.kubernetes.io/component': 'webhook' },
        annotations: stored.nextCa ? { [NEXT_CA_STAGED_AT_ANNOTATION]: stored.nextCa.stagedAt.toISOString() } : {},
        ...(resourceVersion ? { resourceVersion } : {}),
      },
      data,
    };
  }

  private async readSecret(): Promise<V1Secret | undefined> {
    try {
      return await this.apis.core.readNamespacedSecret({ name: this.options.secretName, namespace: this.options.namespace });
    } catch (err) {
      if (apiStatus(err) === 404) return undefined;
      throw err;
    }
  }

  /**
   * Brings the Secret up to date for `now` (creating it on first start) and
   * returns what to serve. Safe to call from every replica at once.
   */
  async ensure(now: Date): Promise<ServingMaterial> {
    for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt += 1) {
      const secret = await this.readSecret();
      const stored = secret ? parseSecret(secret) : { bundle: '' };
      let action = planRotation(this.stateOf(stored), now, this.options.policy);
      if (action === 'PromoteNextCa' && !(await this.webhookTrusts(stored.nextCa!.certPem))) {
        // The API server must trust the next CA before any certificate from it is served.
        await this.syncCaBundle(stored.bundle, now);
        action = (await this.webhookTrusts(stored.nextCa!.certPem)) ? action : 'None';
      }
      if (action === 'None' && secret) return { certPem: stored.serving!.certPem, keyPem: stored.serving!.keyPem, caBundlePem: stored.bundle };
      const next = await this.apply(action, stored, now);
      try {
        if (secret) {
          await this.apis.core.replaceNamespacedSecret({ name: this.options.secretName, namespace: this.options.namespace, body: this.secretBody(next, secret.metadata?.resourceVersion) });
        } else {
          await this.apis.core.createNamespacedSecret({ namespace: this.options.namespace, body: this.secretBody(next) });
        }
        this.logger.info({ action, secret: this.options.secretName }, 'webhook certificates updated');
      } catch (err) {
        // Another replica wrote first: re-read and adopt (or re-plan on) its result.
        if (apiStatus(err) === 409) continue;
        throw err;
      }
    }
    throw new Error(`webhook certificates did not settle after ${MAX_ATTEMPTS} attempts`);
  }

  private async webhookTrusts(caPem: string): Promise<boolean> {
    try {
      const config = await this.apis.admission.readMutatingWebhookConfiguration({ name: this.options.webhookConfigurationName });
      const webhooks = config.webhooks ?? [];
      return webhooks.length > 0 && webhooks.every((w) => safe(() => bundleHolds(Buffer.from(w.clientConfig.caBundle ?? '', 'base64').toString('utf8'), caPem), false));
    } catch (err) {
      if (apiStatus(err) === 404) return false;
      throw err;
    }
  }

  /**
   * Makes every webhook of the configuration trust `bundlePem` (merged with
   * what it trusts already, minus expired CAs). Returns true if it patched.
   */
  async syncCaBundle(bundlePem: string, now: Date): Promise<boolean> {
    for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt += 1) {
      let config;
      try {
        config = await this.apis.admission.readMutatingWebhookConfiguration({ name: this.options.webhookConfigurationName });
      } catch (err) {
        if (apiStatus(err) === 404) {
          this.logger.warn({ name: this.options.webhookConfigurationName }, 'MutatingWebhookConfiguration not found; caBundle not patched');
          return false;
        }
        throw err;
      }
      const ops: { op: string; path: string; value: string }[] = [];
      (config.webhooks ?? []).forEach((webhook, index) => {
        const current = Buffer.from(webhook.clientConfig.caBundle ?? '', 'base64').toString('utf8');
        const merged = mergeBundles(now, bundlePem, current);
        if (merged !== current) ops.push({ op: 'add', path: `/webhooks/${index}/clientConfig/caBundle`, value: Buffer.from(merged, 'utf8').toString('base64') });
      });
      if (ops.length === 0) return false;
      try {
        await this.apis.admission.patchMutatingWebhookConfiguration(
          { name: this.options.webhookConfigurationName, body: [{ op: 'test', path: '/metadata/resourceVersion', value: config.metadata?.resourceVersion }, ...ops] },
          setHeaderOptions('Content-Type', PatchStrategy.JsonPatch),
        );
        this.logger.info({ name: this.options.webhookConfigurationName, webhooks: ops.length }, 'caBundle patched');
        return true;
      } catch (err) {
        const status = apiStatus(err);
        if (status === 409 || status === 422) continue; // changed under us: re-read
        throw err;
      }
    }
    throw new Error(`caBundle of ${this.options.webhookConfigurationName} did not settle after ${MAX_ATTEMPTS} attempts`);
  }

  /** ensure() then syncCaBundle(): what each replica runs at start and periodically. */
  async reconcile(now: Date): Promise<ServingMaterial> {
    const material = await this.ensure(now);
    await this.syncCaBundle(material.caBundlePem, now);
    return material;
  }
}
