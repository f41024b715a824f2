"""psycopg2 under faults (see fault_load.py): SQLAlchemy's QueuePool with
pool_pre_ping when SQLAlchemy is installed, else psycopg2's ThreadedConnectionPool
(a connection that failed is discarded, as SQLAlchemy does with a disconnect)."""
import threading

import psycopg2
import psycopg2.pool

from fault_load import pause_after_error, read_commands, setup

login, workers, run, stats, read_sql, write_sql = setup(('%s', '%s', '%s'))
dsn = dict(host=login['host'], port=login['port'], user=login['user'], password=login['password'],
           dbname=login['dbname'], connect_timeout=10, application_name='fault-psycopg2')

try:
    import sqlalchemy
    from sqlalchemy import text
    pool_name = 'SQLAlchemy %s QueuePool, pool_pre_ping' % sqlalchemy.__version__
except ImportError:
    sqlalchemy = None
    pool_name = 'psycopg2.pool.ThreadedConnectionPool'


def transaction_sqlalchemy(engine, worker, seq):
    stage = 'new'
    stats.begin(worker)
    try:
        with engine.connect() as conn:
            trans = conn.begin()
            conn.execute(text(read_sql.replace('%s', ':r', 1).replace('%s', ':w', 1)), dict(r=run, w=worker)).scalar()
            stage = 'inflight'
            stats.read_answered(worker)
            conn.execute(text(write_sql.replace('%s', ':r', 1).replace('%s', ':w', 1).replace('%s', ':s', 1)), dict(r=run, w=worker, s=seq))
            stage = 'commit'
            trans.commit()
        stats.end(worker)
        stats.commit()
    except Exception as error:  # noqa: BLE001 - every failure is a result
        error = getattr(error, 'orig', None) or error
        stats.end(worker, error)
        stats.error(stage, error)
        pause_after_error()


def transaction_pool(pool, worker, seq):
    stage = 'new'
    conn = None
    broken = False
    stats.begin(worker)
    try:
        conn = pool.getconn()
        with conn.cursor() as cur:
            cur.execute(read_sql, (run, worker))
            cur.fetchone()
            stage = 'inflight'
            stats.read_answered(worker)
            cur.execute(write_sql, (run, worker, seq))
        stage = 'commit'
        conn.commit()
        stats.end(worker)
        stats.commit()
    except Exception as error:  # noqa: BLE001
        stats.end(worker, error)
        stats.error(stage, error)
        broken = True
        pause_after_error()
    finally:
        if conn is not None:
            if broken:
                try:
                    conn.rollback()
                except Exception:  # noqa: BLE001
                    pass
            pool.putconn(conn, close=broken)


def main():
    if sqlalchemy is not None:
        engine = sqlalchemy.create_engine('postgresql+psycopg2://', connect_args=dsn, pool_size=workers,
                                          max_overflow=0, pool_pre_ping=True, pool_timeout=30)
        one = lambda worker, seq: transaction_sqlalchemy(engine, worker, seq)  # noqa: E731
    else:
        pool = psycopg2.pool.ThreadedConnectionPool(0, workers, **dsn)
        one = lambda worker, seq: transaction_pool(pool, worker, seq)  # noqa: E731
    read_commands(stats)

    def work(worker):
        seq = 0
        while not stats.stopping:
            seq += 1
            one(worker, seq)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if sqlalchemy is not None:
        engine.dispose()
    print(__import__('json').dumps(stats.result(driver='psycopg2', version=psycopg2.__version__.split()[0], pool=pool_name)), flush=True)


main()
