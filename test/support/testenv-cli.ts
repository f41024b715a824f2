/**
 * `npm run testenv -- smoke`: starts every component of the local
 * environment, prints one line each with its version and health, stops them.
 */
import { LocalEnvironment } from '../../src/devenv/environment.ts';
import { formatStatuses, probeEnvironment } from '../../src/devenv/report.ts';

const command = process.argv[2] ?? 'smoke';
if (command !== 'smoke') {
  console.error('usage: npm run testenv -- smoke');
  process.exit(2);
}
const started = Date.now();
const env = new LocalEnvironment();
let statuses;
try {
  statuses = await probeEnvironment(env);
} finally {
  await env.stop();
}
console.log(formatStatuses(statuses));
const healthy = statuses.every((s) => s.healthy);
console.log(`${healthy ? 'all healthy' : 'UNHEALTHY'}; started, probed and stopped in ${((Date.now() - started) / 1000).toFixed(1)} s`);
process.exit(healthy ? 0 : 1);
