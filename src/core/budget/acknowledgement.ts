/**
 * Acknowledgements from two channels: the PoolMember status (durable, written
 * by the sidecar at its heartbeat) and the acknowledgement channel to the
 * leading controller (at once, kept in that controller's memory only). Pure.
 */
import { createHmac } from 'node:crypto';
import type { Acknowledgement } from './types.ts';

/**
 * The later of two acknowledgements of one pod: the higher table generation,
 * then the higher grant generation; on a tie `b` (the channel's, which is
 * never older than what the sidecar wrote before it).
 */
export function laterAcknowledgement(a: Acknowledgement | undefined, b: Acknowledgement | undefined): Acknowledgement | undefined {
  if (!a) return b;
  if (!b) return a;
  const ta = a.tableGeneration ?? -1;
  const tb = b.tableGeneration ?? -1;
  if (ta !== tb) return ta > tb ? a : b;
  return a.generation > b.generation ? a : b;
}

/** What a sidecar sends the leading controller over the acknowledgement channel. */
export interface ChannelAcknowledgement {
  namespace: string;
  /** The pod's (and its PoolMember's) name. */
  pod: string;
  /** The pod's UID: an acknowledgement never outlives its pod into a new pod of the same name. */
  podUid: string;
  /** The table generation the acknowledged grant was derived from. */
  tableGeneration: number;
  /** The sidecar's grant generation (status.acknowledgedGeneration). */
  generation: number;
  connections: number;
  held: number;
}

/** The one text both sides sign: every field, in a fixed order. */
export function acknowledgementText(a: ChannelAcknowledgement): string {
  return ['poolkeeper-ack-v1', a.namespace, a.pod, a.podUid, a.tableGeneration, a.generation, a.connections, a.held].join('\n');
}

/**
 * Checks the shape of a decoded request body: a clear message naming the
 * first field that is wrong, or the acknowledgement with its signature.
 */
export function parseChannelAcknowledgement(body: unknown): { ok: true; ack: ChannelAcknowledgement; signature: string } | { ok: false; error: string } {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return { ok: false, error: 'body must be a JSON object' };
  const o = body as Record<string, unknown>;
  for (const k of ['namespace', 'pod', 'podUid', 'signature'] as const) {
    if (typeof o[k] !== 'string' || o[k] === '' || (o[k]).length > 253) return { ok: false, error: `${k} must be a non-empty string of at most 253 characters` };
  }
  for (const k of ['tableGeneration', 'generation', 'connections', 'held'] as const) {
    if (typeof o[k] !== 'number' || !Number.isSafeInteger(o[k]) || (o[k]) < 0) return { ok: false, error: `${k} must be a non-negative integer` };
  }
  const ack: ChannelAcknowledgement = {
    namespace: o['namespace'] as string, pod: o['pod'] as string, podUid: o['podUid'] as string,
    tableGeneration: o['tableGeneration'] as number, generation: o['generation'] as number,
    connections: o['connections'] as number, held: o['held'] as number,
  };
  return { ok: true, ack, signature: o['signature'] as string };
}

/** As the planner reads it. */
export function toAcknowledgement(a: ChannelAcknowledgement): Acknowledgement {
  return { generation: a.generation, connections: a.connections, held: a.held, drained: false, tableGeneration: a.tableGeneration };
}

/** Signs an acknowledgement with its PoolMember's key (HMAC-SHA256, base64url): the sidecar signs, the controller checks. */
export function signAcknowledgement(ack: ChannelAcknowledgement, key: string): string {
  return createHmac('sha256', key).update(acknowledgementText(ack)).digest('base64url');
}

/**
 * Where a sidecar POSTs its acknowledgements: the table's `acknowledgeTo`
 * (http://address:port/term, the term new each time a controller starts
 * leading) with the endpoint's path after it.
 */
export function acknowledgementUrl(acknowledgeTo: string): string {
  return `${acknowledgeTo.replace(/\/+$/, '')}/v1/acknowledgements`;
}
