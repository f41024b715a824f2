/**
 * `npm run testenv -- smoke`: starts every component of the local
 * environment (and the real node where the machine allows it), prints one
 * line each with its version and health, stops them.
 * `npm run testenv -- up`: starts the real node, installs poolkeeper from
 * crds/ and deploy/ with the locally built image, prints the kubeconfig to
 * use with kubectl and keeps everything running until Ctrl-C.
 */
import { LocalEnvironment } from '../../src/devenv/environment.ts';
import { installPoolkeeper, probeRealNode, realNodeSupport } from '../../src/devenv/real-node.ts';
import { formatStatuses, probeEnvironment, type ComponentStatus } from '../../src/devenv/report.ts';

const command = process.argv[2] ?? 'smoke';
if (command !== 'smoke' && command !== 'up') {
  console.error('usage: npm run testenv -- smoke | up');
  process.exit(2);
}
const started = Date.now();

if (command === 'up') {
  const support = realNodeSupport({ install: true });
  if (!support.ok) {
    console.error(`a real node cannot run here: ${support.reason}`);
    process.exit(1);
  }
  // Ctrl-C stops everything through the environment's own signal handlers.
  const env = new LocalEnvironment();
  const node = await env.realNode();
  await installPoolkeeper(node);
  const postgres = await env.postgres();
  console.log(formatStatuses(await probeRealNode(node)));
  console.log(`real node up with poolkeeper installed in ${((Date.now() - started) / 1000).toFixed(1)} s; logs in ${node.logDir}`);
  console.log(`PostgreSQL for pods: host 10.88.0.1 port 5432, role ${postgres.app.user} password ${postgres.app.password}`);
  console.log(`export KUBECONFIG=${node.kubeconfigPath}`);
  console.log('Ctrl-C stops everything.');
  await new Promise(() => undefined);
}

const env = new LocalEnvironment();
let statuses: ComponentStatus[];
try {
  statuses = await probeEnvironment(env);
  const support = realNodeSupport();
  if (support.ok) {
    try {
      statuses.push(...await probeRealNode(await env.realNode()));
    } catch (err) {
      statuses.push({ name: 'real node', version: '-', healthy: false, detail: err instanceof Error ? err.message.split('\n')[0] ?? '' : String(err) });
    }
  } else {
    console.log(`real node: not started (${support.reason}); the kubelet simulator serves instead`);
  }
} finally {
  await env.stop();
}
console.log(formatStatuses(statuses));
const healthy = statuses.every((s) => s.healthy);
console.log(`${healthy ? 'all healthy' : 'UNHEALTHY'}; started, probed and stopped in ${((Date.now() - started) / 1000).toFixed(1)} s`);
process.exit(healthy ? 0 : 1);
