"""asyncpg: named prepared statements from a pool, server_settings, and a
statement timeout (asyncpg sends a cancel request when `timeout=` expires).
"""
import asyncio
import time

import asyncpg

from common import config, emit, message, sqlstate

cfg = config()
target = cfg['target']
suffix = cfg['suffix']


def login(login):
    return dict(host=login['host'], port=login['port'], user=login['user'],
                password=login['password'], database=login['dbname'], timeout=10)


async def pool_prepared():
    outcome = {'queries': 0, 'failed': 0, 'errors': {}}
    try:
        pool = await asyncpg.create_pool(min_size=cfg.get('asyncpgPool', 10), max_size=cfg.get('asyncpgPool', 10), **login(target))
    except Exception as error:  # noqa: BLE001
        return {'refused': message(error)}

    async def one(i):
        try:
            async with pool.acquire() as conn:
                assert await conn.fetchval('SELECT $1::int + 1', i) == i + 1
                stmt = await conn.prepare('SELECT $1::text || $2::text')
                assert await stmt.fetchval('a', str(i)) == 'a' + str(i)
                async with conn.transaction():
                    assert await conn.fetchval('SELECT $1::int * 2', i) == i * 2
            ok = None
        except Exception as error:  # noqa: BLE001
            ok = '%s %s' % (sqlstate(error), message(error))
        outcome['queries'] += 1
        if ok:
            outcome['failed'] += 1
            outcome['errors'][ok] = outcome['errors'].get(ok, 0) + 1

    await asyncio.gather(*(one(i) for i in range(cfg.get('tasks', 300))))
    await pool.close()
    outcome['errors'] = dict(sorted(outcome['errors'].items(), key=lambda kv: -kv[1])[:3])
    return outcome


async def server_settings():
    settings = {'statement_timeout': '4321', 'search_path': 'bar,public', 'application_name': 'apg-' + suffix}
    expected = {'statement_timeout': '4321ms', 'search_path': 'bar,public', 'application_name': 'apg-' + suffix}
    try:
        conn = await asyncpg.connect(server_settings=settings, **login(target))
    except Exception as error:  # noqa: BLE001
        return {'refused': message(error), 'names': list(settings)}
    try:
        seen = {}
        for name in expected:
            values = set()
            for _ in range(3):
                values.add((await conn.fetchval('SHOW ' + name)).replace(' ', ''))
            seen[name] = sorted(values)
        return {'seen': seen, 'expected': expected, 'names': list(settings)}
    finally:
        await conn.close()


async def cancel_by_timeout():
    tag = 'drv_timeout_' + suffix
    conn = await asyncpg.connect(**login(target))
    direct = await asyncpg.connect(**login(cfg['direct']))
    try:
        started = time.monotonic()
        try:
            await conn.fetchval('SELECT pg_sleep(5) /* %s */' % tag, timeout=0.3)
            outcome = {'raised': None}
        except asyncio.TimeoutError:
            outcome = {'raised': 'TimeoutError'}
        except Exception as error:  # noqa: BLE001
            outcome = {'raised': '%s %s' % (sqlstate(error), message(error))}
        outcome['secondsToError'] = round(time.monotonic() - started, 2)
        # asyncpg sends the cancel in the background: looked for until it took effect, or 3 s (the
        # statement would end by itself at 5 s). On a loaded machine PostgreSQL itself has taken
        # over a second to act on a CancelRequest.
        cancelled = time.monotonic()
        while True:
            outcome['stillRunningOnServer'] = await direct.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1", '%' + tag + '%')
            if outcome['stillRunningOnServer'] == 0 or time.monotonic() - cancelled > 3:
                break
            await asyncio.sleep(0.05)
        outcome['secondsUntilGone'] = round(time.monotonic() - cancelled, 2)
        started = time.monotonic()
        try:
            outcome['nextQuery'] = await conn.fetchval('SELECT 41 + 1', timeout=10)
        except Exception as error:  # noqa: BLE001
            outcome['nextQuery'] = '%s %s' % (sqlstate(error), message(error))
        outcome['secondsForNextQuery'] = round(time.monotonic() - started, 2)
        return outcome
    finally:
        await conn.close()
        await direct.close()


async def main():
    emit({
        'poolPrepared': await pool_prepared(),
        'serverSettings': await server_settings(),
        'cancelByTimeout': await cancel_by_timeout(),
    })

asyncio.run(main())
