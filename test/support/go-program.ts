/**
 * Test programs written in Go (test/drivers/<name>/, a module of their own):
 * built once per machine into poolkeeper's build cache, under a key of their
 * sources, so a test run after the first costs no build and a changed
 * program is built again.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { cacheRoot } from '../../src/devenv/image.ts';
import { MissingPrerequisiteError } from '../../src/devenv/system.ts';

/** Where Go is when it is not on PATH (scripts/setup.sh installs it there). */
const GO_ROOT_BIN = '/usr/local/go/bin';

function findGo(): string {
  for (const dir of [...(process.env.PATH ?? '').split(delimiter), GO_ROOT_BIN]) {
    if (dir !== '' && existsSync(join(dir, 'go'))) return join(dir, 'go');
  }
  throw new MissingPrerequisiteError('go', 'Install Go >= 1.26 (scripts/setup.sh puts it in /usr/local/go).');
}

/**
 * The binary of the Go program in `dir` (its go.mod, go.sum and .go files),
 * built if the cache has none for these sources. Throws
 * MissingPrerequisiteError without Go; a failed build throws with Go's output.
 */
export async function goProgram(dir: string, name: string): Promise<string> {
  const hash = createHash('sha256');
  for (const file of readdirSync(dir).filter((f) => f === 'go.mod' || f === 'go.sum' || f.endsWith('.go')).sort()) {
    hash.update(file).update('\0').update(readFileSync(join(dir, file))).update('\0');
  }
  const home = join(cacheRoot(), 'go-programs', `${name}-${hash.digest('hex').slice(0, 16)}`);
  const binary = join(home, name);
  if (existsSync(binary)) return binary;
  const go = findGo();
  mkdirSync(home, { recursive: true });
  // Built beside it and renamed: an interrupted build leaves no binary, two at once share no half-written one.
  const partial = mkdtempSync(join(home, 'partial-'));
  try {
    await new Promise<void>((resolve, reject) => {
      execFile(go, ['build', '-trimpath', '-o', join(partial, name), '.'], {
        cwd: dir, timeout: 600_000, env: { ...process.env, GOFLAGS: '-mod=readonly -buildvcs=false', GOWORK: 'off', CGO_ENABLED: '0' },
      }, (error, _stdout, stderr) => (error === null ? resolve() : reject(new Error(`go build of ${dir} failed: ${stderr || error.message}`))));
    });
    renameSync(join(partial, name), binary);
  } finally {
    rmSync(partial, { recursive: true, force: true });
  }
  return binary;
}
