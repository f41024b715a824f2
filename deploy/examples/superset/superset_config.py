# superset_config.py for pods behind the poolkeeper sidecar (docs/guides/superset.md).
# The webhook sets DATABASE_URL (postgresql://<user>@127.0.0.1:<port>/<db>, no password),
# PGHOST/PGPORT/PGUSER/PGDATABASE and POOLKEEPER_POOL_SIZE (this process's share of the
# pod's budget when the pod was created).
import os

SQLALCHEMY_DATABASE_URI = os.environ["DATABASE_URL"]

# The sidecar's pool mode is transaction: an idle client connection to it holds no server
# connection, so the app's pool is sized for the process's own concurrency (gunicorn
# --threads; 1 for a Celery prefork child) and never overflows; the sidecar caps what
# reaches PostgreSQL at the pod's budget. In session mode use pool_size=POOL_SHARE instead.
POOL_SHARE = int(os.environ.get("POOLKEEPER_POOL_SIZE", "1"))
THREADS = int(os.environ.get("GUNICORN_THREADS", "1"))  # Celery children and beat: 1
SQLALCHEMY_ENGINE_OPTIONS = {
    "pool_size": max(THREADS, POOL_SHARE),
    "max_overflow": 0,      # SQLAlchemy's default 10 would allow 15 connections per process
    "pool_timeout": 30,
    "pool_pre_ping": True,  # a restarted sidecar leaves dead client connections in the pool
    "pool_recycle": -1,     # server connections are recycled by the sidecar (pool.poolRecycle)
}

# Celery: Superset disposes of the engine in each prefork child (worker_process_init), so a
# child never uses a connection inherited from the main process.
