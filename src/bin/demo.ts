/**
 * The embedded default: brings up a local control plane and database, shows
 * their state, and tears them down.
 */
import { LocalEnvironment } from '../devenv/environment.ts';
import { formatStatuses, probeEnvironment } from '../devenv/report.ts';

const env = new LocalEnvironment();
try {
  console.log('poolkeeper demo: starting a local Kubernetes control plane, PostgreSQL, OpenSSH and PgBouncer on 127.0.0.1 ...');
  const statuses = await probeEnvironment(env);
  console.log(formatStatuses(statuses));
  process.exitCode = statuses.every((s) => s.healthy) ? 0 : 1;
} finally {
  await env.stop();
}
