/**
 * Run-time settings a client asks for in its StartupMessage (`options=-c
 * name=value`, `application_name`, `TimeZone`, `DateStyle`, ...). PostgreSQL
 * applies them to the client's backend at login; a pooler shares backends, so
 * it keeps them per client and applies them to whichever server connection
 * serves the client, with the SQL built here.
 */
import { ProtocolError } from './errors.ts';

/** Startup parameters that are not run-time settings. */
const NOT_SETTINGS = new Set(['user', 'database', 'options']);

/**
 * A client's settings: those of its startup packet (lower-cased name ->
 * value, in the order the client gave them) and the `SET`s it ran since,
 * each kept as its statement (lower-cased name -> SQL) so that another
 * server connection gets it exactly as the client's own did; a key
 * identifies the whole.
 */
export interface ClientSettings {
  readonly values: ReadonlyMap<string, string>;
  /** Session-scoped SETs run after login, by the setting they change; they override `values`. */
  readonly statements: ReadonlyMap<string, string>;
  /** Equal keys mean equal settings; '' for none. */
  readonly key: string;
}

const NO_STATEMENTS: ReadonlyMap<string, string> = new Map();

/** No settings beyond the server's defaults (the sidecar's own connections; every client has at least application_name). */
export const NO_SETTINGS: ClientSettings = { values: new Map(), statements: NO_STATEMENTS, key: '' };

function settingsOf(values: ReadonlyMap<string, string>, statements: ReadonlyMap<string, string>): ClientSettings {
  const key = values.size === 0 && statements.size === 0 ? '' : statements.size === 0 ? JSON.stringify([...values]) : JSON.stringify([[...values], [...statements]]);
  return { values, statements, key };
}

/**
 * A client's change of one of its session's settings, which a transaction
 * pooler can carry to whichever server connection serves the client next:
 * `SET name ...` kept as its SQL, or a return to the session's default
 * (`RESET name`, `SET name TO DEFAULT`).
 */
export type SettingChange = { kind: 'set'; name: string; sql: string } | { kind: 'reset'; name: string };

/** The client's settings once `change` ran: a SET overrides, a RESET goes back to the startup value, if any. */
export function changeSettings(settings: ClientSettings, change: SettingChange): ClientSettings {
  const statements = new Map(settings.statements);
  if (change.kind === 'set') {
    // Re-inserted, so the statements replay in the order they last ran.
    statements.delete(change.name);
    statements.set(change.name, change.sql);
  } else if (!statements.delete(change.name)) return settings;
  return settingsOf(settings.values, statements);
}

/**
 * What a server connection holds after running the client's `change` with
 * the client's settings applied: those settings (now `after`), except that a
 * RESET took the setting to the connection's own login value, not the
 * client's startup one.
 */
export function serverSettingsAfter(after: ClientSettings, change: SettingChange, login: ClientSettings): ClientSettings {
  if (change.kind === 'set') return after;
  const values = new Map(after.values);
  const loginValue = login.values.get(change.name);
  if (loginValue === undefined) values.delete(change.name);
  else values.set(change.name, loginValue);
  const statements = new Map(after.statements);
  statements.delete(change.name);
  return settingsOf(values, statements);
}

/** The settings of the client's startup packet alone: where RESET ALL and DISCARD ALL take its session. */
export function startupSettings(settings: ClientSettings): ClientSettings {
  return settings.statements.size === 0 ? settings : settingsOf(settings.values, NO_STATEMENTS);
}

/**
 * The settings of a StartupMessage's parameters: every parameter except user,
 * database and options, plus the `-c name=value` / `--name=value` switches of
 * `options`. Throws ProtocolError (with the parameter named) for what the
 * sidecar cannot honour per client: replication connections, and options
 * other than run-time settings.
 */
export function clientSettingsFromStartup(parameters: Readonly<Record<string, string>>): ClientSettings {
  const values = new Map<string, string>();
  for (const [name, value] of Object.entries(parameters)) {
    if (NOT_SETTINGS.has(name)) continue;
    if (name === 'replication') throw new ProtocolError('bad-startup', 'startup parameter "replication" is not supported: the poolkeeper sidecar does not pool replication connections');
    values.set(name.toLowerCase(), value);
  }
  // PostgreSQL applies options first and the startup parameters after them: a parameter wins (lib/pq sends
  // client_encoding=UTF8 whatever options say).
  const explicit = new Set(values.keys());
  if (parameters.options !== undefined) {
    for (const [name, value] of parseOptions(parameters.options)) if (!explicit.has(name.toLowerCase())) values.set(name.toLowerCase(), value);
  }
  // Direct, a client that names no application has none; the pooler's own name must not show through.
  if (!values.has('application_name')) values.set('application_name', '');
  return settingsOf(values, NO_STATEMENTS);
}

/**
 * Splits libpq's `options` value as PostgreSQL does (whitespace separates
 * words, a backslash escapes the next character) and keeps the run-time
 * settings (`-c name=value`, `-cname=value`, `--name=value`).
 */
export function parseOptions(options: string): [string, string][] {
  const words: string[] = [];
  let word = '';
  let inWord = false;
  for (let i = 0; i < options.length; i++) {
    const ch = options[i]!;
    if (ch === '\\' && i + 1 < options.length) {
      word += options[++i];
      inWord = true;
    } else if (/\s/.test(ch)) {
      if (inWord) words.push(word);
      word = '';
      inWord = false;
    } else {
      word += ch;
      inWord = true;
    }
  }
  if (inWord) words.push(word);
  const settings: [string, string][] = [];
  for (let i = 0; i < words.length; i++) {
    const w = words[i]!;
    let assignment: string | undefined;
    if (w === '-c') assignment = words[++i];
    else if (w.startsWith('-c')) assignment = w.slice(2);
    else if (w.startsWith('--')) assignment = w.slice(2);
    if (assignment === undefined) throw new ProtocolError('bad-startup', `startup option "${w}" is not supported by the poolkeeper sidecar: only run-time settings (-c name=value) are`);
    const eq = assignment.indexOf('=');
    if (eq <= 0) throw new ProtocolError('bad-startup', `invalid startup option "${assignment}": expected -c name=value`);
    // PostgreSQL reads '-' in a setting name given on the command line as '_'.
    settings.push([assignment.slice(0, eq).replace(/-/g, '_'), assignment.slice(eq + 1)]);
  }
  return settings;
}

/**
 * A string literal that reads the same whatever standard_conforming_strings
 * says, in ASCII alone: characters beyond it as Unicode escapes, so that the
 * server reads the same string whatever client_encoding the connection was
 * left in (a client that logged in with LATIN1 leaves it so).
 */
function literal(value: string): string {
  const escaped = value.replace(/\\/g, '\\\\').replace(/'/g, "''").replace(/[^\p{ASCII}]/gu, (c) => {
    const code = c.codePointAt(0)!;
    return code > 0xffff ? `\\U${code.toString(16).padStart(8, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
  });
  return `E'${escaped}'`;
}

/** `SELECT set_config(name, value, false)` with both as literals: how a setting whose value came as a parameter is replayed. */
export function setConfigSql(name: string, value: string): string {
  return `SELECT pg_catalog.set_config(${literal(name)}, ${literal(value)}, false)`;
}

function identifier(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

/**
 * Settings whose change applies to the statements after it in the same
 * Query: set last, so that a client's tiny statement_timeout cannot cancel
 * the rest of its own replay.
 */
const SET_LAST = new Set(['statement_timeout']);

/**
 * SQL that takes a server connection from the settings `applied` to
 * `desired`: one SELECT of set_config() calls for the startup values that
 * differ (or, with `all`, for every startup value: its row is then each value
 * as SHOW prints it), the client's own SET statements that differ, then a
 * RESET for each setting `desired` lacks, and last a statement_timeout that
 * differs. `set_config` takes the value as PostgreSQL reads a startup option
 * (`search_path=a,b` is two schemas), unlike SET with a quoted value.
 * Undefined when nothing differs.
 */
export function settingsSql(desired: ClientSettings, applied: ClientSettings, all = false): string | undefined {
  const sets: string[] = [];
  const last: string[] = [];
  for (const [name, value] of desired.values) {
    if (!all && (desired.statements.has(name) || (!applied.statements.has(name) && applied.values.get(name) === value))) continue;
    const call = `pg_catalog.set_config(${literal(name)}, ${literal(value)}, false)`;
    if (!all && SET_LAST.has(name)) last.push(`SELECT ${call}`);
    else sets.push(call);
  }
  const statements: string[] = [];
  if (sets.length > 0) statements.push(`SELECT ${sets.join(', ')}`);
  for (const [name, sql] of desired.statements) {
    if (!all && applied.statements.get(name) === sql) continue;
    // A client's statement may end in a -- comment, which would swallow the statements joined after it on its line.
    const statement = sql.includes('--') ? `${sql}\n` : sql;
    if (SET_LAST.has(name)) last.push(statement);
    else statements.push(statement);
  }
  const resets = new Set<string>();
  for (const name of [...applied.values.keys(), ...applied.statements.keys()]) if (!desired.values.has(name) && !desired.statements.has(name)) resets.add(name);
  for (const name of resets) statements.push(`RESET ${identifier(name)}`);
  statements.push(...last);
  return statements.length === 0 ? undefined : statements.join('; ');
}
