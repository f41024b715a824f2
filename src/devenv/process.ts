/**
 * Child processes of the local environment: started in their own process
 * group, logged to a file, stopped with SIGTERM then SIGKILL, and recorded in
 * a pid file so a later run can reap what a killed run left behind.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, readFileSync, readdirSync, rmSync, writeFileSync, appendFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { tmpdir } from 'node:os';

/** How to start one managed process. */
export interface ProcessSpec {
  name: string;
  command: string;
  args: string[];
  logFile: string;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  uid?: number;
  gid?: number;
}

/** A running child of the environment. */
export class ManagedProcess {
  readonly name: string;
  readonly logFile: string;
  private readonly child: ChildProcess;
  private exited: Promise<number | null>;
  private exitCode: number | null | undefined;

  private constructor(spec: ProcessSpec, child: ChildProcess) {
    this.name = spec.name;
    this.logFile = spec.logFile;
    this.child = child;
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitCode = code ?? (signal ? -1 : null);
        resolve(code);
      });
      child.once('error', () => {
        this.exitCode = -1;
        resolve(-1);
      });
    });
  }

  /** Starts `spec` detached (own process group) with stdout and stderr in its log file. */
  static start(spec: ProcessSpec, registry: PidRegistry): ManagedProcess {
    const log = createWriteStream(spec.logFile, { flags: 'a' });
    const child = spawn(spec.command, spec.args, {
      cwd: spec.cwd,
      env: spec.env ?? process.env,
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
      ...(spec.uid !== undefined ? { uid: spec.uid } : {}),
      ...(spec.gid !== undefined ? { gid: spec.gid } : {}),
    });
    child.stdout?.pipe(log);
    child.stderr?.pipe(log);
    if (child.pid !== undefined) registry.add(child.pid);
    return new ManagedProcess(spec, child);
  }

  /** The OS pid, if the process started. */
  get pid(): number | undefined {
    return this.child.pid;
  }

  /** True while the process has not exited. */
  get running(): boolean {
    return this.exitCode === undefined;
  }

  /** The last lines of the log, for error messages. */
  tail(lines = 30): string {
    try {
      return readFileSync(this.logFile, 'utf8').split('\n').slice(-lines).join('\n');
    } catch {
      return '';
    }
  }

  /** Sends `signal` to the whole process group. */
  signal(signal: NodeJS.Signals): void {
    if (this.child.pid === undefined || !this.running) return;
    try {
      process.kill(-this.child.pid, signal);
    } catch {
      // already gone
    }
  }

  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the process has exited. */
  async stop(graceMs = 5000): Promise<void> {
    if (!this.running) return;
    this.signal('SIGTERM');
    const timer = setTimeout(() => this.signal('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(timer);
  }

  /** Resolves with the exit code when the process exits. */
  waitForExit(): Promise<number | null> {
    return this.exited;
  }
}

/** Polls `check` until it returns true, failing with the process log if it exits or time runs out. */
export async function waitUntil(what: string, check: () => Promise<boolean>, options: { timeoutMs: number; process?: ManagedProcess; intervalMs?: number }): Promise<void> {
  const deadline = Date.now() + options.timeoutMs;
  let lastError: unknown;
  for (;;) {
    if (options.process && !options.process.running) {
      throw new Error(`${what}: process exited early; log ${options.process.logFile}:\n${options.process.tail()}`);
    }
    try {
      if (await check()) return;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() > deadline) {
      const detail = lastError instanceof Error ? ` (last error: ${lastError.message})` : '';
      const log = options.process ? `\nlog ${options.process.logFile}:\n${options.process.tail()}` : '';
      throw new Error(`${what}: not ready after ${options.timeoutMs} ms${detail}${log}`);
    }
    await new Promise((r) => setTimeout(r, options.intervalMs ?? 100));
  }
}

/** Resident set size of process `pid` in MB (VmRSS from /proc); undefined once it is gone. */
export function processRssMb(pid: number): number | undefined {
  try {
    const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Number(match[1]) / 1024 : undefined;
  } catch {
    return undefined;
  }
}

/** Returns a TCP port that was free on 127.0.0.1 a moment ago. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

const RUN_PREFIX = 'poolkeeper-env-';

/**
 * Records the pids of one environment run in `<dir>/pids`, so that a run
 * killed with SIGKILL leaves enough behind for the next run to clean up.
 */
export class PidRegistry {
  private readonly file: string;
  readonly runDir: string;

  constructor(runDir: string) {
    this.runDir = runDir;
    this.file = join(runDir, 'pids');
    writeFileSync(join(runDir, 'owner'), String(process.pid));
  }

  /** Remembers a child pid (its process group). */
  add(pid: number): void {
    appendFileSync(this.file, `${pid}\n`);
  }

  /** Kills every recorded process group at once; safe in an `exit` handler. */
  killAllSync(): void {
    for (const pid of readPids(this.file)) {
      try {
        process.kill(-pid, 'SIGKILL');
      } catch {
        // gone already
      }
    }
  }
}

function readPids(file: string): number[] {
  if (!existsSync(file)) return [];
  return readFileSync(file, 'utf8').split('\n').filter(Boolean).map(Number).filter((n) => n > 0);
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Kills the processes and removes the directories of earlier runs whose owner is dead. */
export function reapAbandonedRuns(root = tmpdir()): number {
  let reaped = 0;
  for (const entry of readdirSync(root)) {
    if (!entry.startsWith(RUN_PREFIX)) continue;
    const dir = join(root, entry);
    const ownerFile = join(dir, 'owner');
    if (!existsSync(ownerFile)) continue;
    const owner = Number(readFileSync(ownerFile, 'utf8'));
    if (owner === process.pid || isAlive(owner)) continue;
    for (const pid of readPids(join(dir, 'pids'))) {
      try {
        process.kill(-pid, 'SIGKILL');
      } catch {
        // gone already
      }
    }
    rmSync(dir, { recursive: true, force: true });
    reaped += 1;
  }
  return reaped;
}

/** The prefix of every run directory under the temp dir. */
export const RUN_DIR_PREFIX = RUN_PREFIX;
