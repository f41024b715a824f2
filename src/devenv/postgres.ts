/**
 * A throwaway PostgreSQL cluster from Debian's binaries: initdb as a non-root
 * user, a known max_connections, SCRAM-SHA-256 for the application role and
 * md5 for a second role, listening on 127.0.0.1 only. Optionally with SSL on,
 * serving a certificate from a throwaway test CA.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes, X509Certificate } from 'node:crypto';
import { chownSync, mkdirSync, writeFileSync, appendFileSync } from 'node:fs';
import { connect as netConnect } from 'node:net';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import pg from 'pg';
import { createCertificateAuthority, issueCertificate, type CertificateBundle } from '../pki/certificates.ts';
import type { NetworkNamespace } from './network-namespace.ts';
import { ManagedProcess, freePort, waitUntil, type PidRegistry } from './process.ts';
import { postgresBinDir, serviceAccount } from './system.ts';

/** A role and its password. */
export interface PostgresRole {
  user: string;
  password: string;
}

/** Names in the server certificate's subjectAltName. */
export interface PostgresCertificateNames {
  dnsNames: string[];
  ipAddresses: string[];
}

/** Names a TLS cluster's certificate carries unless told otherwise. */
export const DEFAULT_POSTGRES_CERTIFICATE_NAMES: PostgresCertificateNames = { dnsNames: ['localhost'], ipAddresses: ['127.0.0.1'] };

/** Settings of the throwaway cluster. */
export interface PostgresOptions {
  maxConnections: number;
  superuserReservedConnections: number;
  /** Turn SSL on with a certificate for these names, signed by a fresh test CA; omitted: no SSL. */
  tls?: Partial<PostgresCertificateNames>;
  /** Subdirectory of the run dir (default `postgres`); a second cluster in the same run needs its own. */
  directoryName?: string;
  /**
   * Run inside this namespace, listening on its address only (reached over
   * TCP from this host's end of the link); `host` is then the Unix socket's
   * directory, which no packet filter on the link touches.
   */
  networkNamespace?: NetworkNamespace;
}

/** Defaults chosen so that tests can exhaust the server quickly. */
export const DEFAULT_POSTGRES_OPTIONS: PostgresOptions = { maxConnections: 60, superuserReservedConnections: 3 };

/** The database every role may use. */
export const APP_DATABASE = 'app';

/** A running PostgreSQL cluster. */
export class PostgresServer {
  /** Where clientConfig() connects: 127.0.0.1, or the Unix socket's directory for a cluster in a network namespace. */
  readonly host: string;
  /** The address clients reach it at over TCP: 127.0.0.1, or the namespace's address. */
  readonly tcpHost: string;
  readonly port: number;
  readonly dataDir: string;
  /** The server's Unix socket, where every role logs in without a password (tests that speak the raw protocol to the server). */
  readonly socketPath: string;
  readonly superuser: PostgresRole;
  /** A role with a SCRAM-SHA-256 verifier. */
  readonly app: PostgresRole;
  /** A role with an md5 password, for the sidecar's md5 upstream login. */
  readonly appMd5: PostgresRole;
  readonly options: PostgresOptions;
  /** PEM of the test CA that signed the server certificate; undefined without SSL. */
  readonly caPem: string | undefined;
  private process: ManagedProcess;
  private readonly launch: () => ManagedProcess;
  private readonly tls: ServerTlsFiles | undefined;

  private constructor(fields: { host: string; tcpHost: string; port: number; dataDir: string; socketPath: string; superuser: PostgresRole; app: PostgresRole; appMd5: PostgresRole; options: PostgresOptions; process: ManagedProcess; launch: () => ManagedProcess; tls: ServerTlsFiles | undefined }) {
    this.host = fields.host;
    this.tcpHost = fields.tcpHost;
    this.tls = fields.tls;
    this.caPem = fields.tls?.ca.certPem;
    this.port = fields.port;
    this.dataDir = fields.dataDir;
    this.socketPath = fields.socketPath;
    this.superuser = fields.superuser;
    this.app = fields.app;
    this.appMd5 = fields.appMd5;
    this.options = fields.options;
    this.process = fields.process;
    this.launch = fields.launch;
  }

  /** initdb, start, and create the roles and database. */
  static async start(runDir: string, registry: PidRegistry, options: PostgresOptions = DEFAULT_POSTGRES_OPTIONS): Promise<PostgresServer> {
    const bin = postgresBinDir();
    const account = serviceAccount();
    const owned = account ? { uid: account.uid, gid: account.gid } : {};
    const base = join(runDir, options.directoryName ?? 'postgres');
    const dataDir = join(base, 'data');
    const socketDir = join(base, 'sock');
    mkdirSync(socketDir, { recursive: true });
    if (account) {
      chownSync(base, account.uid, account.gid);
      chownSync(socketDir, account.uid, account.gid);
    }
    const superuser: PostgresRole = { user: 'postgres', password: randomBytes(18).toString('base64url') };
    const pwFile = join(base, 'superuser.pw');
    writeFileSync(pwFile, `${superuser.password}\n`, { mode: 0o600 });
    if (account) chownSync(pwFile, account.uid, account.gid);
    execFileSync(join(bin, 'initdb'), ['-D', dataDir, '-U', superuser.user, `--pwfile=${pwFile}`, '--auth-local=trust', '--auth-host=scram-sha-256', '--encoding=UTF8', '--locale=C', '--no-sync'], {
      stdio: ['ignore', 'pipe', 'pipe'],
      ...owned,
      cwd: base,
    });
    const tls = options.tls ? await ServerTlsFiles.create(base, account, { ...DEFAULT_POSTGRES_CERTIFICATE_NAMES, ...options.tls }) : undefined;
    const port = await freePort();
    const namespace = options.networkNamespace;
    const tcpHost = namespace?.address ?? '127.0.0.1';
    // md5 line first: pg_hba is first-match, and md5 must apply only to that role.
    const hba = join(dataDir, 'pg_hba.conf');
    writeFileSync(hba, [
      'local all all trust',
      'host all app_md5 127.0.0.1/32 md5',
      'host all all 127.0.0.1/32 scram-sha-256',
      'host all all ::1/128 scram-sha-256',
      ...(namespace ? [`host all all ${namespace.hostAddress}/32 scram-sha-256`] : []),
      '',
    ].join('\n'));
    appendFileSync(join(dataDir, 'postgresql.conf'), [
      '',
      `listen_addresses = '${tcpHost}'`,
      `port = ${port}`,
      `unix_socket_directories = '${socketDir}'`,
      `max_connections = ${options.maxConnections}`,
      `superuser_reserved_connections = ${options.superuserReservedConnections}`,
      "password_encryption = 'scram-sha-256'",
      'shared_buffers = 32MB',
      'fsync = off',
      'synchronous_commit = off',
      'full_page_writes = off',
      "log_line_prefix = '%m [%p] %u@%d '",
      ...(tls ? ['ssl = on', `ssl_cert_file = '${tls.certFile}'`, `ssl_key_file = '${tls.keyFile}'`] : []),
      '',
    ].join('\n'));
    // In a namespace: nsenter (root) enters it and drops to the service account; it execs postgres, so the pid is the postmaster's.
    const [command, ...prefix] = namespace ? [...namespace.command(account), join(bin, 'postgres')] : [join(bin, 'postgres')];
    const launch = (): ManagedProcess => ManagedProcess.start({ name: 'postgres', command, args: [...prefix, '-D', dataDir], logFile: join(base, 'postgres.log'), cwd: base, ...(namespace ? {} : owned) }, registry);
    const child = launch();
    const host = namespace ? socketDir : '127.0.0.1';
    const superConfig = { host, port, user: superuser.user, password: superuser.password, database: 'postgres' };
    await waitUntil('postgres', async () => {
      const client = new pg.Client(superConfig);
      await client.connect();
      await client.end();
      return true;
    }, { timeoutMs: 30_000, process: child });
    const app: PostgresRole = { user: 'app', password: randomBytes(18).toString('base64url') };
    const appMd5: PostgresRole = { user: 'app_md5', password: randomBytes(18).toString('base64url') };
    const client = new pg.Client(superConfig);
    await client.connect();
    try {
      await client.query(`CREATE ROLE ${app.user} LOGIN PASSWORD '${app.password}'`);
      await client.query("SET password_encryption = 'md5'");
      await client.query(`CREATE ROLE ${appMd5.user} LOGIN PASSWORD '${appMd5.password}'`);
      await client.query(`CREATE DATABASE ${APP_DATABASE} OWNER ${app.user}`);
      await client.query(`GRANT ALL ON DATABASE ${APP_DATABASE} TO ${appMd5.user}`);
    } finally {
      await client.end();
    }
    return new PostgresServer({ host, tcpHost, port, dataDir, socketPath: join(socketDir, `.s.PGSQL.${port}`), superuser, app, appMd5, options, process: child, launch, tls });
  }

  /** node-postgres settings for `role` (the superuser by default). */
  clientConfig(role: PostgresRole = this.superuser, database = APP_DATABASE): pg.ClientConfig {
    return { host: this.host, port: this.port, user: role.user, password: role.password, database };
  }

  /** Runs one query as the superuser. */
  async query<T extends pg.QueryResultRow = pg.QueryResultRow>(sql: string, params: unknown[] = []): Promise<T[]> {
    const client = new pg.Client(this.clientConfig());
    await client.connect();
    try {
      return (await client.query<T>(sql, params)).rows;
    } finally {
      await client.end();
    }
  }

  /** `SELECT version()` of the running server. */
  async version(): Promise<string> {
    const rows = await this.query<{ server_version: string }>('SHOW server_version');
    return rows[0]?.server_version ?? 'unknown';
  }

  /** True if the server answers a query. */
  async healthy(): Promise<boolean> {
    const rows = await this.query<{ ok: number }>('SELECT 1 AS ok');
    return rows[0]?.ok === 1;
  }

  /**
   * Serves a new certificate from the test CA (or `options.ca`) for `names` (e.g. one
   * without `localhost`, to test host name checks): rewrites the files,
   * reloads, and returns once new connections are handed the new certificate.
   */
  async replaceServerCertificate(names: PostgresCertificateNames, options: { ca?: CertificateBundle } = {}): Promise<void> {
    if (!this.tls) throw new Error('this PostgreSQL cluster was started without SSL');
    const certPem = await this.tls.reissue(names, options.ca);
    await this.query('SELECT pg_reload_conf()');
    const wanted = new X509Certificate(certPem).fingerprint256;
    await waitUntil('postgres to serve the new certificate', async () => (await this.presentedCertificate()).fingerprint256 === wanted, { timeoutMs: 10_000, process: this.process });
  }

  /** The certificate the server presents to a new connection (SSLRequest, then a handshake without verification). */
  presentedCertificate(): Promise<X509Certificate> {
    return new Promise((resolve, reject) => {
      const socket = netConnect({ host: this.tcpHost, port: this.port });
      socket.once('error', reject);
      socket.once('connect', () => {
        const sslRequest = Buffer.alloc(8);
        sslRequest.writeInt32BE(8, 0);
        sslRequest.writeInt32BE(80877103, 4);
        socket.write(sslRequest);
      });
      socket.once('data', (answer) => {
        if (answer[0] !== 0x53 /* S */) {
          socket.destroy();
          reject(new Error('the server refused SSL'));
          return;
        }
        // Certificate inspection only: no data is sent over this channel.
        const secure = tlsConnect({ socket, rejectUnauthorized: false }, () => {
          const cert = secure.getPeerX509Certificate();
          secure.destroy();
          if (cert) resolve(cert);
          else reject(new Error('the server presented no certificate'));
        });
        secure.once('error', reject);
      });
    });
  }

  /**
   * Stops the server, with a fast shutdown (`fast`: clients get 57P01) or by
   * SIGKILL of the postmaster and every backend at once (`kill`: a crashed
   * host), and starts it again on the same port and data directory; resolves
   * once it accepts connections. `downMs` keeps it down that long first.
   */
  async restart(how: 'fast' | 'kill', downMs = 0): Promise<void> {
    if (how === 'fast') {
      this.process.signal('SIGINT');
      await this.process.stop(10_000);
    } else {
      // Backends are children in the postmaster's process group: one signal takes them all.
      this.process.signal('SIGKILL');
      await this.process.waitForExit();
    }
    if (downMs > 0) await new Promise((r) => setTimeout(r, downMs));
    this.process = this.launch();
    await waitUntil('postgres restart', () => this.healthy(), { timeoutMs: 30_000, process: this.process });
  }

  /** The postgres log file. */
  get logFile(): string {
    return this.process.logFile;
  }

  /** Fast shutdown. */
  async stop(): Promise<void> {
    // SIGINT is PostgreSQL's "fast" shutdown: roll back and disconnect clients.
    this.process.signal('SIGINT');
    await this.process.stop(10_000);
  }
}

/** The CA and the server's certificate and key on disk, readable only by the server's account. */
class ServerTlsFiles {
  readonly ca: CertificateBundle;
  readonly certFile: string;
  readonly keyFile: string;
  private readonly account: { uid: number; gid: number } | undefined;

  private constructor(ca: CertificateBundle, dir: string, account: { uid: number; gid: number } | undefined) {
    this.ca = ca;
    this.certFile = join(dir, 'server.crt');
    this.keyFile = join(dir, 'server.key');
    this.account = account;
  }

  static async create(dir: string, account: { uid: number; gid: number } | undefined, names: PostgresCertificateNames): Promise<ServerTlsFiles> {
    const files = new ServerTlsFiles(await createCertificateAuthority('poolkeeper test PostgreSQL CA', 2), dir, account);
    await files.reissue(names);
    return files;
  }

  /** Writes a new server certificate and key; returns the certificate PEM. */
  async reissue(names: PostgresCertificateNames, ca: CertificateBundle = this.ca): Promise<string> {
    // A neutral CN: with no DNS SAN, clients fall back to the CN, and only the SANs should name the server.
    const leaf = await issueCertificate(ca, { commonName: 'poolkeeper test PostgreSQL', dnsNames: names.dnsNames, ipAddresses: names.ipAddresses, usage: 'server', validityDays: 1 });
    // PostgreSQL refuses a key its owner shares with group or world.
    this.write(this.keyFile, leaf.keyPem, 0o600);
    this.write(this.certFile, leaf.certPem, 0o644);
    return leaf.certPem;
  }

  private write(path: string, content: string, mode: number): void {
    writeFileSync(path, content, { mode });
    if (this.account) chownSync(path, this.account.uid, this.account.gid);
  }
}
