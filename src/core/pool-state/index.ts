/** Pure state of pooled server connections: lifecycle machine and transaction boundaries. */
export * from './server-connection-state.ts';
export * from './transaction-tracker.ts';
