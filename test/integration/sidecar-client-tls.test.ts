/**
 * TLS from apps to the sidecar (spec.sidecar.clientTLS: SelfSigned), with
 * real drivers: libpq (psql, psycopg2), asyncpg, pgjdbc and node-postgres ask
 * for TLS with their own "require" settings and get it; whether a session is
 * encrypted is what the client itself reports (psql's \conninfo, the socket's
 * TLS state), not assumed. Clients that verify the certificate refuse it with
 * their own error; a sidecar without clientTLS keeps answering "no".
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { testEnvironment } from '../support/hooks.ts';
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
