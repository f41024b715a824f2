/**
 * SQL statements that act on session state, recognised from their first
 * words. A transaction pooler must treat them apart: DEALLOCATE and DISCARD
 * act on prepared statements the pooler shares between clients, and SET,
 * LISTEN, PREPARE, temporary tables and WITH HOLD cursors leave state on the
 * server connection that must not reach another client. Only statements
 * whose first letter can start one of these are decoded, so the common
 * SELECT/INSERT/UPDATE/BEGIN/COMMIT cost two byte reads.
 */

/** Why a client keeps its server connection between transactions. */
export type PinReason = 'set' | 'listen' | 'prepare' | 'temp-table' | 'cursor-with-hold' | 'advisory-lock';

/** Every pin reason, for metrics that must report zeros too. */
export const PIN_REASONS: readonly PinReason[] = ['set', 'listen', 'prepare', 'temp-table', 'cursor-with-hold', 'advisory-lock'];

/** A session command and what it acts on. */
export type SessionCommand =
  | { kind: 'deallocate'; name: string }
  | { kind: 'deallocate-all' }
  | { kind: 'discard-all' }
  | { kind: 'pin'; reason: PinReason }
  /** LISTEN or UNLISTEN ('*' for all); `alone`: the text is that one statement and nothing else. */
  | { kind: 'listen' | 'unlisten'; channel: string; alone: boolean };

const FIRST = new Uint8Array(256);
for (const c of 'sSrRlLpPdDcCuU') FIRST[c.charCodeAt(0)] = 1;
/** Longest prefix decoded: enough for `DEALLOCATE PREPARE <63-byte name>` and `CREATE GLOBAL TEMPORARY`. */
const PREFIX_BYTES = 120;

function isSpace(byte: number | undefined): boolean {
  return byte === 0x20 || byte === 0x09 || byte === 0x0a || byte === 0x0d || byte === 0x0c;
}

/**
 * Classifies the SQL text at `buffer[start..end)` (a Query body or the text
 * of a Parse), or returns undefined for ordinary statements. The text may
 * hold several statements; only the first is read (a session command later
 * in a multi-statement Query is not seen: see docs/transaction-mode.md).
 */
export function classifySessionCommand(buffer: Buffer, start: number, end: number): SessionCommand | undefined {
  let i = start;
  while (i < end && isSpace(buffer[i])) i++;
  if (i >= end || FIRST[buffer[i]!] !== 1) return undefined;
  // Second letter: rules out SELECT, COMMIT, ROLLBACK, DELETE, DO, CALL, ... at once.
  const second = i + 1 < end ? buffer[i + 1]! | 0x20 : 0;
  const first = buffer[i]! | 0x20;
  if (first === 0x73 /* s */ && second === 0x65 && i + 2 < end && (buffer[i + 2]! | 0x20) === 0x6c /* SEL */) return takesSessionLock(buffer, i, end);
  if (first === 0x73 /* s */ || first === 0x72 /* r */ || first === 0x64 /* d */) {
    if (second !== 0x65 /* e */ && !(first === 0x64 && (second === 0x69 /* i */ || second === 0x65))) return undefined;
  } else if (first === 0x63 /* c */ && second !== 0x72 /* r */) return undefined;
  else if (first === 0x75 /* u */ && second !== 0x6e /* n */) return undefined;
  const nul = buffer.indexOf(0, i);
  const stop = Math.min(nul >= 0 && nul < end ? nul : end, i + PREFIX_BYTES);
  const words = buffer.toString('utf8', i, stop).split(/[\s;()]+/).filter((w) => w !== '');
  const [w0, w1, w2] = words.slice(0, 3).map((w) => w.toLowerCase());
  switch (w0) {
    case 'set':
      // SET LOCAL, SET TRANSACTION and SET CONSTRAINTS end with the transaction.
      if (w1 === 'local' || w1 === 'transaction' || w1 === 'constraints') return undefined;
      return { kind: 'pin', reason: 'set' };
    case 'reset':
      return { kind: 'pin', reason: 'set' };
    case 'listen':
    case 'unlisten': {
      const channel = words[1];
      if (channel === undefined) return undefined;
      const text = buffer.toString('utf8', i, nul >= 0 && nul < end ? nul : end);
      const alone = /^\s*(un)?listen\s+("(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*|\*)\s*;?\s*$/i.test(text);
      return { kind: w0, channel: channel === '*' ? '*' : foldName(channel.replace(/;$/, '')), alone };
    }
    case 'prepare':
      // PREPARE TRANSACTION is two-phase commit, not a statement.
      return w1 === 'transaction' ? undefined : { kind: 'pin', reason: 'prepare' };
    case 'deallocate': {
      const original = w1 === 'prepare' ? words[2] : words[1];
      if (original === undefined) return undefined;
      if (original.toLowerCase() === 'all') return { kind: 'deallocate-all' };
      return { kind: 'deallocate', name: foldName(original) };
    }
    case 'discard':
      return w1 === 'all' ? { kind: 'discard-all' } : undefined;
    case 'declare':
      return /\bwith\s+hold\b/i.test(buffer.toString('utf8', i, nul >= 0 && nul < end ? nul : end)) ? { kind: 'pin', reason: 'cursor-with-hold' } : undefined;
    case 'create': {
      const scope = w1 === 'global' || w1 === 'local' ? w2 : w1;
      return scope === 'temp' || scope === 'temporary' ? { kind: 'pin', reason: 'temp-table' } : undefined;
    }
    default:
      return undefined;
  }
}

const SESSION_LOCK = Buffer.from('advisory_lock');
const SESSION_LOCK_UPPER = Buffer.from('ADVISORY_LOCK');
const PIN_ADVISORY: SessionCommand = { kind: 'pin', reason: 'advisory-lock' };

/**
 * A SELECT that takes a session-level advisory lock (pg_advisory_lock,
 * pg_try_advisory_lock and their _shared forms; the _xact_ forms end with
 * the transaction and contain no `advisory_lock`).
 */
function takesSessionLock(buffer: Buffer, start: number, end: number): SessionCommand | undefined {
  const text = buffer.subarray(start, end);
  return text.indexOf(SESSION_LOCK) >= 0 || text.indexOf(SESSION_LOCK_UPPER) >= 0 ? PIN_ADVISORY : undefined;
}

/** A statement name as PostgreSQL folds it: quoted names keep their case, others are lower-cased. */
function foldName(name: string): string {
  return name.startsWith('"') && name.endsWith('"') && name.length >= 2 ? name.slice(1, -1).replace(/""/g, '"') : name.toLowerCase();
}
