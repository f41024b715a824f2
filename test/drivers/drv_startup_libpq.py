"""Startup parameters through libpq (psycopg2): `options=-c ...`, PGTZ, application_name.

Each case records the value SHOW returns through the target (each SHOW its own
transaction, so in transaction mode it may run on any server connection) or the
error that refused the connection. application_name is also read from
pg_stat_activity over a separate direct connection, for the backend that runs
the client's transaction. Then many clients with different settings run at the
same time, each checking that it always sees its own.
"""
import os
import threading

import psycopg2

from common import config, emit, libpq_kwargs, message, step

cfg = config()
target = cfg['target']
suffix = cfg['suffix']


def connect(**extra):
    conn = psycopg2.connect(**libpq_kwargs(target, **extra))
    conn.autocommit = True
    return conn


def norm(value):
    # `-c search_path=foo,public` shows as given, `SET search_path = foo, public` with a space.
    return value.replace(' ', '') if isinstance(value, str) else value


def show(conn, name):
    with conn.cursor() as cur:
        cur.execute('SHOW ' + name)
        return norm(cur.fetchone()[0])


def case(names, expected, extra, env=None):
    """Connects with `extra`, SHOWs each of `names` 3 times; or records the refusal."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        conn = connect(**extra)
    except psycopg2.Error as error:
        return {'refused': message(error), 'expected': expected, 'names': names}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        seen = {n: sorted({show(conn, n) for _ in range(3)}) for n in expected}
        return {'seen': seen, 'expected': expected, 'names': names}
    finally:
        conn.close()


results = {}
results['options'] = case(['options', 'statement_timeout', 'search_path'],
                          {'statement_timeout': '1234ms', 'search_path': 'foo,public'},
                          {'options': '-c statement_timeout=1234 -c search_path=foo,public'})
results['PGTZ'] = case(['timezone', 'TimeZone'], {'TimeZone': 'Asia/Tokyo'}, {}, env={'PGTZ': 'Asia/Tokyo'})

app_name = 'drv-' + suffix
application = case(['application_name'], {'application_name': app_name}, {'application_name': app_name})
if 'refused' not in application:
    conn = connect(application_name=app_name)
    direct = psycopg2.connect(**libpq_kwargs(cfg['direct']))
    direct.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute('BEGIN')
            cur.execute('SELECT pg_backend_pid()')
            pid = cur.fetchone()[0]
            with direct.cursor() as dcur:
                dcur.execute('SELECT application_name FROM pg_stat_activity WHERE pid = %s', (pid,))
                row = dcur.fetchone()
            cur.execute('COMMIT')
        application['pgStatActivity'] = row[0] if row else None
    finally:
        conn.close()
        direct.close()
results['application_name'] = application
# No application_name sent: SHOW gives the server's default (empty), not the pooler's own name.
results['noApplicationName'] = case(['application_name'], {'application_name': ''}, {})


def leak(variant, count, rounds):
    """`count` clients with different settings at once; counts any SHOW that is not the client's own."""
    outcome = {'clients': count, 'checks': 0, 'mismatches': 0, 'refused': None, 'samples': []}
    lock = threading.Lock()

    def client(i):
        name = 'leak%d-%s' % (i, suffix)
        extra = {'application_name': name}
        expected = {'application_name': name}
        if variant == 'options':
            extra['options'] = '-c statement_timeout=%d -c search_path=s%d' % (2001 + i, i)
            expected.update({'statement_timeout': '%dms' % (2001 + i), 'search_path': 's%d' % i})
        try:
            conn = connect(**extra)
        except psycopg2.Error as error:
            with lock:
                outcome['refused'] = message(error)
            return
        try:
            for _ in range(rounds):
                with conn.cursor() as cur:
                    cur.execute('SELECT ' + ', '.join("current_setting('%s')" % n for n in expected))
                    row = cur.fetchone()
                wrong = ['%s: %s, want %s' % (n, got, want) for (n, want), got in zip(expected.items(), row) if norm(got) != want]
                with lock:
                    outcome['checks'] += 1
                    if wrong:
                        outcome['mismatches'] += 1
                        if len(outcome['samples']) < 3:
                            outcome['samples'].append('; '.join(wrong))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome


# libpq 18 asks for protocol 3.2 with max_protocol_version; older libpq has no such option.
libpq = psycopg2.extensions.libpq_version()
if libpq >= 180000:
    def protocol_32():
        conn = connect(max_protocol_version='3.2')
        try:
            return show(conn, 'server_version')
        finally:
            conn.close()
    results['protocol32'] = dict(step(protocol_32), libpq=libpq)
else:
    results['protocol32'] = {'skipped': True, 'libpq': libpq}

results['leakApplicationName'] = leak('application_name', cfg.get('leakClients', 12), 20)
results['leakOptions'] = leak('options', cfg.get('leakClients', 12), 20)
emit(results)
