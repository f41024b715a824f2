/**
 * A node lost with its pod: the sidecar's host stops answering (every packet
 * between its server connections and PostgreSQL dropped, as a powered-off
 * machine or a cut network does) and the sidecar is gone, its FIN and RST
 * dropped with the rest. PostgreSQL keeps such a peer's idle connections
 * until its TCP keepalives give up on them; the controller counts the pod
 * for `departureHoldSeconds` (docs/budget.md), so the role's keepalives must
 * end them within that. Loopback only: the drop is an iptables rule on the
 * sidecar's own ports. Skipped, with the reason, without root or iptables.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { departureHoldAdvice, type ServerSettings } from '../../src/core/budget/index.ts';
import { freePort } from '../../src/devenv/process.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import type { SidecarSettings } from '../../src/sidecar/index.ts';
import { SidecarProcess } from '../support/sidecar-process.ts';
import { testEnvironment } from '../support/hooks.ts';

/** Why iptables cannot be used here, or undefined. */
function iptablesUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'not root';
  try {
    execFileSync('iptables', ['-w', '-S', 'OUTPUT'], { stdio: 'ignore' });
    return undefined;
  } catch (err) {
    return `iptables does not work here (${err instanceof Error ? err.message : String(err)})`;
  }
}

/** The rules that cut the connections between local ports `peers` and PostgreSQL's `port`, both ways. */
function cutRules(port: number, peers: readonly number[]): string[][] {
  return peers.flatMap((peer) => [
    ['OUTPUT', '-o', 'lo', '-p', 'tcp', '--sport', String(peer), '--dport', String(port), '-j', 'DROP'],
    ['OUTPUT', '-o', 'lo', '-p', 'tcp', '--sport', String(port), '--dport', String(peer), '-j', 'DROP'],
  ]);
}

describe('a node lost with its pod (keepalives and the departure hold)', function () {
  this.timeout(180_000);
  let postgres: PostgresServer;
  const rules: string[][] = [];
  const sidecars: SidecarProcess[] = [];

  before(async function () {
    const why = iptablesUnavailable();
    if (why !== undefined) {
      console.log(`      skipped: ${why}`);
      this.skip();
    }
    postgres = await testEnvironment().postgres();
  });

  afterEach(async function () {
    for (const rule of rules.splice(0)) {
      try {
        execFileSync('iptables', ['-w', '-D', ...rule], { stdio: 'ignore' });
      } catch {
        // already gone
      }
    }
    await Promise.all(sidecars.splice(0).map((s) => s.kill()));
  });

  const roles: string[] = [];

  /** A login role of its own for one sidecar (its backends are then counted by user name). */
  const createRole = async (role: string): Promise<string> => {
    const password = `lost-${Date.now()}`;
    await postgres.query(`CREATE ROLE ${role} LOGIN PASSWORD '${password}'`);
    await postgres.query(`GRANT ALL ON DATABASE app TO ${role}`);
    roles.push(role);
    return password;
  };

  after(async function () {
    if (!postgres) return;
    for (const role of roles) {
      await postgres.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1', [role]);
      await postgres.query(`DROP OWNED BY ${role}`).catch(() => undefined);
      await postgres.query(`DROP ROLE ${role}`).catch(() => undefined);
    }
  });

  /** A sidecar in transaction mode logged in as `role` with a grant of `grant`. */
  const startSidecar = async (role: string, password: string, grant: number, more: Partial<SidecarSettings> = {}): Promise<SidecarProcess> => {
    const dir = mkdtempSync(join(tmpdir(), 'poolkeeper-lost-node-'));
    const credentialsDir = join(dir, 'credentials');
    mkdirSync(credentialsDir);
    writeFileSync(join(credentialsDir, 'username'), role);
    writeFileSync(join(credentialsDir, 'password'), password);
    const settings: SidecarSettings = {
      listenHost: '127.0.0.1', listenPort: await freePort(),
      database: { host: '127.0.0.1', port: postgres.port, dbname: 'app', sslMode: 'disable' },
      drainTimeout: 1,
      pool: { mode: 'transaction', poolTimeout: 5, poolRecycle: 1800, poolPrePing: false, idleTimeout: 600 },
      ...more,
    };
    const sidecar = await SidecarProcess.start({ settings, credentialsDir, grant, logFile: join(dir, 'sidecar.log') });
    sidecars.push(sidecar);
    return sidecar;
  };

  /** A sidecar logged in as `role`, holding `held` idle server connections; returns the local ports of those connections. */
  const sidecarHolding = async (role: string, password: string, held: number): Promise<{ sidecar: SidecarProcess; ports: number[] }> => {
    const sidecar = await startSidecar(role, password, held);
    // Clients in transactions at once: the sidecar opens `held` server connections, idle in its pool after.
    const clients = await Promise.all(Array.from({ length: held }, async () => {
      const c = new pg.Client({ host: '127.0.0.1', port: sidecar.port, user: role, password, database: 'app' });
      await c.connect();
      await c.query('BEGIN');
      await c.query('SELECT 1');
      return c;
    }));
    await Promise.all(clients.map(async (c) => {
      await c.query('COMMIT');
      await c.end();
    }));
    const ports = (await postgres.query<{ client_port: number }>("SELECT client_port FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'", [role])).map((r) => r.client_port);
    assert.equal(ports.length, held, `the sidecar holds ${held} server connections`);
    return { sidecar, ports };
  };

  /** The local ports and pids of `role`'s backends. */
  const backendPorts = async (role: string): Promise<{ client_port: number; pid: number }[]> =>
    postgres.query<{ client_port: number; pid: number }>("SELECT client_port, pid FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'", [role]);

  const backendsOf = async (role: string): Promise<number> => Number((await postgres.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'", [role]))[0]?.n ?? 0);

  /** Cuts the sidecar's server connections off and kills it: nothing it sends reaches PostgreSQL any more, FIN and RST included. */
  const loseNode = async (sidecar: SidecarProcess, ports: readonly number[]): Promise<void> => {
    for (const rule of cutRules(postgres.port, ports)) {
      execFileSync('iptables', ['-w', '-I', ...rule]);
      rules.push(rule);
    }
    await sidecar.kill();
  };

  it('PostgreSQL ends a lost sidecar\'s connections within the departure hold once the role has the keepalives the controller advises, and keeps them with the kernel\'s defaults', async function () {
    const hold = 12;
    const suffix = Date.now().toString(36);
    const advised = `lost_advised_${suffix}`;
    const bare = `lost_bare_${suffix}`;
    // The kernel's keepalives, as the controller's own login reads them, and its advice for the hold.
    const shown = (await postgres.query<{ idle: string; interval: string; count: string }>("SELECT current_setting('tcp_keepalives_idle') AS idle, current_setting('tcp_keepalives_interval') AS interval, current_setting('tcp_keepalives_count') AS count"))[0]!;
    const keepalives: ServerSettings['keepalives'] = { idle: Number(shown.idle), interval: Number(shown.interval), count: Number(shown.count), userTimeoutMs: 0 };
    const advice = departureHoldAdvice(keepalives, hold, advised);
    assert.ok(advice !== undefined, `the kernel's keepalives (${JSON.stringify(keepalives)}) outlast a ${hold} s hold`);
    const statements = [...advice.matchAll(/ALTER ROLE [^;]+;/g)].map((m) => m[0]);
    assert.equal(statements.length, 4, advice);
    const advisedPassword = await createRole(advised);
    for (const sql of statements) await postgres.query(sql);
    const barePassword = await createRole(bare);
    const withAdvice = await sidecarHolding(advised, advisedPassword, 3);
    const without = await sidecarHolding(bare, barePassword, 3);
    await Promise.all([loseNode(withAdvice.sidecar, withAdvice.ports), loseNode(without.sidecar, without.ports)]);
    const lostAt = Date.now();
    let advisedLeft = 3;
    while (advisedLeft > 0 && Date.now() - lostAt < (hold + 10) * 1000) {
      await new Promise((r) => setTimeout(r, 250));
      advisedLeft = await backendsOf(advised);
    }
    const seconds = (Date.now() - lostAt) / 1000;
    console.log(`      a lost sidecar's 3 idle connections ended ${seconds.toFixed(1)} s after the loss with the advised keepalives (hold ${hold} s)`);
    assert.equal(advisedLeft, 0, `PostgreSQL still has ${advisedLeft} of the lost sidecar's connections ${seconds} s after the loss`);
    assert.ok(seconds <= hold, `they ended after ${seconds} s, beyond the hold of ${hold} s`);
    assert.equal(await backendsOf(bare), 3, 'with the kernel\'s keepalives PostgreSQL still has all of them: what the hold alone could not cover');
  });
  it('the database host lost: a statement waiting on it and one sent to it end with 08006 within the keepalive timeout, a long statement is not cut, and the pool serves again once the host is back', async function () {
    const role = `lost_db_${Date.now().toString(36)}`;
    const password = await createRole(role);
    // Short timeouts for the test (the default gives up after about 30 s): silent for 2 s, 3 probes a second apart; data unacknowledged for 5 s.
    const sidecar = await startSidecar(role, password, 2, { serverKeepalive: { idleSeconds: 2, intervalSeconds: 1, count: 3, userTimeoutMs: 5_000 } });
    const client = async (): Promise<pg.Client> => {
      const c = new pg.Client({ host: '127.0.0.1', port: sidecar.port, user: role, password, database: 'app' });
      c.on('error', () => undefined);
      await c.connect();
      return c;
    };
    // A statement that answers nothing for longer than the keepalive timeout: the host's kernel answers the probes.
    const long = await client();
    assert.equal((await long.query<{ v: string }>("SELECT pg_sleep(7)::text || 'done' AS v")).rows[0]?.v, 'done');
    await long.end();
    const waiting = await client();
    const sending = await client();
    const slept = waiting.query('SELECT pg_sleep(120)').then(() => undefined, (err: Error & { code?: string }) => err);
    const deadline = Date.now() + 10_000;
    while ((await postgres.query<{ n: number }>("SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = $1 AND query LIKE 'SELECT pg_sleep(120)%' AND state = 'active'", [role]))[0]?.n !== 1) {
      assert.ok(Date.now() < deadline, 'the long statement never started');
      await new Promise((r) => setTimeout(r, 50));
    }
    // A second server connection (the first is busy), idle in the pool after this.
    await sending.query('SELECT 1');
    const lost = await backendPorts(role);
    assert.equal(lost.length, 2, 'one backend running the statement, one idle in the pool');
    for (const rule of cutRules(postgres.port, lost.map((b) => b.client_port))) {
      execFileSync('iptables', ['-w', '-I', ...rule]);
      rules.push(rule);
    }
    const cutAt = Date.now();
    // Sent on the idle server connection (poolPrePing off): never acknowledged.
    const sent = sending.query('SELECT 2').then(() => undefined, (err: Error & { code?: string }) => err);
    const within = 15_000;
    const outcome = async (p: Promise<(Error & { code?: string }) | undefined>, what: string): Promise<number> => {
      const result = await Promise.race([p, new Promise<'hung'>((r) => setTimeout(() => r('hung'), within - (Date.now() - cutAt)))]);
      assert.notEqual(result, 'hung', `${what}: no answer ${within / 1000} s after the host was cut off`);
      assert.ok(result instanceof Error, `${what}: succeeded`);
      assert.equal(result.code, '08006', `${what}: ${result.message}`);
      assert.match(result.message, /database host stopped answering/);
      return (Date.now() - cutAt) / 1000;
    };
    const [waited, sentFor] = await Promise.all([outcome(slept, 'the statement in flight'), outcome(sent, 'the statement sent after the cut')]);
    console.log(`      ended ${waited.toFixed(1)} s (waiting) and ${sentFor.toFixed(1)} s (sent) after the cut`);
    for (const rule of rules.splice(0)) execFileSync('iptables', ['-w', '-D', ...rule]);
    // The host is back: the backends cut off still live on PostgreSQL; the sidecar counts them until it has ended them.
    const again = await client();
    assert.equal((await again.query<{ v: number }>('SELECT 3 AS v')).rows[0]?.v, 3);
    await again.end();
    const lostPids = new Set(lost.map((b) => b.pid));
    const until = Date.now() + 10_000;
    while ((await backendPorts(role)).some((b) => lostPids.has(b.pid))) {
      assert.ok(Date.now() < until, 'the backends cut off were never ended');
      await new Promise((r) => setTimeout(r, 200));
    }
  });
});
