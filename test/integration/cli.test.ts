/**
 * The poolkeeper binary as a user meets it: --help, <command> --help,
 * version, and one-line errors (exit code 2) for every start-up mistake,
 * outside a cluster included.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';

function poolkeeper(args: string[], env: Record<string, string | undefined> = {}): { code: number | null; stdout: string; stderr: string } {
  const clean = { ...process.env, KUBECONFIG: undefined, KUBERNETES_SERVICE_HOST: undefined, ...env };
  const r = spawnSync(process.execPath, ['src/bin/poolkeeper.ts', ...args], { encoding: 'utf8', env: clean, timeout: 20_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('poolkeeper CLI', function () {
  it('--help lists the commands; <command> --help explains it and starts nothing', function () {
    const help = poolkeeper(['--help']);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /controller .*\n.*webhook .*\n.*sidecar .*\n.*version/);
    for (const command of ['controller', 'webhook', 'sidecar']) {
      const r = poolkeeper([command, '--help']);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, new RegExp(`^usage: poolkeeper ${command}\\n`));
      assert.match(r.stdout, /environment:/);
      assert.equal(r.stderr, '');
    }
  });

  it('version prints the version', function () {
    const r = poolkeeper(['version']);
    assert.equal(r.code, 0);
    assert.match(r.stdout, /^poolkeeper \d+\.\d+\.\d+ \(node v24\./);
  });

  it('mistakes end with one line on stderr and exit code 2, no stack trace', function () {
    const cases: Array<[string[], Record<string, string | undefined>, RegExp]> = [
      [['controller'], {}, /^poolkeeper controller: not running in a Kubernetes pod .* KUBECONFIG is not set/],
      [['webhook'], {}, /^poolkeeper webhook: not running in a Kubernetes pod/],
      [['controller'], { KUBECONFIG: '/nonexistent/kubeconfig' }, /^poolkeeper controller: KUBECONFIG=\/nonexistent\/kubeconfig: no such file/],
      [['controller'], { KUBECONFIG: '/dev/null', POOLKEEPER_REPAIR: 'sometimes' }, /POOLKEEPER_REPAIR must be evict, report or off, got sometimes/],
      [['controller'], { KUBECONFIG: '/dev/null', POOLKEEPER_METRICS_PORT: 'eighty' }, /POOLKEEPER_METRICS_PORT must be a port number/],
      [['controller'], { KUBECONFIG: '/dev/null', POOLKEEPER_CLUSTER_LEASE_NAMESPACE: 'Kube_System' }, /POOLKEEPER_CLUSTER_LEASE_NAMESPACE must be a namespace name or none, got "Kube_System"/],
      [['sidecar'], {}, /^poolkeeper sidecar: environment variable POOLKEEPER_POD_NAMESPACE is required/],
      [['sidecar'], { POOLKEEPER_POD_NAMESPACE: 'shop', POOLKEEPER_POD_NAME: 'web-1', POOLKEEPER_CLIENT_TLS: 'yes' }, /POOLKEEPER_CLIENT_TLS must be self-signed or off, got yes/],
      [['controller', '--kubeconfig=x'], {}, /unknown option --kubeconfig=x/],
      [['frobnicate'], {}, /^poolkeeper: unknown command "frobnicate"; run poolkeeper --help/],
    ];
    for (const [args, env, message] of cases) {
      const r = poolkeeper(args, env);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, message);
      assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
      assert.doesNotMatch(r.stderr, /\n\s+at /);
    }
  });
});
