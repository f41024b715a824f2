/**
 * The parent's handle on a sidecar run in a child process (sidecar-child.ts):
 * started in its own process group so a SIGKILL takes it whole and nothing is
 * left behind, with its log in a file, its RSS read from /proc, and grant,
 * drain and status passed over IPC.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { sidecarNodeOptions } from '../../src/core/inject/index.ts';
import { DEFAULT_INJECTOR_SETTINGS } from '../../src/core/inject/model.ts';
import { compileEntries, compiledDir } from '../../src/devenv/compile.ts';
import { processRssMb } from '../../src/devenv/process.ts';
import type { SidecarSettings } from '../../src/sidecar/index.ts';
import type { FromChild, ToChild } from './sidecar-child.ts';

const CHILD_ENTRY = new URL('./sidecar-child.ts', import.meta.url).pathname;
/**
 * The child compiled (with the src/ it imports) into `outDir`: a sidecar as
 * the image runs it, not through Node's type stripping. Returns its entry.
 */
export function buildChildSidecar(outDir = compiledDir('chaos')): string {
  return compileEntries(['test/support/sidecar-child.ts'], outDir)[0]!;
}

/** Every child started and not yet reaped, killed if this process exits first. */
const live = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of live) {
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      // gone already
    }
  }
});

/** How to start one child sidecar. */
export interface SidecarProcessOptions {
  settings: SidecarSettings;
  credentialsDir: string;
  grant: number;
  logFile: string;
  /** Kept across restarts, as a pod's emptyDir is. */
  stateDir?: string;
  /** The child's entry: sidecar-child.ts (default), or its compiled form from buildChildSidecar. */
  entry?: string;
}

/** A running child sidecar. */
export class SidecarProcess {
  readonly port: number;
  /** The admin HTTP server's port (/metrics), when settings.admin asked for one. */
  readonly adminPort: number | undefined;
  readonly pid: number;
  private readonly child: ChildProcess;
  private readonly exited: Promise<void>;
  private alive = true;
  private readonly waiters: ((m: FromChild) => void)[] = [];

  private constructor(child: ChildProcess, port: number, adminPort: number | undefined) {
    this.child = child;
    this.pid = child.pid!;
    this.port = port;
    this.adminPort = adminPort;
    this.exited = new Promise((resolve) => child.once('exit', () => {
      this.alive = false;
      live.delete(child);
      resolve();
    }));
    child.on('message', (m) => {
      for (const w of this.waiters.splice(0)) w(m as FromChild);
    });
  }

  /** Forks the child and resolves once it listens (on `settings.listenPort`, or a free one if 0). */
  static async start(options: SidecarProcessOptions): Promise<SidecarProcess> {
    const log = openSync(options.logFile, 'a');
    const child = fork(options.entry ?? CHILD_ENTRY, [], {
      // The Node.js options the webhook gives the sidecar container.
      execArgv: [...process.execArgv, ...sidecarNodeOptions(DEFAULT_INJECTOR_SETTINGS.resources.limits.memory).split(' ')],
      detached: true,
      stdio: ['ignore', log, log, 'ipc'],
      env: { ...process.env, POOLKEEPER_CHILD_SIDECAR: JSON.stringify({ settings: options.settings, credentialsDir: options.credentialsDir, grant: options.grant, stateDir: options.stateDir }) },
    });
    closeSync(log);
    live.add(child);
    const ready = await new Promise<FromChild>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the sidecar child did not start in 20 s; log ${options.logFile}`)), 20_000);
      child.once('message', (m) => {
        clearTimeout(timer);
        resolve(m as FromChild);
      });
      child.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`the sidecar child exited with ${code}; log ${options.logFile}`));
      });
    });
    if (ready.kind !== 'ready') throw new Error(`unexpected first message ${ready.kind}`);
    return new SidecarProcess(child, ready.port, ready.adminPort);
  }

  /** True until the process exited. */
  get running(): boolean {
    return this.alive;
  }

  /** Resident set size in MB, from /proc; undefined once gone. */
  rssMb(): number | undefined {
    return processRssMb(this.pid);
  }

  private send(message: ToChild): void {
    if (this.alive) this.child.send(message);
  }

  private next(kind: FromChild['kind'], timeoutMs: number): Promise<FromChild | undefined> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(undefined), timeoutMs);
      const wait = (m: FromChild): void => {
        if (m.kind === kind) {
          clearTimeout(timer);
          resolve(m);
        } else this.waiters.push(wait);
      };
      this.waiters.push(wait);
      void this.exited.then(() => {
        clearTimeout(timer);
        resolve(undefined);
      });
    });
  }

  /** Applies a new grant, as a PoolMember spec change would. */
  setGrant(connections: number, generation: number): void {
    this.send({ kind: 'grant', connections, generation });
  }

  /** SIGTERM's drain; resolves with the time (ms epoch) the sidecar reported drained, or undefined. */
  async drain(timeoutMs = 60_000): Promise<number | undefined> {
    const reply = this.next('drained', timeoutMs);
    this.send({ kind: 'drain' });
    const m = await reply;
    return m?.kind === 'drained' ? m.at : undefined;
  }

  /** What the sidecar reports in its PoolMember status. */
  async status(): Promise<Extract<FromChild, { kind: 'status' }> | undefined> {
    const reply = this.next('status', 5000);
    this.send({ kind: 'status' });
    const m = await reply;
    return m?.kind === 'status' ? m : undefined;
  }

  /** Sends `signal` to the child's process group. */
  signal(signal: NodeJS.Signals): void {
    if (!this.alive) return;
    try {
      process.kill(-this.pid, signal);
    } catch {
      // gone already
    }
  }

  /** SIGKILL; resolves once the process is gone. */
  async kill(): Promise<void> {
    this.signal('SIGKILL');
    await this.exited;
  }

  /** Closes the sidecar (its connections) and waits for the process to exit; SIGKILL after `graceMs`. */
  async stop(graceMs = 5000): Promise<void> {
    if (!this.alive) return;
    this.send({ kind: 'close' });
    const timer = setTimeout(() => this.signal('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(timer);
  }
}
