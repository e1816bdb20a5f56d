#!/usr/bin/env python3
"""pgtether interop: psycopg 3 with every query server-prepared (prepare_threshold=0).

Usage: psycopg_test.py PORT   (user app, password app, database app, host 127.0.0.1)

Phase 1: 50 concurrent clients, 20 transactions each, named prepared statements reused over
and over, each client with its own SET values (application_name, search_path, myapp.client,
later statement_timeout then RESET) that it must keep seeing, never another client's.
Phase 2, with a few background clients churning the pool: LISTEN/NOTIFY, a temp table, a
session advisory lock, a WITH HOLD cursor and an SQL-level PREPARE, each used across
transactions by the client that made it.

Exits 0 when everything held, 1 with one line per problem otherwise (3 on a watchdog timeout).
"""

import os
import sys
import threading
import time

try:
    import psycopg
except ImportError as e:  # pragma: no cover - reported to the Rust test
    sys.exit(f"psycopg is not importable ({e}): pip install 'psycopg[binary]'")

DRIVER = "psycopg"
TABLE = "interop_psycopg"
CHANNEL = "interop_psycopg_chan"
LOCK_KEY = 7101
CLIENTS = 50
TXNS = 20
WATCHDOG_SECONDS = 100

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else sys.exit("usage: psycopg_test.py PORT")

failures = []
failures_lock = threading.Lock()


def fail(msg):
    with failures_lock:
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


def connect():
    return psycopg.connect(
        host="127.0.0.1",
        port=PORT,
        user="app",
        password="app",
        dbname="app",
        autocommit=True,
        prepare_threshold=0,
        connect_timeout=10,
    )


def one(conn, sql, params=None):
    row = conn.execute(sql, params).fetchone()
    if row is None:
        raise Mismatch(f"no row from {sql!r}")
    return row[0]


def backend_pid(conn):
    return one(conn, "SELECT pg_backend_pid()")


STATE_SQL = (
    "SELECT current_setting('myapp.client'), current_setting('application_name'), "
    "current_setting('search_path'), current_setting('statement_timeout')"
)


def check_state(conn, i, k, timeout):
    got = tuple(conn.execute(STATE_SQL).fetchone())
    want = (str(i), f"c{i}", f"sp_c{i}, public", timeout)
    expect(
        got == want,
        f"session state (myapp.client, application_name, search_path, statement_timeout) "
        f"is {got}, expected {want} (a SET leaked between clients or was lost)",
    )
    show = one(conn, "SHOW application_name")
    expect(show == f"c{i}", f"SHOW application_name is {show!r}, expected 'c{i}'")


def client(i):
    where = "session setup"
    try:
        with connect() as conn:
            default_timeout = one(conn, "SHOW statement_timeout")
            conn.execute(f"SET application_name = 'c{i}'")
            conn.execute(f"SET search_path = sp_c{i}, public")
            conn.execute(f"SET myapp.client = '{i}'")
            own_timeout = f"{100001 + i}ms"
            for k in range(TXNS):
                where = f"transaction {k}"
                timeout = own_timeout if 10 <= k < 15 else default_timeout
                with conn.transaction():
                    got = one(conn, "SELECT %s::int + %s::int", (i, k))
                    expect(got == i + k, f"{i} + {k} gave {got}")
                    check_state(conn, i, k, timeout)
                    conn.execute(f"INSERT INTO {TABLE} (client, seq) VALUES (%s, %s)", (i, k))
                    n = one(conn, f"SELECT count(*) FROM {TABLE} WHERE client = %s", (i,))
                    expect(n == k + 1, f"own row count is {n}, expected {k + 1}")
                    s = one(conn, "SELECT %s::text || ':' || %s::text", (f"c{i}", k))
                    expect(s == f"c{i}:{k}", f"concatenation gave {s!r}")
                if k == 5:
                    where = "SET LOCAL transaction"
                    with conn.transaction():
                        conn.execute("SET LOCAL myapp.client = 'local'")
                        v = one(conn, "SELECT current_setting('myapp.client')")
                        expect(v == "local", f"SET LOCAL not seen inside its transaction: {v!r}")
                    v = one(conn, "SELECT current_setting('myapp.client')")
                    expect(v == str(i), f"SET LOCAL outlived its transaction: {v!r}")
                elif k == 8:
                    where = "rolled-back transaction"
                    try:
                        with conn.transaction():
                            conn.execute("SET myapp.client = 'rolledback'")
                            conn.execute("SELECT 1 / %s::int", (0,))
                        raise Mismatch("1 / 0 did not fail")
                    except psycopg.errors.DivisionByZero:
                        pass
                    v = one(conn, "SELECT current_setting('myapp.client')")
                    expect(v == str(i), f"SET in a rolled-back transaction stuck: {v!r}")
                elif k == 9:
                    conn.execute(f"SET statement_timeout = '{own_timeout}'")
                elif k == 14:
                    conn.execute("RESET statement_timeout")
    except Exception as e:  # noqa: BLE001 - every error is a finding
        fail(f"client {i} ({where}): {describe(e)}")


def churn(n, stop):
    """Background traffic so that an unpinned client would land on other server connections."""
    try:
        with connect() as conn:
            conn.execute(f"SET myapp.client = 'churn{n}'")
            x = 0
            while not stop.is_set():
                x += 1
                with conn.transaction():
                    got = one(conn, "SELECT %s::int * 2", (x,))
                    expect(got == 2 * x, f"{x} * 2 gave {got}")
                    v = one(conn, "SELECT current_setting('myapp.client')")
                    expect(v == f"churn{n}", f"churn client {n} sees myapp.client = {v!r}")
                time.sleep(0.005)
    except Exception as e:  # noqa: BLE001
        fail(f"churn client {n}: {describe(e)}")


def scenario_listen():
    with connect() as lis, connect() as ntf:
        lis.execute(f"LISTEN {CHANNEL}")
        pid = backend_pid(lis)
        for r in range(3):
            payload = f"m{r}"
            ntf.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            got = list(lis.notifies(timeout=10, stop_after=1))
            expect(got, f"notification {payload!r} not delivered to the listener within 10 s")
            expect(
                (got[0].channel, got[0].payload) == (CHANNEL, payload),
                f"listener got ({got[0].channel!r}, {got[0].payload!r}), expected {payload!r}",
            )
            expect(backend_pid(lis) == pid, "listener moved to another server connection")
        lis.execute(f"UNLISTEN {CHANNEL}")


def scenario_temp_table():
    with connect() as c:
        c.execute(f"CREATE TEMP TABLE {TABLE}_tmp (x int)")
        pid = backend_pid(c)
        for r in range(1, 6):
            with c.transaction():
                c.execute(f"INSERT INTO {TABLE}_tmp VALUES (%s)", (r,))
                s = one(c, f"SELECT sum(x) FROM {TABLE}_tmp")
                expect(s == r * (r + 1) // 2, f"temp table sum is {s}, expected {r * (r + 1) // 2}")
                expect(backend_pid(c) == pid, "temp table owner moved to another server connection")
            time.sleep(0.02)
        c.execute(f"DROP TABLE {TABLE}_tmp")


LOCKS_SQL = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 "
    "AND objid::bigint = %s::bigint AND objsubid = 1 AND granted AND pid = pg_backend_pid()"
)


def scenario_advisory_lock():
    with connect() as a, connect() as b:
        took = one(a, "SELECT pg_try_advisory_lock(%s::bigint)", (LOCK_KEY,))
        expect(took is True, f"advisory lock {LOCK_KEY} is already held by another session")
        pid = backend_pid(a)
        for r in range(5):
            with a.transaction():
                n = one(a, LOCKS_SQL, (LOCK_KEY,))
                expect(n == 1, f"holder does not see its advisory lock in pg_locks (round {r})")
            with b.transaction():
                got = one(b, "SELECT pg_try_advisory_xact_lock(%s::bigint)", (LOCK_KEY,))
                expect(got is False, f"another client took the held advisory lock (round {r})")
            expect(backend_pid(a) == pid, "lock holder moved to another server connection")
            time.sleep(0.02)
        unlocked = one(a, "SELECT pg_advisory_unlock(%s::bigint)", (LOCK_KEY,))
        expect(unlocked is True, "pg_advisory_unlock by the holder returned false")
        with b.transaction():
            got = one(b, "SELECT pg_try_advisory_xact_lock(%s::bigint)", (LOCK_KEY,))
            expect(got is True, "advisory lock still held after the holder released it")


def scenario_hold_cursor():
    with connect() as c:
        c.execute(
            f"DECLARE {TABLE}_cur CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 12) g"
        )
        pid = backend_pid(c)
        for r in range(4):
            with c.transaction():
                rows = [row[0] for row in c.execute(f"FETCH 3 FROM {TABLE}_cur").fetchall()]
                want = [3 * r + 1, 3 * r + 2, 3 * r + 3]
                expect(rows == want, f"FETCH from the WITH HOLD cursor gave {rows}, expected {want}")
                expect(backend_pid(c) == pid, "cursor owner moved to another server connection")
            time.sleep(0.02)
        c.execute(f"CLOSE {TABLE}_cur")


def scenario_sql_prepare():
    with connect() as c:
        c.execute(f"PREPARE {TABLE}_sqlp (int) AS SELECT $1 * 2")
        pid = backend_pid(c)
        for r in range(1, 6):
            with c.transaction():
                got = one(c, f"EXECUTE {TABLE}_sqlp({r})")
                expect(got == 2 * r, f"EXECUTE of an SQL-level prepared statement gave {got}")
                expect(backend_pid(c) == pid, "PREPARE owner moved to another server connection")
            time.sleep(0.02)
        c.execute(f"DEALLOCATE {TABLE}_sqlp")


def report_and_exit(code_if_ok=0):
    with failures_lock:
        problems = list(failures)
    if not problems:
        print(f"{DRIVER}: OK")
        sys.stdout.flush()
        os._exit(code_if_ok)
    prepared = [p for p in problems if "prepared statement" in p]
    print(f"{DRIVER}: FAILED: {len(problems)} problem(s), {len(prepared)} about prepared statements")
    # Scenario and check failures first: the 50 clients' ones are often all alike.
    ordered = sorted(problems, key=lambda p: p.startswith("client "))
    for p in ordered[:40]:
        print(f"  - {p}")
    if len(ordered) > 40:
        print(f"  ... and {len(ordered) - 40} more")
    sys.stdout.flush()
    os._exit(1)


def watchdog():
    fail(f"watchdog: the run did not finish within {WATCHDOG_SECONDS} s")
    print(f"{DRIVER}: TIMEOUT after {WATCHDOG_SECONDS} s", flush=True)
    with failures_lock:
        for p in failures[:40]:
            print(f"  - {p}")
    sys.stdout.flush()
    os._exit(3)


def check_rows():
    with connect() as check:
        total, distinct = check.execute(
            f"SELECT count(*), count(DISTINCT client) FROM {TABLE}", prepare=False
        ).fetchone()
        expect(
            (total, distinct) == (CLIENTS * TXNS, CLIENTS),
            f"table has {total} rows from {distinct} clients, expected "
            f"{CLIENTS * TXNS} from {CLIENTS}",
        )


def main():
    timer = threading.Timer(WATCHDOG_SECONDS, watchdog)
    timer.daemon = True
    timer.start()
    started = time.monotonic()

    try:
        with connect() as setup:
            print(f"{DRIVER}: connected, server {setup.info.server_version}", flush=True)
            # Unprepared, so that setting up does not depend on what is under test.
            setup.execute(f"DROP TABLE IF EXISTS {TABLE}", prepare=False)
            setup.execute(
                f"CREATE TABLE {TABLE} (client int NOT NULL, seq int NOT NULL)", prepare=False
            )
    except Exception as e:  # noqa: BLE001
        fail(f"setup: {describe(e)}")
        report_and_exit()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{DRIVER}: phase 1 ({CLIENTS} clients x {TXNS} transactions) done in "
          f"{time.monotonic() - started:.1f} s, {len(failures)} problem(s)", flush=True)

    stop = threading.Event()
    churners = [threading.Thread(target=churn, args=(n, stop)) for n in range(3)]
    for t in churners:
        t.start()
    for name, step in [
        ("row count after phase 1", check_rows),
        ("LISTEN/NOTIFY", scenario_listen),
        ("temp table", scenario_temp_table),
        ("session advisory lock", scenario_advisory_lock),
        ("WITH HOLD cursor", scenario_hold_cursor),
        ("SQL-level PREPARE", scenario_sql_prepare),
    ]:
        try:
            step()
            print(f"{DRIVER}: {name}: ok", flush=True)
        except Exception as e:  # noqa: BLE001
            fail(f"{name}: {describe(e)}")
            print(f"{DRIVER}: {name}: FAILED", flush=True)
    stop.set()
    for t in churners:
        t.join()
    print(f"{DRIVER}: finished in {time.monotonic() - started:.1f} s", flush=True)
    report_and_exit()


if __name__ == "__main__":
    main()
