/**
 * Sidecar injection, pure: the patch for an admitted Pod and the check for
 * pods that missed it. The webhook (src/webhook) does the I/O around it.
 */
export * from './model.ts';
export { applyJsonPatch, escapePointerToken, jsonEqual, pointer } from './json-patch.ts';
export { consumerSelects, poolSizeHint, resolveConsumer, selectorMatches } from './consumer.ts';
export {
  ADMIN_PORT_NAME, LISTEN_PORT_NAME, SIDECAR_NODE_OPTIONS, computeInjection, sidecarNodeOptions, quantityBytes, connectionNameOf, findSidecar, kubeletsWithoutNativeSidecars, nativeSidecarsSupported, podWantsInjection, wantsUnixSocket,
  type InjectionInput,
} from './inject.ts';
export { DEFAULT_REPAIR_OPTIONS, podNeedsRepair, repairVerdict, type RepairOptions, type RepairReason, type RepairVerdict } from './repair.ts';
