import assert from 'node:assert/strict';
import { mkdtempSync, renameSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { MountedFile, type MountedFileKind } from '../../src/sidecar/mounted-file.ts';

/** Content is usable when it starts with "ok"; logs name its length only. */
const KIND: MountedFileKind = {
  what: 'test file',
  check(text) {
    if (!text.startsWith('ok')) throw new Error('not ok');
  },
  describe: (text) => ({ length: text.length }),
};

describe('MountedFile (a Secret volume file read again when it changes)', function () {
  let dir: string;
  let path: string;
  const logger = pino({ level: 'silent' });
  // As the kubelet updates a Secret volume: the new file is written aside and renamed over the old.
  const publish = (text: string): void => {
    writeFileSync(`${path}.tmp`, text);
    renameSync(`${path}.tmp`, path);
  };

  beforeEach(function () {
    dir = mkdtempSync(join(tmpdir(), 'poolkeeper-mounted-'));
    path = join(dir, 'file');
  });
  afterEach(function () {
    rmSync(dir, { recursive: true, force: true });
  });

  it('refuses a missing or unusable file at start, as a bad setting', function () {
    assert.throws(() => new MountedFile({ path, kind: KIND, logger }), /ENOENT/);
    publish('garbage');
    assert.throws(() => new MountedFile({ path, kind: KIND, logger }), /not ok/);
  });

  it('gives the new content once the file is replaced, keeps the last usable one while it is unusable or gone, and recovers', function () {
    publish('ok 1');
    const file = new MountedFile({ path, kind: KIND, logger });
    assert.equal(file.current(), 'ok 1');
    publish('ok two');
    assert.equal(file.current(), 'ok two');
    publish('half-writ');
    assert.equal(file.current(), 'ok two', 'an unusable file is not taken');
    unlinkSync(path);
    assert.equal(file.current(), 'ok two', 'nor a missing one');
    publish('ok 3');
    assert.equal(file.current(), 'ok 3');
  });
});
