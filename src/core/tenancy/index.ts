/**
 * Which DatabaseConnections are on one server, and whose limit the server
 * gets. Pure: addresses and limits in, groups and conditions out.
 *
 * One server: connections with the same port whose addresses overlap (a name
 * and the IP addresses it resolves to), reached the same way (directly, or
 * through the same bastion, where names resolve on the far side).
 *
 * Whose limit: in the inline form nobody owns a server, so the first
 * DatabaseConnection on it (oldest creationTimestamp) sets its limit, as an
 * owner would; a newer one can never lower, nor raise, what the others get.
 * Each connection whose own value differs is told so, with both values and
 * the object whose value holds.
 */
import { resolveLimit } from '../budget/limit.ts';
import type { ConditionUpdate } from '../conditions/index.ts';

export * from './allocation.ts';

/** One connection's address as the controller resolved it. */
export interface AddressEntry {
  /** `namespace/name` of the DatabaseConnection. */
  id: string;
  /** The address as written, normalised (e.g. `db.internal:5432`). */
  rawKey: string;
  port: number;
  /** `ssh://user@bastion:port` when reached through a bastion, else ''. */
  via: string;
  /** IP addresses the host resolves to (the IP itself for a literal); empty when unknown. */
  addresses: readonly string[];
}

/** A DatabaseServer's addresses (its address and aliases), resolved. */
export interface ServerEntry {
  /** Name of the DatabaseServer. */
  name: string;
  addresses: ReadonlyArray<{ rawKey: string; port: number; addresses: readonly string[] }>;
}

/** A connection's address entry, with the DatabaseServer it names in serverRef, if any. */
export interface ConnectionEntry extends AddressEntry {
  ref?: string | undefined;
}

/** Server keys, owners and the mistakes found while grouping. */
export interface Grouping {
  /** The server key of each connection. */
  keys: Map<string, string>;
  /** The DatabaseServer that owns each server key (servers without one are absent). */
  owners: Map<string, string>;
  /** Connections whose serverRef names a DatabaseServer their address is not one of: connection id -> server name. */
  mismatched: Map<string, string>;
  /** DatabaseServers sharing an address with an older one, which owns the server: newer -> older. */
  shadowed: Map<string, string>;
}

/** The key of the server a DatabaseServer owns. */
export function ownedServerKey(name: string): string {
  return `DatabaseServer/${name}`;
}

/**
 * Groups connections and DatabaseServers into servers. Entries reached the
 * same way on the same port whose raw keys or resolved addresses overlap are
 * one server; a DatabaseServer's address and aliases are one server; a
 * connection with serverRef is in its DatabaseServer's server (if its address
 * is not one of the server's, it is grouped there anyway, so that it is never
 * budgeted outside it, and reported). A group with a DatabaseServer is keyed
 * by the oldest one (`servers` come oldest first); others are keyed by the
 * smallest raw key (prefixed with the bastion, if any).
 */
export function groupWithServers(entries: readonly ConnectionEntry[], servers: readonly ServerEntry[]): Grouping {
  const parent = new Map<string, string>();
  const find = (x: string): string => {
    if (!parent.has(x)) parent.set(x, x);
    let root = x;
    while (parent.get(root) !== root) root = parent.get(root) ?? root;
    parent.set(x, root);
    return root;
  };
  const union = (a: string, b: string): void => {
    const [ra, rb] = [find(a), find(b)];
    if (ra === rb) return;
    // The smaller key names the group, so the name does not depend on order.
    if (ra < rb) parent.set(rb, ra);
    else parent.set(ra, rb);
  };
  const byAddress = new Map<string, string>();
  const link = (node: string, via: string, port: number, addresses: readonly string[]): void => {
    for (const address of addresses) {
      const k = `${via}|${address}|${port}`;
      const seen = byAddress.get(k);
      if (seen) union(seen, node);
      else byAddress.set(k, node);
    }
  };
  const serverNode = (name: string): string => `\u0000server|${name}`;
  const serverByName = new Map(servers.map((s) => [s.name, s]));
  for (const server of servers) {
    find(serverNode(server.name));
    for (const a of server.addresses) {
      const node = `|${a.rawKey}`;
      union(serverNode(server.name), node);
      link(node, '', a.port, a.addresses);
    }
  }
  const mismatched = new Map<string, string>();
  const nodeOf = new Map<string, string>();
  for (const e of entries) {
    const server = e.ref === undefined ? undefined : serverByName.get(e.ref);
    const matches = server?.addresses.some((a) => a.port === e.port && (a.rawKey === e.rawKey || a.addresses.some((x) => e.addresses.includes(x))));
    if (e.ref !== undefined && !matches) {
      // Not one of its server's addresses: budgeted inside the server it names, and nowhere else.
      if (server) mismatched.set(e.id, e.ref);
      const node = `\u0000ref|${e.id}`;
      nodeOf.set(e.id, node);
      union(node, serverNode(e.ref));
      continue;
    }
    const node = `${e.via}|${e.rawKey}`;
    nodeOf.set(e.id, node);
    find(node);
    if (server) union(node, serverNode(server.name));
    link(node, e.via, e.port, e.addresses);
  }
  // The oldest DatabaseServer in a group owns it.
  const ownerOfRoot = new Map<string, string>();
  const shadowed = new Map<string, string>();
  for (const server of servers) {
    const root = find(serverNode(server.name));
    const owner = ownerOfRoot.get(root);
    if (owner === undefined) ownerOfRoot.set(root, server.name);
    else shadowed.set(server.name, owner);
  }
  const keys = new Map<string, string>();
  const owners = new Map<string, string>();
  for (const e of entries) {
    const root = find(nodeOf.get(e.id)!);
    const owner = ownerOfRoot.get(root) ?? (e.ref !== undefined && !serverByName.has(e.ref) ? e.ref : undefined);
    if (owner !== undefined) {
      keys.set(e.id, ownedServerKey(owner));
      if (serverByName.has(owner)) owners.set(ownedServerKey(owner), owner);
      continue;
    }
    const [via, raw] = root.split('|') as [string, string];
    keys.set(e.id, via ? `${via}/${raw}` : raw);
  }
  for (const owner of ownerOfRoot.values()) owners.set(ownedServerKey(owner), owner);
  return { keys, owners, mismatched, shadowed };
}

/** The server key of each connection when no DatabaseServer exists (see groupWithServers). */
export function groupServers(entries: readonly AddressEntry[]): Map<string, string> {
  return groupWithServers(entries, []).keys;
}

/** One connection's own view of the server's limit. */
export interface LimitClaim {
  /** `namespace/name`. */
  id: string;
  /** RFC 3339; the oldest sets the limit. */
  created: string;
  /** Its limit after reserve, from its own maxConnections and reserve; undefined while unknown. */
  effective: number | undefined;
  /** Its maxConnections (after "auto" or the server's real value) and reserve, for messages. */
  discovered: number | undefined;
  reserve: number | undefined;
}

/** The server's limit, who set it, and what each connection is told. */
export interface LimitDecision {
  limit: number | undefined;
  owner: string | undefined;
  conditions: Map<string, ConditionUpdate>;
}

/** Decides the server's limit from the claims of its connections (see the module comment). */
export function decideServerLimit(claims: readonly LimitClaim[]): LimitDecision {
  const known = claims.filter((c) => c.effective !== undefined);
  const ordered = [...known].sort((a, b) => (a.created === b.created ? a.id.localeCompare(b.id) : a.created.localeCompare(b.created)));
  const owner = ordered[0];
  const conditions = new Map<string, ConditionUpdate>();
  if (!owner || owner.effective === undefined) {
    for (const c of claims) conditions.set(c.id, { type: 'LimitConflict', status: 'False', reason: 'LimitUnknown', message: 'no limit is known for this server yet' });
    return { limit: undefined, owner: undefined, conditions };
  }
  const limit = owner.effective;
  const describe = (c: LimitClaim): string => `${c.effective ?? '?'} (maxConnections ${c.discovered ?? '?'} - reserve ${c.reserve ?? '?'})`;
  const disagreeing = known.filter((c) => c.id !== owner.id && c.effective !== limit);
  for (const c of claims) {
    if (c.id === owner.id) {
      conditions.set(c.id, disagreeing.length === 0
        ? { type: 'LimitConflict', status: 'False', reason: 'SetsLimit', message: `this DatabaseConnection sets the server's limit ${limit}${known.length > 1 ? '; the others on the server agree' : ''}` }
        : { type: 'LimitConflict', status: 'False', reason: 'SetsLimit', message: `this DatabaseConnection sets the server's limit ${limit} (it came first); ${disagreeing.length} other(s) ask for another value and are told so: ${disagreeing.slice(0, 5).map((d) => `${d.id} ${d.effective ?? '?'}`).join(', ')}` });
      continue;
    }
    if (c.effective === undefined || c.effective === limit) {
      conditions.set(c.id, { type: 'LimitConflict', status: 'False', reason: 'Agrees', message: `the server's limit ${limit} is set by ${owner.id}${c.effective === undefined ? '' : ', and this DatabaseConnection agrees'}` });
      continue;
    }
    const direction = c.effective < limit ? 'would lower every DatabaseConnection\'s budget on this server' : 'would raise the server\'s limit above what its first DatabaseConnection allows';
    conditions.set(c.id, {
      type: 'LimitConflict', status: 'True', reason: 'ConflictingLimit',
      message: `this DatabaseConnection asks for a limit of ${describe(c)}, which ${direction}; the limit stays ${describe(owner)}, set by DatabaseConnection ${owner.id}, the first on this server. Use the same maxConnections and reserve as ${owner.id}, or change that one`,
    });
  }
  return { limit, owner: owner.id, conditions };
}

/** What a DatabaseServer says about its limit, and what its connections' logins found. */
export interface OwnedLimitInput {
  /** Name of the DatabaseServer that owns the server. */
  server: string;
  maxConnections: number | string;
  reserve: number | string;
  /** What an ordinary role may open, from any connection's login; undefined when none could log in. */
  serverValue: number | undefined;
  /** The last limit reported in the DatabaseServer's status, used while "auto" cannot be read. */
  previousDiscovered: number | undefined;
  /** Connections on the server: their id and the DatabaseServer their serverRef names, if any. */
  connections: ReadonlyArray<{ id: string; namespace: string; ref: string | undefined }>;
  /** Connections whose address is not one of their DatabaseServer's. */
  mismatched: ReadonlyMap<string, string>;
}

/** The owned server's limit and what each connection is told. */
export interface OwnedLimitDecision {
  limit: { discovered: number; reserve: number; effective: number } | undefined;
  /** LimitConflict of each connection. */
  conditions: Map<string, ConditionUpdate>;
  /** Connections that may not draw (address not of the server, or naming another server): Ready=False with this. */
  refused: Map<string, ConditionUpdate>;
}

/**
 * The limit of a server a DatabaseServer owns: its maxConnections (never
 * above what the server allows) minus its reserve. Connections' own values
 * play no part; an inline connection on the address is told who owns it.
 */
export function decideOwnedLimit(input: OwnedLimitInput): OwnedLimitDecision {
  let discovered: number | undefined;
  if (typeof input.maxConnections === 'number') discovered = input.serverValue === undefined ? input.maxConnections : Math.min(input.maxConnections, input.serverValue);
  else discovered = input.serverValue ?? input.previousDiscovered;
  const limit = discovered === undefined ? undefined : resolveLimit(discovered, input.reserve);
  const conditions = new Map<string, ConditionUpdate>();
  const refused = new Map<string, ConditionUpdate>();
  const owner = `DatabaseServer ${input.server}`;
  for (const c of input.connections) {
    if (c.ref === undefined) {
      conditions.set(c.id, {
        type: 'LimitConflict', status: 'True', reason: 'OwnedByDatabaseServer',
        message: `this address belongs to ${owner}, which sets the server's limit${limit ? ` (${limit.effective})` : ''} and each namespace's share; this DatabaseConnection's maxConnections and reserve are ignored and namespace ${c.namespace} draws under ${owner}'s allocations. Replace maxConnections and reserve with serverRef: {name: ${input.server}}`,
      });
      continue;
    }
    if (c.ref !== input.server) {
      conditions.set(c.id, { type: 'LimitConflict', status: 'True', reason: 'ServerShadowed', message: `serverRef names DatabaseServer ${c.ref}, whose address is already owned by the older ${owner}; this connection is budgeted inside ${owner}` });
      continue;
    }
    const wrongAddress = input.mismatched.get(c.id);
    if (wrongAddress !== undefined) {
      refused.set(c.id, { type: 'Ready', status: 'False', reason: 'AddressNotOfServer', message: `database.host is not an address of ${owner} (its address or aliases): its pods get no connections. Use one of ${owner}'s addresses, or ask its owner to add this one to spec.aliases` });
    }
    conditions.set(c.id, { type: 'LimitConflict', status: 'False', reason: 'SetByDatabaseServer', message: `the server's limit${limit ? ` ${limit.effective}` : ''} and this namespace's share are set by ${owner}` });
  }
  return { limit, conditions, refused };
}
