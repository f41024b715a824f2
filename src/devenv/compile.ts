/**
 * TypeScript entry points compiled with tsc for the benchmarks and fault
 * runs: a process measured for memory or CPU should run JavaScript, as the
 * image does, not Node's type stripping (which alone adds tens of MB of RSS
 * to a process).
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';

const REPO = new URL('../../', import.meta.url).pathname;

/**
 * Compiles `entries` (paths relative to the repository) and what they import
 * into `outDir`, which must be inside the repository so that node_modules
 * resolve, and returns the JavaScript file of each entry.
 */
export function compileEntries(entries: readonly string[], outDir: string): string[] {
  mkdirSync(outDir, { recursive: true });
  const config = join(outDir, 'tsconfig.json');
  const fromOut = (path: string): string => relative(outDir, join(REPO, path));
  writeFileSync(config, JSON.stringify({
    extends: fromOut('tsconfig.json'),
    compilerOptions: { noEmit: false, rootDir: fromOut('.'), outDir: '.', types: ['node'], sourceMap: false, declaration: false },
    files: entries.map(fromOut),
    include: [],
  }));
  execFileSync(process.execPath, [join(REPO, 'node_modules/typescript/bin/tsc'), '-p', config], { stdio: 'inherit' });
  return entries.map((entry) => join(outDir, entry.replace(/\.ts$/, '.js')));
}

/** Where compiled entries go: a directory of the repository that git ignores. */
export function compiledDir(name: string): string {
  return join(REPO, '.build-test', name);
}
