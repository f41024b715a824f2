/**
 * A DatabaseServer's limit divided among namespaces, and the budget plan of
 * a server whose namespaces have shares. Pure: specs, pods and PoolMembers
 * in, shares and one merged plan out.
 *
 * Shares: each allowed namespace first gets its `guaranteed` connections
 * (no more than it can use), then what is left is shared by the weight of its
 * live pods, water-filled up to each namespace's `max` (and what its pods can
 * use). A namespace no allocation admits gets 0.
 *
 * Safety across namespaces: the namespaces are planned one after another,
 * each with min(its share, limit - what every other namespace may hold right
 * now, planned ones counted after their plan). Within a namespace the
 * planner's own shrink-before-grow holds, so the server's total never
 * exceeds the limit, even while one namespace shrinks and another grows.
 */
import { departedHeld, memberGrantInForce } from '../budget/grant-table.ts';
import { planBudgets, unlistedDepartures } from '../budget/planner.ts';
import type { BudgetInput, BudgetPlan, ConnectionCap, MemberState, Oversubscription, PodInput } from '../budget/types.ts';
import { selectorMatches } from '../inject/consumer.ts';
import type { LabelSelector } from '../inject/model.ts';

/** One allocation entry of a DatabaseServer. */
export interface AllocationRule {
  namespaces?: readonly string[] | undefined;
  namespaceSelector?: LabelSelector | undefined;
  guaranteed?: number | undefined;
  max?: number | undefined;
}

/** What applies to one namespace. */
export type NamespaceRule =
  | { allowed: true; guaranteed: number; max: number | undefined; source: string }
  | { allowed: false; source: string };

/** The first allocation selecting `namespace`, else the default (Shared: no guarantee, no cap; None: not allowed). */
export function ruleFor(namespace: string, labels: Readonly<Record<string, string>>, allocations: readonly AllocationRule[], defaultAllocation: 'Shared' | 'None'): NamespaceRule {
  for (const [i, a] of allocations.entries()) {
    const selected = a.namespaces ? a.namespaces.includes(namespace) : a.namespaceSelector ? selectorMatches(a.namespaceSelector, labels) : false;
    if (selected) return { allowed: true, guaranteed: a.guaranteed ?? 0, max: a.max, source: `allocations[${i}]` };
  }
  return defaultAllocation === 'Shared'
    ? { allowed: true, guaranteed: 0, max: undefined, source: 'default (Shared)' }
    : { allowed: false, source: 'default (None)' };
}

/** What a namespace's pods can use and how much they weigh, from the planner's input. */
export interface NamespaceDemand {
  namespace: string;
  rule: NamespaceRule;
  /** Sum over live pods (or MaxReplicas slots) of their consumer's weight. */
  weight: number;
  /** Connections its pods can use at most (sum of maxPerPod); undefined: no bound. */
  usable: number | undefined;
}

function isLive(pod: PodInput): boolean {
  return pod.consumer !== undefined && !pod.terminating && pod.phase !== 'Succeeded' && pod.phase !== 'Failed';
}

/** Weight and usable connections of each namespace in `input`. */
export function namespaceDemands(input: BudgetInput, rules: ReadonlyMap<string, NamespaceRule>): NamespaceDemand[] {
  const live = new Map<string, number>();
  for (const pod of input.pods) {
    if (!isLive(pod)) continue;
    const k = `${pod.namespace}/${pod.connection}/${pod.consumer ?? ''}`;
    live.set(k, (live.get(k) ?? 0) + 1);
  }
  const byNamespace = new Map<string, { weight: number; usable: number | undefined }>();
  const namespaces = new Set([...rules.keys(), ...input.connections.map((c) => c.namespace)]);
  for (const ns of namespaces) byNamespace.set(ns, { weight: 0, usable: 0 });
  for (const connection of input.connections) {
    const entry = byNamespace.get(connection.namespace)!;
    for (const consumer of connection.consumers) {
      const pods = live.get(`${connection.namespace}/${connection.name}/${consumer.name}`) ?? 0;
      const slots = connection.budgetStrategy === 'MaxReplicas' && consumer.maxReplicas !== undefined ? Math.max(pods, consumer.maxReplicas) : pods;
      entry.weight += slots * consumer.weight;
      entry.usable = entry.usable === undefined || consumer.maxPerPod === undefined ? (slots > 0 && consumer.maxPerPod === undefined ? undefined : entry.usable) : entry.usable + slots * consumer.maxPerPod;
    }
  }
  return [...byNamespace.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([namespace, d]) => ({
    namespace,
    rule: rules.get(namespace) ?? { allowed: true, guaranteed: 0, max: undefined, source: 'default (Shared)' },
    weight: d.weight,
    usable: d.usable,
  }));
}

/** Largest-remainder split of `total` by `weights` (ties to the earlier entry). */
function proportional(total: number, weights: readonly number[]): number[] {
  const sum = weights.reduce((a, b) => a + b, 0);
  if (sum <= 0 || total <= 0) return weights.map(() => 0);
  const exact = weights.map((w) => (total * w) / sum);
  const out = exact.map(Math.floor);
  let left = total - out.reduce((a, b) => a + b, 0);
  const order = exact.map((x, i) => ({ i, frac: x - Math.floor(x) })).sort((a, b) => b.frac - a.frac || a.i - b.i);
  for (const { i } of order) {
    if (left <= 0) break;
    out[i]! += 1;
    left -= 1;
  }
  return out;
}

/** Each namespace's share of `limit` (see the module comment); `overcommitted` when the guarantees alone exceed it. */
export function namespaceShares(limit: number, demands: readonly NamespaceDemand[]): { shares: Map<string, number>; overcommitted: boolean } {
  const caps = demands.map((d) => (d.rule.allowed ? Math.min(d.rule.max ?? Infinity, d.usable ?? Infinity) : 0));
  // A namespace with nothing live uses nothing: its guarantee waits until it has pods.
  const wants = demands.map((d, i) => (d.rule.allowed && d.weight > 0 ? Math.min(d.rule.guaranteed, caps[i]!) : 0));
  const guaranteedTotal = wants.reduce((a, b) => a + b, 0);
  const overcommitted = demands.reduce((a, d) => a + (d.rule.allowed ? d.rule.guaranteed : 0), 0) > limit;
  const share = guaranteedTotal > limit ? proportional(limit, wants) : [...wants];
  let left = limit - share.reduce((a, b) => a + b, 0);
  // Water-fill the rest by weight, up to each cap; a namespace that hits its cap passes on what it cannot use.
  for (let round = 0; left > 0 && round < demands.length + 1; round++) {
    const open = demands.map((d, i) => (d.rule.allowed && d.weight > 0 && share[i]! < caps[i]! ? d.weight : 0));
    if (open.every((w) => w === 0)) break;
    const add = proportional(left, open);
    for (const [i, a] of add.entries()) {
      const take = Math.min(a, caps[i]! - share[i]!);
      share[i]! += take;
      left -= take;
    }
  }
  return { shares: new Map(demands.map((d, i) => [d.namespace, share[i]!])), overcommitted };
}

/**
 * What a PoolMember may hold right now, as the planner counts it: for a pod
 * on a grant table, the table's grant in force (the largest of its
 * namespace's tables when its pod, and so its connection, is gone).
 */
function reservationOf(member: MemberState, input: BudgetInput, podConnection: ReadonlyMap<string, string>): number {
  const ack = member.acknowledgement;
  if (ack?.drained) return 0;
  let granted = member.grant.connections;
  if (member.tableFrom !== undefined) {
    const connection = podConnection.get(`${member.namespace}/${member.name}`);
    for (const t of input.tables ?? []) {
      if (t.namespace !== member.namespace || (connection !== undefined && t.connection !== connection)) continue;
      granted = Math.max(granted, memberGrantInForce(member, t.table).connections);
    }
  }
  return Math.max(granted, ack?.connections ?? 0, ack?.held ?? 0);
}

/** The input restricted to one namespace. */
function inNamespace(input: BudgetInput, namespace: string, limit: number): BudgetInput {
  return {
    limit,
    connections: input.connections.filter((c) => c.namespace === namespace),
    pods: input.pods.filter((p) => p.namespace === namespace),
    members: input.members.filter((m) => m.namespace === namespace),
    ...(input.tables ? { tables: input.tables.filter((t) => t.namespace === namespace) } : {}),
    // Keyed by namespace/connection: the other namespaces' entries are never looked up.
    ...(input.tableGenerationFloors ? { tableGenerationFloors: input.tableGenerationFloors } : {}),
    ...(input.now === undefined ? {} : { now: input.now }),
  };
}

/** The earliest departure expiry of the namespaces' plans. */
function nextExpiry(plans: readonly BudgetPlan[]): { nextDepartureExpiry?: number } {
  const times = plans.map((p) => p.nextDepartureExpiry).filter((t): t is number => t !== undefined);
  return times.length > 0 ? { nextDepartureExpiry: Math.min(...times) } : {};
}

/**
 * CONNECTION LIMITs (ConnectionCap) that connections in several namespaces
 * share: each namespace is planned on its own, so each may use only its part
 * of such a cap, split by the group's live pods in each namespace, and never
 * more than the other namespaces leave of it now (what they hold, as for the
 * limit itself).
 */
class CrossNamespaceCaps {
  /** Per cap key: the strictest limit, and what each namespace's pods hold of it. */
  private readonly caps = new Map<string, { limit: number; namespaces: Set<string>; held: Map<string, number>; part: Map<string, number> }>();
  /** The caps of each connection, by `namespace/name`. */
  private readonly capsOf = new Map<string, ConnectionCap[]>();

  constructor(input: BudgetInput, podConnection: ReadonlyMap<string, string>, unlisted: ReadonlyMap<string, { connections: number }>) {
    const capsOf = this.capsOf;
    for (const c of input.connections) {
      capsOf.set(`${c.namespace}/${c.name}`, [...(c.caps ?? [])]);
      for (const cap of c.caps ?? []) {
        const entry = this.caps.get(cap.key) ?? { limit: cap.limit, namespaces: new Set<string>(), held: new Map<string, number>(), part: new Map<string, number>() };
        entry.limit = Math.min(entry.limit, Math.max(0, Math.floor(cap.limit)));
        entry.namespaces.add(c.namespace);
        this.caps.set(cap.key, entry);
      }
    }
    for (const [key, entry] of this.caps) if (entry.namespaces.size < 2) this.caps.delete(key);
    if (this.caps.size === 0) return;
    for (const m of input.members) {
      const connection = podConnection.get(`${m.namespace}/${m.name}`);
      // A PoolMember whose pod is gone counts against every cap of its namespace: it may still hold connections of any of them.
      const keys = connection === undefined
        ? input.connections.filter((c) => c.namespace === m.namespace).flatMap((c) => (c.caps ?? []).map((x) => x.key))
        : (capsOf.get(`${m.namespace}/${connection}`) ?? []).map((x) => x.key);
      for (const key of new Set(keys)) {
        const entry = this.caps.get(key);
        if (entry) entry.held.set(m.namespace, (entry.held.get(m.namespace) ?? 0) + reservationOf(m, input, podConnection));
      }
    }
    if (input.now !== undefined) {
      for (const t of input.tables ?? []) {
        const gone = departedHeld(t.table, input.now) + (unlisted.get(`${t.namespace}/${t.connection}`)?.connections ?? 0);
        for (const cap of gone > 0 ? (capsOf.get(`${t.namespace}/${t.connection}`) ?? []) : []) {
          const entry = this.caps.get(cap.key);
          if (entry) entry.held.set(t.namespace, (entry.held.get(t.namespace) ?? 0) + gone);
        }
      }
    }
    for (const entry of this.caps.values()) {
      const namespaces = [...entry.namespaces].sort();
      const live = namespaces.map((ns) => input.pods.filter((p) => p.namespace === ns && isLive(p) && (capsOf.get(`${ns}/${p.connection}`) ?? []).some((x) => this.caps.get(x.key) === entry)).length);
      const parts = proportional(entry.limit, live);
      namespaces.forEach((ns, i) => entry.part.set(ns, parts[i]!));
    }
  }

  /** `input` (one namespace's) with each shared cap lowered to what `namespace` may use of it now. */
  within(input: BudgetInput, namespace: string): BudgetInput {
    if (this.caps.size === 0) return input;
    const connections = input.connections.map((c) => (c.caps === undefined ? c : {
      ...c,
      caps: c.caps.map((cap) => {
        const entry = this.caps.get(cap.key);
        if (!entry) return cap;
        const others = [...entry.held].filter(([ns]) => ns !== namespace).reduce((a, [, v]) => a + v, 0);
        return { key: cap.key, limit: Math.max(0, Math.min(entry.part.get(namespace) ?? 0, entry.limit - others)) };
      }),
    }));
    return { ...input, connections };
  }

  /** Records what `namespace` holds of each shared cap after its plan. */
  planned(namespace: string, plan: BudgetPlan): void {
    for (const [key, entry] of this.caps) {
      if (!entry.namespaces.has(namespace)) continue;
      let sum = 0;
      for (const g of plan.grants) if ((this.capsOf.get(`${namespace}/${g.connection}`) ?? []).some((x) => x.key === key)) sum += g.reservation;
      for (const c of plan.connections) if ((this.capsOf.get(`${c.namespace}/${c.name}`) ?? []).some((x) => x.key === key)) sum += c.departed ?? 0;
      entry.held.set(namespace, sum);
    }
  }
}

/** The plan of a server with namespace shares, and the limit each namespace was planned with. */
export interface AllocatedPlan {
  plan: BudgetPlan;
  /** The limit each namespace was planned with this time (below its share while others still hold more). */
  limits: Map<string, number>;
  /** Each namespace's own plan (its limit, its oversubscription), for its DatabaseConnections' conditions. */
  byNamespace: Map<string, BudgetPlan>;
}

/** Plans every namespace of `input` within its share, never letting the server's total exceed `input.limit` (see the module comment). */
export function planWithShares(input: BudgetInput, shares: ReadonlyMap<string, number>, plan: (i: BudgetInput) => BudgetPlan = planBudgets): AllocatedPlan {
  const namespaces = [...new Set([...input.connections.map((c) => c.namespace), ...input.members.map((m) => m.namespace), ...input.pods.map((p) => p.namespace)])].sort();
  const held = new Map<string, number>();
  const podConnection = new Map(input.pods.map((p) => [`${p.namespace}/${p.name}`, p.connection]));
  for (const m of input.members) held.set(m.namespace, (held.get(m.namespace) ?? 0) + reservationOf(m, input, podConnection));
  // What a namespace's departed pods may still hold is held too (each namespace's own plan counts them again),
  // those that left a table's default unseen included (the plan of their namespace records them).
  const unlisted = unlistedDepartures(input);
  if (input.now !== undefined) {
    for (const t of input.tables ?? []) held.set(t.namespace, (held.get(t.namespace) ?? 0) + departedHeld(t.table, input.now) + (unlisted.get(`${t.namespace}/${t.connection}`)?.connections ?? 0));
  }
  // Namespaces that give back go first, so those that grow can use it as soon as it is acknowledged.
  const order = [...namespaces].sort((a, b) => ((shares.get(a) ?? 0) - (held.get(a) ?? 0)) - ((shares.get(b) ?? 0) - (held.get(b) ?? 0)) || a.localeCompare(b));
  const caps = new CrossNamespaceCaps(input, podConnection, unlisted);
  const plans: BudgetPlan[] = [];
  const byNamespace = new Map<string, BudgetPlan>();
  const limits = new Map<string, number>();
  let settled = true;
  for (const ns of order) {
    const others = [...held.entries()].filter(([n]) => n !== ns).reduce((a, [, v]) => a + v, 0);
    const share = shares.get(ns) ?? 0;
    const limit = Math.max(0, Math.min(share, input.limit - others));
    limits.set(ns, limit);
    const p = plan(caps.within(inNamespace(input, ns, limit), ns));
    plans.push(p);
    byNamespace.set(ns, p);
    held.set(ns, p.allocated);
    caps.planned(ns, p);
    if (!p.settled || limit < share) settled = false;
  }
  const oversubscribed = plans.find((p) => p.oversubscription);
  const oversubscription: Oversubscription | undefined = oversubscribed?.oversubscription;
  return {
    plan: {
      limit: input.limit,
      allocated: plans.reduce((a, p) => a + p.allocated, 0),
      grants: plans.flatMap((p) => p.grants),
      connections: plans.flatMap((p) => p.connections),
      ...(oversubscription ? { oversubscription } : {}),
      orphans: plans.flatMap((p) => p.orphans),
      tables: plans.flatMap((p) => p.tables),
      settled,
      ...nextExpiry(plans),
    },
    limits,
    byNamespace,
  };
}
