/**
 * Reads DatabaseConnections from the API server for the admission handler.
 */
import type { CustomObjectsApi } from '@kubernetes/client-node';
import { API_GROUP, API_VERSION, type DatabaseConnection } from '../api/index.ts';
import type { InjectableConnection } from '../core/inject/index.ts';
import type { ConnectionLookup } from './admission.ts';
import { apiStatus } from './certificates.ts';

// The generated API type must stay usable where the injector expects its subset.
const _assignable = (c: DatabaseConnection): InjectableConnection => c;
void _assignable;

/** A ConnectionLookup that GETs the object on each admission (no cache to go stale). */
export class KubeConnectionLookup implements ConnectionLookup {
  private readonly api: CustomObjectsApi;

  constructor(api: CustomObjectsApi) {
    this.api = api;
  }

  /** The DatabaseConnection `namespace/name`, or undefined on 404. */
  async get(namespace: string, name: string): Promise<InjectableConnection | undefined> {
    try {
      return (await this.api.getNamespacedCustomObject({ group: API_GROUP, version: API_VERSION, namespace, plural: 'databaseconnections', name })) as DatabaseConnection;
    } catch (err) {
      if (apiStatus(err) === 404) return undefined;
      throw err;
    }
  }
}
