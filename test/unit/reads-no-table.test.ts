/**
 * When the controller concludes that a PoolMember's sidecar does not read its
 * grant table (and takes the PoolMember off it): only from a status without a
 * table generation written well after the PoolMember was created.
 */
import assert from 'node:assert/strict';
import type { PoolMember } from '../../src/api/index.ts';
import { readsNoTable, TABLE_ANSWER_GRACE_MS } from '../../src/controller/grant-tables.ts';

const CREATED = '2026-01-01T00:00:00Z';
const at = (ms: number): string => new Date(Date.parse(CREATED) + ms).toISOString().replace(/\.\d+Z$/, 'Z');

function member(status: PoolMember['status'], tableFrom: number | undefined = 3): PoolMember {
  return {
    apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'PoolMember',
    metadata: { name: 'web-1', namespace: 'app', creationTimestamp: new Date(CREATED) },
    spec: { connection: 'db', grant: { connections: 0, generation: 0 }, ...(tableFrom === undefined ? {} : { tableFrom }) },
    ...(status ? { status } : {}),
  } as PoolMember;
}

describe('readsNoTable', function () {
  it('a status without a table generation written after the grace: the sidecar does not read the table', function () {
    const m = member({ acknowledgedGeneration: 0, acknowledgedConnections: 0, heartbeatTime: at(TABLE_ANSWER_GRACE_MS + 1_000) });
    assert.equal(readsNoTable(m, m.spec.tableFrom), true);
  });

  it('a first status written within the grace may precede the table watch: not an answer yet', function () {
    const m = member({ acknowledgedGeneration: 0, acknowledgedConnections: 0, heartbeatTime: at(1_000) });
    assert.equal(readsNoTable(m, m.spec.tableFrom), false);
  });

  it('a status with a table generation, no status, or a PoolMember not on a table: no', function () {
    assert.equal(readsNoTable(member({ acknowledgedGeneration: 0, tableGeneration: 0, heartbeatTime: at(60_000) }), 3), false);
    assert.equal(readsNoTable(member(undefined), 3), false);
    assert.equal(readsNoTable(member({ acknowledgedGeneration: 0, heartbeatTime: at(60_000) }, undefined), undefined), false);
    // Nothing acknowledged yet: the sidecar has said nothing about its grant.
    assert.equal(readsNoTable(member({ heartbeatTime: at(60_000) }), 3), false);
  });
});
