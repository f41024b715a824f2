/** The PostgreSQL v3 wire protocol, framing and the sidecar's own messages (pure). */
export * from './errors.ts';
export * from './frames.ts';
export * from './startup.ts';
export * from './server-messages.ts';
