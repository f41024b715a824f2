/**
 * The budget planner alone, in process: one connection, one consumer, N pods
 * on a grant table, all acknowledged; CPU milliseconds of one plan (median
 * and least of 15), steady and with the limit halved. The controller plans
 * every pod of a server on each reconcile, so this is a floor under its
 * reconcile time at fleet scale.
 *
 *   node bench/planner.ts [pods]     (default 10000)
 */
import { planBudgets, type BudgetInput, type MemberState, type PodInput } from '../src/core/budget/index.ts';
const N = Number(process.argv[2] ?? 10000);
const pods: PodInput[] = [];
const members: MemberState[] = [];
for (let i = 0; i < N; i++) {
  const name = `web-7f9c8d-${i.toString(36).padStart(5, '0')}`;
  pods.push({ namespace: 'shop', name, uid: `uid-${name}`, connection: 'orders', consumer: 'web', phase: 'Running', terminating: false, ready: true, readsTables: true });
  members.push({ namespace: 'shop', name, podUid: `uid-${name}`, connection: 'orders', grant: { connections: 0, generation: 1 }, tableFrom: 1, acknowledgement: { generation: 1, tableGeneration: 4, connections: 3, held: 3, drained: false } });
}
const table = { generation: 4, perPod: 3, recordsChanges: true, perPodPods: N, exceptions: [] };
const input: BudgetInput = { limit: 3 * N, connections: [{ namespace: 'shop', name: 'orders', budgetStrategy: 'Dynamic', consumers: [{ name: 'web', weight: 1, minPerPod: 1, processesPerPod: 2 }] }], pods, members, tables: [{ namespace: 'shop', connection: 'orders', table }], now: Date.now() };
const half: BudgetInput = { ...input, limit: Math.floor(1.5 * N) };
for (const [label, inp] of [['steady', input], ['limit halved', half]] as const) {
  const times: number[] = [];
  let plan = planBudgets(inp);
  for (let r = 0; r < 15; r++) {
    const t = process.cpuUsage();
    plan = planBudgets(inp);
    const c = process.cpuUsage(t);
    times.push((c.user + c.system) / 1000);
  }
  times.sort((a, b) => a - b);
  console.log(`${N} pods ${label}: cpu median ${times[7]!.toFixed(1)} ms, min ${times[0]!.toFixed(1)} ms; tables written ${plan.tables.filter((t) => t.changed).length}, perPod ${plan.tables[0]?.table.perPod}`);
}
