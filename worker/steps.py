"""The steps of one update job between claim and commit, as named methods of
one object that keeps what the later steps need.

    steps = UpdateSteps(run, scratch)
    steps.validate(); steps.load(); steps.tune_retriever(); steps.candidates()
    steps.update(); steps.write()
    ...  # then, in the commit transaction:
    ending = steps.commit(session)

``write`` stores the model, the new task's curvature state and a new
ontology's concepts. With ``retriever_tune`` (fused mode), ``tune_retriever``
first fine-tunes the retriever's query tower (kronlink/retrieval/learn.py),
and ``write`` stores it in the version's folder (``tower/``) and its task
state beside the ranker's; a version whose parent has a tower carries it
forward unchanged when this job does not tune it.
:meth:`UpdateSteps.write_extra_artifacts` is the place for further
artifacts a version carries (indexes built by the worker): each
goes through :meth:`UpdateSteps.put`, so a failed job removes it like the
others, and the commit reads it from ``self.extra``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from kronlink.data.io import ONTOLOGY_FILE, write_ontology
from kronlink.data.splits import without_query_strings
from kronlink.registry import (
    ArtifactInfo,
    JobState,
    NotFoundError,
    TaskStateInfo,
    VersionInfo,
    activate_version,
    active_version,
    add_task_state,
    create_ontology,
    create_task,
    create_version,
    get_ontology,
    get_task,
    list_ontologies,
    list_task_states,
    mark_version_failed,
)
from worker._run import Ending, Run, timed
from worker.cleanup import discard, write_error

__all__ = ["UpdateSteps"]

log = logging.getLogger("worker.job")


@dataclass
class UpdateSteps:
    """One job's work, step by step; each step fills the fields the next reads."""

    run: Run
    scratch: Path  # this attempt's own folder under the worker's data folder
    # validate
    task: Any = None  # kronlink.data.schema.Task
    train: Any = None  # kronlink.training.TrainConfig
    # load: read from the registry in a short transaction, then fetched outside it
    parent: VersionInfo | None = None
    prior_rows: list[TaskStateInfo] = field(default_factory=list)
    prior_names: list[str] = field(default_factory=list)
    model: Any = None
    priors: list[Any] = field(default_factory=list)
    method: str = "none"
    new_ontology: bool = False  # its concepts file is stored with this version
    parent_ontology: str | None = None  # the ontology of the task the parent learned
    retriever: Any = None  # kronlink.retrieval.Retriever, when this job built one
    tower: Any = None  # kronlink.retrieval.tower.QueryTower: the parent's, or tuned here
    tower_priors: list[Any] = field(default_factory=list)  # earlier tasks' tower states
    tower_prior_names: list[str] = field(default_factory=list)  # their tasks, in order
    tower_update: Any = None  # kronlink.retrieval.learn.RetrieverUpdate, when tuned here
    # update
    request: Any = None  # kronlink.update.UpdateRequest
    result: Any = None  # kronlink.update.UpdateResult
    # write: the keys written (removed again if the job does not commit) and their artifacts
    written: list[str] = field(default_factory=list)
    model_art: ArtifactInfo | None = None
    state_art: ArtifactInfo | None = None
    tower_state_art: ArtifactInfo | None = None
    onto_art: ArtifactInfo | None = None
    extra: dict[str, ArtifactInfo] = field(default_factory=dict)

    @property
    def attempt(self) -> str:
        return f"j{self.run.job.id}-a{self.run.job.attempts}"

    @property
    def ontology_name(self) -> str:
        return self.run.spec.ontology or self.run.spec.task_name

    # -- validate ----------------------------------------------------------------
    def validate(self) -> None:
        from kronlink.data.io import load_task
        from kronlink.training import TrainConfig

        run, spec = self.run, self.run.spec
        with timed(run, "validate"):
            if not run.staged.is_dir():
                raise Ending(
                    JobState.FAILED,
                    f"staged dataset {spec.staged_id} is missing (deleted by the sweep after "
                    f"{run.ctx.settings.staged_max_age_s:g} s, or never staged)",
                )
            self.task = load_task(run.staged, max_bytes=run.ctx.settings.max_upload_bytes)
            unknown = set(spec.train) - set(TrainConfig.__dataclass_fields__)
            if unknown:
                raise Ending(
                    JobState.FAILED, f"unknown train option(s): {', '.join(sorted(unknown))}"
                )
            self.train = TrainConfig(**spec.train)

    def candidates(self) -> None:
        """Generate the candidates the upload did not give, after ``load`` and
        ``tune_retriever``: with the retriever this version will serve (the
        parent's tower, or the one tuned here), so training, the retrieval
        prior, the gate and serving all see the same retriever."""
        if any(q.candidates is None for q in self.task.queries):
            with timed(self.run, "candidates"):
                self.task = self.with_candidates(self.task)

    def with_candidates(self, task: Any) -> Any:
        """The task with candidates from the service's retriever wherever a query
        has none (docs/data.md): the top ``bm25_candidates`` over the ontology as
        it will be stored (no query string in it), gold inserted for train and
        unsplit queries as training needs, kept as retrieved for dev and test."""
        from dataclasses import replace

        from kronlink.data.candidates import attach_candidates

        settings = self.run.ctx.settings
        retriever = self.task_retriever()
        by_id = {c.id: c for c in retriever.concepts}
        queries = list(task.queries)
        for insert in (True, False):
            idx = [
                i
                for i, q in enumerate(queries)
                if q.candidates is None and (q.split in (None, "train")) == insert
            ]
            if idx:
                done = attach_candidates(
                    [queries[i] for i in idx],
                    retriever,
                    by_id,
                    settings.bm25_candidates,
                    insert_gold=insert,
                    seed=self.train.seed,
                )
                for i, q in zip(idx, done, strict=True):
                    queries[i] = q
        log.info("job %s: generated candidates for queries without", self.run.job.id)
        return replace(task, queries=tuple(queries))

    # -- load --------------------------------------------------------------------
    def load(self) -> None:
        """The active version and every prior task's state. The registry is read
        in a short transaction; the artifacts are fetched and re-hashed after
        it (SQLite's write lock is not held through that I/O)."""
        import torch

        from kronlink.curvature.state import TaskState
        from kronlink.models import build_ranker, load_ranker
        from kronlink.training import seed_everything

        run, spec, job, store = self.run, self.run.spec, self.run.job, self.run.ctx.store
        with timed(run, "load"):
            with run.ctx.factory.begin() as s:
                self.parent = active_version(s, job.lineage)
                if self.parent is not None:
                    self.prior_rows = list_task_states(s, self.parent.id)
                self.prior_names = [get_task(s, r.task_id).name for r in self.prior_rows]
                if self.parent is not None and self.parent.task_id is not None:
                    # the parent's own ontology, for a parent whose metrics
                    # predate "by_ontology" (see by_ontology)
                    task = get_task(s, self.parent.task_id)
                    self.parent_ontology = get_ontology(s, task.ontology_id).name
                # read now: the steps after this one need no database until the commit
                known = {o.name for o in list_ontologies(s)}
            self.new_ontology = self.ontology_name not in known
            if spec.task_name in self.prior_names:
                raise Ending(
                    JobState.FAILED,
                    f"task {spec.task_name!r} is already learned by version "
                    f"{self.parent.number if self.parent else '?'} of lineage {job.lineage!r}",
                )
            if self.parent is None:  # bootstrap: version 1 learns its task from scratch
                ranker = dict(spec.ranker)
                # Seeded by the job's seed, in a forked generator: the same
                # spec starts from the same weights whatever the worker process
                # drew before (unseeded, three demo runs trained three different
                # version 1s), and the process's own stream is left as it was.
                with torch.random.fork_rng(devices=[]):
                    seed_everything(self.train.seed)
                    self.model = build_ranker(ranker.pop("kind", "cnn"), **ranker)
                return
            art = self.parent.artifact
            path = store.get(store.key_of(art.uri), art.sha256, self.scratch / "model")
            self.model = load_ranker(path)
            for i, r in enumerate(self.prior_rows):
                key = store.key_of(r.artifact.uri)
                p = store.get(key, r.artifact.sha256, self.scratch / f"prior{i}")
                self.priors.append(TaskState.load(p, model=self.model))
            self.method = spec.method
            self.load_tower(path)

    def load_tower(self, parent_folder: Path) -> None:
        """The parent's query tower (carried forward, or tuned further) and
        the earlier tasks' tower states, which the tuning's penalty keeps."""
        from kronlink.curvature.state import TaskState
        from kronlink.retrieval.tower import TOWER_DIR, QueryTower

        if (parent_folder / TOWER_DIR).is_dir():
            self.tower = QueryTower.load(parent_folder / TOWER_DIR)
        if self.tower is None or not self.run.ctx.settings.retriever_tune:
            return
        store = self.run.ctx.store
        for i, r in enumerate(self.prior_rows):
            if r.tower is None:  # learned before the retriever was tuned: nothing to keep
                continue
            p = store.get(store.key_of(r.tower.uri), r.tower.sha256, self.scratch / f"tower{i}")
            self.tower_priors.append(TaskState.load(p, model=self.tower))
            self.tower_prior_names.append(self.prior_names[i])

    # -- tune_retriever -------------------------------------------------------------
    def tune_retriever(self) -> None:
        """With ``retriever_tune``: fine-tune the query tower on the task's
        train mentions against its ontology's dense index, under the penalty of
        the earlier tasks' tower states."""
        settings = self.run.ctx.settings
        if not settings.retriever_tune:
            return
        from kronlink.retrieval.learn import RetrieverLearnConfig, learn_retriever_task
        from kronlink.retrieval.tower import QueryTower
        from kronlink.update import UpdateProgress

        run = self.run
        run.check()
        base = self.task_retriever()
        tower = self.tower if self.tower is not None else QueryTower.build()
        config = RetrieverLearnConfig.from_settings(settings, seed=self.train.seed)

        def progress(e: dict) -> None:
            run.on_progress(
                UpdateProgress(
                    phase="retriever",
                    epoch=e.get("epoch"),
                    step=e.get("step"),
                    total_steps=e.get("total_steps"),
                    loss=e.get("loss"),
                    penalty=e.get("penalty"),
                    message=f"tuning the retriever ({len(self.tower_priors)} earlier task(s) kept)",
                )
            )

        train = [q for q in self.task.queries if q.split in (None, "train")]
        with timed(run, "retriever"):
            result = learn_retriever_task(
                tower,
                base.dense,
                train,
                self.task.split("dev"),
                self.tower_priors,
                config,
                on_progress=progress,
                should_stop=run.should_stop,
            )
        run.check()
        if result.tuned.stopped:
            raise Ending(JobState.FAILED, "the retriever's tuning stopped without a result")
        self.tower, self.tower_update = result.tower, result
        # the same BM25 and concept index; mentions now go through the tuned tower
        self.retriever = base.with_encoder(result.tower.query_encoder())
        log.info("job %s: retriever tuned: %s", run.job.id, result.summary())

    # -- update ------------------------------------------------------------------
    def update(self) -> None:
        from kronlink.update import UpdateRequest, run_update

        run, spec = self.run, self.run.spec
        run.check()
        lambdas = tuple(spec.lambdas) if isinstance(spec.lambdas, list) else spec.lambdas
        self.request = UpdateRequest(
            method=self.method,
            lambdas=0.0 if self.method == "none" else lambdas,
            half_decades=spec.half_decades,
            train=self.train,
            quality_gate=spec.quality_gate,
            retriever_dev_top1=self.retriever_dev_top1(),
            exact_margin=run.ctx.settings.exact_margin,
        )
        update = run.ctx.update_fn or run_update
        t0 = time.perf_counter()
        result = update(
            self.model,
            self.priors,
            self.task,
            self.request,
            on_progress=run.on_progress,
            should_stop=run.should_stop,
            # the retriever that made (or would make) the candidates: the job
            # fits the retrieval prior on its dev order (kronlink.retrieval_prior)
            retriever=self.task_retriever() if run.ctx.settings.retrieval_prior else None,
        )
        run.timings["update"] = round(time.perf_counter() - t0, 4)
        run.timings.update({f"update.{k}": round(v, 4) for k, v in result.timings.items()})
        if result.stopped or result.new_state is None:
            run.check()
            raise Ending(JobState.FAILED, "the update stopped without a result")
        run.check()  # a cancel that arrived after the last step still counts
        self.result = result

    def task_retriever(self) -> Any:
        """The retriever over the ontology as it will be stored (no query
        string in it), as serving will build it; built once per job."""
        if self.retriever is None:
            from kronlink.retrieval import task_retriever

            r = task_retriever(self.task, self.run.ctx.settings)
            # a carried tower serves this version, so it retrieves here too
            self.retriever = r.with_encoder(self.tower.query_encoder()) if self.tower else r
        return self.retriever

    def retriever_dev_top1(self) -> float | None:
        """The retriever's top-1 on the task's dev split, when the
        ``retriever_gate`` setting asks the gate to compare with it."""
        settings = self.run.ctx.settings
        dev = self.task.split("dev")
        if not settings.retriever_gate or not dev:
            return None
        from kronlink.retrieval import top1

        return top1(self.task_retriever(), dev)

    # -- write -------------------------------------------------------------------
    def put(self, key: str, path: Path) -> ArtifactInfo:
        """Store a file or folder under ``key``, remembered for :meth:`discard`."""
        store = self.run.ctx.store
        self.written.append(key)
        try:
            return store.put_dir(key, path) if path.is_dir() else store.put_file(key, path)
        except OSError as e:  # a full or read-only artifact folder: say which, and why
            raise Ending(JobState.FAILED, write_error(store, key, e)) from e

    def write(self) -> None:
        run, job = self.run, self.run.job
        with timed(run, "write"):
            self.result.model.save(self.scratch / "out-model")
            self.result.new_state.save(
                self.scratch / "out-state.safetensors", dtype=self.request.state_torch_dtype
            )
            if self.tower is not None:  # tuned here, or the parent's carried forward
                from kronlink.retrieval.tower import TOWER_DIR

                self.tower.save(self.scratch / "out-model" / TOWER_DIR)
            if self.tower_update is not None:
                self.tower_update.state.save(
                    self.scratch / "out-tower-state.safetensors",
                    dtype=self.request.state_torch_dtype,
                )
            self.model_art = self.put(
                f"versions/{job.lineage}/{self.attempt}", self.scratch / "out-model"
            )
            self.state_art = self.put(
                f"states/{job.lineage}/{self.attempt}/{run.spec.task_name}",
                self.scratch / "out-state.safetensors",
            )
            if self.tower_update is not None:
                self.tower_state_art = self.put(
                    f"states/{job.lineage}/{self.attempt}/{run.spec.task_name}.retriever",
                    self.scratch / "out-tower-state.safetensors",
                )
            if self.new_ontology:  # kept for the service's candidate generation
                # The ontology outlives the job's data: it is stored without any
                # string the task uses as a query (an upload may list its
                # mentions as synonyms too), never as uploaded.
                # In fused mode the dense index is built now, at registration,
                # and stored beside the concepts (it records its encoder).
                concepts = without_query_strings(self.task.concepts, self.task.queries)
                path = self.scratch / "ontology"
                path.mkdir(exist_ok=True)
                write_ontology(path / ONTOLOGY_FILE, concepts)
                if run.ctx.settings.retriever_mode == "fused":
                    from kronlink.retrieval import retriever_for

                    if self.retriever is None or self.retriever.dense is None:
                        self.retriever = retriever_for(concepts, run.ctx.settings)
                    self.retriever.dense.save(path)
                else:  # a single file, as before: nothing else to keep
                    path = path / ONTOLOGY_FILE
                self.onto_art = self.put(f"ontologies/{self.ontology_name}/{self.attempt}", path)
            self.write_extra_artifacts()

    def write_extra_artifacts(self) -> None:
        """Further artifacts of the new version (none yet): build each under
        ``self.scratch``, store it with ``self.extra[name] = self.put(key, path)``
        and record it in :meth:`commit`."""

    def discard(self) -> None:
        """Remove every artifact this attempt wrote (it will not commit them)."""
        discard(self.run.ctx.store, self.written)

    # -- commit ------------------------------------------------------------------
    def by_ontology(self, summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The parent's per-ontology records with this task's ontology's
        replaced by what this job fitted. A parent from before these records
        gives its own task's ontology its calibration and retrieval prior."""
        out: dict[str, dict[str, Any]] = {}
        if self.parent is not None:
            pm = self.parent.metrics or {}
            if isinstance(pm.get("by_ontology"), dict):
                for name, rec in pm["by_ontology"].items():
                    fitted = rec.get("fitted_by_version") or self.parent.number
                    out[name] = {**rec, "fitted_by_version": fitted}
            elif self.parent_ontology is not None:
                out[self.parent_ontology] = {
                    "calibration": pm.get("calibration"),
                    "retrieval_prior": pm.get("retrieval_prior"),
                    "fitted_by_version": self.parent.number,
                }
        out[self.ontology_name] = {
            "calibration": summary.get("calibration"),
            "retrieval_prior": summary.get("retrieval_prior"),
            "fitted_by_version": None,  # this version: its number is given at commit
        }
        return out

    def metrics(self) -> dict[str, Any]:
        """What the version records of how it did: counts and scores, no data."""
        summary = self.result.summary()
        return {
            "test": summary["test"],
            "dev": summary["dev"],
            "gate_passed": self.result.gate_passed,
            "quality_gate": self.run.spec.quality_gate,
            # Ω's calibration is per ranker kind (kronlink.omega_scale).
            "ranker": self.model.kind,
            "predicted_forgetting": dict(
                zip(self.prior_names, self.result.predicted_forgetting, strict=False)
            ),
            "selection": summary["selection"],
            "timings": summary["timings"],
            # the ontology this version's task links to (its own calibration
            # and retrieval prior are fitted there)
            "ontology": self.ontology_name,
            # per ontology the calibration and retrieval prior its answers get:
            # this task's, and each earlier ontology's carried from the version
            # that fitted it (its data is gone, so it cannot be fitted again)
            "by_ontology": self.by_ontology(summary),
            # P(top-1 right), fitted on dev; the service reads it from here
            "calibration": summary.get("calibration"),
            # beta * -log(1 + retriever rank), fitted on dev; the service reads it
            # from here too. Its info holds the retriever's dev/test top-1.
            "retrieval_prior": summary.get("retrieval_prior"),
            # the same model without the retrieval prior / without any prior
            "ablations": summary.get("ablations") or {},
            "retriever_mode": self.run.ctx.settings.retriever_mode,
            # the query tower: tuned by this job (its summary), carried from
            # the parent unchanged, or none (the shipped encoder serves)
            "retriever": (
                {
                    **self.tower_update.summary(),
                    "predicted_forgetting": dict(
                        zip(
                            self.tower_prior_names,
                            self.tower_update.predicted_forgetting,
                            strict=True,
                        )
                    ),
                }
                if self.tower_update is not None
                else {"tuned": False, "carried": self.tower is not None}
            ),
        }

    def commit(self, s: Session) -> Ending | None:
        """In the commit transaction: the version, its task states, activation if
        the gate passed. Returns the job's ending when it is not a success."""
        run, job = self.run, self.run.job
        parent_id = self.parent.id if self.parent is not None else None
        now_active = active_version(s, job.lineage)
        if (now_active.id if now_active else None) != parent_id:
            raise Ending(
                JobState.FAILED,
                f"the active version of {job.lineage!r} changed while the job ran "
                f"(anchored on {parent_id}, now {now_active.id if now_active else None}); resubmit",
            )
        task_id = self._task_id(s)
        v = create_version(
            s,
            lineage=job.lineage,
            method=self.method,
            artifact=self.model_art,
            parent_id=parent_id,
            task_id=task_id,
            lambdas=dict(zip(self.prior_names, self.result.lambdas, strict=False)),
            metrics=self.metrics(),
            job_id=job.id,
            actor=run.ctx.owner,
        )
        for r in self.prior_rows:
            add_task_state(s, v.id, r.task_id, r.artifact, tower=r.tower)
        add_task_state(s, v.id, task_id, self.state_art, tower=self.tower_state_art)
        if self.result.gate_passed:
            activate_version(s, v.id, actor=run.ctx.owner, reason=f"job {job.id}")
            run.activated = v.id
            return None
        error = f"quality gate failed: {self.result.gate_message}"
        mark_version_failed(s, v.id, error=error, actor=run.ctx.owner)
        return Ending(JobState.FAILED, f"{error}; version {v.number} kept as failed")

    def _task_id(self, s: Session) -> int:
        spec, task = self.run.spec, self.task
        try:
            return get_task(s, spec.task_name).id
        except NotFoundError:
            pass
        sizes = {
            "concepts": len(task.concepts),
            **{sp: len(task.split(sp)) for sp in ("train", "dev", "test")},
        }
        try:
            onto = get_ontology(s, self.ontology_name)
        except NotFoundError:
            onto = create_ontology(
                s,
                self.ontology_name,
                concept_count=sizes["concepts"],
                source="upload",
                artifact=self.onto_art,
            )
        return create_task(s, spec.task_name, ontology_id=onto.id, sizes=sizes).id
