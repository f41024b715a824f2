import { execFile, execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { compileEntries, compiledDir } from '../src/devenv/compile.ts';
import { LocalEnvironment } from '../src/devenv/environment.ts';
import { APP_DATABASE } from '../src/devenv/postgres.ts';
import { ProxyChild, trustLoopbackApp } from './proxy.ts';

const env = new LocalEnvironment({ postgres: { maxConnections: 100, superuserReservedConnections: 3 } });
const postgres = await env.postgres();
await trustLoopbackApp(postgres);
execFileSync('/usr/bin/pgbench', ['-i', '-s', '1', '-q', '-h', '127.0.0.1', '-p', String(postgres.port), '-U', postgres.app.user, APP_DATABASE], { stdio: 'ignore' });
const pgbench = (port: number, args: string[]): Promise<number> => new Promise((resolve, reject) => {
  execFile('/usr/bin/pgbench', [...args, '-h', '127.0.0.1', '-p', String(port), '-U', postgres.app.user, APP_DATABASE], { timeout: 1_800_000 }, (error, stdout, stderr) => {
    const done = /number of transactions actually processed: (\d+)/.exec(stdout);
    if (error || !done) reject(new Error(stderr)); else resolve(Number(done[1]));
  });
});
const dir = '/tmp/probe/cg';
mkdirSync(dir, { recursive: true });
const [compiled] = compileEntries(['bench/proxy-child.ts'], compiledDir('bench'));
process.env.BENCH_SIDECAR_NODE_OPTIONS = '--max-semi-space-size=2 --perf-basic-prof --interpreted-frames-native-stack';
const sidecar = await ProxyChild.start({ kind: 'sidecar', host: postgres.host, port: postgres.port, user: postgres.app.user, password: postgres.app.password, dbname: APP_DATABASE, mode: 'transaction', grant: 20 }, compiled!, ['valgrind', '-q', '--tool=callgrind', '--separate-threads=yes', '--dump-instr=no', `--callgrind-out-file=${join(dir, 'callgrind.out')}`]);
const clients = Number(process.env.CLIENTS ?? 10);
const args = ['-n', '-S', '-c', String(clients), '-j', '2', '-t', String(Math.floor(4000 / clients))];
await pgbench(sidecar.port, args); await pgbench(sidecar.port, args);
execFileSync('callgrind_control', ['--zero', String(sidecar.pid)]);
const tx = await pgbench(sidecar.port, args);
execFileSync('callgrind_control', ['--dump=measured', String(sidecar.pid)]);
console.log(JSON.stringify({ tx, pid: sidecar.pid }));
await new Promise((r) => setTimeout(r, 3000));
await sidecar.stop(); await env.stop();
