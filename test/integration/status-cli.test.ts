/**
 * `kubectl poolkeeper status` against the real API server: kubectl finds the
 * plugin on PATH and runs it; it reads what the controller wrote for a
 * Deployment's pods (sidecars played by PoolMember agents that acknowledge
 * at once), and when the Deployment scales beyond what the minimums allow,
 * it says by how much and what to change.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { createWorkload, eventually, freshNamespace, installCrds, SidecarFleetDouble, startController } from '../support/budget-fixture.ts';
import { testEnvironment } from '../support/hooks.ts';

/** Runs `kubectl <args>` with the plugin directory first on PATH (and this Node.js for its shebang). */
function kubectl(kube: KubeControlPlane, pluginDir: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((done) => {
    const child = spawn(kube.kubectlPath, args, { env: { ...process.env, PATH: `${pluginDir}:${dirname(process.execPath)}:${process.env.PATH ?? ''}`, KUBECONFIG: kube.kubeconfigPath } });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString('utf8')));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
    child.on('close', (code) => done({ code, stdout, stderr }));
  });
}

describe('kubectl poolkeeper status', function () {
  this.timeout(240_000);
  let kube: KubeControlPlane;
  let postgres: PostgresServer;
  let stopAll: (() => Promise<void>) | undefined;
  let namespace: string | undefined;
  const pluginDir = mkdtempSync(join(tmpdir(), 'poolkeeper-plugin-'));

  before(async function () {
    [kube, postgres] = await Promise.all([testEnvironment().kube(), testEnvironment().postgres()]);
    await installCrds(kube);
    symlinkSync(resolve('src/bin/kubectl-poolkeeper.ts'), join(pluginDir, 'kubectl-poolkeeper'));
  });

  after(async function () {
    await stopAll?.();
    if (namespace) await kube.kubectlAsync(['-n', namespace, 'delete', 'dbc', '--all', '--wait=true']);
    rmSync(pluginDir, { recursive: true, force: true });
  });

  it('prints the limit and who set it, budgets per consumer and pod, and what to do when oversubscribed', async function () {
    namespace = freshNamespace('status');
    const ns = namespace;
    createWorkload(kube, { namespace: ns, connection: 'orders', deployment: 'web', replicas: 3, secret: 'db-credentials', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders', namespace: ns },
      spec: {
        database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'db-credentials' } },
        maxConnections: 10, reserve: 0,
        consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, minPerPod: 2, processesPerPod: 2 }],
      },
    }));
    const { controller } = await startController(kube);
    const fleet = new SidecarFleetDouble(kube, ns);
    await fleet.start();
    stopAll = async () => {
      await controller.stop();
      await fleet.stop();
    };
    const status = async (): Promise<{ pods?: number; allocated?: number; conditions?: Array<{ type: string; status: string }> }> =>
      (JSON.parse(await kube.kubectlAsync(['-n', ns, 'get', 'dbc', 'orders', '-o', 'json'])) as { status?: Record<string, never> }).status ?? {};
    await eventually('3 pods at their budget', async () => {
      const s = await status();
      return s.pods === 3 && s.allocated === 10 && s.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true;
    }, 60_000);

    const help = await kubectl(kube, pluginDir, ['poolkeeper', 'status', '--help']);
    assert.equal(help.code, 0, help.stderr);
    assert.match(help.stdout, /^usage: kubectl poolkeeper status/);

    // Sidecars acknowledge to the controller directly and write their status at their next heartbeat: the per-pod columns follow then.
    let settled = await kubectl(kube, pluginDir, ['poolkeeper', 'status', '-n', ns]);
    await eventually('every pod line acknowledged in its PoolMember', async () => {
      settled = await kubectl(kube, pluginDir, ['poolkeeper', 'status', '-n', ns]);
      const lines = settled.stdout.split('\n').filter((l) => /^ {4}web-\S+ +web /.test(l));
      return lines.length === 3 && lines.every((l) => / ok$/.test(l)) && /^ {4}web +3 +2 +- +2 +1 +\d+ +\d+$/m.test(settled.stdout);
    }, 30_000);
    assert.equal(settled.code, 0, settled.stderr);
    const server = `${postgres.host}:${postgres.port}`;
    assert.match(settled.stdout, new RegExp(`^SERVER ${server.replace(/\./g, '\\.')} {3}limit 10 \\(10 - reserve 0\\) {3}allocated 10/10$`, 'm'));
    assert.match(settled.stdout, new RegExp(`limit set by DatabaseConnection ${ns}/orders`));
    assert.match(settled.stdout, /Ready=True \(Allocated\)/);
    // 10 over 3 pods: 4, 3, 3; each pod's grant acknowledged, its sidecar holding it.
    assert.match(settled.stdout, /^ {4}web +3 +2 +- +2 +1 +\d+ +\d+$/m);
    const podLines = settled.stdout.split('\n').filter((l) => /^ {4}web-\S+ +web /.test(l));
    assert.equal(podLines.length, 3, settled.stdout);
    assert.deepEqual(podLines.map((l) => Number(l.trim().split(/ +/)[2])).sort(), [3, 3, 4]);
    for (const line of podLines) assert.match(line, / ok$/);
    assert.doesNotMatch(settled.stdout, /OVERSUBSCRIBED/);

    // 6 pods x minPerPod 2 = 12 > 10.
    await kube.kubectlAsync(['-n', ns, 'scale', 'deployment/web', '--replicas=6']);
    await eventually('Oversubscribed', async () => (await status()).conditions?.some((c) => c.type === 'Oversubscribed' && c.status === 'True') === true, 60_000);
    const over = await kubectl(kube, pluginDir, ['poolkeeper', 'status', `--namespace=${ns}`]);
    assert.equal(over.code, 0, over.stderr);
    assert.match(over.stdout, /OVERSUBSCRIBED: the pods' minimums need 12 connections, the limit is 10 \(2 short\)/);
    assert.match(over.stdout, /raise the limit by 2 to 12/);
    assert.match(over.stdout, new RegExp(`scale ${ns}/orders consumer web from 6 to 5 pods \\(2 each\\)`));
    assert.match(over.stdout, /! Oversubscribed: /);

    const json = await kubectl(kube, pluginDir, ['poolkeeper', 'status', '-n', ns, '-o', 'json']);
    assert.equal(json.code, 0, json.stderr);
    const report = JSON.parse(json.stdout) as { servers: Array<{ limit: number; connections: Array<{ pods: unknown[] }> }> };
    assert.equal(report.servers[0]!.limit, 10);
    assert.equal(report.servers[0]!.connections[0]!.pods.length, 6);

    const wrong = await kubectl(kube, pluginDir, ['poolkeeper', 'status', '-o', 'yaml']);
    assert.equal(wrong.code, 2);
    assert.equal(wrong.stderr.trim(), 'poolkeeper status: --output must be text or json, got yaml');
  });
});
