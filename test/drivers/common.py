"""Shared helpers of the Python driver scenarios.

Each scenario is run as `/usr/bin/python3 <script> '<json config>'` by
test/integration/drivers.test.ts and prints one JSON object on its last line.
The config names the target ({host, port, user, password, dbname}), a direct
superuser login for looking at pg_stat_activity, and how many server
connections the target's pool holds (to move a client off its backend).
"""
import json
import sys
import threading
import time


def config():
    return json.loads(sys.argv[1])


def emit(result):
    print(json.dumps(result, default=str), flush=True)


def libpq_kwargs(login, **extra):
    kw = dict(host=login['host'], port=login['port'], user=login['user'],
              password=login['password'], dbname=login['dbname'], connect_timeout=10)
    kw.update(extra)
    return kw


def sqlstate(error):
    """SQLSTATE of a psycopg2/psycopg/asyncpg error, or its class name."""
    for attr in ('pgcode', 'sqlstate'):
        code = getattr(error, attr, None)
        if isinstance(code, str) and code:
            return code
    diag = getattr(error, 'diag', None)
    if diag is not None and getattr(diag, 'sqlstate', None):
        return diag.sqlstate
    return type(error).__name__


def message(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def step(fn):
    """Runs one step and records its value or its SQLSTATE, as the comparison with direct needs."""
    try:
        return {'ok': True, 'value': fn()}
    except Exception as error:  # noqa: BLE001 - every failure is a result here
        return {'ok': False, 'sqlstate': sqlstate(error), 'message': message(error)}


def displace(open_holder, backend_pid, max_holders, wait=2.0):
    """Holds pool connections in open transactions until one of them is on `backend_pid`.

    In transaction mode this makes the client's next statement run on another server
    connection, deterministically: what it set up on its previous backend is visible
    only if the pooler carries it over. A pooler that pins the client to its backend
    leaves no holder a way there: a holder that waits longer than `wait` seconds for a
    server connection ends the search. Returns a release function for the holder left
    on `backend_pid`, if any.
    open_holder() returns (pid, release) for a new client connection in a transaction.
    """
    held = []
    found = None
    for _ in range(max_holders):
        box = {}
        thread = threading.Thread(target=lambda b=box: b.update(holder=open_holder()))
        thread.start()
        thread.join(wait)
        if thread.is_alive():
            # Every free server connection is held and `backend_pid` is not among them: the
            # client is pinned there. Let all go (the waiting one gets a connection then).
            for release in held:
                release()
            held = []
            thread.join()
            box['holder'][1]()
            break
        pid, release = box['holder']
        if pid == backend_pid:
            found = release
            break
        held.append(release)
    for release in held:
        release()
    return found or (lambda: None)


def deadline(seconds):
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end
