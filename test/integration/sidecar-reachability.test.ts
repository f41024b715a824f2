/**
 * A sidecar's report of whether it reaches its database, with hysteresis: a
 * failed login while a server connection is live changes nothing; one with
 * none live makes it unreachable, with the server's SQLSTATE and message.
 *
 * Sidecars that cannot log in to the database while the controller can: the
 * controller's own login check passes (its Secret is right), but the
 * credentials mounted in the pods are wrong. Real sidecars (run by the
 * kubelet simulator) report it in their PoolMember status, the controller
 * turns it into Degraded=True SidecarsCannotConnect (and Ready=False once
 * every sidecar fails) with one Warning Event, and the condition clears once
 * the pods' credentials are right again, without any client asking.
 */
import assert from 'node:assert/strict';
import pg from 'pg';
import pino from 'pino';
import type { PoolMember } from '../../src/api/index.ts';
import type { BudgetController } from '../../src/controller/controller.ts';
import type { KubeControlPlane } from '../../src/devenv/kube.ts';
import { KubeletSimulator, writeSecretVolume, type SimulatedPod } from '../../src/devenv/kubelet-sim.ts';
import type { PostgresServer } from '../../src/devenv/postgres.ts';
import type { DatabaseReachability } from '../../src/sidecar/settings.ts';
import { createWorkload, eventually, freshNamespace, installCrds, startController } from '../support/budget-fixture.ts';
import { testEnvironment } from '../support/hooks.ts';
import { startTestSidecar } from '../support/sidecar-fixture.ts';

interface Condition { type: string; status: string; reason: string; message: string; lastTransitionTime?: string }

/** One login and query through `pod`'s sidecar; its error, if any (not awaited by the callers that only need the sidecar to try). */
async function tryQuery(pod: SimulatedPod): Promise<string | undefined> {
  const client = new pg.Client({ host: '127.0.0.1', port: pod.sidecar!.port, user: 'app', database: 'app', connectionTimeoutMillis: 20_000 });
  client.on('error', () => undefined);
  try {
    await client.connect();
    await client.query('SELECT 1');
    return undefined;
  } catch (err) {
    return (err as Error).message;
  } finally {
    await client.end().catch(() => undefined);
  }
}

async function reachableGauge(pod: SimulatedPod): Promise<string | undefined> {
  const text = await (await fetch(`http://127.0.0.1:${pod.sidecar!.adminPort}/metrics`)).text();
  return text.split('\n').find((l) => l.startsWith('poolkeeper_sidecar_server_reachable{'))?.replace(/^poolkeeper_sidecar_server_reachable/, '');
}

describe('sidecars that cannot reach the database while the controller can', function () {
  this.timeout(120_000);
  let kube: KubeControlPlane;
  let postgres: PostgresServer;
  let controller: BudgetController | undefined;
  let kubelet: KubeletSimulator | undefined;
  let namespace: string;

  const conditionsOf = async (): Promise<Condition[]> => ((JSON.parse(await kube.kubectlAsync(['-n', namespace, 'get', 'dbc', 'orders', '-o', 'json'])) as { status?: { conditions?: Condition[] } }).status?.conditions ?? []);
  const members = async (): Promise<PoolMember[]> => (JSON.parse(await kube.kubectlAsync(['-n', namespace, 'get', 'pm', '-o', 'json'])) as { items: PoolMember[] }).items;
  const warnings = async (reason: string): Promise<number> => {
    const list = JSON.parse(await kube.kubectlAsync(['-n', namespace, 'get', 'events', '--field-selector', `reason=${reason}`, '-o', 'json'])) as { items: Array<{ count?: number }> };
    return list.items.reduce((sum, e) => sum + (e.count ?? 1), 0);
  };

  before(async function () {
    [kube, postgres] = await Promise.all([testEnvironment().kube(), testEnvironment().postgres()]);
    await installCrds(kube);
    // Pods bound to a node that does not exist are force-deleted as orphans after about 40 s.
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Node', metadata: { name: 'simulated-node' } }));
    namespace = freshNamespace('reach');
    // The controller's Secret is right.
    createWorkload(kube, { namespace, connection: 'orders', deployment: 'web', replicas: 3, secret: 'creds', username: postgres.app.user, password: postgres.app.password });
    kube.kubectl(['apply', '-f', '-'], JSON.stringify({
      apiVersion: 'poolkeeper.dev/v1alpha1', kind: 'DatabaseConnection', metadata: { name: 'orders', namespace },
      spec: {
        database: { host: postgres.host, port: postgres.port, dbname: 'app', sslMode: 'disable', credentialsSecretRef: { name: 'creds' } },
        maxConnections: 6, reserve: 0, consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } }],
        pool: { mode: 'transaction', poolTimeout: 2 },
      },
    }));
    ({ controller } = await startController(kube));
    // The copy in the pods' volumes is not.
    kubelet = new KubeletSimulator(kube, namespace, { username: postgres.app.user, password: 'not-the-password' }, pino({ level: process.env.TEST_LOG ?? 'silent' }, process.stderr));
    await kubelet.start();
  });

  after(async function () {
    await kubelet?.stop();
    await controller?.stop();
    // Every test shares the one PostgreSQL server, whose limit all DatabaseConnections share: this one must be
    // gone before the next test plans it (the namespace's pods, on no node, linger for minutes).
    if (namespace) await kube.kubectlAsync(['-n', namespace, 'delete', 'dbc', '--all', '--wait=true']);
    if (namespace) await kube.kubectlAsync(['delete', 'namespace', namespace, '--wait=false']).catch(() => undefined);
  });

  it('reports Degraded SidecarsCannotConnect naming the cause within seconds, one Event, and clears once the pods\' credentials are fixed', async function () {
    await eventually('3 sidecars granted and the controller\'s own login Ready', async () => {
      const ready = (await conditionsOf()).find((c) => c.type === 'Ready');
      return kubelet!.live().length === 3 && kubelet!.live().every((p) => (p.sidecar?.sidecar.status().acknowledgedConnections ?? 0) > 0) && ready?.status === 'True';
    }, 60_000).catch((err: Error) => {
      throw new Error(`${err.message}; kubelet failures ${JSON.stringify(kubelet!.failures)}`);
    });
    const pods = kubelet!.live().sort((a, b) => a.name.localeCompare(b.name));
    // Nothing known before any login: no condition in the PoolMembers, no gauge.
    assert.ok((await members()).every((m) => m.status?.conditions === undefined), 'a reachability condition before any login');
    assert.equal(await reachableGauge(pods[0]!), undefined);

    // Each app tries once: its sidecar's login is refused.
    const started = Date.now();
    const tries = Promise.all(pods.map(tryQuery));
    let degraded: Condition | undefined;
    let ready: Condition | undefined;
    await eventually('Degraded SidecarsCannotConnect', async () => {
      const conditions = await conditionsOf();
      degraded = conditions.find((c) => c.type === 'Degraded');
      ready = conditions.find((c) => c.type === 'Ready');
      return degraded?.reason === 'SidecarsCannotConnect' && /^3 of 3/.test(degraded.message);
    }, 15_000).catch((err: Error) => {
      throw new Error(`${err.message}: ${JSON.stringify(degraded)}`);
    });
    const seconds = (Date.now() - started) / 1000;
    assert.ok(seconds < 10, `took ${seconds} s`);
    // The server's own refusal, at once; or, for a client that came while the sidecar's credentials were new to
    // it (a rotation half done is waited on), after poolTimeout with it as the cause.
    for (const e of await tries) assert.match(e ?? '', /^password authentication failed for user "app"$|no server connection available within 2 s; last connection attempt: server refused the login: password authentication failed/);
    assert.equal(degraded?.status, 'True');
    assert.match(degraded.message, /SQLSTATE 28P01: password authentication failed for user "app"/);
    for (const pod of pods) assert.match(degraded.message, new RegExp(pod.name));
    assert.doesNotMatch(degraded.message, /not-the-password/);
    // Every sidecar fails: the connection cannot serve, whatever the controller's own check says.
    assert.equal(ready?.status, 'False');
    assert.equal(ready?.reason, 'SidecarsCannotConnect');
    for (const m of await members()) {
      const c = m.status?.conditions?.find((x) => x.type === 'DatabaseReachable');
      assert.equal(c?.status, 'False', m.metadata.name);
      assert.equal(c?.reason, 'LoginFailed');
    }
    assert.equal(await reachableGauge(pods[0]!), '{reason="LoginFailed"} 0');
    console.log(`      Degraded SidecarsCannotConnect ${seconds.toFixed(1)} s after the apps' first tries: ${degraded.message.slice(0, 160)}...`);

    // More failures, and heartbeats, change nothing: the Event stays one, the PoolMember conditions keep their time.
    const before = (await members()).map((m) => m.status?.conditions?.[0]?.lastTransitionTime);
    await Promise.all(pods.map(tryQuery));
    await new Promise((r) => setTimeout(r, 3_000));
    assert.deepEqual((await members()).map((m) => m.status?.conditions?.[0]?.lastTransitionTime), before);
    await eventually('the Warning Event', async () => (await warnings('SidecarsCannotConnect')) >= 1, 10_000);
    assert.equal(await warnings('SidecarsCannotConnect'), 1);

    // One pod's credentials fixed: it rechecks at once, without a client; the others still fail.
    writeSecretVolume(pods[0]!.credentialsDir, { username: postgres.app.user, password: postgres.app.password });
    await eventually('2 of 3', async () => {
      const conditions = await conditionsOf();
      degraded = conditions.find((c) => c.type === 'Degraded');
      ready = conditions.find((c) => c.type === 'Ready');
      return /^2 of 3/.test(degraded?.message ?? '') && ready?.status === 'True';
    }, 15_000).catch((err: Error) => {
      throw new Error(`${err.message}: ${JSON.stringify([degraded, ready])}`);
    });
    assert.doesNotMatch(degraded.message, new RegExp(`${pods[0]!.name}[,)]`));
    assert.equal(await reachableGauge(pods[0]!), '{reason="LoggedIn"} 1');

    // All fixed: the condition clears.
    kubelet!.rotate({ username: postgres.app.user, password: postgres.app.password });
    await eventually('Degraded cleared', async () => (await conditionsOf()).find((c) => c.type === 'Degraded')?.status === 'False', 15_000);
    for (const m of await members()) assert.equal(m.status?.conditions?.find((x) => x.type === 'DatabaseReachable')?.status, 'True', m.metadata.name);
    for (const pod of pods) assert.equal(await tryQuery(pod), undefined);
    assert.equal(await warnings('SidecarsCannotConnect'), 1);
  });
});

describe('a sidecar\'s database reachability', function () {
  this.timeout(60_000);

  it('turns unreachable only after a failed login with no live server connection, and reachable after the next login that succeeds', async function () {
    const postgres = await testEnvironment().postgres();
    const role = { user: `reach_${Math.random().toString(36).slice(2, 8)}`, password: 'reach-secret' };
    await postgres.query(`CREATE ROLE ${role.user} LOGIN PASSWORD '${role.password}'`);
    const sidecar = await startTestSidecar(postgres, { role, grant: 2, pool: { poolTimeout: 1 } });
    const seen: Array<DatabaseReachability | undefined> = [];
    sidecar.sidecar.onStatus((s) => {
      if (s.databaseReachable !== seen.at(-1)) seen.push(s.databaseReachable);
    });
    const client = (): pg.Client => {
      const c = new pg.Client({ host: '127.0.0.1', port: sidecar.port, user: role.user, database: 'app' });
      c.on('error', () => undefined);
      return c;
    };
    const once = async (): Promise<string | undefined> => {
      const c = client();
      try {
        await c.connect();
        await c.query('SELECT 1');
        return undefined;
      } catch (err) {
        return (err as Error).message;
      } finally {
        await c.end().catch(() => undefined);
      }
    };
    try {
      assert.equal(sidecar.sidecar.status().databaseReachable, undefined);
      // A client holds the one live server connection in a transaction.
      const holder = client();
      await holder.connect();
      await holder.query('BEGIN');
      await holder.query('SELECT 1');
      assert.equal(sidecar.sidecar.status().databaseReachable?.reachable, true);
      // New logins are refused now; the live connection still reaches the server.
      await postgres.query(`ALTER ROLE ${role.user} NOLOGIN`);
      // It waits (a connection with these credentials is live), and after poolTimeout gets the server's refusal.
      assert.match(await once() ?? '', /is not permitted to log in|no server connection available/);
      assert.equal(sidecar.sidecar.status().databaseReachable?.reachable, true, 'a failed login with a live server connection changed it');
      // The live connection goes: the next failed login tells.
      await holder.query('COMMIT');
      await postgres.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1', [role.user]);
      await holder.end();
      await eventually('no live server connection', () => sidecar.sidecar.status().heldConnections === 0, 10_000);
      // The refusal at once (its grace, poolTimeout from the first refusal, is over), or after poolTimeout.
      assert.match(await once() ?? '', /is not permitted to log in|no server connection available/);
      const down = sidecar.sidecar.status().databaseReachable;
      assert.equal(down?.reachable, false);
      assert.equal(down?.reason, 'LoginFailed');
      assert.equal(down?.message, `SQLSTATE 28000: role "${role.user}" is not permitted to log in`);
      assert.doesNotMatch(JSON.stringify(down), /reach-secret/);
      // Failing again changes nothing (no status write).
      await once();
      assert.equal(sidecar.sidecar.status().databaseReachable, down);
      await postgres.query(`ALTER ROLE ${role.user} LOGIN`);
      // Within the login retries' backoff.
      await eventually('a query through again', async () => (await once()) === undefined, 10_000);
      assert.deepEqual(seen.map((r) => r?.reachable), [true, false, true]);
      assert.equal(seen.at(-1)?.reason, 'LoggedIn');
    } finally {
      await sidecar.stop();
      await postgres.query(`DROP ROLE IF EXISTS ${role.user}`).catch(() => undefined);
    }
  });
});
