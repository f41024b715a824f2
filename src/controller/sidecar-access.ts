/**
 * The RoleBinding that lets sidecars read their PoolMember: the ClusterRole
 * `poolkeeper-sidecar` bound, per namespace, to the ServiceAccounts that
 * opted-in pods run as. The controller holds `bind` on that one ClusterRole,
 * not its permissions.
 */
import type { Logger } from 'pino';
import { steadyNow } from '../ops/clock.ts';
import { isStatus, type KubeHttp } from '../kube/http.ts';
import type { KubeObject } from '../kube/informer.ts';
import type { PodObject } from './plan-input.ts';

/** Name of both the ClusterRole the sidecar needs and the RoleBinding the controller keeps in each namespace. */
export const SIDECAR_ROLE = 'poolkeeper-sidecar';

interface RoleBinding {
  metadata: { name: string; namespace: string; resourceVersion?: string; labels?: Record<string, string> };
  subjects?: Array<{ kind: string; name: string; namespace?: string }>;
}

/** Keeps the sidecar's RoleBinding in step with the pods that need it. */
export class SidecarAccess {
  private readonly http: KubeHttp;
  private readonly logger: Logger;
  private readonly recheckMs: number;
  /** Per namespace: ServiceAccounts known bound, and when the binding was last read. */
  private readonly known = new Map<string, { accounts: Set<string>; checkedAt: number }>();

  /** `recheckMs`: how long a binding read from the API is trusted before it is read again (a deleted one comes back then). */
  constructor(http: KubeHttp, logger: Logger, recheckMs = 5 * 60_000) {
    this.http = http;
    this.logger = logger;
    this.recheckMs = recheckMs;
  }

  /**
   * The sidecar runs with its pod's ServiceAccount; without this binding it
   * could not read its PoolMember. Subjects only grow here: a ServiceAccount
   * still used by a terminating pod must keep its access.
   */
  async ensure(pods: readonly (PodObject & KubeObject)[]): Promise<void> {
    const byNamespace = new Map<string, Set<string>>();
    for (const pod of pods) {
      const namespace = pod.metadata?.namespace ?? '';
      const accounts = byNamespace.get(namespace) ?? new Set<string>();
      accounts.add(pod.spec?.serviceAccountName ?? 'default');
      byNamespace.set(namespace, accounts);
    }
    const now = steadyNow();
    for (const [namespace, accounts] of byNamespace) {
      // Reconciles run every few seconds while grants move: read the binding only when something may be missing.
      const known = this.known.get(namespace);
      if (known && now - known.checkedAt < this.recheckMs && [...accounts].every((a) => known.accounts.has(a))) continue;
      const path = `/apis/rbac.authorization.k8s.io/v1/namespaces/${namespace}/rolebindings`;
      const existing = await this.http.get<RoleBinding>(`${path}/${SIDECAR_ROLE}`).catch((err: unknown) => {
        if (isStatus(err, 404)) return undefined;
        throw err;
      });
      const subjects = existing?.subjects ?? [];
      const missing = [...accounts].filter((name) => !subjects.some((s) => s.kind === 'ServiceAccount' && s.name === name && s.namespace === namespace));
      const bound = new Set([...subjects.filter((s) => s.kind === 'ServiceAccount' && s.namespace === namespace).map((s) => s.name), ...missing]);
      if (missing.length === 0) {
        this.known.set(namespace, { accounts: bound, checkedAt: now });
        continue;
      }
      const body = {
        apiVersion: 'rbac.authorization.k8s.io/v1',
        kind: 'RoleBinding',
        metadata: { ...(existing?.metadata ?? {}), name: SIDECAR_ROLE, namespace, labels: { ...(existing?.metadata.labels ?? {}), 'app.kubernetes.io/managed-by': 'poolkeeper' } },
        roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: SIDECAR_ROLE },
        subjects: [...subjects, ...missing.sort().map((name) => ({ kind: 'ServiceAccount', name, namespace }))],
      };
      if (existing) await this.http.replace(`${path}/${SIDECAR_ROLE}`, body);
      else await this.http.create(path, body);
      this.known.set(namespace, { accounts: bound, checkedAt: now });
      this.logger.info({ namespace, serviceAccounts: missing }, 'bound the sidecar role to ServiceAccounts of opted-in pods');
    }
  }
}
