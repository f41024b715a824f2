/**
 * Input and output of the budget planner (planBudgets). Plain data: the
 * controller builds the input from the API objects of ONE database server
 * (all DatabaseConnections with the same host:port, any namespace) and writes
 * the output back to PoolMembers, grant tables and DatabaseConnection statuses.
 */
import type { GrantTable } from './grant-table.ts';

/** Namespace and name of an object. */
export interface ObjectKey {
  namespace: string;
  name: string;
}

/** One consumer of a DatabaseConnection, as in its spec. */
export interface ConsumerInput {
  name: string;
  weight: number;
  minPerPod: number;
  maxPerPod?: number | undefined;
  processesPerPod: number;
  /**
   * MaxReplicas strategy: the HPA's maxReplicas (or the workload's replicas
   * when it has no HPA). Its pods are budgeted as if that many ran. Ignored
   * for Dynamic; a MaxReplicas consumer without it behaves like Dynamic.
   */
  maxReplicas?: number | undefined;
}

/**
 * A bound on what a group of connections may hold together, below the
 * server's limit: a PostgreSQL CONNECTION LIMIT on the role or the database
 * they log in to, which every connection of that role (or to that database)
 * counts against, whichever DatabaseConnection it comes from.
 */
export interface ConnectionCap {
  /** Names the group: connections with the same key share `limit` (e.g. "role app"). */
  key: string;
  /** What the group's pods may hold together (the CONNECTION LIMIT less the reserve). */
  limit: number;
}

/** A DatabaseConnection on this server. */
export interface ConnectionInput extends ObjectKey {
  budgetStrategy: 'Dynamic' | 'MaxReplicas';
  consumers: readonly ConsumerInput[];
  /** Caps it shares with other connections of the same role or database; the strictest limit of one key wins. */
  caps?: readonly ConnectionCap[] | undefined;
  /**
   * Seconds a pod that left without its sidecar reporting a drain (deleted
   * with a lost node, killed, finished) stays counted at what it may hold:
   * how long PostgreSQL may keep the backends of a peer that vanished.
   * Absent or 0: released at once.
   */
  departureHoldSeconds?: number | undefined;
}

/** Pod phases as Kubernetes reports them. */
export type PodPhase = 'Pending' | 'Running' | 'Succeeded' | 'Failed' | 'Unknown';

/** A pod labelled for one of the connections. */
export interface PodInput extends ObjectKey {
  uid: string;
  /** Name of the DatabaseConnection (same namespace) from the pod's label. */
  connection: string;
  /** The consumer the pod belongs to; undefined when it matches none (its grant is withdrawn). */
  consumer?: string | undefined;
  phase: PodPhase;
  /** metadata.deletionTimestamp is set. */
  terminating: boolean;
  ready: boolean;
  /** Its sidecar reads grant tables (the injector says so): a PoolMember created for it starts on the table. */
  readsTables?: boolean | undefined;
}

/** The grant in force for a pod: PoolMember spec.grant. */
export interface GrantInForce {
  connections: number;
  generation: number;
}

/** A sidecar's acknowledgement: PoolMember status. */
export interface Acknowledgement {
  /** status.acknowledgedGeneration. */
  generation: number;
  /** status.acknowledgedConnections. */
  connections: number;
  /** status.heldConnections. */
  held: number;
  /** status.drained. */
  drained: boolean;
  /** status.tableGeneration: the grant table `connections` was derived from; absent from sidecars that do not read tables. */
  tableGeneration?: number | undefined;
}

/** What is persisted for one pod: its PoolMember (the only state the planner needs across restarts). */
export interface MemberState extends ObjectKey {
  /** UID of the pod the PoolMember belongs to (its owner reference). */
  podUid: string;
  grant: GrantInForce;
  /** Absent until the sidecar first writes status. */
  acknowledgement?: Acknowledgement | undefined;
  /** The DatabaseConnection (same namespace) it belongs to: spec.connection. */
  connection?: string | undefined;
  /**
   * spec.tableFrom: from this grant-table generation on, the pod's grant is
   * derived from its connection's table instead of `grant`. Absent: `grant`.
   */
  tableFrom?: number | undefined;
}

/** The grant table in force for one DatabaseConnection. */
export interface TableState {
  namespace: string;
  /** The DatabaseConnection's name. */
  connection: string;
  table: GrantTable;
}

/** The table a plan wants for one DatabaseConnection: write it when `changed`. */
export interface PlannedTable extends TableState {
  changed: boolean;
  /** Some pod's grant is larger than the one in force. */
  grows: boolean;
  /**
   * The same table without its grows, one generation before `table`, when it
   * differs from the table in force: what this pass releases and records
   * (shrinks, acknowledgements the controller has seen). Written first when
   * another table of the server grows too (see `tableWriteWaves`).
   */
  releases?: GrantTable | undefined;
}

/** Everything about one database server. */
export interface BudgetInput {
  /** The server's effective limit (after reserve), shared by all `connections`. */
  limit: number;
  connections: readonly ConnectionInput[];
  pods: readonly PodInput[];
  /** PoolMembers of those pods (and of pods that may be gone). */
  members: readonly MemberState[];
  /** The grant tables in force (absent or empty: none written yet). */
  tables?: readonly TableState[] | undefined;
  /**
   * Per `namespace/connection`, the highest table generation known to have
   * been written for it, its table since gone (the DatabaseConnection deleted
   * and created again): a new table starts past it, since a sidecar may have
   * read that generation and acknowledge it later.
   */
  tableGenerationFloors?: ReadonlyMap<string, number> | undefined;
  /**
   * Pods whose PoolMember last said drained and is gone since (taken with its pod):
   * a departure recorded for one of them from an older view of its PoolMember
   * (a cache that showed the pod gone before the drain) is dropped.
   */
  drainedPodUids?: Pick<ReadonlySet<string>, 'has' | 'size'> | undefined;
  /**
   * The same pods by `namespace/name`: a terminating pod listed by name in
   * its table, whose pod and PoolMember were both gone from the view that
   * recorded it, has a record without a uid.
   */
  drainedPodNames?: Pick<ReadonlySet<string>, 'has' | 'size'> | undefined;
  /**
   * The time of this pass (ms since the epoch), against which the tables'
   * departed pods expire and new ones are dated. Absent: departures are
   * neither recorded nor counted.
   */
  now?: number | undefined;
}

/** Why a pod's grant is not yet its target. */
export type GrantWait = 'none' | 'acknowledgement' | 'capacity';

/** The planned grant of one pod: write `grant` and `drain` into its PoolMember spec when `changed`. */
export interface PodGrant extends ObjectKey {
  podUid: string;
  connection: string;
  consumer?: string | undefined;
  grant: GrantInForce;
  /** The grant differs from the one in force (or there was none): write it. */
  changed: boolean;
  /** The grant is carried by the connection's grant table (in `BudgetPlan.tables`), not by the PoolMember. */
  table: boolean;
  /** Create the PoolMember on the table from this generation on (its sidecar reads tables). */
  tableFrom?: number | undefined;
  /** Ask the sidecar to give everything back (terminating pod, or no consumer). */
  drain: boolean;
  /** The pod's fair share, which its grant converges to. */
  target: number;
  /** What the pod may hold now: max(grant, acknowledged, held); 0 once a terminating pod has drained. */
  reservation: number;
  /** What keeps grant != target. */
  waitingFor: GrantWait;
}

/** Status of one consumer. */
export interface ConsumerSummary {
  name: string;
  /** Live (not terminating, not finished) pods. */
  pods: number;
  /** The fair share of one pod (the smallest among its pods when remainders differ). */
  perPodBudget: number;
  /** perPodBudget / processesPerPod, rounded down. */
  perProcessBudget: number;
}

/** Status data of one DatabaseConnection. */
export interface ConnectionSummary extends ObjectKey {
  /** Live pods. */
  pods: number;
  /** Sum over this connection's pods of their reservation. */
  allocated: number;
  consumers: ConsumerSummary[];
  /** Printable per-pod budgets, e.g. "web=4 worker=2". */
  perPodBudget: string;
  /** Live pods whose grant is not yet their target. */
  podsWaiting: number;
  /** What pods that left without a drain may still hold (in `allocated`). */
  departed?: number | undefined;
}

/** The minimums do not fit the limit. */
export interface Oversubscription {
  /** Sum of pods x minPerPod. */
  required: number;
  limit: number;
  /** The cap (ConnectionCap key) the minimums exceed; absent: the server's limit. */
  cap?: string | undefined;
  /** e.g. "shop/orders-db web: 12 pods x minPerPod 5 = 60 > limit 50". */
  message: string;
}

/** The planner's answer for one server. */
export interface BudgetPlan {
  limit: number;
  /** Sum of all reservations after this plan; <= limit unless the limit itself dropped below what pods still hold. */
  allocated: number;
  grants: PodGrant[];
  connections: ConnectionSummary[];
  oversubscription?: Oversubscription | undefined;
  /** PoolMembers whose pod is gone (or was replaced by a new pod of the same name): their reservation is released. */
  orphans: ObjectKey[];
  /** Every grant equals its target and is acknowledged. */
  settled: boolean;
  /** One grant table per DatabaseConnection with pods on tables. */
  tables: PlannedTable[];
  /** When the first departed pod of a table stops counting (ms since the epoch): plan again then. */
  nextDepartureExpiry?: number | undefined;
}
