/**
 * The sidecar's TLS to PostgreSQL per sslMode, against the real servers: the
 * SSL-enabled cluster from `postgresTls()` (certificate from a test CA for
 * 127.0.0.1 and localhost) and the plaintext one from `postgres()`. Whether a
 * session is encrypted is asked of the server (pg_stat_ssl), not assumed.
 */
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, connect as netConnect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { testEnvironment } from '../support/hooks.ts';
import { FileCredentialsSource, Sidecar, type SidecarSettings, type SslMode } from '../../src/sidecar/index.ts';
import { loginUpstream, UpstreamError } from '../../src/sidecar/upstream-login.ts';
import { DATABASE_CA, MountedFile } from '../../src/sidecar/mounted-file.ts';
import { DEFAULT_POSTGRES_CERTIFICATE_NAMES, type PostgresRole, type PostgresServer } from '../../src/devenv/postgres.ts';
import type { ChannelBindingMode } from '../../src/core/protocol/index.ts';
import { LimitDiscovery } from '../../src/controller/limit-discovery.ts';
import { TlsInterceptor } from '../support/tls-interceptor.ts';
import { createCertificateAuthority } from '../../src/pki/certificates.ts';

const env = testEnvironment();
const logger = pino({ level: process.env.SIDECAR_TEST_LOG ?? 'silent' });

interface TlsSidecarOptions {
  sslMode: SslMode;
  channelBinding?: ChannelBindingMode;
  /** The port the sidecar is told (default the server's): an interception's. */
  port?: number;
  /** Log in as this role (default the SCRAM role `app`). */
  role?: PostgresRole;
  caPem?: string;
  /** The database host the sidecar is told (default the server's 127.0.0.1). */
  host?: string;
  tunnel?: SidecarSettings['sshTunnel'];
  /** The CA from this file (read again when it changes), as the sidecar binary runs with a caSecretRef. */
  caFile?: string;
}

interface Running {
  adminPort: number;
  client(): pg.Client;
  metrics(): Promise<string>;
  stop(): Promise<void>;
}

async function startSidecar(postgres: PostgresServer, options: TlsSidecarOptions): Promise<Running> {
  const credentialsDir = mkdtempSync(join(tmpdir(), 'poolkeeper-creds-'));
  const role = options.role ?? postgres.app;
  writeFileSync(join(credentialsDir, 'username'), role.user);
  writeFileSync(join(credentialsDir, 'password'), role.password);
  const credentials = new FileCredentialsSource({ directory: credentialsDir, logger, pollIntervalMs: 200 });
  const settings: SidecarSettings = {
    listenHost: '127.0.0.1', listenPort: 0,
    database: {
      host: options.host ?? postgres.host, port: options.port ?? postgres.port, dbname: 'app', sslMode: options.sslMode,
      ...(options.channelBinding !== undefined ? { channelBinding: options.channelBinding } : {}), ...(options.caPem !== undefined ? { caPem: options.caPem } : {}),
    },
    // A one-second pool timeout: a refused server connection reaches the client quickly.
    pool: { mode: 'transaction', poolTimeout: 1, poolRecycle: 1800, poolPrePing: true, idleTimeout: 600 },
    drainTimeout: 5,
    admin: { host: '127.0.0.1', port: 0 },
    ...(options.tunnel ? { sshTunnel: options.tunnel } : {}),
  };
  const databaseCa = options.caFile === undefined ? undefined : new MountedFile({ path: options.caFile, kind: DATABASE_CA, logger });
  const sidecar = new Sidecar({ settings, credentials, logger, metrics: new Registry(), ...(databaseCa ? { databaseCa } : {}) });
  const { port, adminPort } = await sidecar.start();
  sidecar.setGrant(2, 1);
  return {
    adminPort: adminPort!,
    client: () => new pg.Client({ host: '127.0.0.1', port, user: role.user, database: 'app' }),
    metrics: async () => (await fetch(`http://127.0.0.1:${adminPort!}/metrics`)).text(),
    stop: async () => {
      await sidecar.close();
      rmSync(credentialsDir, { recursive: true, force: true });
    },
  };
}

/** Whether the server connection behind the sidecar is encrypted, as the server reports it. */
async function serverSeesSsl(running: Running): Promise<boolean> {
  const client = running.client();
  await client.connect();
  try {
    const rows = (await client.query<{ ssl: boolean }>('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()')).rows;
    assert.equal(rows.length, 1);
    return rows[0]!.ssl;
  } finally {
    await client.end();
  }
}

/** Connecting through the sidecar fails; returns the error the client got. */
async function refusedError(running: Running): Promise<{ code?: string; message: string }> {
  const client = running.client();
  client.on('error', () => undefined);
  try {
    await client.connect();
  } catch (error) {
    return error as { code?: string; message: string };
  } finally {
    await client.end().catch(() => undefined);
  }
  throw new Error('the connection through the sidecar was expected to be refused');
}

/** A query through the sidecar that needs a new server connection fails; returns the error the client got. */
async function queryError(running: Running): Promise<{ code?: string; message: string }> {
  const client = running.client();
  client.on('error', () => undefined);
  try {
    await client.connect();
    await client.query('SELECT 1');
  } catch (error) {
    return error as { code?: string; message: string };
  } finally {
    await client.end().catch(() => undefined);
  }
  throw new Error('the query through the sidecar was expected to fail');
}

async function withSidecar<T>(postgres: PostgresServer, options: TlsSidecarOptions, fn: (running: Running) => Promise<T>): Promise<T> {
  const running = await startSidecar(postgres, options);
  try {
    return await fn(running);
  } finally {
    await running.stop();
  }
}

describe('sidecar TLS to PostgreSQL (sslMode)', function () {
  let tlsPostgres: PostgresServer;
  let plainPostgres: PostgresServer;
  let caPem: string;
  let wrongCaPem: string;
  before(async function () {
    [tlsPostgres, plainPostgres] = await Promise.all([env.postgresTls(), env.postgres()]);
    assert.ok(tlsPostgres.caPem, 'postgresTls() exposes its CA');
    caPem = tlsPostgres.caPem;
    wrongCaPem = (await createCertificateAuthority('not the server CA', 1)).certPem;
  });

  it('the TLS cluster serves a certificate for 127.0.0.1 and localhost, and the default cluster no SSL', async function () {
    const cert = await tlsPostgres.presentedCertificate();
    assert.equal(cert.checkIssued(new X509Certificate(caPem)), true);
    assert.equal(cert.checkIP('127.0.0.1'), '127.0.0.1');
    assert.equal(cert.checkHost('localhost'), 'localhost');
    assert.equal(plainPostgres.caPem, undefined);
    assert.deepEqual(await plainPostgres.query('SHOW ssl'), [{ ssl: 'off' }]);
    await assert.rejects(plainPostgres.presentedCertificate(), /refused SSL/);
  });

  it('require: connects, and the server sees an SSL session', async function () {
    await withSidecar(tlsPostgres, { sslMode: 'require' }, async (running) => {
      assert.equal(await serverSeesSsl(running), true);
    });
  });

  for (const host of ['127.0.0.1', 'localhost']) {
    it(`verify-full with the right CA connects over SSL to ${host}`, async function () {
      await withSidecar(tlsPostgres, { sslMode: 'verify-full', caPem, host }, async (running) => {
        assert.equal(await serverSeesSsl(running), true);
      });
    });
  }

  it('verify-ca with the right CA connects over SSL', async function () {
    await withSidecar(tlsPostgres, { sslMode: 'verify-ca', caPem }, async (running) => {
      assert.equal(await serverSeesSsl(running), true);
    });
  });

  for (const sslMode of ['verify-full', 'verify-ca', 'require'] as const) {
    it(`${sslMode} with a wrong CA is refused at once with a clear error, counted, and the sidecar keeps serving`, async function () {
      await withSidecar(tlsPostgres, { sslMode, caPem: wrongCaPem }, async (running) => {
        const first = await refusedError(running);
        // A certificate that does not verify is not cured by waiting: 08001 at once (not 53300 after poolTimeout), as a client that cannot establish its connection.
        assert.equal(first.code, '08001');
        assert.match(first.message, new RegExp(`TLS to 127\\.0\\.0\\.1 failed \\(sslmode=${sslMode}\\): (unable to get local issuer certificate|unable to verify the first certificate)`));
        assert.match(await running.metrics(), /poolkeeper_sidecar_errors_total\{kind="server-connect"\} [1-9]/);
        // Still listening and answering: the next client gets the same explanation.
        assert.match((await refusedError(running)).message, /TLS to 127\.0\.0\.1 failed/);
        assert.equal((await fetch(`http://127.0.0.1:${running.adminPort}/healthz`)).status, 200);
      });
    });
  }

  describe('a CA rotated in its Secret', function () {
    after(async function () {
      await tlsPostgres.replaceServerCertificate(DEFAULT_POSTGRES_CERTIFICATE_NAMES);
    });

    it('reaches new server connections without a restart; a transaction open meanwhile goes on', async function () {
      const dir = mkdtempSync(join(tmpdir(), 'poolkeeper-db-ca-'));
      const caFile = join(dir, 'ca.crt');
      // As the kubelet updates a Secret volume: the new file is written aside and renamed over the old.
      const publish = (pem: string): void => {
        writeFileSync(`${caFile}.tmp`, pem);
        renameSync(`${caFile}.tmp`, caFile);
      };
      publish(caPem);
      try {
        await withSidecar(tlsPostgres, { sslMode: 'verify-full', caFile }, async (running) => {
          const holder = running.client();
          holder.on('error', () => undefined);
          await holder.connect();
          await holder.query('BEGIN');
          assert.equal((await holder.query<{ v: number }>('SELECT 1 AS v')).rows[0]!.v, 1);
          // The server moves to a certificate from a new CA; the sidecar's file still has the old one only.
          const newCa = await createCertificateAuthority('rotated test CA', 1);
          await tlsPostgres.replaceServerCertificate(DEFAULT_POSTGRES_CERTIFICATE_NAMES, { ca: newCa });
          assert.match((await queryError(running)).message, /TLS to 127\.0\.0\.1 failed \(sslmode=verify-full\)/);
          // A half-written file is not taken: the old CA stays in use.
          publish('-----BEGIN CERTIFICATE-----\nnot base64\n');
          assert.match((await queryError(running)).message, /TLS to 127\.0\.0\.1 failed/);
          // The rotated Secret holds both CAs, as cert-manager's and CloudNativePG's do during a rotation.
          publish(`${caPem}\n${newCa.certPem}`);
          // The pool waits a little before trying again after failed logins: the next attempt uses the new file.
          const deadline = Date.now() + 10_000;
          for (;;) {
            try {
              assert.equal(await serverSeesSsl(running), true);
              break;
            } catch (error) {
              if (Date.now() > deadline || !/TLS to 127\.0\.0\.1 failed/.test((error as Error).message)) throw error;
            }
          }
          assert.equal((await holder.query<{ v: number }>('SELECT 2 AS v')).rows[0]!.v, 2);
          await holder.query('COMMIT');
          await holder.end();
        });
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  describe('with a server certificate for 127.0.0.1 only', function () {
    before(async function () {
      await tlsPostgres.replaceServerCertificate({ dnsNames: [], ipAddresses: ['127.0.0.1'] });
    });
    after(async function () {
      await tlsPostgres.replaceServerCertificate(DEFAULT_POSTGRES_CERTIFICATE_NAMES);
    });

    it('verify-full to localhost is refused: the name is not in the certificate', async function () {
      await withSidecar(tlsPostgres, { sslMode: 'verify-full', caPem, host: 'localhost' }, async (running) => {
        const error = await refusedError(running);
        assert.equal(error.code, '08001');
        assert.match(error.message, /TLS to localhost failed \(sslmode=verify-full\): Hostname\/IP does not match certificate's altnames: Host: localhost\. is not/);
        assert.match(await running.metrics(), /poolkeeper_sidecar_errors_total\{kind="server-connect"\} [1-9]/);
      });
    });

    it('verify-ca to localhost connects: only the chain is checked', async function () {
      await withSidecar(tlsPostgres, { sslMode: 'verify-ca', caPem, host: 'localhost' }, async (running) => {
        assert.equal(await serverSeesSsl(running), true);
      });
    });

    it('verify-full to 127.0.0.1 connects', async function () {
      await withSidecar(tlsPostgres, { sslMode: 'verify-full', caPem }, async (running) => {
        assert.equal(await serverSeesSsl(running), true);
      });
    });
  });

  describe('through an SSH tunnel', function () {
    let tunnel: SidecarSettings['sshTunnel'];
    before(async function () {
      const sshd = await env.sshd();
      tunnel = { host: sshd.host, port: sshd.port, user: sshd.username, privateKey: sshd.userPrivateKey, hostKey: sshd.hostPublicKey };
    });
    after(async function () {
      await tlsPostgres.replaceServerCertificate(DEFAULT_POSTGRES_CERTIFICATE_NAMES);
    });

    it('verify-full checks the configured host, not the channel\'s (which has none)', async function () {
      await withSidecar(tlsPostgres, { sslMode: 'verify-full', caPem, tunnel }, async (running) => {
        assert.equal(await serverSeesSsl(running), true);
      });
      // A certificate for localhost only must not pass for 127.0.0.1.
      await tlsPostgres.replaceServerCertificate({ dnsNames: ['localhost'], ipAddresses: [] });
      await withSidecar(tlsPostgres, { sslMode: 'verify-full', caPem, tunnel }, async (running) => {
        assert.match((await refusedError(running)).message, /TLS to 127\.0\.0\.1 failed \(sslmode=verify-full\): Hostname\/IP does not match certificate's altnames: IP: 127\.0\.0\.1 is not in the cert's list/);
      });
    });
  });

  describe('channel binding (spec.database.channelBinding), through a TLS interception that relays to the server', function () {
    let interceptor: TlsInterceptor;
    before(async function () {
      interceptor = new TlsInterceptor({ host: tlsPostgres.host, port: tlsPostgres.port });
      await interceptor.start();
    });
    after(async function () {
      await interceptor.stop();
    });

    /** psql (libpq) through the interception: its output, or its error. */
    function psql(role: PostgresRole, conninfo: string): Promise<{ ok: boolean; text: string }> {
      return new Promise((resolve) => {
        execFile('psql', [`host=127.0.0.1 port=${interceptor.port} dbname=app user=${role.user} sslmode=require ${conninfo}`, '-Atc', 'SELECT 1'], { env: { ...process.env, PGPASSWORD: role.password } }, (error, stdout, stderr) => {
          resolve({ ok: error === null, text: (error === null ? stdout : stderr).trim() });
        });
      });
    }

    async function select(running: Running): Promise<number> {
      const client = running.client();
      await client.connect();
      try {
        return (await client.query<{ n: number }>('SELECT 1 AS n')).rows[0]!.n;
      } finally {
        await client.end();
      }
    }

    it('prefer (the default, as libpq): the server refuses the relayed login, as it refuses libpq\'s; disable lets it through, as it does libpq', async function () {
      const direct = { prefer: await psql(tlsPostgres.app, ''), disable: await psql(tlsPostgres.app, 'channel_binding=disable') };
      assert.equal(direct.disable.ok, true, `libpq with channel_binding=disable goes through the interception: ${direct.disable.text}`);
      assert.equal(direct.prefer.ok, false, 'libpq binds by default, and the server refuses it');
      const refused = await withSidecar(tlsPostgres, { sslMode: 'require', port: interceptor.port }, queryError);
      assert.match(refused.message, /channel binding/i, `the client hears why: ${refused.message}`);
      // PostgreSQL's own refusal, as libpq gets it direct, with a hint that says what it means.
      assert.equal(refused.code, '28000');
      assert.match(direct.prefer.text, new RegExp(refused.message));
      assert.match((refused as { hint?: string }).hint ?? '', /does not end at the server/);
      const unbound = await withSidecar(tlsPostgres, { sslMode: 'require', port: interceptor.port, channelBinding: 'disable' }, select);
      assert.equal(unbound, 1, 'unbound, the sidecar logs in through the interception (what the binding prevents)');
      // Straight to the server, the bound login succeeds.
      assert.equal(await withSidecar(tlsPostgres, { sslMode: 'require' }, select), 1);
      assert.equal(await withSidecar(tlsPostgres, { sslMode: 'require', channelBinding: 'require' }, select), 1);
    });

    it('require: an md5 role is refused before its password goes out, as libpq refuses it', async function () {
      const sentBefore = interceptor.fromClients.length;
      const direct = await psql(tlsPostgres.appMd5, 'channel_binding=require');
      assert.equal(direct.ok, false);
      const refused = await withSidecar(tlsPostgres, { sslMode: 'require', port: interceptor.port, role: tlsPostgres.appMd5, channelBinding: 'require' }, queryError);
      assert.equal(refused.code, '08001');
      assert.match(refused.message, /channel binding is required \(spec\.database\.channelBinding\), but the server authenticated the sidecar with md5/);
      const discovery = new LimitDiscovery({ logger, connectTimeoutMs: 2_000 });
      const target = { serverKey: 'k', host: '127.0.0.1', port: interceptor.port, dbname: 'app', sslMode: 'require', channelBinding: 'require' as const, username: tlsPostgres.appMd5.user, password: tlsPostgres.appMd5.password };
      await assert.rejects(discovery.check(target), /channel binding is required .* md5/);
      const attempts = interceptor.messageTypes().slice(sentBefore);
      assert.ok(attempts.length >= 3, `libpq, the sidecar and the controller each connected (${attempts.length})`);
      for (const types of attempts) assert.ok(!types.includes('p'), `no password message went out: ${types.join(' ')}`);
      // Without require, md5 over the interception works for both.
      assert.equal((await psql(tlsPostgres.appMd5, '')).ok, true);
    });

    it('require without TLS is refused by the sidecar and by the controller\'s check, with the reason', async function () {
      const refused = await withSidecar(plainPostgres, { sslMode: 'prefer', channelBinding: 'require' }, queryError);
      assert.equal(refused.code, '08001');
      assert.match(refused.message, /channel binding is required .* SSL is not in use/);
      const discovery = new LimitDiscovery({ logger, connectTimeoutMs: 2_000 });
      const target = { serverKey: 'k', host: plainPostgres.host, port: plainPostgres.port, dbname: 'app', sslMode: 'prefer', channelBinding: 'require' as const, username: plainPostgres.app.user, password: plainPostgres.app.password };
      await assert.rejects(discovery.check(target), /channel binding is required .* SSL is not in use/);
      const bound = await discovery.check({ ...target, host: tlsPostgres.host, port: tlsPostgres.port, username: tlsPostgres.app.user, password: tlsPostgres.app.password, sslMode: 'require' });
      assert.ok(bound.maxConnections > 0, 'the controller binds a SCRAM login over TLS');
      await assert.rejects(discovery.check({ ...target, port: interceptor.port, host: '127.0.0.1', username: tlsPostgres.app.user, password: tlsPostgres.app.password, sslMode: 'require' }), /channel binding|SCRAM/i);
    });
  });

  it('prefer uses SSL when the server offers it', async function () {
    await withSidecar(tlsPostgres, { sslMode: 'prefer' }, async (running) => {
      assert.equal(await serverSeesSsl(running), true);
    });
  });

  it('prefer falls back to plaintext when the server does not offer SSL', async function () {
    await withSidecar(plainPostgres, { sslMode: 'prefer' }, async (running) => {
      assert.equal(await serverSeesSsl(running), false);
    });
  });

  for (const sslMode of ['disable', 'allow'] as const) {
    it(`${sslMode} does not use SSL even when the server offers it`, async function () {
      await withSidecar(tlsPostgres, { sslMode }, async (running) => {
        assert.equal(await serverSeesSsl(running), false);
      });
    });
  }

  for (const sslMode of ['require', 'verify-full'] as const) {
    it(`${sslMode} against a server without SSL is refused clearly and counted`, async function () {
      await withSidecar(plainPostgres, { sslMode, caPem }, async (running) => {
        const error = await refusedError(running);
        assert.equal(error.code, '53300');
        assert.match(error.message, new RegExp(`last connection attempt: server 127\\.0\\.0\\.1 does not support SSL, but sslmode=${sslMode} requires it`));
        assert.match(await running.metrics(), /poolkeeper_sidecar_errors_total\{kind="server-connect"\} [1-9]/);
      });
    });
  }
});

describe('upstream login against a misbehaving server (loopback)', function () {
  let server: Server;
  let port: number;
  let answer: (socket: Socket) => void;
  const sockets = new Set<Socket>();
  before(async function () {
    server = createServer((socket) => {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => undefined);
      socket.once('data', () => answer(socket));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as { port: number }).port;
  });
  after(async function () {
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => server.close(resolve));
  });

  async function login(sslMode: SslMode, timeoutMs = 5_000): Promise<{ error: unknown; streamDestroyed: boolean }> {
    const stream = netConnect({ host: '127.0.0.1', port });
    await new Promise((resolve) => stream.once('connect', resolve));
    stream.on('error', () => undefined);
    try {
      await loginUpstream({ stream, host: '127.0.0.1', dbname: 'app', username: 'app', password: 'x', sslMode, timeoutMs });
    } catch (error) {
      return { error, streamDestroyed: stream.destroyed };
    }
    throw new Error('login was expected to fail');
  }

  it('refuses bytes sent after the SSL answer, before encryption (CVE-2021-23222)', async function () {
    answer = (socket) => socket.write(Buffer.concat([Buffer.from('S'), Buffer.from('injected')]));
    const { error, streamDestroyed } = await login('require');
    assert.ok(error instanceof UpstreamError);
    assert.equal(error.kind, 'tls');
    assert.match(error.message, /unencrypted data after its answer to SSLRequest/);
    assert.equal(streamDestroyed, true);
  });

  it('times out a server that never answers SSLRequest, and closes the stream', async function () {
    answer = () => undefined;
    const { error, streamDestroyed } = await login('prefer', 300);
    assert.ok(error instanceof UpstreamError);
    assert.equal(error.kind, 'timeout');
    assert.match(error.message, /SSL negotiation with 127\.0\.0\.1 did not finish within 300 ms/);
    assert.equal(streamDestroyed, true);
  });

  it('times out a server that accepts SSL but never completes the handshake', async function () {
    answer = (socket) => socket.write('S');
    const { error } = await login('verify-full', 300);
    assert.ok(error instanceof UpstreamError);
    assert.equal(error.kind, 'timeout');
  });

  it('refuses a SCRAM exchange that asks for two billion iterations, at once (it would hold a thread for hours)', async function () {
    const message = (type: string, body: Buffer): Buffer => {
      const header = Buffer.alloc(5);
      header.write(type, 0);
      header.writeInt32BE(body.length + 4, 1);
      return Buffer.concat([header, body]);
    };
    const auth = (code: number, rest: Buffer): Buffer => message('R', Buffer.concat([Buffer.from([0, 0, 0, code]), rest]));
    answer = (socket) => {
      socket.write(auth(10, Buffer.from('SCRAM-SHA-256\0\0')));
      socket.once('data', (initial: Buffer) => {
        const nonce = /r=([^,\0]+)/.exec(initial.toString('latin1'))?.[1] ?? '';
        socket.write(auth(11, Buffer.from(`r=${nonce}server,s=${Buffer.from('salt').toString('base64')},i=2000000000`)));
      });
    };
    const started = Date.now();
    const { error } = await login('disable');
    assert.ok(error instanceof UpstreamError);
    assert.match(error.message, /asks for 2000000000 iterations, more than the 1000000/);
    assert.ok(Date.now() - started < 2_000, `refused in ${Date.now() - started} ms`);
  });
});
