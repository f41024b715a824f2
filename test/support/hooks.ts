/**
 * Mocha global fixtures: one LocalEnvironment for the whole integration run,
 * its components started on first use and all stopped at the end (also on
 * failure and Ctrl-C, through the environment's own exit handlers).
 */
import { LocalEnvironment } from '../../src/devenv/environment.ts';

let environment: LocalEnvironment | undefined;

/** The shared environment of this test run. */
export function testEnvironment(): LocalEnvironment {
  environment ??= new LocalEnvironment({ keepRunDir: process.env.POOLKEEPER_KEEP_ENV === '1' });
  return environment;
}

/** Mocha global teardown. */
export async function mochaGlobalTeardown(): Promise<void> {
  await environment?.stop();
}
