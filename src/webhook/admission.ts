/**
 * AdmissionReview v1 for Pod CREATE: look up the DatabaseConnection the pod
 * names, let core/inject compute the patch, and answer with it and its
 * warnings. Transport-free so it can be tested and reinvoked directly.
 */
import { Counter, Histogram, type Registry } from 'prom-client';
import type { Logger } from 'pino';
import { computeInjection, connectionNameOf, type InjectableConnection, type InjectorSettings, type PodLike } from '../core/inject/index.ts';

/** Reads DatabaseConnections; undefined when it does not exist. */
export interface ConnectionLookup {
  get(namespace: string, name: string): Promise<InjectableConnection | undefined>;
}

/** The request half of an AdmissionReview v1 (only the fields read). */
export interface AdmissionRequest {
  uid: string;
  kind?: { group?: string; version?: string; kind?: string };
  resource?: { group?: string; version?: string; resource?: string };
  subResource?: string;
  operation?: string;
  namespace?: string;
  object?: unknown;
  dryRun?: boolean;
}

/** The response half of an AdmissionReview v1. */
export interface AdmissionResponse {
  uid: string;
  allowed: boolean;
  patchType?: 'JSONPatch';
  /** base64 of the JSON Patch. */
  patch?: string;
  warnings?: string[];
  status?: { code: number; message: string; reason?: string };
}

/** An AdmissionReview v1 as sent back to the API server. */
export interface AdmissionReviewResponse {
  apiVersion: 'admission.k8s.io/v1';
  kind: 'AdmissionReview';
  response: AdmissionResponse;
}

/** Thrown for a body that is not an AdmissionReview v1; the server answers 400. */
export class MalformedReviewError extends Error {}

/** Outcome label of `poolkeeper_webhook_admissions_total`. */
export type AdmissionResult = 'injected' | 'unchanged' | 'skipped' | 'no_connection' | 'lookup_failed' | 'denied';

/** The webhook's Prometheus metrics, registered in the registry passed in. */
export class AdmissionMetrics {
  readonly admissions: Counter<'result'>;
  readonly duration: Histogram;

  constructor(registry: Registry) {
    this.admissions = new Counter({ name: 'poolkeeper_webhook_admissions_total', help: 'Pod admissions handled, by result.', labelNames: ['result'], registers: [registry] });
    this.duration = new Histogram({
      name: 'poolkeeper_webhook_admission_duration_seconds', help: 'Time to answer one AdmissionReview.',
      buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5], registers: [registry],
    });
  }
}

// Kubernetes truncates long warnings; keep each one readable on its own.
const MAX_WARNING_LENGTH = 240;

function clip(warning: string): string {
  return warning.length <= MAX_WARNING_LENGTH ? warning : `${warning.slice(0, MAX_WARNING_LENGTH - 1)}…`;
}

function reviewResponse(response: AdmissionResponse): AdmissionReviewResponse {
  const { warnings, ...rest } = response;
  const clipped = (warnings ?? []).map(clip);
  return { apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview', response: clipped.length > 0 ? { ...rest, warnings: clipped } : rest };
}

/** Answers AdmissionReviews for Pod CREATE. */
export class PodAdmissionHandler {
  private readonly connections: ConnectionLookup;
  private readonly settings: InjectorSettings;
  private readonly logger: Logger;
  private readonly metrics: AdmissionMetrics | undefined;
  private readonly nativeSidecars: (() => boolean) | undefined;

  /** `nativeSidecars`, if given, decides the sidecar's mode at each admission instead of `settings` (it follows the nodes' kubelets). */
  constructor(connections: ConnectionLookup, settings: InjectorSettings, logger: Logger, metrics?: AdmissionMetrics, nativeSidecars?: () => boolean) {
    this.connections = connections;
    this.settings = settings;
    this.nativeSidecars = nativeSidecars;
    this.logger = logger;
    this.metrics = metrics;
  }

  /** Parses an AdmissionReview body and answers it. */
  async review(body: unknown): Promise<AdmissionReviewResponse> {
    const request = (body as { apiVersion?: unknown; kind?: unknown; request?: AdmissionRequest } | null);
    if (request?.kind !== 'AdmissionReview' || request.apiVersion !== 'admission.k8s.io/v1' || typeof request.request?.uid !== 'string') {
      throw new MalformedReviewError('expected an admission.k8s.io/v1 AdmissionReview with a request');
    }
    const end = this.metrics?.duration.startTimer();
    try {
      const { response, result } = await this.admit(request.request);
      this.metrics?.admissions.inc({ result });
      return reviewResponse(response);
    } finally {
      end?.();
    }
  }

  private async admit(request: AdmissionRequest): Promise<{ response: AdmissionResponse; result: AdmissionResult }> {
    const allow = (result: AdmissionResult, warnings: string[] = []): { response: AdmissionResponse; result: AdmissionResult } => ({ response: { uid: request.uid, allowed: true, warnings }, result });
    const isPodCreate = request.kind?.kind === 'Pod' && (request.kind.group ?? '') === '' && request.operation === 'CREATE' && !request.subResource;
    if (!isPodCreate) return allow('skipped');
    const pod = request.object as PodLike | undefined;
    const name = pod ? connectionNameOf(pod) : undefined;
    if (!pod || name === undefined) return allow('skipped');
    const namespace = request.namespace ?? pod.metadata?.namespace ?? 'default';
    const podName = pod.metadata?.name ?? `${pod.metadata?.generateName ?? ''}*`;

    let connection: InjectableConnection | undefined;
    try {
      connection = await this.connections.get(namespace, name);
    } catch (err) {
      this.logger.error({ err, namespace, connection: name, pod: podName }, 'could not read DatabaseConnection; admitting pod without sidecar');
      return allow('lookup_failed', [`poolkeeper: could not read DatabaseConnection ${name}; pod admitted without the sidecar and will be recreated by the controller`]);
    }
    if (!connection) {
      this.logger.warn({ namespace, connection: name, pod: podName }, 'pod names a DatabaseConnection that does not exist');
      return allow('no_connection', [`poolkeeper: DatabaseConnection ${namespace}/${name} does not exist; pod admitted without the sidecar`]);
    }
    const settings = this.nativeSidecars === undefined ? this.settings : { ...this.settings, nativeSidecars: this.nativeSidecars() };
    const result = computeInjection({ pod, connection, settings });
    const warnings = result.warnings.map((w) => `poolkeeper: ${w}`);
    if (result.errors.length > 0) {
      const message = `poolkeeper cannot inject its sidecar: ${result.errors.map((e) => `[${e.code}] ${e.message}`).join('; ')}`;
      this.logger.warn({ namespace, connection: name, pod: podName, errors: result.errors }, 'pod denied');
      return { response: { uid: request.uid, allowed: false, warnings, status: { code: 422, reason: 'Invalid', message } }, result: 'denied' };
    }
    if (result.skipped) return allow('skipped', warnings);
    if (result.patch.length === 0) return allow('unchanged', warnings);
    this.logger.info({ namespace, connection: name, pod: podName, consumer: result.consumer, ops: result.patch.length, dryRun: request.dryRun === true }, 'sidecar injected');
    return {
      response: { uid: request.uid, allowed: true, patchType: 'JSONPatch', patch: Buffer.from(JSON.stringify(result.patch)).toString('base64'), warnings },
      result: 'injected',
    };
  }
}
