/**
 * Credentials from a mounted Secret directory. The kubelet updates such a
 * volume by writing a new timestamped directory and swapping the `..data`
 * symlink atomically, so both files are read through one resolved `..data`
 * to never mix an old username with a new password.
 */
import { existsSync, readdirSync, readFileSync, realpathSync, statSync, watch, type FSWatcher } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { credentialsGeneration } from '../core/credentials.ts';
import type { Credentials, CredentialsSource } from './settings.ts';

/** Reads `username` and `password` (and hashes every file) of a Secret directory. */
export function readCredentialsDirectory(directory: string): Credentials {
  const dataLink = join(directory, '..data');
  const base = existsSync(dataLink) ? realpathSync(dataLink) : directory;
  const data: Record<string, Buffer> = {};
  for (const name of readdirSync(base)) {
    if (name.startsWith('.')) continue;
    const path = join(base, name);
    if (!statSync(path).isFile()) continue;
    data[name] = readFileSync(path);
  }
  const username = data.username?.toString('utf8');
  const password = data.password?.toString('utf8');
  if (username === undefined || password === undefined) throw new Error(`credentials directory ${directory} lacks username or password`);
  return { username, password, generation: credentialsGeneration(data) };
}

/** Options of FileCredentialsSource. */
export interface FileCredentialsSourceOptions {
  directory: string;
  logger: Logger;
  /** Poll period backing up fs.watch, which misses some symlink swaps (default 2000 ms). */
  pollIntervalMs?: number;
}

/**
 * A CredentialsSource over a mounted Secret. Watching starts with the first
 * onChange subscriber and stops with the last, so the object owns no timer
 * nobody asked for.
 */
export class FileCredentialsSource implements CredentialsSource {
  private credentials: Credentials;
  private readonly listeners = new Set<(c: Credentials) => void>();
  private watcher: FSWatcher | undefined;
  private poller: NodeJS.Timeout | undefined;
  private readonly options: FileCredentialsSourceOptions;

  constructor(options: FileCredentialsSourceOptions) {
    this.options = options;
    this.credentials = readCredentialsDirectory(options.directory);
  }

  /** The credentials as last read. */
  current(): Credentials {
    return this.credentials;
  }

  /** Subscribes to changes (starts watching on the first subscriber). */
  onChange(listener: (credentials: Credentials) => void): () => void {
    this.listeners.add(listener);
    if (this.listeners.size === 1) this.startWatching();
    return () => {
      this.listeners.delete(listener);
      if (this.listeners.size === 0) this.stopWatching();
    };
  }

  /** Re-reads the directory now; notifies listeners if the generation changed. */
  refresh(): void {
    let next: Credentials;
    try {
      next = readCredentialsDirectory(this.options.directory);
    } catch (error) {
      // Mid-swap or briefly missing: keep the old credentials and try again later.
      this.options.logger.warn({ err: (error as Error).message }, 'credentials directory unreadable, keeping the previous credentials');
      return;
    }
    if (next.generation === this.credentials.generation) return;
    this.credentials = next;
    this.options.logger.info({ generation: next.generation }, 'credentials changed');
    for (const listener of this.listeners) listener(next);
  }

  private startWatching(): void {
    try {
      this.watcher = watch(this.options.directory, () => this.refresh());
      this.watcher.on('error', () => this.stopWatcherOnly());
    } catch {
      this.watcher = undefined;
    }
    this.poller = setInterval(() => this.refresh(), this.options.pollIntervalMs ?? 2000);
    this.poller.unref();
  }

  private stopWatcherOnly(): void {
    this.watcher?.close();
    this.watcher = undefined;
  }

  private stopWatching(): void {
    this.stopWatcherOnly();
    if (this.poller) clearInterval(this.poller);
    this.poller = undefined;
  }
}

/** Fixed credentials (tests, or an entry point that reads them elsewhere). */
export class StaticCredentialsSource implements CredentialsSource {
  private credentials: Credentials;
  private readonly listeners = new Set<(c: Credentials) => void>();

  constructor(credentials: Credentials) {
    this.credentials = credentials;
  }

  /** The credentials. */
  current(): Credentials {
    return this.credentials;
  }

  /** Subscribes to `set()` calls. */
  onChange(listener: (credentials: Credentials) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Replaces the credentials and notifies subscribers. */
  set(credentials: Credentials): void {
    this.credentials = credentials;
    for (const listener of this.listeners) listener(credentials);
  }
}
