"""The kronlink HTTP service (DESIGN.md section 6; docs/service.md).

It answers /v1/link with the active model version of each served lineage,
batching concurrent requests; submits update jobs that ``worker/`` runs;
lists and activates versions; and swaps models without failing a request.
It imports ``kronlink`` and never ``worker``.
"""

from service.app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]
