/** Pure state of pooled server connections: lifecycle machine, transaction boundaries, prepared statements, outcomes of commands applied at commit. */
export * from './server-connection-state.ts';
export * from './transaction-tracker.ts';
export * from './prepared-statements.ts';
export * from './command-outcome.ts';
