/**
 * Instructions per transaction of PgBouncer and the sidecar, counted by
 * valgrind's callgrind: user-space instructions do not depend on what else
 * the machine runs, where CPU time on a shared 2-core machine swings by
 * tens of percent from run to run. They leave out the kernel's part (the
 * system calls, about the same for both) and time spent waiting on caches,
 * so they rank changes to the sidecar's own work, not its speed.
 *
 * Each target runs under callgrind (one thread per output file); pgbench
 * warms it up twice, then the counters are zeroed, a measured pgbench run of
 * a fixed number of transactions follows, and the counters are dumped.
 * `main thread` is the event loop's thread (JavaScript and the I/O); `all`
 * adds V8's compiler and garbage-collector threads.
 */
import { execFile, execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { compileEntries, compiledDir } from '../src/devenv/compile.ts';
import { LocalEnvironment } from '../src/devenv/environment.ts';
import { APP_DATABASE } from '../src/devenv/postgres.ts';
import { requireBinary, serviceAccount } from '../src/devenv/system.ts';
import { BenchPgBouncer, ProxyChild, trustLoopbackApp } from './proxy.ts';

/** One line of the instructions table. */
export interface InstructionResult {
  /** `select-only-prepared`: `-S -M prepared`, sidecars only (PgBouncer before 1.21 cannot pool named statements in transaction mode). */
  script: 'select-only' | 'tpcb-like' | 'select-only-prepared';
  clients: number;
  target: 'pgbouncer' | 'sidecar' | 'sidecar-b';
  /** Transactions in the measured run. */
  transactions: number;
  /** Instructions per transaction: the event loop's thread, and every thread. */
  main_thread: number;
  all_threads: number;
}

/** Options of the instructions section. */
export interface InstructionOptions {
  clients: readonly number[];
  /** Transactions of a measured select-only run (TPC-B-like runs a quarter as many). */
  transactions: number;
  log: (line: string) => void;
}

/** A process under callgrind, and how to zero and dump its counters. */
class Counted {
  private dumps = 0;
  private readonly outFile: string;
  private readonly pid: () => number;
  private readonly account: { uid: number; gid: number } | undefined;

  constructor(outFile: string, pid: () => number, account: { uid: number; gid: number } | undefined) {
    this.outFile = outFile;
    this.pid = pid;
    this.account = account;
  }

  /** callgrind_control talks to the process through files named after its user: run as that user. */
  private control(args: string[]): Promise<void> {
    return new Promise((resolve, reject) => execFile(requireBinary('callgrind_control', 'valgrind'), [...args, String(this.pid())], { timeout: 120_000, ...(this.account ?? {}) }, (error, stdout) => {
      if (error || !/OK|dump|zero/i.test(stdout)) reject(new Error(`callgrind_control ${args.join(' ')}: ${error?.message ?? stdout}`));
      else resolve();
    }));
  }

  zero(): Promise<void> {
    return this.control(['--zero']);
  }

  /**
   * Dumps the counters since the last zero; their sum over threads, and the
   * first (main) thread's. `keepAs`: the dump's files are also copied to that
   * path (one per thread, `-N` appended), for callgrind_annotate.
   */
  async dump(keepAs?: string): Promise<{ main: number; all: number }> {
    await this.control(['--dump=measured']);
    this.dumps += 1;
    const prefix = `${this.outFile.split('/').pop()!}.${this.dumps}`;
    const dir = this.outFile.slice(0, this.outFile.lastIndexOf('/'));
    const deadline = Date.now() + 30_000;
    for (;;) {
      const files = readdirSync(dir).filter((f) => f === prefix || f.startsWith(`${prefix}-`));
      const totals = files.map((f) => {
        const text = readFileSync(join(dir, f), 'utf8');
        return { thread: Number(/-(\d+)$/.exec(f)?.[1] ?? 1), total: Number(/^(?:summary|totals): (\d+)/m.exec(text)?.[1] ?? Number.NaN) };
      });
      if (totals.length > 0 && totals.every((t) => !Number.isNaN(t.total))) {
        if (keepAs !== undefined) for (const f of files) copyFileSync(join(dir, f), `${keepAs}${f.slice(prefix.length)}`);
        return { main: totals.find((t) => t.thread === 1)?.total ?? Number.NaN, all: totals.reduce((sum, t) => sum + t.total, 0) };
      }
      if (Date.now() > deadline) throw new Error(`no callgrind dump ${prefix} in ${dir}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

/** Runs the instructions section on a fresh local PostgreSQL. */
export async function runInstructions(options: InstructionOptions): Promise<InstructionResult[]> {
  const valgrind = requireBinary('valgrind', 'valgrind');
  const environment = new LocalEnvironment({ postgres: { maxConnections: 100, superuserReservedConnections: 3 } });
  const stoppers: (() => unknown)[] = [];
  try {
    const postgres = await environment.postgres();
    const { app } = postgres;
    await trustLoopbackApp(postgres);
    const pgbench = (port: number, args: string[]): Promise<number> => new Promise((resolve, reject) => {
      execFile('/usr/bin/pgbench', [...args, '-h', '127.0.0.1', '-p', String(port), '-U', app.user, APP_DATABASE], { timeout: 1_800_000 }, (error, stdout, stderr) => {
        const done = /number of transactions actually processed: (\d+)/.exec(stdout);
        if (error || !done) reject(new Error(`pgbench ${args.join(' ')}: ${stderr}`));
        else resolve(Number(done[1]));
      });
    });
    execFileSync('/usr/bin/pgbench', ['-i', '-s', '1', '-q', '-h', '127.0.0.1', '-p', String(postgres.port), '-U', app.user, APP_DATABASE], { stdio: 'ignore' });
    const callgrind = (dir: string): string[] => [valgrind, '-q', '--tool=callgrind', '--separate-threads=yes', `--callgrind-out-file=${join(dir, 'callgrind.out')}`];

    const targets: { name: InstructionResult['target']; start: () => Promise<{ port: number; counted: Counted }> }[] = [
      {
        name: 'pgbouncer',
        start: async () => {
          const dir = join(environment.runDir, 'instructions-pgbouncer');
          const account = serviceAccount();
          const bouncer = await BenchPgBouncer.start(dir, postgres, 'transaction', 20, { command: callgrind(dir), startMs: 60_000 });
          stoppers.push(() => bouncer.stop());
          return { port: bouncer.port, counted: new Counted(join(dir, 'callgrind.out'), () => bouncer.pid, account ? { uid: account.uid, gid: account.gid } : undefined) };
        },
      },
    ];
    const [compiled] = compileEntries(['bench/proxy-child.ts'], compiledDir('bench'));
    const sidecarScripts: [InstructionResult['target'], string][] = [['sidecar', compiled!]];
    if (process.env.BENCH_SIDECAR_B !== undefined) sidecarScripts.push(['sidecar-b', process.env.BENCH_SIDECAR_B]);
    for (const [name, script] of sidecarScripts) {
      targets.push({
        name,
        start: async () => {
          const dir = join(environment.runDir, `instructions-${name}`);
          mkdirSync(dir, { recursive: true });
          const child = await ProxyChild.start({ kind: 'sidecar', host: postgres.host, port: postgres.port, user: app.user, password: app.password, dbname: APP_DATABASE, mode: 'transaction', grant: 20 }, script, callgrind(dir));
          stoppers.push(() => child.stop());
          return { port: child.port, counted: new Counted(join(dir, 'callgrind.out'), () => child.pid, undefined) };
        },
      });
    }

    const results: InstructionResult[] = [];
    for (const target of targets) {
      const { port, counted } = await target.start();
      for (const script of ['select-only', 'tpcb-like', 'select-only-prepared'] as const) {
        if (script === 'select-only-prepared' && target.name === 'pgbouncer') continue;
        for (const clients of options.clients) {
          const total = script === 'tpcb-like' ? Math.max(clients, Math.floor(options.transactions / 4)) : options.transactions;
          const scriptArgs = script === 'select-only' ? ['-S'] : script === 'select-only-prepared' ? ['-S', '-M', 'prepared'] : [];
          const args = ['-n', ...scriptArgs, '-c', String(clients), '-j', String(Math.min(clients, 2)), '-t', String(Math.max(1, Math.floor(total / clients)))];
          // Twice before counting: V8 compiles the hot paths, the pool fills.
          await pgbench(port, args);
          await pgbench(port, args);
          await counted.zero();
          const transactions = await pgbench(port, args);
          const keep = process.env.BENCH_CALLGRIND_KEEP;
          const { main, all } = await counted.dump(keep === undefined ? undefined : join(keep, `${target.name}-${script}-${clients}.callgrind.out`));
          const row: InstructionResult = { script, clients, target: target.name, transactions, main_thread: Math.round(main / transactions), all_threads: Math.round(all / transactions) };
          options.log(`  instructions ${script.padEnd(20)} ${String(clients).padStart(2)} cl. ${target.name.padEnd(9)} ${row.main_thread} per tx (all threads ${row.all_threads}) over ${transactions} tx`);
          results.push(row);
        }
      }
    }
    return results;
  } finally {
    for (const stop of stoppers.reverse()) {
      try {
        await stop();
      } catch {
        // already gone
      }
    }
    await environment.stop();
  }
}
