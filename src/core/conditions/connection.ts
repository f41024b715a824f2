/**
 * What a DatabaseConnection's conditions say beyond the budget: whether it
 * can serve at all (its Secret, a login with its credentials to its
 * database, a known limit, pods that match its consumers, sidecars that
 * reach the database), whether its
 * maxConnections is above what the server allows, and advice for an
 * oversubscribed server. Pure: facts in, condition updates and text out.
 */
import type { ConditionUpdate } from './index.ts';

/** Why a DatabaseConnection's login check failed. */
export type VerificationFailure =
  | 'SecretMissing'
  | 'SecretKeyMissing'
  | 'CaSecretMissing'
  | 'SshKeySecretMissing'
  | 'CredentialsRejected'
  | 'DatabaseNotFound'
  | 'ConnectionFailed';

/** The outcome of the login check at the current credentials generation. */
export type Verification =
  | { state: 'ok' }
  | { state: 'pending' }
  | { state: 'failed'; reason: VerificationFailure; message: string };

/** A consumer and what the caches show for it. */
export interface ConsumerFacts {
  name: string;
  workloadRef?: { kind: string; name: string } | undefined;
  /** The referenced workload as cached; absent when it does not exist. Ignored for selector consumers. */
  workload?: { replicas: number; templateConnection: string | undefined } | undefined;
  /** Opted-in live pods this consumer selects. */
  pods: number;
}

/** A sidecar that reports it cannot reach the database: its pod and the cause it reports. */
export interface UnreachableSidecar {
  pod: string;
  /** The message of its DatabaseReachable condition (SQLSTATE and message, or the connection's or SSH tunnel's error). */
  cause: string;
}

/** What the sidecars of a connection report about reaching its database. */
export interface SidecarReachabilityFacts {
  /** Sidecars of live pods that report (unresponsive ones left out: what they last said may be old). */
  sidecars: number;
  /** Those of them whose last report says they cannot reach it. */
  unreachable: readonly UnreachableSidecar[];
}

/** Everything the conditions are computed from. */
export interface ConnectionFacts {
  /** The DatabaseConnection's name (the label value pods opt in with). */
  name: string;
  verification: Verification;
  /** False when no limit is known for the server yet. */
  limitKnown: boolean;
  consumers: readonly ConsumerFacts[];
  /** Opted-in pods that no consumer selects. */
  podsWithoutConsumer: readonly string[];
  /** The Ready condition the budget plan gives. */
  budgetReady: ConditionUpdate;
  /** What the sidecars report about reaching the database; absent: nothing (as none reporting). */
  sidecars?: SidecarReachabilityFacts | undefined;
}

/** The label pods opt in with. */
const LABEL = 'poolkeeper.dev/connection';

function names(list: readonly string[]): string {
  return `${list.slice(0, 5).join(', ')}${list.length > 5 ? `, ... (${list.length} in all)` : ''}`;
}

/** Problems of consumers whose workload cannot be served: missing, or its pods do not opt in. */
function workloadProblems(facts: ConnectionFacts): string[] {
  const problems: string[] = [];
  for (const consumer of facts.consumers) {
    const ref = consumer.workloadRef;
    if (!ref || consumer.pods > 0) continue;
    const workload = consumer.workload;
    if (!workload) problems.push(`consumer ${consumer.name}: ${ref.kind} ${ref.name} not found`);
    else if (workload.replicas > 0 && workload.templateConnection !== facts.name) {
      problems.push(`consumer ${consumer.name}: the pod template of ${ref.kind} ${ref.name} ${workload.templateConnection === undefined ? 'lacks' : `has ${LABEL}=${workload.templateConnection}, not`} the label ${LABEL}=${facts.name}, so its ${workload.replicas} pod(s) get no budget`);
    }
  }
  return problems;
}

/**
 * Ready (False whenever the connection cannot serve, with the first reason
 * that stops it) and ConsumersMatched.
 */
export function connectionConditions(facts: ConnectionFacts): ConditionUpdate[] {
  const workloads = workloadProblems(facts);
  const idle = facts.consumers.filter((c) => c.pods === 0 && !(c.workloadRef && c.workload && c.workload.replicas === 0)).map((c) => c.name);
  let matched: ConditionUpdate;
  if (facts.podsWithoutConsumer.length > 0) {
    matched = { type: 'ConsumersMatched', status: 'False', reason: 'PodsWithoutConsumer', message: `${facts.podsWithoutConsumer.length} pod(s) carry ${LABEL}=${facts.name} but match no consumer, so they get no budget: ${names(facts.podsWithoutConsumer)}` };
  } else if (workloads.length > 0) {
    matched = { type: 'ConsumersMatched', status: 'False', reason: 'ConsumerWithoutPods', message: workloads.join('; ') };
  } else if (idle.length > 0) {
    matched = { type: 'ConsumersMatched', status: 'False', reason: 'ConsumerWithoutPods', message: `no opted-in pod matches consumer(s) ${names(idle)}` };
  } else {
    matched = { type: 'ConsumersMatched', status: 'True', reason: 'AllMatched', message: 'every consumer has pods and every opted-in pod has a consumer' };
  }
  const v = facts.verification;
  let ready: ConditionUpdate;
  const sidecars = facts.sidecars;
  if (v.state === 'failed') ready = { type: 'Ready', status: 'False', reason: v.reason, message: v.message };
  else if (sidecars && sidecars.sidecars > 0 && sidecars.unreachable.length === sidecars.sidecars) {
    ready = { type: 'Ready', status: 'False', reason: 'SidecarsCannotConnect', message: `none of the ${sidecars.sidecars} sidecar(s) can reach the database: ${unreachableSummary(sidecars.unreachable)}${ELSEWHERE}` };
  } else if (!facts.limitKnown) ready = { type: 'Ready', status: 'False', reason: 'LimitUnknown', message: 'no connection limit known for this server yet' };
  else if (facts.podsWithoutConsumer.length > 0) ready = { type: 'Ready', status: 'False', reason: 'PodsWithoutConsumer', message: matched.message };
  else if (workloads.length > 0) ready = { type: 'Ready', status: 'False', reason: 'WorkloadNotOptedIn', message: workloads.join('; ') };
  else if (v.state === 'pending') ready = { type: 'Ready', status: 'False', reason: 'Verifying', message: 'checking the login with these credentials' };
  else ready = facts.budgetReady;
  return [ready, matched];
}

/** What to look at when the sidecars fail where the controller's own login check succeeds. */
const ELSEWHERE = '; the controller\'s own login check does not fail, so look at what differs for the pods: a NetworkPolicy on their egress, the credentials mounted in them, the bastion\'s host key, their network';

/** The most common cause and its pods, then how many report other causes. */
function unreachableSummary(unreachable: readonly UnreachableSidecar[]): string {
  const byCause = new Map<string, string[]>();
  for (const u of unreachable) byCause.set(u.cause, [...(byCause.get(u.cause) ?? []), u.pod]);
  // Most pods first; equal counts by cause, so that the text does not change from one pass to the next.
  const causes = [...byCause].sort(([a, pa], [b, pb]) => pb.length - pa.length || a.localeCompare(b));
  const [cause, pods] = causes[0] ?? ['', []];
  const others = unreachable.length - pods.length;
  return `${cause} (pods ${names([...pods].sort())})${others > 0 ? `; ${others} more with ${causes.length - 1} other cause(s), e.g. ${causes[1]![0]}` : ''}`;
}

/**
 * Degraded when sidecars report that they cannot reach or log in to the
 * database (their PoolMember's DatabaseReachable condition): with the
 * count, the most common cause and its pods. Undefined when none does.
 */
export function sidecarReachabilityCondition(facts: SidecarReachabilityFacts): ConditionUpdate | undefined {
  const n = facts.unreachable.length;
  if (n === 0) return undefined;
  return {
    type: 'Degraded', status: 'True', reason: 'SidecarsCannotConnect',
    message: `${n} of ${facts.sidecars} sidecar(s) cannot reach the database: ${unreachableSummary(facts.unreachable)}${ELSEWHERE}`,
  };
}

/**
 * LimitExceedsServer: True when a numeric maxConnections is above the slots
 * the server gives ordinary roles; budgets then use the server's value.
 */
export function limitMismatchCondition(spec: number | string, server: { maxConnections: number; superuserReserved: number; reserved?: number | undefined; available: number } | undefined): ConditionUpdate {
  if (typeof spec !== 'number' || server === undefined) {
    return { type: 'LimitExceedsServer', status: 'False', reason: typeof spec === 'number' ? 'ServerUnknown' : 'Auto', message: typeof spec === 'number' ? 'the server\'s max_connections could not be read' : 'maxConnections is read from the server' };
  }
  if (spec <= server.available) {
    return { type: 'LimitExceedsServer', status: 'False', reason: 'WithinServer', message: `maxConnections ${spec} <= the ${server.available} connections the server allows` };
  }
  const reserved = server.reserved ? ` - reserved_connections ${server.reserved}` : '';
  return {
    type: 'LimitExceedsServer', status: 'True', reason: 'MaxConnectionsAboveServer',
    message: `maxConnections ${spec} is above what the server allows (max_connections ${server.maxConnections} - superuser_reserved_connections ${server.superuserReserved}${reserved} = ${server.available}); budgets use ${server.available}. Set maxConnections to ${server.available} or less, or "auto"`,
  };
}

/**
 * LimitExceedsServer when the login's role or database has a CONNECTION
 * LIMIT below the limit budgets would otherwise use: the pods of every
 * connection with that role (or database) on the server are kept within it
 * together (the reserve applies to it), and the message says where it comes
 * from and how to change it.
 */
export function loginCapCondition(cap: { limit: number; of: 'role' | 'database' }, role: string, database: string, otherwise: number): ConditionUpdate {
  const where = cap.of === 'role' ? `ALTER ROLE ${quoteIdentifier(role)} CONNECTION LIMIT n` : `ALTER DATABASE ${quoteIdentifier(database)} CONNECTION LIMIT n`;
  return {
    type: 'LimitExceedsServer', status: 'True', reason: 'LoginConnectionLimit',
    message: `the ${cap.of}'s CONNECTION LIMIT is ${cap.limit} (role ${role}, database ${database}): every connection of it counts, so the pods of every DatabaseConnection on this server that ${cap.of === 'role' ? `log in as ${role}` : `use database ${database}`} hold at most ${cap.limit} less the reserve together, below the server's ${otherwise}; raise it with ${where} (or -1 for none) to use more`,
  };
}

/**
 * PoolerInFront: whether what answers at the connection's address is a
 * connection pooler (PgBouncer, RDS Proxy, Supavisor, ...) rather than
 * PostgreSQL, and whether it was seen pooling by transaction, which loses
 * session state between transactions for every client of it.
 */
export function poolerCondition(finding: { transactionPooling: boolean } | undefined, address: string): ConditionUpdate {
  if (finding === undefined) {
    return { type: 'PoolerInFront', status: 'False', reason: 'PostgreSQL', message: `${address} is PostgreSQL itself: the backend it announced at login ran the login's statements` };
  }
  const budget = 'Budgets count the pods\' connections to the pooler against the max_connections it reports (PostgreSQL\'s); if its own client limit is lower (PgBouncer\'s max_client_conn), set maxConnections to it';
  if (finding.transactionPooling) {
    return {
      type: 'PoolerInFront', status: 'True', reason: 'TransactionPooler',
      message: `${address} is a connection pooler that pools by transaction (the controller's login was announced as another process than the backend that ran its statements, and its statements ran on more than one backend or on the backend of another login): through it, session state does not last from one transaction to the next, for the sidecar and for direct connections alike. A SET the sidecar carries or a startup setting, prepared statements, LISTEN, session advisory locks and temporary tables may be lost or reach other clients. Point spec.database at PostgreSQL itself (the sidecar pools), or run the pooler in session mode. ${budget}`,
    };
  }
  return {
    type: 'PoolerInFront', status: 'True', reason: 'Pooler',
    message: `${address} is a connection pooler (the controller's login was announced as another process than the backend that ran its statements); it was not seen pooling by transaction. In session mode it serves as PostgreSQL does; if it pools by transaction, session state (a SET the sidecar carries, prepared statements, LISTEN, advisory locks) does not last from one transaction to the next. ${budget}`,
  };
}

/** A PostgreSQL identifier as it would be typed: quoted unless plain lower-case. */
function quoteIdentifier(name: string): string {
  return /^[a-z_][a-z0-9_$]*$/.test(name) ? name : `"${name.replace(/"/g, '""')}"`;
}

/** One consumer's share of an oversubscribed server. */
export interface ConsumerDemand {
  /** `namespace/connection`. */
  connection: string;
  consumer: string;
  pods: number;
  minPerPod: number;
}

/**
 * How to fix oversubscription, with numbers: the limit it would take, and,
 * for the consumer with the largest demand, the minPerPod or the pod count
 * that would fit.
 */
export function oversubscriptionAdvice(limit: number, demands: readonly ConsumerDemand[]): string {
  const required = demands.reduce((sum, d) => sum + d.pods * d.minPerPod, 0);
  if (required <= limit) return '';
  const largest = [...demands].sort((a, b) => b.pods * b.minPerPod - a.pods * a.minPerPod)[0];
  const options = [`raise the limit to at least ${required} (maxConnections or reserve)`];
  if (largest && largest.pods > 0 && largest.minPerPod > 0) {
    const others = required - largest.pods * largest.minPerPod;
    const room = limit - others;
    if (room >= 0) {
      const perPod = Math.floor(room / largest.pods);
      if (perPod < largest.minPerPod) options.push(`lower minPerPod of ${largest.connection} consumer ${largest.consumer} from ${largest.minPerPod} to ${perPod}`);
      const pods = Math.floor(room / largest.minPerPod);
      if (pods < largest.pods) options.push(`run at most ${pods} pods of ${largest.connection} consumer ${largest.consumer} (now ${largest.pods})`);
    }
  }
  return `To fix: ${options.join('; or ')}.`;
}
