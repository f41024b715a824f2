/**
 * The monitoring component (deploy/components/monitoring): every metric the
 * alerts and the dashboard name is one the code registers, with the labels it
 * has; and `promtool test rules` runs each alert on synthetic series, once where
 * it must fire and at least once where it must not.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Registry } from 'prom-client';
import { parse, stringify } from 'yaml';
import { ControllerMetrics } from '../../src/controller/metrics.ts';
import { SidecarMetrics, type SidecarMetricsSource } from '../../src/sidecar/metrics.ts';
import { AdmissionMetrics } from '../../src/webhook/admission.ts';

const COMPONENT = 'deploy/components/monitoring';

interface Rule { alert?: string; record?: string; expr: string; for?: string; labels?: Record<string, string>; annotations?: Record<string, string> }
interface PrometheusRule { spec: { groups: { name: string; rules: Rule[] }[] } }
interface Panel { type: string; title: string; id: number; targets?: { expr: string }[] }

const prometheusRule = parse(readFileSync(join(COMPONENT, 'prometheusrule.yaml'), 'utf8')) as PrometheusRule;
const alerts = prometheusRule.spec.groups.flatMap((g) => g.rules).filter((r): r is Rule & { alert: string } => r.alert !== undefined);
const dashboard = JSON.parse(readFileSync(join(COMPONENT, 'dashboards', 'poolkeeper.json'), 'utf8')) as { panels: Panel[]; templating: { list: { name: string; query?: unknown; definition?: string }[] } };
const dashboardExprs = [
  ...dashboard.panels.flatMap((p) => (p.targets ?? []).map((t) => t.expr)),
  ...dashboard.templating.list.flatMap((v) => (v.definition ? [v.definition] : [])),
];

/** Labels Prometheus adds to every scraped series (PodMonitor target labels, and the sidecar's `connection` relabel). */
const TARGET_LABELS = new Set(['namespace', 'pod', 'container', 'endpoint', 'job', 'instance', 'connection', 'le']);

/** name -> label names, from the metric classes themselves (so a rename in the code breaks this test). */
function registeredMetrics(): Map<string, Set<string>> {
  const registry = new Registry();
  new ControllerMetrics(registry);
  new SidecarMetrics(registry);
  new AdmissionMetrics(registry);
  const out = new Map<string, Set<string>>();
  for (const metric of registry.getMetricsAsArray()) {
    const { name, labelNames, type } = metric as unknown as { name: string; labelNames?: string[]; type: string };
    const labels = new Set(labelNames ?? []);
    out.set(name, labels);
    if (type === 'histogram') for (const suffix of ['_bucket', '_sum', '_count']) out.set(`${name}${suffix}`, suffix === '_bucket' ? new Set([...labels, 'le']) : labels);
  }
  return out;
}

/** Every source file's text under src/, to find label values such as 'pool-timeout'. */
function sourceText(dir = 'src'): string {
  return readdirSync(dir).map((entry) => {
    const path = join(dir, entry);
    return statSync(path).isDirectory() ? sourceText(path) : path.endsWith('.ts') ? readFileSync(path, 'utf8') : '';
  }).join('\n');
}

/** Metric names, matchers and `by (...)` labels an expression uses. */
function uses(expr: string): { metrics: { name: string; matchers: [string, string][] }[]; groupings: string[] } {
  const metrics = [...expr.matchAll(/\b(poolkeeper_[a-z0-9_]+)(\{([^}]*)\})?/g)].map((m) => ({
    name: m[1]!,
    matchers: [...(m[3] ?? '').matchAll(/([a-z_]+)\s*=~?\s*"([^"]*)"/g)].map((x) => [x[1]!, x[2]!] as [string, string]),
  }));
  const groupings = [...expr.matchAll(/\b(?:by|on)\s*\(([^)]*)\)/g)].flatMap((m) => m[1]!.split(',').map((s) => s.trim()).filter(Boolean));
  return { metrics, groupings };
}

describe('monitoring: alerts and dashboard', function () {
  it('exports poolkeeper_sidecar_tunnel_up only for a sidecar with a tunnel (PoolkeeperTunnelDown would fire on a 0 for every other pod)', async function () {
    const source = (tunnelUp: boolean | undefined): SidecarMetricsSource => ({
      serverConnectionsByState: () => new Proxy({}, { get: () => 0 }) as ReturnType<SidecarMetricsSource['serverConnectionsByState']>, clientsActive: () => 0, clientsWaiting: () => 0, clientsConnected: () => 0,
      grant: () => ({ connections: 0, generation: 0, acknowledgedGeneration: 0 }), credentialsGeneration: () => 'g', tunnelUp: () => tunnelUp, serverReachable: () => undefined,
      transactions: () => 0, pinnedClients: () => new Proxy({}, { get: () => 0 }) as ReturnType<SidecarMetricsSource['pinnedClients']>,
    });
    const samples = async (tunnelUp: boolean | undefined): Promise<string[]> => {
      const registry = new Registry();
      new SidecarMetrics(registry).bind(source(tunnelUp));
      return (await registry.metrics()).split('\n').filter((line) => line.startsWith('poolkeeper_sidecar_tunnel_up'));
    };
    assert.deepEqual(await samples(undefined), []);
    assert.deepEqual(await samples(false), ['poolkeeper_sidecar_tunnel_up 0']);
    assert.deepEqual(await samples(true), ['poolkeeper_sidecar_tunnel_up 1']);
  });

  const registered = registeredMetrics();
  const source = sourceText();
  const everything = [...alerts.map((a) => a.expr), ...dashboardExprs];

  it('name only metrics the controller, sidecar and webhook register, with their labels and label values', function () {
    const used = new Set<string>();
    for (const expr of everything) {
      const { metrics, groupings } = uses(expr);
      for (const { name, matchers } of metrics) {
        used.add(name.replace(/_(bucket|sum|count)$/, ''));
        const labels = registered.get(name);
        assert.ok(labels, `${name} (in ${expr.trim().slice(0, 80)}...) is not a metric the code registers`);
        for (const [label, value] of matchers) {
          assert.ok(labels.has(label) || TARGET_LABELS.has(label), `${name} has no label ${label}`);
          if (labels.has(label) && !value.includes('$')) assert.ok(source.includes(`'${value}'`), `no ${label}="${value}" in the source of ${name}`);
        }
      }
      const allLabels = new Set([...metrics.flatMap((m) => [...(registered.get(m.name) ?? [])]), ...TARGET_LABELS]);
      for (const label of groupings) assert.ok(allLabels.has(label), `grouping label ${label} in ${expr.trim().slice(0, 80)} is on none of its metrics`);
    }
    // The dashboard shows the fleet: these must stay on it.
    for (const name of ['poolkeeper_server_limit_connections', 'poolkeeper_server_allocated_connections', 'poolkeeper_consumer_per_pod_budget_connections',
      'poolkeeper_connection_pods', 'poolkeeper_sidecar_client_wait_seconds', 'poolkeeper_sidecar_errors_total', 'poolkeeper_sidecar_tunnel_reconnects_total']) {
      assert.ok(dashboardExprs.some((e) => e.includes(name)), `the dashboard shows ${name}`);
    }
    assert.ok(used.size >= 20, `the dashboard and alerts use ${used.size} metrics`);
  });

  it('has a summary, description, runbook and severity on every alert, and unique panel ids', function () {
    assert.ok(alerts.length >= 5);
    for (const alert of alerts) {
      for (const key of ['summary', 'description', 'runbook']) assert.ok((alert.annotations?.[key] ?? '').length > 20, `${alert.alert} has a ${key}`);
      assert.match(alert.labels?.severity ?? '', /^(warning|critical)$/, `${alert.alert} has a severity`);
    }
    const ids = dashboard.panels.map((p) => p.id);
    assert.equal(new Set(ids).size, ids.length);
    assert.ok(dashboard.panels.every((p) => p.type === 'row' || (p.targets ?? []).length > 0), 'every panel queries something');
  });

  describe('promtool', function () {
    this.timeout(60_000);
    let promtool = '';
    let dir = '';

    before(function () {
      promtool = execFileSync('bash', ['scripts/build-tools.sh', 'path', 'promtool'], { encoding: 'utf8' }).trim();
      if (!existsSync(promtool)) {
        console.log(`      skipped: promtool is not built (${promtool}); run bash scripts/build-tools.sh`);
        this.skip();
      }
      dir = mkdtempSync(join(tmpdir(), 'poolkeeper-promtool-'));
      writeFileSync(join(dir, 'rules.yaml'), stringify({ groups: prometheusRule.spec.groups }));
    });

    after(function () {
      if (dir) rmSync(dir, { recursive: true, force: true });
    });

    it('checks the rules', function () {
      const check = spawnSync(promtool, ['check', 'rules', join(dir, 'rules.yaml')], { encoding: 'utf8' });
      assert.equal(check.status, 0, check.stdout + check.stderr);
      assert.match(check.stdout, new RegExp(`SUCCESS: ${alerts.length} rules found`));
    });

    it('fires each alert on synthetic series where it must, and not where it must not', function () {
      const cases = ruleCases();
      for (const alert of alerts) {
        assert.ok(cases.some((c) => c.alert === alert.alert && c.firing.length > 0), `a case where ${alert.alert} fires`);
        assert.ok(cases.some((c) => c.alert === alert.alert && c.firing.length === 0), `a case where ${alert.alert} does not fire`);
      }
      const byName = new Map(alerts.map((a) => [a.alert, a]));
      const tests = cases.map((c) => ({
        name: `${c.alert}: ${c.name}`,
        interval: '1m',
        input_series: c.series.map(([series, values]) => ({ series, values })),
        alert_rule_test: [{
          eval_time: c.evalTime ?? '15m',
          alertname: c.alert,
          exp_alerts: c.firing.map((f) => {
            const rule = byName.get(c.alert)!;
            const render = (text: string): string => text
              .replace(/\{\{ \$labels\.([a-z_]+) \}\}/g, (_m, label: string) => f.labels[label] ?? '')
              .replace(/\{\{ \$value[^}]*\}\}/g, f.value);
            return {
              exp_labels: { ...f.labels, ...rule.labels },
              exp_annotations: Object.fromEntries(Object.entries(rule.annotations ?? {}).map(([k, v]) => [k, render(v)])),
            };
          }),
        }],
      }));
      writeFileSync(join(dir, 'tests.yaml'), stringify({ rule_files: ['rules.yaml'], evaluation_interval: '1m', tests }));
      const run = spawnSync(promtool, ['test', 'rules', join(dir, 'tests.yaml')], { encoding: 'utf8' });
      assert.equal(run.status, 0, run.stdout + run.stderr);
      assert.match(run.stdout, /SUCCESS/);
    });
  });
});

interface RuleCase {
  alert: string;
  name: string;
  /** [series, promtool expanding notation] */
  series: [string, string][];
  evalTime?: string;
  /** Alerts expected to be firing: their labels from the expression, and how $value renders. */
  firing: { labels: Record<string, string>; value: string }[];
}

/** Synthetic series, as the PodMonitors label them: controller series with the connection's namespace and the controller pod. */
function ruleCases(): RuleCase[] {
  const leaderA: [string, string] = ['poolkeeper_controller_leader{namespace="poolkeeper-system", pod="poolkeeper-a"}', '1x30'];
  const followerB: [string, string] = ['poolkeeper_controller_leader{namespace="poolkeeper-system", pod="poolkeeper-b"}', '0x30'];
  const orders = { namespace: 'shop', connection: 'orders-db' };
  const ctl = (metric: string, pod: string, values: string, extra = ''): [string, string] => [`${metric}{namespace="shop", connection="orders-db", pod="${pod}"${extra}}`, values];
  const side = (metric: string, pod: string, values: string, extra = ''): [string, string] => [`${metric}{namespace="shop", connection="orders-db", pod="${pod}", container="poolkeeper-sidecar"${extra}}`, values];
  const waits = (pod: string, slowFrom: number): [string, string][] => ['0.0005', '0.001', '0.005', '0.01', '0.05', '0.1', '0.5', '1', '5', '10', '30', '+Inf']
    .map((le) => side('poolkeeper_sidecar_client_wait_seconds_bucket', pod, Number(le) >= slowFrom || le === '+Inf' ? '0+10x30' : '0x30', `, le="${le}"`));
  return [
    { alert: 'PoolkeeperOversubscribed', name: 'the leader reports it for 10 minutes', series: [leaderA, followerB, ctl('poolkeeper_connection_oversubscribed', 'poolkeeper-a', '1x30')], firing: [{ labels: orders, value: '1' }] },
    { alert: 'PoolkeeperOversubscribed', name: 'only a follower still exports it', series: [leaderA, followerB, ctl('poolkeeper_connection_oversubscribed', 'poolkeeper-a', '0x30'), ctl('poolkeeper_connection_oversubscribed', 'poolkeeper-b', '1x30')], firing: [] },
    { alert: 'PoolkeeperOversubscribed', name: 'for 6 minutes only', series: [leaderA, ctl('poolkeeper_connection_oversubscribed', 'poolkeeper-a', '0x9 1x21')], firing: [] },

    { alert: 'PoolkeeperAllocatedAboveLimit', name: '50 allocated, limit 48', series: [leaderA, ['poolkeeper_server_limit_connections{namespace="poolkeeper-system", pod="poolkeeper-a", server="pg.internal:5432"}', '48x30'], ['poolkeeper_server_allocated_connections{namespace="poolkeeper-system", pod="poolkeeper-a", server="pg.internal:5432"}', '50x30']], firing: [{ labels: { namespace: 'poolkeeper-system', pod: 'poolkeeper-a', server: 'pg.internal:5432' }, value: '50' }] },
    { alert: 'PoolkeeperAllocatedAboveLimit', name: 'allocated at the limit', series: [leaderA, ['poolkeeper_server_limit_connections{namespace="poolkeeper-system", pod="poolkeeper-a", server="pg.internal:5432"}', '48x30'], ['poolkeeper_server_allocated_connections{namespace="poolkeeper-system", pod="poolkeeper-a", server="pg.internal:5432"}', '48x30']], firing: [] },

    { alert: 'PoolkeeperLimitUnknown', name: 'two sidecars, no budget from the leader', series: [leaderA, side('poolkeeper_sidecar_grant_connections', 'web-1', '0x30'), side('poolkeeper_sidecar_grant_connections', 'web-2', '0x30'), ['poolkeeper_connection_pods{namespace="shop", connection="other-db", pod="poolkeeper-a"}', '3x30']], firing: [{ labels: orders, value: '2' }] },
    { alert: 'PoolkeeperLimitUnknown', name: 'the leader budgets the connection', series: [leaderA, side('poolkeeper_sidecar_grant_connections', 'web-1', '8x30'), ctl('poolkeeper_connection_pods', 'poolkeeper-a', '1x30')], firing: [] },
    { alert: 'PoolkeeperLimitUnknown', name: 'no controller at all (PoolkeeperControllerNoLeader says so)', series: [side('poolkeeper_sidecar_grant_connections', 'web-1', '0x30')], firing: [] },

    { alert: 'PoolkeeperSidecarUnresponsive', name: 'two silent sidecars', series: [leaderA, ctl('poolkeeper_connection_unresponsive_sidecars', 'poolkeeper-a', '2x30')], firing: [{ labels: orders, value: '2' }] },
    { alert: 'PoolkeeperSidecarUnresponsive', name: 'none silent', series: [leaderA, ctl('poolkeeper_connection_unresponsive_sidecars', 'poolkeeper-a', '0x30')], firing: [] },

    { alert: 'PoolkeeperGrantNotAcknowledged', name: 'generation 7 received, 6 acknowledged for 30 minutes', series: [side('poolkeeper_sidecar_grant_generation', 'web-1', '7x30', ', kind="received"'), side('poolkeeper_sidecar_grant_generation', 'web-1', '6x30', ', kind="acknowledged"')], firing: [{ labels: { ...orders, pod: 'web-1' }, value: '7' }] },
    { alert: 'PoolkeeperGrantNotAcknowledged', name: 'acknowledged after 8 minutes', series: [side('poolkeeper_sidecar_grant_generation', 'web-1', '7x30', ', kind="received"'), side('poolkeeper_sidecar_grant_generation', 'web-1', '6x8 7x22', ', kind="acknowledged"')], firing: [] },

    { alert: 'PoolkeeperClientsWaitingNearPoolTimeout', name: 'every wait over 10 s', series: [...waits('web-1', 30), side('poolkeeper_sidecar_client_wait_seconds_count', 'web-1', '0+10x30')], firing: [{ labels: orders, value: '29.8s' }] },
    { alert: 'PoolkeeperClientsWaitingNearPoolTimeout', name: 'every wait under 0.1 s', series: [...waits('web-1', 0.1), side('poolkeeper_sidecar_client_wait_seconds_count', 'web-1', '0+10x30')], firing: [] },
    { alert: 'PoolkeeperClientsWaitingNearPoolTimeout', name: 'no client at all', series: [...waits('web-1', 0).map(([s]) => [s, '0x30'] as [string, string])], firing: [] },

    { alert: 'PoolkeeperPoolTimeouts', name: 'one 53300 a second', series: [side('poolkeeper_sidecar_errors_total', 'web-1', '0+60x30', ', kind="pool-timeout"')], firing: [{ labels: orders, value: '1' }] },
    { alert: 'PoolkeeperPoolTimeouts', name: 'other errors only', series: [side('poolkeeper_sidecar_errors_total', 'web-1', '0x30', ', kind="pool-timeout"'), side('poolkeeper_sidecar_errors_total', 'web-1', '0+60x30', ', kind="server-lost"')], firing: [] },

    { alert: 'PoolkeeperLoginRefused', name: 'every client refused', series: [side('poolkeeper_sidecar_errors_total', 'web-1', '0+60x30', ', kind="login-refused"')], firing: [{ labels: orders, value: '1' }] },
    { alert: 'PoolkeeperLoginRefused', name: 'pool timeouts only', series: [side('poolkeeper_sidecar_errors_total', 'web-1', '0x30', ', kind="login-refused"'), side('poolkeeper_sidecar_errors_total', 'web-1', '0+60x30', ', kind="pool-timeout"')], firing: [] },

    { alert: 'PoolkeeperTunnelDown', name: 'down for 30 minutes', series: [side('poolkeeper_sidecar_tunnel_up', 'web-1', '0x30'), side('poolkeeper_sidecar_tunnel_up', 'web-2', '1x30')], firing: [{ labels: { ...orders, pod: 'web-1' }, value: '0' }] },
    { alert: 'PoolkeeperTunnelDown', name: 'up', series: [side('poolkeeper_sidecar_tunnel_up', 'web-1', '1x30')], firing: [] },

    { alert: 'PoolkeeperSidecarsCannotReachDatabase', name: 'two of three pods fail their logins', series: [side('poolkeeper_sidecar_server_reachable', 'web-1', '0x30', ', reason="LoginFailed"'), side('poolkeeper_sidecar_server_reachable', 'web-2', '0x30', ', reason="LoginFailed"'), side('poolkeeper_sidecar_server_reachable', 'web-3', '1x30', ', reason="LoggedIn"')], firing: [{ labels: { ...orders, reason: 'LoginFailed' }, value: '2' }] },
    { alert: 'PoolkeeperSidecarsCannotReachDatabase', name: 'reachable again within 5 minutes', series: [side('poolkeeper_sidecar_server_reachable', 'web-1', '0x3 1x27', ', reason="ConnectionFailed"')], firing: [] },

    { alert: 'PoolkeeperControllerNoLeader', name: 'both replicas follow', series: [['poolkeeper_controller_leader{namespace="poolkeeper-system", pod="poolkeeper-a"}', '0x30'], followerB], firing: [{ labels: {}, value: '0' }] },
    { alert: 'PoolkeeperControllerNoLeader', name: 'no controller scraped', series: [['up{job="other"}', '1x30']], firing: [{ labels: {}, value: '0' }] },
    { alert: 'PoolkeeperControllerNoLeader', name: 'one leader', series: [leaderA, followerB], firing: [] },

    { alert: 'PoolkeeperAnotherInstallLeads', name: 'the second install stands by', series: [['poolkeeper_controller_other_install_leading{namespace="team-pool", pod="poolkeeper-c"}', '1x30'], ['poolkeeper_controller_other_install_leading{namespace="poolkeeper-system", pod="poolkeeper-a"}', '0x30']], firing: [{ labels: { namespace: 'team-pool' }, value: '1' }] },
    { alert: 'PoolkeeperAnotherInstallLeads', name: 'the other install went away within 10 minutes', series: [['poolkeeper_controller_other_install_leading{namespace="team-pool", pod="poolkeeper-c"}', '1x5 0x25']], firing: [] },
  ];
}
