#!/usr/bin/env python3
"""pgtether interop: asyncpg with its default statement cache (named prepared statements).

Usage: asyncpg_test.py PORT   (user app, password app, database app, host 127.0.0.1)

Phase 1: 50 concurrent clients, 20 transactions each, every parameterized query a cached
named prepared statement reused over and over, each client with its own SET values
(application_name, search_path, myapp.client, later statement_timeout then RESET) that it must
keep seeing, never another client's.
Phase 2, with a few background clients churning the pool: LISTEN/NOTIFY, a temp table, a
session advisory lock, a WITH HOLD cursor and an SQL-level PREPARE, each used across
transactions by the client that made it.

Exits 0 when everything held, 1 with one line per problem otherwise (3 on a watchdog timeout).
"""

import asyncio
import os
import sys
import time

try:
    import asyncpg
except ImportError as e:  # pragma: no cover - reported to the Rust test
    sys.exit(f"asyncpg is not importable ({e}): pip install asyncpg")

DRIVER = "asyncpg"
TABLE = "interop_asyncpg"
CHANNEL = "interop_asyncpg_chan"
LOCK_KEY = 7102
CLIENTS = 50
TXNS = 20
WATCHDOG_SECONDS = 100

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else sys.exit("usage: asyncpg_test.py PORT")

failures = []


def fail(msg):
    failures.append(msg)


class Mismatch(Exception):
    pass


def describe(e):
    """Exception class and the first line of its message (hints and details left out)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def expect(cond, msg):
    if not cond:
        raise Mismatch(msg)


async def connect(statement_cache=True):
    # Default statement_cache_size (100): fetch/fetchval/execute-with-arguments go through
    # named prepared statements (__asyncpg_stmt_N__) that are reused for the same query text.
    # Without the cache (only for the row count check), statements are unnamed.
    extra = {} if statement_cache else {"statement_cache_size": 0}
    return await asyncpg.connect(
        **extra,
        host="127.0.0.1",
        port=PORT,
        user="app",
        password="app",
        database="app",
        timeout=10,
        command_timeout=30,
    )


async def backend_pid(conn):
    return await conn.fetchval("SELECT pg_backend_pid()")


STATE_SQL = (
    "SELECT current_setting('myapp.client'), current_setting('application_name'), "
    "current_setting('search_path'), current_setting('statement_timeout')"
)


async def check_state(conn, i, timeout):
    got = tuple(await conn.fetchrow(STATE_SQL))
    want = (str(i), f"c{i}", f"sp_c{i}, public", timeout)
    expect(
        got == want,
        f"session state (myapp.client, application_name, search_path, statement_timeout) "
        f"is {got}, expected {want} (a SET leaked between clients or was lost)",
    )
    show = await conn.fetchval("SHOW application_name")
    expect(show == f"c{i}", f"SHOW application_name is {show!r}, expected 'c{i}'")


async def client(i):
    where = "session setup"
    conn = None
    try:
        conn = await connect()
        default_timeout = await conn.fetchval("SHOW statement_timeout")
        await conn.execute(f"SET application_name = 'c{i}'")
        await conn.execute(f"SET search_path = sp_c{i}, public")
        await conn.execute(f"SET myapp.client = '{i}'")
        own_timeout = f"{100001 + i}ms"
        for k in range(TXNS):
            where = f"transaction {k}"
            timeout = own_timeout if 10 <= k < 15 else default_timeout
            async with conn.transaction():
                got = await conn.fetchval("SELECT $1::int + $2::int", i, k)
                expect(got == i + k, f"{i} + {k} gave {got}")
                await check_state(conn, i, timeout)
                await conn.execute(f"INSERT INTO {TABLE} (client, seq) VALUES ($1, $2)", i, k)
                n = await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE client = $1", i)
                expect(n == k + 1, f"own row count is {n}, expected {k + 1}")
                s = await conn.fetchval("SELECT $1::text || ':' || $2::int", f"c{i}", k)
                expect(s == f"c{i}:{k}", f"concatenation gave {s!r}")
            if k == 5:
                where = "SET LOCAL transaction"
                async with conn.transaction():
                    await conn.execute("SET LOCAL myapp.client = 'local'")
                    v = await conn.fetchval("SELECT current_setting('myapp.client')")
                    expect(v == "local", f"SET LOCAL not seen inside its transaction: {v!r}")
                v = await conn.fetchval("SELECT current_setting('myapp.client')")
                expect(v == str(i), f"SET LOCAL outlived its transaction: {v!r}")
            elif k == 8:
                where = "rolled-back transaction"
                try:
                    async with conn.transaction():
                        await conn.execute("SET myapp.client = 'rolledback'")
                        await conn.fetchval("SELECT 1 / $1::int", 0)
                    raise Mismatch("1 / 0 did not fail")
                except asyncpg.exceptions.DivisionByZeroError:
                    pass
                v = await conn.fetchval("SELECT current_setting('myapp.client')")
                expect(v == str(i), f"SET in a rolled-back transaction stuck: {v!r}")
            elif k == 9:
                await conn.execute(f"SET statement_timeout = '{own_timeout}'")
            elif k == 14:
                await conn.execute("RESET statement_timeout")
    except Exception as e:  # noqa: BLE001 - every error is a finding
        fail(f"client {i} ({where}): {describe(e)}")
    finally:
        if conn is not None:
            await conn.close(timeout=10)


async def churn(n, stop):
    """Background traffic so that an unpinned client would land on other server connections."""
    conn = None
    try:
        conn = await connect()
        await conn.execute(f"SET myapp.client = 'churn{n}'")
        x = 0
        while not stop.is_set():
            x += 1
            async with conn.transaction():
                got = await conn.fetchval("SELECT $1::int * 2", x)
                expect(got == 2 * x, f"{x} * 2 gave {got}")
                v = await conn.fetchval("SELECT current_setting('myapp.client')")
                expect(v == f"churn{n}", f"churn client {n} sees myapp.client = {v!r}")
            await asyncio.sleep(0.005)
    except Exception as e:  # noqa: BLE001
        fail(f"churn client {n}: {describe(e)}")
    finally:
        if conn is not None:
            await conn.close(timeout=10)


async def scenario_listen():
    lis = await connect()
    ntf = await connect()
    try:
        queue = asyncio.Queue()
        await lis.add_listener(CHANNEL, lambda _c, _pid, ch, payload: queue.put_nowait((ch, payload)))
        pid = await backend_pid(lis)
        for r in range(3):
            payload = f"m{r}"
            await ntf.fetchval("SELECT pg_notify($1, $2)", CHANNEL, payload)
            try:
                got = await asyncio.wait_for(queue.get(), 10)
            except asyncio.TimeoutError:
                raise Mismatch(f"notification {payload!r} not delivered to the listener within 10 s")
            expect(got == (CHANNEL, payload), f"listener got {got}, expected {payload!r}")
            expect(await backend_pid(lis) == pid, "listener moved to another server connection")
        await lis.execute(f"UNLISTEN {CHANNEL}")
    finally:
        await lis.close(timeout=10)
        await ntf.close(timeout=10)


async def scenario_temp_table():
    c = await connect()
    try:
        await c.execute(f"CREATE TEMP TABLE {TABLE}_tmp (x int)")
        pid = await backend_pid(c)
        for r in range(1, 6):
            async with c.transaction():
                await c.execute(f"INSERT INTO {TABLE}_tmp VALUES ($1)", r)
                s = await c.fetchval(f"SELECT sum(x) FROM {TABLE}_tmp")
                expect(s == r * (r + 1) // 2, f"temp table sum is {s}, expected {r * (r + 1) // 2}")
                expect(await backend_pid(c) == pid, "temp table owner moved to another server connection")
            await asyncio.sleep(0.02)
        await c.execute(f"DROP TABLE {TABLE}_tmp")
    finally:
        await c.close(timeout=10)


LOCKS_SQL = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 "
    "AND objid::bigint = $1::bigint AND objsubid = 1 AND granted AND pid = pg_backend_pid()"
)


async def scenario_advisory_lock():
    a = await connect()
    b = await connect()
    try:
        took = await a.fetchval("SELECT pg_try_advisory_lock($1::bigint)", LOCK_KEY)
        expect(took is True, f"advisory lock {LOCK_KEY} is already held by another session")
        pid = await backend_pid(a)
        for r in range(5):
            async with a.transaction():
                n = await a.fetchval(LOCKS_SQL, LOCK_KEY)
                expect(n == 1, f"holder does not see its advisory lock in pg_locks (round {r})")
            async with b.transaction():
                got = await b.fetchval("SELECT pg_try_advisory_xact_lock($1::bigint)", LOCK_KEY)
                expect(got is False, f"another client took the held advisory lock (round {r})")
            expect(await backend_pid(a) == pid, "lock holder moved to another server connection")
            await asyncio.sleep(0.02)
        unlocked = await a.fetchval("SELECT pg_advisory_unlock($1::bigint)", LOCK_KEY)
        expect(unlocked is True, "pg_advisory_unlock by the holder returned false")
        async with b.transaction():
            got = await b.fetchval("SELECT pg_try_advisory_xact_lock($1::bigint)", LOCK_KEY)
            expect(got is True, "advisory lock still held after the holder released it")
    finally:
        await a.close(timeout=10)
        await b.close(timeout=10)


async def scenario_hold_cursor():
    c = await connect()
    try:
        await c.execute(
            f"DECLARE {TABLE}_cur CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 12) g"
        )
        pid = await backend_pid(c)
        for r in range(4):
            async with c.transaction():
                rows = [row[0] for row in await c.fetch(f"FETCH 3 FROM {TABLE}_cur")]
                want = [3 * r + 1, 3 * r + 2, 3 * r + 3]
                expect(rows == want, f"FETCH from the WITH HOLD cursor gave {rows}, expected {want}")
                expect(await backend_pid(c) == pid, "cursor owner moved to another server connection")
            await asyncio.sleep(0.02)
        await c.execute(f"CLOSE {TABLE}_cur")
    finally:
        await c.close(timeout=10)


async def scenario_sql_prepare():
    c = await connect()
    try:
        await c.execute(f"PREPARE {TABLE}_sqlp (int) AS SELECT $1 * 2")
        pid = await backend_pid(c)
        for r in range(1, 6):
            async with c.transaction():
                got = await c.fetchval(f"EXECUTE {TABLE}_sqlp({r})")
                expect(got == 2 * r, f"EXECUTE of an SQL-level prepared statement gave {got}")
                expect(await backend_pid(c) == pid, "PREPARE owner moved to another server connection")
            await asyncio.sleep(0.02)
        await c.execute(f"DEALLOCATE {TABLE}_sqlp")
    finally:
        await c.close(timeout=10)


def report_and_exit():
    if not failures:
        print(f"{DRIVER}: OK", flush=True)
        os._exit(0)
    prepared = [p for p in failures if "prepared statement" in p]
    print(f"{DRIVER}: FAILED: {len(failures)} problem(s), {len(prepared)} about prepared statements")
    # Scenario and check failures first: the 50 clients' ones are often all alike.
    ordered = sorted(failures, key=lambda p: p.startswith("client "))
    for p in ordered[:40]:
        print(f"  - {p}")
    if len(ordered) > 40:
        print(f"  ... and {len(ordered) - 40} more")
    sys.stdout.flush()
    os._exit(1)


async def check_rows():
    check = await connect(statement_cache=False)
    try:
        total, distinct = await check.fetchrow(
            f"SELECT count(*), count(DISTINCT client) FROM {TABLE}"
        )
        expect(
            (total, distinct) == (CLIENTS * TXNS, CLIENTS),
            f"table has {total} rows from {distinct} clients, expected "
            f"{CLIENTS * TXNS} from {CLIENTS}",
        )
    finally:
        await check.close(timeout=10)


async def run():
    started = time.monotonic()
    try:
        setup = await connect()
        try:
            print(f"{DRIVER}: connected, server {setup.get_server_version()}", flush=True)
            await setup.execute(f"DROP TABLE IF EXISTS {TABLE}")
            await setup.execute(f"CREATE TABLE {TABLE} (client int NOT NULL, seq int NOT NULL)")
        finally:
            await setup.close(timeout=10)
    except Exception as e:  # noqa: BLE001
        fail(f"setup: {describe(e)}")
        return

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    print(f"{DRIVER}: phase 1 ({CLIENTS} clients x {TXNS} transactions) done in "
          f"{time.monotonic() - started:.1f} s, {len(failures)} problem(s)", flush=True)

    stop = asyncio.Event()
    churners = [asyncio.create_task(churn(n, stop)) for n in range(3)]
    for name, step in [
        ("row count after phase 1", check_rows),
        ("LISTEN/NOTIFY", scenario_listen),
        ("temp table", scenario_temp_table),
        ("session advisory lock", scenario_advisory_lock),
        ("WITH HOLD cursor", scenario_hold_cursor),
        ("SQL-level PREPARE", scenario_sql_prepare),
    ]:
        try:
            await step()
            print(f"{DRIVER}: {name}: ok", flush=True)
        except Exception as e:  # noqa: BLE001
            fail(f"{name}: {describe(e)}")
            print(f"{DRIVER}: {name}: FAILED", flush=True)
    stop.set()
    await asyncio.gather(*churners)
    print(f"{DRIVER}: finished in {time.monotonic() - started:.1f} s", flush=True)


async def main():
    try:
        await asyncio.wait_for(run(), WATCHDOG_SECONDS)
    except asyncio.TimeoutError:
        fail(f"watchdog: the run did not finish within {WATCHDOG_SECONDS} s")
        print(f"{DRIVER}: TIMEOUT after {WATCHDOG_SECONDS} s", flush=True)
        for p in failures[:40]:
            print(f"  - {p}")
        sys.stdout.flush()
        os._exit(3)
    except Exception as e:  # noqa: BLE001
        fail(f"unexpected: {describe(e)}")
    report_and_exit()


if __name__ == "__main__":
    asyncio.run(main())
