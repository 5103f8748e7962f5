"""bench/link.py's load clients: httpx (the default) and a minimal raw one."""

from __future__ import annotations

import asyncio
import time

import httpx


async def _account(
    path: str,
    status: int,
    payload: bytes,
    retry: float,
    t0: float,
    t1: float,
    warm_until: float,
    per_request: int,
    lat: list[float],
    counts: list[int],
    statuses: dict[int, int],
) -> None:
    """One answer, the same for both clients: any status but 200 and 429 is
    fatal; after the warm-up, statuses are counted and 200s timed; a 429 waits
    what the server asks, as a well-behaved client would."""
    if status not in (200, 429):
        raise RuntimeError(f"{path}: {status} {payload[:300]!r}")
    if t0 >= warm_until:
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            lat.append(t1 - t0)
            counts[0] += per_request
    if status == 429:
        await asyncio.sleep(retry)


async def httpx_client(
    port: int,
    path: str,
    body: bytes,
    per_request: int,
    stop_at: float,
    warm_until: float,
    lat: list[float],
    counts: list[int],
    statuses: dict[int, int],
) -> None:
    """One keep-alive client sending one request at a time; a 429 is counted, not fatal."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60
    ) as client:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            r = await client.post(path, content=body, headers=headers)
            t1 = time.perf_counter()
            retry = float(r.headers.get("Retry-After", "1"))
            await _account(
                path,
                r.status_code,
                r.content,
                retry,
                t0,
                t1,
                warm_until,
                per_request,
                lat,
                counts,
                statuses,
            )


async def raw_client(
    port: int,
    path: str,
    body: bytes,
    per_request: int,
    stop_at: float,
    warm_until: float,
    lat: list[float],
    counts: list[int],
    statuses: dict[int, int],
) -> None:
    """The same client as a minimal HTTP/1.1 keep-alive exchange over asyncio
    streams: far less client CPU a request than httpx, which matters when the
    load generator shares 2 cores with the server (``--client raw``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            writer.write(head + body)
            headers = await reader.readuntil(b"\r\n\r\n")
            status = int(headers[9:12])
            length, retry = 0, 1.0
            for line in headers.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
                elif line[:12].lower() == b"retry-after:":
                    retry = float(line[12:])
            payload = await reader.readexactly(length)
            t1 = time.perf_counter()
            await _account(
                path, status, payload, retry, t0, t1, warm_until, per_request, lat, counts, statuses
            )
    finally:
        writer.close()
