/**
 * kubectl of the pinned release against one kubeconfig, and the kubeconfig
 * files themselves: the one way the local environments (the control plane
 * alone, the real node) make and use them.
 */
import { execFileSync, spawn } from 'node:child_process';

/** Runs kubectl with `kubeconfig` and returns stdout; throws with stderr on failure. Blocks the event loop. */
export function runKubectl(kubectl: string, kubeconfig: string, args: string[], input?: string): string {
  try {
    return execFileSync(kubectl, [`--kubeconfig=${kubeconfig}`, ...args], { encoding: 'utf8', input, stdio: ['pipe', 'pipe', 'pipe'] });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`kubectl ${args.join(' ')} failed: ${e.stderr ?? e.message}`, { cause: err });
  }
}

/**
 * kubectl without blocking the event loop: needed whenever the calling
 * process also serves something while kubectl runs (the webhook the API
 * server calls, a sampler, a forwarder).
 */
export function runKubectlAsync(kubectl: string, kubeconfig: string, args: string[], input?: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(kubectl, [`--kubeconfig=${kubeconfig}`, ...args], { stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(stdout) : reject(new Error(`kubectl ${args.join(' ')} failed: ${stderr}`))));
    if (child.stdin) {
      // A kubectl that exits (or never started) before reading its input: 'close' or 'error' says why, not EPIPE.
      child.stdin.on('error', () => undefined);
      child.stdin.end(input);
    }
  });
}

/** A kubeconfig for one client certificate on one cluster (certificates inline). */
export function kubeconfigYaml(cluster: string, server: string, caPem: string, user: string, identity: { certPem: string; keyPem: string }): string {
  const b64 = (text: string): string => Buffer.from(text).toString('base64');
  return [
    'apiVersion: v1',
    'kind: Config',
    'clusters:',
    `- name: ${cluster}`,
    '  cluster:',
    `    server: ${server}`,
    `    certificate-authority-data: ${b64(caPem)}`,
    'users:',
    `- name: "${user}"`,
    '  user:',
    `    client-certificate-data: ${b64(identity.certPem)}`,
    `    client-key-data: ${b64(identity.keyPem)}`,
    'contexts:',
    `- name: ${cluster}`,
    '  context:',
    `    cluster: ${cluster}`,
    `    user: "${user}"`,
    `current-context: ${cluster}`,
    '',
  ].join('\n');
}
