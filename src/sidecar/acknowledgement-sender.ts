/**
 * The sidecar's end of the acknowledgement channel: one kept-alive HTTP
 * connection to the leading controller, one POST per acknowledgement. Any
 * answer but 200 (a standby, a controller whose cache has not seen this
 * pod's key yet, a timeout) returns false, and the agent writes its
 * PoolMember status instead, as without the channel.
 */
import { Agent, request } from 'node:http';
import { acknowledgementUrl, signAcknowledgement, type ChannelAcknowledgement } from '../core/budget/acknowledgement.ts';

/** How long one acknowledgement may take before the status write takes over. */
const TIMEOUT_MS = 2_000;

/** Sends acknowledgements to the address a grant table names. */
export class AcknowledgementSender {
  private readonly agent: Agent;

  /** `concurrency`: requests in flight at once (a sidecar sends one at a time; the bench's stand-in for a fleet, many). */
  constructor(concurrency = 1) {
    this.agent = new Agent({ keepAlive: true, maxSockets: concurrency });
  }

  /** POSTs `ack` signed with `key` to the table's `base` (http://host:port/term); true once the controller recorded it. */
  send(base: string, ack: ChannelAcknowledgement, key: string): Promise<boolean> {
    const body = JSON.stringify({ ...ack, signature: signAcknowledgement(ack, key) });
    return new Promise((resolve) => {
      let url: URL;
      try {
        url = new URL(acknowledgementUrl(base));
      } catch {
        resolve(false);
        return;
      }
      const req = request(url, { method: 'POST', agent: this.agent, timeout: TIMEOUT_MS, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode === 200));
        res.on('error', () => resolve(false));
      });
      req.on('timeout', () => req.destroy());
      req.on('error', () => resolve(false));
      req.end(body);
    });
  }

  /** Closes the kept-alive connection. */
  close(): void {
    this.agent.destroy();
  }
}
