/**
 * Which way the webhook injects the sidecar, kept up to date with the
 * cluster's nodes: as a native sidecar (an init container with
 * restartPolicy Always) only while the API server and every kubelet are 1.29
 * or newer. During an upgrade the control plane goes first, and a kubelet
 * still at 1.28 refuses pods with native sidecars (the feature is off there)
 * while an older one runs the sidecar as an init container that never ends,
 * so the pod never starts. Until the last node is upgraded the sidecar is a
 * plain container, which every kubelet runs.
 */
import type { Logger } from 'pino';
import { kubeletsWithoutNativeSidecars } from '../core/inject/index.ts';
import type { KubeHttp } from '../kube/http.ts';

/** Reads the nodes' kubelet versions (the Version column of their table), page by page. */
export async function kubeletVersions(http: KubeHttp): Promise<string[]> {
  const versions: string[] = [];
  let next: string | undefined;
  do {
    const table = await http.getTable(`/api/v1/nodes?limit=500${next ? `&continue=${encodeURIComponent(next)}` : ''}`);
    const column = table.columnDefinitions.findIndex((c) => c.name === 'Version');
    if (column < 0) throw new Error('the node table has no Version column');
    for (const row of table.rows) {
      const cell = row.cells[column];
      versions.push(typeof cell === 'string' ? cell : '');
    }
    next = table.metadata?.continue || undefined;
  } while (next !== undefined);
  return versions;
}

/** Options of the watch. */
export interface SidecarModeOptions {
  /** What the API server's version allows. */
  apiServerAllowsNative: boolean;
  /** How often the nodes are read again (ms). */
  refreshMs?: number;
  logger: Logger;
}

/** The injector's sidecar mode, read again every refreshMs. */
export class SidecarMode {
  private readonly http: KubeHttp;
  private readonly options: SidecarModeOptions;
  private timer: NodeJS.Timeout | undefined;
  private older: string[] | undefined;
  /** True: inject native sidecars. */
  native: boolean;

  constructor(http: KubeHttp, options: SidecarModeOptions) {
    this.http = http;
    this.options = options;
    this.native = options.apiServerAllowsNative;
  }

  /** Reads the nodes once now, then every refreshMs; a failed read keeps the mode it had. */
  async start(): Promise<void> {
    await this.refresh();
    this.timer = setInterval(() => void this.refresh(), this.options.refreshMs ?? 60_000);
    this.timer.unref();
  }

  /** Stops reading the nodes. */
  stop(): void {
    clearInterval(this.timer);
  }

  /** Reads the nodes' versions and sets the mode. */
  async refresh(): Promise<void> {
    if (!this.options.apiServerAllowsNative) return;
    let older: string[];
    try {
      older = kubeletsWithoutNativeSidecars(await kubeletVersions(this.http));
    } catch (err) {
      this.options.logger.warn({ err: err instanceof Error ? err.message : String(err) }, 'could not read the nodes\' kubelet versions: the sidecar mode stays as it was');
      return;
    }
    const native = older.length === 0;
    if (this.older !== undefined && native === this.native && older.join() === this.older.join()) return;
    this.older = older;
    this.native = native;
    if (native) this.options.logger.info('every kubelet runs native sidecars: the sidecar is injected as one');
    else this.options.logger.warn({ kubelets: older }, `nodes run kubelets older than 1.29 (${older.join(', ')}), which refuse or never start pods with native sidecars: the sidecar is injected as a plain container until they are upgraded`);
  }
}
