/**
 * The Helm chart (charts/poolkeeper): `helm lint`; `helm template` renders the
 * objects kustomize builds from deploy/ for each combination of the optional
 * components (compared as objects, less the labels only Helm adds); values and
 * the release namespace land where they should; and a real `helm install` and
 * `helm upgrade` on a kube-apiserver of its own (so that the fixed cluster-wide
 * names of the chart meet no objects other tests leave in the shared one).
 * helm is built by scripts/build-tools.sh; without it these tests skip.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { parseAllDocuments } from 'yaml';
import { canonical, kubectlPath, kustomize } from '../../charts/generate.ts';
import { LocalEnvironment } from '../../src/devenv/environment.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';

interface KubeObject { apiVersion: string; kind: string; metadata: { name: string; namespace?: string; labels?: Record<string, string>; annotations?: Record<string, string> }; [key: string]: unknown }
interface Container { name: string; image: string; imagePullPolicy?: string; resources: unknown; env: { name: string; value?: string }[] }

const HELM_LABELS = ['helm.sh/chart', 'app.kubernetes.io/instance', 'app.kubernetes.io/managed-by', 'app.kubernetes.io/version'];
const CHART = 'charts/poolkeeper';

describe('Helm chart', function () {
  this.timeout(180_000);
  let helmBin = '';
  let home = '';

  before(function () {
    helmBin = execFileSync('bash', ['scripts/build-tools.sh', 'path', 'helm'], { encoding: 'utf8' }).trim();
    if (!existsSync(helmBin)) {
      console.log(`      skipped: helm is not built (${helmBin}); run bash scripts/build-tools.sh`);
      this.skip();
    }
    home = mkdtempSync(join(tmpdir(), 'poolkeeper-helm-'));
  });

  after(function () {
    if (home) rmSync(home, { recursive: true, force: true });
  });

  /** Runs helm with its own config, cache and data directories; throws with its output on failure. */
  function helm(args: string[], kubeconfig?: string): string {
    const env = { ...process.env, HELM_CACHE_HOME: join(home, 'cache'), HELM_CONFIG_HOME: join(home, 'config'), HELM_DATA_HOME: join(home, 'data'), ...(kubeconfig ? { KUBECONFIG: kubeconfig } : {}) };
    const run = spawnSync(helmBin, args, { encoding: 'utf8', env, maxBuffer: 64 << 20 });
    if (run.status !== 0) throw new Error(`helm ${args.join(' ')} exited ${run.status}:\n${run.stdout}${run.stderr}`);
    return run.stdout;
  }

  function render(args: string[] = [], namespace = 'poolkeeper-system'): KubeObject[] {
    return parseAllDocuments(helm(['template', 'poolkeeper', CHART, '--namespace', namespace, ...args])).map((d) => d.toJS() as KubeObject).filter(Boolean);
  }

  const id = (o: KubeObject): string => `${o.kind}/${o.metadata.namespace ?? ''}/${o.metadata.name}`;
  /** Objects sorted, without the labels only Helm adds, lists of named items as sets. */
  function comparable(objects: KubeObject[]): unknown[] {
    return objects.filter((o) => o.kind !== 'Namespace').map((o) => {
      const copy = structuredClone(o);
      for (const label of HELM_LABELS) delete copy.metadata.labels?.[label];
      if (copy.metadata.labels && Object.keys(copy.metadata.labels).length === 0) delete copy.metadata.labels;
      return canonical(copy);
    }).sort((a, b) => id(a as KubeObject).localeCompare(id(b as KubeObject)));
  }
  const deployment = (objects: KubeObject[]): { spec: { replicas: number; template: { spec: { containers: Container[] } } } } =>
    objects.find((o) => o.kind === 'Deployment') as unknown as { spec: { replicas: number; template: { spec: { containers: Container[] } } } };

  it('passes helm lint with default and with every option on', function () {
    assert.match(helm(['lint', '--strict', CHART]), /1 chart\(s\) linted, 0 chart\(s\) failed/);
    assert.match(helm(['lint', '--strict', CHART, '--set', 'monitoring.enabled=true,certManager.enabled=true,webhook.failurePolicy=Fail']), /0 chart\(s\) failed/);
  });

  it('renders what kustomize builds from deploy/, for each combination of cert-manager and monitoring', function () {
    const dir = mkdtempSync(join(tmpdir(), 'poolkeeper-overlay-'));
    try {
      // Both components at once is no example in deploy/: an overlay of our own.
      const up = relative(dir, process.cwd());
      writeFileSync(join(dir, 'kustomization.yaml'), `resources: [${up}/deploy/base, ${up}/deploy/cluster-lease]\ncomponents: [${up}/deploy/components/cert-manager, ${up}/deploy/components/monitoring]\n`);
      const variants: [string, string[], string][] = [
        ['deploy/', [], 'deploy'],
        ['with-cert-manager', ['--set', 'certManager.enabled=true'], 'deploy/examples/with-cert-manager'],
        ['with-monitoring', ['--set', 'monitoring.enabled=true'], 'deploy/examples/with-monitoring'],
        ['both', ['--set', 'certManager.enabled=true,monitoring.enabled=true'], dir],
      ];
      for (const [name, args, kustomization] of variants) {
        const chart = render(args);
        assert.deepEqual(comparable(chart), comparable(kustomize(kustomization, kubectlPath())), `helm template ${args.join(' ')} = kustomize ${name}`);
        for (const object of chart) assert.equal(object.metadata.labels?.['app.kubernetes.io/managed-by'], 'Helm', `${id(object)} carries the chart's labels`);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('puts the values where they belong: replicas, image, pull policy, resources, the controller\'s heap cap, failurePolicy, monitoring switches and labels', function () {
    const objects = render([
      '--set', 'replicas=3,image.repository=registry.example/poolkeeper,image.tag=1.2.3,image.pullPolicy=Always',
      '--set', 'resources.controller.limits.memory=1Gi,controllerHeapMegabytes=640,webhook.failurePolicy=Fail',
      '--set', 'monitoring.enabled=true,monitoring.dashboard=false,monitoring.labels.release=prometheus',
    ]);
    const spec = deployment(objects).spec;
    assert.equal(spec.replicas, 3);
    for (const container of spec.template.spec.containers) {
      assert.equal(container.image, 'registry.example/poolkeeper:1.2.3');
      assert.equal(container.imagePullPolicy, 'Always');
    }
    const [controller, webhook] = ['controller', 'webhook'].map((name) => spec.template.spec.containers.find((c) => c.name === name)!);
    assert.deepEqual(controller!.resources, { requests: { cpu: '50m', memory: '128Mi' }, limits: { memory: '1Gi' } });
    assert.deepEqual(webhook!.resources, { requests: { cpu: '20m', memory: '64Mi' }, limits: { memory: '128Mi' } });
    assert.equal(controller!.env.find((e) => e.name === 'NODE_OPTIONS')?.value, '--max-semi-space-size=2 --max-old-space-size=640', 'the heap cap follows the memory limit');
    assert.equal(webhook!.env.find((e) => e.name === 'POOLKEEPER_SIDECAR_IMAGE')?.value, 'registry.example/poolkeeper:1.2.3', 'the webhook injects the image it runs');
    assert.equal(webhook!.env.find((e) => e.name === 'POOLKEEPER_SIDECAR_RUN_AS_USER')?.value, '65532', 'the image\'s user by default');
    const platform = deployment(render(['--set', 'sidecar.runAsUser=platform'])).spec.template.spec.containers.find((c) => c.name === 'webhook')!;
    assert.equal(platform.env.find((e) => e.name === 'POOLKEEPER_SIDECAR_RUN_AS_USER')?.value, 'platform');
    assert.throws(() => render(['--set', 'sidecar.runAsUser=root']), /runAsUser/);
    const config = objects.find((o) => o.kind === 'MutatingWebhookConfiguration') as unknown as { webhooks: { failurePolicy: string }[] };
    assert.equal(config.webhooks[0]!.failurePolicy, 'Fail');
    assert.deepEqual(objects.filter((o) => o.kind === 'PodMonitor' || o.kind === 'PrometheusRule' || o.kind === 'ConfigMap').map(id).sort(),
      ['PodMonitor/poolkeeper-system/poolkeeper-controller', 'PodMonitor/poolkeeper-system/poolkeeper-sidecars', 'PrometheusRule/poolkeeper-system/poolkeeper']);
    for (const object of objects.filter((o) => o.kind === 'PodMonitor' || o.kind === 'PrometheusRule')) assert.equal(object.metadata.labels?.release, 'prometheus');
    assert.equal(deployment(render()).spec.template.spec.containers[0]!.imagePullPolicy, undefined, 'no pull policy by default: Kubernetes decides');
    assert.throws(() => render(['--set', 'webhook.failurePolicy=Sometimes']), /failurePolicy/);
  });

  it('installs into any namespace: every reference to poolkeeper-system follows the release namespace', function () {
    const objects = render(['--set', 'certManager.enabled=true,monitoring.enabled=true'], 'pooling');
    const text = JSON.stringify(objects);
    assert.doesNotMatch(text, /poolkeeper-system/);
    for (const object of objects.filter((o) => !['ClusterRole', 'ClusterRoleBinding', 'MutatingWebhookConfiguration'].includes(o.kind))) {
      // The one exception: access to the cluster-wide Lease, named after the release namespace.
      if (object.metadata.namespace === 'kube-system') assert.ok(['Role', 'RoleBinding'].includes(object.kind) && object.metadata.name === 'poolkeeper-controller-pooling', id(object));
      else assert.equal(object.metadata.namespace, 'pooling', id(object));
    }
    assert.match(text, /poolkeeper-webhook\.pooling\.svc/);
    assert.match(text, /"cert-manager\.io\/inject-ca-from":"pooling\/poolkeeper-webhook"/);
  });

  describe('on a kube-apiserver of its own', function () {
    let environment: LocalEnvironment;
    let kube: KubeControlPlane;

    before(async function () {
      environment = new LocalEnvironment({ keepRunDir: process.env.POOLKEEPER_KEEP_ENV === '1' });
      kube = await environment.kube();
    });

    after(async function () {
      await environment?.stop();
    });

    it('helm install creates the CRDs and every object, and the API server accepts them', function () {
      const out = helm(['install', 'poolkeeper', CHART, '--namespace', 'poolkeeper-system', '--create-namespace'], kube.kubeconfigPath);
      assert.match(out, /STATUS: deployed/);
      assert.match(kube.kubectl(['get', 'crd', 'databaseconnections.poolkeeper.dev', 'poolmembers.poolkeeper.dev', '-o', 'name']), /databaseconnections/);
      const created = JSON.parse(kube.kubectl(['get', 'deployment/poolkeeper', 'service/poolkeeper-webhook', 'serviceaccount/poolkeeper-controller', 'poddisruptionbudget/poolkeeper',
        'role/poolkeeper-controller', 'rolebinding/poolkeeper-controller', '-n', 'poolkeeper-system', '-o', 'json'])) as { items: KubeObject[] };
      assert.equal(created.items.length, 6);
      const live = created.items.find((o) => o.kind === 'Deployment') as unknown as { spec: { replicas: number; template: { spec: { containers: Container[] } } }; metadata: { annotations: Record<string, string> } };
      assert.equal(live.spec.replicas, 2);
      assert.equal(live.metadata.annotations['meta.helm.sh/release-name'], 'poolkeeper');
      assert.deepEqual(live.spec.template.spec.containers.map((c) => c.image), ['poolkeeper/poolkeeper:0.1.0', 'poolkeeper/poolkeeper:0.1.0']);
      const webhook = JSON.parse(kube.kubectl(['get', 'mutatingwebhookconfiguration/poolkeeper-webhook', '-o', 'json'])) as { webhooks: { failurePolicy: string }[] };
      assert.equal(webhook.webhooks[0]!.failurePolicy, 'Ignore');
      assert.match(kube.kubectl(['get', 'clusterrole/poolkeeper-controller', 'clusterrole/poolkeeper-sidecar', 'clusterrolebinding/poolkeeper-controller', '-o', 'name']), /poolkeeper-sidecar/);
      // The Deployment is real: the controller manager makes its ReplicaSet (its pods stay Pending: no node here).
      kube.kubectl(['wait', '--for=jsonpath={.status.replicas}=2', 'deployment/poolkeeper', '-n', 'poolkeeper-system', '--timeout=60s']);
    });

    it('helm upgrade applies non-default values, and the optional components install where their APIs exist', function () {
      // Stand-ins for the Prometheus Operator's and cert-manager's CRDs (their schemas are not
      // here): they let the API server store the objects, so this checks kinds, groups and
      // namespaces; the rules' content is checked by promtool in the unit tests.
      const standIns = [['monitoring.coreos.com', 'PodMonitor', 'podmonitors'], ['monitoring.coreos.com', 'PrometheusRule', 'prometheusrules'],
        ['cert-manager.io', 'Issuer', 'issuers'], ['cert-manager.io', 'Certificate', 'certificates']].map(([group, kind, plural]) => ({
        apiVersion: 'apiextensions.k8s.io/v1', kind: 'CustomResourceDefinition', metadata: { name: `${plural}.${group}` },
        spec: { group, scope: 'Namespaced', names: { kind, plural, singular: kind!.toLowerCase(), listKind: `${kind}List` },
          versions: [{ name: 'v1', served: true, storage: true, schema: { openAPIV3Schema: { type: 'object', 'x-kubernetes-preserve-unknown-fields': true } } }] },
      }));
      const file = join(home, 'stand-in-crds.json');
      mkdirSync(home, { recursive: true });
      writeFileSync(file, JSON.stringify({ apiVersion: 'v1', kind: 'List', items: standIns }));
      kube.kubectl(['apply', '-f', file]);
      kube.kubectl(['wait', '--for=condition=Established', '--timeout=60s', ...standIns.map((c) => `crd/${c.metadata.name}`)]);
      const out = helm(['upgrade', 'poolkeeper', CHART, '--namespace', 'poolkeeper-system', '--set', 'replicas=3,image.tag=0.2.0,image.pullPolicy=Always,webhook.failurePolicy=Fail',
        '--set', 'certManager.enabled=true,monitoring.enabled=true'], kube.kubeconfigPath);
      assert.match(out, /STATUS: deployed/);
      assert.match(out, /REVISION: 2/);
      const live = JSON.parse(kube.kubectl(['get', 'deployment/poolkeeper', '-n', 'poolkeeper-system', '-o', 'json'])) as { spec: { replicas: number; template: { spec: { containers: Container[] } } } };
      assert.equal(live.spec.replicas, 3);
      assert.ok(live.spec.template.spec.containers.every((c) => c.image === 'poolkeeper/poolkeeper:0.2.0' && c.imagePullPolicy === 'Always'));
      assert.equal(live.spec.template.spec.containers.find((c) => c.name === 'webhook')!.env.find((e) => e.name === 'POOLKEEPER_WEBHOOK_CERTIFICATES')?.value, 'files');
      assert.equal((JSON.parse(kube.kubectl(['get', 'mutatingwebhookconfiguration/poolkeeper-webhook', '-o', 'json'])) as { webhooks: { failurePolicy: string }[] }).webhooks[0]!.failurePolicy, 'Fail');
      const names = [...kube.kubectl(['get', 'podmonitors,prometheusrules,issuers,certificates', '-n', 'poolkeeper-system', '-o', 'name']).trim().split('\n'),
        kube.kubectl(['get', 'configmap', 'poolkeeper-dashboard', '-n', 'poolkeeper-system', '-o', 'name']).trim()].sort();
      assert.deepEqual(names, ['certificate.cert-manager.io/poolkeeper-webhook', 'configmap/poolkeeper-dashboard', 'issuer.cert-manager.io/poolkeeper-selfsigned',
        'podmonitor.monitoring.coreos.com/poolkeeper-controller', 'podmonitor.monitoring.coreos.com/poolkeeper-sidecars', 'prometheusrule.monitoring.coreos.com/poolkeeper']);
      helm(['uninstall', 'poolkeeper', '--namespace', 'poolkeeper-system'], kube.kubeconfigPath);
      assert.doesNotMatch(kube.kubectl(['get', 'deployments,podmonitors', '-n', 'poolkeeper-system', '-o', 'name']), /poolkeeper/);
    });
  });
});
