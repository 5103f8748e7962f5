"""Dependencies shared by the routes, as ``Annotated`` aliases.

    def route(state: StateDep, _: AdminDep) -> ...

Tokens are compared in constant time (``hmac.compare_digest``) so a timing
difference does not reveal how much of a guess was right.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.problems import ProblemError
from service.state import ServiceState

__all__ = ["AdminDep", "ReaderDep", "StateDep", "get_state"]

_admin = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="KRONLINK_ADMIN_TOKEN: jobs and version activation",
)
_reader = HTTPBearer(
    auto_error=False,
    scheme_name="ReadToken",
    description="KRONLINK_READ_TOKEN (or the admin token), when the server sets one",
)


# async: FastAPI runs a plain ``def`` dependency in its thread pool, two
# thread hops per request on the /v1/link path for what is a dict lookup.
async def get_state(request: Request) -> ServiceState:
    return request.app.state.kronlink


StateDep = Annotated[ServiceState, Depends(get_state)]
Credentials = HTTPAuthorizationCredentials | None


def _matches(given: Credentials, *expected: SecretStr | None) -> bool:
    if given is None:
        return False
    token = given.credentials.encode()
    ok = False
    for e in expected:
        if e is not None:  # compare against every token: the time says nothing of which
            ok |= hmac.compare_digest(token, e.get_secret_value().encode())
    return ok


def _unauthorized(what: str) -> ProblemError:
    return ProblemError(
        401,
        "unauthorized",
        f"this route needs the {what} token: send 'Authorization: Bearer <token>'",
        headers={"WWW-Authenticate": 'Bearer realm="kronlink"'},
    )


async def require_admin(state: StateDep, cred: Annotated[Credentials, Depends(_admin)]) -> None:
    token = state.settings.admin_token
    if token is None:
        raise ProblemError(
            403,
            "forbidden",
            "admin routes are disabled: this server was started without KRONLINK_ADMIN_TOKEN",
        )
    if not _matches(cred, token):
        raise _unauthorized("admin")


async def require_reader(state: StateDep, cred: Annotated[Credentials, Depends(_reader)]) -> None:
    s = state.settings
    if s.read_token is None:
        return
    if not _matches(cred, s.read_token, s.admin_token):
        raise _unauthorized("read (or admin)")


AdminDep = Annotated[None, Depends(require_admin)]
ReaderDep = Annotated[None, Depends(require_reader)]
