/**
 * Names shared by the CRDs, the controller, the webhook and the sidecar.
 */

/** API group of poolkeeper's custom resources. */
export const API_GROUP = 'poolkeeper.dev';

/** The one served and stored version. */
export const API_VERSION = 'v1alpha1';

/** `apiVersion` field value of poolkeeper objects. */
export const GROUP_VERSION = `${API_GROUP}/${API_VERSION}`;

/** Pod (template) label naming the DatabaseConnection a pod draws on; also set on its PoolMember. */
export const CONNECTION_LABEL = 'poolkeeper.dev/connection';
