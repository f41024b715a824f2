/**
 * The sidecar's own login to PostgreSQL over an already open stream (a TCP
 * socket or an SSH channel): optional TLS per sslmode, then the startup
 * handshake answering SCRAM-SHA-256, md5 or cleartext challenges. Outgoing
 * messages come from pg-protocol's serializer; incoming ones go through our
 * FrameReader.
 */
import { createHash, createHmac, pbkdf2, randomBytes, timingSafeEqual } from 'node:crypto';
import { isIP } from 'node:net';
import type { Duplex } from 'node:stream';
import { connect as tlsConnect, TLSSocket, type ConnectionOptions } from 'node:tls';
import { serialize } from 'pg-protocol';
import { FrameReader, buildStartupMessage, channelBindingAttribute, chooseSaslMethod, parseNoticeFields, parseParameterStatus, unboundLoginRefusal, type ChannelBindingMode } from '../core/protocol/index.ts';
import type { SslMode } from './settings.ts';

/** An upstream failure with the server's SQLSTATE when it sent one. */
export class UpstreamError extends Error {
  readonly sqlState: string | undefined;
  readonly kind: string;
  /** Fields of the server's ErrorResponse, when it sent one. */
  readonly serverFields: Readonly<Record<string, string>> | undefined;

  constructor(kind: string, message: string, sqlState?: string, serverFields?: Readonly<Record<string, string>>) {
    super(message);
    this.name = 'UpstreamError';
    this.kind = kind;
    this.sqlState = sqlState;
    this.serverFields = serverFields;
  }
}

/** What a successful login yields. */
export interface UpstreamSession {
  stream: Duplex;
  parameters: Map<string, string>;
  processId: number;
  secretKey: number;
}

/** Inputs of one login. */
export interface UpstreamLoginOptions {
  stream: Duplex;
  host: string;
  dbname: string;
  username: string;
  password: string;
  sslMode: SslMode;
  /** libpq's channel_binding; default prefer (SCRAM-SHA-256-PLUS whenever TLS is in use and the server offers it). */
  channelBinding?: ChannelBindingMode | undefined;
  caPem?: string;
  timeoutMs: number;
  /**
   * Run-time settings sent as startup parameters instead of the sidecar's own
   * (client_encoding UTF8, application_name poolkeeper-sidecar): the server
   * applies them at login, so they are also what RESET and DISCARD ALL return to.
   */
  settings?: ReadonlyMap<string, string>;
}

/**
 * Reads the one-byte answer to SSLRequest. Anything after it arrived before
 * encryption and would be taken as the server's words (CVE-2021-23222), so it
 * is refused.
 */
function readSslAnswer(stream: Duplex): Promise<number> {
  return new Promise((resolve, reject) => {
    const done = (): void => {
      stream.off('data', onData);
      stream.off('error', onError);
      stream.off('close', onClose);
      stream.pause();
    };
    const onData = (chunk: Buffer): void => {
      done();
      if (chunk.length > 1) reject(new UpstreamError('tls', 'server sent unencrypted data after its answer to SSLRequest'));
      else resolve(chunk[0]!);
    };
    const onError = (err: Error): void => {
      done();
      reject(new UpstreamError('connect', `server connection failed during SSL negotiation: ${err.message}`));
    };
    const onClose = (): void => {
      done();
      reject(new UpstreamError('connect', 'server closed the connection during SSL negotiation'));
    };
    stream.on('data', onData);
    stream.on('error', onError);
    stream.on('close', onClose);
    stream.resume();
  });
}

async function negotiateTls(options: UpstreamLoginOptions): Promise<Duplex> {
  const { stream, sslMode } = options;
  if (sslMode === 'disable' || sslMode === 'allow') return stream;
  stream.write(serialize.requestSsl());
  const answer = await readSslAnswer(stream);
  if (answer === 0x4e /* N */) {
    if (sslMode === 'prefer') return stream;
    throw new UpstreamError('tls', `server ${options.host} does not support SSL, but sslmode=${sslMode} requires it`);
  }
  if (answer !== 0x53 /* S */) throw new UpstreamError('tls', `unexpected answer ${answer} to SSLRequest`);
  // As libpq: sslmode=require with a root CA behaves as verify-ca.
  const verifyChain = sslMode === 'verify-ca' || sslMode === 'verify-full' || (sslMode === 'require' && options.caPem !== undefined);
  const tlsOptions: ConnectionOptions = {
    socket: stream,
    // The name verify-full checks; without it Node falls back to the socket's
    // own host, which an SSH channel does not have ('localhost').
    host: options.host,
    rejectUnauthorized: verifyChain,
    ...(options.caPem !== undefined ? { ca: options.caPem } : {}),
    ...(isIP(options.host) === 0 ? { servername: options.host } : {}),
    // verify-ca checks the chain only; verify-full also the host name.
    ...(sslMode === 'verify-full' ? {} : { checkServerIdentity: () => undefined }),
  };
  return new Promise((resolve, reject) => {
    // A certificate that does not verify stays so until the CA or the server's certificate changes: 'tls-verify' says so.
    const onError = (err: NodeJS.ErrnoException): void => reject(new UpstreamError(isVerifyFailure(err) ? 'tls-verify' : 'tls', `TLS to ${options.host} failed (sslmode=${sslMode}): ${err.message}`));
    const secure = tlsConnect(tlsOptions, () => {
      secure.off('error', onError);
      resolve(secure);
    });
    secure.once('error', onError);
  });
}

/** True for Node's certificate verification errors (UNABLE_TO_VERIFY_LEAF_SIGNATURE, ERR_TLS_CERT_ALTNAME_INVALID, CERT_HAS_EXPIRED, ...). */
function isVerifyFailure(err: NodeJS.ErrnoException): boolean {
  return typeof err.code === 'string' && /CERT|SIGNATURE|VERIFY|ISSUER/.test(err.code);
}

/** negotiateTls within `timeoutMs`; on failure the stream is destroyed, as the login owns it. */
async function negotiateTlsWithin(options: UpstreamLoginOptions): Promise<Duplex> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new UpstreamError('timeout', `SSL negotiation with ${options.host} did not finish within ${options.timeoutMs} ms`)), options.timeoutMs);
  });
  try {
    return await Promise.race([negotiateTls(options), timeout]);
  } catch (error) {
    options.stream.destroy();
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

function md5Hex(data: string | Buffer): string {
  return createHash('md5').update(data).digest('hex');
}

function hmac(key: Buffer, data: string): Buffer {
  return createHmac('sha256', key).update(data).digest();
}

function xor(a: Buffer, b: Buffer): Buffer {
  const out = Buffer.alloc(a.length);
  for (let i = 0; i < a.length; i += 1) out[i] = a[i]! ^ b[i]!;
  return out;
}

/**
 * More PBKDF2 rounds than any real server asks for (PostgreSQL's default is
 * 4,096): a server, or anyone between, that asks for more would hold a thread
 * of the pool the sidecar's I/O shares for minutes.
 */
const MAX_SCRAM_ITERATIONS = 1_000_000;

/** Client side of SCRAM-SHA-256 (RFC 5802/7677), with channel binding (RFC 5929 tls-server-end-point) when the GS2 header asks for it. */
class ScramClient {
  private readonly nonce = randomBytes(18).toString('base64');
  private readonly clientFirstBare = `n=*,r=${this.nonce}`;
  private serverSignature: Buffer | undefined;
  private readonly password: string;
  private readonly gs2Header: string;
  private readonly serverCertificate: Buffer | undefined;

  constructor(password: string, gs2Header: string, serverCertificate: Buffer | undefined) {
    this.password = password;
    this.gs2Header = gs2Header;
    this.serverCertificate = serverCertificate;
  }

  /** The exchange binds the TLS connection (SCRAM-SHA-256-PLUS). */
  get bound(): boolean {
    return this.gs2Header.startsWith('p=');
  }

  initialResponse(): string {
    return `${this.gs2Header}${this.clientFirstBare}`;
  }

  async finalResponse(serverFirst: string): Promise<string> {
    const attrs = new Map(serverFirst.split(',').map((kv) => [kv.slice(0, 1), kv.slice(2)] as const));
    const serverNonce = attrs.get('r') ?? '';
    const salt = Buffer.from(attrs.get('s') ?? '', 'base64');
    const iterations = Number(attrs.get('i'));
    if (!serverNonce.startsWith(this.nonce) || serverNonce.length === this.nonce.length) throw new UpstreamError('auth', 'SCRAM: server nonce does not extend ours');
    if (!Number.isInteger(iterations) || iterations < 1 || salt.length === 0) throw new UpstreamError('auth', 'SCRAM: malformed server-first-message');
    if (iterations > MAX_SCRAM_ITERATIONS) throw new UpstreamError('auth', `SCRAM: the server asks for ${iterations} iterations, more than the ${MAX_SCRAM_ITERATIONS} the sidecar computes`);
    let binding: string;
    try {
      binding = channelBindingAttribute(this.gs2Header, this.serverCertificate);
    } catch (error) {
      throw new UpstreamError('channel-binding', `SCRAM: ${error instanceof Error ? error.message : String(error)}`);
    }
    const salted = await new Promise<Buffer>((resolve, reject) => pbkdf2(this.password.normalize('NFKC'), salt, iterations, 32, 'sha256', (err, key) => (err ? reject(err) : resolve(key))));
    const clientKey = hmac(salted, 'Client Key');
    const storedKey = createHash('sha256').update(clientKey).digest();
    const withoutProof = `c=${binding},r=${serverNonce}`;
    const authMessage = `${this.clientFirstBare},${serverFirst},${withoutProof}`;
    const proof = xor(clientKey, hmac(storedKey, authMessage));
    this.serverSignature = hmac(hmac(salted, 'Server Key'), authMessage);
    return `${withoutProof},p=${proof.toString('base64')}`;
  }

  verifyFinal(serverFinal: string): void {
    const v = serverFinal.split(',').find((kv) => kv.startsWith('v='));
    const got = Buffer.from(v?.slice(2) ?? '', 'base64');
    if (!this.serverSignature || got.length !== this.serverSignature.length || !timingSafeEqual(got, this.serverSignature)) {
      throw new UpstreamError('auth', 'SCRAM: the server signature does not match (not the real server?)');
    }
  }
}

/** Performs TLS negotiation and the startup handshake; resolves once ReadyForQuery arrives. */
export async function loginUpstream(options: UpstreamLoginOptions): Promise<UpstreamSession> {
  const stream = await negotiateTlsWithin(options);
  return new Promise<UpstreamSession>((resolve, reject) => {
    const reader = new FrameReader();
    const parameters = new Map<string, string>();
    let processId = 0;
    let secretKey = 0;
    let scram: ScramClient | undefined;
    const channelBinding = options.channelBinding ?? 'prefer';
    let finished = false;
    const timer = setTimeout(() => fail(new UpstreamError('timeout', `login did not finish within ${options.timeoutMs} ms`)), options.timeoutMs);
    const cleanup = (): void => {
      finished = true;
      clearTimeout(timer);
      stream.off('data', onData);
      stream.off('error', onError);
      stream.off('close', onClose);
    };
    const fail = (error: Error): void => {
      if (finished) return;
      cleanup();
      stream.destroy();
      reject(error);
    };
    const onError = (err: Error): void => fail(new UpstreamError('connect', `server connection failed: ${err.message}`));
    const onClose = (): void => fail(new UpstreamError('connect', 'server closed the connection during login'));
    // A cleartext or md5 request under `require` is refused before it is answered, so a login that ends without SCRAM used no password.
    const refuseUnbound = (method: string): void => {
      const refusal = unboundLoginRefusal(channelBinding, method);
      if (refusal !== undefined) throw new UpstreamError('channel-binding', refusal);
    };
    const onAuth = (body: Buffer): void => {
      const code = body.readInt32BE(0);
      switch (code) {
        case 0:
          // As libpq: a required binding is not satisfied by a login that never made one (trust, password, md5).
          if (scram?.bound !== true) refuseUnbound(scram ? 'SCRAM without channel binding' : 'no password (trust)');
          return;
        case 3:
          // Refused before the password goes out, as libpq does: it would reach whoever is between.
          refuseUnbound('a cleartext password');
          stream.write(serialize.password(options.password));
          return;
        case 5: {
          refuseUnbound('md5');
          const salt = body.subarray(4, 8);
          const inner = md5Hex(`${options.password}${options.username}`);
          stream.write(serialize.password(`md5${md5Hex(Buffer.concat([Buffer.from(inner), salt]))}`));
          return;
        }
        case 10: {
          const mechanisms = body.subarray(4).toString('utf8').split('\0');
          const tls = stream instanceof TLSSocket;
          const choice = chooseSaslMethod(mechanisms, tls, channelBinding);
          if ('refused' in choice) throw new UpstreamError(choice.cause === 'channel-binding' ? 'channel-binding' : 'auth', choice.refused);
          scram = new ScramClient(options.password, choice.gs2Header, tls ? stream.getPeerCertificate().raw : undefined);
          stream.write(serialize.sendSASLInitialResponseMessage(choice.mechanism, scram.initialResponse()));
          return;
        }
        case 11:
          if (!scram) throw new UpstreamError('auth', 'SASL continue without SASL start');
          scram.finalResponse(body.subarray(4).toString('utf8')).then((final) => {
            if (!finished) stream.write(serialize.sendSCRAMClientFinalMessage(final));
          }, fail);
          return;
        case 12:
          if (!scram) throw new UpstreamError('auth', 'SASL final without SASL start');
          scram.verifyFinal(body.subarray(4).toString('utf8'));
          return;
        default:
          throw new UpstreamError('auth', `unsupported authentication request ${code}`);
      }
    };
    const onData = (chunk: Buffer): void => {
      try {
        reader.push(chunk);
        while (reader.next()) {
          const body = reader.buffer.subarray(reader.bodyStart, reader.end);
          switch (reader.type) {
            case 0x52: // R
              onAuth(body);
              break;
            case 0x53: { // S
              const [name, value] = parseParameterStatus(body);
              parameters.set(name, value);
              break;
            }
            case 0x4b: // K
              processId = body.readInt32BE(0);
              secretKey = body.readInt32BE(4);
              break;
            case 0x45: { // E
              const fields = parseNoticeFields(body);
              const kind = fields.C === '28P01' || fields.C === '28000' ? 'auth' : 'server';
              fail(new UpstreamError(kind, `server refused the login: ${fields.M ?? 'unknown error'}`, fields.C, fields));
              return;
            }
            case 0x5a: // Z
              cleanup();
              stream.pause();
              resolve({ stream, parameters, processId, secretKey });
              return;
            default: // NoticeResponse, NegotiateProtocolVersion: nothing to do
          }
        }
      } catch (error) {
        fail(error instanceof Error ? error : new Error(String(error)));
      }
    };
    stream.on('data', onData);
    stream.once('error', onError);
    stream.once('close', onClose);
    // A login for a client has exactly its settings (a client that names no client_encoding
    // gets the database's, as direct); the sidecar's own logins name themselves and read UTF-8.
    const startup: Record<string, string> = options.settings !== undefined ? Object.fromEntries(options.settings) : { client_encoding: 'UTF8', application_name: 'poolkeeper-sidecar' };
    // Not pg-protocol's serialize.startup: it appends client_encoding UTF8 to whatever it is given.
    stream.write(buildStartupMessage({ ...startup, user: options.username, database: options.dbname }));
    stream.resume();
  });
}
