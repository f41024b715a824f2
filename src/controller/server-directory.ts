/**
 * Server identity of DatabaseConnections: resolves each host (cached) and
 * groups connections whose addresses overlap on the same port into one
 * server key (src/core/tenancy), so `localhost` and `127.0.0.1` are budgeted
 * once; a DatabaseServer's address and aliases join the connections on them
 * (and those naming it in serverRef) into the server it owns. Hosts behind a
 * bastion are not resolved here: they resolve on the bastion's side.
 */
import { lookup } from 'node:dns/promises';
import { steadyNow } from '../ops/clock.ts';
import { isIP } from 'node:net';
import type { DatabaseConnection, DatabaseServer } from '../api/index.ts';
import { serverKey } from '../core/budget/index.ts';
import { groupWithServers, ownedServerKey, type ConnectionEntry, type ServerEntry } from '../core/tenancy/index.ts';

/** Resolves host names to addresses. */
export type Resolver = (host: string) => Promise<string[]>;

const systemResolver: Resolver = async (host) => (await lookup(host, { all: true })).map((a) => a.address);

/** Settings of the directory. */
export interface ServerDirectoryOptions {
  resolver?: Resolver;
  /** How long a resolution is used before it is looked up again (in the background). */
  ttlMs?: number;
  /** How long a first lookup is waited for. */
  lookupTimeoutMs?: number;
}

function id(c: DatabaseConnection): string {
  return `${c.metadata.namespace ?? ''}/${c.metadata.name ?? ''}`;
}

function via(c: DatabaseConnection): string {
  const t = c.spec.sshTunnel;
  return t ? `ssh://${t.user}@${t.host.toLowerCase()}:${t.port}` : '';
}

/** The current server key of every DatabaseConnection. */
export class ServerDirectory {
  private readonly resolver: Resolver;
  private readonly ttlMs: number;
  private readonly resolved = new Map<string, { at: number; addresses: string[] }>();
  private readonly pending = new Map<string, Promise<string[]>>();
  private readonly lookupTimeoutMs: number;
  private keys = new Map<string, string>();
  private owners = new Map<string, string>();
  private mismatched = new Map<string, string>();
  private shadowed = new Map<string, string>();

  constructor(options: ServerDirectoryOptions = {}) {
    this.resolver = options.resolver ?? systemResolver;
    this.ttlMs = options.ttlMs ?? 60_000;
    this.lookupTimeoutMs = options.lookupTimeoutMs ?? 1_500;
  }

  /** The server key of `connection` as of the last refresh (its own address until then). */
  keyOf(connection: DatabaseConnection): string {
    return this.keys.get(id(connection)) ?? this.fallback(connection);
  }

  /** The DatabaseServer owning server key `server`, if any. */
  ownerOf(server: string): string | undefined {
    return this.owners.get(server);
  }

  /** Connections whose serverRef names a DatabaseServer their address is not one of (id -> server name). */
  get mismatchedConnections(): ReadonlyMap<string, string> {
    return this.mismatched;
  }

  /** DatabaseServers sharing an address with an older one (newer -> older). */
  get shadowedServers(): ReadonlyMap<string, string> {
    return this.shadowed;
  }

  private fallback(connection: DatabaseConnection): string {
    if (connection.spec.serverRef) return ownedServerKey(connection.spec.serverRef.name);
    const raw = serverKey(connection.spec.database);
    const v = via(connection);
    return v ? `${v}/${raw}` : raw;
  }

  private async addresses(host: string, now: number): Promise<string[]> {
    const h = host.toLowerCase().replace(/\.$/, '').replace(/^\[(.*)\]$/, '$1');
    if (isIP(h)) return [h];
    const cached = this.resolved.get(h);
    if (cached) {
      // A stale answer is used while a fresh one is looked up: a slow resolver never holds up a reconcile.
      if (now - cached.at >= this.ttlMs && !this.pending.has(h)) void this.lookup(h, now);
      return cached.addresses;
    }
    return this.lookup(h, now);
  }

  /** Resolves `h` (at most `lookupTimeoutMs` waited for; the answer is kept when it comes). */
  private lookup(h: string, now: number): Promise<string[]> {
    let running = this.pending.get(h);
    if (!running) {
      running = this.resolver(h).catch(() => this.resolved.get(h)?.addresses ?? []).then((addresses) => {
        this.resolved.set(h, { at: now, addresses });
        this.pending.delete(h);
        return addresses;
      });
      this.pending.set(h, running);
    }
    let timer: NodeJS.Timeout | undefined;
    // Unresolved in time: the name alone identifies the server until the answer arrives.
    const timeout = new Promise<string[]>((resolve) => {
      timer = setTimeout(() => resolve(this.resolved.get(h)?.addresses ?? []), this.lookupTimeoutMs);
      timer.unref();
    });
    return Promise.race([running, timeout]).finally(() => clearTimeout(timer));
  }

  /**
   * Resolves every connection's host and regroups. Returns the connections
   * whose key changed, with their old and new keys, so both servers are
   * reconciled.
   */
  async refresh(connections: readonly DatabaseConnection[], servers: readonly DatabaseServer[] = [], now = steadyNow()): Promise<Array<{ before: string; after: string }>> {
    const entries: ConnectionEntry[] = await Promise.all(connections.map(async (c) => ({
      id: id(c),
      rawKey: serverKey(c.spec.database),
      port: c.spec.database.port,
      via: via(c),
      addresses: c.spec.sshTunnel ? [] : await this.addresses(c.spec.database.host, now),
      ref: c.spec.serverRef?.name,
    })));
    // Oldest first: when two DatabaseServers claim one address, the older owns it.
    const ordered = [...servers].filter((s) => !s.metadata.deletionTimestamp).sort((a, b) => (a.metadata.creationTimestamp ?? '').toString().localeCompare((b.metadata.creationTimestamp ?? '').toString()) || (a.metadata.name ?? '').localeCompare(b.metadata.name ?? ''));
    const serverEntries: ServerEntry[] = await Promise.all(ordered.map(async (s) => ({
      name: s.metadata.name ?? '',
      addresses: await Promise.all([s.spec.address, ...(s.spec.aliases ?? [])].map(async (a) => ({
        rawKey: serverKey({ host: a.host, port: a.port }),
        port: a.port,
        addresses: await this.addresses(a.host, now),
      }))),
    })));
    const grouping = groupWithServers(entries, serverEntries);
    const next = grouping.keys;
    const changed: Array<{ before: string; after: string }> = [];
    for (const c of connections) {
      const before = this.keyOf(c);
      const after = next.get(id(c)) ?? this.fallback(c);
      if (before !== after) changed.push({ before, after });
    }
    this.keys = next;
    this.owners = grouping.owners;
    this.mismatched = grouping.mismatched;
    this.shadowed = grouping.shadowed;
    return changed;
  }
}
