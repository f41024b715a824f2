"""asyncpg: a transaction commits through the sidecar, then (once the file
config['release'] exists) the connection goes back to its pool, which resets it
(`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`) and
raises out of the release if that fails. Run by
test/integration/driver-faults.test.ts as `/usr/bin/python3 <script> '<json config>'`;
prints {"committed": true} after the COMMIT, then one JSON result line."""
import asyncio
import os

import asyncpg

from common import config, emit, message, sqlstate


async def main():
    cfg = config()
    login = cfg['target']
    pool = await asyncpg.create_pool(min_size=1, max_size=1, host=login['host'], port=login['port'],
                                     user=login['user'], password=login['password'], database=login['dbname'],
                                     timeout=10, command_timeout=10)
    conn = await pool.acquire()
    async with conn.transaction():
        await conn.fetchval('SELECT 1')
    emit({'committed': True})
    while not os.path.exists(cfg['release']):
        await asyncio.sleep(0.005)
    try:
        await pool.release(conn)
        result = {'released': True}
    except Exception as error:  # noqa: BLE001 - the failure is the result
        result = {'released': False, 'error': '%s %s' % (sqlstate(error), message(error))}
    pool.terminate()
    emit(result)


asyncio.run(main())
