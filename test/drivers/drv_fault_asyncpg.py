"""asyncpg under faults (see fault_load.py): asyncpg.create_pool, workers
acquiring a connection per transaction."""
import asyncio
import time
import json
import sys

import asyncpg

from fault_load import pause_after_error, setup

login, workers, run, stats, read_sql, write_sql = setup(('$1', '$2', '$3'))


async def commands():
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() == 'fault':
            stats.mark_fault()
        elif line == '' or line.strip() == 'stop':
            stats.stopping = True
            return


async def work(pool, worker):
    seq = 0
    while not stats.stopping:
        seq += 1
        stage = 'new'
        stats.begin(worker)
        try:
            async with pool.acquire(timeout=10) as conn:
                async with conn.transaction():
                    await conn.fetchval(read_sql, run, worker)
                    stage = 'inflight'
                    stats.read_answered(worker)
                    await conn.execute(write_sql, run, worker, seq)
                    stage = 'commit'
                # Given back to the pool at the end of the block (asyncpg resets it then).
                stage = 'release'
            stats.end(worker)
            stats.commit()
        except Exception as error:  # noqa: BLE001 - every failure is a result
            stats.end(worker, error, stage if stats.fault_at is None else '%s %.0f ms after the fault' % (stage, (time.monotonic() - stats.fault_at) * 1000))
            stats.error(stage, error)
            await asyncio.sleep(0.05)


async def main():
    pool = await asyncpg.create_pool(min_size=workers, max_size=workers, host=login['host'], port=login['port'],
                                     user=login['user'], password=login['password'], database=login['dbname'],
                                     timeout=10, command_timeout=10, server_settings={'application_name': 'fault-asyncpg'})
    reader = asyncio.create_task(commands())
    await asyncio.gather(*(work(pool, w) for w in range(workers)))
    await reader
    try:
        await asyncio.wait_for(pool.close(), 10)
    except Exception:  # noqa: BLE001 - closing a pool behind a stopped server
        pool.terminate()
    print(json.dumps(stats.result(driver='asyncpg', version=asyncpg.__version__, pool='asyncpg.create_pool')), flush=True)


asyncio.run(main())
