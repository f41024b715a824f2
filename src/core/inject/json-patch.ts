/**
 * RFC 6901 pointers and a small RFC 6902 applier. The injector emits patches;
 * the applier lets tests (and the webhook's self-check) replay them on plain
 * JSON exactly as the API server would.
 */
import type { JsonPatchOperation } from './model.ts';

/** Escapes one reference token: `~` becomes `~0`, `/` becomes `~1` (in that order). */
export function escapePointerToken(token: string): string {
  return token.replace(/~/g, '~0').replace(/\//g, '~1');
}

/** Builds a JSON pointer from raw (unescaped) tokens. */
export function pointer(...tokens: (string | number)[]): string {
  return tokens.map((t) => `/${escapePointerToken(String(t))}`).join('');
}

function unescapePointerToken(token: string): string {
  return token.replace(/~1/g, '/').replace(/~0/g, '~');
}

function parsePointer(path: string): string[] {
  if (path === '') return [];
  if (!path.startsWith('/')) throw new Error(`JSON pointer must start with '/': ${path}`);
  return path.slice(1).split('/').map(unescapePointerToken);
}

type Json = unknown;

function isObject(value: Json): value is Record<string, Json> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function arrayIndex(token: string, length: number, forInsert: boolean): number {
  if (forInsert && token === '-') return length;
  if (!/^(0|[1-9][0-9]*)$/.test(token)) throw new Error(`invalid array index '${token}'`);
  const index = Number(token);
  if (index > length || (!forInsert && index === length)) throw new Error(`array index ${index} out of bounds (length ${length})`);
  return index;
}

function deepEqual(a: Json, b: Json): boolean {
  if (a === b) return true;
  if (Array.isArray(a)) return Array.isArray(b) && a.length === b.length && a.every((v, i) => deepEqual(v, b[i]));
  if (isObject(a) && isObject(b)) {
    const keys = Object.keys(a);
    return keys.length === Object.keys(b).length && keys.every((k) => Object.hasOwn(b, k) && deepEqual(a[k], b[k]));
  }
  return false;
}

/** Structural equality of JSON values (key order ignored). */
export function jsonEqual(a: unknown, b: unknown): boolean {
  return deepEqual(a, b);
}

/**
 * Applies `patch` to a deep copy of `document` and returns the copy. Throws,
 * as the API server would reject it, when a parent is missing or an index is
 * out of range.
 */
export function applyJsonPatch<T>(document: T, patch: readonly JsonPatchOperation[]): T {
  let root: Json = structuredClone(document);
  for (const operation of patch) {
    const tokens = parsePointer(operation.path);
    if (tokens.length === 0) {
      if (operation.op === 'test') {
        if (!deepEqual(root, operation.value)) throw new Error('test failed at root');
        continue;
      }
      if (operation.op === 'remove') throw new Error('cannot remove the root');
      root = structuredClone(operation.value);
      continue;
    }
    let parent: Json = root;
    for (const token of tokens.slice(0, -1)) {
      if (Array.isArray(parent)) parent = parent[arrayIndex(token, parent.length, false)];
      else if (isObject(parent) && Object.hasOwn(parent, token)) parent = parent[token];
      else throw new Error(`path ${operation.path}: parent '${token}' does not exist`);
    }
    const last = tokens[tokens.length - 1]!;
    if (Array.isArray(parent)) {
      const index = arrayIndex(last, parent.length, operation.op === 'add');
      if (operation.op === 'add') parent.splice(index, 0, structuredClone(operation.value));
      else if (operation.op === 'replace') parent[index] = structuredClone(operation.value);
      else if (operation.op === 'remove') parent.splice(index, 1);
      else if (!deepEqual(parent[index], operation.value)) throw new Error(`test failed at ${operation.path}`);
    } else if (isObject(parent)) {
      const exists = Object.hasOwn(parent, last);
      if (operation.op === 'add') parent[last] = structuredClone(operation.value);
      else if (!exists) throw new Error(`path ${operation.path} does not exist`);
      else if (operation.op === 'replace') parent[last] = structuredClone(operation.value);
      else if (operation.op === 'remove') delete parent[last];
      else if (!deepEqual(parent[last], operation.value)) throw new Error(`test failed at ${operation.path}`);
    } else {
      throw new Error(`path ${operation.path}: parent is not a container`);
    }
  }
  return root as T;
}
