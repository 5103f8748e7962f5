"""``GET /dashboard``: the operators' page, its polling endpoint and its static files.

Read-only: the page reads the registry through the service state's session
factory (``app.state.kronlink.factory``), and its one action, activating
(rolling back to) a version, is the service's admin route
``POST /v1/versions/{id}/activate``, called by the page's JavaScript with the
admin token in an ``Authorization`` header. No cookie carries a token, so a
cross-site page cannot make a browser send one (no CSRF), and nothing here
changes state.

When ``KRONLINK_READ_TOKEN`` is set, the registry's read routes need it, and
so does everything the dashboard shows: ``GET /dashboard`` then returns the
page without data, whose script asks for the read token (kept in the tab's
``sessionStorage``) and loads the rest with it.

Routes are plain ``def``: FastAPI runs them in its thread pool, so a slow
database never blocks the event loop that serves ``/v1/link``.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.orm import Session, sessionmaker

from kronlink.registry import VersionState, list_versions
from kronlink.settings import Settings
from service.dashboard.chart import forgetting_lines_svg, matrix_svg
from service.dashboard.data import (
    LineageView,
    fingerprint,
    jobs_view,
    lineage_names,
    lineage_view,
)
from service.dashboard.omega import fmt_omega, omega_drop, omega_scale
from service.dashboard.serving import serving_view
from service.deps import ReaderDep, StateDep
from service.problems import install_handlers
from service.state import ServiceState

__all__ = ["POLL_MS", "make_dashboard_app", "router"]

HERE = Path(__file__).parent
POLL_MS = 2000  # the page polls state.json this often
STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}

# Scripts and styles only from this origin, no inline script, no framing: a
# task name that slipped through escaping still could not run.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/dashboard", include_in_schema=False)
LineageParam = Annotated[str | None, Query(max_length=100)]


def _factory(state: ServiceState) -> sessionmaker[Session]:
    return state.factory


def _reader_ok(request: Request, state: ServiceState) -> bool:
    """Whether this request may see registry data: no read token is set, or the
    request carries the read or the admin token (what ``ReaderDep`` checks for
    the JSON and fragment routes; the page itself must not answer 401)."""
    s = state.settings
    if s.read_token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    ok = False
    for token in (s.read_token, s.admin_token):
        if token is not None:  # compare with each: the time says nothing of which matched
            ok |= hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode())
    return ok


def _dt(value: datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is None:  # SQLite hands back naive datetimes that are UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _bytes(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    m, s = divmod(s, 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:g}"


@cache
def templates() -> Environment:
    """Built on first use, not at import: autoescaping on for every template."""
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(dt=_dt, bytes=_bytes, num=_num, omega=fmt_omega, duration=_duration)
    env.globals.update(omega_drop=omega_drop)
    return env


def _pick_lineage(session: Session, wanted: str | None) -> tuple[list[str], str | None]:
    names = lineage_names(session)
    if wanted is not None:
        return names, wanted
    # The lineage whose version was activated last is what an operator means.
    active = [
        (v.activated_at, v.lineage)
        for v in list_versions(session)
        if v.state == VersionState.ACTIVE and v.activated_at is not None
    ]
    if active:
        return names, max(active)[1]
    return names, names[0] if names else None


def _context(
    request: Request, session: Session | None, lineage: str | None, *, locked: bool = False
) -> dict[str, Any]:
    view: LineageView | None = None
    if session is not None and lineage is not None:
        view = lineage_view(session, lineage)
        if not view.versions:
            view = None
    root = request.scope.get("root_path", "").rstrip("/")
    return {
        "locked": locked,
        "lineage": lineage,
        "lineages": [],
        "jobs": [],
        "view": view,
        "serving": [],
        "matrix_svg": matrix_svg(view) if view else "",
        "lines_svg": forgetting_lines_svg(view) if view else "",
        # The scale of the version an operator looks at: the active one, else the newest.
        "omega_scale": omega_scale((view.active or view.versions[-1]) if view else None),
        "base_url": f"{root}/dashboard",
        "static_url": f"{root}/dashboard/static",
        "api_root": root,
        "poll_ms": POLL_MS,
        "now": datetime.now(UTC),
    }


def _serving(state: ServiceState, session: Session) -> list[dict[str, Any]]:
    """The replicas that reported within three report intervals, as JSON values."""
    every = getattr(state.settings, "replica_report_s", 0) or 5.0
    rows = serving_view(session, seen_within_s=3 * every)
    return [
        {
            **{k: getattr(r, k) for k in r.__dataclass_fields__ if not k.endswith("_at")},
            "started_at": r.started_at.isoformat(),
            "seen_at": r.seen_at.isoformat(),
        }
        for r in rows
    ]


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


@router.get("", response_class=HTMLResponse)
def dashboard(request: Request, state: StateDep, lineage: LineageParam = None) -> HTMLResponse:
    if not _reader_ok(request, state):  # a page load cannot send the token: the script will
        ctx = _context(request, None, lineage, locked=True)
        return _html(templates().get_template("dashboard.html").render(ctx))
    with _factory(state)() as session:
        names, chosen = _pick_lineage(session, lineage)
        ctx = _context(request, session, chosen)
        ctx.update(lineages=names, jobs=jobs_view(session), serving=_serving(state, session))
    status = 404 if lineage is not None and lineage not in names else 200
    return _html(templates().get_template("dashboard.html").render(ctx), status)


@router.get("/lineage", response_class=HTMLResponse)
def lineage_fragment(
    request: Request, state: StateDep, _: ReaderDep, lineage: LineageParam = None
) -> HTMLResponse:
    """The versions timeline and the chart, for the page to swap in when they change."""
    with _factory(state)() as session:
        names, chosen = _pick_lineage(session, lineage)
        ctx = _context(request, session, chosen)
        ctx.update(lineages=names)
    return _html(templates().get_template("_lineage.html").render(ctx))


@router.get("/state.json")
def state_json(state: StateDep, _: ReaderDep, lineage: LineageParam = None) -> JSONResponse:
    """Polled every 2 s: jobs with phase and progress, and the lineage's fingerprint
    (it changes when a version is added or activated: the page then fetches the
    fragment). Without ``lineage``, the lineage the page would pick."""
    with _factory(state)() as session:
        _, chosen = _pick_lineage(session, lineage)
        versions = list_versions(session, chosen) if chosen else []
        jobs = jobs_view(session)
        serving = _serving(state, session)
    active = next((v for v in versions if v.state == VersionState.ACTIVE), None)
    body = {
        "generated_at": datetime.now(UTC).isoformat(),
        "lineage": chosen,
        "fingerprint": fingerprint(versions),
        "active_version": {"id": active.id, "number": active.number} if active else None,
        "jobs": [j.as_json() for j in jobs],
        "replicas": serving,
    }
    return JSONResponse(body, headers=SECURITY_HEADERS)


@router.get("/static/{name}")
def static(name: str) -> Response:
    """The page's vendored script and stylesheet (no CDN, no build step)."""
    media = STATIC.get(name)
    if media is None:
        return Response(status_code=404, headers={"X-Content-Type-Options": "nosniff"})
    return Response(
        (HERE / "static" / name).read_bytes(),
        media_type=media,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


def make_dashboard_app(factory: sessionmaker[Session], settings: Settings | None = None) -> FastAPI:
    """A FastAPI app serving only the dashboard over ``factory``: for tests and
    previews without the model-serving parts of ``service.app``."""
    app = FastAPI()
    app.state.kronlink = SimpleNamespace(factory=factory, settings=settings or Settings())
    install_handlers(app)
    app.include_router(router)
    return app
