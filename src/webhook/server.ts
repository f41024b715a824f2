/**
 * The HTTPS endpoint the API server calls. The serving certificate can be
 * swapped while running (setSecureContext), so a rotation needs no restart
 * and no dropped connections.
 */
import { createServer, type Server } from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import { MalformedReviewError, type PodAdmissionHandler } from './admission.ts';

/** Path the MutatingWebhookConfiguration points at. */
export const MUTATE_PODS_PATH = '/mutate-pods';

/** Certificate and key as PEM. */
export interface ServingCertificate {
  certPem: string;
  keyPem: string;
}

/** Where and how to listen. */
export interface WebhookServerOptions {
  host: string;
  /** 0 picks a free port. */
  port: number;
  /** Largest accepted request body; AdmissionReviews of big pods stay well under 3 MiB. */
  maxBodyBytes?: number;
}

const DEFAULT_MAX_BODY_BYTES = 6 * 1024 * 1024;

/** HTTPS server for /mutate-pods, /healthz and /readyz. */
export class WebhookServer {
  private readonly handler: PodAdmissionHandler;
  private readonly logger: Logger;
  private readonly options: WebhookServerOptions;
  private readonly server: Server;
  private current: ServingCertificate;

  constructor(handler: PodAdmissionHandler, certificate: ServingCertificate, options: WebhookServerOptions, logger: Logger) {
    this.handler = handler;
    this.logger = logger;
    this.options = options;
    this.current = certificate;
    this.server = createServer({ cert: certificate.certPem, key: certificate.keyPem, minVersion: 'TLSv1.2' }, (req, res) => {
      this.route(req, res).catch((err: unknown) => {
        this.logger.error({ err }, 'webhook request failed');
        if (!res.headersSent) this.send(res, 500, { error: 'internal error' });
        else res.destroy();
      });
    });
    this.server.requestTimeout = 10_000;
    this.server.headersTimeout = 5_000;
  }

  /** Starts listening; resolves with the bound port. */
  listen(): Promise<number> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.options.port, this.options.host, () => {
        this.server.off('error', reject);
        resolve((this.server.address() as AddressInfo).port);
      });
    });
  }

  /** The bound port (after listen). */
  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }

  /** Serves new connections with `certificate`; open connections keep theirs. */
  updateCertificate(certificate: ServingCertificate): boolean {
    if (certificate.certPem === this.current.certPem && certificate.keyPem === this.current.keyPem) return false;
    this.server.setSecureContext({ cert: certificate.certPem, key: certificate.keyPem });
    this.current = certificate;
    this.logger.info('serving certificate reloaded');
    return true;
  }

  /** Stops accepting connections and closes idle ones. */
  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeIdleConnections();
    });
  }

  private send(res: ServerResponse, status: number, body: unknown): void {
    const text = JSON.stringify(body);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  private async readBody(req: IncomingMessage): Promise<Buffer | undefined> {
    const limit = this.options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of req) {
      size += (chunk as Buffer).length;
      if (size > limit) return undefined;
      chunks.push(chunk as Buffer);
    }
    return Buffer.concat(chunks);
  }

  private async route(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method === 'GET' && (path === '/healthz' || path === '/readyz')) {
      this.send(res, 200, { status: 'ok' });
      return;
    }
    if (path !== MUTATE_PODS_PATH) {
      this.send(res, 404, { error: 'not found' });
      return;
    }
    if (req.method !== 'POST') {
      this.send(res, 405, { error: 'POST only' });
      return;
    }
    const body = await this.readBody(req);
    if (!body) {
      this.send(res, 413, { error: 'request body too large' });
      req.destroy();
      return;
    }
    let review: unknown;
    try {
      review = JSON.parse(body.toString('utf8'));
    } catch {
      this.send(res, 400, { error: 'body is not JSON' });
      return;
    }
    try {
      this.send(res, 200, await this.handler.review(review));
    } catch (err) {
      if (err instanceof MalformedReviewError) {
        this.send(res, 400, { error: err.message });
        return;
      }
      throw err;
    }
  }
}
