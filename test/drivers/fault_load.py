"""Shared part of the fault-load programs (drv_fault_psycopg2.py, drv_fault_asyncpg.py),
run by test/integration/driver-faults.test.ts as `/usr/bin/python3 <script> '<json config>'`.

N workers loop short transactions (a read, then a write, then COMMIT) through
the driver's own pool until told to stop. stdin drives the timeline: a line
"fault" (answered {"fault": true}) marks the moment the test starts a fault (credential rotation, drain,
a PostgreSQL restart), a line "stop" (or EOF) ends the run. The program prints
{"ready": true} once transactions commit, then one JSON result line: the
committed count and every error by when it came, its SQLSTATE and message.

An error's `stage`: "new" (acquiring a connection or the transaction's first
statement: no transaction was running yet), "inflight" (after the read was
answered: a transaction that had started failed), "commit" (the COMMIT) and
"release" (giving the connection back to the pool, after the COMMIT): whether it
committed is unknown.
The transactions whose read had been answered when "fault" came (they run on a
server connection when the fault begins) are counted in `atFault`; those of
them that then failed are in `atFaultFailed`.
"""
import json
import sys
import threading
import time

from common import config, message, sqlstate

READ = 'SELECT count(*) FROM drv_fault WHERE run = {p} AND worker = {p2}'
# The write takes 20 ms: most of the time, a worker's transaction runs on a server connection.
WRITE = 'INSERT INTO drv_fault (run, worker, seq) SELECT {p}, {p2}, {p3} FROM pg_sleep(0.02)'


def setup(placeholders):
    """The program's config: the target's login, the worker count, the run id, its Stats,
    and the read and the write in the driver's placeholders (three of them)."""
    cfg = config()
    p, p2, p3 = placeholders
    return (cfg['target'], cfg.get('workers', 4), cfg['run'], Stats(cfg),
            READ.format(p=p, p2=p2), WRITE.format(p=p, p2=p2, p3=p3))


class Stats:
    """Counts shared by the workers (one lock: a few hundred updates a second)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.lock = threading.Lock()
        self.committed = 0
        self.commit_unknown = 0
        self.errors = {}
        self.fault = False
        self.fault_at = None
        self.stopping = False
        self.ready = False
        self.at_fault = 0
        self.at_fault_failed = []
        # worker -> [its transaction's read was answered, that transaction ran when the fault came]
        self.running = {}

    def begin(self, worker):
        with self.lock:
            self.running[worker] = [False, False]

    def read_answered(self, worker):
        with self.lock:
            self.running[worker][0] = True

    def mark_fault(self):
        """The fault begins: the transactions past their read run on a server connection now."""
        with self.lock:
            self.fault = True
            self.fault_at = time.monotonic()
            for state in self.running.values():
                state[1] = state[0]
        print(json.dumps({'fault': True}), flush=True)

    def end(self, worker, error=None, stage=None):
        """A transaction ended (error: it failed, in `stage`); True if it ran when the fault came."""
        with self.lock:
            state = self.running.pop(worker, [False, False])
            if state[1]:
                self.at_fault += 1
                if error is not None:
                    where = '%s: ' % stage if stage else ''
                    self.at_fault_failed.append('%s%s %s' % (where, sqlstate(error), message(error)[:200]))
            return state[1]

    def commit(self):
        with self.lock:
            self.committed += 1
            if not self.ready:
                self.ready = True
                print(json.dumps({'ready': True}), flush=True)

    def error(self, stage, error):
        state = sqlstate(error)
        text = message(error)[:200]
        key = json.dumps([('after' if self.fault else 'before'), stage, state, text])
        with self.lock:
            self.errors[key] = self.errors.get(key, 0) + 1
            if stage in ('commit', 'release'):
                self.commit_unknown += 1

    def result(self, **extra):
        errors = [dict(zip(('when', 'stage', 'sqlstate', 'message'), json.loads(k)), count=n)
                  for k, n in sorted(self.errors.items(), key=lambda kv: -kv[1])]
        return dict(committed=self.committed, commitUnknown=self.commit_unknown, errors=errors,
                    atFault=self.at_fault, atFaultFailed=self.at_fault_failed[:20], **extra)


def read_commands(stats, on_stop=None):
    """Reads "fault" and "stop" lines from stdin (a thread): EOF stops too."""
    def loop():
        for line in sys.stdin:
            if line.strip() == 'fault':
                stats.mark_fault()
            elif line.strip() == 'stop':
                break
        stats.stopping = True
        if on_stop:
            on_stop()
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def pause_after_error():
    # As an app's retry loop: not a busy loop against a refusing server.
    time.sleep(0.05)


__all__ = ['READ', 'WRITE', 'Stats', 'read_commands', 'pause_after_error', 'config']
