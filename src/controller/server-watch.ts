/**
 * One idle login per database server, held by the leading controller, whose
 * end says the server went away: PostgreSQL restarted (a new
 * max_connections takes effect only then: an instance resized, a setting
 * changed by a DBA), failed over, or its host was lost. The limit is then
 * read again at once, where the periodic check would find it only minutes
 * later, while the pods' budgets still sum to the old limit.
 */
import type { Logger } from 'pino';
import type { DiscoveryTarget, HeldLogin } from './limit-discovery.ts';

/** What the watch needs: a way to hold a login, and whom to tell. */
export interface ServerWatchDeps {
  hold(target: DiscoveryTarget): Promise<HeldLogin>;
  /** The login to `server` ended, and the server answers again: read its limit again. */
  onLost(server: string): void;
  logger: Logger;
}

/** First wait before logging in again after the held login ended, and the most between tries (ms). */
const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 10_000;

/** A login held or being opened; `fingerprint` names the target it used. */
interface HeldEntry {
  fingerprint: string;
  login: Promise<HeldLogin | undefined>;
}

/** The held logins, by server key. */
export class ServerWatch {
  private readonly deps: ServerWatchDeps;
  /** A login held or being opened, per server; its fingerprint says which target it used. */
  private readonly held = new Map<string, HeldEntry>();

  constructor(deps: ServerWatchDeps) {
    this.deps = deps;
  }

  /**
   * Holds a login to `server` through `target` (one whose check just
   * succeeded) unless one is held or being opened with the same fingerprint.
   */
  ensure(server: string, fingerprint: string, target: DiscoveryTarget): void {
    const current = this.held.get(server);
    if (current?.fingerprint === fingerprint) return;
    if (current) void this.release(server, current);
    const entry: HeldEntry = { fingerprint, login: Promise.resolve(undefined) };
    this.held.set(server, entry);
    entry.login = this.open(server, entry, target);
  }

  /** Releases the login to `server` (no DatabaseConnection uses it any more). */
  drop(server: string): void {
    const entry = this.held.get(server);
    if (entry) void this.release(server, entry);
  }

  /** Releases every login (this replica stops leading, or stops). */
  async releaseAll(): Promise<void> {
    await Promise.all([...this.held].map(([server, entry]) => this.release(server, entry)));
  }

  /** How many logins are held or being opened. */
  get size(): number {
    return this.held.size;
  }

  private async open(server: string, entry: HeldEntry, target: DiscoveryTarget): Promise<HeldLogin | undefined> {
    let login: HeldLogin;
    try {
      login = await this.deps.hold(target);
    } catch (err) {
      // The next successful check tries again.
      if (this.held.get(server) === entry) this.held.delete(server);
      this.deps.logger.debug({ server, error: err instanceof Error ? err.message : String(err) }, 'could not hold a login to watch the server');
      return undefined;
    }
    this.watchLoss(server, entry, target, login);
    return login;
  }

  /**
   * When `login` ends, logs in again until the server answers (0.5 s, then
   * twice as long each time, at most 10 s apart) and only then tells: the
   * check then reads the server as it came back, where one at once would
   * find it still shutting down or starting up.
   */
  private watchLoss(server: string, entry: HeldEntry, target: DiscoveryTarget, login: HeldLogin): void {
    void login.lost.then(async () => {
      if (this.held.get(server) !== entry) return;
      this.deps.logger.info({ server }, 'the controller\'s idle login to the server ended (a restart, a failover, a lost host): its limit is read again once it answers');
      for (let delay = FIRST_RETRY_MS; this.held.get(server) === entry; delay = Math.min(delay * 2, MAX_RETRY_MS)) {
        await new Promise((resolve) => setTimeout(resolve, delay).unref());
        if (this.held.get(server) !== entry) return;
        let again: HeldLogin;
        try {
          again = await this.deps.hold(target);
        } catch {
          continue;
        }
        if (this.held.get(server) !== entry) {
          await again.close();
          return;
        }
        entry.login = Promise.resolve(again);
        this.watchLoss(server, entry, target, again);
        this.deps.onLost(server);
        return;
      }
    });
  }

  private async release(server: string, entry: HeldEntry): Promise<void> {
    if (this.held.get(server) === entry) this.held.delete(server);
    const login = await entry.login;
    await login?.close();
  }
}
