"""The operators' dashboard: ``GET /dashboard``, server-rendered, light JavaScript.

``router`` (a FastAPI ``APIRouter``) reads the registry through the service
state's session factory (``app.state.kronlink.factory``) and honours the
service's read token; its templates, script and stylesheet ship inside this
package (no CDN, no build step). docs/operations.md shows what it shows.
"""

from service.dashboard.routes import make_dashboard_app, router

__all__ = ["make_dashboard_app", "router"]
