import assert from 'node:assert/strict';
import { decideServerLimit, groupServers } from '../../src/core/tenancy/index.ts';

describe('tenancy: server identity and limit ownership', function () {
  it('groups a name with the IP addresses it resolves to, on the same port only', function () {
    const keys = groupServers([
      { id: 'a/db', rawKey: 'localhost:5432', port: 5432, via: '', addresses: ['127.0.0.1', '::1'] },
      { id: 'b/db', rawKey: '127.0.0.1:5432', port: 5432, via: '', addresses: ['127.0.0.1'] },
      { id: 'c/db', rawKey: '127.0.0.1:5433', port: 5433, via: '', addresses: ['127.0.0.1'] },
      { id: 'd/db', rawKey: 'db.internal:5432', port: 5432, via: '', addresses: [] },
    ]);
    assert.equal(keys.get('a/db'), '127.0.0.1:5432');
    assert.equal(keys.get('b/db'), '127.0.0.1:5432');
    assert.equal(keys.get('c/db'), '127.0.0.1:5433');
    assert.equal(keys.get('d/db'), 'db.internal:5432');
  });

  it('keeps an address behind a bastion apart from the same address reached directly', function () {
    const keys = groupServers([
      { id: 'a/db', rawKey: '127.0.0.1:5432', port: 5432, via: 'ssh://t@bastion:22', addresses: [] },
      { id: 'b/db', rawKey: '127.0.0.1:5432', port: 5432, via: '', addresses: ['127.0.0.1'] },
      { id: 'c/db', rawKey: '127.0.0.1:5432', port: 5432, via: 'ssh://t@bastion:22', addresses: [] },
    ]);
    assert.equal(keys.get('a/db'), 'ssh://t@bastion:22/127.0.0.1:5432');
    assert.equal(keys.get('c/db'), keys.get('a/db'));
    assert.equal(keys.get('b/db'), '127.0.0.1:5432');
  });

  it('the first DatabaseConnection sets the limit; a newer one can neither lower nor raise it, and is told both values and who set it', function () {
    const decision = decideServerLimit([
      { id: 'team-b/db', created: '2026-01-02T00:00:00Z', effective: 0, discovered: 10, reserve: 10 },
      { id: 'team-a/db', created: '2026-01-01T00:00:00Z', effective: 51, discovered: 60, reserve: 9 },
      { id: 'team-c/db', created: '2026-01-03T00:00:00Z', effective: 51, discovered: 60, reserve: 9 },
    ]);
    assert.equal(decision.limit, 51);
    assert.equal(decision.owner, 'team-a/db');
    const b = decision.conditions.get('team-b/db');
    assert.equal(b?.status, 'True');
    assert.match(b?.message ?? '', /asks for a limit of 0 \(maxConnections 10 - reserve 10\), which would lower every DatabaseConnection's budget.*the limit stays 51 \(maxConnections 60 - reserve 9\), set by DatabaseConnection team-a\/db/);
    assert.equal(decision.conditions.get('team-c/db')?.status, 'False');
    assert.match(decision.conditions.get('team-a/db')?.message ?? '', /sets the server's limit 51.*team-b\/db 0/);
  });

  it('ignores connections whose limit is unknown, and has no limit when none is known', function () {
    assert.equal(decideServerLimit([{ id: 'a/x', created: '2026-01-01T00:00:00Z', effective: undefined, discovered: undefined, reserve: undefined }]).limit, undefined);
    assert.equal(decideServerLimit([
      { id: 'a/x', created: '2026-01-01T00:00:00Z', effective: undefined, discovered: undefined, reserve: undefined },
      { id: 'b/x', created: '2026-01-02T00:00:00Z', effective: 20, discovered: 20, reserve: 0 },
    ]).limit, 20);
  });
});
