/**
 * The quick subset of the fault scenarios (`npm run chaos` runs them all at
 * full length): under each fault, PostgreSQL never holds more backends of the
 * sidecar than its grant, no transaction is lost, and every client is
 * answered within poolTimeout plus a margin. The scenarios run on a
 * PostgreSQL of their own, since some restart or fill it.
 */
import assert from 'node:assert/strict';
import { LocalEnvironment } from '../../src/devenv/environment.ts';
import { NetworkNamespace } from '../../src/devenv/network-namespace.ts';
import { ChaosLab, SCENARIOS, TIMING_GOAL_PREFIX, formatTable, runScenario, type ChaosResult } from '../support/chaos.ts';

describe('faults (quick subset of npm run chaos)', function () {
  let env: LocalEnvironment;
  let lab: ChaosLab;
  const results: ChaosResult[] = [];

  before(async function () {
    env = new LocalEnvironment({ keepRunDir: process.env.POOLKEEPER_KEEP_ENV === '1' });
    lab = await ChaosLab.start(env);
  });

  after(async function () {
    if (results.length > 0 && process.env.CHAOS_TABLE === '1') console.log(formatTable(results));
    lab?.close();
    await env?.stop();
  });

  for (const scenario of SCENARIOS.filter((s) => s.quick)) {
    it(scenario.name, async function () {
      const unavailable = scenario.isolatedDatabase ? NetworkNamespace.unavailable() : undefined;
      if (unavailable !== undefined) {
        console.log(`      skipped: ${unavailable}`);
        this.skip();
      }
      const result = await runScenario(lab, scenario, { quick: true });
      results.push(result);
      const detail = `${formatTable([result])}\n${result.notes.join('; ')}\nerrors: ${JSON.stringify(result.errorMessages)}`;
      assert.equal(result.overLimitMs, 0, `backends over the limit (max ${result.maxBackends} / ${result.limit})\n${detail}`);
      assert.equal(result.lost, 0, `lost transactions\n${detail}`);
      assert.equal(result.unanswered, 0, `clients unanswered past poolTimeout\n${detail}`);
      // Latency goals are figures for `npm run chaos` on a quiet machine; the tests hold the correctness ones.
      assert.deepEqual(result.missed.filter((m) => !m.startsWith(TIMING_GOAL_PREFIX)), [], detail);
      assert.ok(result.committed > 0, `no transaction committed\n${detail}`);
    });
  }
});
