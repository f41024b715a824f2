/**
 * Fault scenarios at full length against the local environment: each fault
 * under client load, pg_stat_activity sampled every 50 ms, one table row per
 * fault (scenarios in test/support/chaos.ts, shared with the quick subset in
 * test/integration/chaos.test.ts).
 *
 *   npm run chaos -- [--json FILE] [--only REGEX] [--quick] [--logs DIR] [--skip-kube] [--from-source]
 *
 * --quick: the short faults of `npm test`; --logs: keep each sidecar's log
 * there; --skip-kube: only the faults that need no API server. The sidecar
 * runs compiled, as in the image, and must stay under the RSS goal;
 * --from-source runs the TypeScript instead (no RSS goal: type stripping
 * alone costs tens of MB).
 */
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { parseArgs } from 'node:util';
import { LocalEnvironment } from '../src/devenv/environment.ts';
import { NetworkNamespace } from '../src/devenv/network-namespace.ts';
import { ChaosLab, SCENARIOS, formatTable, runScenario, type ChaosResult } from '../test/support/chaos.ts';
import { KUBE_SCENARIOS } from '../test/support/chaos-kube.ts';
import { buildChildSidecar } from '../test/support/sidecar-process.ts';

/** The sidecar's memory goal under every fault: well inside the 128Mi limit the webhook injects. */
const RSS_GOAL_MB = 96;

const { values } = parseArgs({
  options: {
    json: { type: 'string' },
    only: { type: 'string' },
    quick: { type: 'boolean', default: false },
    logs: { type: 'string' },
    'skip-kube': { type: 'boolean', default: false },
    'from-source': { type: 'boolean', default: false },
  },
});
const only = values.only === undefined ? undefined : new RegExp(values.only, 'i');
const scenarios = [...SCENARIOS, ...(values['skip-kube'] ? [] : KUBE_SCENARIOS)].filter((s) => only === undefined || only.test(s.name));
// The sidecar under test is the working tree's: say which, uncommitted changes included.
const revision = execFileSync('git', ['describe', '--always', '--dirty'], { encoding: 'utf8' }).trim();
const sidecarEntry = values['from-source'] ? undefined : buildChildSidecar();
const env = new LocalEnvironment({ keepRunDir: process.env.POOLKEEPER_KEEP_ENV === '1' });
const results: ChaosResult[] = [];
let lab: ChaosLab | undefined;
try {
  lab = await ChaosLab.start(env);
  for (const scenario of scenarios) {
    const unavailable = scenario.isolatedDatabase ? NetworkNamespace.unavailable() : undefined;
    if (unavailable !== undefined) {
      console.log(`${scenario.name}: skipped (${unavailable})`);
      continue;
    }
    const started = Date.now();
    console.log(`${scenario.name} ...`);
    const result = await runScenario(lab, scenario, { quick: values.quick, log: (line) => console.log(line), ...(values.logs ? { logDir: values.logs } : {}), ...(sidecarEntry ? { sidecarEntry, rssLimitMb: RSS_GOAL_MB } : {}) });
    results.push(result);
    console.log(`  ${((Date.now() - started) / 1000).toFixed(0)} s; ${result.missed.length === 0 ? 'goals met' : `MISSED: ${result.missed.join(', ')}`}${result.notes.length > 0 ? `; ${result.notes.join('; ')}` : ''}`);
    if (values.json) writeFileSync(values.json, `${JSON.stringify({ revision, sidecar: sidecarEntry ? 'compiled' : 'source', cpus: cpus().length, loadAverage: loadavg(), results }, null, 2)}\n`);
  }
} finally {
  lab?.close();
  await env.stop();
}
console.log('');
console.log(formatTable(results));
for (const r of results) {
  if (r.notes.length > 0 || r.missed.length > 0) console.log(`- ${r.fault}: ${[...r.missed.map((m) => `MISSED ${m}`), ...r.notes].join('; ')}`);
}
