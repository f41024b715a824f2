"""Cancel routing with libpq's PQcancel (psycopg2 conn.cancel()).

Canceller connections loop `SELECT pg_sleep(0.01)`, each with a thread that
cancels it at random intervals (a few pairs, because a cancel costs a new
connection and one pair alone sends too few in a few seconds); bystander
connections loop the same query. A cancel must only ever
cancel the canceller's own statement: bystander cancellations must be 0.
Then a deterministic check: a cancel sent while the connection is idle must not
cancel the statement that follows it (libpq returns from PQcancel once the
server has taken the cancel, so the next statement is never its target).
"""
import random
import threading
import time

import psycopg2

from common import config, deadline, emit, libpq_kwargs, message, sqlstate

cfg = config()
kw = libpq_kwargs(cfg['target'])
seconds = cfg.get('seconds', 4.0)
min_cancels = cfg.get('minCancels', 300)
bystander_count = cfg.get('bystanders', 8)
stop = threading.Event()
errors = []


def new_stats():
    return {'statements': 0, 'cancelled': 0, 'other': 0}


def loop(conn, stats):
    cur = conn.cursor()
    while not stop.is_set():
        try:
            cur.execute('SELECT pg_sleep(0.01)')
            stats['statements'] += 1
        except psycopg2.Error as error:
            if sqlstate(error) == '57014':
                stats['cancelled'] += 1
            else:
                stats['other'] += 1
                errors.append(message(error))
                if conn.closed:
                    return


def connect():
    conn = psycopg2.connect(**kw)
    conn.autocommit = True
    return conn


bystanders = [(connect(), new_stats()) for _ in range(bystander_count)]
cancellers = [(connect(), new_stats()) for _ in range(cfg.get('cancellers', 3))]
sent = [0]
hard_stop = deadline(cfg.get("maxSeconds", seconds * 5))
soft_stop = deadline(seconds)


def cancel_loop(conn, seed):
    rng = random.Random(seed)
    while not stop.is_set():
        if hard_stop() or (soft_stop() and sent[0] >= min_cancels):
            stop.set()
            return
        time.sleep(rng.uniform(0, 0.006))
        try:
            conn.cancel()
            sent[0] += 1
        except psycopg2.Error as error:
            errors.append('cancel: ' + message(error))


threads = [threading.Thread(target=loop, args=b) for b in bystanders + cancellers]
threads += [threading.Thread(target=cancel_loop, args=(conn, k)) for k, (conn, _) in enumerate(cancellers)]
started = time.monotonic()
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.monotonic() - started

# A late cancel: sent while idle, it must not hit the next statement.
idle_rounds = cfg.get('idleRounds', 20)
idle_hits = 0
canceller_conn = cancellers[0][0]
cur = canceller_conn.cursor()
for _ in range(idle_rounds):
    canceller_conn.cancel()
    try:
        cur.execute('SELECT pg_sleep(0.05)')
    except psycopg2.Error as error:
        if sqlstate(error) == '57014':
            idle_hits += 1
        else:
            errors.append('idle: ' + message(error))

for conn, _ in bystanders + cancellers:
    conn.close()
emit({
    'seconds': round(elapsed, 2),
    'cancelsSent': sent[0],
    'canceller': {k: sum(s[k] for _, s in cancellers) for k in ('statements', 'cancelled', 'other')},
    'bystanders': {
        'statements': sum(s['statements'] for _, s in bystanders),
        'cancelled': sum(s['cancelled'] for _, s in bystanders),
        'other': sum(s['other'] for _, s in bystanders),
    },
    'idleCancel': {'rounds': idle_rounds, 'nextStatementCancelled': idle_hits},
    'errors': errors[:5],
})
