"""One settings object for the processes at the edges (worker, CLI, service).

Read once from ``KRONLINK_*`` environment variables by :func:`get_settings`
(cached); the library itself takes plain arguments and never reads these.

The embedded default needs no server: everything lives under ``data_dir``
(``./kronlink-data``): the SQLite registry, the artifact folder, the staging
folder and the broker, kombu's SQLAlchemy transport on a SQLite file
(``sqla+sqlite:///<data_dir>/broker.db``) with results in another SQLite file.
Scaled out, set ``KRONLINK_DATABASE_URL=postgresql://...`` and
``KRONLINK_BROKER_URL=redis://...`` (docs/worker.md).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kronlink.errors import ConfigError

__all__ = ["Settings", "get_settings"]

_HOUR = 3600


class Settings(BaseSettings):
    """Every knob of the worker and the submit command, with safe defaults."""

    model_config = SettingsConfigDict(env_prefix="KRONLINK_", frozen=True, extra="ignore")

    # "production" refuses the embedded defaults (SQLite, SQLite broker).
    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path("kronlink-data")  # home of every embedded default below
    database_url: str | None = None  # None: sqlite:///<data_dir>/kronlink.db
    broker_url: str | None = None  # None: sqla+sqlite:///<data_dir>/broker.db
    result_backend: str | None = None  # None: db+sqlite:///<data_dir>/results.db
    artifact_root: str | None = None  # None: <data_dir>/artifacts; or any fsspec URL
    staging_dir: Path | None = None  # None: <data_dir>/staging (uploads wait here)
    queue: str = "kronlink.updates"  # the Celery queue update jobs go to
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, gt=0)  # per dataset file
    staged_max_age_s: float = Field(default=24 * _HOUR, gt=0)  # the sweep deletes older
    lease_s: float = Field(default=600.0, gt=0)  # job lease; heartbeats every lease_s / 4
    max_attempts: int = Field(default=3, ge=1)  # deliveries before a lost job fails
    # Redis redelivers an unacknowledged message after this long, even while
    # its job still runs (LESSONS.md): keep it well above the longest job.
    visibility_timeout_s: int = Field(default=48 * _HOUR, gt=0)
    longest_job_s: float = Field(default=12 * _HOUR, gt=0)  # what the timeout must exceed
    progress_interval_s: float = Field(default=2.0, ge=0)  # job-row progress writes, at most
    retry_delay_s: float = Field(default=5.0, gt=0)  # a job behind another one waits this long

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        problems = []
        if self.visibility_timeout_s < 2 * self.longest_job_s:
            problems.append(
                f"visibility_timeout_s must be at least twice longest_job_s "
                f"({2 * self.longest_job_s:g}), got {self.visibility_timeout_s}: the broker "
                "would deliver a running job again"
            )
        if self.staged_max_age_s <= self.lease_s:
            problems.append(
                f"staged_max_age_s must exceed lease_s ({self.lease_s:g}), got "
                f"{self.staged_max_age_s:g}: the sweep would delete data a live job reads"
            )
        staging = self.staging_path.resolve()
        art = self.artifact_url
        if "://" not in art and staging.is_relative_to(Path(art).resolve()):
            problems.append(
                f"staging_dir {staging} lies inside artifact_root {art}: "
                "training data must never sit among the artifacts"
            )
        if self.environment == "production":
            if self.database.startswith("sqlite"):
                problems.append("production needs KRONLINK_DATABASE_URL (PostgreSQL), not SQLite")
            if self.broker.startswith("sqla+"):
                problems.append(
                    "production needs KRONLINK_BROKER_URL (Redis), not the SQLite broker"
                )
        if problems:
            raise ConfigError("unsafe settings: " + "; ".join(problems))
        return self

    # -- resolved values ---------------------------------------------------
    @property
    def data_path(self) -> Path:
        return self.data_dir.resolve()

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'kronlink.db'}"

    @property
    def broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_path / 'broker.db'}"

    @property
    def backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return f"db+sqlite:///{self.data_path / 'results.db'}"

    @property
    def artifact_url(self) -> str:
        return self.artifact_root or str(self.data_path / "artifacts")

    @property
    def staging_path(self) -> Path:
        return (self.staging_dir or self.data_path / "staging").resolve()

    def transport_options(self, url: str) -> dict[str, int]:
        """Broker / result-backend transport options: Redis gets the visibility
        timeout; the SQLAlchemy transport passes options to ``create_engine``
        and redelivers nothing by timeout, so it gets none."""
        if url.startswith(("redis://", "rediss://", "sentinel://")):
            return {"visibility_timeout": self.visibility_timeout_s}
        return {}

    @property
    def heartbeat_s(self) -> float:
        return self.lease_s / 4

    def redacted(self) -> dict[str, str]:
        """Where things are, passwords hidden: for logs and ``kronlink worker``."""
        from sqlalchemy.engine import make_url

        def hide(url: str) -> str:
            try:
                return make_url(
                    url.split("+", 1)[1] if url.startswith("sqla+") else url
                ).render_as_string(hide_password=True)
            except Exception:  # not an SQLAlchemy URL (redis://...)
                head, sep, tail = url.rpartition("@")
                return f"{head.split('//')[0]}//***@{tail}" if sep else url

        return {
            "database": hide(self.database),
            "broker": hide(self.broker),
            "result_backend": hide(self.backend),
            "artifacts": self.artifact_url,
            "staging": str(self.staging_path),
            "queue": self.queue,
        }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
