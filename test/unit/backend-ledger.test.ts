/**
 * The backend ledger on a real file system: what one sidecar process saves,
 * the next one in the pod loads; a torn or foreign file loses nothing but
 * the ledger itself.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { BackendLedger } from '../../src/sidecar/backend-ledger.ts';

describe('backend ledger', function () {
  let dir: string;
  const logger = pino({ level: 'silent' });

  beforeEach(function () {
    dir = mkdtempSync(join(tmpdir(), 'poolkeeper-ledger-'));
  });

  afterEach(function () {
    rmSync(dir, { recursive: true, force: true });
  });

  it('hands what one process saved to the next, and leaves no temporary file', function () {
    const path = join(dir, 'state', 'backends.json');
    const first = new BackendLedger(path, logger);
    assert.deepEqual(first.load(), []);
    first.save([{ processId: 101, secretKey: -7, createdAt: 1_700_000_000_000 }, { processId: 102, secretKey: 9, createdAt: 1_700_000_000_500 }]);
    first.save([{ processId: 102, secretKey: 9, createdAt: 1_700_000_000_500 }]);
    assert.deepEqual(new BackendLedger(path, logger).load(), [{ processId: 102, secretKey: 9, createdAt: 1_700_000_000_500 }]);
    assert.deepEqual(readdirSync(join(dir, 'state')), ['backends.json']);
  });

  it('starts empty from a torn or foreign file, keeping only well-formed records', function () {
    const path = join(dir, 'backends.json');
    writeFileSync(path, '[{"processId": 5, "secretKey": 1, "created');
    assert.deepEqual(new BackendLedger(path, logger).load(), []);
    writeFileSync(path, JSON.stringify([{ processId: 5, secretKey: 1, createdAt: 3 }, { processId: 'x' }, null, { processId: 6.5, secretKey: 1, createdAt: 3 }]));
    assert.deepEqual(new BackendLedger(path, logger).load(), [{ processId: 5, secretKey: 1, createdAt: 3 }]);
  });

  it('keeps serving when the file cannot be written', function () {
    const ledger = new BackendLedger(join(dir, 'missing', 'x', 'backends.json'), logger);
    rmSync(dir, { recursive: true, force: true });
    writeFileSync(dir, 'a file where the directory should be');
    assert.doesNotThrow(() => ledger.save([{ processId: 1, secretKey: 1, createdAt: 1 }]));
    rmSync(dir, { force: true });
    dir = mkdtempSync(join(tmpdir(), 'poolkeeper-ledger-'));
  });
});
