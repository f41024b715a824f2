/**
 * How long a grant change takes to reach running sidecars: the controller
 * and 4 real sidecars (kubelet simulator) on the local environment; the
 * DatabaseConnection's maxConnections alternates between two values, and each
 * round measures from the API write to every sidecar holding the new grant
 * (as the sidecar itself reports it, in this process).
 *
 *   node bench/grant-latency.ts [rounds=20]
 */
import pino from 'pino';
import { startController } from '../src/bin/controller-main.ts';
import { LocalEnvironment } from '../src/devenv/environment.ts';
import { KubeletSimulator } from '../src/devenv/kubelet-sim.ts';
import { createWorkload, eventually, installCrds } from '../src/devenv/scenario.ts';

const rounds = Number(process.argv[2] ?? 20);
const PODS = 4;
const quiet = pino({ level: 'silent' });
const env = new LocalEnvironment();
try {
  const [kube, postgres] = await Promise.all([env.kube(), env.postgres()]);
  await installCrds(kube);
  createWorkload(kube, { namespace: 'bench', connection: 'db', deployment: 'web', replicas: PODS, secret: 'creds', username: postgres.app.user, password: postgres.app.password });
  const connection = (max: number): string => JSON.stringify({
    apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'db', namespace: 'bench' },
    spec: {
      database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'creds' } },
      maxConnections: max, reserve: 0, consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } }],
    },
  });
  kube.kubectl(['apply', '-f', '-'], connection(40));
  const controller = await startController({ apiServer: kube.kubeConfig(), namespace: 'bench', identity: 'bench', metricsPort: 0, metricsHost: '127.0.0.1', leaderElection: false, repair: 'off' }, quiet);
  const kubelet = new KubeletSimulator(kube, 'bench', { username: postgres.app.user, password: postgres.app.password }, quiet);
  await kubelet.start();
  const allAt = (n: number): boolean => kubelet.live().length === PODS && kubelet.live().every((p) => p.sidecar?.sidecar.status().acknowledgedConnections === n);
  await eventually('initial grants', () => allAt(10), 60_000);
  const samples: number[] = [];
  for (let i = 0; i < rounds; i += 1) {
    const max = i % 2 === 0 ? 20 : 40;
    const started = performance.now();
    await kube.kubectlAsync(['apply', '-f', '-'], connection(max));
    await eventually(`round ${i}`, () => allAt(max / PODS), 30_000);
    samples.push(performance.now() - started);
  }
  await kubelet.stop();
  await controller.shutdown();
  samples.sort((a, b) => a - b);
  const pick = (q: number): string => (samples[Math.min(samples.length - 1, Math.floor(q * samples.length))]! / 1000).toFixed(3);
  console.log(`grant change -> all ${PODS} sidecars holding it, ${rounds} rounds (shrinks and grows alternating), includes kubectl apply (~0.1 s):`);
  console.log(`  p50 ${pick(0.5)} s   p90 ${pick(0.9)} s   max ${pick(1)} s`);
} finally {
  await env.stop();
}
