"""The HTTP protocol the service runs under: uvicorn's httptools protocol with
the limits an operator expects at the edge.

- A request whose head (request line and headers) is over
  ``max_header_bytes`` gets 431 and the connection is closed: uvicorn has no
  such limit of its own, and an unbounded head is memory a caller controls.
- A request body that stalls (no byte for ``body_timeout_s`` while the app
  waits for more) gets 408 and the connection is closed: a stalled upload
  would otherwise hold its connection and its staging file open for good.
- A request the parser refuses (``Content-Length: -1``, a broken request
  line) gets a problem document like every other error, not uvicorn's
  text/plain "Invalid HTTP request received."

``kronlink serve`` names this class to uvicorn by its import string
(``service.server:HttpProtocol``, limits from ``KRONLINK_*``); tests and
embedders pass ``protocol_for(settings)``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kronlink.settings import Settings, get_settings

__all__ = ["HttpProtocol", "problem_bytes", "protocol_for"]

_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}
_KINDS = {400: "malformed-request", 408: "request-timeout", 431: "headers-too-large"}
_TITLES = {
    400: "Malformed HTTP request",
    408: "Request body timed out",
    431: "Request headers too large",
}


def problem_bytes(status: int, detail: str) -> bytes:
    """A whole HTTP/1.1 response carrying a problem document; the connection closes."""
    body = json.dumps(
        {
            "type": f"urn:kronlink:problem:{_KINDS[status]}",
            "title": _TITLES[status],
            "status": status,
            "detail": detail,
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode("ascii")
    return head + body


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head-size limit, a body timeout and
    problem JSON for requests the parser refuses."""

    max_header_bytes: int | None = None  # None: read from the environment's settings
    body_timeout_s: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.max_header_bytes is None or self.body_timeout_s is None:
            s = get_settings()
            self.max_header_bytes = s.max_header_bytes
            self.body_timeout_s = s.body_timeout_s
        self._head_bytes = 0
        self._body_timer: asyncio.TimerHandle | None = None

    # -- refusals --------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        self._refuse(
            400,
            "the HTTP request could not be parsed (a malformed request line, header or "
            "Content-Length); send a well-formed HTTP/1.1 request",
        )

    def _refuse(self, status: int, detail: str) -> None:
        self._cancel_body_timer()
        if not self.transport.is_closing():
            self.transport.write(problem_bytes(status, detail))
            self.transport.close()

    # -- the head --------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > (self.max_header_bytes or 0):
            self._refuse(
                431,
                f"the request line and headers are over {self.max_header_bytes} bytes "
                "(KRONLINK_MAX_HEADER_BYTES); send fewer or shorter headers",
            )

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        if not self.transport.is_closing():
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.transport.is_closing():
            return
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body:
            self._arm_body_timer()

    # -- the body --------------------------------------------------------------
    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm_body_timer()

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_body_timer()
        super().connection_lost(exc)

    def _arm_body_timer(self) -> None:
        self._cancel_body_timer()
        if self.body_timeout_s:
            self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_stalled)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_stalled(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or cycle.response_complete:
            return
        if self.flow.read_paused:  # the app is slow to read, not the client to send
            self._arm_body_timer()
            return
        # The app's receive() sees a disconnect; a response it already started
        # cannot be replaced, so the connection just closes.
        cycle.disconnected = True
        cycle.message_event.set()
        if cycle.response_started:
            self.transport.close()
        else:
            self._refuse(
                408,
                f"no request body bytes for {self.body_timeout_s:g} s "
                "(KRONLINK_BODY_TIMEOUT_S); the request was dropped: send the body again",
            )


def protocol_for(settings: Settings) -> type[HttpProtocol]:
    """:class:`HttpProtocol` with the limits of ``settings`` (for ``uvicorn.Config(http=...)``)."""
    return type(
        "HttpProtocol",
        (HttpProtocol,),
        {
            "max_header_bytes": settings.max_header_bytes,
            "body_timeout_s": settings.body_timeout_s,
        },
    )
