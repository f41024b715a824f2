/**
 * A model-based test of the settings a transaction-mode sidecar carries for
 * its clients: several node-postgres clients (some with startup settings)
 * share two server connections and run random sequences of SET, SET SESSION,
 * SET ... TO DEFAULT, RESET, RESET ALL, DISCARD ALL and set_config(), simple
 * and extended, failing ones, SETs inside committed and rolled-back
 * transactions and among other statements, while the sidecar's server
 * backends are terminated now and then. Each sidecar client has a twin on a
 * direct connection that runs the same statements: after every step each
 * client's settings and each statement's outcome must be the twin's.
 *
 * Left out of the comparison, as docs/transaction-mode.md "Differences that
 * remain" describes:
 * - ParameterStatus (never read here) and pg_settings.source;
 * - what statements inside a transaction see after RESET ALL or a RESET in it
 *   (the view is only read between steps, outside transactions);
 * - a pinned client's startup settings after it reset them (RESET ALL,
 *   DISCARD ALL, RESET name, SET name TO DEFAULT): the pinned connection goes
 *   to the server's defaults, which set_config() did not change; such a
 *   setting is not compared until the client sets it again;
 * - a custom setting (`poolkeeper_test.*`) the client never had: once any
 *   client used it on a server connection, PostgreSQL keeps the placeholder
 *   there and a RESET leaves it empty where a fresh backend has none, so
 *   missing and empty compare equal;
 * - a pinned client's connection dies with its backend (pg_terminate_backend
 *   reaches it, as it would a direct session): both twins log in again.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import pg from 'pg';
import { testEnvironment } from '../support/hooks.ts';
import { startTestSidecar, type TestSidecar } from '../support/sidecar-fixture.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';

const env = testEnvironment();

/** The settings compared: custom ones and real ones, reported (application_name, TimeZone, DateStyle) or not. */
const SETTINGS = ['poolkeeper_test.a', 'poolkeeper_test.b', 'statement_timeout', 'extra_float_digits', 'application_name', 'TimeZone', 'DateStyle', 'search_path'] as const;
type Setting = (typeof SETTINGS)[number];

/** Values each setting is SET to (as SQL), and one the server refuses. */
const VALUES: Record<Setting, { good: string[]; bad: string }> = {
  'poolkeeper_test.a': { good: ["'x1'", "'x 2'", 'x3', "'it''s'"], bad: '' },
  'poolkeeper_test.b': { good: ["'y1'", '42'], bad: '' },
  statement_timeout: { good: ['4321', "'5s'", '0'], bad: "'soon'" },
  extra_float_digits: { good: ['0', '2', '3'], bad: '99' },
  application_name: { good: ["'appx'", "'other app'"], bad: '' },
  TimeZone: { good: ["'UTC'", "'Europe/Paris'", "'America/New_York'"], bad: "'Mars/Olympus'" },
  DateStyle: { good: ["'SQL, DMY'", "'ISO, MDY'"], bad: "'foo'" },
  search_path: { good: ['public, pg_catalog', "'$user', public"], bad: '' },
};

/** Startup settings of the clients (each a twin pair). */
const CLIENTS: Array<{ options?: string; application_name?: string }> = [
  {},
  { options: '-c statement_timeout=1234 -c poolkeeper_test.a=start', application_name: 'app1' },
  { options: '-c TimeZone=Asia/Tokyo -c extra_float_digits=2 -c DateStyle=SQL,DMY', application_name: 'app2' },
  { options: '-c poolkeeper_test.b=b0 -c search_path=pg_catalog,public' },
];

/** What one client does in a step: statements sent one after the other, each simple or extended. */
type Op =
  | { kind: 'set'; name: Setting; value: string; form: SetForm; extended: boolean }
  | { kind: 'named-set'; name: Setting; value: string }
  | { kind: 'bad-set'; name: Setting; extended: boolean }
  | { kind: 'default'; name: Setting; how: 'reset' | 'to-default' | 'local'; extended: boolean }
  | { kind: 'set-config'; name: Setting; value: string; upper: boolean; extended: boolean; bound?: boolean }
  | { kind: 'reset-all'; how: 'reset' | 'discard'; extended: boolean }
  | { kind: 'in-transaction'; inner: 'set' | 'set-local' | 'reset' | 'reset-all' | 'set-config'; name: Setting; value: string; end: 'COMMIT' | 'ROLLBACK' | 'error' }
  | { kind: 'multi'; name: Setting; value: string; shape: 'set-first' | 'set-first-failing' | 'set-last' | 'reset-all-failing' | 'reset-first' | 'settings-only' | 'settings-only-failing' }
  | { kind: 'select'; extended: boolean }
  | { kind: 'reconnect' }
  | { kind: 'idle' };

type SetForm = 'plain' | 'session' | 'to' | 'comment' | 'semicolon' | 'timezone';

type Step = { kind: 'clients'; ops: Op[] } | { kind: 'terminate' };

const settingArb = fc.constantFrom(...SETTINGS);
const goodValueArb = (name: Setting): fc.Arbitrary<string> => fc.constantFrom(...VALUES[name].good);
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: settingArb.chain((name) => fc.record({ kind: fc.constant('set' as const), name: fc.constant(name), value: goodValueArb(name), form: fc.constantFrom<SetForm>('plain', 'session', 'to', 'comment', 'semicolon', ...(name === 'TimeZone' ? ['timezone' as const] : [])), extended: fc.boolean() })) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('bad-set' as const), name: fc.constantFrom<Setting>('statement_timeout', 'extra_float_digits', 'TimeZone', 'DateStyle'), extended: fc.boolean() }) },
  { weight: 4, arbitrary: settingArb.chain((name) => fc.record({ kind: fc.constant('default' as const), name: fc.constant(name), how: fc.constantFrom('reset' as const, 'to-default' as const, ...(name === 'TimeZone' ? ['local' as const] : [])), extended: fc.boolean() })) },
  { weight: 3, arbitrary: settingArb.chain((name) => fc.record({ kind: fc.constant('set-config' as const), name: fc.constant(name), value: goodValueArb(name), upper: fc.boolean(), extended: fc.boolean(), bound: fc.boolean() })) },
  { weight: 3, arbitrary: settingArb.chain((name) => fc.record({ kind: fc.constant('named-set' as const), name: fc.constant(name), value: goodValueArb(name) })) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('reset-all' as const), how: fc.constantFrom('reset' as const, 'discard' as const), extended: fc.boolean() }) },
  { weight: 2, arbitrary: settingArb.chain((name) => fc.record({ kind: fc.constant('in-transaction' as const), inner: fc.constantFrom('set' as const, 'set-local' as const, 'reset' as const, 'reset-all' as const, 'set-config' as const), name: fc.constant(name), value: goodValueArb(name), end: fc.constantFrom('COMMIT' as const, 'ROLLBACK' as const, 'error' as const) })) },
  { weight: 2, arbitrary: settingArb.chain((name) => fc.record({ kind: fc.constant('multi' as const), name: fc.constant(name), value: goodValueArb(name), shape: fc.constantFrom('set-first' as const, 'set-first-failing' as const, 'set-last' as const, 'reset-all-failing' as const, 'reset-first' as const, 'settings-only' as const, 'settings-only-failing' as const) })) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('select' as const), extended: fc.boolean() }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'reconnect' as const }) },
  { weight: 4, arbitrary: fc.constant({ kind: 'idle' as const }) },
);
const stepArb: fc.Arbitrary<Step> = fc.oneof(
  // Only the last client may pin: with a grant of 2, two pinned clients would leave the others no server connection.
  { weight: 12, arbitrary: fc.record({ kind: fc.constant('clients' as const), ops: fc.tuple(...CLIENTS.map((_, i) => i === CLIENTS.length - 1 ? opArb : opArb.filter((op) => !pins(op)))) }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'terminate' as const }) },
);

/** A statement to send and whether through the extended protocol. */
interface Statement { text: string; extended: boolean; name?: string; values?: string[] }

/** A plain value literal as set_config() takes it. */
function configValue(value: string): string {
  return /^'(?:[^']|'')*'$/.test(value) ? value : `'${value.replace(/'/g, "''")}'`;
}

function setSql(name: Setting, value: string, form: SetForm): string {
  switch (form) {
    case 'plain': return `SET ${name} = ${value}`;
    case 'session': return `SET SESSION ${name} = ${value}`;
    case 'to': return `set ${name.toUpperCase()} TO ${value}`;
    case 'comment': return `/* tag */ SET ${name} = ${value} -- trailing note`;
    case 'semicolon': return `\n  SET ${name} TO ${value} ;  ; \n`;
    case 'timezone': return `SET TIME ZONE ${value}`;
  }
}

/** The statements of an op, in order. */
function statementsOf(op: Op): Statement[] {
  switch (op.kind) {
    case 'set': return [{ text: setSql(op.name, op.value, op.form), extended: op.extended }];
    case 'bad-set': return [{ text: `SET ${op.name} = ${VALUES[op.name].bad}`, extended: op.extended }];
    case 'default': return [{ text: op.how === 'reset' ? `RESET ${op.name}` : op.how === 'local' ? 'SET TIME ZONE LOCAL' : `SET ${op.name} TO DEFAULT`, extended: op.extended }];
    case 'named-set': return [{ text: `SET ${op.name} = ${op.value}`, extended: true, name: `set_${op.name.replace(/\W/g, '_')}_${op.value.replace(/\W/g, '_')}` }];
    // Its value bound to $1, as row-level security set up per request sends it (the literal's text, unquoted).
    case 'set-config': if (op.bound === true) return [{ text: `SELECT set_config('${op.name}', $1, false)`, extended: true, values: [configValue(op.value).slice(1, -1).replace(/''/g, "'")] }];
      return [{ text: op.upper ? `SELECT PG_CATALOG.SET_CONFIG('${op.name.toUpperCase()}', ${configValue(op.value)}, FALSE);` : `SELECT set_config('${op.name}', ${configValue(op.value)}, false)`, extended: op.extended }];
    case 'reset-all': return [{ text: op.how === 'reset' ? 'RESET ALL' : 'DISCARD ALL', extended: op.extended }];
    case 'in-transaction': {
      const inner = op.inner === 'set' ? `SET ${op.name} = ${op.value}` : op.inner === 'set-local' ? `SET LOCAL ${op.name} = ${op.value}` : op.inner === 'reset' ? `RESET ${op.name}` : op.inner === 'reset-all' ? 'RESET ALL' : `SELECT set_config('${op.name}', ${configValue(op.value)}, false)`;
      const end = op.end === 'error' ? [{ text: 'SELECT 1/0', extended: false }, { text: 'COMMIT', extended: false }] : [{ text: op.end, extended: false }];
      return [{ text: 'BEGIN', extended: false }, { text: inner, extended: false }, ...end];
    }
    case 'multi': {
      const set = `SET ${op.name} = ${op.value}`;
      const text = op.shape === 'set-first' ? `${set}; SELECT 1` : op.shape === 'set-first-failing' ? `${set}; SELECT 1/0` : op.shape === 'set-last' ? `SELECT 1; ${set}`
        : op.shape === 'reset-all-failing' ? 'RESET ALL; SELECT 1/0' : op.shape === 'settings-only' ? `RESET ${op.name}; ${set}` : op.shape === 'settings-only-failing' ? `${set}; SET statement_timeout = 'soon'` : `RESET ${op.name}; SELECT 1`;
      return [{ text, extended: false }];
    }
    case 'select': return [{ text: 'SELECT 1', extended: op.extended }];
    case 'reconnect':
    case 'idle':
      return [];
  }
}

/**
 * Whether the sidecar pins the client for this op (docs/transaction-mode.md): a SET or RESET of
 * one setting in a transaction block or among other statements, a RESET ALL that a rollback may
 * have undone.
 */
function pins(op: Op): boolean {
  // Inside a transaction block, a SET or RESET holds if the block commits and is gone if it rolls back: neither pins.
  if (op.kind === 'in-transaction') return false;
  // Setting changes alone in one Query are carried as a whole; one failing among them leaves the outcome uncertain.
  // A named prepared SET is carried too, executed between transactions.
  return op.kind === 'multi' && op.shape !== 'settings-only';
}

/** The settings an op takes back to the session's default (which a pinned client gets from the server, not its startup packet). */
function defaulted(op: Op): Setting[] {
  if (op.kind === 'reset-all' || (op.kind === 'in-transaction' && op.inner === 'reset-all') || (op.kind === 'multi' && op.shape === 'reset-all-failing')) return [...SETTINGS];
  if (op.kind === 'default' || (op.kind === 'in-transaction' && op.inner === 'reset') || (op.kind === 'multi' && op.shape === 'reset-first')) return [op.name];
  return [];
}

/** The settings an op SETs for the session (not rolled back). */
function changed(op: Op): Setting[] {
  if (op.kind === 'set' || op.kind === 'named-set' || op.kind === 'set-config') return [op.name];
  if (op.kind === 'in-transaction' && (op.inner === 'set' || op.inner === 'set-config') && op.end === 'COMMIT') return [op.name];
  if (op.kind === 'multi' && (op.shape === 'set-first' || op.shape === 'set-last' || op.shape === 'settings-only')) return [op.name];
  return [];
}

const VIEW_SQL = `SELECT ${SETTINGS.map((s, i) => `current_setting('${s}', true) AS s${i}`).join(', ')}`;

/** One client through the sidecar and its twin on a direct connection. */
interface Twin {
  index: number;
  sidecar: pg.Client;
  direct: pg.Client;
  pinned: boolean;
  /** Settings not compared (see the file's comment), until set again. */
  loose: Set<Setting>;
}

function outcome(e: unknown): string {
  if (e === undefined) return 'ok';
  const err = e as { code?: string; message?: string };
  return `error ${err.code ?? err.message ?? 'without a message'}`;
}

async function run(c: pg.Client, statement: Statement): Promise<string> {
  try {
    await c.query(statement.values !== undefined ? { text: statement.text, values: statement.values } : statement.name !== undefined ? { text: statement.text, name: statement.name } : statement.extended ? { text: statement.text, queryMode: 'extended' } as pg.QueryConfig : statement.text);
    return 'ok';
  } catch (e) {
    return outcome(e);
  }
}

function lostConnection(result: string): boolean {
  return result.includes('57P01') || /terminat|Connection|ECONNRESET|not queryable/i.test(result);
}

describe('sidecar settings model (transaction mode)', function () {
  let postgres: PostgresServer;
  let superuser: pg.Client;

  before(async function () {
    postgres = await env.postgres();
    superuser = new pg.Client({ host: postgres.host, port: postgres.port, user: postgres.superuser.user, password: postgres.superuser.password, database: 'app' });
    await superuser.connect();
  });

  after(async function () {
    await superuser?.end();
  });

  async function connectTwin(running: TestSidecar, index: number): Promise<Twin> {
    const config = CLIENTS[index]!;
    const sidecar = new pg.Client({ host: '127.0.0.1', port: running.port, user: running.role.user, database: 'app', ...config });
    const direct = new pg.Client({ host: postgres.host, port: postgres.port, user: running.role.user, password: running.role.password, database: 'app', ...config });
    sidecar.on('error', () => undefined);
    direct.on('error', () => undefined);
    await sidecar.connect();
    await direct.connect();
    return { index, sidecar, direct, pinned: false, loose: new Set() };
  }

  async function view(c: pg.Client): Promise<Record<string, string | null>> {
    const row = (await c.query<Record<string, string | null>>(VIEW_SQL)).rows[0]!;
    const out: Record<string, string | null> = {};
    SETTINGS.forEach((s, i) => {
      const v = row[`s${i}`] ?? null;
      out[s] = s.startsWith('poolkeeper_test.') && v === '' ? null : v;
    });
    return out;
  }

  /** Runs `steps` on fresh twins through a fresh sidecar; throws, with a trace, at the first difference. */
  async function check(steps: Step[]): Promise<void> {
    const running = await startTestSidecar(postgres, { grant: 2, pool: { poolTimeout: 3 } });
    const twins: Twin[] = [];
    const trace: string[] = [];
    try {
      for (let i = 0; i < CLIENTS.length; i++) twins.push(await connectTwin(running, i));
      const directPids = async (): Promise<number[]> => (await Promise.all(twins.map((t) => t.direct.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')))).map((r) => r.rows[0]!.pid);
      for (const [n, step] of steps.entries()) {
        if (step.kind === 'terminate') {
          const keep = await directPids();
          const r = await superuser.query<{ n: string }>('SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE usename = $1 AND pid <> ALL($2::int[]) AND pid <> pg_backend_pid()', [running.role.user, keep]);
          trace.push(`#${n} terminate ${r.rows[0]!.n} sidecar backends`);
          await new Promise((resolve) => setTimeout(resolve, 100));
        } else {
          await Promise.all(twins.map(async (twin) => {
            const op = step.ops[twin.index]!;
            if (op.kind === 'idle') return;
            trace.push(`#${n} client ${twin.index}: ${JSON.stringify(op)}`);
            if (op.kind === 'reconnect') {
              await Promise.all([twin.sidecar.end(), twin.direct.end()]);
              Object.assign(twin, await connectTwin(running, twin.index));
              return;
            }
            for (const statement of statementsOf(op)) {
              const [viaSidecar, direct] = await Promise.all([run(twin.sidecar, statement), run(twin.direct, statement)]);
              if (viaSidecar !== direct && twin.pinned && lostConnection(viaSidecar) && !lostConnection(direct)) {
                // A pinned client's backend was terminated: its session is gone, as a direct one's would be.
                trace.push(`#${n} client ${twin.index}: pinned, lost its backend (${viaSidecar}); both log in again`);
                await Promise.all([twin.sidecar.end().catch(() => undefined), twin.direct.end()]);
                Object.assign(twin, await connectTwin(running, twin.index));
                return;
              }
              assert.equal(viaSidecar, direct, `client ${twin.index}: ${statement.text} (${statement.extended ? 'extended' : 'simple'}) through the sidecar: ${viaSidecar}, direct: ${direct}\n${trace.join('\n')}`);
            }
            if (pins(op)) twin.pinned = true;
            for (const s of changed(op)) twin.loose.delete(s);
            if (twin.pinned) for (const s of defaulted(op)) twin.loose.add(s);
          }));
        }
        // Every client's view, read concurrently as the clients' own next statements.
        await Promise.all(twins.map(async (twin) => {
          let viaSidecar: Record<string, string | null>;
          try {
            viaSidecar = await view(twin.sidecar);
          } catch (e) {
            if (!twin.pinned || !lostConnection(outcome(e))) throw e;
            // A pinned client's backend was terminated: its session is gone, as a direct one's would be.
            trace.push(`#${n} client ${twin.index}: pinned, lost its backend (${outcome(e)}); both log in again`);
            await Promise.all([twin.sidecar.end().catch(() => undefined), twin.direct.end()]);
            Object.assign(twin, await connectTwin(running, twin.index));
            viaSidecar = await view(twin.sidecar);
          }
          const direct = await view(twin.direct);
          for (const s of twin.loose) {
            delete viaSidecar[s];
            delete direct[s];
          }
          assert.deepEqual(viaSidecar, direct, `after step #${n}, client ${twin.index}${twin.pinned ? ' (pinned)' : ''}: settings through the sidecar differ from direct\n${trace.join('\n')}`);
        }));
        // Pinned exactly where docs/transaction-mode.md says: a carried SET or RESET pins nobody.
        const pinned = twins.filter((t) => t.pinned).map((t) => t.index);
        const metric = await running.registry.getSingleMetricAsString('poolkeeper_sidecar_pinned_clients');
        assert.match(metric, new RegExp(`reason="set"} ${pinned.length}\\b`), `after step #${n}: pinned clients should be [${pinned.join(', ')}]\n${trace.join('\n')}`);
      }
    } finally {
      await Promise.all(twins.flatMap((t) => [t.sidecar.end().catch(() => undefined), t.direct.end().catch(() => undefined)]));
      await running.stop();
    }
  }

  it('shows every client the settings a direct connection would, whatever SETs, RESETs and terminated backends come', async function () {
    this.timeout(120_000);
    const seed = Number(process.env.SETTINGS_MODEL_SEED ?? 20261203);
    const numRuns = Number(process.env.SETTINGS_MODEL_RUNS ?? 12);
    await fc.assert(fc.asyncProperty(fc.array(stepArb, { minLength: 5, maxLength: 25 }), check), { seed, numRuns, interruptAfterTimeLimit: 100_000, ...(process.env.SETTINGS_MODEL_PATH === undefined ? {} : { path: process.env.SETTINGS_MODEL_PATH, endOnFailure: true }) });
  });
});
