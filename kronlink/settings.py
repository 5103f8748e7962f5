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

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kronlink.errors import ConfigError

# The exact-name prior's default (kronlink/ranking.py explains the rule and the value).
DEFAULT_EXACT_MARGIN = 5.0

__all__ = ["Settings", "get_settings", "load_settings"]

_HOUR = 3600
_MIB = 1024 * 1024
_MIN_TOKEN_CHARS = 16  # a bearer token shorter than this is guessable


class Settings(BaseSettings):
    """Every knob of the worker, the submit command and the service, with safe defaults."""

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
    sweep_interval_s: float = Field(default=600.0, ge=0)  # each worker's periodic sweep; 0: off

    # -- the service (kronlink serve; docs/service.md) ----------------------
    host: str = "127.0.0.1"  # kronlink serve binds here; 0.0.0.0 in a container
    port: int = Field(default=8000, ge=0, le=65535)
    lineages: str = "main"  # comma-separated lineages served; the first is the default
    # Bearer tokens. Admin: jobs and activation (required in production).
    # Read: /v1/link and the read-only registry routes, when set (the admin
    # token is accepted there too); None leaves them open.
    admin_token: SecretStr | None = None
    read_token: SecretStr | None = None
    device: str = "cpu"  # where served models run: cpu, cuda, cuda:1
    torch_threads: int | None = Field(default=None, ge=1)  # None: torch's default
    # Dynamic batching: queries from concurrent requests share one model call
    # of at most batch_max_size queries. The batcher waits up to
    # batch_max_wait_ms for more only while requests keep coming (an idle
    # queue runs a lone request at once, LESSONS.md).
    batch_max_size: int = Field(default=64, ge=1)
    batch_max_wait_ms: float = Field(default=2.0, ge=0)
    batch_queue_max: int = Field(default=2048, ge=1)  # queries waiting; beyond: 429
    # ...and a bound in time: a request is refused at once (429, Retry-After)
    # when the queries already waiting would take longer than this to clear at
    # the model's measured rate (a lone request is always queued). A query
    # accepted waits at most about this long plus the batch running when it came.
    batch_queue_max_ms: float = Field(default=1000.0, gt=0)
    # A well-formed POST /v1/link is answered without FastAPI's request path
    # (service/fastlink.py); false sends every request down the route (bench/link.py
    # compares the two).
    link_fast_path: bool = True
    model_poll_s: float = Field(default=1.0, gt=0)  # how often replicas look for a new version
    model_retry_s: float = Field(default=30.0, gt=0)  # a version that failed to load, again after
    # Limits on what a caller sends (each breach is a 4xx problem, never a 500)
    max_request_bytes: int = Field(default=1 * _MIB, gt=0)  # JSON bodies
    max_mention_chars: int = Field(default=500, ge=1)
    max_context_chars: int = Field(default=2000, ge=0)  # each of left and right context
    max_candidates: int = Field(default=200, ge=1)  # candidates given in one query
    max_batch_items: int = Field(default=256, ge=1)  # queries in one /v1/link/batch
    bm25_candidates: int = Field(default=10, ge=1)  # generated when none are given (any mode)
    # The retriever (kronlink/retrieval): "bm25", or BM25 and the dense MiniLM
    # index fused by weighted reciprocal rank; exact-name matches come first in
    # both. Weights and k from dev grids (issue 12); "bm25" stays for bench/link.py.
    retriever_mode: Literal["bm25", "fused"] = "bm25"
    fusion_w_dense: float = Field(default=1.0, ge=0)
    fusion_w_bm25: float = Field(default=0.25, ge=0)
    # chosen on dev over a grid (bench/fusion_grid.py, results/retrieval/fusion_grid.json);
    # with w_bm25 < w_dense / (rrf_k + 2) BM25 cannot displace dense's top-1
    fusion_rrf_k: float = Field(default=1.0, gt=0)
    fusion_depth: int = Field(default=100, ge=1)  # each list's top read into the fusion
    # Failing an exact name, an acronym the ontology spells out ("COPD") or the
    # one concept with the mention's loose key ("kidney stones" = "Stone in
    # kidney") counts as exact (Retriever.match; bench/mention_variants.py
    # measures it on held-out mentions). False: exact names only.
    retriever_variants: bool = True
    # An exact or normalised-name (or stored-synonym) match ranks first unless the
    # model scores another candidate more than this many nats higher
    # (kronlink/ranking.py; issue 12 item 3). Serving states it in calibrated
    # nats (times the calibration's temperature, service/holder.py); the update
    # job's evaluation adds it raw. 0 turns it off (the model alone).
    exact_margin: float = Field(default=DEFAULT_EXACT_MARGIN, ge=0)
    # /v1/link answers "no_match": true when the served version's calibrated
    # probability that its top answer is right (kronlink/calibration.py, fitted
    # on dev by the update job) is below this. 0: never (the default); a version
    # without a calibration never answers no-match either.
    no_match_below: float = Field(default=0.0, ge=0, le=1)
    # The update job's gate also refuses a version whose dev top-1 is below the
    # retriever's own dev top-1 (issue 12, item 3). Off by default: the demo's
    # reduced version 1 is below BM25 today, and turning it on would refuse it.
    retriever_gate: bool = False
    # The update job fits the retrieval prior, beta * -log(1 + retriever rank),
    # on dev and the version serves with it (kronlink/retrieval_prior.py): the
    # served dev top-1 is then at least the model's alone and the retriever's.
    # Off: the version serves the model (and exact-name prior) alone.
    retrieval_prior: bool = True
    # Fused mode only: the update job also fine-tunes the retriever's mention
    # side (kronlink/retrieval/learn.py) under retriever_penalty at
    # retriever_lambda from the earlier tasks' retriever states, stores the
    # tuned tower in the version's folder and this task's state beside the
    # ranker's; the version then serves dense retrieval with its own tower.
    # Off by default: it costs minutes of CPU a task and ~170 MB a task state.
    retriever_tune: bool = False
    retriever_penalty: Literal["kfc-expand", "kfc", "ewc", "l2"] = "kfc-expand"
    retriever_lambda: float = Field(default=1000.0, ge=0)
    retriever_lr: float = Field(default=5e-5, gt=0)
    retriever_epochs: int = Field(default=1, ge=1)
    retriever_max_train: int | None = Field(default=None, ge=1)  # a seeded subset (CPU budgets)
    retriever_curvature_queries: int = Field(default=1024, ge=1)
    # the dev metric that picks the kept tower: dense recall@k (1 for tiny ontologies)
    retriever_eval_k: int = Field(default=10, ge=1)
    ontologies_cached: int = Field(default=4, ge=1)  # BM25 indexes kept in memory
    # The worker and the training CLIs tell glibc to keep freed memory: a
    # training step then reuses its pages instead of faulting them in again
    # (kronlink/_malloc.py; RSS stays at its peak). The API never does.
    keep_freed_memory: bool = True
    log_format: Literal["json", "text"] = "json"

    # -- operations hardening (issue 16; docs/operations.md) ----------------
    log_level: str = "INFO"  # the service process's root level (kronlink serve --log-level)
    # The HTTP edge (service/server.py): a request head over this many bytes
    # gets 431; a request body with no byte for this long gets 408.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    body_timeout_s: float = Field(default=30.0, gt=0)
    # How long POST /v1/jobs waits for the broker before it answers 503 with
    # Retry-After (the job row is kept; a worker's sweep re-sends it).
    broker_connect_timeout_s: float = Field(default=0.3, gt=0)
    # A job's commit is retried this long while the database is unreachable
    # (a restart, a failover) before the job fails; keep it under lease_s.
    commit_retry_s: float = Field(default=120.0, ge=0)
    # Each job attempt's working files (the model and states it fetched, the
    # artifacts it writes) go under this folder, never the system temp folder;
    # the sweep deletes what no running attempt owns.
    scratch_dir: Path | None = None  # None: <data_dir>/scratch
    # Each API replica writes what it serves and its request figures to the
    # registry this often (the dashboard's serving panel); 0: never.
    replica_report_s: float = Field(default=5.0, ge=0)

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
        for name in ("admin_token", "read_token"):
            token = getattr(self, name)
            if token is not None and len(token.get_secret_value()) < _MIN_TOKEN_CHARS:
                problems.append(
                    f"{name} must have at least {_MIN_TOKEN_CHARS} characters, got "
                    f"{len(token.get_secret_value())}: short tokens can be guessed"
                )
        if self.batch_queue_max < self.max_batch_items:
            problems.append(
                f"batch_queue_max must be at least max_batch_items ({self.max_batch_items}), "
                f"got {self.batch_queue_max}: a full batch request could never be queued"
            )
        if self.retriever_tune and self.retriever_mode != "fused":
            problems.append(
                "retriever_tune needs retriever_mode 'fused': BM25 has nothing to tune "
                "(set KRONLINK_RETRIEVER_MODE=fused, or KRONLINK_RETRIEVER_TUNE=false)"
            )
        if not self.lineage_names:
            problems.append("lineages must name at least one lineage, got none")
        if self.environment == "production":
            if self.admin_token is None:
                problems.append(
                    "production needs KRONLINK_ADMIN_TOKEN: the admin routes "
                    "(jobs, activation) are closed without it"
                )
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
    def scratch_path(self) -> Path:
        return (self.scratch_dir or self.data_path / "scratch").resolve()

    @property
    def lineage_names(self) -> tuple[str, ...]:
        """The served lineages, in order; the first answers requests that name none."""
        return tuple(dict.fromkeys(n.strip() for n in self.lineages.split(",") if n.strip()))

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


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and ``overrides``), every refusal a
    :class:`ConfigError` that names the variables: pydantic wraps the errors
    of validators in its ``ValidationError``, which the CLI would print as a
    traceback."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            ctx = e.get("ctx") or {}
            if isinstance(ctx.get("error"), ConfigError):
                problems.append(str(ctx["error"]))
                continue
            name = ".".join(str(p) for p in e.get("loc", ()))
            where = f"KRONLINK_{name.upper()}" if name else "settings"
            problems.append(f"{where}: {e.get('msg')}, got {e.get('input')!r}")
        raise ConfigError("; ".join(problems)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once; a
    :class:`ConfigError` when they are unsafe or malformed."""
    return load_settings()
