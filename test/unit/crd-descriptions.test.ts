import assert from 'node:assert/strict';
import { customResourceDefinition, databaseConnectionCrdDefinition, databaseServerCrdDefinition, poolMemberCrdDefinition } from '../../src/api/crds.ts';

/** Paths of properties without a description (what `kubectl explain` would show empty). */
function undescribed(schema: unknown, path: string, out: string[]): string[] {
  if (schema === null || typeof schema !== 'object') return out;
  const node = schema as { properties?: Record<string, unknown>; items?: unknown; description?: unknown };
  for (const [name, child] of Object.entries(node.properties ?? {})) {
    const childPath = `${path}.${name}`;
    // Top-level metadata may carry nothing but its type; Kubernetes documents it.
    const exempt = path.indexOf('.') < 0 && name === 'metadata';
    if (!exempt && typeof (child as { description?: unknown }).description !== 'string') out.push(childPath);
    undescribed(child, childPath, out);
  }
  if (node.items) undescribed(node.items, `${path}[]`, out);
  return out;
}

describe('CRD field descriptions', function () {
  for (const definition of [databaseConnectionCrdDefinition, databaseServerCrdDefinition, poolMemberCrdDefinition]) {
    it(`every field of ${definition.kind} has a description`, function () {
      const crd = customResourceDefinition(definition) as { spec: { versions: Array<{ schema: { openAPIV3Schema: unknown } }> } };
      const missing = undescribed(crd.spec.versions[0]?.schema.openAPIV3Schema, definition.kind, []);
      assert.deepEqual(missing, []);
    });
  }
});
