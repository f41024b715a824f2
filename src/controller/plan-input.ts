/**
 * From API objects to the budget planner's input, for one database server.
 * Pure: the reconciler hands in what its caches hold and the grants it has
 * written itself, and gets plain data back.
 */
import { memberPodUid, type DatabaseConnection, type PoolMember } from '../api/index.ts';
import { laterAcknowledgement, type Acknowledgement, type BudgetInput, type ConnectionCap, type ConnectionInput, type MemberState, type PodInput, type PodPhase, type TableState } from '../core/budget/index.ts';
import { resolveConsumer } from '../core/inject/consumer.ts';
import { READS_TABLES_ANNOTATION, type PodLike } from '../core/inject/model.ts';
import { CONNECTION_LABEL } from '../api/index.ts';

/** The slice of a Pod the planner needs. */
export interface PodObject {
  metadata?: PodLike['metadata'] & { uid?: string; deletionTimestamp?: string | Date };
  spec?: NonNullable<PodLike['spec']> & { serviceAccountName?: string };
  status?: { phase?: string; conditions?: Array<{ type: string; status: string }> };
}

/** A workload's scale and the HPA that may drive it. */
export interface WorkloadScale {
  namespace: string;
  kind: 'Deployment' | 'StatefulSet';
  name: string;
  replicas: number;
  /** maxReplicas of an HPA whose scaleTargetRef is this workload. */
  hpaMaxReplicas?: number | undefined;
}

/** A grant the controller has written and may not yet see in its cache. */
export interface WrittenGrant {
  namespace: string;
  /** The PoolMember's (and pod's) name. */
  name: string;
  podUid: string;
  connections: number;
  generation: number;
  /** The PoolMember was created on its connection's table from this generation on. */
  tableFrom?: number | undefined;
}

/** departureHoldSeconds of a DatabaseConnection that leaves it out (the CRD's default). */
export const DEFAULT_DEPARTURE_HOLD_SECONDS = 60;

const PHASES: readonly PodPhase[] = ['Pending', 'Running', 'Succeeded', 'Failed', 'Unknown'];

function podPhase(pod: PodObject): PodPhase {
  const phase = pod.status?.phase as PodPhase | undefined;
  return phase && PHASES.includes(phase) ? phase : 'Pending';
}

/** A PoolMember status as an acknowledgement (none before the sidecar acknowledged anything). */
export function statusAcknowledgement(status: PoolMember['status']): Acknowledgement | undefined {
  return status?.acknowledgedGeneration === undefined ? undefined : {
    generation: status.acknowledgedGeneration,
    connections: status.acknowledgedConnections ?? 0,
    held: status.heldConnections ?? 0,
    drained: status.drained ?? false,
    tableGeneration: status.tableGeneration,
  };
}

/** `namespace/name` of the DatabaseConnection a pod opts into, if any. */
export function podConnectionKey(pod: PodObject): string | undefined {
  const name = pod.metadata?.labels?.[CONNECTION_LABEL];
  return name ? `${pod.metadata?.namespace ?? ''}/${name}` : undefined;
}

function maxReplicasFor(connection: DatabaseConnection, consumer: DatabaseConnection['spec']['consumers'][number], workloads: readonly WorkloadScale[]): number | undefined {
  if (connection.spec.budgetStrategy !== 'MaxReplicas' || !consumer.workloadRef) return undefined;
  const ref = consumer.workloadRef;
  const workload = workloads.find((w) => w.namespace === connection.metadata.namespace && w.kind === ref.kind && w.name === ref.name);
  return workload ? (workload.hpaMaxReplicas ?? workload.replicas) : undefined;
}

/**
 * Builds the planner input for the DatabaseConnections of one server.
 * `written` overrides cached PoolMember grants that are older than what the
 * controller itself wrote: a stale grant is the one way to over-grant.
 */
export function buildBudgetInput(args: {
  limit: number;
  connections: readonly DatabaseConnection[];
  pods: readonly PodObject[];
  members: readonly PoolMember[];
  workloads: readonly WorkloadScale[];
  written: ReadonlyMap<string, WrittenGrant>;
  /** The grant tables in force (the cache's, or this replica's newer writes). */
  tables?: readonly TableState[];
  /** BudgetInput.tableGenerationFloors. */
  tableGenerationFloors?: ReadonlyMap<string, number>;
  /** A PoolMember's tableFrom as this replica knows it (its own switch may be newer than the cache); absent: spec.tableFrom. */
  tableFrom?: (member: PoolMember) => number | undefined;
  /** What a pod's sidecar acknowledged over the channel, by pod UID; counted for pods on a table only. */
  channel?: (podUid: string) => Acknowledgement | undefined;
  /** Grant tables are in use: pods whose injected sidecar reads them get their PoolMember created on the table. */
  tablesEnabled?: boolean;
  /** The CONNECTION LIMITs a connection's login shares with others on the server. */
  caps?: (connection: DatabaseConnection) => ConnectionCap[];
  /** This pass's time (ms since the epoch): departed pods expire against it. */
  now?: number;
  /** BudgetInput.drainedPodUids. */
  drainedPodUids?: Pick<ReadonlySet<string>, 'has' | 'size'>;
  /** BudgetInput.drainedPodNames. */
  drainedPodNames?: Pick<ReadonlySet<string>, 'has' | 'size'>;
}): BudgetInput {
  // By namespace, then name: looked up with the pods' and PoolMembers' own strings (hashed once,
  // as the caches keep them), not with a key built for each of thousands of them every pass.
  const byKey = new Map<string, Map<string, DatabaseConnection>>();
  for (const c of args.connections) {
    const namespace = c.metadata.namespace ?? '';
    let named = byKey.get(namespace);
    if (!named) byKey.set(namespace, (named = new Map<string, DatabaseConnection>()));
    named.set(c.metadata.name ?? '', c);
  }
  const connectionNamed = (namespace: string | undefined, name: string | undefined): DatabaseConnection | undefined => (name ? byKey.get(namespace ?? '')?.get(name) : undefined);
  const connections: ConnectionInput[] = args.connections.map((c) => ({
    namespace: c.metadata.namespace ?? '',
    name: c.metadata.name ?? '',
    budgetStrategy: c.spec.budgetStrategy,
    departureHoldSeconds: c.spec.departureHoldSeconds ?? DEFAULT_DEPARTURE_HOLD_SECONDS,
    ...(args.caps ? { caps: args.caps(c) } : {}),
    consumers: c.spec.consumers.map((consumer) => ({
      name: consumer.name,
      weight: consumer.weight,
      minPerPod: consumer.minPerPod,
      maxPerPod: consumer.maxPerPod,
      processesPerPod: consumer.processesPerPod,
      maxReplicas: maxReplicasFor(c, consumer, args.workloads),
    })),
  }));
  const pods: PodInput[] = [];
  for (const pod of args.pods) {
    const connection = connectionNamed(pod.metadata?.namespace, pod.metadata?.labels?.[CONNECTION_LABEL]);
    if (!connection || !pod.metadata?.name || !pod.metadata.uid) continue;
    const consumer = resolveConsumer(connection, pod);
    pods.push({
      namespace: pod.metadata.namespace ?? '',
      name: pod.metadata.name,
      uid: pod.metadata.uid,
      connection: connection.metadata.name ?? '',
      consumer: consumer?.name,
      phase: podPhase(pod),
      terminating: pod.metadata.deletionTimestamp !== undefined && pod.metadata.deletionTimestamp !== null,
      ready: pod.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') ?? false,
      ...(args.tablesEnabled === true && pod.metadata.annotations?.[READS_TABLES_ANNOTATION] === 'true' ? { readsTables: true } : {}),
    });
  }
  const members: MemberState[] = [];
  for (const member of args.members) {
    if (connectionNamed(member.metadata.namespace, member.spec.connection) === undefined) continue;
    const podUid = memberPodUid(member);
    const written = args.written.get(podUid);
    const cached = member.spec.grant;
    const grant = written && written.generation > cached.generation ? { connections: written.connections, generation: written.generation } : { connections: cached.connections, generation: cached.generation };
    const tableFrom = args.tableFrom ? args.tableFrom(member) : member.spec.tableFrom;
    const reported = statusAcknowledgement(member.status);
    // A grant from a table is acknowledged over the channel too; the table records what that let the controller do.
    const sent = tableFrom === undefined ? undefined : args.channel?.(podUid);
    const acknowledgement = sent && reported?.drained ? { ...laterAcknowledgement(reported, sent)!, drained: true } : laterAcknowledgement(reported, sent);
    members.push({
      namespace: member.metadata.namespace ?? '',
      name: member.metadata.name ?? '',
      podUid,
      connection: member.spec.connection,
      grant,
      acknowledgement,
      tableFrom,
    });
  }
  // A PoolMember we wrote that the cache has not shown yet still reserves its grant.
  const seen = new Set(members.map((m) => m.podUid));
  const podUids = new Set(pods.map((p) => p.uid));
  for (const written of args.written.values()) {
    if (seen.has(written.podUid) || !podUids.has(written.podUid)) continue;
    // Created on its table: its sidecar's first answer may have come over the channel already.
    const sent = written.tableFrom === undefined ? undefined : args.channel?.(written.podUid);
    members.push({ namespace: written.namespace, name: written.name, podUid: written.podUid, grant: { connections: written.connections, generation: written.generation }, ...(written.tableFrom === undefined ? {} : { tableFrom: written.tableFrom }), ...(sent ? { acknowledgement: sent } : {}) });
  }
  return { limit: args.limit, connections, pods, members, ...(args.tables ? { tables: args.tables } : {}), ...(args.tableGenerationFloors ? { tableGenerationFloors: args.tableGenerationFloors } : {}), ...(args.now === undefined ? {} : { now: args.now }), ...(args.drainedPodUids && args.drainedPodUids.size > 0 ? { drainedPodUids: args.drainedPodUids } : {}), ...(args.drainedPodNames && args.drainedPodNames.size > 0 ? { drainedPodNames: args.drainedPodNames } : {}) };
}
