/**
 * The controller's side of grant tables (docs/protocol.md): puts PoolMembers
 * whose sidecar reads tables onto their connection's PoolGrant (one write per
 * pod, once), and writes each connection's PoolGrant when its plan changes
 * (one write per connection per rebalance, whatever the number of pods).
 * Remembers what it wrote until its caches show it: a plan from a cache that
 * is behind would otherwise miss a switched pod or a newer table.
 */
import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { API_GROUP, API_VERSION, memberPodUid, type DatabaseConnection, type PoolGrant, type PoolMember } from '../api/index.ts';
import { grantTableOf, memberGrantInForce, tableWriteWaves, type GrantTable, type PlannedTable, type SidecarPacing, type TableState, type TableWrite } from '../core/budget/index.ts';
import { isStatus, type KubeHttp } from '../kube/http.ts';
import type { Informer, KubeObject } from '../kube/informer.ts';
import { forEachBounded } from './bounded.ts';

/** Writes in flight at once (the API client's connection cap). */
const CONCURRENCY = 32;

const BASE = `/apis/${API_GROUP}/${API_VERSION}`;

/**
 * How long after its PoolMember was created a sidecar that reads tables has
 * said so: its table watch starts within milliseconds of its PoolMember's.
 */
export const TABLE_ANSWER_GRACE_MS = 5_000;

/**
 * True when a PoolMember on a table has a sidecar that does not read it: its
 * status, written at least TABLE_ANSWER_GRACE_MS after the PoolMember was
 * created, has no table generation (an earlier sidecar image, or a
 * ServiceAccount that may not read poolgrants). Such a pod would never be
 * grown from the table. A first status written sooner may precede the table
 * watch, so it is not taken as an answer.
 */
export function readsNoTable(member: PoolMember, tableFrom: number | undefined): boolean {
  const s = member.status;
  if (tableFrom === undefined || s === undefined || s.tableGeneration !== undefined || s.acknowledgedGeneration === undefined) return false;
  const created = new Date(member.metadata.creationTimestamp ?? NaN).getTime();
  const written = Date.parse(s.heartbeatTime ?? '');
  return Number.isFinite(created) && Number.isFinite(written) && written - created >= TABLE_ANSWER_GRACE_MS;
}

/** Raised when a PoolGrant or PoolMember changed since this replica read it: replan. */
export type ConflictFactory = (what: string) => Error;

/** What the writer needs. */
export interface GrantTableWriterDeps {
  http: KubeHttp;
  /** The PoolGrant cache; absent: tables are neither read nor written (every pod stays on its PoolMember's grant). */
  grants?: Informer<PoolGrant & KubeObject> | undefined;
  logger: Logger;
  /** Throws if this replica may no longer write. */
  assertMayWrite: () => void;
  conflict: ConflictFactory;
  /** The leader's acknowledgement address for this term, written into every table (http://address:port/term); absent: none. */
  acknowledgeTo?: (() => string | undefined) | undefined;
  /** A new acknowledgement key for a PoolMember switched onto a table (32 random bytes, base64url). */
  newKey?: () => string;
}

function tableOf(grant: PoolGrant): GrantTable {
  return grantTableOf(grant.spec);
}

/** Switches PoolMembers onto tables and writes PoolGrants. */
export class GrantTableWriter {
  private readonly deps: GrantTableWriterDeps;
  /** The last table this replica wrote per `namespace/connection`, with the resourceVersion it got. */
  private readonly written = new Map<string, { table: GrantTable; resourceVersion: string }>();
  /** The highest generation of each connection's table this replica saw or wrote, by `namespace/connection` (kept after the table goes). */
  private readonly highest = new Map<string, number>();
  /** tableFrom this replica wrote per pod uid, until the cache shows it. */
  private readonly switched = new Map<string, number>();

  constructor(deps: GrantTableWriterDeps) {
    this.deps = deps;
    this.newKey = deps.newKey ?? (() => randomBytes(32).toString('base64url'));
  }

  private readonly newKey: () => string;

  /** A key for a PoolMember created on a table (its sidecar signs acknowledgements with it). */
  newAcknowledgementKey(): string {
    return this.newKey();
  }

  /** True when tables are in use. */
  get enabled(): boolean {
    return this.deps.grants !== undefined;
  }

  /** The tables in force for these connections: the cache's, or this replica's own newer write (remembered for generationFloors). */
  tablesInForce(connections: readonly DatabaseConnection[]): TableState[] {
    const out: TableState[] = [];
    for (const c of connections) {
      const namespace = c.metadata.namespace ?? '';
      const connection = c.metadata.name ?? '';
      const table = this.inForce(namespace, connection);
      if (table) {
        out.push({ namespace, connection, table: table.table });
        this.remember(`${namespace}/${connection}`, table.table.generation);
      }
    }
    return out;
  }

  /**
   * The highest generation this replica saw of each of these connections'
   * tables, for those whose table is gone now (BudgetInput.tableGenerationFloors).
   */
  generationFloors(connections: readonly DatabaseConnection[]): Map<string, number> {
    const floors = new Map<string, number>();
    for (const c of connections) {
      const k = `${c.metadata.namespace ?? ''}/${c.metadata.name ?? ''}`;
      const highest = this.highest.get(k);
      if (highest !== undefined) floors.set(k, highest);
    }
    return floors;
  }

  private remember(k: string, generation: number): void {
    if (generation > (this.highest.get(k) ?? 0)) this.highest.set(k, generation);
  }

  /** The table in force for one connection (this replica's newer write, or the cache's), if any. */
  tableInForce(namespace: string, connection: string): GrantTable | undefined {
    return this.inForce(namespace, connection)?.table;
  }

  private inForce(namespace: string, connection: string): { table: GrantTable; resourceVersion: string | undefined } | undefined {
    const cached = this.deps.grants?.get(namespace, connection);
    const ours = this.written.get(`${namespace}/${connection}`);
    if (ours && (!cached || ours.table.generation > cached.spec.generation)) return ours;
    if (ours && cached && cached.spec.generation >= ours.table.generation) this.written.delete(`${namespace}/${connection}`);
    return cached ? { table: tableOf(cached), resourceVersion: cached.metadata.resourceVersion } : undefined;
  }

  /** tableFrom of a PoolMember as this replica knows it (its own switch may be newer than the cache). */
  tableFrom(member: PoolMember): number | undefined {
    const uid = memberPodUid(member);
    const ours = this.switched.get(uid);
    if (member.spec.tableFrom !== undefined) {
      this.switched.delete(uid);
      return member.spec.tableFrom;
    }
    return ours;
  }

  /**
   * Puts onto their connection's table the PoolMembers of live pods whose sidecar
   * says it reads tables (status.tableGeneration is set): spec.tableFrom = the
   * next table generation. The table that covers them is written by the same
   * reconcile, planned with them on it. A JSON-patch test on the PoolMember's
   * grant makes the switch fail if another controller changed it since.
   */
  async switchMembers(members: readonly PoolMember[], livePodUids: ReadonlySet<string>): Promise<void> {
    if (!this.enabled) return;
    const due = members.filter((m) => {
      return livePodUids.has(memberPodUid(m)) && m.status?.tableGeneration !== undefined && this.tableFrom(m) === undefined;
    });
    await forEachBounded(due, CONCURRENCY, async (m) => {
      const namespace = m.metadata.namespace ?? '';
      const from = (this.inForce(namespace, m.spec.connection)?.table.generation ?? 0) + 1;
      this.deps.assertMayWrite();
      try {
        // The precondition is on the spec this plan read (which only a controller writes), not on
        // the resourceVersion: every acknowledgement changes that, and a fleet acknowledging
        // would keep the switch from ever landing.
        await this.deps.http.patch(`${BASE}/namespaces/${namespace}/poolmembers/${m.metadata.name ?? ''}`, [
          { op: 'test', path: '/spec/grant', value: { connections: m.spec.grant.connections, generation: m.spec.grant.generation } },
          { op: 'add', path: '/spec/tableFrom', value: from },
          ...(m.spec.acknowledgementKey === undefined ? [{ op: 'add', path: '/spec/acknowledgementKey', value: this.newKey() }] : []),
        ], 'json');
      } catch (err) {
        // Changed by another writer, or gone with its pod: it stays on its PoolMember's grant; the next reconcile sees it.
        if (isStatus(err, 409) || isStatus(err, 422) || isStatus(err, 404)) return;
        throw err;
      }
      this.switched.set(memberPodUid(m), from);
    });
  }

  /**
   * Takes off their table the PoolMembers of live pods whose sidecar does not
   * read it (`readsNoTable`): `spec.tableFrom` removed and `spec.grant` set to
   * what the table gives the pod now, one generation on, so the sidecar holds
   * no more than the table counted and the pod is planned on its PoolMember's
   * grant from then on. A JSON-patch test on `spec.tableFrom` makes the write
   * fail if another controller changed it since. Returns the members taken off.
   */
  async leaveTables(members: readonly PoolMember[], livePodUids: ReadonlySet<string>): Promise<PoolMember[]> {
    if (!this.enabled) return [];
    const due = members.filter((m) => {
      return livePodUids.has(memberPodUid(m)) && readsNoTable(m, m.spec.tableFrom);
    });
    const left: PoolMember[] = [];
    await forEachBounded(due, CONCURRENCY, async (m) => {
      const namespace = m.metadata.namespace ?? '';
      const name = m.metadata.name ?? '';
      const table = this.inForce(namespace, m.spec.connection)?.table;
      const inForce = memberGrantInForce({ name, grant: m.spec.grant, tableFrom: m.spec.tableFrom }, table);
      this.deps.assertMayWrite();
      try {
        await this.deps.http.patch(`${BASE}/namespaces/${namespace}/poolmembers/${name}`, [
          { op: 'test', path: '/spec/tableFrom', value: m.spec.tableFrom },
          { op: 'remove', path: '/spec/tableFrom' },
          { op: 'replace', path: '/spec/grant', value: { connections: inForce.connections, generation: m.spec.grant.generation + 1 } },
        ], 'json');
      } catch (err) {
        if (isStatus(err, 409) || isStatus(err, 422) || isStatus(err, 404)) return;
        throw err;
      }
      this.deps.logger.warn({ namespace, pod: name, sidecarVersion: m.status?.sidecarVersion }, 'the sidecar does not read its grant table; its PoolMember takes its grant from spec.grant');
      left.push(m);
    });
    return left;
  }

  /** Forgets switches of pods that are gone. */
  retain(livePodUids: ReadonlySet<string>): void {
    for (const uid of this.switched.keys()) if (!livePodUids.has(uid)) this.switched.delete(uid);
  }

  /**
   * Writes the changed tables of a plan in the waves `tableWriteWaves` orders
   * (what is released before another table's grows), each with a precondition
   * on the resourceVersion it was planned from (a deposed leader's write
   * fails). A PoolGrant is owned by its DatabaseConnection and goes with it.
   */
  async writeTables(tables: readonly PlannedTable[], connections: readonly DatabaseConnection[], pacing: ReadonlyMap<string, SidecarPacing> = new Map()): Promise<void> {
    if (!this.enabled) return;
    const byKey = new Map(connections.map((c) => [`${c.metadata.namespace ?? ''}/${c.metadata.name ?? ''}`, c]));
    await this.writeHints(tables.filter((t) => !t.changed), pacing, byKey);
    for (const wave of tableWriteWaves(tables)) {
      await forEachBounded(wave, CONCURRENCY, (t) => this.writeTable(t, byKey, pacing));
    }
  }

  private async writeTable(t: TableWrite, byKey: ReadonlyMap<string, DatabaseConnection>, pacing: ReadonlyMap<string, SidecarPacing>): Promise<void> {
    const k = `${t.namespace}/${t.connection}`;
    const connection = byKey.get(k);
    if (!connection) return;
    const paced = pacing.get(k);
    const current = this.inForce(t.namespace, t.connection);
    // A merge patch keeps fields it does not mention: a change in flight that ended is removed with null.
    const inFlight = { perPodSince: t.table.perPodSince ?? (current ? null : undefined), perPodReleasing: t.table.perPodReleasing ?? (current ? null : undefined) };
    const acknowledgeTo = this.deps.acknowledgeTo?.() ?? (current ? null : undefined);
    const departed = t.table.departed ?? (current ? null : undefined);
    // The default's count goes with the generation that set it: a later write by a controller that does not count leaves it stale, and readers then ignore it.
    const counted = t.table.perPodPods === undefined ? { perPodPods: current ? null : undefined, perPodPodsGeneration: current ? null : undefined } : { perPodPods: t.table.perPodPods, perPodPodsGeneration: t.table.generation };
    const spec = { connection: t.connection, generation: t.table.generation, perPod: t.table.perPod, ...inFlight, recordsChanges: true, ...counted, exceptions: t.table.exceptions, departed, acknowledgeTo, ...(paced ?? {}) };
    const path = `${BASE}/namespaces/${t.namespace}/poolgrants`;
    this.deps.assertMayWrite();
    let written: PoolGrant;
    try {
      if (!current) {
        const ownerReferences = ownerReferencesOf(connection);
        written = await this.deps.http.create<PoolGrant>(path, { apiVersion: `${API_GROUP}/${API_VERSION}`, kind: 'PoolGrant', metadata: { name: t.connection, namespace: t.namespace, ...(ownerReferences ? { ownerReferences } : {}) }, spec });
      } else {
        const adopt = adoption(this.deps.grants?.get(t.namespace, t.connection), connection);
        // A merge patch replaces the exceptions list whole.
        written = await this.deps.http.patch<PoolGrant>(`${path}/${t.connection}`, { metadata: { resourceVersion: current.resourceVersion, ...adopt }, spec });
      }
    } catch (err) {
      if (isStatus(err, 409)) throw this.deps.conflict(`PoolGrant ${k}`);
      throw err;
    }
    this.written.set(k, { table: t.table, resourceVersion: written.metadata.resourceVersion ?? '' });
    this.remember(k, t.table.generation);
    this.deps.logger.debug({ table: k, generation: t.table.generation, perPod: t.table.perPod, exceptions: t.table.exceptions.length }, 'grant table written');
  }

  /** The heartbeat interval the sidecars of a connection's table are told, if any. */
  heartbeatSeconds(namespace: string, connection: string): number | undefined {
    return this.deps.grants?.get(namespace, connection)?.spec.heartbeatSeconds;
  }

  /**
   * Tells the sidecars of unchanged tables a new heartbeat interval or a new
   * acknowledgement address: a patch of those fields alone, the generation
   * unchanged, so no sidecar sees a new grant because of it.
   */
  private async writeHints(unchanged: readonly PlannedTable[], pacing: ReadonlyMap<string, SidecarPacing>, byKey: ReadonlyMap<string, DatabaseConnection>): Promise<void> {
    const acknowledgeTo = this.deps.acknowledgeTo?.();
    const hints = (t: PlannedTable): { spec: { heartbeatSeconds?: number; statusDelaySeconds?: number; acknowledgeTo?: string }; adopt: object } | undefined => {
      const wanted = pacing.get(`${t.namespace}/${t.connection}`);
      const cached = this.deps.grants?.get(t.namespace, t.connection);
      if (cached === undefined || this.written.has(`${t.namespace}/${t.connection}`)) return undefined;
      const spec = {
        ...(wanted !== undefined && cached.spec.heartbeatSeconds !== wanted.heartbeatSeconds ? { heartbeatSeconds: wanted.heartbeatSeconds } : {}),
        ...(wanted !== undefined && cached.spec.statusDelaySeconds !== wanted.statusDelaySeconds ? { statusDelaySeconds: wanted.statusDelaySeconds } : {}),
        // A new leader tells every table where acknowledgements go now; sidecars resend theirs there.
        ...(acknowledgeTo !== undefined && cached.spec.acknowledgeTo !== acknowledgeTo ? { acknowledgeTo } : {}),
      };
      const adopt = adoption(cached, byKey.get(`${t.namespace}/${t.connection}`));
      return Object.keys(spec).length > 0 || Object.keys(adopt).length > 0 ? { spec, adopt } : undefined;
    };
    const due = unchanged.filter((t) => hints(t) !== undefined);
    await forEachBounded(due, CONCURRENCY, async (t) => {
      const cached = this.deps.grants?.get(t.namespace, t.connection);
      const hint = hints(t);
      if (!cached || !hint) return;
      this.deps.assertMayWrite();
      try {
        await this.deps.http.patch<PoolGrant>(`${BASE}/namespaces/${t.namespace}/poolgrants/${t.connection}`, { metadata: { resourceVersion: cached.metadata.resourceVersion, ...hint.adopt }, spec: hint.spec });
      } catch (err) {
        // Changed meanwhile: the next reconcile, planned from the newer table, tries again.
        if (isStatus(err, 409) || isStatus(err, 404)) return;
        throw err;
      }
    });
  }
}

/**
 * The metadata that adopts a table a deleted DatabaseConnection of the same
 * name left (deleted and applied again, as `kubectl replace --force` does)
 * before the garbage collector takes it, so its sidecars keep their grants
 * instead of falling back to their PoolMembers'; nothing for a table its
 * connection already owns.
 */
function adoption(table: PoolGrant | undefined, connection: DatabaseConnection | undefined): { ownerReferences?: ReturnType<typeof ownerReferencesOf> } {
  const owner = table?.metadata.ownerReferences?.find((o) => o.kind === 'DatabaseConnection')?.uid;
  const uid = connection?.metadata.uid;
  return owner === undefined || uid === undefined || owner === uid ? {} : { ownerReferences: ownerReferencesOf(connection!) };
}

/** A PoolGrant's owner: its DatabaseConnection, so that it goes with it. */
function ownerReferencesOf(connection: DatabaseConnection): { apiVersion: string; kind: string; name: string; uid: string; controller: boolean; blockOwnerDeletion: boolean }[] | undefined {
  const uid = connection.metadata.uid;
  return uid === undefined ? undefined : [{ apiVersion: `${API_GROUP}/${API_VERSION}`, kind: 'DatabaseConnection', name: connection.metadata.name ?? '', uid, controller: true, blockOwnerDeletion: false }];
}
