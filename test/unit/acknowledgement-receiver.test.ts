/** The controller's acknowledgement endpoint, on loopback, with a controller double: who is heard, who is refused and how. */
import assert from 'node:assert/strict';
import { request } from 'node:http';
import pino from 'pino';
import { Registry } from 'prom-client';
import type { PoolMember } from '../../src/api/index.ts';
import { AcknowledgementLedger, receiverFor, type AcknowledgementReceiver, type AcknowledgingController } from '../../src/controller/acknowledgements.ts';
import { acknowledgementUrl, signAcknowledgement, type ChannelAcknowledgement } from '../../src/core/budget/index.ts';

const KEY = 'k'.repeat(43);

function member(uid: string): PoolMember {
  return {
    apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'PoolMember',
    metadata: { namespace: 'shop', name: 'web-1', ownerReferences: [{ apiVersion: 'v1', kind: 'Pod', name: 'web-1', uid }] },
    spec: { connection: 'orders', grant: { connections: 0, generation: 0 }, acknowledgementKey: KEY, tableFrom: 1 },
  } as unknown as PoolMember;
}

function post(port: number, path: string, body: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, method: 'POST', headers: { 'content-type': 'application/json' } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

describe('acknowledgement receiver', function () {
  let receiver: AcknowledgementReceiver;
  let port: number;
  const ledger = new AcknowledgementLedger();
  const heard: string[] = [];
  const controller: AcknowledgingController & { leading: boolean } = {
    ledger,
    member: (namespace, name) => (namespace === 'shop' && name === 'web-1' ? member('uid-1') : undefined),
    leading: true,
    acknowledged: (m) => heard.push(m.metadata.name ?? ''),
  };
  const ack: ChannelAcknowledgement = { namespace: 'shop', pod: 'web-1', podUid: 'uid-1', tableGeneration: 7, generation: 7, connections: 3, held: 2 };
  const signed = (a: ChannelAcknowledgement, key = KEY): string => JSON.stringify({ ...a, signature: signAcknowledgement(a, key) });

  before(async function () {
    receiver = receiverFor(() => controller, pino({ level: 'silent' }), new Registry());
    port = await receiver.listen('127.0.0.1', 0);
  });

  after(async function () {
    await receiver.close();
  });

  beforeEach(function () {
    ledger.clear();
    heard.length = 0;
    controller.leading = true;
  });

  it('records a signed acknowledgement of a known pod and wakes its reconcile', async function () {
    // The path a table names carries the leader's term before the endpoint.
    assert.equal((await post(port, new URL(acknowledgementUrl(`http://127.0.0.1:${port}/Jx3k9qLm`)).pathname, signed(ack))).status, 200);
    assert.deepEqual(ledger.get('uid-1'), { generation: 7, connections: 3, held: 2, drained: false, tableGeneration: 7 });
    assert.deepEqual(heard, ['web-1']);
    // An older one arriving late never replaces a newer one.
    assert.equal((await post(port, '/v1/acknowledgements', signed({ ...ack, tableGeneration: 5, generation: 5, connections: 9 }))).status, 200);
    assert.equal(ledger.get('uid-1')?.connections, 3);
  });

  it('a standby answers 503 and records nothing: the sidecar writes its status instead', async function () {
    controller.leading = false;
    const answer = await post(port, '/v1/acknowledgements', signed(ack));
    assert.equal(answer.status, 503);
    assert.match(answer.body, /does not lead/);
    assert.equal(ledger.size, 0);
  });

  it('refuses a wrong key (401), another pod under the name (409), a bad field (400, naming it), a large body (413) and other paths (404)', async function () {
    assert.equal((await post(port, '/v1/acknowledgements', signed(ack, 'x'.repeat(43)))).status, 401);
    assert.equal((await post(port, '/v1/acknowledgements', signed({ ...ack, podUid: 'uid-2' }))).status, 409);
    const bad = await post(port, '/v1/acknowledgements', JSON.stringify({ ...ack, held: 1.5, signature: 's' }));
    assert.equal(bad.status, 400);
    assert.match(bad.body, /held must be a non-negative integer/);
    assert.equal((await post(port, '/v1/acknowledgements', JSON.stringify({ ...ack, signature: 's'.repeat(5000) }))).status, 413);
    assert.equal((await post(port, '/v1/other', signed(ack))).status, 404);
    // A signature over other numbers does not carry these.
    assert.equal((await post(port, '/v1/acknowledgements', JSON.stringify({ ...ack, connections: 0, signature: signAcknowledgement(ack, KEY) }))).status, 401);
    assert.equal(ledger.size, 0);
    assert.deepEqual(heard, []);
  });
});
