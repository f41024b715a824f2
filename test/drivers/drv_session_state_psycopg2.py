"""Session state in transaction mode (psycopg2, autocommit): SET, a temporary
table, a session advisory lock, a WITH HOLD cursor, LISTEN/NOTIFY.

Each kind of state is set up by a fresh client, which is then moved off its
backend when the target pools per transaction (see common.displace); the
client must still see its own state, as direct, and another client must never
see it. Each step records a value or SQLSTATE for comparison with direct.
"""
import select
import sys
import time
import zlib

import psycopg2

from common import config, displace, emit, libpq_kwargs, step

cfg = config()
target = cfg['target']
holders = cfg.get('holders', 0)
suffix = cfg['suffix']
# Advisory lock keys of this run and target: a pooler that loses track of a lock leaves it
# held on some server connection, and the next target must not wait for it.
LOCK = zlib.crc32(suffix.encode()) % 1_000_000_000


def connect():
    conn = psycopg2.connect(**libpq_kwargs(target))
    conn.autocommit = True
    return conn


def one(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0] if cur.description else cur.statusmessage


def open_holder():
    conn = connect()
    conn.autocommit = False
    pid = one(conn, 'SELECT pg_backend_pid()')

    def release():
        conn.rollback()
        conn.close()
    return pid, release


def with_state(name, setup, check, other=None):
    """Sets state up in one transaction (noting its backend), moves the client, checks it; `other` looks from another client."""
    print('begin', name, file=sys.stderr, flush=True)
    conn = connect()
    try:
        one(conn, 'BEGIN')
        one(conn, "SET LOCAL lock_timeout = '5s'")  # a lock left behind fails the step, not the run
        result = {'setup': step(lambda: setup(conn))}
        pid = one(conn, 'SELECT pg_backend_pid()')
        one(conn, 'COMMIT')
        release = displace(open_holder, pid, holders, wait=0.75) if holders else (lambda: None)
        try:
            result['own'] = step(lambda: check(conn))
            if other:
                peer = connect()
                try:
                    result['other'] = step(lambda: other(peer))
                finally:
                    peer.close()
        finally:
            release()
        return result
    finally:
        conn.close()


def others_settings(peer):
    return sorted({one(peer, 'SHOW statement_timeout') for _ in range(max(holders, 1) * 2)})


def listen_notify():
    print('begin listenNotify', file=sys.stderr, flush=True)
    conn = connect()
    try:
        one(conn, 'BEGIN')
        one(conn, 'LISTEN drv_chan_' + suffix)
        pid = one(conn, 'SELECT pg_backend_pid()')
        one(conn, 'COMMIT')
        release = displace(open_holder, pid, holders, wait=0.75) if holders else (lambda: None)
        try:
            peer = connect()
            one(peer, "SELECT pg_notify(%s, 'hello')", ('drv_chan_' + suffix,))
            peer.close()
            end = time.monotonic() + 2
            while not conn.notifies and time.monotonic() < end:
                if select.select([conn], [], [], 0.2)[0]:
                    conn.poll()
            if not conn.notifies:
                one(conn, 'SELECT 1')  # some poolers deliver with the next reply
            return {'received': [n.payload for n in conn.notifies]}
        finally:
            release()
    finally:
        conn.close()


emit({
    'set': with_state('set', lambda c: one(c, 'SET statement_timeout = 4567'), lambda c: one(c, 'SHOW statement_timeout'), others_settings),
    'tempTable': with_state(
        'tempTable',
        lambda c: (one(c, 'CREATE TEMP TABLE drv_tmp (a int)'), one(c, 'INSERT INTO drv_tmp VALUES (1)'))[1],
        lambda c: one(c, 'SELECT count(*) FROM drv_tmp'),
        lambda p: one(p, "SELECT to_regclass('pg_temp.drv_tmp') IS NULL")),
    'advisoryLock': with_state(
        'advisoryLock',
        lambda c: one(c, 'SELECT pg_advisory_lock(%s)::text', (LOCK,)),
        lambda c: one(c, 'SELECT pg_advisory_unlock(%s)', (LOCK,)),
        None),
    'advisoryLockSeenByOther': with_state(
        'advisoryLockSeenByOther',
        lambda c: one(c, 'SELECT pg_advisory_lock(%s)::text', (LOCK + 1,)),
        lambda c: None,
        lambda p: one(p, 'SELECT pg_try_advisory_lock(%s) AND pg_advisory_unlock(%s)', (LOCK + 1, LOCK + 1))),
    'cursorWithHold': with_state(
        'cursorWithHold',
        lambda c: one(c, 'DECLARE drv_c CURSOR WITH HOLD FOR SELECT generate_series(1, 3)'),
        lambda c: (one(c, 'FETCH 2 FROM drv_c'), one(c, 'FETCH 1 FROM drv_c'), one(c, 'CLOSE drv_c')),
        None),
    'listenNotify': step(listen_notify),
})
