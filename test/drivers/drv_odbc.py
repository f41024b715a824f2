"""psqlODBC (Debian's odbc-postgresql, through unixODBC and pyodbc) against one target.

Run by test/integration/drivers.test.ts as `/usr/bin/python3 drv_odbc.py '<json config>'`;
prints one JSON object on its last line (see common.py). Without pyodbc or the driver it
prints {"skipped": "..."}.

psqlODBC sends `SET DateStyle = 'ISO';SET extra_float_digits = 2;show transaction_isolation`
on every connect, prepares each statement server-side as `_PLAN0x<address>` and sends
`DEALLOCATE` as a simple Query after it ran, and wraps each statement of a transaction in a
savepoint (`SAVEPOINT _EXEC_SVP_...;<statement>`), rolling back to it when the statement
fails: the transaction goes on.
"""
from common import config, emit

cfg = config()
try:
    import pyodbc
except ImportError:
    emit({'skipped': 'pyodbc is not installed (Debian: python3-pyodbc odbc-postgresql)'})
    raise SystemExit(0)
if 'PostgreSQL Unicode' not in pyodbc.drivers():
    emit({'skipped': 'the psqlODBC driver is not installed (Debian: odbc-postgresql)'})
    raise SystemExit(0)

t = cfg['target']
table = f"drv_odbc_{cfg['suffix']}"
conninfo = (f"Driver={{PostgreSQL Unicode}};Server={t['host']};Port={t['port']};Database={t['dbname']};"
            f"Uid={t['user']};Pwd={t['password']};UseServerSidePrepare=1")


def step(fn):
    """A step's value, or its SQLSTATE (pyodbc puts psqlODBC's, the server's, first)."""
    try:
        return {'ok': True, 'value': fn()}
    except pyodbc.Error as error:
        state = error.args[0] if error.args and isinstance(error.args[0], str) else type(error).__name__
        return {'ok': False, 'sqlstate': state, 'message': str(error).splitlines()[0]}


def one(connection, sql, *params):
    cursor = connection.cursor()
    cursor.execute(sql, *params)
    row = cursor.fetchone()
    cursor.close()
    return None if row is None else list(row)


result = {}
# More connections than a transaction-mode grant holds (`connections`, from the test): each logs
# in with psqlODBC's SETs, and they take turns. A pooler that pins them for those SETs refuses the
# ones beyond the grant.
count = cfg['connections']
connections = []
result['connect'] = step(lambda: [connections.append(pyodbc.connect(conninfo, autocommit=True, timeout=10)) or True for _ in range(count)] and count)
turns = []
if len(connections) == count:
    for round_ in range(3):
        for i, c in enumerate(connections):
            turns.append(step(lambda c=c, i=i: one(c, 'SELECT ?::int * 100 + ?::int', round_, i)))
            turns.append(step(lambda c=c: one(c, "SELECT current_setting('DateStyle'), current_setting('extra_float_digits')")))
result['turns'] = turns

if connections:
    c = connections[0]
    result['create'] = step(lambda: c.cursor().execute(f'CREATE TABLE {table} (id int PRIMARY KEY, note text)') and True)
    # A transaction: a statement fails, psqlODBC rolls back to its savepoint, the transaction goes on and commits.
    c.autocommit = False
    result['insert'] = step(lambda: c.cursor().execute(f'INSERT INTO {table} VALUES (?, ?)', 1, 'one').rowcount)
    result['failing'] = step(lambda: one(c, 'SELECT 1 / ?::int', 0))
    result['afterFailure'] = step(lambda: one(c, f'SELECT count(*) FROM {table}'))
    result['duplicate'] = step(lambda: c.cursor().execute(f'INSERT INTO {table} VALUES (?, ?)', 1, 'again').rowcount)
    result['second'] = step(lambda: c.cursor().execute(f'INSERT INTO {table} VALUES (?, ?)', 2, 'two').rowcount)
    result['commit'] = step(lambda: c.commit() or True)
    # Read from another connection (another server connection in transaction mode): what was committed.
    other = connections[-1]
    result['committed'] = step(lambda: one(other, f"SELECT string_agg(id || ':' || note, ',' ORDER BY id) FROM {table}"))
    # A transaction rolled back leaves nothing.
    result['rolledBackInsert'] = step(lambda: c.cursor().execute(f'INSERT INTO {table} VALUES (?, ?)', 3, 'three').rowcount)
    result['rollback'] = step(lambda: c.rollback() or True)
    result['afterRollback'] = step(lambda: one(other, f'SELECT count(*) FROM {table}'))
    c.autocommit = True
    result['drop'] = step(lambda: c.cursor().execute(f'DROP TABLE {table}') and True)
for c in connections:
    c.close()
emit(result)
