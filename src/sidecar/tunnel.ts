/**
 * One SSH connection per sidecar to the bastion; each server connection is a
 * direct-tcpip channel on it. The host key must match the configured key
 * line or SHA256 fingerprint; a mismatch is refused, logged and counted. The
 * connection keeps itself alive and reconnects with exponential backoff and
 * full jitter; while it is down, openers wait until their deadline.
 */
import { createHash } from 'node:crypto';
import { connect as netConnect } from 'node:net';
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import type * as Ssh2 from 'ssh2';
import type { Client as SshClient } from 'ssh2';
import type { SidecarMetrics } from './metrics.ts';
import type { CurrentText, MountedFileKind } from './mounted-file.ts';
import type { SidecarSettings } from './settings.ts';
import { UpstreamError } from './upstream-login.ts';
import { steadyNow } from '../ops/clock.ts';

let ssh2Module: typeof Ssh2 | undefined;
let ssh2Loading: Promise<void> | undefined;

/** ssh2 is loaded by the first tunnel, not by every sidecar: about 15 MB that a sidecar without a bastion does without. */
function loadSsh2(): Promise<void> {
  ssh2Loading ??= import('ssh2').then((m) => {
    ssh2Module = m;
  });
  return ssh2Loading;
}

/** Settings of the tunnel. */
export type TunnelSettings = NonNullable<SidecarSettings['sshTunnel']>;

const BACKOFF_MIN_MS = 200;
const BACKOFF_MAX_MS = 10_000;

/** `SHA256:<base64, no padding>` of a raw SSH public key blob. */
export function sshFingerprint(keyBlob: Buffer): string {
  return `SHA256:${createHash('sha256').update(keyBlob).digest('base64').replace(/=+$/, '')}`;
}

/** True if the host key blob matches the configured `type base64` line or `SHA256:` fingerprint. */
export function hostKeyMatches(configured: string, keyBlob: Buffer): boolean {
  const wanted = configured.trim();
  if (wanted.startsWith('SHA256:')) return sshFingerprint(keyBlob) === wanted.replace(/=+$/, '');
  const blob = wanted.split(/\s+/)[1];
  return blob !== undefined && Buffer.from(blob, 'base64').equals(keyBlob);
}

/**
 * An SSH private key file (OpenSSH or PEM, unencrypted): usable when ssh2
 * parses it; logged by its public key's fingerprint only.
 */
export async function sshPrivateKeyKind(): Promise<MountedFileKind> {
  await loadSsh2();
  const parse = (text: string): Ssh2.ParsedKey => {
    // ssh2 is CommonJS: its `utils` are not among the names Node finds for an ES import.
    const utils = (ssh2Module as unknown as { default: typeof Ssh2 }).default.utils;
    // Typed as one key; a file with several yields an array, of which ssh2's client uses the first.
    const parsed = utils.parseKey(text) as Ssh2.ParsedKey | Error | (Ssh2.ParsedKey | Error)[];
    const key: Ssh2.ParsedKey | Error | undefined = Array.isArray(parsed) ? parsed[0] : parsed;
    if (key === undefined || key instanceof Error) throw new Error(key instanceof Error ? key.message : 'no key in it');
    if (!key.isPrivateKey()) throw new Error('it holds a public key, not a private one');
    return key;
  };
  return {
    what: 'SSH private key',
    check: (text) => void parse(text),
    describe: (text) => ({ publicKey: sshFingerprint(parse(text).getPublicSSH()) }),
  };
}

/** The shared SSH connection. */
export class SshTunnel {
  private client: SshClient | undefined;
  private ready = false;
  private stopped = false;
  private attempt = 0;
  private connectedOnce = false;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private lastError = 'not connected yet';
  /** Why the bastion refused the latest SSH connection for good (host key, login), until one succeeds: openers fail at once rather than wait. */
  private refused: string | undefined;
  private readonly readyWaiters = new Set<() => void>();
  private readonly settings: TunnelSettings;
  /** The configured host key; a change applies from the next connection. */
  private hostKey: string;
  /** The private key file, read again when it changes; absent: settings.privateKey. */
  private readonly privateKey: CurrentText | undefined;
  private readonly logger: Logger;
  private readonly metrics: SidecarMetrics;
  private readonly onUpChange: (up: boolean) => void;
  private readonly onRefused: () => void;

  constructor(deps: { settings: TunnelSettings; privateKey?: CurrentText; logger: Logger; metrics: SidecarMetrics; onUpChange?: (up: boolean) => void; onRefused?: () => void }) {
    this.settings = deps.settings;
    this.hostKey = deps.settings.hostKey;
    this.privateKey = deps.privateKey;
    this.logger = deps.logger.child({ component: 'ssh-tunnel', bastion: `${deps.settings.host}:${deps.settings.port}` });
    this.metrics = deps.metrics;
    this.onUpChange = deps.onUpChange ?? (() => undefined);
    this.onRefused = deps.onRefused ?? (() => undefined);
  }

  /** True while the SSH connection is established. */
  get up(): boolean {
    return this.ready;
  }

  /** Why the tunnel is down, or undefined while it is up. */
  downReason(): string | undefined {
    return this.ready ? undefined : `SSH tunnel to ${this.settings.host}:${this.settings.port} is down: ${this.lastError}`;
  }

  /** Why the bastion refused the latest SSH connection for good (host key, login) while no later one succeeded, or undefined. */
  refusedReason(): string | undefined {
    return this.refused === undefined ? undefined : `SSH tunnel to ${this.settings.host}:${this.settings.port} refused: ${this.refused}`;
  }

  /**
   * A new host key for the bastion (its DatabaseConnection changed): the
   * connection up now was verified and stays; the next one is checked
   * against this key, and a tunnel that is down tries again at once.
   */
  setHostKey(hostKey: string): void {
    if (hostKey === this.hostKey) return;
    this.hostKey = hostKey;
    this.logger.info('the bastion\'s host key changed: the next SSH connection is checked against it');
    this.refused = undefined;
    if (!this.ready && this.reconnectTimer !== undefined && !this.stopped) {
      clearTimeout(this.reconnectTimer);
      this.reconnectTimer = undefined;
      this.connect();
    }
  }

  /** Starts connecting (in the background). */
  start(): void {
    this.stopped = false;
    this.connect();
  }

  /** Opens a forwarded channel to host:port, waiting for the tunnel until `deadline` (on steadyNow's clock). */
  async open(host: string, port: number, deadline: number): Promise<Duplex> {
    while (!this.ready) {
      if (this.stopped) throw new Error('SSH tunnel is stopped');
      const refused = this.refusedReason();
      if (refused !== undefined) throw new UpstreamError('ssh-refused', refused);
      const remaining = deadline - steadyNow();
      if (remaining <= 0) throw new Error(`SSH tunnel to ${this.settings.host}:${this.settings.port} is down: ${this.lastError}`);
      const waiters = this.readyWaiters;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, remaining);
        function done(): void {
          clearTimeout(timer);
          waiters.delete(done);
          resolve();
        }
        waiters.add(done);
      });
    }
    const client = this.client!;
    return new Promise((resolve, reject) => {
      client.forwardOut('127.0.0.1', 0, host, port, (err, channel) => {
        if (err) reject(new Error(`SSH tunnel could not open a channel to ${host}:${port}: ${err.message}`));
        else resolve(channel);
      });
    });
  }

  /** Closes the SSH connection and stops reconnecting. */
  stop(): void {
    this.stopped = true;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.client?.end();
    this.setReady(false);
    for (const wake of [...this.readyWaiters]) wake();
  }

  private connect(): void {
    if (this.stopped) return;
    if (ssh2Module === undefined) {
      void loadSsh2().then(() => this.connect(), (err: unknown) => {
        this.lastError = `cannot load ssh2: ${err instanceof Error ? err.message : String(err)}`;
        this.logger.error({ err: this.lastError }, 'SSH tunnel unavailable');
      });
      return;
    }
    const client = new ssh2Module.Client();
    this.client = client;
    let hostKeyRefused: string | undefined;
    client.on('ready', () => {
      if (this.connectedOnce) this.metrics.tunnelReconnects.inc();
      this.connectedOnce = true;
      this.attempt = 0;
      this.refused = undefined;
      this.logger.info('SSH tunnel up');
      this.setReady(true);
      for (const wake of [...this.readyWaiters]) wake();
      this.readyWaiters.clear();
    });
    client.on('error', (err: Error) => {
      this.lastError = hostKeyRefused !== undefined ? 'host key mismatch' : err.message;
      if (hostKeyRefused === undefined) this.metrics.error('tunnel');
      // Waiting does not cure these: the next connection (backoff, or a new host key or private key) may.
      const level = (err as Error & { level?: string }).level;
      if (hostKeyRefused !== undefined) this.refused = `host key mismatch (the bastion presented ${hostKeyRefused}); check the DatabaseConnection's sshTunnel.hostKey`;
      else if (level === 'client-authentication') this.refused = `the bastion refused the SSH login as "${this.settings.user}" (${err.message}); check the private key Secret and the bastion's authorized keys`;
      else this.refused = undefined;
      if (this.refused !== undefined) {
        for (const wake of [...this.readyWaiters]) wake();
        this.readyWaiters.clear();
        this.onRefused();
      }
      this.logger.warn({ err: this.lastError }, 'SSH tunnel error');
    });
    client.on('close', () => {
      if (this.client !== client) return;
      this.setReady(false);
      this.scheduleReconnect();
    });
    const sock = netConnect({ host: this.settings.host, port: this.settings.port });
    sock.setNoDelay(true);
    sock.on('error', () => undefined); // reported through the client
    client.connect({
      sock,
      username: this.settings.user,
      privateKey: this.privateKey?.current() ?? this.settings.privateKey,
      readyTimeout: 10_000,
      // A frozen or unreachable bastion is declared dead after about 3 s of silence, so statements
      // in flight through it fail (and their backends count until confirmed gone) within a
      // poolTimeout rather than a TCP timeout; one small packet a second is all it costs.
      keepaliveInterval: 1_000,
      keepaliveCountMax: 3,
      hostVerifier: (key: Buffer) => {
        const hostKey = this.hostKey;
        if (hostKeyMatches(hostKey, key)) return true;
        hostKeyRefused = sshFingerprint(key);
        this.metrics.error('tunnel-host-key-mismatch');
        this.logger.error({ presented: sshFingerprint(key), expected: hostKey.startsWith('SHA256:') ? hostKey : 'configured key line' }, 'SSH host key mismatch: refusing the bastion');
        return false;
      },
    });
  }

  private scheduleReconnect(): void {
    if (this.stopped || this.reconnectTimer) return;
    this.attempt += 1;
    // Full jitter: a fleet of sidecars must not reconnect in lockstep.
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(this.attempt, 16));
    const delay = Math.random() * cap;
    this.logger.info({ attempt: this.attempt, delayMs: Math.round(delay) }, 'SSH tunnel down, reconnecting');
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      this.connect();
    }, delay);
  }

  private setReady(ready: boolean): void {
    if (this.ready === ready) return;
    this.ready = ready;
    this.onUpChange(ready);
  }
}
