"""Clients for the fault tests: /v1/link load that records every answer,
a request held in flight, and a dataset as ``POST /v1/jobs`` takes it."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import fault_procs  # noqa: F401  (puts tests/worker and tests/service on sys.path)
import httpx
from worker_factories import make_task

from kronlink.data.io import save_task

LINK_BODY = {
    "mention": "fever noted",
    "left_context": "pt has",
    "candidates": [{"id": "F001", "name": "fever"}, {"id": "A001", "name": "asthma"}],
}


@dataclass
class Answer:
    sent: float  # time.monotonic()
    received: float
    status: int  # -1: no HTTP answer (connection refused, reset)
    version_id: int | None
    error: str | None = None


class LinkLoad:
    """One client thread sending /v1/link to each of ``urls`` in turn: back
    to back, or with ``pause_s`` between rounds where the load is not the
    point and would only starve the processes under test of this machine's
    few cores. A refused connection (a replica down) costs a 50 ms back-off."""

    def __init__(self, *urls: str, pause_s: float = 0.0) -> None:
        self.urls = urls
        self.pause_s = pause_s
        self.by_url: dict[str, list[Answer]] = {u: [] for u in urls}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LinkLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        clients = {u: httpx.Client(base_url=u, timeout=10) for u in self.urls}
        while not self._stop.is_set():
            for url in self.urls:
                sent = time.monotonic()
                try:
                    r = clients[url].post("/v1/link", json=LINK_BODY)
                    vid = r.json()["model_version"]["id"] if r.status_code == 200 else None
                    answer = Answer(sent, time.monotonic(), r.status_code, vid, None)
                except httpx.HTTPError as exc:
                    answer = Answer(sent, time.monotonic(), -1, None, type(exc).__name__)
                    # a fresh connection after each failure, as a load balancer's would be
                    clients[url].close()
                    clients[url] = httpx.Client(base_url=url, timeout=10)
                    time.sleep(0.05)  # a refused connect returns at once: do not spin
                self.by_url[url].append(answer)
            if self.pause_s:
                time.sleep(self.pause_s)
        for client in clients.values():
            client.close()

    def answers(self, url: str | None = None) -> list[Answer]:
        return self.by_url[url or self.urls[0]]

    def between(self, start: float, end: float, url: str | None = None) -> list[Answer]:
        return [a for a in self.answers(url) if start <= a.sent and a.received <= end]

    def failures(self, url: str | None = None) -> list[Answer]:
        return [a for a in self.answers(url) if a.status != 200]

    def serves(self, url: str, version_id: int, since: float) -> bool:
        """Whether ``url`` answered with ``version_id`` to a request sent after ``since``."""
        return any(a.version_id == version_id and a.sent >= since for a in self.answers(url))


def job_files(tmp: Path, name: str, seed: int) -> dict[str, tuple[str, bytes]]:
    """A dataset as ``POST /v1/jobs`` takes it (queries.jsonl, ontology.jsonl)."""
    folder = tmp / "uploads" / name
    save_task(make_task(name, seed), folder)
    return {
        part: (file, (folder / file).read_bytes())
        for part, file in (("queries", "queries.jsonl"), ("ontology", "ontology.jsonl"))
    }


class SlowRequest:
    """A /v1/link request sent in two parts: headers and a first bytes of the
    body now, the rest on :meth:`finish`. Between the two it is in flight on
    the server, which is where a graceful shutdown must let it complete."""

    # /v1/link/batch, which the load does not use: the server's in-progress gauge
    # for this path then counts this request alone (see in_flight)
    PATH = "/v1/link/batch"

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.url = url
        body = json.dumps({"items": [LINK_BODY]}).encode()
        head = (
            f"POST {self.PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.sendall(head.encode() + body[:10])
        self.rest = body[10:]

    def in_flight(self) -> bool:
        """The server has read the headers and is waiting for the rest of the body."""
        line = f'kronlink_http_requests_in_progress{{path="{self.PATH}"}} 1.0'
        return line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines()

    def finish(self) -> tuple[int, dict]:
        self.sock.sendall(self.rest)
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        self.sock.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload)
