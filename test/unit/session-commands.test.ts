/**
 * Recognising the SQL statements that act on session state, from their first
 * words, as a transaction pooler must.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  NO_SETTINGS, leavesOnlyAdvisoryLocks, mentionsAdvisoryLock, TEXT_ADVISORY_LOCK, TEXT_INTO, TEXT_SEQUENCE_READ, TEXT_SET_CONFIG, TEXT_SEVERAL_STATEMENTS, changeSettings, classifySessionCommand, clientSettingsFromStartup, laterSessionCommands, parseOptions, sequenceRead, scanStatementText, serverSettingsAfter, settingsSql, setsSessionConfig, splitStatements, startsTransaction, startupSettings,
  type ClientSettings,
} from '../../src/core/protocol/index.ts';

const classify = (sql: string): ReturnType<typeof classifySessionCommand> => {
  const buffer = Buffer.from(`${sql}\0`);
  return classifySessionCommand(buffer, 0, buffer.length);
};

describe('session commands', function () {
  it('pins on statements that leave session state, not on their transaction-scoped forms', function () {
    const cases: [string, string | undefined][] = [
      ['SET SESSION AUTHORIZATION bob', 'set'], ['SET ROLE bob', 'set'], ['RESET ROLE', 'set'],
      ['SET a = 1; SELECT 1', 'set'], ['SET a = 1; SET ROLE bob', 'set'], ['SET "TimeZone" = \'UTC\'', 'set'], ['RESET ALL', undefined],
      ['SET LOCAL statement_timeout = 5', undefined], ['SET TRANSACTION ISOLATION LEVEL SERIALIZABLE', undefined], ['SET CONSTRAINTS ALL DEFERRED', undefined],
      ['PREPARE p AS SELECT 1', 'prepare'], ['PREPARE TRANSACTION \'x\'', undefined],
      ['CREATE TEMP TABLE t (a int)', 'temp-table'], ['create temporary table t (a int)', 'temp-table'], ['CREATE GLOBAL TEMPORARY TABLE t (a int)', 'temp-table'], ['CREATE TABLE t (a int)', undefined],
      ['DECLARE c CURSOR WITH HOLD FOR SELECT 1', 'cursor-with-hold'], ['DECLARE c CURSOR FOR SELECT 1', undefined],
      ['SELECT pg_advisory_lock(1)', 'advisory-lock'], ['select pg_try_advisory_lock_shared(1)', 'advisory-lock'], ['SELECT pg_advisory_xact_lock(1)', undefined],
      ['SELECT 1', undefined], ['COMMIT', undefined], ['ROLLBACK', undefined], ['DELETE FROM t', undefined], ['UPDATE t SET a = 1', undefined], ['', undefined],
    ];
    for (const [sql, reason] of cases) {
      const command = classify(sql);
      assert.equal(command?.kind === 'pin' ? command.reason : undefined, reason, sql);
    }
  });

  it('pins on functions and blocks that leave session state, not on their transaction-scoped forms', function () {
    const cases: [string, string | undefined][] = [
      ["SELECT set_config('search_path', 'x', false) AS s", 'set'], ["select SET_CONFIG('a.b', $1, $2)", 'set'], ["SELECT set_config('a.b', 'v', is_local)", 'set'],
      ["SELECT set_config('request.jwt.claims', $1, true)", undefined], ["SELECT set_config('a.b', concat('x', ','), TRUE), 1", undefined],
      ["SELECT set_config('a.b', 'v', true), set_config('c.d', 'v', false)", 'set'],
      ['SELECT * INTO TEMP t FROM x', 'temp-table'], ['select a into temporary table t from x', 'temp-table'], ['SELECT a INTO t FROM x', undefined], ['SELECT into_temp FROM x', undefined],
      ['CREATE TABLE pg_temp.t (a int)', 'temp-table'], ['CREATE TABLE IF NOT EXISTS pg_temp.t (a int)', 'temp-table'], ['CREATE UNLOGGED TABLE pg_temp.t (a int)', 'temp-table'], ['CREATE TABLE public.t (a int)', undefined],
      ['DO $$BEGIN SET search_path = x; END$$', 'set'], ["DO $$ BEGIN PERFORM set_config('a.b', 'v', false); END $$", 'set'], ['DO $$ BEGIN IF true THEN RESET ALL; END IF; END $$', 'set'],
      ['DO $$ BEGIN UPDATE t SET a = 1; END $$', undefined], ['DO $$ BEGIN SET LOCAL search_path = x; END $$', undefined], ["DO $$ BEGIN PERFORM set_config('a.b', 'v', true); END $$", undefined],
      ['DO $$ BEGIN CREATE TEMP TABLE t (a int); END $$', 'temp-table'], ['DO $$ BEGIN PERFORM pg_advisory_lock(1); END $$', 'advisory-lock'], ['DO $$ BEGIN NULL; END $$', undefined], ["DO $$ BEGIN EXECUTE format('SET search_path = %I', 'x'); END $$", 'set'], ["DO $$ BEGIN EXECUTE 'UPDATE t SET a = 1'; END $$", undefined],
      ['/* controller=users */ SET search_path = x; SELECT 1', 'set'], ['/* x */ SELECT 1', undefined],
    ];
    for (const [sql, reason] of cases) {
      const command = classify(sql);
      assert.equal(command?.kind === 'pin' ? command.reason : undefined, reason, sql);
    }
  });

  it('finds the reads of the session\'s sequence values (currval, lastval), and whether the same text may have set them first', function () {
    const read = (sql: string): ReturnType<typeof sequenceRead> => {
      const buffer = Buffer.from(`${sql}\0`);
      return sequenceRead(buffer, 0, buffer.length);
    };
    const cases: [string, ReturnType<typeof sequenceRead>][] = [
      ["SELECT currval('s')", 'reads'], ['SELECT pg_catalog.currval($1)', 'reads'], ['SELECT LASTVAL()', 'reads'], ['select lastval ()', 'reads'],
      ["INSERT INTO child (parent) VALUES (currval('parent_id_seq'))", 'reads'], ["SELECT currval('s');", 'reads'],
      ["SELECT nextval('s'), currval('s')", 'reads-after-write'], ["SELECT setval('s', 5), lastval()", 'reads-after-write'],
      ["INSERT INTO t DEFAULT VALUES; SELECT currval('t_id_seq')", 'reads-after-write'],
      ['SELECT 1', undefined], ["SELECT nextval('s')", undefined], ['SELECT currval_of_something FROM t', undefined], ["SELECT 'lastval'", undefined],
    ];
    for (const [sql, want] of cases) assert.equal(read(sql), want, sql);
  });

  it('finds the words its checks look for in one pass, in any letter case, up to the text\'s NUL (property, against regular expressions)', function () {
    const fragment = fc.constantFrom('currval', 'LastVal', 'ADVISORY_LOCK', 'advisory_Lock', 'Set_Config', 'into', 'INTO', 'iNtO', 'curr', 'val', 'advisory', '_lock',
      'set', 'config', 'in', 'to', ';', ' ', '\t', '\n', 'SELECT', 'x', '(', "'", '\0');
    // `cut`: the text's end is the end of the range, without its NUL (a word may end right at `end`).
    fc.assert(fc.property(fc.array(fragment, { maxLength: 24 }), fc.nat(8), fc.boolean(), (parts, pad, cut) => {
      const text = parts.join('');
      const buffer = Buffer.from(`${'#'.repeat(pad)}${text}\0`);
      const lower = text.split('\0')[0]!.toLowerCase();
      let want = 0;
      if (/currval|lastval/.test(lower)) want |= TEXT_SEQUENCE_READ;
      if (lower.includes('advisory_lock')) want |= TEXT_ADVISORY_LOCK;
      if (lower.includes('set_config')) want |= TEXT_SET_CONFIG;
      if (lower.includes('into')) want |= TEXT_INTO;
      if (/;[\s;]*[^\s;]/.test(lower)) want |= TEXT_SEVERAL_STATEMENTS;
      assert.equal(scanStatementText(buffer, pad, cut ? buffer.length - 1 : buffer.length), want, JSON.stringify(text));
    }), { numRuns: 3000 });
  });

  it('tells a text that leaves only session advisory locks (a pinned client may be let go once its backend holds none) from one that may leave more', function () {
    const rows: [string, boolean, boolean][] = [
      // text, leaves only advisory locks, takes or releases one
      ['SELECT pg_try_advisory_lock(42)', true, true],
      ['select PG_ADVISORY_UNLOCK($1)', true, true],
      ['SELECT pg_advisory_unlock_all()', true, true],
      ['SELECT pg_advisory_lock(1); SELECT pg_advisory_lock_shared(2)', true, true],
      ['SELECT pg_advisory_xact_lock(1)', true, false],
      ['INSERT INTO t VALUES (1) RETURNING id', true, false],
      ['SELECT 1', true, false],
      ["SELECT pg_advisory_lock(1); SET work_mem = '1MB'", false, true],
      ["SELECT pg_advisory_lock(1), set_config('a.b', 'x', false)", false, true],
      ['SELECT pg_advisory_lock(1) INTO TEMP t', false, true],
      ['DO $$ BEGIN PERFORM pg_advisory_lock(1); END $$', false, true],
      ['SELECT pg_advisory_lock(1); CREATE TEMP TABLE t (a int)', false, true],
      ["SET search_path = 'a'", false, false],
      ['LISTEN c', false, false],
      ['PREPARE p AS SELECT 1', false, false],
    ];
    for (const [sql, only, mentions] of rows) {
      const buffer = Buffer.from(`${sql}\0`);
      assert.equal(leavesOnlyAdvisoryLocks(buffer, 0, buffer.length), only, sql);
      assert.equal(mentionsAdvisoryLock(buffer, 0, buffer.length), mentions, sql);
    }
  });

  it('sees the session-state functions and sequence reads written in mixed case, as PostgreSQL does', function () {
    const read = (sql: string): ReturnType<typeof sequenceRead> => {
      const buffer = Buffer.from(`${sql}\0`);
      return sequenceRead(buffer, 0, buffer.length);
    };
    assert.equal(read("SELECT CurrVal('s')"), 'reads');
    assert.equal(read('SELECT LastVal()'), 'reads');
    assert.deepEqual(classify('SELECT pg_Advisory_Lock(1)'), { kind: 'pin', reason: 'advisory-lock' });
    assert.deepEqual(classify("SELECT Set_Config('search_path', 'a', false)"), { kind: 'settings', changes: [{ kind: 'set', name: 'search_path', sql: "SELECT Set_Config('search_path', 'a', false)" }] });
    assert.deepEqual(classify('SELECT * Into Temp t FROM x'), { kind: 'pin', reason: 'temp-table' });
  });

  it('tells a Query that only begins a transaction block', function () {
    const begins = (sql: string): boolean => {
      const buffer = Buffer.from(`${sql}\0`);
      return startsTransaction(buffer, 0, buffer.length);
    };
    for (const sql of ['BEGIN', 'begin;', ' Begin Isolation Level Serializable', 'START TRANSACTION', '\tstart transaction read only;']) assert.ok(begins(sql), sql);
    for (const sql of ['SELECT 1', 'BEGIN; SELECT nextval(\'s\')', 'STARTX', 'COMMIT', '']) assert.ok(!begins(sql), sql);
  });

  it('reads a SET or RESET of one setting, or of the session\'s transaction defaults, standing alone as changes the sidecar carries, not a pin', function () {
    const cases: [string, ReturnType<typeof classifySessionCommand>][] = [
      ['SET extra_float_digits = 3', { kind: 'settings', changes: [{ kind: 'set', name: 'extra_float_digits', sql: 'SET extra_float_digits = 3' }] }],
      ["SET application_name = 'PostgreSQL JDBC Driver'", { kind: 'settings', changes: [{ kind: 'set', name: 'application_name', sql: "SET application_name = 'PostgreSQL JDBC Driver'" }] }],
      ['  set SESSION Search_Path to a, "B" ;; ', { kind: 'settings', changes: [{ kind: 'set', name: 'search_path', sql: 'set SESSION Search_Path to a, "B"' }] }],
      ["SET TIME ZONE 'UTC'", { kind: 'settings', changes: [{ kind: 'set', name: 'timezone', sql: "SET TIME ZONE 'UTC'" }] }],
      ["SET myapp.tenant = 'a;b'", { kind: 'settings', changes: [{ kind: 'set', name: 'myapp.tenant', sql: "SET myapp.tenant = 'a;b'" }] }],
      ['/* controller=users */ SET search_path = x', { kind: 'settings', changes: [{ kind: 'set', name: 'search_path', sql: 'SET search_path = x' }] }],
      ["SELECT set_config('TimeZone', 'UTC', false)", { kind: 'settings', changes: [{ kind: 'set', name: 'timezone', sql: "SELECT set_config('TimeZone', 'UTC', false)" }] }],
      ['SET statement_timeout TO DEFAULT', { kind: 'settings', changes: [{ kind: 'reset', name: 'statement_timeout' }] }], ['SET TIME ZONE LOCAL', { kind: 'settings', changes: [{ kind: 'reset', name: 'timezone' }] }],
      ['RESET statement_timeout', { kind: 'settings', changes: [{ kind: 'reset', name: 'statement_timeout' }] }], ['reset time zone', { kind: 'settings', changes: [{ kind: 'reset', name: 'timezone' }] }], ['-- tag\nRESET a.b;', { kind: 'settings', changes: [{ kind: 'reset', name: 'a.b' }] }],
      ["SELECT set_config('role', 'bob', false)", { kind: 'pin', reason: 'set' }], ["SELECT set_config($1, 'x', false)", { kind: 'pin', reason: 'set' }],
      // Its value bound to $1 (row-level security per request): the setting takes what the Bind carries.
      ["SELECT set_config('app.tenant', $1, false)", { kind: 'setting-parameter', name: 'app.tenant' }], ["select pg_catalog.set_config('App.Tenant', $1::text, FALSE)", { kind: 'setting-parameter', name: 'app.tenant' }],
      ["SELECT set_config('role', $1, false)", { kind: 'pin', reason: 'set' }],
      // Settings of the current transaction only, as SET TRANSACTION: nothing to carry or pin.
      ["SET transaction_isolation = 'serializable'", undefined], ['set session Transaction_Read_Only to on', undefined], ['SET transaction_deferrable = on', undefined],
      ['RESET transaction_isolation', undefined], ["SELECT set_config('transaction_isolation', 'serializable', false)", undefined],
      // They act on the session's own connection: end it when idle, size its temporary buffers once, seed its random(), read its statements.
      ['SET idle_session_timeout = 1000', { kind: 'pin', reason: 'set' }], ["SET temp_buffers = '32MB'", { kind: 'pin', reason: 'set' }], ['SET seed = 0.5', { kind: 'pin', reason: 'set' }],
      ["SET client_encoding = 'LATIN1'", { kind: 'pin', reason: 'set' }], ["SET NAMES 'LATIN1'", { kind: 'pin', reason: 'set' }],
      // To UTF-8 (the encoding the sidecar's server connections run in; ruby-pg's and ActiveRecord's SET after connecting): carried.
      ["set client_encoding to 'UTF8'", { kind: 'settings', changes: [{ kind: 'set', name: 'client_encoding', sql: "set client_encoding to 'UTF8'" }] }],
      ["set client_encoding to 'unicode'", { kind: 'settings', changes: [{ kind: 'set', name: 'client_encoding', sql: "set client_encoding to 'unicode'" }] }],
      ['SET client_encoding = "utf-8"', { kind: 'settings', changes: [{ kind: 'set', name: 'client_encoding', sql: 'SET client_encoding = "utf-8"' }] }],
      ["SET NAMES 'UTF8'", { kind: 'settings', changes: [{ kind: 'set', name: 'client_encoding', sql: "SET NAMES 'UTF8'" }] }],
      ["SET client_encoding = 'UTF8X'", { kind: 'pin', reason: 'set' }], ['RESET client_encoding', { kind: 'pin', reason: 'set' }], ['SET client_encoding TO DEFAULT', { kind: 'pin', reason: 'set' }],
      // Read otherwise where the replay runs: a backslash (standard_conforming_strings), bytes beyond ASCII (client_encoding).
      ["SET application_name = 'a\\'b'", { kind: 'pin', reason: 'set' }], ["SET application_name = E'C:\\\\x'", { kind: 'pin', reason: 'set' }],
      ["SET application_name = 'caf\u00e9'", { kind: 'pin', reason: 'set' }], ["SELECT set_config('a.b', 'x\\y', false)", { kind: 'pin', reason: 'set' }], ["SELECT set_config('idle_session_timeout', '1s', false)", { kind: 'pin', reason: 'set' }],
      ["SELECT set_config('a.b', 'x', false), 1", { kind: 'pin', reason: 'set' }],
      // pgjdbc's setTransactionIsolation: the defaults it changes, each carried as its own SET.
      ['SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ', { kind: 'settings', changes: [{ kind: 'set', name: 'default_transaction_isolation', sql: "SET default_transaction_isolation TO 'repeatable read'" }] }],
      ['set session characteristics as transaction read only, not deferrable', { kind: 'settings', changes: [
        { kind: 'set', name: 'default_transaction_read_only', sql: "SET default_transaction_read_only TO 'on'" },
        { kind: 'set', name: 'default_transaction_deferrable', sql: "SET default_transaction_deferrable TO 'off'" },
      ] }],
      ['SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SNAPSHOT', { kind: 'pin', reason: 'set' }],
      // SET forms of their own grammar: the setting each changes (SET NAMES is client_encoding's: carried to UTF-8 only).
      ["set schema 'app'", { kind: 'settings', changes: [{ kind: 'set', name: 'search_path', sql: "set schema 'app'" }] }],
      ['SET XML OPTION CONTENT', { kind: 'settings', changes: [{ kind: 'set', name: 'xmloption', sql: 'SET XML OPTION CONTENT' }] }],
      ['SET NAMES DEFAULT', { kind: 'pin', reason: 'set' }],
      // Setting changes only, several in one Query (an ORM's connect hook): carried together.
      ["SET search_path = app; SET statement_timeout = '5s'; RESET work_mem", { kind: 'settings', changes: [
        { kind: 'set', name: 'search_path', sql: 'SET search_path = app' }, { kind: 'set', name: 'statement_timeout', sql: "SET statement_timeout = '5s'" }, { kind: 'reset', name: 'work_mem' },
      ] }],
      // With SHOWs among them, which change nothing (psqlODBC's connect): the same.
      ["SET DateStyle = 'ISO';SET extra_float_digits = 2;show transaction_isolation", { kind: 'settings', changes: [
        { kind: 'set', name: 'datestyle', sql: "SET DateStyle = 'ISO'" }, { kind: 'set', name: 'extra_float_digits', sql: 'SET extra_float_digits = 2' },
      ] }],
      ['SET work_mem = 1024; SHOW ALL; show "work_mem"', { kind: 'settings', changes: [{ kind: 'set', name: 'work_mem', sql: 'SET work_mem = 1024' }] }],
      // Anything else beside them still pins.
      ['SET work_mem = 1024; SHOW work_mem; SELECT 1', { kind: 'pin', reason: 'set' }],
    ];
    for (const [sql, expected] of cases) assert.deepEqual(classify(sql), expected, sql);
  });

  it('reads the scope of set_config from its third argument, whatever the first two hold', function () {
    assert.equal(setsSessionConfig("select set_config('a', 'x,y)', true)"), false);
    assert.equal(setsSessionConfig("select set_config('a', f(1, 2), true)"), false);
    assert.equal(setsSessionConfig("select set_config('a', f(1, 2), false)"), true);
    assert.equal(setsSessionConfig('select 1'), false);
  });

  it('splits a simple Query into statements at semicolons outside quotes, dollar quotes and comments', function () {
    const split = (sql: string): string[] => {
      const buffer = Buffer.from(`${sql}\0`);
      return splitStatements(buffer, 0, buffer.length).map(([a, b]) => buffer.toString('utf8', a, b).trim());
    };
    assert.deepEqual(split('SELECT 1; SET x = 1'), ['SELECT 1', 'SET x = 1']);
    assert.deepEqual(split("SELECT ';'; SELECT E'\\';'; SELECT \"a;b\" FROM t;"), ["SELECT ';'", "SELECT E'\\';'", 'SELECT "a;b" FROM t']);
    assert.deepEqual(split('DO $f$ BEGIN NULL; END $f$; SELECT $1; SELECT 2'), ['DO $f$ BEGIN NULL; END $f$', 'SELECT $1', 'SELECT 2']);
    assert.deepEqual(split('SELECT 1 -- ; not here\n; /* ; */ SELECT 2;;'), ['SELECT 1 -- ; not here', 'SELECT 2']);
    assert.deepEqual(split("SELECT 'it''s;'; SELECT 3"), ["SELECT 'it''s;'", 'SELECT 3']);
  });

  it('finds the session commands after the first statement of a multi-statement Query', function () {
    const later = (sql: string): ReturnType<typeof laterSessionCommands> => {
      const buffer = Buffer.from(`${sql}\0`);
      return laterSessionCommands(buffer, 0, buffer.length);
    };
    assert.deepEqual(later('SELECT 1; SET search_path = x'), [{ kind: 'pin', reason: 'set' }], 'a SET among other statements pins');
    assert.deepEqual(later('BEGIN; SELECT pg_advisory_lock(1); COMMIT'), [{ kind: 'pin', reason: 'advisory-lock' }]);
    assert.deepEqual(later('SELECT 1; LISTEN a'), [{ kind: 'pin', reason: 'listen' }]);
    assert.deepEqual(later('SELECT 1; DISCARD ALL'), [{ kind: 'discard-all' }]);
    // asyncpg's reset when a pool takes a connection back: nothing pins.
    assert.deepEqual(later('SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;'), [{ kind: 'unlisten', channel: '*', alone: false }, { kind: 'reset-all' }]);
    assert.deepEqual(later("SELECT 1; SELECT 'SET x = 1; RESET ALL'"), []);
    assert.deepEqual(later('SELECT 1;'), []);
    assert.deepEqual(later('SET x = 1'), []);
  });

  it('splits any text without reading past its end, and every statement lies inside it', function () {
    fc.assert(fc.property(fc.string(), fc.string(), (sql, after) => {
      const buffer = Buffer.from(`${sql}${after}`);
      const end = Buffer.byteLength(sql);
      const statements = splitStatements(buffer, 0, end);
      assert.deepEqual(statements, splitStatements(Buffer.from(sql), 0, end));
      for (const [a, b] of statements) assert.ok(a >= 0 && a < b && b <= end);
    }));
  });

  it('reads LISTEN and UNLISTEN with their channel, and whether they stand alone', function () {
    assert.deepEqual(classify('LISTEN orders'), { kind: 'listen', channel: 'orders', alone: true });
    assert.deepEqual(classify('listen "Orders";'), { kind: 'listen', channel: 'Orders', alone: true });
    assert.deepEqual(classify('UNLISTEN *'), { kind: 'unlisten', channel: '*', alone: true });
    assert.deepEqual(classify('LISTEN a; SELECT 1'), { kind: 'listen', channel: 'a', alone: false });
    assert.equal(classify('UPDATE t SET a = 1'), undefined);
  });

  it('reads DEALLOCATE and DISCARD with the statement name as PostgreSQL folds it', function () {
    assert.deepEqual(classify('DEALLOCATE _pg3_1'), { kind: 'deallocate', name: '_pg3_1' });
    assert.deepEqual(classify('deallocate prepare Foo'), { kind: 'deallocate', name: 'foo' });
    assert.deepEqual(classify('DEALLOCATE "Foo"'), { kind: 'deallocate', name: 'Foo' });
    assert.deepEqual(classify('DEALLOCATE ALL'), { kind: 'deallocate-all' });
    assert.deepEqual(classify('DEALLOCATE PREPARE ALL'), { kind: 'deallocate-all' });
    assert.deepEqual(classify('DISCARD ALL'), { kind: 'discard-all' });
    assert.equal(classify('DISCARD PLANS'), undefined);
  });

  it('never reads past the end it is given', function () {
    fc.assert(fc.property(fc.string(), fc.string(), (sql, after) => {
      const buffer = Buffer.from(`${sql}${after}`);
      const end = Buffer.byteLength(sql);
      const inside = classifySessionCommand(buffer, 0, end);
      const alone = classifySessionCommand(Buffer.from(sql), 0, end);
      assert.deepEqual(inside?.kind, alone?.kind);
    }));
  });
});

describe('client settings from the startup packet', function () {
  it('keeps every run-time parameter and the -c switches of options, lower-cased, and refuses replication', function () {
    const settings = clientSettingsFromStartup({ user: 'app', database: 'app', application_name: 'web', TimeZone: 'Asia/Tokyo', options: '-c statement_timeout=5s --search-path=a,b -cwork_mem=4MB' });
    assert.deepEqual([...settings.values], [['application_name', 'web'], ['timezone', 'Asia/Tokyo'], ['statement_timeout', '5s'], ['search_path', 'a,b'], ['work_mem', '4MB']]);
    assert.deepEqual([...clientSettingsFromStartup({ user: 'app' }).values], [['application_name', '']], 'no name is an empty name, as direct');
    assert.throws(() => clientSettingsFromStartup({ user: 'app', replication: 'database' }), /replication/);
    assert.throws(() => clientSettingsFromStartup({ user: 'app', options: '-d 5' }), /-d/);
  });

  it('lets a startup parameter win over the same setting in options, as PostgreSQL applies options first (lib/pq sends client_encoding=UTF8)', function () {
    const settings = clientSettingsFromStartup({ user: 'app', client_encoding: 'UTF8', options: '-c client_encoding=SQL_ASCII -c DateStyle=ISO -c datestyle=German' });
    assert.equal(settings.values.get('client_encoding'), 'UTF8');
    assert.equal(settings.values.get('datestyle'), 'German', 'within options, the last one wins');
  });

  it('splits options as PostgreSQL does, with backslash escapes', function () {
    assert.deepEqual(parseOptions('-c search_path=my\\ schema  -c a=b'), [['search_path', 'my schema'], ['a', 'b']]);
  });

  it('builds the SQL that takes a connection from one client\'s settings to another\'s', function () {
    const a = clientSettingsFromStartup({ statement_timeout: '5s', application_name: "o'brien" });
    const b = clientSettingsFromStartup({ statement_timeout: '5s', timezone: 'UTC' });
    assert.equal(settingsSql(a, a), undefined);
    assert.equal(settingsSql(b, a), "SELECT pg_catalog.set_config(E'timezone', E'UTC', false), pg_catalog.set_config(E'application_name', E'', false)");
    // statement_timeout last: a tiny one must not cancel the rest of the replay.
    assert.equal(settingsSql(a, NO_SETTINGS), "SELECT pg_catalog.set_config(E'application_name', E'o''brien', false); SELECT pg_catalog.set_config(E'statement_timeout', E'5s', false)");
    const x = clientSettingsFromStartup({ x: 'a\\b' });
    assert.equal(settingsSql(x, x, true), "SELECT pg_catalog.set_config(E'x', E'a\\\\b', false), pg_catalog.set_config(E'application_name', E'', false)");
    assert.equal(settingsSql(NO_SETTINGS, b), 'RESET "statement_timeout"; RESET "timezone"; RESET "application_name"');
    // Beyond ASCII as Unicode escapes: read alike in whatever client_encoding the connection was left.
    assert.equal(settingsSql(clientSettingsFromStartup({ 'myapp.city': 'Z\u00fcrich \u{1f600}' }), NO_SETTINGS), "SELECT pg_catalog.set_config(E'myapp.city', E'Z\\u00fcrich \\U0001f600', false), pg_catalog.set_config(E'application_name', E'', false)");
  });

  it('carries a client\'s SETs after its startup values, and a RESET back to its startup value', function () {
    const startup = clientSettingsFromStartup({ application_name: 'web', timezone: 'Asia/Tokyo' });
    const afterSet = changeSettings(changeSettings(startup, { kind: 'set', name: 'extra_float_digits', sql: 'SET extra_float_digits = 3' }), { kind: 'set', name: 'timezone', sql: "SET TIME ZONE 'UTC'" });
    assert.notEqual(afterSet.key, startup.key);
    // Another client's connection (startup values only) gets the SETs; one on the same SETs gets nothing.
    assert.equal(settingsSql(afterSet, startup), "SET extra_float_digits = 3; SET TIME ZONE 'UTC'");
    assert.equal(settingsSql(afterSet, afterSet), undefined);
    assert.equal(settingsSql(startup, afterSet), "SELECT pg_catalog.set_config(E'timezone', E'Asia/Tokyo', false); RESET \"extra_float_digits\"");
    // RESET: the client is back on its startup value; the connection that ran it is on its login value, so the next hand-out sets it.
    const reset = { kind: 'reset', name: 'timezone' } as const;
    const afterReset = changeSettings(afterSet, reset);
    assert.deepEqual([...afterReset.statements], [['extra_float_digits', 'SET extra_float_digits = 3']]);
    const server = serverSettingsAfter(afterReset, reset, NO_SETTINGS);
    assert.equal(settingsSql(afterReset, server), "SELECT pg_catalog.set_config(E'timezone', E'Asia/Tokyo', false)");
    assert.equal(changeSettings(startup, reset), startup, 'a RESET of what was never SET changes nothing');
    // A SET that ends in a -- comment must not swallow what is replayed after it on its line.
    const commented = changeSettings(startup, { kind: 'set', name: 'statement_timeout', sql: 'SET statement_timeout = 5 -- why' });
    assert.equal(settingsSql(commented, afterSet), "SELECT pg_catalog.set_config(E'timezone', E'Asia/Tokyo', false); RESET \"extra_float_digits\"; SET statement_timeout = 5 -- why\n");
    assert.equal(startupSettings(afterSet).key, startup.key);
    // The last SET of a setting wins and replays last.
    const again = changeSettings(afterSet, { kind: 'set', name: 'extra_float_digits', sql: 'SET extra_float_digits TO 2' });
    assert.deepEqual([...again.statements.values()], ["SET TIME ZONE 'UTC'", 'SET extra_float_digits TO 2']);
  });

  it('takes any sequence of SETs and RESETs to the same settings on the connection as on the client', function () {
    const names = ['a.x', 'a.y', 'timezone'];
    const change = fc.oneof(
      fc.record({ kind: fc.constant('set' as const), name: fc.constantFrom(...names), value: fc.integer({ min: 0, max: 3 }) }).map(({ name, value }) => ({ kind: 'set' as const, name, sql: `SET ${name} = ${value}` })),
      fc.record({ kind: fc.constant('reset' as const), name: fc.constantFrom(...names) }),
    );
    fc.assert(fc.property(fc.array(change, { maxLength: 8 }), fc.array(change, { maxLength: 8 }), (ownChanges, otherChanges) => {
      // A model server: SQL applied in order; set_config and SET set a value, RESET goes back to nothing.
      const run = (state: Map<string, string>, sql: string | undefined): void => {
        for (const statement of sql?.split('; ') ?? []) {
          const set = /^SET (\S+) = (\d)$/.exec(statement);
          if (set !== null) state.set(set[1]!, set[2]!);
          else if (statement.startsWith('RESET ')) state.delete(JSON.parse(statement.slice(6)) as string);
          else for (const call of statement.matchAll(/set_config\(E'([^']*)', E'([^']*)', false\)/g)) state.set(call[1]!, call[2]!);
        }
      };
      const clientOf = (changes: typeof ownChanges): ClientSettings => changes.reduce((settings, c) => changeSettings(settings, c), clientSettingsFromStartup({ 'a.x': '9' }));
      const own = clientOf(ownChanges);
      const other = clientOf(otherChanges);
      const expected = new Map<string, string>();
      run(expected, settingsSql(own, NO_SETTINGS));
      const actual = new Map<string, string>();
      run(actual, settingsSql(other, NO_SETTINGS));
      run(actual, settingsSql(own, other));
      assert.deepEqual([...actual].sort(), [...expected].sort());
    }));
  });
});
