/**
 * readClientHello on ClientHellos that Node's own TLS client (OpenSSL)
 * sends, captured off a loopback socket, whole and cut into pieces.
 */
import assert from 'node:assert/strict';
import { createServer, type AddressInfo } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import { MAX_CLIENT_HELLO_BYTES, noApplicationProtocolAlert, readClientHello } from '../../src/core/protocol/index.ts';

/** The first bytes a TLS client with `options` sends: its ClientHello records. */
async function capturedClientHello(options: ConnectionOptions): Promise<Buffer> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    const received = new Promise<Buffer>((resolve) => server.once('connection', (socket) => {
      const chunks: Buffer[] = [];
      socket.on('data', (chunk: Buffer) => {
        chunks.push(chunk);
        const bytes = Buffer.concat(chunks);
        // One record is the whole ClientHello for these clients; wait for all of it.
        if (bytes.length >= 5 && bytes.length >= 5 + bytes.readUInt16BE(3)) {
          socket.destroy();
          resolve(bytes);
        }
      });
    }));
    const client = tlsConnect({ host: '127.0.0.1', port: (server.address() as AddressInfo).port, rejectUnauthorized: false, ...options });
    client.on('error', () => undefined);
    return await received;
  } finally {
    server.close();
  }
}

/** `bytes` as a sequence of handshake records of at most `size` bytes of fragment each. */
function refragment(bytes: Buffer, size: number): Buffer {
  const body = bytes.subarray(5, 5 + bytes.readUInt16BE(3));
  const records: Buffer[] = [];
  for (let at = 0; at < body.length; at += size) {
    const fragment = body.subarray(at, at + size);
    const header = Buffer.from([0x16, 3, 1, 0, 0]);
    header.writeUInt16BE(fragment.length, 3);
    records.push(header, fragment);
  }
  return Buffer.concat(records);
}

describe('readClientHello (direct TLS negotiation)', function () {
  it('reads the ALPN protocols a client offers, and their absence', async function () {
    assert.deepEqual(readClientHello(await capturedClientHello({ ALPNProtocols: ['postgresql'] })), { kind: 'client-hello', alpn: ['postgresql'] });
    assert.deepEqual(readClientHello(await capturedClientHello({ ALPNProtocols: ['h2', 'http/1.1'] })), { kind: 'client-hello', alpn: ['h2', 'http/1.1'] });
    assert.deepEqual(readClientHello(await capturedClientHello({})), { kind: 'client-hello', alpn: undefined });
    assert.deepEqual(readClientHello(await capturedClientHello({ ALPNProtocols: ['postgresql'], maxVersion: 'TLSv1.2' })), { kind: 'client-hello', alpn: ['postgresql'] });
  });

  it('asks for more until the ClientHello is whole, also across records', async function () {
    const hello = await capturedClientHello({ ALPNProtocols: ['postgresql'], servername: 'localhost' });
    for (let end = 0; end < hello.length; end += 1) assert.deepEqual(readClientHello(hello.subarray(0, end)), { kind: 'incomplete' }, `${end} bytes`);
    const split = refragment(hello, 100);
    assert.ok(split.length > hello.length + 5);
    for (const end of [1, 5, 6, 105, 108, split.length - 1]) assert.deepEqual(readClientHello(split.subarray(0, end)), { kind: 'incomplete' }, `${end} bytes`);
    assert.deepEqual(readClientHello(split), { kind: 'client-hello', alpn: ['postgresql'] });
    // Bytes after it (a client's next record) change nothing.
    assert.deepEqual(readClientHello(Buffer.concat([hello, Buffer.from([0x14, 3, 3, 0, 1, 1])])), { kind: 'client-hello', alpn: ['postgresql'] });
  });

  it('leaves what it cannot read to the TLS layer', async function () {
    const hello = await capturedClientHello({ ALPNProtocols: ['postgresql'] });
    const notHello = Buffer.from(hello);
    notHello[5] = 2; // a ServerHello
    assert.equal(readClientHello(notHello).kind, 'unreadable');
    const truncatedExtensions = Buffer.from(hello);
    truncatedExtensions.writeUInt16BE(hello.readUInt16BE(3) - 1, 3);
    truncatedExtensions.writeUIntBE(truncatedExtensions.readUIntBE(6, 3) - 1, 6, 3);
    assert.equal(readClientHello(truncatedExtensions.subarray(0, hello.length - 1)).kind, 'unreadable');
    assert.equal(readClientHello(Buffer.from([0x16, 3, 1, 0, 0])).kind, 'unreadable');
    assert.equal(readClientHello(Buffer.concat([Buffer.from([0x16, 3, 1, 0, 4, 1]), Buffer.from([0xff, 0xff, 0xff])])).kind, 'unreadable');
    // A ClientHello said to be longer than any real one, or records that never complete it, are not gathered without end.
    assert.equal(readClientHello(Buffer.from([0x16, 3, 1, 0, 4, 1, 1, 0, 0])).kind, 'unreadable');
    const first = Buffer.concat([Buffer.from([0x16, 3, 1, 0x80, 0, 1, 0, 0xf0, 0]), Buffer.alloc(0x8000 - 4)]);
    const endless = Buffer.concat([first, Buffer.from([0x16, 3, 1, 0xff, 0xff]), Buffer.alloc(40_000)]);
    assert.equal(readClientHello(endless.subarray(0, MAX_CLIENT_HELLO_BYTES)).kind, 'incomplete');
    assert.ok(endless.length > MAX_CLIENT_HELLO_BYTES);
    assert.equal(readClientHello(endless).kind, 'unreadable');
  });

  it('the refusal is a fatal no_application_protocol alert record', function () {
    assert.deepEqual([...noApplicationProtocolAlert()], [21, 3, 3, 0, 2, 2, 120]);
  });
});
