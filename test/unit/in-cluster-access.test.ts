import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import type { RequestOptions } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { InClusterAccess } from '../../src/kube/in-cluster.ts';

describe('InClusterAccess (the sidecar reaches the API server without @kubernetes/client-node)', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'in-cluster-'));
    writeFileSync(join(dir, 'ca.crt'), 'CA PEM');
    writeFileSync(join(dir, 'token'), 'first-token\n');
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('names the server from the service variables, brackets an IPv6 address, and adds the CA and the bearer token', async () => {
    assert.equal(new InClusterAccess({ host: '10.96.0.1', port: '443', directory: dir }).getCurrentCluster().server, 'https://10.96.0.1:443');
    const access = new InClusterAccess({ host: 'fd00::1', port: '6443', directory: dir });
    assert.equal(access.getCurrentCluster().server, 'https://[fd00::1]:6443');
    const options: RequestOptions = { headers: { accept: 'application/json' } };
    await access.applyToHTTPSOptions(options);
    assert.equal(String(options.ca), 'CA PEM');
    assert.deepEqual(options.headers, { accept: 'application/json', authorization: 'Bearer first-token' });
  });

  it('reads the token again once a minute when the kubelet has rewritten it, and keeps the last one while the file is missing', async () => {
    let now = 1_000_000;
    const access = new InClusterAccess({ host: '10.96.0.1', port: '443', directory: dir }, () => now);
    const bearer = async (): Promise<string> => {
      const options: RequestOptions = {};
      await access.applyToHTTPSOptions(options);
      return String((options.headers as Record<string, string>).authorization);
    };
    writeFileSync(join(dir, 'token'), 'second-token');
    utimesSync(join(dir, 'token'), new Date(), new Date(Date.now() + 5000));
    now += 30_000;
    assert.equal(await bearer(), 'Bearer first-token', 'read again before a minute passed');
    now += 30_000;
    assert.equal(await bearer(), 'Bearer second-token');
    rmSync(join(dir, 'token'));
    now += 60_000;
    assert.equal(await bearer(), 'Bearer second-token');
  });

  it('refuses to start without the service variables or the ServiceAccount files, saying which', () => {
    assert.throws(() => new InClusterAccess({ host: '', port: '443', directory: dir }), /KUBERNETES_SERVICE_HOST/);
    assert.throws(() => new InClusterAccess({ host: '10.96.0.1', port: '443', directory: join(dir, 'missing') }), /ca\.crt/);
  });
});
