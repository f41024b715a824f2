/**
 * The backends this sidecar holds, kept in a file that outlives the process
 * (an emptyDir of the pod). A sidecar killed without a drain (SIGKILL, OOM)
 * leaves backends that PostgreSQL ends only when it next writes to their
 * socket; a long statement keeps one alive. The next sidecar in the same pod
 * reads the file, cancels each left-over backend with its key, and counts it
 * until it is confirmed gone, so the pod never holds more than its grant.
 */
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import type { Logger } from 'pino';

/** A backend: its pid and cancel key (BackendKeyData) and when its connection was made (ms since the epoch). */
export interface BackendRecord {
  processId: number;
  secretKey: number;
  createdAt: number;
}

function isRecord(value: unknown): value is BackendRecord {
  if (value === null || typeof value !== 'object') return false;
  const r = value as Record<string, unknown>;
  return Number.isInteger(r.processId) && Number.isInteger(r.secretKey) && typeof r.createdAt === 'number' && Number.isFinite(r.createdAt);
}

/** Reads and atomically rewrites the ledger file. */
export class BackendLedger {
  private readonly path: string;
  private readonly logger: Logger;
  private last = '';
  private failed = false;

  constructor(path: string, logger: Logger) {
    this.path = path;
    this.logger = logger;
  }

  /** The backends a previous sidecar in this pod left; none when there is no (readable) file. */
  load(): BackendRecord[] {
    let text: string;
    try {
      text = readFileSync(this.path, 'utf8');
    } catch {
      return [];
    }
    try {
      const parsed = JSON.parse(text) as unknown;
      const records = Array.isArray(parsed) ? parsed.filter(isRecord) : [];
      this.last = text;
      return records;
    } catch {
      this.logger.warn({ path: this.path }, 'backend ledger unreadable; starting without it');
      return [];
    }
  }

  /** Replaces the file's content with `records` (write to a temporary file, then rename: never half a file). */
  save(records: readonly BackendRecord[]): void {
    const text = JSON.stringify(records.map((r) => ({ processId: r.processId, secretKey: r.secretKey, createdAt: r.createdAt })));
    if (text === this.last) return;
    try {
      mkdirSync(dirname(this.path), { recursive: true });
      const temporary = `${this.path}.tmp`;
      writeFileSync(temporary, text, { mode: 0o600 });
      renameSync(temporary, this.path);
      this.last = text;
      this.failed = false;
    } catch (err) {
      // Once per failure spell: the pool goes on, only a restart would not know its left-overs.
      if (!this.failed) this.logger.warn({ path: this.path, error: err instanceof Error ? err.message : String(err) }, 'backend ledger cannot be written');
      this.failed = true;
    }
  }
}
