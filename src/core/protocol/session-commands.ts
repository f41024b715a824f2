/**
 * SQL statements that act on session state, recognised from their first
 * words. A transaction pooler must treat them apart: DEALLOCATE and DISCARD
 * act on prepared statements the pooler shares between clients, and SET,
 * LISTEN, PREPARE, temporary tables and WITH HOLD cursors leave state on the
 * server connection that must not reach another client. Only statements
 * whose first letter can start one of these are decoded, so the common
 * INSERT/UPDATE/BEGIN/COMMIT cost two byte reads; a SELECT is searched for
 * the functions that leave state (session advisory locks, set_config with
 * session scope) and for INTO TEMP, a DO block for the same and for SET. The
 * statements after the first of a multi-statement Query are found by
 * splitStatements and classified alike (laterSessionCommands).
 */
import type { SettingChange } from './client-settings.ts';

/** Why a client keeps its server connection between transactions. */
export type PinReason = 'set' | 'listen' | 'prepare' | 'temp-table' | 'cursor-with-hold' | 'advisory-lock' | 'sequence' | 'unnamed-statement';

/** Every pin reason, for metrics that must report zeros too. */
export const PIN_REASONS: readonly PinReason[] = ['set', 'listen', 'prepare', 'temp-table', 'cursor-with-hold', 'advisory-lock', 'sequence', 'unnamed-statement'];

/** A session command and what it acts on. */
export type SessionCommand =
  | { kind: 'deallocate'; name: string }
  | { kind: 'deallocate-all' }
  | { kind: 'discard-all' }
  /** RESET ALL: the connection's settings go back to its own defaults (the client's come back with its next transaction). */
  | { kind: 'reset-all' }
  | { kind: 'pin'; reason: PinReason }
  /** Session settings changed by a statement standing alone, which the sidecar can carry to other server connections (see SettingChange). */
  | { kind: 'settings'; changes: readonly SettingChange[] }
  /** `SELECT set_config('name', $1, false)` standing alone (row-level security set up per request): the setting takes the value bound to $1. */
  | { kind: 'setting-parameter'; name: string }
  /** LISTEN or UNLISTEN ('*' for all); `alone`: the text is that one statement and nothing else. */
  | { kind: 'listen' | 'unlisten'; channel: string; alone: boolean };

const FIRST = new Uint8Array(256);
for (const c of 'sSrRlLpPdDcCuU') FIRST[c.charCodeAt(0)] = 1;
/** Longest prefix decoded: enough for `DEALLOCATE PREPARE <63-byte name>` and `CREATE GLOBAL TEMPORARY`. */
const PREFIX_BYTES = 120;

function isSpace(byte: number | undefined): boolean {
  return byte === 0x20 || byte === 0x09 || byte === 0x0a || byte === 0x0d || byte === 0x0c;
}

/** Bits of scanStatementText: what a statement text holds, in any letter case. */
export const TEXT_SEQUENCE_READ = 1;
export const TEXT_ADVISORY_LOCK = 2;
export const TEXT_SET_CONFIG = 4;
export const TEXT_INTO = 8;
/** Something other than white space after a semicolon: a second statement may follow the first. */
export const TEXT_SEVERAL_STATEMENTS = 16;

const CURRVAL = Buffer.from('currval');
const LASTVAL = Buffer.from('lastval');
const ADVISORY_LOCK = Buffer.from('advisory_lock');
const SET_CONFIG = Buffer.from('set_config');
const INTO = Buffer.from('into');
/**
 * scanStatementText's table, indexed by a byte and the one after it:
 * 1..WORDS.length where a word it looks for starts (its first two letters,
 * either case), CODE_SEMICOLON and CODE_NUL for those bytes whatever follows,
 * 0 for the rest. One lookup per byte and a branch that is rarely taken:
 * a branch per letter would be mispredicted on ordinary SQL.
 */
const PAIR_CODE = new Uint8Array(65536);
const CODE_SEMICOLON = 254;
const CODE_NUL = 255;
/** The words scanStatementText looks for (PAIR_CODE's 1..). */
const WORDS: readonly { word: Uint8Array; bit: number }[] = [
  { word: CURRVAL, bit: TEXT_SEQUENCE_READ },
  { word: LASTVAL, bit: TEXT_SEQUENCE_READ },
  { word: ADVISORY_LOCK, bit: TEXT_ADVISORY_LOCK },
  { word: SET_CONFIG, bit: TEXT_SET_CONFIG },
  { word: INTO, bit: TEXT_INTO },
];
for (const [index, { word }] of WORDS.entries()) {
  for (const first of [word[0]!, word[0]! & ~0x20]) {
    for (const second of [word[1]!, word[1]! & ~0x20]) PAIR_CODE[(first << 8) | second] = index + 1;
  }
}
for (let next = 0; next < 256; next++) {
  PAIR_CODE[(0x3b << 8) | next] = CODE_SEMICOLON;
  PAIR_CODE[next] = CODE_NUL;
}

/** True if `buffer[at..end)` starts with `word` (lowercase ASCII), letters compared in either case. */
function startsWithFolded(buffer: Buffer, at: number, end: number, word: Uint8Array): boolean {
  if (end - at < word.length) return false;
  for (let k = 0; k < word.length; k++) {
    const byte = buffer[at + k]!;
    if ((byte >= 0x41 && byte <= 0x5a ? byte | 0x20 : byte) !== word[k]) return false;
  }
  return true;
}

/** The first index in `buffer[start..end)` where `word` (lowercase ASCII) starts, letters in either case; -1 if none. */
function indexOfFolded(buffer: Buffer, start: number, end: number, word: Uint8Array): number {
  for (let i = start; i < end; i++) if (startsWithFolded(buffer, i, end, word)) return i;
  return -1;
}

/**
 * One pass over the SQL text at `buffer[start..)`, up to its NUL or `end`:
 * the TEXT_* bits of what it holds. The checks of a statement use it as a
 * filter (a bit not set: that check has nothing to find), so an ordinary
 * statement costs one loop over its bytes instead of a search per word; a
 * word is compared only where its first two letters are (one table lookup),
 * since this runs on every statement a client sends.
 */
export function scanStatementText(buffer: Buffer, start: number, end: number): number {
  let found = 0;
  let afterSemicolon = false;
  let byte = start < end ? buffer[start]! : 0;
  for (let i = start + 1; i <= end; i++) {
    const next = i < end ? buffer[i]! : 0;
    const code = PAIR_CODE[(byte << 8) | next]!;
    if (code === 0) {
      if (afterSemicolon && !isSpace(byte)) found |= TEXT_SEVERAL_STATEMENTS;
    } else if (code === CODE_SEMICOLON) afterSemicolon = true;
    else if (code === CODE_NUL) return found;
    else {
      const { word, bit } = WORDS[code - 1]!;
      if (startsWithFolded(buffer, i - 1, end, word)) found |= bit;
      if (afterSemicolon) found |= TEXT_SEVERAL_STATEMENTS;
    }
    byte = next;
  }
  return found;
}

const BEGIN_WORD = Buffer.from('begin');
const START_WORD = Buffer.from('start ');

/**
 * True for a simple Query that begins a transaction block (BEGIN or START
 * TRANSACTION standing alone): it runs no statement that could call
 * nextval(). `scan` is scanStatementText's answer for the same text.
 */
export function startsTransaction(buffer: Buffer, start: number, end: number, scan: number = scanStatementText(buffer, start, end)): boolean {
  let i = start;
  while (i < end && isSpace(buffer[i])) i++;
  const first = i < end ? buffer[i]! | 0x20 : 0;
  if (first !== 0x62 /* b */ && first !== 0x73 /* s */) return false;
  return (startsWithFolded(buffer, i, end, BEGIN_WORD) || startsWithFolded(buffer, i, end, START_WORD)) && (scan & TEXT_SEVERAL_STATEMENTS) === 0;
}

/**
 * Classifies the SQL text at `buffer[start..end)` (a Query body or the text
 * of a Parse), or returns undefined for ordinary statements. The text may
 * hold several statements; only the first is read (a session command later
 * in a multi-statement Query is not seen: see docs/transaction-mode.md).
 */
export function classifySessionCommand(buffer: Buffer, start: number, end: number, scan: number = scanStatementText(buffer, start, end)): SessionCommand | undefined {
  let i = start;
  while (i < end && isSpace(buffer[i])) i++;
  // A leading comment (an ORM's or a tracer's tag) hides the first word: skip it.
  if (i + 1 < end && ((buffer[i] === 0x2f && buffer[i + 1] === 0x2a) || (buffer[i] === 0x2d && buffer[i + 1] === 0x2d))) i = skipSpaceAndComments(buffer, i, end);
  if (i >= end || FIRST[buffer[i]!] !== 1) return undefined;
  // Second letter: rules out SELECT, COMMIT, ROLLBACK, DELETE, DO, CALL, ... at once.
  const second = i + 1 < end ? buffer[i + 1]! | 0x20 : 0;
  const first = buffer[i]! | 0x20;
  if (first === 0x73 /* s */ && second === 0x65 && i + 2 < end && (buffer[i + 2]! | 0x20) === 0x6c /* SEL */) return selectLeavingState(buffer, i, end, scan);
  if (first === 0x64 /* d */ && second === 0x6f /* o */ && i + 2 < end && !isWordByte(buffer[i + 2]!)) return doBlockLeavingState(buffer, i, end, scan);
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
      return settingStatement(buffer, i, end);
    case 'reset':
      // RESET ALL leaves nothing behind: the sidecar sees its tag and applies the client's settings again.
      return w1 === 'all' ? { kind: 'reset-all' } : settingStatement(buffer, i, end);
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
      if (scope === 'temp' || scope === 'temporary') return PIN_TEMP;
      // A table created in pg_temp by name is a temporary table too.
      const table = w1 === 'unlogged' ? w2 === 'table' ? words[3] : undefined : w1 === 'table' ? w2 : undefined;
      const named = table?.toLowerCase() === 'if' ? words[w1 === 'unlogged' ? 6 : 5] : table;
      return named?.toLowerCase().startsWith('pg_temp.') === true ? PIN_TEMP : undefined;
    }
    default:
      return undefined;
  }
}

const PIN_ADVISORY: SessionCommand = { kind: 'pin', reason: 'advisory-lock' };
const PIN_SET: SessionCommand = { kind: 'pin', reason: 'set' };
const PIN_TEMP: SessionCommand = { kind: 'pin', reason: 'temp-table' };
/**
 * Settings that are the session's identity, not a preference, or that act on
 * the session's own connection: changing them pins. idle_session_timeout ends
 * the session when the client idles (carried over, it would end the pool's
 * idle server connections instead, never the client's); temp_buffers cannot
 * change on a backend that ever held a temporary table (carried over, the
 * replay on such a connection would fail the client); seed starts the
 * backend's random() sequence, which moves on with every call (carried over,
 * the client would start it again on each connection it moves to, and other
 * clients would draw from it); client_encoding decides how the server reads
 * every statement after it, the sidecar's replay on that connection included
 * (but see isUtf8Encoding: a change to UTF-8 is carried).
 */
const IDENTITY_SETTINGS = new Set(['role', 'session_authorization', 'idle_session_timeout', 'temp_buffers', 'seed', 'client_encoding']);
/**
 * Settings of the current transaction alone, as SET TRANSACTION: set for the
 * session, they still end with the transaction (outside a block, the
 * statement's own). Nothing to carry; replayed after another statement they
 * would fail ("must be called before any query").
 */
const TRANSACTION_SETTINGS = new Set(['transaction_isolation', 'transaction_read_only', 'transaction_deferrable']);
/**
 * What a carried statement may hold: ASCII without backslashes. Replayed in one
 * Query with the other settings, it is read with that connection's
 * standard_conforming_strings and client_encoding as they stand before the
 * replay, not the ones it first ran with ('a\'b' is one string with
 * standard_conforming_strings off, 'C:\x' another value; other bytes
 * another text): anything else pins.
 */
const REPLAYABLE = /^[\x20-\x5b\x5d-\x7e\t\n\r\f]*$/;
const SETTING_NAME = '[a-z_][a-z0-9_$]*(?:\\.[a-z_][a-z0-9_$]*)?';
const SET_STATEMENT = new RegExp(`^set\\s+(?:session\\s+)?(?:time\\s+zone\\s+(.+)|(${SETTING_NAME})\\s*(?:=|\\bto\\b)\\s*(.+))$`, 'is');
/** SHOW of one setting or of all: nothing changes. */
const SHOW_STATEMENT = /^show\s+(?:all|[a-z_][a-z0-9_.$]*|"[^"]+")\s*;?$/i;
const RESET_STATEMENT = new RegExp(`^reset\\s+(?:(time\\s+zone)|(${SETTING_NAME}))$`, 'is');
/** SET forms of their own grammar, with the setting each changes. */
const SET_SPECIAL = /^set\s+(?:session\s+)?(names|schema|xml\s+option)(?:\s+(.*))?$/is;
const SPECIAL_SETTINGS: Readonly<Record<string, string>> = { names: 'client_encoding', schema: 'search_path', 'xml option': 'xmloption' };
const SESSION_CHARACTERISTICS = /^set\s+session\s+characteristics\s+as\s+transaction\s+(.+)$/is;
const SET_CONFIG_PARAMETER = /^select\s+(?:pg_catalog\s*\.\s*)?set_config\s*\(\s*'([^'\\]+)'\s*,\s*\$1(?:\s*::\s*(?:pg_catalog\s*\.\s*)?text)?\s*,\s*false\s*\)$/is;
const SET_CONFIG_CALL = /^select\s+(?:pg_catalog\s*\.\s*)?set_config\s*\(\s*'([^'\\]+)'\s*,\s*'(?:[^'\\]|'')*'\s*,\s*false\s*\)$/is;

const SEQUENCE_WRITES = /\b(?:nextval|setval)\s*\(/i;

/**
 * How the SQL text at `buffer[start..)` (up to its NUL or `end`) reads the
 * session's sequence values (currval() and lastval() return what this
 * session's last nextval() or setval() gave, which stays on the backend
 * that ran it): `'reads'` when it calls currval() or lastval() and nothing
 * before it in the same text can have set them (one statement that calls
 * neither nextval() nor setval()), `'reads-after-write'` when something in
 * the same text may have (another statement before it, an explicit
 * nextval() or setval()), undefined when it reads none. A nextval() run by a
 * column default or a trigger cannot be seen in the text. `scan` is
 * scanStatementText's answer for the same text.
 */
export function sequenceRead(buffer: Buffer, start: number, end: number, scan: number = scanStatementText(buffer, start, end)): 'reads' | 'reads-after-write' | undefined {
  if ((scan & TEXT_SEQUENCE_READ) === 0) return undefined;
  const nul = buffer.indexOf(0, start);
  const stop = nul >= 0 && nul < end ? nul : end;
  const sql = buffer.toString('utf8', start, stop);
  if (!/\b(?:currval|lastval)\s*\(/i.test(sql)) return undefined;
  if (SEQUENCE_WRITES.test(sql)) return 'reads-after-write';
  return (scan & TEXT_SEVERAL_STATEMENTS) !== 0 && splitStatements(buffer, start, stop).length > 1 ? 'reads-after-write' : 'reads';
}

/** The statements of the text at `buffer[start..)` (up to its NUL or `end`), trimmed, without their semicolons. */
function statementTexts(buffer: Buffer, start: number, end: number): string[] {
  const nul = buffer.indexOf(0, start);
  const stop = nul >= 0 && nul < end ? nul : end;
  if (!mayHoldSeveralStatements(buffer, start, stop)) return [buffer.toString('utf8', start, stop).trim().replace(/(?:\s*;)+$/, '')];
  return splitStatements(buffer, start, stop).map(([from, to]) => buffer.toString('utf8', from, to).trim());
}

/**
 * SETs or RESETs of settings for the session, SET SESSION CHARACTERISTICS,
 * or set_config(..., false) with literals, alone or only with each other (and
 * SHOWs) in one Query: their setting changes (`SET x TO DEFAULT` and `SET TIME ZONE
 * LOCAL` are RESETs). Anything else (the session's role or authorization,
 * SET SCHEMA, quoted names, another statement beside them) pins.
 */
function settingStatement(buffer: Buffer, start: number, end: number): SessionCommand | undefined {
  const changes: SettingChange[] = [];
  for (const sql of statementTexts(buffer, start, end)) {
    const own = settingChangesOf(sql);
    if (own === undefined) return PIN_SET;
    changes.push(...own);
  }
  // Only settings of the transaction itself (SET transaction_isolation ...): they end with it, as direct.
  return changes.length === 0 ? undefined : { kind: 'settings', changes };
}

/**
 * Whether a client_encoding value names UTF-8, PostgreSQL's way: letters and
 * digits only, any case ('UTF8', 'utf-8', 'Unicode'), quoted or not. The
 * sidecar's server connections run in UTF-8 unless a client asks otherwise,
 * and its replays are ASCII, read alike in any encoding a client can have:
 * such a SET is carried, not pinned. ruby-pg sends `set client_encoding to
 * 'UTF8'` right after connecting in every Rails application (and
 * ActiveRecord `'unicode'` when database.yml names an encoding).
 */
function isUtf8Encoding(value: string): boolean {
  const name = value.replace(/^(['"])(.*)\1$/s, '$2').toLowerCase().replace(/[^a-z0-9]/g, '');
  return name === 'utf8' || name === 'unicode';
}

/** Whether setting `name` to `value` acts on the session's own connection (IDENTITY_SETTINGS): it pins. */
function pinsSetting(name: string, value: string): boolean {
  return IDENTITY_SETTINGS.has(name) && !(name === 'client_encoding' && isUtf8Encoding(value));
}

/** The setting changes of one statement, or undefined if it is not one the sidecar carries. */
function settingChangesOf(sql: string): SettingChange[] | undefined {
  const set = SET_STATEMENT.exec(sql);
  if (set !== null) {
    const name = set[2] === undefined ? 'timezone' : set[2].toLowerCase();
    const value = (set[1] ?? set[3]!).trim().toLowerCase();
    if (pinsSetting(name, value)) return undefined;
    if (TRANSACTION_SETTINGS.has(name)) return [];
    if (value === 'default' || (name === 'timezone' && set[2] === undefined && value === 'local')) return [{ kind: 'reset', name }];
    return REPLAYABLE.test(sql) ? [{ kind: 'set', name, sql }] : undefined;
  }
  // Reads a setting, changes none: psqlODBC sends `SET DateStyle = 'ISO';SET extra_float_digits = 2;show transaction_isolation` on every connect.
  if (SHOW_STATEMENT.test(sql)) return [];
  const reset = RESET_STATEMENT.exec(sql);
  if (reset !== null) {
    const name = reset[1] === undefined ? reset[2]!.toLowerCase() : 'timezone';
    return IDENTITY_SETTINGS.has(name) ? undefined : TRANSACTION_SETTINGS.has(name) ? [] : [{ kind: 'reset', name }];
  }
  const special = SET_SPECIAL.exec(sql);
  if (special !== null) {
    const name = SPECIAL_SETTINGS[special[1]!.toLowerCase().replace(/\s+/g, ' ')]!;
    const value = (special[2] ?? '').trim().toLowerCase();
    if (pinsSetting(name, value)) return undefined;
    return value === 'default' ? [{ kind: 'reset', name }] : value !== '' && REPLAYABLE.test(sql) ? [{ kind: 'set', name, sql }] : undefined;
  }
  const characteristics = SESSION_CHARACTERISTICS.exec(sql);
  if (characteristics !== null) return transactionDefaults(characteristics[1]!);
  const call = SET_CONFIG_CALL.exec(sql);
  if (call !== null) {
    const name = call[1]!.toLowerCase();
    return IDENTITY_SETTINGS.has(name) ? undefined : TRANSACTION_SETTINGS.has(name) ? [] : REPLAYABLE.test(sql) ? [{ kind: 'set', name, sql }] : undefined;
  }
  return undefined;
}

/**
 * `SET SESSION CHARACTERISTICS AS TRANSACTION <modes>` (pgjdbc's
 * setTransactionIsolation, so Spring's @Transactional(isolation = ...)):
 * the default_transaction_* settings it changes, each as its own SET;
 * undefined for a mode not recognised.
 */
function transactionDefaults(modes: string): SettingChange[] | undefined {
  const changes: SettingChange[] = [];
  const set = (name: string, value: string): void => void changes.push({ kind: 'set', name, sql: `SET ${name} TO '${value}'` });
  let rest = modes.trim().toLowerCase();
  while (rest !== '') {
    const mode = /^(?:isolation\s+level\s+(serializable|repeatable\s+read|read\s+committed|read\s+uncommitted)|read\s+(only|write)|(not\s+)?deferrable)\b\s*,?\s*/.exec(rest);
    if (mode === null) return undefined;
    if (mode[1] !== undefined) set('default_transaction_isolation', mode[1].replace(/\s+/g, ' '));
    else if (mode[2] !== undefined) set('default_transaction_read_only', mode[2] === 'only' ? 'on' : 'off');
    else set('default_transaction_deferrable', mode[3] === undefined ? 'on' : 'off');
    rest = rest.slice(mode[0].length);
  }
  return changes.length === 0 ? undefined : changes;
}

/** `SELECT set_config('name', 'value', false)` standing alone, as Django sets its time zone (or with other setting changes), or with its value bound to $1: the setting changes; null when they are the transaction's own settings only (nothing to carry); undefined otherwise (it pins). */
function setConfigStatement(buffer: Buffer, start: number, end: number): SessionCommand | null | undefined {
  const command = settingStatement(buffer, start, end);
  // Only transaction settings: nothing to carry, nothing to pin.
  if (command === undefined) return null;
  if (command.kind === 'settings') return command;
  const texts = statementTexts(buffer, start, end);
  const call = texts.length === 1 ? SET_CONFIG_PARAMETER.exec(texts[0]!) : null;
  const name = call?.[1]?.toLowerCase();
  return name === undefined || IDENTITY_SETTINGS.has(name) || TRANSACTION_SETTINGS.has(name) ? undefined : { kind: 'setting-parameter', name };
}

/**
 * A SELECT that leaves state on its connection: a session-level advisory lock
 * (pg_advisory_lock, pg_try_advisory_lock and their _shared forms; the _xact_
 * forms end with the transaction and contain no `advisory_lock`), set_config
 * with session scope, or SELECT ... INTO TEMP. Only what `scan` (of the
 * whole text) found is searched for, so an ordinary SELECT costs no string.
 */
function selectLeavingState(buffer: Buffer, start: number, end: number, scan: number): SessionCommand | undefined {
  if ((scan & TEXT_ADVISORY_LOCK) !== 0 && indexOfFolded(buffer, start, end, ADVISORY_LOCK) >= 0) return PIN_ADVISORY;
  if ((scan & TEXT_SET_CONFIG) !== 0 && indexOfFolded(buffer, start, end, SET_CONFIG) >= 0 && setsSessionConfig(buffer.toString('utf8', start, end))) {
    const command = setConfigStatement(buffer, start, end);
    return command === null ? undefined : command ?? PIN_SET;
  }
  if ((scan & TEXT_INTO) !== 0 && /\binto\s+(temp|temporary)\b/i.test(buffer.toString('utf8', start, end))) return PIN_TEMP;
  return undefined;
}

/**
 * A DO block whose body leaves session state: set_config with session scope,
 * a plpgsql SET that is not SET LOCAL (at the start of a statement, so an
 * UPDATE's SET does not count), a session advisory lock or a temporary table.
 * What a function called from it does cannot be seen (docs/transaction-mode.md).
 */
function doBlockLeavingState(buffer: Buffer, start: number, end: number, scan: number): SessionCommand | undefined {
  if ((scan & TEXT_ADVISORY_LOCK) !== 0 && indexOfFolded(buffer, start, end, ADVISORY_LOCK) >= 0) return PIN_ADVISORY;
  const body = buffer.toString('utf8', start, end);
  if ((scan & TEXT_SET_CONFIG) !== 0 && indexOfFolded(buffer, start, end, SET_CONFIG) >= 0 && setsSessionConfig(body)) return PIN_SET;
  // At the start of a statement, or of a string (EXECUTE 'SET ...').
  if (/(?:^|[;$']|\b(?:begin|then|else|loop))\s*(?:reset\b|set\s+(?!local\b|transaction\b|constraints\b)[a-z_"])/i.test(body)) return PIN_SET;
  if (/\bcreate\s+(?:(?:global|local)\s+)?(?:temp|temporary)\b/i.test(body)) return PIN_TEMP;
  return undefined;
}

/**
 * True unless every set_config(...) call in `sql` has a literal true as its
 * third argument (is_local: the setting ends with the transaction). A call
 * whose scope is a parameter or an expression counts as session scope.
 */
export function setsSessionConfig(sql: string): boolean {
  const pattern = /\bset_config\s*\(/gi;
  for (let match = pattern.exec(sql); match !== null; match = pattern.exec(sql)) {
    const args = topLevelArguments(sql, match.index + match[0].length);
    const scope = args[2]?.trim().toLowerCase();
    if (scope !== 'true' && scope !== '\'t\'' && scope !== '\'true\'' && scope !== '\'on\'' && scope !== 'true::boolean') return true;
  }
  return false;
}

/** The comma-separated arguments of a call whose '(' ends just before `from`, up to its ')'. */
function topLevelArguments(sql: string, from: number): string[] {
  const args: string[] = [];
  let depth = 0;
  let current = from;
  for (let i = from; i < sql.length; i++) {
    const c = sql[i];
    if (c === '\'') {
      const close = sql.indexOf('\'', i + 1);
      i = close < 0 ? sql.length : close;
    } else if (c === '(') depth++;
    else if (c === ')') {
      if (depth === 0) {
        args.push(sql.slice(current, i));
        return args;
      }
      depth--;
    } else if (c === ',' && depth === 0) {
      args.push(sql.slice(current, i));
      current = i + 1;
    }
  }
  args.push(sql.slice(current));
  return args;
}

function isWordByte(byte: number): boolean {
  return (byte >= 0x30 && byte <= 0x39) || ((byte | 0x20) >= 0x61 && (byte | 0x20) <= 0x7a) || byte === 0x5f || byte === 0x24 || byte >= 0x80;
}

/** The index of the first byte at or after `i` that is neither white space nor inside a comment. */
function skipSpaceAndComments(buffer: Buffer, i: number, end: number): number {
  for (;;) {
    while (i < end && isSpace(buffer[i])) i++;
    if (i + 1 < end && buffer[i] === 0x2d && buffer[i + 1] === 0x2d) {
      i = skipLineComment(buffer, i, end);
    } else if (i + 1 < end && buffer[i] === 0x2f && buffer[i + 1] === 0x2a) {
      i = skipBlockComment(buffer, i, end);
    } else return i;
  }
}

/** Past the end of the `--` comment that starts at `i` (its newline included). */
function skipLineComment(buffer: Buffer, i: number, end: number): number {
  const newline = buffer.indexOf(0x0a, i);
  return newline < 0 || newline >= end ? end : newline + 1;
}

/** Past the end of the (nestable) block comment that starts at `i`. */
function skipBlockComment(buffer: Buffer, i: number, end: number): number {
  let depth = 0;
  while (i < end) {
    if (i + 1 < end && buffer[i] === 0x2f && buffer[i + 1] === 0x2a) {
      depth++;
      i += 2;
    } else if (i + 1 < end && buffer[i] === 0x2a && buffer[i + 1] === 0x2f) {
      depth--;
      i += 2;
      if (depth === 0) return i;
    } else i++;
  }
  return end;
}

/**
 * The statements of a simple Query at `buffer[start..end)`, as [start, end)
 * ranges, split at the semicolons outside quotes, dollar quotes and comments;
 * empty statements left out. Only called when the text holds a semicolon.
 */
export function splitStatements(buffer: Buffer, start: number, end: number): Array<[number, number]> {
  const statements: Array<[number, number]> = [];
  let statementStart = start;
  let i = start;
  const push = (to: number): void => {
    const from = skipSpaceAndComments(buffer, statementStart, to);
    if (from < to) statements.push([from, to]);
  };
  while (i < end) {
    const c = buffer[i]!;
    if (c === 0x00) break;
    if (c === 0x3b /* ; */) {
      push(i);
      statementStart = i + 1;
      i++;
    } else if (c === 0x27 /* ' */) {
      // E'...' strings take backslash escapes; standard strings only ''.
      const escapes = i > start && (buffer[i - 1]! | 0x20) === 0x65 && (i - 1 === start || !isWordByte(buffer[i - 2]!));
      i++;
      while (i < end) {
        if (escapes && buffer[i] === 0x5c) i += 2;
        else if (buffer[i] === 0x27) {
          if (buffer[i + 1] === 0x27) i += 2;
          else break;
        } else i++;
      }
      i++;
    } else if (c === 0x22 /* " */) {
      const close = buffer.indexOf(0x22, i + 1);
      i = close < 0 || close >= end ? end : close + 1;
    } else if (c === 0x24 /* $ */ && (i === start || !isWordByte(buffer[i - 1]!))) {
      // $tag$ ... $tag$ (a $1 parameter is not a quote: a digit follows).
      let j = i + 1;
      while (j < end && isWordByte(buffer[j]!) && buffer[j] !== 0x24) j++;
      if (j < end && buffer[j] === 0x24 && !(buffer[i + 1]! >= 0x30 && buffer[i + 1]! <= 0x39)) {
        const tag = buffer.subarray(i, j + 1);
        const close = buffer.indexOf(tag, j + 1);
        i = close < 0 || close >= end ? end : close + tag.length;
      } else i++;
    } else if ((c === 0x2d && buffer[i + 1] === 0x2d) || (c === 0x2f && buffer[i + 1] === 0x2a)) {
      i = c === 0x2d ? skipLineComment(buffer, i, end) : skipBlockComment(buffer, i, end);
    } else i++;
  }
  push(Math.min(i, end));
  return statements;
}

/**
 * False when the text cannot hold a second statement: no semicolon, or only
 * white space after the first one (`SELECT 1;`, as pgbench and psql send).
 */
export function mayHoldSeveralStatements(buffer: Buffer, start: number, end: number): boolean {
  const semicolon = buffer.indexOf(0x3b, start);
  if (semicolon < 0 || semicolon >= end) return false;
  let i = semicolon + 1;
  while (i < end && (isSpace(buffer[i]) || buffer[i] === 0x3b)) i++;
  return i < end && buffer[i] !== 0x00;
}

/**
 * The session commands of the statements after the first in a simple Query
 * (`SELECT 1; SET x = 1`): what a pooler reading only the first would miss.
 * Empty at once when `scan` (scanStatementText's answer for the same
 * text) found no second statement.
 * A later LISTEN pins (it cannot go through the shared listener alone).
 */
export function laterSessionCommands(buffer: Buffer, start: number, end: number, scan: number = scanStatementText(buffer, start, end)): SessionCommand[] {
  if ((scan & TEXT_SEVERAL_STATEMENTS) === 0) return [];
  const statements = splitStatements(buffer, start, end);
  const commands: SessionCommand[] = [];
  for (const [from, to] of statements.slice(1)) {
    const command = classifySessionCommand(buffer, from, to);
    if (command === undefined) continue;
    // A SET among other statements is not carried over: it pins.
    commands.push(command.kind === 'listen' ? { kind: 'pin', reason: 'listen' } : command.kind === 'unlisten' ? { ...command, alone: false } : command.kind === 'settings' || command.kind === 'setting-parameter' ? PIN_SET : command);
  }
  return commands;
}

const ADVISORY_UNLOCK = Buffer.from('advisory_unlock');

/** True if the SQL text calls a session advisory lock function, to take a lock or to release one (`pg_advisory_unlock_all` too). */
export function mentionsAdvisoryLock(buffer: Buffer, start: number, end: number): boolean {
  return indexOfFolded(buffer, start, end, ADVISORY_LOCK) >= 0 || indexOfFolded(buffer, start, end, ADVISORY_UNLOCK) >= 0;
}

/**
 * For a client pinned by a session advisory lock (transaction mode): true if
 * the SQL text at `buffer[start..end)` leaves no session state on its
 * connection but advisory locks, so that once the backend holds none the
 * client can leave the connection with nothing of its own left on it.
 * Conservative where classifySessionCommand stops at the lock: set_config or
 * INTO TEMP in the same SELECT, a DO block that takes a lock, or any other
 * session command anywhere in the text counts as state.
 */
export function leavesOnlyAdvisoryLocks(buffer: Buffer, start: number, end: number): boolean {
  const scan = scanStatementText(buffer, start, end);
  if ((scan & TEXT_SET_CONFIG) !== 0) return false;
  if ((scan & TEXT_INTO) !== 0 && /\binto\s+(?:temp|temporary)\b/i.test(buffer.toString('utf8', start, end))) return false;
  if (mentionsAdvisoryLock(buffer, start, end) && /^\s*do\b/i.test(buffer.toString('utf8', start, Math.min(end, start + 64)))) return false;
  const first = classifySessionCommand(buffer, start, end, scan);
  if (first !== undefined && first !== PIN_ADVISORY) return false;
  return laterSessionCommands(buffer, start, end, scan).every((command) => command === PIN_ADVISORY);
}

/** A statement name as PostgreSQL folds it: quoted names keep their case, others are lower-cased. */
function foldName(name: string): string {
  return name.startsWith('"') && name.endsWith('"') && name.length >= 2 ? name.slice(1, -1).replace(/""/g, '"') : name.toLowerCase();
}
