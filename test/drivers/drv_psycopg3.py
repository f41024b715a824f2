"""psycopg 3: protocol-level prepared statements under load, and SQL-level
statement commands (PREPARE/EXECUTE, DEALLOCATE, DISCARD ALL).

`prepared`: threads with prepare_threshold=0 (every query a named statement)
and a rollback every 5th transaction; psycopg 3 then sends `DEALLOCATE ALL`,
which must act on that client alone. `sqlCommands`: steps whose results
(value or SQLSTATE) must equal direct's; between PREPARE and EXECUTE the client
is moved to another server connection when the target pools per transaction.
`identity`: the BackendKeyData pid (conn.info.backend_pid, libpq PQbackendPID)
against pg_backend_pid(), the sender pid of the client's own NOTIFY (how psycopg
recognises self-notifications), cancel, and pg_terminate_backend of that pid.
`cancelWhileQueued`: conn.cancel() of a statement waiting behind a busy pool.
"""
import threading
import time

import psycopg

from common import config, deadline, displace, emit, libpq_kwargs, message, sqlstate, step

cfg = config()
target = cfg['target']
holders = cfg.get('holders', 0)


def connect(**extra):
    kw = libpq_kwargs(target)
    kw.pop('dbname')
    return psycopg.connect(dbname=target['dbname'], **kw, **extra)


def prepared(threads, transactions, seconds):
    outcome = {'threads': threads, 'transactions': 0, 'failed': 0, 'errors': {}, 'deallocateAllSent': False}
    lock = threading.Lock()
    over = deadline(seconds)

    def worker(k):
        try:
            conn = connect(prepare_threshold=0)
        except psycopg.Error as error:
            with lock:
                outcome['failed'] += transactions
                outcome['errors'][message(error)] = outcome['errors'].get(message(error), 0) + transactions
            return
        with conn:
            for i in range(transactions):
                if over():
                    break
                try:
                    with conn.cursor() as cur:
                        cur.execute('SELECT %s::int + 1', (i,))
                        assert cur.fetchone()[0] == i + 1
                        cur.execute('SELECT %s::text || %s::text', ('t', str(k)))
                        assert cur.fetchone()[0] == 't' + str(k)
                    if i % 5 == 4:
                        conn.rollback()
                    else:
                        conn.commit()
                    ok = True
                except Exception as error:  # noqa: BLE001
                    ok = False
                    key = '%s %s' % (sqlstate(error), message(error))
                    try:
                        conn.rollback()
                    except psycopg.Error:
                        pass
                with lock:
                    outcome['transactions'] += 1
                    if not ok:
                        outcome['failed'] += 1
                        outcome['errors'][key] = outcome['errors'].get(key, 0) + 1
                    if i % 5 == 4 and ok:
                        outcome['deallocateAllSent'] = True

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    # Keep the report short: the most frequent errors first.
    outcome['errors'] = dict(sorted(outcome['errors'].items(), key=lambda kv: -kv[1])[:3])
    return outcome


def open_holder():
    conn = connect(autocommit=True)
    conn.execute('BEGIN')
    pid = conn.execute('SELECT pg_backend_pid()').fetchone()[0]

    def release():
        conn.execute('COMMIT')
        conn.close()
    return pid, release


def sql_commands():
    conn = connect(autocommit=True)
    other = connect(autocommit=True, prepare_threshold=0)
    steps = {}
    held = []

    def value(sql):
        return conn.execute(sql).fetchone()[0]

    def prepare_then_move(sql):
        # PREPARE and the pid in one transaction: both on the backend that holds the statement.
        conn.execute('BEGIN')
        try:
            status = conn.execute(sql).statusmessage
            pid = value('SELECT pg_backend_pid()')
        finally:
            conn.execute('COMMIT')
        if holders:
            # The holder keeps that backend busy until the next step ran elsewhere.
            held.append(displace(open_holder, pid, holders, wait=0.75))
        return status

    def release_held():
        while held:
            held.pop()()

    def other_client():
        # Another client's protocol-level statement, run on every server connection.
        failures = 0
        for i in range(max(holders, 1) * 2):
            try:
                assert other.execute('SELECT %s::int * 3', (i,)).fetchone()[0] == i * 3
            except Exception:  # noqa: BLE001
                failures += 1
        return failures

    steps['otherClientBefore'] = step(other_client)
    steps['prepare'] = step(lambda: prepare_then_move('PREPARE drv_s1 AS SELECT $1::int * 2'))
    steps['executeAfterMove'] = step(lambda: value('EXECUTE drv_s1(21)'))
    release_held()
    steps['deallocateName'] = step(lambda: conn.execute('DEALLOCATE drv_s1').statusmessage)
    steps['executeDeallocated'] = step(lambda: value('EXECUTE drv_s1(1)'))
    steps['prepareAgain'] = step(lambda: prepare_then_move('PREPARE drv_s1 AS SELECT $1::int * 4'))
    steps['executeRedefined'] = step(lambda: value('EXECUTE drv_s1(2)'))
    release_held()
    steps['prepare2'] = step(lambda: conn.execute('PREPARE drv_s2 AS SELECT 2').statusmessage)
    steps['deallocateAll'] = step(lambda: conn.execute('DEALLOCATE ALL').statusmessage)
    steps['executeAfterDeallocateAll'] = step(lambda: value('EXECUTE drv_s2'))
    steps['otherClientAfterDeallocateAll'] = step(other_client)
    steps['prepare3'] = step(lambda: conn.execute('PREPARE drv_s3 AS SELECT 3').statusmessage)
    steps['discardAll'] = step(lambda: conn.execute('DISCARD ALL').statusmessage)
    steps['executeAfterDiscardAll'] = step(lambda: value('EXECUTE drv_s3'))
    steps['otherClientAfterDiscardAll'] = step(other_client)
    steps['protocolPrepared'] = step(lambda: [conn.execute('SELECT %s::int', (i,), prepare=True).fetchone()[0] for i in range(3)])
    steps['protocolAfterDeallocateAll'] = step(lambda: (conn.execute('DEALLOCATE ALL'), conn.execute('SELECT %s::int', (7,), prepare=True).fetchone()[0])[1])
    conn.close()
    other.close()
    return steps


def identity():
    steps = {}
    conn = connect(autocommit=True)
    pid = conn.info.backend_pid
    steps['pidIsBackendPid'] = step(lambda: conn.execute('SELECT pg_backend_pid()').fetchone()[0] == pid)
    senders = []
    conn.add_notify_handler(lambda n: senders.append(n.pid))

    def notify_self():
        conn.execute('LISTEN drv_identity')
        conn.execute("NOTIFY drv_identity, 'self'")
        # Delivered with the reply to the next command if not with the NOTIFY's own.
        conn.execute('SELECT 1')
        return [sender == pid for sender in senders]

    steps['notifySenderIsOwnPid'] = step(notify_self)

    def cancel():
        timer = threading.Timer(0.3, conn.cancel)
        timer.start()
        try:
            conn.execute('SELECT pg_sleep(10)')
            return 'finished'
        finally:
            timer.join()

    steps['cancel'] = step(cancel)
    steps['terminateOwnPid'] = step(lambda: conn.execute('SELECT pg_terminate_backend(%s)', (pid,)).fetchone()[0])
    steps['closedAfter'] = step(lambda: conn.closed)
    conn.close()
    return steps


def cancel_while_queued(hold=2.0):
    """`conn.cancel()` (libpq PQcancel, from a thread) of a statement sent while
    the target's pool is busy: as many connections as it holds sleep `hold`
    seconds, so in transaction mode the statement waits for a server connection.
    Direct it runs and is cancelled; either way 57014 well before the holders end."""
    holding = [connect(autocommit=True) for _ in range(holders or 2)]
    conn = connect(autocommit=True)
    threads = [threading.Thread(target=h.execute, args=('SELECT pg_sleep(%s)', (hold,))) for h in holding]
    for t in threads:
        t.start()
    time.sleep(0.3)
    timer = threading.Timer(0.3, conn.cancel)
    started = time.monotonic()
    timer.start()
    try:
        cancelled = step(lambda: conn.execute('SELECT pg_sleep(10)').fetchone() and 'finished')
        seconds = time.monotonic() - started
    finally:
        timer.join()
    for t in threads:
        t.join()
    result = {'cancelled': cancelled, 'beforeHoldersEnd': seconds < hold - 0.5, 'seconds': round(seconds, 2),
              'next': step(lambda: conn.execute('SELECT 42').fetchone()[0])}
    for c in holding + [conn]:
        c.close()
    return result


emit({
    'identity': identity(),
    'cancelWhileQueued': cancel_while_queued(),
    'prepared': prepared(cfg.get('threads', 20), cfg.get('transactions', 40), cfg.get('seconds', 6)),
    'sqlCommands': sql_commands(),
})
