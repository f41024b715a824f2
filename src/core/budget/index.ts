/**
 * Per-pod connection budgets: the planner, its types, the fair split, grant
 * tables and the limit helpers. Pure: data in, data out.
 */
export * from './types.ts';
export { planBudgets, unlistedDepartures, unlistedRecordName, isUnlistedRecord, type UnlistedDepartures } from './planner.ts';
export { fairShares, type ShareUnit } from './fair-share.ts';
export * from './grant-table.ts';
export * from './acknowledgement.ts';
export * from './limit.ts';
export { budgetConditions } from './conditions.ts';
