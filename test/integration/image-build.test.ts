/**
 * What the Dockerfile does, short of Docker (no engine here): compile
 * src/ with tsconfig.build.json and run the image's entry point from the
 * output, so a broken build or an import that only type stripping tolerates
 * is caught.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';

describe('image build', function () {
  this.timeout(180_000);
  let outDir: string;

  before(function () {
    // Inside the repository, so that the output resolves node_modules as /app/dist does in the image.
    outDir = join(process.cwd(), '.build-test');
    rmSync(outDir, { recursive: true, force: true });
  });

  after(function () {
    rmSync(outDir, { recursive: true, force: true });
  });

  it('compiles with tsconfig.build.json and the entry point runs from the output', function () {
    const build = spawnSync('node_modules/.bin/tsc', ['-p', 'tsconfig.build.json', '--outDir', outDir], { encoding: 'utf8' });
    assert.equal(build.status, 0, `tsc failed:\n${build.stdout}${build.stderr}`);
    const help = spawnSync(process.execPath, [join(outDir, 'bin', 'poolkeeper.js'), '--help'], { encoding: 'utf8' });
    assert.equal(help.status, 0, help.stderr);
    assert.match(help.stdout, /usage: poolkeeper <command>[^]*controller[^]*webhook[^]*sidecar/);
    const sidecar = spawnSync(process.execPath, [join(outDir, 'bin', 'poolkeeper.js'), 'sidecar'], { encoding: 'utf8', env: { PATH: process.env.PATH } });
    assert.equal(sidecar.status, 2, 'a sidecar without its pod identity refuses to start');
    assert.match(sidecar.stdout + sidecar.stderr, /POOLKEEPER_POD_NAMESPACE is required/);
  });
});
