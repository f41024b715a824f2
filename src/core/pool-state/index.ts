/** Pure state of pooled server connections: lifecycle machine, transaction boundaries, prepared statements. */
export * from './server-connection-state.ts';
export * from './transaction-tracker.ts';
export * from './prepared-statements.ts';
