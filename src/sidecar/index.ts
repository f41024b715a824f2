/** The pooling sidecar's public surface, for the entry point and the Kubernetes side. */
export { Sidecar, isLoopbackAddress, type SidecarDeps } from './sidecar.ts';
export { FileCredentialsSource, StaticCredentialsSource, readCredentialsDirectory, type FileCredentialsSourceOptions } from './credentials.ts';
export type { Credentials, CredentialsSource, PoolMode, ServerKeepalive, SidecarSettings, SidecarStatus, SslMode } from './settings.ts';
export { hostKeyMatches, sshFingerprint } from './tunnel.ts';
