"""The demo's HTTP client: httpx, one keep-alive connection to ``kronlink up``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kronlink.errors import KronlinkError


class DemoError(KronlinkError):
    """The demo cannot go on; the message says what to do."""


def detail(body: Any) -> str:
    """The problem document's detail (or title), for an error message."""
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)
    return str(body)


@dataclass
class Api:
    base: str
    token: str
    _client: httpx.Client | None = field(default=None, init=False, repr=False)

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                base_url=self.base,
                headers={"Authorization": f"Bearer {self.token}", "Accept": "application/json"},
                # a job submission uploads the task's files: allow slow disks
                timeout=120,
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: dict[str, str] | None = None,
        files: dict[str, Path] | None = None,
    ) -> tuple[int, Any]:
        """(status, parsed JSON body); a body that is not JSON comes back as ``{"detail": ...}``."""
        with contextlib.ExitStack() as stack:
            upload = None
            if files:
                upload = {
                    name: (p.name, stack.enter_context(p.open("rb")), "application/x-ndjson")
                    for name, p in files.items()
                }
            r = self.client.request(method, path, json=json, data=data, files=upload)
        try:
            return r.status_code, r.json() if r.content else None
        except ValueError:
            return r.status_code, {"detail": r.text[:500]}

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        if status != 200:
            raise DemoError(f"GET {path}: HTTP {status}: {detail(body)}")
        return body

    def healthy(self) -> bool:
        try:
            return httpx.get(self.base + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
