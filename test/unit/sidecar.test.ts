/**
 * Pure helpers of the sidecar: host key matching, loopback detection, and
 * reading a kubelet-style Secret directory through its `..data` symlink.
 */
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync, renameSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { credentialsGeneration } from '../../src/core/credentials.ts';
import { hostKeyMatches, isLoopbackAddress, readCredentialsDirectory, sshFingerprint } from '../../src/sidecar/index.ts';

describe('sidecar helpers', function () {
  it('matches a host key by key line or SHA256 fingerprint, and refuses others', function () {
    const blob = Buffer.from('0000000b7373682d656432353531390000002001020304050607080910111213141516171819202122232425262728293031', 'hex');
    const line = `ssh-ed25519 ${blob.toString('base64')}`;
    assert.equal(hostKeyMatches(line, blob), true);
    assert.equal(hostKeyMatches(`${line} comment`, blob), true);
    assert.equal(hostKeyMatches(sshFingerprint(blob), blob), true);
    const other = Buffer.from(blob);
    other[other.length - 1] = 0;
    assert.equal(hostKeyMatches(line, other), false);
    assert.equal(hostKeyMatches(sshFingerprint(blob), other), false);
    assert.equal(hostKeyMatches('garbage', blob), false);
  });

  it('recognises loopback peers only', function () {
    for (const a of ['127.0.0.1', '127.1.2.3', '::1', '::ffff:127.0.0.1']) assert.equal(isLoopbackAddress(a), true, a);
    for (const a of ['10.0.0.1', '::ffff:10.0.0.1', '192.168.1.1', 'fe80::1', undefined]) assert.equal(isLoopbackAddress(a), false, String(a));
  });

  it('reads credentials through ..data and follows an atomic symlink swap', function () {
    const dir = mkdtempSync(join(tmpdir(), 'poolkeeper-secret-'));
    try {
      const write = (name: string, user: string, password: string): void => {
        mkdirSync(join(dir, name));
        writeFileSync(join(dir, name, 'username'), user);
        writeFileSync(join(dir, name, 'password'), password);
      };
      write('..2026_1', 'app', 'one');
      symlinkSync('..2026_1', join(dir, '..data'));
      symlinkSync('..data/username', join(dir, 'username'));
      symlinkSync('..data/password', join(dir, 'password'));
      const first = readCredentialsDirectory(dir);
      assert.deepEqual(first, { username: 'app', password: 'one', generation: credentialsGeneration({ username: 'app', password: 'one' }) });
      write('..2026_2', 'app', 'two');
      symlinkSync('..2026_2', join(dir, '..data_tmp'));
      renameSync(join(dir, '..data_tmp'), join(dir, '..data'));
      const second = readCredentialsDirectory(dir);
      assert.equal(second.password, 'two');
      assert.notEqual(second.generation, first.generation);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
