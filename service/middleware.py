"""One ASGI middleware for what every request needs: a request id, a body-size
limit, the access log and the request metrics.

Pure ASGI (not ``BaseHTTPMiddleware``): it adds no task or copy per request,
which matters at thousands of /v1/link requests a second. For the same
reason it offers ``POST /v1/link`` to a lean handler first
(service/fastlink.py): a well-formed request is answered here, anything else
goes on to the route.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import new_request_id, request_id_var
from service.metrics import IN_PROGRESS_PATHS, Metrics
from service.problems import ProblemError, problem_response

__all__ = ["RequestMiddleware"]

log = logging.getLogger("service.access")

FAST_PATH = "/v1/link"
# (headers, body) -> (status, headers, body), or None to pass the request on
FastHandler = Callable[[dict[bytes, bytes], bytes], Awaitable[Any]]


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        max_body: int,
        streams_body: Callable[[str, str], bool],
        fast_link: Callable[[], FastHandler | None] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.streams_body = streams_body  # (method, path): the route limits its own body
        # built lazily: the handler needs the app's state, which starts with the lifespan
        self._fast_factory = fast_link
        self._fast: FastHandler | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        rid = new_request_id(headers.get(b"x-request-id", b"").decode("latin-1") or None)
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500
        rid_header = (b"x-request-id", rid.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        method, path = scope["method"], scope["path"]
        label: str | None = None  # set when this middleware answered for a route
        in_progress = self.metrics.in_progress.labels(
            path if path in IN_PROGRESS_PATHS else "other"
        )
        in_progress.inc()
        try:
            encoding = headers.get(b"content-encoding", b"identity").strip().lower()
            if encoding not in (b"", b"identity"):
                await self._refuse(
                    scope,
                    send_with_id,
                    ProblemError(
                        415,
                        "unsupported-media-type",
                        f"compressed bodies are not accepted (Content-Encoding "
                        f"{encoding.decode('latin-1')}): send the body uncompressed",
                    ),
                )
                return
            if method == "POST" and path == FAST_PATH and self._fast_factory is not None:
                label = FAST_PATH
                receive = await self._try_fast(headers, receive, scope, send_with_id)
                if receive is None:
                    return
            elif not self.streams_body(method, path):
                receive = await self._limited(headers, receive, scope, send_with_id)
                if receive is None:
                    return
            await self.app(scope, receive, send_with_id)
        finally:
            in_progress.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or label or "unmatched"
            elapsed = time.perf_counter() - start
            code = str(status)
            self.metrics.requests.labels(label, method, code).inc()
            self.metrics.latency.labels(label, method, code).observe(elapsed)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "%s %s %s %.1f ms",
                    method,
                    path,
                    status,
                    elapsed * 1000,
                    extra={
                        "method": method,
                        "path": path,
                        "route": label,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )
            request_id_var.reset(token)

    async def _try_fast(
        self, headers: dict[bytes, bytes], receive: Receive, scope: Scope, send: Send
    ) -> Receive | None:
        """Answer through the lean handler, or return a ``receive`` that replays
        the body to the route; None when answered (also a 413 or a problem)."""
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._too_large(scope, send, f"declares {int(declared)} bytes")
            return None
        body = await self._read(receive, scope, send)
        if not isinstance(body, bytes):
            return body
        if self._fast is None:
            self._fast = self._fast_factory() if self._fast_factory else None
        if self._fast is not None:
            try:
                answer = await self._fast(headers, body)
            except ProblemError as exc:  # 429, 503: as the app's handler answers them
                await self._refuse(scope, send, exc)
                return None
            except Exception:
                logging.getLogger("service.problems").exception(
                    "internal error on %s %s", scope["method"], scope["path"]
                )
                await self._refuse(
                    scope,
                    send,
                    ProblemError(
                        500,
                        "internal-error",
                        "the service failed to answer; the log has the details under "
                        "this request_id",
                    ),
                )
                return None
            if answer is not None:
                status, out_headers, payload = answer
                await send(
                    {"type": "http.response.start", "status": status, "headers": out_headers}
                )
                await send({"type": "http.response.body", "body": payload})
                return None
        return _replay(body, receive)

    async def _limited(
        self, headers: dict[bytes, bytes], receive: Receive, scope: Scope, send: Send
    ) -> Receive | None:
        """``receive`` as is when the declared length is within the limit; a
        413 (and None) when it is not. A body without Content-Length is read
        here, up to the limit, and replayed."""
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_body:
                await self._too_large(scope, send, f"declares {int(declared)} bytes")
                return None
            return receive
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return receive
        body = await self._read(receive, scope, send)
        return _replay(body, receive) if isinstance(body, bytes) else body

    async def _read(self, receive: Receive, scope: Scope, send: Send) -> bytes | Receive | None:
        """The whole body, up to the limit; None when answered with 413; a
        ``receive`` that reports the disconnect when the client left."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return _no_receive  # disconnected: let the app see it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._too_large(scope, send, f"is over {self.max_body} bytes")
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _too_large(self, scope: Scope, send: Send, what: str) -> None:
        exc = ProblemError(
            413,
            "payload-too-large",
            f"the request body {what}; the limit is {self.max_body} bytes "
            "(KRONLINK_MAX_REQUEST_BYTES): send fewer items per request",
        )
        await self._refuse(scope, send, exc)

    async def _refuse(self, scope: Scope, send: Send, exc: ProblemError) -> None:
        from starlette.requests import Request

        response = problem_response(Request(scope), exc)
        await response(scope, _no_receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that gives the app the body already read, then the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}
