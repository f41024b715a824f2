/**
 * The install manifests against the real API server: the CRDs and the
 * kustomize tree pass server-side dry-run, the optional components build, and
 * the RBAC grants what the controller, webhook and sidecar need and no more.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { parseAllDocuments } from 'yaml';
import { testEnvironment } from '../support/hooks.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';

const env = testEnvironment();

describe('deploy manifests', function () {
  let kube: KubeControlPlane;

  before(async function () {
    kube = await env.kube();
  });

  it('passes server-side dry-run: kubectl apply -f crds/, then kubectl apply -k deploy/ --dry-run=server', function () {
    const crds = kube.kubectl(['apply', '--dry-run=server', '-f', 'crds/']);
    assert.match(crds, /databaseconnections\.poolkeeper\.dev/);
    // crds/ brings the namespace, which the server dry-run of namespaced objects needs.
    assert.match(crds, /namespace\/poolkeeper-system/);
    kube.kubectl(['apply', '-f', 'crds/']);
    const out = kube.kubectl(['apply', '--dry-run=server', '-k', 'deploy/']);
    for (const object of ['deployment.apps/poolkeeper', 'service/poolkeeper-webhook', 'mutatingwebhookconfiguration.admissionregistration.k8s.io/poolkeeper-webhook',
      'poddisruptionbudget.policy/poolkeeper', 'clusterrole.rbac.authorization.k8s.io/poolkeeper-sidecar', 'serviceaccount/poolkeeper-controller',
      'role.rbac.authorization.k8s.io/poolkeeper-controller-poolkeeper-system']) {
      assert.match(out, new RegExp(object.replace(/\./g, '\\.')), `dry-run output names ${object}`);
    }
  });

  it('builds a Deployment of 2 non-root read-only replicas whose webhook injects its own image, and a fail-open webhook', function () {
    const docs = parseAllDocuments(kube.kubectl(['kustomize', 'deploy/'])).map((d) => d.toJSON() as { kind: string; spec?: Record<string, unknown>; webhooks?: Record<string, unknown>[] });
    const deployment = docs.find((d) => d.kind === 'Deployment') as unknown as {
      spec: { replicas: number; template: { spec: { securityContext: { runAsNonRoot: boolean }; containers: { name: string; image: string; env: { name: string; value?: string }[]; securityContext: { readOnlyRootFilesystem: boolean } }[] } } };
    };
    assert.equal(deployment.spec.replicas, 2);
    assert.equal(deployment.spec.template.spec.securityContext.runAsNonRoot, true);
    for (const container of deployment.spec.template.spec.containers) assert.equal(container.securityContext.readOnlyRootFilesystem, true);
    const webhook = deployment.spec.template.spec.containers.find((c) => c.name === 'webhook')!;
    assert.equal(webhook.env.find((e) => e.name === 'POOLKEEPER_SIDECAR_IMAGE')?.value, webhook.image);
    const config = docs.find((d) => d.kind === 'MutatingWebhookConfiguration')!.webhooks![0]!;
    assert.equal(config.failurePolicy, 'Ignore');
    assert.equal(config.reinvocationPolicy, 'IfNeeded');
    assert.deepEqual(config.objectSelector, { matchExpressions: [{ key: 'poolkeeper.dev/connection', operator: 'Exists' }] });
  });

  it('builds the optional components: cert-manager switches the webhook to files and annotates for cainjector; monitoring adds PodMonitors', function () {
    const certManager = kube.kubectl(['kustomize', 'deploy/examples/with-cert-manager']);
    assert.match(certManager, /cert-manager\.io\/inject-ca-from: poolkeeper-system\/poolkeeper-webhook/);
    assert.match(certManager, /name: POOLKEEPER_WEBHOOK_CERTIFICATES\s+value: files/);
    assert.doesNotMatch(certManager, /value: self/);
    assert.equal(kube.kubectl(['kustomize', 'deploy/examples/with-monitoring']).match(/kind: PodMonitor/g)?.length, 2);
    assert.doesNotMatch(kube.kubectl(['kustomize', 'deploy/']), /PodMonitor|cert-manager/);
  });

  describe('RBAC', function () {
    const controller = 'system:serviceaccount:poolkeeper-system:poolkeeper-controller';
    const appNamespace = `app-${randomBytes(3).toString('hex')}`;
    const sidecar = `system:serviceaccount:${appNamespace}:web`;

    before(function () {
      kube.kubectl(['apply', '-f', 'crds/']);
      kube.kubectl(['wait', '--for=condition=Established', '--timeout=60s', 'crd/databaseconnections.poolkeeper.dev', 'crd/poolmembers.poolkeeper.dev']);
      kube.kubectl(['apply', '-f', 'deploy/base/serviceaccount.yaml', '-f', 'deploy/base/rbac.yaml', '-f', 'deploy/cluster-lease/rbac.yaml']);
      kube.kubectl(['create', 'namespace', appNamespace]);
      kube.kubectl(['create', 'serviceaccount', 'web', '-n', appNamespace]);
      kube.kubectl(['create', 'rolebinding', 'poolkeeper-sidecar', '-n', appNamespace, '--clusterrole=poolkeeper-sidecar', `--serviceaccount=${appNamespace}:web`]);
    });

    function can(user: string, args: string[]): boolean {
      try {
        return kube.kubectl(['auth', 'can-i', `--as=${user}`, ...args]).trim() === 'yes';
      } catch (err) {
        // can-i exits 1 and prints "no"; anything on stderr (an unknown resource) is a broken check.
        const cause = (err as Error).cause as { status?: number; stdout?: string; stderr?: string } | undefined;
        if (cause?.status === 1 && String(cause.stdout).trim() === 'no' && (!cause.stderr || /not namespace scoped/.test(cause.stderr))) return false;
        throw err;
      }
    }

    it('lets the controller do its job', function () {
      for (const args of [
        ['watch', 'databaseconnections.poolkeeper.dev', '-A'], ['patch', 'databaseconnections.poolkeeper.dev', '--subresource=status', '-n', appNamespace],
        ['create', 'poolmembers.poolkeeper.dev', '-n', appNamespace], ['delete', 'pods', '-n', appNamespace], ['create', 'pods', '--subresource=eviction', '-n', appNamespace],
        ['list', 'replicasets.apps', '-A'], ['watch', 'horizontalpodautoscalers.autoscaling', '-A'], ['get', 'secrets', '-n', appNamespace], ['create', 'events', '-n', appNamespace],
        ['update', 'leases.coordination.k8s.io/poolkeeper-controller', '-n', 'poolkeeper-system'], ['create', 'secrets', '-n', 'poolkeeper-system'],
        ['update', 'leases.coordination.k8s.io/poolkeeper-controller', '-n', 'kube-system'], ['watch', 'leases.coordination.k8s.io/poolkeeper-controller', '-n', 'kube-system'],
        ['create', 'leases.coordination.k8s.io', '-n', 'kube-system'],
        ['update', 'secrets/poolkeeper-webhook-certs', '-n', 'poolkeeper-system'], ['patch', 'mutatingwebhookconfigurations.admissionregistration.k8s.io/poolkeeper-webhook'],
        ['create', 'rolebindings.rbac.authorization.k8s.io', '-n', appNamespace], ['bind', 'clusterroles.rbac.authorization.k8s.io/poolkeeper-sidecar'],
      ]) assert.ok(can(controller, args), `controller can ${args.join(' ')}`);
    });

    it('denies the controller what it does not need', function () {
      for (const args of [
        ['create', 'pods', '-n', appNamespace], ['update', 'deployments.apps', '-n', appNamespace], ['update', 'secrets', '-n', appNamespace],
        ['update', 'secrets/other', '-n', 'poolkeeper-system'], ['create', 'secrets', '-n', appNamespace],
        ['patch', 'mutatingwebhookconfigurations.admissionregistration.k8s.io/someone-elses'], ['update', 'leases.coordination.k8s.io/other', '-n', 'poolkeeper-system'],
        ['update', 'leases.coordination.k8s.io/kube-controller-manager', '-n', 'kube-system'],
        ['update', 'databaseconnections.poolkeeper.dev', '-n', appNamespace],
        ['bind', 'clusterroles.rbac.authorization.k8s.io/cluster-admin'], ['escalate', 'clusterroles.rbac.authorization.k8s.io/poolkeeper-sidecar'], ['delete', 'rolebindings.rbac.authorization.k8s.io', '-n', appNamespace],
      ]) assert.equal(can(controller, args), false, `controller cannot ${args.join(' ')}`);
    });

    it('gives a bound sidecar ServiceAccount its PoolMember and nothing else', function () {
      assert.ok(can(sidecar, ['watch', 'poolmembers.poolkeeper.dev', '-n', appNamespace]));
      assert.ok(can(sidecar, ['patch', 'poolmembers.poolkeeper.dev', '--subresource=status', '-n', appNamespace]));
      for (const args of [['patch', 'poolmembers.poolkeeper.dev', '-n', appNamespace], ['get', 'secrets', '-n', appNamespace], ['get', 'pods', '-n', appNamespace], ['watch', 'poolmembers.poolkeeper.dev', '-n', 'default']]) {
        assert.equal(can(sidecar, args), false, `sidecar cannot ${args.join(' ')}`);
      }
    });
  });
});
