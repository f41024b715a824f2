/** The PostgreSQL v3 wire protocol, framing, the sidecar's own messages and statement rewriting (pure). */
export * from './errors.ts';
export * from './frames.ts';
export * from './startup.ts';
export * from './server-messages.ts';
export * from './extended.ts';
export * from './cancelled-batch.ts';
export * from './client-settings.ts';
export * from './session-commands.ts';
export * from './tls-client-hello.ts';
export * from './channel-binding.ts';
