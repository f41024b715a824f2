/**
 * `npm run bench`: the controller at fleet scale and the proxy side by side,
 * as one terminal table and, with --json, one JSON file.
 *
 *   npm run bench [-- --quick] [-- --json FILE] [-- --only proxy|controller|instructions] [-- --unix|--no-unix] [-- --streams]
 *                 [-- --seconds N --rounds N --filter REGEX --targets pgbouncer,sidecar,sidecar-b,native-pipe,c-relay --pods 100,1000]
 *                 [-- --instructions] [-- --transactions N]
 *
 * --quick (under 3 minutes): the controller at 100 pods, one round of each
 * event, and at the same time the proxy at 1 s per pgbench run, one round,
 * without the Unix-socket runs (a smoke test of both). The full run: the
 * controller at 100 and 1,000 pods, one round of each event (more with
 * --pods and --controller-rounds); the proxy at 3 s per run, 3 interleaved
 * rounds, medians and the range of the ratios (about 10 minutes).
 *
 * The controller section runs bench/controller-scale.ts in a child process
 * (its own local API server) and reads its JSON. --instructions (or --only
 * instructions) adds PgBouncer's and the sidecar's instructions per
 * transaction under callgrind (bench/instructions.ts): a figure this shared
 * machine's load does not move, for comparing builds of the sidecar.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { runInstructions, type InstructionResult } from './instructions.ts';
import { runProxy, type ProxyReport } from './proxy.ts';
import type { ControllerResult } from './controller-scale.ts';

const { values } = parseArgs({
  allowNegative: true,
  options: {
    quick: { type: 'boolean', default: false },
    json: { type: 'string' },
    only: { type: 'string' },
    seconds: { type: 'string' },
    rounds: { type: 'string' },
    filter: { type: 'string' },
    clients: { type: 'string' },
    unix: { type: 'boolean' },
    streams: { type: 'boolean', default: false },
    targets: { type: 'string' },
    pods: { type: 'string' },
    'controller-rounds': { type: 'string' },
    connections: { type: 'string', default: '1' },
    instructions: { type: 'boolean', default: false },
    transactions: { type: 'string', default: '3000' },
  },
});
const quick = values.quick;
const log = (line: string): void => void process.stderr.write(`${line}\n`);
const started = Date.now();

/** Runs bench/controller-scale.ts and returns its `controller[]`. */
async function runController(): Promise<ControllerResult[]> {
  const dir = mkdtempSync(join(tmpdir(), 'poolkeeper-bench-'));
  const file = join(dir, 'controller.json');
  const args = [
    fileURLToPath(new URL('./controller-scale.ts', import.meta.url)),
    '--pods', values.pods ?? (quick ? '100' : '100,1000'),
    '--rounds', values['controller-rounds'] ?? '1',
    '--connections', values.connections,
    '--json', file,
  ];
  log(`controller: node ${args.map((a) => a.replace(/^.*\/bench\//, 'bench/')).join(' ')}`);
  try {
    const code = await new Promise<number | null>((resolve) => {
      // Its table goes to our stderr; ours is printed at the end.
      const child = spawn(process.execPath, args, { stdio: ['ignore', 2, 2] });
      child.once('exit', resolve);
    });
    if (code !== 0) throw new Error(`bench/controller-scale.ts exited with ${code}`);
    return (JSON.parse(readFileSync(file, 'utf8')) as { controller: ControllerResult[] }).controller;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  return [header, ...rows].map((row) => row.map((cell, i) => cell.padStart(widths[i]!)).join('  ')).join('\n');
}

const fmt = (n: number | null | undefined, digits = 0): string => (n === null || n === undefined || Number.isNaN(n) ? '-' : n.toFixed(digits));

const controllerRun = (): Promise<ControllerResult[]> => (values.only === 'proxy' || values.only === 'instructions' ? Promise.resolve([]) : runController());
const proxyRun = (): Promise<ProxyReport | undefined> => (values.only === 'controller' || values.only === 'instructions' ? Promise.resolve(undefined) : runProxy({
  seconds: Number(values.seconds ?? (quick ? 1 : 3)),
  rounds: Number(values.rounds ?? (quick ? 1 : 3)),
  clients: (values.clients ?? '1,10,50').split(',').map(Number),
  pool: 20,
  // The quick run leaves the socket runs out (--unix puts them back).
  unix: values.unix ?? !quick,
  streams: values.streams,
  log,
  ...(values.targets === undefined ? {} : { targets: values.targets.split(',') }),
  ...(values.filter === undefined ? {} : { filter: new RegExp(values.filter) }),
}));
// The quick run is a smoke test of both sections: run at once, each disturbs the other's figures.
const [controller, proxy] = quick ? await Promise.all([controllerRun(), proxyRun()]) : [await controllerRun(), await proxyRun()];
const instructions: InstructionResult[] = values.instructions || values.only === 'instructions'
  ? await runInstructions({ clients: (values.clients ?? '1,10').split(',').map(Number), transactions: Number(values.transactions), log })
  : [];

if (controller.length > 0) {
  console.log('\ncontroller (time from an event to every grant written and acknowledged)');
  console.log(table(['pods', 'dbc', 'event', 'n', 'p50 ms', 'p99 ms', 'cpu s', 'rss MB', 'writes', 'violations'],
    controller.map((r) => [String(r.pods), String(r.connections), r.event, String(r.samples), fmt(r.p50_ms), fmt(r.p99_ms), fmt(r.cpu_s, 2), String(r.rss_mb), String(r.writes), String(r.violations)])));
}
if (proxy) {
  console.log(`\nproxy (pgbench tps, median of ${proxy.proxy[0]?.rounds ?? 0} round(s) of ${proxy.seconds_per_run} s; pool ${20}; CPU µs per transaction of the pooler process)`);
  console.log(table(['script', 'mode', 'clients', 'direct', 'pipe', 'pgbouncer', 'sidecar', 'sc/pgb', 'range', 'sc/direct', 'pipe/pgb', 'cpu pgb', 'cpu sc', 'cpu sc/pgb'],
    proxy.proxy.map((r) => [r.script, r.mode, String(r.clients), fmt(r.direct_tps), fmt(r.pipe_tps), fmt(r.pgbouncer_tps), fmt(r.sidecar_tps),
      fmt(r.sidecar_vs_pgbouncer, 2), r.sidecar_vs_pgbouncer_range ? `${r.sidecar_vs_pgbouncer_range[0].toFixed(2)}-${r.sidecar_vs_pgbouncer_range[1].toFixed(2)}` : '-',
      fmt(r.sidecar_vs_direct, 2), r.pipe_tps !== null && r.pgbouncer_tps !== null ? fmt(r.pipe_tps / r.pgbouncer_tps, 2) : '-',
      fmt(r.pgbouncer_cpu_us, 1), fmt(r.sidecar_cpu_us, 1), r.pgbouncer_cpu_us ? fmt(r.sidecar_cpu_us / r.pgbouncer_cpu_us, 2) : '-'])));
  const unixRows = proxy.proxy.filter((r) => r.sidecar_unix_tps != null);
  if (unixRows.length > 0) {
    console.log('\nover Unix-domain sockets (transaction mode; ratios against PgBouncer over its Unix socket)');
    console.log(table(['script', 'clients', 'pgbouncer', 'sidecar', 'sc/pgb', 'sc unix/sc tcp', 'cpu pgb', 'cpu sc', 'cpu sc/pgb'],
      unixRows.map((r) => [r.script, String(r.clients), fmt(r.pgbouncer_unix_tps), fmt(r.sidecar_unix_tps), fmt(r.sidecar_unix_tps! / r.pgbouncer_unix_tps!, 2), fmt(r.sidecar_unix_tps! / r.sidecar_tps, 2),
        fmt(r.pgbouncer_unix_cpu_us, 1), fmt(r.sidecar_unix_cpu_us, 1), fmt(r.sidecar_unix_cpu_us! / r.pgbouncer_unix_cpu_us!, 2)])));
  }
  for (const r of proxy.proxy) if (r.sidecar_b_tps != null) console.log(`${values.streams ? 'Node.js streams' : 'B build'}: ${r.script} ${r.mode} ${r.clients} cl.: ${r.sidecar_b_tps} tps, ${fmt(r.sidecar_b_cpu_us, 1)} µs/tx (A: ${r.sidecar_tps} tps, ${fmt(r.sidecar_cpu_us, 1)} µs/tx)`);
  console.log(`sidecar RSS: idle ${proxy.sidecar_rss_mb.idle} MB, with 1,000 idle clients ${proxy.sidecar_rss_mb.clients_1000} MB`);
}
if (instructions.length > 0) {
  console.log('\ninstructions per transaction under callgrind (user space; transaction mode, pool 20; main thread, all threads in brackets)');
  const rows = new Map<string, Partial<Record<InstructionResult['target'], InstructionResult>>>();
  for (const r of instructions) rows.set(`${r.script}|${r.clients}`, { ...rows.get(`${r.script}|${r.clients}`), [r.target]: r });
  const cell = (r: InstructionResult | undefined): string => (r === undefined ? '-' : `${r.main_thread} (${r.all_threads})`);
  console.log(table(['script', 'clients', 'pgbouncer', 'sidecar', 'sc/pgb', 'sidecar-b', 'sc/sc-b'], [...rows].map(([key, r]) => {
    const [script, clients] = key.split('|');
    return [script!, clients!, cell(r.pgbouncer), cell(r.sidecar), r.pgbouncer && r.sidecar ? fmt(r.sidecar.main_thread / r.pgbouncer.main_thread, 2) : '-',
      cell(r['sidecar-b']), r.sidecar && r['sidecar-b'] ? fmt(r.sidecar.main_thread / r['sidecar-b'].main_thread, 3) : '-'];
  })));
}
console.log(`\n${((Date.now() - started) / 1000).toFixed(0)} s`);
if (values.json !== undefined) {
  const out = {
    controller: controller.map(({ pods, connections, event, samples, p50_ms, p99_ms, cpu_s, rss_mb, writes, violations }) => ({ pods, connections, event, samples, p50_ms, p99_ms, cpu_s, rss_mb, writes, violations })),
    proxy: proxy?.proxy ?? [],
    sidecar_rss_mb: proxy?.sidecar_rss_mb ?? null,
    instructions,
    versions: proxy?.versions,
    quick,
    seconds: Math.round((Date.now() - started) / 1000),
  };
  writeFileSync(values.json, `${JSON.stringify(out, null, 2)}\n`);
}
