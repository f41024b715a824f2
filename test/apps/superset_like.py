#!/usr/bin/python3
"""A stand-in for Apache Superset's processes, configured as docs/guides/superset.md says.

  superset_like.py web --config superset_config.py      gunicorn gthread, GUNICORN_WORKERS x
      GUNICORN_THREADS: the master builds the app (and its engine) before forking (--preload)
  superset_like.py worker --config superset_config.py   Celery prefork: the main process imports
      the app, then forks CELERY_CONCURRENCY children, each running one task at a time
  superset_like.py beat --config superset_config.py     Celery beat: one process, a small task
      now and then

The metadata engine comes from superset_config.py as Superset builds it (DATABASE_URL has no
password: the sidecar holds it); analytics queries use NullPool, Superset's default. Each
process reports on stdout, one line per write so lines from several processes never mix:
  "ok <role> <n>"          n requests or tasks done since the last report (every second and at exit)
  "error <role> <message>" a request or task that failed
  "stopped <role> <s>"     a process's threads finished, s seconds after its SIGTERM
It runs until SIGTERM, then lets every request in flight finish.
"""
import argparse
import os
import signal
import sys
import threading
import time

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

running = True
stopped_at = None


def report(line):
    os.write(1, (line.replace("\n", " ") + "\n").encode())


def on_term(_signum, _frame):
    global running, stopped_at
    running = False
    stopped_at = time.monotonic()


def metadata_engine(config_path):
    """The metadata database engine as Superset builds it from superset_config.py
    (SQLALCHEMY_DATABASE_URI and SQLALCHEMY_ENGINE_OPTIONS)."""
    config = {}
    with open(config_path) as source:
        exec(compile(source.read(), config_path, "exec"), config)  # noqa: S102 - the deployment's own config file
    return create_engine(config["SQLALCHEMY_DATABASE_URI"], **config.get("SQLALCHEMY_ENGINE_OPTIONS", {}))


def analytics_engine():
    """An analytics database as Superset opens it by default: NullPool, a connection per query."""
    return create_engine(os.environ["DATABASE_URL"], poolclass=NullPool)


class Counter:
    def __init__(self, role):
        self.role = role
        self.lock = threading.Lock()
        self.n = 0

    def add(self):
        with self.lock:
            self.n += 1

    def flush(self):
        with self.lock:
            n, self.n = self.n, 0
        if n:
            report(f"ok {self.role} {n}")


def serve(role, counter, work, threads, pause=0.2):
    """Runs `work` in `threads` threads until SIGTERM, `pause` seconds apart, reporting every second."""
    def loop():
        while running:
            try:
                work()
                counter.add()
                time.sleep(pause)
            except Exception as error:  # noqa: BLE001 - every failure is reported, none hidden
                report(f"error {role} {type(error).__name__}: {error}")
                time.sleep(0.2)
    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for t in pool:
        t.start()
    last = time.monotonic()
    while any(t.is_alive() for t in pool):
        time.sleep(0.05)
        if time.monotonic() - last >= 1 or not running:
            counter.flush()
            last = time.monotonic()
        if not running:
            for t in pool:
                t.join()
    counter.flush()
    if stopped_at is not None:
        report(f"stopped {role} {time.monotonic() - stopped_at:.2f}")


def fork_children(count, child):
    """Forks `count` children running `child()`; forwards SIGTERM to them and waits."""
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, on_term)
            try:
                child()
            finally:
                os._exit(0)
        pids.append(pid)
    while running:
        time.sleep(0.1)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    for pid in pids:
        os.waitpid(pid, 0)


def web(args):
    engine = metadata_engine(args.config)
    # Superset's create_app() touches the metadata database before gunicorn forks (--preload).
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))

    def worker():
        # After fork, as SQLAlchemy advises: forget the parent's pooled connections without
        # closing them (closing would end the parent's sessions on the shared sockets).
        engine.dispose(close=False)
        analytics = analytics_engine()

        def request():
            with engine.begin() as connection:   # a dashboard request: a short transaction
                connection.execute(text("SELECT pg_sleep(0.005)"))
                connection.execute(text("SELECT count(*) FROM pg_class"))
            with analytics.connect() as connection:   # a chart query on an analytics database
                connection.execute(text("SELECT 1"))
        serve("web", Counter("web"), request, threads)
    threads = int(os.environ.get("GUNICORN_THREADS", "1"))
    fork_children(int(os.environ.get("GUNICORN_WORKERS", "1")), worker)


def celery_worker(args):
    engine = metadata_engine(args.config)
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))

    def child():
        # Superset does this on Celery's worker_process_init signal.
        engine.dispose(close=False)
        analytics = analytics_engine()

        def task():   # an async query or a report: the metadata database and an analytics one
            with engine.begin() as connection:
                connection.execute(text("SELECT pg_sleep(0.02)"))
            with analytics.connect() as connection:
                connection.execute(text("SELECT pg_sleep(0.01)"))
        serve("worker", Counter("worker"), task, 1)
    fork_children(int(os.environ.get("CELERY_CONCURRENCY", "1")), child)


def beat(_args):
    engine = create_engine(os.environ["DATABASE_URL"], poolclass=NullPool)

    def tick():
        with engine.begin() as connection:
            connection.execute(text("SELECT now()"))
    serve("beat", Counter("beat"), tick, 1, pause=0.2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["web", "worker", "beat"])
    parser.add_argument("--config", required=True, help="superset_config.py")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, on_term)
    {"web": web, "worker": celery_worker, "beat": beat}[args.role](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
