/**
 * The CA that signed the database server's certificate, read from the file
 * the webhook mounts from spec.database.caSecretRef. Kubernetes replaces a
 * Secret volume's files in place when the Secret changes (cert-manager and
 * CloudNativePG rotate their CAs), so the file is checked again before each
 * server login: after a rotation new server connections verify against the
 * new CA, with no restart. Connections already open keep the TLS session
 * they verified.
 */
import { X509Certificate } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import type { Logger } from 'pino';

/** Where the sidecar's server logins get the CA they verify against. */
export interface DatabaseCaSource {
  /** The CA bundle (PEM) to verify the server's certificate against now. */
  current(): string;
}

/** A CA file checked (one stat) at each use and read again when it changed. */
export class FileDatabaseCa implements DatabaseCaSource {
  private readonly path: string;
  private readonly logger: Logger;
  private pem: string;
  /** What stat said when `pem` was read: inode, size and mtime. */
  private version: string | undefined;
  private failing = false;

  /** Reads `path` now: a missing or unreadable file is an error at start, as a bad setting is. */
  constructor(options: { path: string; logger: Logger }) {
    this.path = options.path;
    this.logger = options.logger;
    this.version = this.statVersion();
    this.pem = FileDatabaseCa.parse(readFileSync(this.path, 'utf8'), this.path);
  }

  current(): string {
    const version = this.statVersion();
    if (version === this.version) return this.pem;
    try {
      const pem = FileDatabaseCa.parse(readFileSync(this.path, 'utf8'), this.path);
      this.version = version;
      this.failing = false;
      if (pem !== this.pem) {
        this.logger.info({ path: this.path, certificates: FileDatabaseCa.fingerprints(pem) }, 'the database CA changed: new server connections verify against it');
        this.pem = pem;
      }
    } catch (error) {
      // Half-written or removed: keep verifying against the last good CA, and say so once.
      if (!this.failing) this.logger.warn({ path: this.path, err: (error as Error).message }, 'the database CA file cannot be read: keeping the previous CA');
      this.failing = true;
    }
    return this.pem;
  }

  private statVersion(): string | undefined {
    try {
      const stat = statSync(this.path);
      return `${stat.ino}:${stat.size}:${stat.mtimeMs}`;
    } catch {
      return undefined;
    }
  }

  /** The text, if it holds at least one certificate every one of which parses. */
  private static parse(text: string, path: string): string {
    const blocks = text.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
    if (blocks.length === 0) throw new Error(`${path} holds no PEM certificate`);
    for (const block of blocks) new X509Certificate(block);
    return text;
  }

  private static fingerprints(pem: string): string[] {
    return (pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? []).map((block) => new X509Certificate(block).fingerprint256);
  }
}
