/**
 * Reads DatabaseConnections from the API server for the admission handler.
 */
import { API_GROUP, API_VERSION, type DatabaseConnection } from '../api/index.ts';
import type { InjectableConnection } from '../core/inject/index.ts';
import { isStatus, type KubeHttp } from '../kube/http.ts';
import type { ConnectionLookup } from './admission.ts';

// The generated API type must stay usable where the injector expects its subset.
const _assignable = (c: DatabaseConnection): InjectableConnection => c;
void _assignable;

/**
 * A ConnectionLookup that GETs the object on each admission (no cache to go
 * stale), through KubeHttp: its kept-alive connections are retried once when
 * the API server closed them while idle, where a failed lookup would admit
 * the pod without its sidecar.
 */
export class KubeConnectionLookup implements ConnectionLookup {
  private readonly http: KubeHttp;

  constructor(http: KubeHttp) {
    this.http = http;
  }

  /** The DatabaseConnection `namespace/name`, or undefined on 404. */
  async get(namespace: string, name: string): Promise<InjectableConnection | undefined> {
    try {
      return await this.http.get<DatabaseConnection>(`/apis/${API_GROUP}/${API_VERSION}/namespaces/${encodeURIComponent(namespace)}/databaseconnections/${encodeURIComponent(name)}`);
    } catch (err) {
      if (isStatus(err, 404)) return undefined;
      throw err;
    }
  }
}
