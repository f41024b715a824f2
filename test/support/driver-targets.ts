/**
 * The four targets the driver programs run against, side by side: PostgreSQL
 * direct, PgBouncer (transaction mode), the sidecar in transaction mode and in
 * session mode; and what the driver tests share around them.
 */
import { writeFileSync } from 'node:fs';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import { testEnvironment } from './hooks.ts';
import { startTestSidecar, type TestSidecar } from './sidecar-fixture.ts';

/** A target's name. */
export type DriverTargetName = 'direct' | 'pgbouncer' | 'sidecar-transaction' | 'sidecar-session';

/** Every target, direct first: it is the reference the others are held to. */
export const DRIVER_TARGETS: readonly DriverTargetName[] = ['direct', 'pgbouncer', 'sidecar-transaction', 'sidecar-session'];

/** The targets started for one test file. */
export interface DriverTargets {
  postgres: PostgresServer;
  /** Port of each target on 127.0.0.1. */
  ports: ReadonlyMap<DriverTargetName, number>;
  /** Stops the sidecars (PostgreSQL and PgBouncer are the environment's). */
  stop(): Promise<void>;
}

/** Starts the targets: the environment's PostgreSQL and PgBouncer, and two sidecars with these grants. */
export async function startDriverTargets(grants: { transaction: number; session: number }): Promise<DriverTargets> {
  const env = testEnvironment();
  const postgres = await env.postgres();
  const pgbouncer = await env.pgbouncer();
  const sidecars: TestSidecar[] = await Promise.all([
    startTestSidecar(postgres, { mode: 'transaction', grant: grants.transaction }),
    startTestSidecar(postgres, { mode: 'session', grant: grants.session }),
  ]);
  const [transaction, session] = sidecars;
  const ports = new Map<DriverTargetName, number>([['direct', postgres.port], ['pgbouncer', pgbouncer.port], ['sidecar-transaction', transaction!.port], ['sidecar-session', session!.port]]);
  return { postgres, ports, stop: async () => void await Promise.all(sidecars.map((s) => s.stop())) };
}

/** How the program should judge a target: direct, or a pooler in transaction or session mode. */
export function targetMode(name: DriverTargetName): 'direct' | 'transaction' | 'session' {
  return name === 'direct' ? 'direct' : name === 'sidecar-session' ? 'session' : 'transaction';
}

/** A suffix for the names a program creates on `name`, unique to the target and the run. */
export function targetSuffix(name: DriverTargetName, run: string): string {
  return `${name.slice(0, 1)}${name.endsWith('session') ? 's' : ''}_${run}`;
}

/** The test's title for a target. */
export function targetTitle(name: DriverTargetName): string {
  return `${name}: every step as direct${name === 'pgbouncer' ? ' (PgBouncer: recorded, not asserted)' : ''}`;
}

/** Writes every measured result to POOLKEEPER_DRIVERS_REPORT, if it names a file (the source of docs/compatibility.md). */
export function writeDriversReport(results: ReadonlyMap<DriverTargetName, unknown>): void {
  const reportFile = process.env.POOLKEEPER_DRIVERS_REPORT;
  if (reportFile) writeFileSync(reportFile, JSON.stringify(Object.fromEntries(results), null, 1));
}
