/**
 * Test programs written in Rust (test/drivers/<name>/: Cargo.toml, src/,
 * .cargo/config.toml): built offline from Debian's packaged crates
 * (/usr/share/cargo/registry, which the program's .cargo/config.toml puts in
 * place of crates.io), once per machine, into poolkeeper's build cache under
 * a key of their sources, so a test run after the first costs no build and
 * a changed program is built again. The build happens in a copy of the
 * sources, so the Cargo.lock it resolves stays out of the repository.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { homedir } from 'node:os';
import { delimiter, join, relative } from 'node:path';
import { cacheRoot } from '../../src/devenv/image.ts';
import { MissingPrerequisiteError } from '../../src/devenv/system.ts';

/** Where Debian's librust-*-dev packages put their crates. */
export const DEBIAN_CRATES = '/usr/share/cargo/registry';

const INSTALL_HINT = 'scripts/setup.sh installs cargo and the Debian crates (librust-tokio-postgres-dev and the others it names).';

function findCargo(): string {
  // rustup's cargo first where it is installed, then PATH (Debian's `cargo` package is /usr/bin/cargo).
  for (const dir of [join(homedir(), '.cargo', 'bin'), ...(process.env.PATH ?? '').split(delimiter)]) {
    if (dir !== '' && existsSync(join(dir, 'cargo'))) return join(dir, 'cargo');
  }
  throw new MissingPrerequisiteError('cargo', INSTALL_HINT);
}

/** Every file of the program's sources, relative to `dir`, in a stable order. */
function sourceFiles(dir: string): string[] {
  const files: string[] = [];
  const walk = (at: string): void => {
    for (const entry of readdirSync(at, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      const path = join(at, entry.name);
      if (entry.isDirectory()) {
        if (entry.name !== 'target') walk(path);
      } else if (entry.name !== 'Cargo.lock') {
        files.push(relative(dir, path));
      }
    }
  };
  walk(dir);
  return files;
}

/**
 * The binary of the Rust program in `dir`, built if the cache has none for
 * these sources. `crates` names the Debian crate directories the program
 * needs (`tokio-postgres-0.7`: a prefix of a directory in DEBIAN_CRATES);
 * without one of them, or without cargo, throws MissingPrerequisiteError. A
 * failed build throws with cargo's output.
 */
export async function cargoProgram(dir: string, name: string, crates: readonly string[]): Promise<string> {
  const hash = createHash('sha256');
  for (const file of sourceFiles(dir)) hash.update(file).update('\0').update(readFileSync(join(dir, file))).update('\0');
  const programs = join(cacheRoot(), 'cargo-programs');
  const home = join(programs, `${name}-${hash.digest('hex').slice(0, 16)}`);
  const binary = join(home, name);
  if (existsSync(binary)) return binary;
  const present = existsSync(DEBIAN_CRATES) ? readdirSync(DEBIAN_CRATES) : [];
  const absent = crates.filter((prefix) => !present.some((d) => d.startsWith(prefix)));
  if (absent.length > 0) throw new MissingPrerequisiteError(`the Debian crates ${absent.join(', ')} in ${DEBIAN_CRATES}`, INSTALL_HINT);
  const cargo = findCargo();
  mkdirSync(home, { recursive: true });
  // Built in a copy beside it and renamed: an interrupted build leaves no binary, two at once share no half-written one.
  const partial = mkdtempSync(join(home, 'partial-'));
  try {
    cpSync(dir, partial, { recursive: true, filter: (source) => !/[/\\](target|Cargo\.lock)$/.test(source) });
    await new Promise<void>((resolve, reject) => {
      // One target directory for every version of every program: a changed program does not build its crates again.
      execFile(cargo, ['build', '--offline', '--quiet', '--target-dir', join(programs, 'target')], {
        cwd: partial, timeout: 1_200_000, maxBuffer: 16 << 20, env: { ...process.env, CARGO_TERM_COLOR: 'never' },
      }, (error, _stdout, stderr) => (error === null ? resolve() : reject(new Error(`cargo build of ${dir} failed: ${stderr || error.message}`))));
    });
    renameSync(join(programs, 'target', 'debug', name), binary);
  } finally {
    rmSync(partial, { recursive: true, force: true });
  }
  return binary;
}
