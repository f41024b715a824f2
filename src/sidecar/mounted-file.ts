/**
 * Files the sidecar reads from Secret volumes and uses again and again: the
 * CA of the database server's certificate, the SSH key for the bastion.
 * Kubernetes replaces a Secret volume's files in place when the Secret
 * changes (cert-manager and CloudNativePG rotate their CAs; keys are rotated
 * by hand or by an operator), so such a file is checked again, one stat,
 * each time it is used: after a rotation the next server login or tunnel
 * connection uses the new content, with no restart. What is already
 * connected keeps what it verified with.
 */
import { X509Certificate } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import type { Logger } from 'pino';

/** Text that may change while the sidecar runs. */
export interface CurrentText {
  /** The content to use now. */
  current(): string;
}

/** How a MountedFile tells usable content and describes it in logs (never the content itself: keys are secret). */
export interface MountedFileKind {
  /** What it is, for logs: "database CA". */
  what: string;
  /** Throws if `text` cannot be used (a half-written or wrong file). */
  check(text: string): void;
  /** Loggable facts about `text` (fingerprints). */
  describe(text: string): Record<string, unknown>;
}

/** A file checked (one stat) at each use and read again when it changed. */
export class MountedFile implements CurrentText {
  private readonly path: string;
  private readonly kind: MountedFileKind;
  private readonly logger: Logger;
  private text: string;
  /** What stat said when `text` was read: inode, size and mtime. */
  private version: string | undefined;
  private failing = false;

  /** Reads `path` now: a missing or unusable file is an error at start, as a bad setting is. */
  constructor(options: { path: string; kind: MountedFileKind; logger: Logger }) {
    this.path = options.path;
    this.kind = options.kind;
    this.logger = options.logger;
    this.version = this.statVersion();
    this.text = readFileSync(this.path, 'utf8');
    this.kind.check(this.text);
  }

  current(): string {
    const version = this.statVersion();
    if (version === this.version) return this.text;
    try {
      const text = readFileSync(this.path, 'utf8');
      this.kind.check(text);
      this.version = version;
      this.failing = false;
      if (text !== this.text) {
        this.logger.info({ path: this.path, ...this.kind.describe(text) }, `the ${this.kind.what} changed: it is used from the next connection on`);
        this.text = text;
      }
    } catch (error) {
      // Removed or unusable: keep the last good content, and say so once.
      if (!this.failing) this.logger.warn({ path: this.path, err: (error as Error).message }, `the ${this.kind.what} file cannot be used: keeping the previous one`);
      this.failing = true;
    }
    return this.text;
  }

  private statVersion(): string | undefined {
    try {
      const stat = statSync(this.path);
      return `${stat.ino}:${stat.size}:${stat.mtimeMs}`;
    } catch {
      return undefined;
    }
  }
}

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

/** A PEM bundle of CA certificates: at least one, every one of which parses. */
export const DATABASE_CA: MountedFileKind = {
  what: 'database CA',
  check(text) {
    const blocks = text.match(PEM_CERTIFICATE) ?? [];
    if (blocks.length === 0) throw new Error('no PEM certificate in it');
    for (const block of blocks) new X509Certificate(block);
  },
  describe(text) {
    return { certificates: (text.match(PEM_CERTIFICATE) ?? []).map((block) => new X509Certificate(block).fingerprint256) };
  },
};
