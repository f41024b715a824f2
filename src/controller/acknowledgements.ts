/**
 * The acknowledgement channel (docs/protocol.md): sidecars on a grant table
 * POST each acknowledgement to the leading controller, which counts it at
 * once instead of waiting for the sidecar's PoolMember status write. At
 * thousands of pods those status writes are what a rebalance waits for: the
 * API server completes only a few hundred a second.
 *
 * Kept in memory only. The grant table is the durable record: a change is
 * written without its in-flight marks only after its acknowledgement was
 * seen, so a new leader that never received these counts conservatively
 * until the sidecars resend (they do when the table names a new leader) or
 * write their status at their next heartbeat.
 */
import { timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import { Counter, type Registry } from 'prom-client';
import { memberPodUid, type PoolMember } from '../api/index.ts';
import { laterAcknowledgement, parseChannelAcknowledgement, signAcknowledgement, toAcknowledgement, type Acknowledgement } from '../core/budget/index.ts';

/** Largest request body accepted (an acknowledgement is about 300 bytes). */
const MAX_BODY_BYTES = 4096;

/** The path sidecars POST to. */
export const ACKNOWLEDGEMENT_PATH = '/v1/acknowledgements';

/** Acknowledgements received over the channel, by pod UID. */
export class AcknowledgementLedger {
  private readonly byUid = new Map<string, Acknowledgement>();

  /** Keeps the later of what is stored and `ack`. */
  record(podUid: string, ack: Acknowledgement): void {
    this.byUid.set(podUid, laterAcknowledgement(this.byUid.get(podUid), ack)!);
  }

  /** What the channel said for the pod, if anything. */
  get(podUid: string): Acknowledgement | undefined {
    return this.byUid.get(podUid);
  }

  /**
   * Forgets a pod's entry once its PoolMember is gone or its status says as
   * much (`reported` with a table generation at least as high): then the
   * status carries it.
   */
  forget(podUid: string, reported?: { tableGeneration?: number | undefined; generation?: number | undefined }): void {
    const stored = this.byUid.get(podUid);
    if (!stored) return;
    if (reported === undefined || ((reported.tableGeneration ?? -1) >= (stored.tableGeneration ?? -1) && (reported.generation ?? -1) >= stored.generation)) this.byUid.delete(podUid);
  }

  /** Forgets everything (leadership lost: a later term starts from what is durable). */
  clear(): void {
    this.byUid.clear();
  }

  get size(): number {
    return this.byUid.size;
  }
}

/** What the receiver needs. */
export interface AcknowledgementReceiverDeps {
  ledger: Pick<AcknowledgementLedger, 'record'>;
  /** The cached PoolMember of a pod. */
  member: (namespace: string, name: string) => PoolMember | undefined;
  /** True while this replica leads: a standby answers 503 and the sidecar writes its status instead. */
  leading: () => boolean;
  /** Called after an acknowledgement was recorded, with the pod's PoolMember: reconcile its server. */
  accepted: (member: PoolMember) => void;
  logger: Logger;
  registry: Registry;
}

/** The HTTP endpoint sidecars acknowledge to. */
export class AcknowledgementReceiver {
  private readonly deps: AcknowledgementReceiverDeps;
  private readonly server: Server;
  private readonly requests: Counter<'result'>;

  constructor(deps: AcknowledgementReceiverDeps) {
    this.deps = deps;
    this.requests = new Counter({ name: 'poolkeeper_acknowledgements_received_total', help: 'Acknowledgements sidecars sent the controller directly, by result (accepted, rejected, not_leader, unknown_member, invalid).', labelNames: ['result'], registers: [deps.registry] });
    this.server = createServer({ keepAliveTimeout: 120_000, requestTimeout: 10_000, headersTimeout: 10_000 }, (req, res) => this.handle(req, res));
  }

  /** Listens; resolves to the port. */
  listen(host: string, port: number): Promise<number> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        this.server.off('error', reject);
        resolve((this.server.address() as AddressInfo).port);
      });
    });
  }

  /** Stops listening and closes kept-alive connections. */
  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const answer = (status: number, result: string, message?: string): void => {
      this.requests.inc({ result });
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(message === undefined ? { result } : { result, message }));
    };
    // The path may carry the leader's term before the endpoint (acknowledgementUrl): any term is heard.
    if (req.method !== 'POST' || !(req.url ?? '').split('?')[0]!.endsWith(ACKNOWLEDGEMENT_PATH)) {
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ message: `POST ${ACKNOWLEDGEMENT_PATH} only` }));
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (res.writableEnded) return;
      if (size > MAX_BODY_BYTES) {
        // Answered at once; the rest is read and dropped, and the connection closed after.
        res.setHeader('connection', 'close');
        answer(413, 'invalid', `body larger than ${MAX_BODY_BYTES} bytes`);
        chunks.length = 0;
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      if (res.writableEnded) return;
      let body: unknown;
      try {
        body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
      } catch {
        answer(400, 'invalid', 'body is not JSON');
        return;
      }
      const parsed = parseChannelAcknowledgement(body);
      if (!parsed.ok) return answer(400, 'invalid', parsed.error);
      if (!this.deps.leading()) return answer(503, 'not_leader', 'this replica does not lead; write the PoolMember status');
      const { ack, signature } = parsed;
      const member = this.deps.member(ack.namespace, ack.pod);
      const key = member?.spec.acknowledgementKey;
      const ownerUid = member && memberPodUid(member);
      // Not (yet) in this replica's cache, or a new pod under the name: the sidecar falls back to its status.
      if (!member || !key || !ownerUid || ownerUid !== ack.podUid) return answer(409, 'unknown_member', 'no PoolMember with an acknowledgement key for this pod in the controller\'s cache');
      const expected = Buffer.from(signAcknowledgement(ack, key));
      const given = Buffer.from(signature);
      if (expected.length !== given.length || !timingSafeEqual(expected, given)) {
        this.deps.logger.warn({ namespace: ack.namespace, pod: ack.pod }, 'acknowledgement with a wrong signature refused');
        return answer(401, 'rejected', 'signature does not match the PoolMember\'s acknowledgement key');
      }
      this.deps.ledger.record(ack.podUid, toAcknowledgement(ack));
      this.deps.accepted(member);
      answer(200, 'accepted');
    });
    req.on('error', () => req.destroy());
  }
}

/** What the receiver needs of the controller it serves. */
export interface AcknowledgingController {
  readonly ledger: Pick<AcknowledgementLedger, 'record'>;
  /** The pod's PoolMember: the cache's, or one this replica created that its cache has yet to show. */
  member(namespace: string, name: string): PoolMember | undefined;
  readonly leading: boolean;
  acknowledged(member: PoolMember): void;
}

/**
 * A receiver for the controller `current()` returns once it exists: the
 * receiver listens first, so that the address the controller writes into
 * the tables is known when the controller is built, and refuses (409) until
 * then.
 */
export function receiverFor(current: () => AcknowledgingController | undefined, logger: Logger, registry: Registry): AcknowledgementReceiver {
  return new AcknowledgementReceiver({
    ledger: { record: (uid, ack) => current()?.ledger.record(uid, ack) },
    member: (namespace, name) => current()?.member(namespace, name),
    leading: () => current()?.leading === true,
    accepted: (member) => current()?.acknowledged(member),
    logger,
    registry,
  });
}
