/**
 * Memory of the binaries: `poolkeeper sidecar` must not load
 * @kubernetes/client-node (about 78 MB of RSS on its own, against the
 * sidecar's 128Mi limit) nor ssh2 before a tunnel needs it, and
 * `poolkeeper controller` must not load the client library either (its
 * Deployment's limit is 256Mi at any fleet size). Checked on the
 * static import graph: what `import ... from` loads at start (type-only
 * imports are erased, dynamic imports load on demand).
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';

/** The packages loaded at start by `entry` and the relative modules it imports, following relative imports. */
function staticPackages(entry: string): { packages: Set<string>; modules: Set<string> } {
  const packages = new Set<string>();
  const modules = new Set<string>();
  const visit = (file: string): void => {
    if (modules.has(file)) return;
    modules.add(file);
    const source = readFileSync(file, 'utf8');
    // `import x from '...'`, `import { a, type b } from '...'`, `export ... from '...'`; not `import type`.
    for (const match of source.matchAll(/^(?:import|export)\s+(?!type\s)(?:[^'";]*?\sfrom\s+)?'([^']+)';/gm)) {
      const specifier = match[1]!;
      if (specifier.startsWith('.')) visit(resolve(dirname(file), specifier));
      else if (!specifier.startsWith('node:')) packages.add(specifier.startsWith('@') ? specifier.split('/').slice(0, 2).join('/') : specifier.split('/')[0]!);
    }
  };
  visit(resolve(entry));
  return { packages, modules };
}

describe('what the binaries load', () => {
  it('poolkeeper and its sidecar command load neither @kubernetes/client-node nor ssh2 at start', () => {
    for (const entry of ['src/bin/poolkeeper.ts', 'src/bin/sidecar-main.ts', 'src/kube/in-cluster.ts']) {
      const { packages, modules } = staticPackages(entry);
      assert.ok(modules.size > 1 || entry.endsWith('in-cluster.ts'), `${entry}: the walk found no imports`);
      assert.ok(!packages.has('@kubernetes/client-node'), `${entry} loads @kubernetes/client-node`);
      assert.ok(!packages.has('ssh2'), `${entry} loads ssh2`);
    }
  });

  it('the controller command loads no @kubernetes/client-node at start', () => {
    const { packages, modules } = staticPackages('src/bin/controller-main.ts');
    assert.ok(modules.size > 10, 'the walk found the controller modules');
    assert.ok(!packages.has('@kubernetes/client-node'), 'src/bin/controller-main.ts loads @kubernetes/client-node');
  });

  it('the walk does see a package loaded at start (the check can fail)', () => {
    assert.ok(staticPackages('src/webhook/runtime.ts').packages.has('@kubernetes/client-node'));
    assert.ok(staticPackages('src/bin/sidecar-main.ts').packages.has('pino') || staticPackages('src/sidecar/sidecar.ts').packages.has('prom-client'));
  });
});
