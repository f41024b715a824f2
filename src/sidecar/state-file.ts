/**
 * A small file in the sidecar's state directory (an emptyDir of the pod): it
 * outlives the sidecar process, so the next sidecar in the same pod (after a
 * SIGKILL, an OOM kill, a crash) reads what this one knew. Written whole
 * (to a temporary file, then renamed), so a reader never sees half of it.
 */
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import type { Logger } from 'pino';

/** One JSON file of the state directory. */
export class StateFile {
  private readonly path: string;
  private readonly what: string;
  private readonly logger: Logger;
  private last = '';
  private failed = false;

  /** `what`: the file's content in a few words, for logs ("backend ledger"). */
  constructor(options: { path: string; what: string; logger: Logger }) {
    this.path = options.path;
    this.what = options.what;
    this.logger = options.logger;
  }

  /** The parsed content a previous sidecar left; undefined when there is no readable file. */
  read(): unknown {
    let text: string;
    try {
      text = readFileSync(this.path, 'utf8');
    } catch {
      return undefined;
    }
    try {
      const parsed = JSON.parse(text) as unknown;
      this.last = text;
      return parsed;
    } catch {
      this.logger.warn({ path: this.path }, `${this.what} unreadable; starting without it`);
      return undefined;
    }
  }

  /** Replaces the content with `value` (JSON), unless it is what the file holds already. */
  write(value: unknown): void {
    const text = JSON.stringify(value);
    if (text === this.last) return;
    try {
      mkdirSync(dirname(this.path), { recursive: true });
      const temporary = `${this.path}.tmp`;
      writeFileSync(temporary, text, { mode: 0o600 });
      renameSync(temporary, this.path);
      this.last = text;
      this.failed = false;
    } catch (err) {
      // Once per failure spell: the sidecar goes on, only its successor would not know.
      if (!this.failed) this.logger.warn({ path: this.path, error: err instanceof Error ? err.message : String(err) }, `${this.what} cannot be written`);
      this.failed = true;
    }
  }
}
