#!/usr/bin/env python3
"""Opens N idle client connections to pgtether (trust auth), logs each in, and reports the RSS
growth of the pgtether process per idle client.

usage: idle_clients.py PORT PGTETHER_PID N [USER] [DBNAME]

Each client runs one query (SELECT 1) after logging in, so what a client keeps between
transactions is counted too.
"""
import asyncio
import os
import struct
import sys


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def login(port, user, db):
    # SOCKET_DIR: connect to the pooler's Unix-domain socket there instead of TCP.
    socket_dir = os.environ.get("SOCKET_DIR")
    if socket_dir:
        reader, writer = await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{port}")
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = struct.pack("!i", 196608) + f"user\0{user}\0database\0{db}\0\0".encode()
    writer.write(struct.pack("!i", len(body) + 4) + body)
    await writer.drain()
    while True:
        head = await reader.readexactly(5)
        tag, length = head[0:1], struct.unpack("!i", head[1:])[0]
        payload = await reader.readexactly(length - 4)
        if tag == b"E":
            raise RuntimeError(payload)
        if tag == b"Z":
            break
    q = b"SELECT 1\0"
    writer.write(b"Q" + struct.pack("!i", len(q) + 4) + q)
    await writer.drain()
    while True:
        head = await reader.readexactly(5)
        tag, length = head[0:1], struct.unpack("!i", head[1:])[0]
        await reader.readexactly(length - 4)
        if tag == b"Z":
            return reader, writer


async def main():
    port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    user = sys.argv[4] if len(sys.argv) > 4 else "app"
    db = sys.argv[5] if len(sys.argv) > 5 else "app"
    # One client first, so that pools, buffers and metrics that exist once are not counted.
    keep = [await login(port, user, db)]
    await asyncio.sleep(0.5)
    before = rss_kib(pid)
    sem = asyncio.Semaphore(200)

    async def one():
        async with sem:
            return await login(port, user, db)

    keep += await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(1.0)
    after = rss_kib(pid)
    per = (after - before) * 1024 / n
    print(f"idle clients: {n}  rss before: {before} KiB  after: {after} KiB  per client: {per:.0f} bytes")
    for _, w in keep:
        w.close()


asyncio.run(main())
