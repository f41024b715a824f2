/**
 * The backends this sidecar holds, kept in a file that outlives the process
 * (an emptyDir of the pod). A sidecar killed without a drain (SIGKILL, OOM)
 * leaves backends that PostgreSQL ends only when it next writes to their
 * socket; a long statement keeps one alive. The next sidecar in the same pod
 * reads the file, cancels each left-over backend with its key, and counts it
 * until it is confirmed gone, so the pod never holds more than its grant.
 */
import type { Logger } from 'pino';
import { StateFile } from './state-file.ts';

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
  private readonly file: StateFile;

  constructor(path: string, logger: Logger) {
    this.file = new StateFile({ path, what: 'backend ledger', logger });
  }

  /** The backends a previous sidecar in this pod left; none when there is no (readable) file. */
  load(): BackendRecord[] {
    const parsed = this.file.read();
    return Array.isArray(parsed) ? parsed.filter(isRecord) : [];
  }

  /** Replaces the file's content with `records`. */
  save(records: readonly BackendRecord[]): void {
    this.file.write(records.map((r) => ({ processId: r.processId, secretKey: r.secretKey, createdAt: r.createdAt })));
  }
}
