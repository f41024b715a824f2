/**
 * The Helm chart against its sources: its templates are what charts/generate.ts
 * makes of deploy/ now, and its crds/ are the CustomResourceDefinitions of crds/.
 * Rendering and installing it is test/integration/helm.test.ts.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { parse } from 'yaml';
import { differences, generate, generatedOnDisk, kubectlPath } from '../../charts/generate.ts';

describe('Helm chart sources', function () {
  // Three kustomize builds: seconds, but a loaded machine stretches them.
  this.timeout(120_000);
  let generated: Map<string, string>;

  before(function () {
    if (!existsSync(kubectlPath())) {
      console.log(`      skipped: the pinned kubectl is not built (${kubectlPath()}); run bash scripts/setup.sh`);
      this.skip();
    }
    generated = generate();
  });

  it('has the templates charts/generate.ts makes of deploy/ (run `node charts/generate.ts` after changing deploy/)', function () {
    assert.deepEqual(differences(generated, generatedOnDisk()), [], 'charts/poolkeeper differs from deploy/ in these files: run node charts/generate.ts');
  });

  it('ships in its crds/ every CustomResourceDefinition of crds/, byte for byte, and nothing else', function () {
    const crds = readdirSync('crds').filter((f) => (parse(readFileSync(join('crds', f), 'utf8')) as { kind: string }).kind === 'CustomResourceDefinition').sort();
    assert.ok(crds.length >= 2);
    assert.deepEqual(readdirSync('charts/poolkeeper/crds').sort(), crds);
    for (const file of crds) assert.equal(readFileSync(join('charts/poolkeeper/crds', file), 'utf8'), readFileSync(join('crds', file), 'utf8'), file);
  });

  it('notices a change: a template edited by hand is a difference', function () {
    const onDisk = generatedOnDisk();
    const [path, text] = [...onDisk.entries()].find(([p]) => p.startsWith('templates/deployment-'))!;
    onDisk.set(path, text.replace('replicas: {{ .Values.replicas }}', 'replicas: 3'));
    assert.deepEqual(differences(generated, onDisk), [path]);
  });
});
