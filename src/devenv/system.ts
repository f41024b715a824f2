/**
 * Facts about the host that the local environment depends on: which
 * binaries exist, and which unprivileged account runs servers that refuse root.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

/** An unprivileged account to run PostgreSQL and PgBouncer as when we are root. */
export interface ServiceAccountIds {
  uid: number;
  gid: number;
  name: string;
}

/** Thrown when a prerequisite is missing; the message says how to get it. */
export class MissingPrerequisiteError extends Error {
  constructor(what: string, howToGet: string) {
    super(`missing prerequisite: ${what}. ${howToGet}`);
    this.name = 'MissingPrerequisiteError';
  }
}

/** The account servers run as: ourselves when not root, else `postgres` (or `nobody`). */
export function serviceAccount(): ServiceAccountIds | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const passwd = readFileSync('/etc/passwd', 'utf8').split('\n');
  for (const name of ['postgres', 'nobody']) {
    const line = passwd.find((l) => l.startsWith(`${name}:`));
    if (!line) continue;
    const [, , uid, gid] = line.split(':');
    return { name, uid: Number(uid), gid: Number(gid) };
  }
  throw new MissingPrerequisiteError('an unprivileged user (postgres or nobody)', 'Install PostgreSQL with `npm run setup`, which creates the postgres user.');
}

/** Finds the newest PostgreSQL server bin directory from Debian's packages. */
export function postgresBinDir(): string {
  const root = '/usr/lib/postgresql';
  const versions = existsSync(root) ? readdirSync(root).filter((v) => existsSync(join(root, v, 'bin', 'postgres'))) : [];
  versions.sort((a, b) => Number(b) - Number(a));
  const newest = versions[0];
  if (!newest) throw new MissingPrerequisiteError('PostgreSQL server binaries under /usr/lib/postgresql', 'Run `npm run setup` (as root it runs `apt-get install postgresql`).');
  return join(root, newest, 'bin');
}

/** Returns the absolute path of `binary`, or throws a MissingPrerequisiteError naming the package. */
export function requireBinary(binary: string, debianPackage: string, candidates: string[] = []): string {
  for (const path of candidates) if (existsSync(path)) return path;
  try {
    return execFileSync('sh', ['-c', `command -v ${binary}`], { encoding: 'utf8' }).trim();
  } catch {
    throw new MissingPrerequisiteError(`${binary}`, `Run \`npm run setup\` (as root it runs \`apt-get install ${debianPackage}\`).`);
  }
}

/** Runs a command and returns stdout and stderr together, trimmed (`ssh -V` prints to stderr). */
export function commandOutput(command: string, args: string[]): string {
  const result = spawnSync(command, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  return `${result.stdout ?? ''}${result.stderr ?? ''}`.trim();
}
