/**
 * node-postgres under faults, run by test/integration/driver-faults.test.ts as
 * `node test/drivers/fault-load.ts '<json config>'` (see fault_load.py for the
 * protocol: "fault" and "stop" lines on stdin, {"ready":true}, then one JSON
 * result line). Workers take a client from pg.Pool per transaction and
 * release it with the error after a failure (the pool then discards it), as
 * node-postgres's documentation writes a transaction: no 'error' listener on
 * the client while it is checked out.
 */
import pg from 'pg';

interface Config { target: { host: string; port: number; user: string; password: string; dbname: string }; run: string; workers?: number }

const config = JSON.parse(process.argv[2] ?? '{}') as Config;
const workers = config.workers ?? 4;
let fault = false;
let stopping = false;
let committed = 0;
let commitUnknown = 0;
let ready = false;
const errors = new Map<string, number>();
/** Per worker: its transaction's read was answered; that transaction ran when "fault" came. */
const running = new Map<number, { readAnswered: boolean; atFault: boolean }>();
let atFault = 0;
const atFaultFailed: string[] = [];

function end(worker: number, e?: unknown): void {
  const state = running.get(worker);
  running.delete(worker);
  if (!state?.atFault) return;
  atFault += 1;
  const err = e as { code?: string; message?: string } | undefined;
  if (e !== undefined && atFaultFailed.length < 20) atFaultFailed.push(`${err?.code ?? 'error'} ${(err?.message ?? JSON.stringify(e)).split('\n')[0]!.slice(0, 200)}`);
}

function error(stage: 'new' | 'inflight' | 'commit' | 'idle' | 'unhandled', e: unknown): void {
  const err = e as { code?: string; message?: string };
  const key = JSON.stringify([fault ? 'after' : 'before', stage, err.code ?? (e instanceof Error ? e.constructor.name : 'error'), String(err.message ?? e).split('\n')[0]!.slice(0, 200)]);
  errors.set(key, (errors.get(key) ?? 0) + 1);
  if (stage === 'commit') commitUnknown += 1;
}

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk: string) => {
  input += chunk;
  const lines = input.split('\n');
  input = lines.pop()!;
  for (const line of lines) {
    if (line.trim() === 'fault') {
      fault = true;
      for (const state of running.values()) state.atFault = state.readAnswered;
      process.stdout.write('{"fault":true}\n');
    }
    else if (line.trim() === 'stop') stopping = true;
  }
});
process.stdin.on('end', () => (stopping = true));

const pool = new pg.Pool({
  host: config.target.host, port: config.target.port, user: config.target.user, password: config.target.password, database: config.target.dbname,
  max: workers, application_name: 'fault-node-postgres', connectionTimeoutMillis: 10_000,
});
// An idle client whose server connection ended: the pool drops it and reports it here.
pool.on('error', (e) => error('idle', e));
// An 'error' event on a client the app holds has no listener: it would end an app without
// one. Counted (stage "unhandled") so that the run goes on and says what happened.
process.on('uncaughtException', (e) => error('unhandled', e));

const READ = 'SELECT count(*) FROM drv_fault WHERE run = $1 AND worker = $2';
const WRITE = 'INSERT INTO drv_fault (run, worker, seq) SELECT $1, $2, $3 FROM pg_sleep(0.02)';

async function work(worker: number): Promise<void> {
  let seq = 0;
  while (!stopping) {
    seq += 1;
    let stage: 'new' | 'inflight' | 'commit' = 'new';
    let client: pg.PoolClient | undefined;
    running.set(worker, { readAnswered: false, atFault: false });
    try {
      client = await pool.connect();
      await client.query('BEGIN');
      await client.query(READ, [config.run, worker]);
      stage = 'inflight';
      running.get(worker)!.readAnswered = true;
      await client.query(WRITE, [config.run, worker, seq]);
      stage = 'commit';
      await client.query('COMMIT');
      client.release();
      client = undefined;
      end(worker);
      committed += 1;
      if (!ready) {
        ready = true;
        process.stdout.write('{"ready":true}\n');
      }
    } catch (e) {
      end(worker, e);
      error(stage, e);
      client?.release(e as Error);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

await Promise.all(Array.from({ length: workers }, (_, w) => work(w)));
await Promise.race([pool.end(), new Promise((r) => setTimeout(r, 5000))]);
const version = (await import('pg/package.json', { with: { type: 'json' } })).default.version;
const list = [...errors].sort((a, b) => b[1] - a[1]).map(([key, count]) => {
  const [when, stage, sqlstate, message] = JSON.parse(key) as string[];
  return { when, stage, sqlstate, message, count };
});
process.stdout.write(`${JSON.stringify({ driver: 'node-postgres', version, pool: 'pg.Pool', committed, commitUnknown, atFault, atFaultFailed, errors: list })}\n`);
process.exit(0);
