/**
 * crds/*.yaml is generated from src/api/ and must not drift from it; the
 * inferred types follow the schema.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parse } from 'yaml';
import { renderCrdFiles, toStructuralSchema, type DatabaseConnectionSpec, type PoolMemberSpec } from '../../src/api/index.ts';

const root = join(import.meta.dirname, '..', '..');

/** Every sub-schema of a structural schema, with its path. */
function* schemasIn(schema: unknown, path = ''): Generator<[string, Record<string, unknown>]> {
  if (schema === null || typeof schema !== 'object') return;
  const node = schema as Record<string, unknown>;
  yield [path, node];
  for (const [name, child] of Object.entries((node.properties ?? {}) as Record<string, unknown>)) yield* schemasIn(child, `${path}.${name}`);
  if (node.items) yield* schemasIn(node.items, `${path}[]`);
  if (typeof node.additionalProperties === 'object') yield* schemasIn(node.additionalProperties, `${path}{}`);
}

describe('CRDs', function () {
  for (const file of renderCrdFiles()) {
    it(`${file.path} is what scripts/gen-crds.ts generates (run: node scripts/gen-crds.ts)`, function () {
      assert.equal(readFileSync(join(root, file.path), 'utf8'), file.content);
    });

    it(`${file.path} is a structural schema: no additionalProperties next to properties`, function () {
      const crd = parse(file.content) as { spec: { versions: { schema: { openAPIV3Schema: unknown } }[] } };
      for (const [path, node] of schemasIn(crd.spec.versions[0]!.schema.openAPIV3Schema)) {
        assert.ok(!(node.properties && 'additionalProperties' in node), `${path} has both`);
      }
    });
  }

  it('drops additionalProperties: false only, keeping enums, defaults and rules verbatim', function () {
    const out = toStructuralSchema({
      type: 'object', additionalProperties: false,
      properties: { a: { type: 'object', additionalProperties: { type: 'string' } }, b: { enum: ['x'], default: { additionalProperties: false } } },
    });
    assert.deepEqual(out, { type: 'object', properties: { a: { type: 'object', additionalProperties: { type: 'string' } }, b: { enum: ['x'], default: { additionalProperties: false } } } });
  });

  it('infers the TypeScript types from the schemas', function () {
    // Compile-time checks: these assignments fail `tsc` if the inference drifts.
    const spec: DatabaseConnectionSpec = {
      database: { host: 'h', port: 5432, dbname: 'd', sslMode: 'prefer', channelBinding: 'prefer', credentialsSecretRef: { name: 's', usernameKey: 'u', passwordKey: 'p' } },
      maxConnections: 'auto', reserve: '15%', departureHoldSeconds: 60, budgetStrategy: 'MaxReplicas',
      consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, weight: 1, minPerPod: 0, processesPerPod: 1 }],
      pool: { mode: 'session', poolTimeout: 1, poolRecycle: -1, poolPrePing: false, idleTimeout: 1 },
      sidecar: { port: 6432, drainTimeout: 0, clientTLS: 'SelfSigned' },
    };
    // @ts-expect-error sslMode is an enum
    const badMode: DatabaseConnectionSpec['database']['sslMode'] = 'on';
    const grant: PoolMemberSpec['grant'] = { connections: 1, generation: 2 };
    assert.ok(spec && grant && badMode);
  });
});
