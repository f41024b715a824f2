/**
 * The KubeConfig a binary runs with: `KUBECONFIG` when set, else the
 * in-cluster ServiceAccount.
 */
import { KubeConfig } from '@kubernetes/client-node';

/** Loads the kubeconfig file at `path`, or the in-cluster configuration. */
export function loadKubeConfig(path: string | undefined): KubeConfig {
  const kc = new KubeConfig();
  if (path) kc.loadFromFile(path);
  else kc.loadFromCluster();
  return kc;
}
