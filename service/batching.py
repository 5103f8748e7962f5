"""Dynamic batching: queries of concurrent requests share one model call.

Each request puts its queries on the lineage's queue and awaits a future. One
loop per lineage takes what is queued (up to ``max_size`` queries), runs
candidate generation, encoding and the forward pass in the model thread (one
thread for all lineages: the event loop never computes), and resolves each
request's future with its results and the version that produced them.

Waiting: while a batch runs, new requests queue up and form the next batch
on their own. Beyond that the loop waits up to ``max_wait_s`` for more
queries only when the last batch held several requests (clients are
concurrent); after a lone request it runs the next one at once, so an idle
service adds no delay (LESSONS.md: a wait for a batch that never fills is
the common batching mistake).

Admission: a request is refused at once (429 with Retry-After) when the
queue holds ``queue_max`` queries, or when the queries already waiting would
take more than ``queue_max_s`` to clear at the model's measured rate (a
moving average of seconds per query over recent model calls). The second
bound is what keeps latency bounded under overload: without it a slow model
(the transformer on a CPU) let 64 clients queue seconds of work, and every
request's latency grew with the number of clients. A lone request is always
queued, so a model slower than the bound still answers one at a time.

The model reference is taken once per batch: a swap during a batch changes
the next batch, not this one. A batch that raises is re-run request by
request, so one bad request cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from kronlink.data.schema import Candidate, Query
from kronlink.registry import VersionInfo
from service.holder import LoadedModel, ModelHolder
from service.metrics import Metrics
from service.ontologies import OntologyIndex
from service.problems import ProblemError

__all__ = ["Answer", "LinkItem", "MicroBatcher", "rank_items"]

log = logging.getLogger(__name__)


class Answer(list[dict[str, Any]]):
    """One query's ranked candidates, best first, plus the no-match decision.

    A list, so that every path that serialises ``results`` as a list (the
    routes, service/fastlink.py) keeps working; ``confidence`` and
    ``no_match`` ride along as attributes for the paths that report them.

    ``confidence``: the version's calibrated probability that the top answer
    is right (kronlink.calibration), None when the version has no calibration.
    ``no_match``: ``confidence`` is below the ``no_match_below`` setting, or
    the model's top candidate is one the retriever had no evidence for (a
    generated concept sharing no word with the mention), which is then not
    listed; with no evidence for any candidate the results are empty.
    """

    confidence: float | None = None
    no_match: bool = False

    def fields(self) -> dict[str, Any]:
        """The answer's JSON members: results, confidence, no_match."""
        return {"results": self, "confidence": self.confidence, "no_match": self.no_match}


Ranked = Answer


@dataclass(frozen=True)
class LinkItem:
    """One query to rank: given candidates, or an index to generate them from."""

    mention: str
    left_context: str = ""
    right_context: str = ""
    candidates: tuple[Candidate, ...] | None = None
    index: OntologyIndex | None = None
    k: int = 10  # candidates to generate
    top_k: int | None = None  # results to return; None: all


@dataclass
class _Work:
    items: Sequence[LinkItem]
    future: asyncio.Future[tuple[VersionInfo, list[Ranked]]]
    enqueued: float = field(default_factory=time.perf_counter)


def rank_items(
    model: LoadedModel,
    items: Sequence[LinkItem],
    max_size: int,
    exact_margin: float = 0.0,
    no_match_below: float = 0.0,
) -> list[Ranked]:
    """Generate missing candidates, score in chunks of ``max_size``, rank.

    Runs in the model thread. Ties keep the candidates' input order.
    ``exact_margin``: the exact-name prior (kronlink.ranking); a generated
    candidate also counts as exact when the retriever matched a stored synonym.
    Generated candidates arrive in the retriever's order, so the version's
    retrieval prior (kronlink.retrieval_prior) for their ontology applies to
    them; a caller's own candidates get none (their order is the caller's,
    not a retriever's). The confidence is the calibration of the answer's
    ontology (``LoadedModel.calibrator_for``: fitted on that ontology's task,
    carried from the version that learned it).
    ``no_match_below``: an answer whose calibrated confidence (over all its
    candidates, before ``top_k``) is below it is marked ``no_match``; 0 never.
    The decision is made here, where scores become answers, so every path
    that ranks through this function answers alike.
    """
    cands: list[tuple[Candidate, ...] | None] = [it.candidates for it in items]
    exact_ids: list[frozenset[str] | None] = [None] * len(items)
    ranks: list[list[int] | None] = [None] * len(items)
    # per generated candidate: did the retriever find evidence for it (None: given)
    evidence: list[tuple[bool, ...] | None] = [None] * len(items)
    by_index: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        if it.candidates is None and it.index is not None:
            by_index.setdefault(id(it.index), []).append(i)
    for positions in by_index.values():
        first = items[positions[0]]
        assert first.index is not None
        k = max(items[i].k for i in positions)
        found = first.index.retrieve(
            [items[i].mention for i in positions], k, encoder=model.query_encoder
        )
        for i, (c, ev) in zip(positions, found, strict=True):
            cands[i] = c[: items[i].k]
            evidence[i] = ev[: items[i].k]
            exact_ids[i] = first.index.exact_ids(items[i].mention)
            ranks[i] = list(range(len(cands[i] or ())))  # best first
    queries = [
        Query(
            mention=it.mention,
            gold=None,
            left_context=it.left_context,
            right_context=it.right_context,
            candidates=c,
        )
        for it, c in zip(items, cands, strict=True)
    ]
    # Each ontology's queries are scored with its own retrieval prior (a
    # caller's own candidates get none: their ranks are None), so a batch
    # mixing ontologies takes one model call per ontology.
    onto = [
        it.index.info.name if it.index is not None and it.candidates is None else None
        for it in items
    ]
    scored: list[tuple[list[float], list[float]] | None] = [None] * len(queries)
    for name in dict.fromkeys(onto):
        group = [i for i, o in enumerate(onto) if o == name]
        for start in range(0, len(group), max_size):
            chunk = group[start : start + max_size]
            for i, row in zip(
                chunk,
                model.score(
                    [queries[i] for i in chunk],
                    exact_margin=exact_margin,
                    exact_ids=[exact_ids[i] for i in chunk],
                    retrieval_ranks=[ranks[i] for i in chunk],
                    ontology=name,
                ),
                strict=True,
            ):
                scored[i] = row
    out: list[Ranked] = []
    for i, (it, q, row) in enumerate(zip(items, queries, scored, strict=True)):
        assert row is not None
        scores, probs = row
        cal = model.calibrator_for(onto[i])
        order = sorted(range(len(scores)), key=lambda j: -scores[j])
        # the calibration is of the model's top over all k candidates, as on dev
        confidence = cal.top_probability(scores) if cal is not None else None
        ev = evidence[i]
        unfounded = ev is not None and bool(order) and not ev[order[0]]
        if ev is not None:
            order = [j for j in order if ev[j]]
        if it.top_k is not None:
            order = order[: it.top_k]
        cs = q.candidates or ()
        answer = Answer(
            {
                "id": cs[j].id,
                "name": cs[j].name,
                "score": scores[j],
                "probability": probs[j],
                "rank": r,
            }
            for r, j in enumerate(order, start=1)
        )
        answer.confidence = confidence
        answer.no_match = unfounded or (confidence is not None and confidence < no_match_below)
        out.append(answer)
    return out


class MicroBatcher:
    """The queue and batching loop of one lineage (see the module docstring)."""

    def __init__(
        self,
        holder: ModelHolder,
        executor: Executor,
        metrics: Metrics,
        *,
        max_size: int,
        max_wait_s: float,
        queue_max: int,
        queue_max_s: float = float("inf"),
        exact_margin: float = 0.0,
        no_match_below: float = 0.0,
    ) -> None:
        self.holder = holder
        self._exact_margin = exact_margin  # kronlink.ranking's exact-name prior
        self._no_match_below = no_match_below  # kronlink.calibration; 0: never
        self._executor = executor
        self._metrics = metrics
        self._max_size = max_size
        self._max_wait_s = max_wait_s
        self._queue_max = queue_max
        self._queue_max_s = queue_max_s
        self._per_query_s: float | None = None  # moving average over model calls
        self._works: deque[_Work] = deque()
        self._arrived = asyncio.Event()
        self._waiting = 0  # queries queued, not yet taken into a batch
        self._concurrent = False  # the last batch held several requests
        self._task: asyncio.Task[None] | None = None
        self._label = holder.lineage

    # -- the request side ----------------------------------------------------
    async def submit(self, items: Sequence[LinkItem]) -> tuple[VersionInfo, list[Ranked]]:
        if self._task is None or self._task.done():
            raise ProblemError(503, "unavailable", "the service is shutting down")
        if self.holder.current is None:
            raise ProblemError(
                503,
                "no-model",
                f"lineage {self.holder.lineage!r} has no model loaded yet: no version is "
                "active (submit a job: POST /v1/jobs) or it is loading (GET /readyz)",
                headers={"Retry-After": "5"},
            )
        if self._waiting + len(items) > self._queue_max:
            self._metrics.rejected.labels(self._label).inc(len(items))
            raise ProblemError(
                429,
                "too-many-requests",
                f"{self._waiting} queries are waiting (limit {self._queue_max}); retry shortly",
                headers={"Retry-After": "1"},
            )
        wait_s = self.expected_wait_s(len(items))
        if self._waiting and wait_s > self._queue_max_s:
            self._metrics.rejected.labels(self._label).inc(len(items))
            raise ProblemError(
                429,
                "too-many-requests",
                f"{self._waiting} queries are waiting, about {wait_s * 1000:.0f} ms of model "
                f"time (limit {self._queue_max_s * 1000:.0f} ms); retry after Retry-After",
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            )
        work = _Work(items, asyncio.get_running_loop().create_future())
        self._works.append(work)
        self._waiting += len(items)
        self._metrics.queue_depth.labels(self._label).set(self._waiting)
        self._arrived.set()
        return await work.future

    def expected_wait_s(self, extra: int = 0) -> float:
        """Model time the waiting queries (and ``extra`` more) need, at the measured rate."""
        if self._per_query_s is None:
            return 0.0  # no model call measured yet: only the count bound applies
        return (self._waiting + extra) * self._per_query_s

    # -- the loop ------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"batcher-{self._label}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._works:
            w = self._works.popleft()
            if not w.future.done():
                w.future.set_exception(
                    ProblemError(503, "unavailable", "the service is shutting down")
                )

    async def _wait_for_work(self, timeout: float | None) -> bool:
        while not self._works:
            self._arrived.clear()
            if timeout is None:
                await self._arrived.wait()
                continue
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                return bool(self._works)
        return True

    def _take(self, batch: list[_Work], n: int) -> int:
        """Move queued works into ``batch`` while they fit; returns the query count."""
        while self._works:
            nxt = self._works[0]
            if n and n + len(nxt.items) > self._max_size:
                break  # the next batch starts with it
            self._works.popleft()
            self._waiting -= len(nxt.items)
            if nxt.future.done():  # its client went away
                continue
            batch.append(nxt)
            n += len(nxt.items)
        return n

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_work(None)
            batch: list[_Work] = []
            n = self._take(batch, 0)
            if self._concurrent and self._max_wait_s > 0:
                deadline = loop.time() + self._max_wait_s
                while n < self._max_size and not self._works:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or not await self._wait_for_work(remaining):
                        break
                    n = self._take(batch, n)
            self._metrics.queue_depth.labels(self._label).set(self._waiting)
            if not batch:
                continue
            self._concurrent = len(batch) > 1
            await self._run(loop, batch, n)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Work], n: int) -> None:
        model = self.holder.current  # taken once: a swap affects the next batch
        if model is None:
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(
                        ProblemError(503, "no-model", "no model is loaded for this lineage")
                    )
            return
        items = [it for w in batch for it in w.items]
        t0 = time.perf_counter()
        try:
            ranked = await loop.run_in_executor(
                self._executor,
                rank_items,
                model,
                items,
                self._max_size,
                self._exact_margin,
                self._no_match_below,
            )
        except Exception:
            if len(batch) == 1:
                log.exception("model call failed for one request of %d queries", n)
                if not batch[0].future.done():
                    batch[0].future.set_exception(
                        ProblemError(
                            500, "internal-error", "the model failed on this request; logged"
                        )
                    )
                return
            log.warning("batch of %d requests failed; re-running them one by one", len(batch))
            for w in batch:
                await self._run(loop, [w], len(w.items))
            return
        seconds = time.perf_counter() - t0
        self._metrics.batch_size.labels(self._label).observe(n)
        self._metrics.batch_seconds.labels(self._label).observe(seconds)
        per_query = seconds / max(n, 1)
        prev = self._per_query_s
        # a moving average: one slow call (a swap's first batch) does not close the door
        self._per_query_s = per_query if prev is None else 0.7 * prev + 0.3 * per_query
        start = 0
        for w in batch:
            part = ranked[start : start + len(w.items)]
            start += len(w.items)
            if not w.future.done():
                w.future.set_result((model.version, part))
