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
import type { ConditionUpdate } from '../conditions/index.ts';

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

/**
 * The server key of each connection: entries reached the same way on the
 * same port whose raw keys or resolved addresses overlap share the smallest
 * raw key of their group (prefixed with the bastion, if any).
 */
export function groupServers(entries: readonly AddressEntry[]): Map<string, string> {
  const parent = new Map<string, string>();
  const find = (x: string): string => {
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
  const node = (e: AddressEntry): string => `${e.via}|${e.rawKey}`;
  for (const e of entries) parent.set(node(e), parent.get(node(e)) ?? node(e));
  const byAddress = new Map<string, string>();
  for (const e of entries) {
    for (const address of e.addresses) {
      const k = `${e.via}|${address}|${e.port}`;
      const seen = byAddress.get(k);
      if (seen) union(seen, node(e));
      else byAddress.set(k, node(e));
    }
  }
  const out = new Map<string, string>();
  for (const e of entries) {
    const [via, raw] = find(node(e)).split('|') as [string, string];
    out.set(e.id, via ? `${via}/${raw}` : raw);
  }
  return out;
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
