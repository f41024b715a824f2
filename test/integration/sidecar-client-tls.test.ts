/**
 * TLS from apps to the sidecar (spec.sidecar.clientTLS: SelfSigned), with
 * real drivers: libpq (psql, psycopg2), asyncpg, pgjdbc and node-postgres ask
 * for TLS with their own "require" settings and get it; whether a session is
 * encrypted is what the client itself reports (psql's \conninfo, the socket's
 * TLS state), not assumed. Clients that verify the certificate refuse it with
 * their own error; a sidecar without clientTLS keeps answering "no".
 *
 * PostgreSQL 17's direct TLS negotiation (no SSLRequest, ALPN "postgresql")
 * with pgx v5 (test/drivers/pgx-probe, built once), asyncpg's direct_tls and
 * Node's own TLS client, with and without the ALPN protocol.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { Duplex } from 'node:stream';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { testEnvironment } from '../support/hooks.ts';
import { goProgram } from '../support/go-program.ts';
import { MissingPrerequisiteError } from '../../src/devenv/system.ts';
import { startTestSidecar, type TestSidecar } from '../support/sidecar-fixture.ts';
import { selfSignedClientTls } from '../../src/sidecar/client-tls.ts';
import { createCertificateAuthority } from '../../src/pki/certificates.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { buildStartupMessage, SSL_REQUEST_CODE } from '../../src/core/protocol/index.ts';

const env = testEnvironment();
const PYTHON = '/usr/bin/python3'; // Debian's: the one the python3-* driver packages belong to
const PGJDBC_JAR = '/usr/share/java/postgresql.jar';

interface Outcome { ok: boolean; stdout: string; stderr: string }

function run(command: string, args: string[], extraEnv: Record<string, string> = {}): Promise<Outcome> {
  return new Promise((resolve) => {
    execFile(command, args, { timeout: 90_000, env: { ...process.env, ...extraEnv } }, (err, stdout, stderr) => resolve({ ok: err === null, stdout, stderr }));
  });
}

const PGX_PROBE_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'drivers', 'pgx-probe');

/** What test/drivers/pgx-probe prints. */
interface PgxOutcome { ok: boolean; error?: string; tlsVersion?: string; alpn?: string; sum?: number; currentUser?: string; bigBytes?: number; bigRows?: number; cancel?: string; after?: number }

/** How a TLS client that starts the handshake at once (direct negotiation) fares. */
interface DirectOutcome { secure: boolean; alpn?: string | false | null; errorCode?: string; error?: string; received: Buffer }

/**
 * A direct TLS connection from Node's TLS client (OpenSSL) offering `alpn`;
 * once secure it sends `send` and collects what comes back until the
 * connection closes or `until` holds.
 */
function directTls(port: number, alpn: string[] | undefined, send?: Buffer, until?: (received: Buffer) => boolean, over?: Duplex): Promise<DirectOutcome> {
  return new Promise((resolve) => {
    const socket: TLSSocket = tlsConnect({ host: '127.0.0.1', port, rejectUnauthorized: false, ...(alpn === undefined ? {} : { ALPNProtocols: alpn }), ...(over === undefined ? {} : { socket: over }) });
    const outcome: DirectOutcome = { secure: false, received: Buffer.alloc(0) };
    const done = (): void => {
      socket.destroy();
      resolve(outcome);
    };
    socket.on('secureConnect', () => {
      outcome.secure = true;
      outcome.alpn = socket.alpnProtocol;
      if (send !== undefined) socket.write(send);
    });
    socket.on('data', (chunk: Buffer) => {
      outcome.received = Buffer.concat([outcome.received, chunk]);
      if (until?.(outcome.received) === true) done();
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      outcome.errorCode = err.code;
      outcome.error = err.message;
    });
    socket.on('close', done);
  });
}

/**
 * A TCP connection whose first write (a TLS client's ClientHello record) goes
 * out cut up: its first byte alone, then its handshake message re-cut into
 * records of 64 bytes, sent a few at a time; later writes go as they are.
 */
class TrickleFirstWrite extends Duplex {
  /** Writes made of the first one. */
  pieces = 0;
  private first = true;
  private readonly inner: Socket;

  constructor(inner: Socket) {
    super();
    this.inner = inner;
    inner.on('data', (chunk: Buffer) => this.push(chunk));
    inner.on('end', () => this.push(null));
    inner.on('error', (err) => this.destroy(err));
    inner.on('close', () => this.destroy());
  }

  override _read(): void {}

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    if (!this.first) {
      this.inner.write(chunk, callback);
      return;
    }
    this.first = false;
    const length = chunk.readUInt16BE(3);
    const records: Buffer[] = [];
    for (let at = 5; at < 5 + length; at += 64) {
      const fragment = chunk.subarray(at, Math.min(at + 64, 5 + length));
      records.push(Buffer.concat([Buffer.from([0x16, chunk[1]!, chunk[2]!, 0, fragment.length]), fragment]));
    }
    const recut = Buffer.concat([...records, chunk.subarray(5 + length)]);
    const pieces = [recut.subarray(0, 1), ...Array.from({ length: Math.ceil((recut.length - 1) / 150) }, (_, i) => recut.subarray(1 + i * 150, 1 + (i + 1) * 150))];
    const next = (): void => {
      const piece = pieces.shift();
      if (piece === undefined) {
        callback();
        return;
      }
      this.pieces += 1;
      this.inner.write(piece);
      setTimeout(next, 5);
    };
    next();
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.inner.end(callback);
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.inner.destroy();
    callback(error);
  }
}

/** The backend message types in `bytes`, in order. */
function messageTypes(bytes: Buffer): string {
  let types = '';
  for (let at = 0; at + 5 <= bytes.length; at += 1 + bytes.readInt32BE(at + 1)) types += String.fromCharCode(bytes[at]!);
  return types;
}

const SSL_REQUEST = Buffer.alloc(8);
SSL_REQUEST.writeInt32BE(8, 0);
SSL_REQUEST.writeInt32BE(SSL_REQUEST_CODE, 4);

/** A plain TCP connection to the sidecar: what it sends, and when it closes. */
async function rawConnection(port: number): Promise<{ socket: Socket; received: Buffer[]; closed: Promise<void> }> {
  const socket = netConnect({ host: '127.0.0.1', port });
  const received: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => received.push(chunk));
  const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
  socket.on('error', () => undefined);
  await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
  return { socket, received, closed };
}

const PROTOCOL_ERRORS = 'poolkeeper_sidecar_errors_total{kind="client-protocol"}';

/** A metric's value; `name` with its labels as the registry prints them. */
async function metric(sidecar: TestSidecar, name: string): Promise<number> {
  const text = await sidecar.registry.metrics();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line === undefined ? 0 : Number(line.split(' ')[1]);
}

describe('TLS from apps to the sidecar (clientTLS: SelfSigned)', function () {
  let postgres: PostgresServer;
  let tlsSidecar: TestSidecar;
  let plainSidecar: TestSidecar;
  let scratch: string;

  before(async function () {
    postgres = await env.postgres();
    scratch = mkdtempSync(join(tmpdir(), 'poolkeeper-client-tls-'));
    tlsSidecar = await startTestSidecar(postgres, { grant: 2, clientTls: await selfSignedClientTls() });
    plainSidecar = await startTestSidecar(postgres, { grant: 2 });
  });

  after(async function () {
    await tlsSidecar?.stop();
    await plainSidecar?.stop();
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  });

  function conninfo(sidecar: TestSidecar, sslmode: string, extra = ''): string {
    return `host=127.0.0.1 port=${sidecar.port} dbname=app user=${sidecar.role.user} sslmode=${sslmode} ${extra}`;
  }

  it('libpq with sslmode=require gets TLS, says so, and is served', async function () {
    const before = await metric(tlsSidecar, 'poolkeeper_sidecar_client_tls_connections_total');
    const out = await run('psql', [conninfo(tlsSidecar, 'require'), '-X', '-At', '-c', '\\conninfo', '-c', 'SELECT 41 + 1']);
    assert.ok(out.ok, out.stderr);
    assert.match(out.stdout, /SSL connection \(protocol: TLSv1\.3/);
    assert.match(out.stdout, /^42$/m);
    assert.equal(await metric(tlsSidecar, 'poolkeeper_sidecar_client_tls_connections_total'), before + 1);
  });

  it('sslmode=prefer is encrypted too, and sslmode=disable stays plaintext', async function () {
    const prefer = await run('psql', [conninfo(tlsSidecar, 'prefer'), '-X', '-At', '-c', '\\conninfo']);
    assert.ok(prefer.ok, prefer.stderr);
    assert.match(prefer.stdout, /SSL connection/);
    const disable = await run('psql', [conninfo(tlsSidecar, 'disable'), '-X', '-At', '-c', '\\conninfo', '-c', 'SELECT 7']);
    assert.ok(disable.ok, disable.stderr);
    assert.doesNotMatch(disable.stdout, /SSL connection/);
    assert.match(disable.stdout, /^7$/m);
  });

  it('a client that verifies the certificate refuses it with its own error, and nothing else is affected', async function () {
    const otherCa = await createCertificateAuthority('some other CA', 1);
    const rootPath = join(scratch, 'root.crt');
    writeFileSync(rootPath, otherCa.certPem);
    for (const sslmode of ['verify-ca', 'verify-full']) {
      const out = await run('psql', [conninfo(tlsSidecar, sslmode, `sslrootcert=${rootPath}`), '-X', '-At', '-c', 'SELECT 1']);
      assert.equal(out.ok, false, `${sslmode} connected`);
      assert.match(out.stderr, /certificate verify failed/, sslmode);
    }
    const after = await run('psql', [conninfo(tlsSidecar, 'require'), '-X', '-At', '-c', 'SELECT 1']);
    assert.ok(after.ok, after.stderr);
  });

  it('a sidecar without clientTLS answers "no": libpq says the server does not support SSL', async function () {
    const out = await run('psql', [conninfo(plainSidecar, 'require'), '-X', '-At', '-c', 'SELECT 1']);
    assert.equal(out.ok, false);
    assert.match(out.stderr, /server does not support SSL, but SSL was required/);
  });

  it('node-postgres over TLS: clients sharing a grant of 2 in transaction mode, big results, COPY both ways, the extended protocol', async function () {
    const clients = Array.from({ length: 4 }, () => new pg.Client({ host: '127.0.0.1', port: tlsSidecar.port, user: tlsSidecar.role.user, database: 'app', ssl: { rejectUnauthorized: false } }));
    await Promise.all(clients.map((c) => c.connect()));
    try {
      for (const client of clients) {
        const socket = (client as unknown as { connection: { stream: { encrypted?: boolean; getProtocol?: () => string | null } } }).connection.stream;
        assert.equal(socket.encrypted, true);
        assert.equal(socket.getProtocol?.(), 'TLSv1.3');
      }
      await clients[0]!.query('CREATE TABLE IF NOT EXISTS client_tls_copy (id int, payload text)');
      await clients[0]!.query('TRUNCATE client_tls_copy');
      const work = clients.map(async (client, index) => {
        for (let round = 0; round < 5; round += 1) {
          // About 4 MB per result: many TLS records, and writes the client reads slower than the server sends.
          const big = await client.query<{ n: number; s: string }>('SELECT n, repeat(md5(n::text), 32) AS s FROM generate_series(1, 4000) AS n');
          assert.equal(big.rows.length, 4000);
          assert.equal(big.rows[3999]!.s.length, 1024);
          const prepared = await client.query<{ v: string }>({ name: `p${index}`, text: 'SELECT $1::text || $2::text AS v', values: [`c${index}`, `r${round}`] });
          assert.equal(prepared.rows[0]!.v, `c${index}r${round}`);
          await client.query('BEGIN');
          await client.query('INSERT INTO client_tls_copy SELECT $1::int, repeat(\'x\', 100000)', [index * 100 + round]);
          await client.query('COMMIT');
        }
      });
      await Promise.all(work);
      const count = await clients[1]!.query<{ n: string; bytes: string }>('SELECT count(*) AS n, sum(length(payload)) AS bytes FROM client_tls_copy');
      assert.deepEqual(count.rows[0], { n: '20', bytes: String(20 * 100000) });
    } finally {
      await Promise.all(clients.map((c) => c.end()));
    }
    // COPY through psql over TLS: out of the server, then into it.
    const copyFile = join(scratch, 'rows.csv');
    const out = await run('psql', [conninfo(tlsSidecar, 'require'), '-X', '-At', '-c', `\\copy (SELECT n, md5(n::text) FROM generate_series(1, 50000) n) TO '${copyFile}' CSV`,
      '-c', 'CREATE TEMP TABLE t (n int, h text)', '-c', `\\copy t FROM '${copyFile}' CSV`, '-c', 'SELECT count(*), sum(n) FROM t']);
    assert.ok(out.ok, out.stderr);
    assert.match(out.stdout, /^50000\|1250025000$/m);
  });

  it('psycopg2 and asyncpg with their "require" settings', async function () {
    const user = tlsSidecar.role.user;
    const psycopg2 = await run(PYTHON, ['-c', [
      'import psycopg2',
      `c = psycopg2.connect(host="127.0.0.1", port=${tlsSidecar.port}, user="${user}", dbname="app", sslmode="require")`,
      'cur = c.cursor(); cur.execute("SELECT 40 + 2"); print(cur.fetchone()[0], c.info.ssl_in_use)',
    ].join('\n')]);
    assert.ok(psycopg2.ok, psycopg2.stderr);
    assert.equal(psycopg2.stdout.trim(), '42 True');
    const asyncpg = await run(PYTHON, ['-c', [
      'import asyncio, asyncpg',
      'async def main():',
      `    c = await asyncpg.connect(host="127.0.0.1", port=${tlsSidecar.port}, user="${user}", database="app", ssl="require")`,
      '    v = await c.fetchval("SELECT $1::int + 1", 41)',
      '    print(v, c._transport.get_extra_info("ssl_object") is not None)',
      '    await c.close()',
      'asyncio.run(main())',
    ].join('\n')]);
    assert.ok(asyncpg.ok, asyncpg.stderr);
    assert.equal(asyncpg.stdout.trim(), '42 True');
  });

  it('pgjdbc with sslmode=require', async function () {
    const source = join(scratch, 'TlsProbe.java');
    writeFileSync(source, `
import java.sql.*;
public class TlsProbe {
  public static void main(String[] args) throws Exception {
    try (Connection c = DriverManager.getConnection(args[0], args[1], "")) {
      ResultSet r = c.createStatement().executeQuery("SELECT 40 + 2");
      r.next();
      System.out.println(r.getInt(1));
    }
  }
}`);
    const url = `jdbc:postgresql://127.0.0.1:${tlsSidecar.port}/app?sslmode=require`;
    const before = await metric(tlsSidecar, 'poolkeeper_sidecar_client_tls_connections_total');
    const out = await run('java', ['-cp', PGJDBC_JAR, source, url, tlsSidecar.role.user]);
    assert.ok(out.ok, out.stderr);
    assert.equal(out.stdout.trim(), '42');
    assert.equal(await metric(tlsSidecar, 'poolkeeper_sidecar_client_tls_connections_total'), before + 1);
  });

  describe('direct TLS negotiation (PostgreSQL 17, sslnegotiation=direct)', function () {
    let pgxProbe: string;

    before(async function () {
      this.timeout(600_000); // the first build downloads pgx
      try {
        pgxProbe = await goProgram(PGX_PROBE_DIR, 'pgx-probe');
      } catch (error) {
        if (!(error instanceof MissingPrerequisiteError)) throw error;
        console.log(`      pgx cases skipped: ${error.message}`);
      }
    });

    function pgxUrl(sidecar: TestSidecar, negotiation: string): string {
      return `postgres://${sidecar.role.user}@127.0.0.1:${sidecar.port}/app?sslmode=require&sslnegotiation=${negotiation}`;
    }

    async function pgx(url: string): Promise<PgxOutcome> {
      const out = await run(pgxProbe, [url]);
      const last = out.stdout.trim().split('\n').pop() ?? '';
      assert.ok(last.startsWith('{'), `pgx-probe printed no result: ${out.stderr}`);
      return JSON.parse(last) as PgxOutcome;
    }

    it('pgx v5 with sslnegotiation=direct: TLS 1.3 with ALPN "postgresql", queries, a 1 MB result, a cancel over direct TLS', async function () {
      if (pgxProbe === undefined) this.skip();
      const before = await metric(tlsSidecar, 'poolkeeper_sidecar_client_tls_connections_total');
      const out = await pgx(pgxUrl(tlsSidecar, 'direct'));
      assert.deepEqual(out, {
        ok: true, tlsVersion: 'TLS 1.3', alpn: 'postgresql', sum: 42, currentUser: tlsSidecar.role.user, bigRows: 1024, bigBytes: 1024 * 1024, cancel: '57014', after: 7,
      });
      // The session and its cancel connection (pgx encrypts it the same way).
      assert.equal(await metric(tlsSidecar, 'poolkeeper_sidecar_client_tls_connections_total'), before + 2);
    });

    it('pgx v5 with sslnegotiation=postgres (SSLRequest) is served as before, without ALPN', async function () {
      if (pgxProbe === undefined) this.skip();
      const out = await pgx(pgxUrl(tlsSidecar, 'postgres'));
      assert.equal(out.error, undefined);
      assert.equal(out.tlsVersion, 'TLS 1.3');
      assert.equal(out.alpn, undefined); // none negotiated
      assert.equal(out.bigBytes, 1024 * 1024);
      assert.equal(out.cancel, '57014');
    });

    it('Node\'s TLS client: served with ALPN "postgresql", refused with alert no_application_protocol without it or with another protocol only; other clients unaffected', async function () {
      const bystander = new pg.Client({ host: '127.0.0.1', port: tlsSidecar.port, user: tlsSidecar.role.user, database: 'app', ssl: { rejectUnauthorized: false } });
      await bystander.connect();
      try {
        const startup = buildStartupMessage({ user: tlsSidecar.role.user, database: 'app' });
        const served = await directTls(tlsSidecar.port, ['postgresql'], startup, (bytes) => messageTypes(bytes).endsWith('Z'));
        assert.equal(served.secure, true, served.error);
        assert.equal(served.alpn, 'postgresql');
        assert.match(messageTypes(served.received), /^RS+KZ$/);
        const refusedBefore = await metric(tlsSidecar, PROTOCOL_ERRORS);
        for (const alpn of [undefined, ['h2', 'http/1.1']]) {
          const refused = await directTls(tlsSidecar.port, alpn, startup);
          assert.equal(refused.secure, false, `ALPN ${String(alpn)}: the handshake completed`);
          assert.equal(refused.errorCode, 'ERR_SSL_TLSV1_ALERT_NO_APPLICATION_PROTOCOL', `ALPN ${String(alpn)}: ${refused.error}`);
          assert.equal((await bystander.query<{ v: number }>('SELECT 3 AS v')).rows[0]!.v, 3);
        }
        assert.equal(await metric(tlsSidecar, PROTOCOL_ERRORS), refusedBefore + 2);
      } finally {
        await bystander.end();
      }
    });

    it('a ClientHello that comes a byte first, then in records of 64 bytes, a few at a time, is gathered whole', async function () {
      const startup = buildStartupMessage({ user: tlsSidecar.role.user, database: 'app' });
      const trickle = new TrickleFirstWrite(netConnect({ host: '127.0.0.1', port: tlsSidecar.port }));
      const served = await directTls(tlsSidecar.port, ['postgresql'], startup, (bytes) => messageTypes(bytes).endsWith('Z'), trickle);
      assert.equal(served.secure, true, served.error);
      assert.ok(trickle.pieces > 5, `${trickle.pieces} pieces`);
      assert.match(messageTypes(served.received), /^RS+KZ$/);
    });

    it('a handshake record that is no ClientHello goes to the TLS layer, which answers it with an alert and closes', async function () {
      const { socket, received, closed } = await rawConnection(tlsSidecar.port);
      socket.write(Buffer.from([0x16, 3, 3, 0, 4, 2, 0, 0, 0])); // an empty ServerHello
      await closed;
      const answer = Buffer.concat(received);
      assert.equal(answer[0], 21, `an alert record, not ${answer.toString('hex')}`);
    });

    it('asyncpg with direct_tls=True: served when its SSL context offers ALPN "postgresql", refused with the alert when it offers none', async function () {
      const user = tlsSidecar.role.user;
      const script = (context: string): string[] => ['-c', [
        'import asyncio, asyncpg, ssl',
        'async def main():',
        '    ctx = ssl.create_default_context()',
        '    ctx.check_hostname = False',
        '    ctx.verify_mode = ssl.CERT_NONE',
        context,
        '    try:',
        `        c = await asyncpg.connect(host="127.0.0.1", port=${tlsSidecar.port}, user="${user}", database="app", ssl=ctx, direct_tls=True)`,
        '    except Exception as e:',
        '        print("error", type(e).__name__, e)',
        '        return',
        '    v = await c.fetchval("SELECT $1::int + 1", 41)',
        '    print(v, c._transport.get_extra_info("ssl_object").selected_alpn_protocol())',
        '    await c.close()',
        'asyncio.run(main())',
      ].join('\n')];
      const withAlpn = await run(PYTHON, script('    ctx.set_alpn_protocols(["postgresql"])'));
      assert.ok(withAlpn.ok, withAlpn.stderr);
      assert.equal(withAlpn.stdout.trim(), '42 postgresql');
      const without = await run(PYTHON, script('    pass'));
      assert.ok(without.ok, without.stderr);
      assert.match(without.stdout.trim(), /^error SSLError .*alert no application protocol/);
    });

    it('a sidecar without clientTLS closes a direct TLS connection without a word, as PostgreSQL without ssl does, and goes on', async function () {
      const refusedBefore = await metric(plainSidecar, PROTOCOL_ERRORS);
      const started = Date.now();
      const node = await directTls(plainSidecar.port, ['postgresql']);
      assert.equal(node.secure, false);
      assert.equal(node.received.length, 0);
      assert.equal(node.errorCode, 'ECONNRESET', node.error);
      assert.ok(Date.now() - started < 5000, 'not closed at once');
      assert.equal(await metric(plainSidecar, PROTOCOL_ERRORS), refusedBefore + 1);
      if (pgxProbe !== undefined) {
        const out = await pgx(pgxUrl(plainSidecar, 'direct'));
        assert.equal(out.ok, false);
        assert.match(out.error ?? '', /EOF/);
      }
      const psql = await run('psql', [conninfo(plainSidecar, 'disable'), '-X', '-At', '-c', 'SELECT 9']);
      assert.ok(psql.ok, psql.stderr);
      assert.equal(psql.stdout.trim(), '9');
    });
  });

  it('bytes sent behind the SSLRequest are refused as PostgreSQL refuses them, not read as if encrypted', async function () {
    const { socket, received, closed } = await rawConnection(tlsSidecar.port);
    socket.write(Buffer.concat([SSL_REQUEST, buildStartupMessage({ user: tlsSidecar.role.user, database: 'app' })]));
    await closed;
    const answer = Buffer.concat(received);
    assert.equal(answer.subarray(0, 1).toString(), 'E', 'an ErrorResponse, not "S"');
    assert.match(answer.toString('latin1'), /C08P01\0.*Mreceived unencrypted data after SSL request\0/s);
  });

  it('a client that answers "S" with bytes that are not TLS is closed; other clients go on', async function () {
    const { socket, received, closed } = await rawConnection(tlsSidecar.port);
    socket.write(SSL_REQUEST);
    await new Promise<void>((resolve) => socket.once('data', () => resolve()));
    assert.equal(Buffer.concat(received).subarray(0, 1).toString(), 'S');
    socket.write(Buffer.from('this is not a TLS ClientHello, just a mistake\n'));
    await closed;
    const client = new pg.Client({ host: '127.0.0.1', port: tlsSidecar.port, user: tlsSidecar.role.user, database: 'app', ssl: { rejectUnauthorized: false } });
    await client.connect();
    try {
      assert.equal((await client.query<{ v: number }>('SELECT 5 AS v')).rows[0]!.v, 5);
    } finally {
      await client.end();
    }
  });
});
