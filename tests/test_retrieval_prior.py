"""The retrieval prior (kronlink/retrieval_prior.py, issue 12 item 3: the ranker
is never worse than its retriever).

The fit is checked against a brute force written apart from it on random
inputs; the scores against a hand sum on a ranker whose scores are known;
serving against evaluation; and the update job on a real ICD-10-CM task, where
the served test top-1 must reach the retriever's while the same version
without the prior falls below it."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
import torch
from test_ranking import TableRanker

from kronlink.data.schema import Candidate, Concept, Query
from kronlink.evaluation import evaluate, score_queries
from kronlink.ranking import rank_scores
from kronlink.retrieval_prior import (
    BETA_GRID,
    RetrievalPrior,
    fit_retrieval_prior,
    retrieval_ranks,
    sign_test_p,
)


def _brute(scores, ranks, gold, beta):
    """(right, mean NLL of the gold where present), one query at a time."""
    right, nll, n_gold = 0, 0.0, 0
    for s, r, g in zip(scores, ranks, gold, strict=True):
        if g < 0:
            continue
        total = [x - beta * math.log(1 + k) if beta else x for x, k in zip(s, r, strict=True)]
        if all(total[g] > t for j, t in enumerate(total) if j != g):
            right += 1
        top = max(total)
        nll += top + math.log(sum(math.exp(t - top) for t in total)) - total[g]
        n_gold += 1
    return right, nll / max(n_gold, 1)


def _brute_each(scores, ranks, gold, beta):
    """Per query: is its gold strictly first."""
    out = []
    for s, r, g in zip(scores, ranks, gold, strict=True):
        total = [x - beta * math.log(1 + k) if beta else x for x, k in zip(s, r, strict=True)]
        out.append(g >= 0 and all(total[g] > t for j, t in enumerate(total) if j != g))
    return out


def _random_case(rng: random.Random):
    n = rng.randint(1, 40)
    scores, ranks, gold = [], [], []
    for _ in range(n):
        width = rng.randint(1, 12)
        scores.append([rng.gauss(0, rng.choice((0.1, 1.0, 5.0))) for _ in range(width)])
        rk = list(range(width))
        rng.shuffle(rk)
        if width > 2 and rng.random() < 0.3:  # candidates the retriever did not return
            for j in rng.sample(range(width), 2):
                rk[j] = width
        ranks.append(rk)
        gold.append(rng.randrange(-1, width))
    return scores, ranks, gold


def test_fit_is_the_brute_force_argmax_and_never_below_model_or_retriever() -> None:
    rng = random.Random(0)
    kept = 0
    for trial in range(120):
        scores, ranks, gold = _random_case(rng)
        # a loose level half the time, so both branches of the guard are met
        alpha = 0.05 if trial % 2 else 0.5
        prior = fit_retrieval_prior(scores, ranks, gold, alpha=alpha)
        n = len(scores)
        betas = [row["beta"] for row in prior.info["grid"]]
        assert betas[0] == 0.0 and set(BETA_GRID) <= set(betas)
        brute = {b: _brute(scores, ranks, gold, b) for b in betas}
        per = {b: _brute_each(scores, ranks, gold, b) for b in betas}
        kept += prior.info["sign_test"]["kept_best"] and prior.beta not in (0.0, betas[-1])
        for row in prior.info["grid"]:
            right, nll = brute[row["beta"]]
            assert row["dev_top1"] == right / n
            assert row["dev_nll"] == pytest.approx(nll, rel=1e-9, abs=1e-9)
        best = min(betas, key=lambda b: (-brute[b][0], brute[b][1], b))
        assert prior.info["best_beta"] == best, trial
        # the guard: the best against the better of model alone and retriever order
        base = betas[-1] if brute[betas[-1]][0] >= brute[0.0][0] else 0.0
        w = sum(a and not b for a, b in zip(per[best], per[base], strict=True))
        lo = sum(b and not a for a, b in zip(per[best], per[base], strict=True))
        p = sum(math.comb(w + lo, k) for k in range(w, w + lo + 1)) / 2 ** (w + lo)
        want = best if best == base or p <= alpha else base
        assert prior.beta == want, (trial, w, lo, p)
        assert prior.info["sign_test"]["kept_best"] == (want == best)
        model = brute[0.0][0]
        retriever = sum(
            1 for r, g in zip(ranks, gold, strict=True) if g >= 0 and r[g] == 0 and r.count(0) == 1
        )
        assert prior.info["dev_top1_retriever"] == retriever / n
        assert brute[want][0] >= max(model, retriever), (trial, brute, retriever)
        assert prior.info["dev_top1"] == brute[want][0] / n
        # the largest beta reproduces the retriever's order on every query
        big = prior.info["order_beta"]
        for s, r in zip(scores, ranks, strict=True):
            if r.count(0) == 1:
                total = [x - big * math.log(1 + k) for x, k in zip(s, r, strict=True)]
                assert r[total.index(max(total))] == 0
    assert kept >= 5  # the guard does not always fall back


def test_sign_test_matches_the_binomial_tail() -> None:
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(3, 0) == 0.125
    assert sign_test_p(6, 1) == pytest.approx(8 / 128)
    assert sign_test_p(9, 2) == pytest.approx(sum(math.comb(11, k) for k in (9, 10, 11)) / 2048)


def test_the_fit_prefers_the_lower_nll_among_equal_top1_and_needs_dev_queries() -> None:
    # Gold first for the model and the retriever: every beta gets 2/2, and the
    # NLL falls as beta grows until the order-reproducing value (it only sharpens).
    scores, ranks, gold = [[1.0, 0.0], [2.0, 0.0]], [[0, 1], [0, 1]], [0, 0]
    prior = fit_retrieval_prior(scores, ranks, gold)
    assert prior.info["dev_top1"] == 1.0
    assert prior.beta == max(row["beta"] for row in prior.info["grid"])
    with pytest.raises(ValueError, match="at least one dev query"):
        fit_retrieval_prior([], [], [])
    with pytest.raises(ValueError, match="2 scores but 1 ranks"):
        fit_retrieval_prior([[1.0, 0.0]], [[0]], [0])


def test_record_round_trips_and_refuses_bad_values() -> None:
    p = RetrievalPrior(0.5, info={"n_dev": 3})
    assert RetrievalPrior.from_dict(p.as_dict()) == p
    for bad in ({"beta": -1.0}, {"beta": float("inf")}, {"beta": 1.0, "kind": "table"}, {}):
        with pytest.raises(ValueError):
            RetrievalPrior.from_dict(bad)


NAMES = {"a": 0.0, "b": 1.0, "c": 0.5, "d": 2.0}


def _query(names: str, gold: str, mention: str = "x") -> Query:
    return Query(mention, gold, "", "", tuple(Candidate(n, n) for n in names))


def test_rank_scores_adds_beta_times_minus_log_one_plus_rank_where_ranks_are_given() -> None:
    model = TableRanker(NAMES)
    queries = [_query("abcd", "a"), _query("dcb", "b"), _query("ab", "a")]
    ranks = [[0, 1, 2, 3], None, [1, 0]]  # None: the caller's own candidates
    prior = RetrievalPrior(2.0)
    with torch.no_grad():
        plain, _ = rank_scores(model, queries, exact_margin=0.0)
        got, batch = rank_scores(
            model, queries, exact_margin=0.0, retrieval_prior=prior, retrieval_ranks=ranks
        )
    for i, q in enumerate(queries):
        for j, c in enumerate(q.candidates):
            want = NAMES[c.name] - (2.0 * math.log(1 + ranks[i][j]) if ranks[i] else 0.0)
            assert float(got[i, j]) == pytest.approx(want, abs=1e-6)
    # padding positions are left alone
    assert torch.equal(got[~batch.candidate_mask], plain[~batch.candidate_mask])
    with pytest.raises(ValueError, match="one row per query"):
        rank_scores(model, queries, exact_margin=0.0, retrieval_prior=prior, retrieval_ranks=[])
    # evaluation ranks with the same sum: "a" (0.0) is first only with the prior
    assert evaluate(model, queries[:1]).accuracy == 0.0
    assert evaluate(model, queries[:1], retrieval_prior=prior, retrieval_ranks=ranks[:1]).n == 1
    served = evaluate(
        model, queries[:1], retrieval_prior=RetrievalPrior(4.0), retrieval_ranks=ranks[:1]
    )
    assert served.accuracy == 1.0
    rows = score_queries(model, queries, retrieval_prior=prior, retrieval_ranks=ranks)
    assert [s for _, s, _ in rows[0]] == pytest.approx(got[0].tolist(), abs=1e-6)


def test_retrieval_ranks_recover_the_retrievers_order_from_shuffled_candidates() -> None:
    from kronlink.data.candidates import CandidateIndex, attach_candidates

    concepts = [Concept(f"C{i}", f"{w} disease") for i, w in enumerate("abcdefghij")]
    concepts += [Concept("X", "disease of the heart"), Concept("Y", "heart failure")]
    index = CandidateIndex(concepts)
    by_id = {c.id: c for c in concepts}
    queries = [Query("heart disease", "X"), Query("f disease", "C5")]
    attached = attach_candidates(queries, index, by_id, 5, insert_gold=False, seed=3)
    ranks = retrieval_ranks(attached, index)
    for q, rk in zip(attached, ranks, strict=True):
        by_rank = [c.id for _, c in sorted(zip(rk, q.candidates, strict=True))]
        assert by_rank == [cid for cid, _ in index.search([q.mention], 5)[0]]
    # a candidate the retriever does not return ranks after all it does
    top = index.search(["heart disease"], 2)[0]
    own = Query(
        "heart disease",
        "X",
        candidates=(Candidate("NOPE", "nothing"), *(Candidate(i, by_id[i].name) for i, _ in top)),
    )
    assert retrieval_ranks([own], index)[0] == [3, 0, 1]


def test_serving_applies_the_versions_prior_to_generated_candidates_only() -> None:
    from kronlink.registry.records import OntologyInfo
    from kronlink.retrieval import Retriever
    from service.batching import LinkItem, rank_items
    from service.holder import LoadedModel, retrieval_prior_of
    from service.ontologies import OntologyIndex

    concepts = [Concept("1", "heart failure"), Concept("2", "kidney failure")]
    info = OntologyInfo(1, "toy", None, len(concepts), datetime.now(UTC))
    index = OntologyIndex(info, Retriever(concepts), {c.id: c for c in concepts})
    table = {"heart failure": 0.0, "kidney failure": 1.0}  # the model prefers "kidney"

    def version(metrics):  # the fields retrieval_prior_of reads
        return SimpleNamespace(number=1, id=1, metrics=metrics)

    prior = retrieval_prior_of(version({"retrieval_prior": RetrievalPrior(2.0).as_dict()}))
    assert prior == RetrievalPrior(2.0)
    # unreadable: logged, served without one
    assert retrieval_prior_of(version({"retrieval_prior": {"beta": -3}})) is None
    assert retrieval_prior_of(version({})) is None
    model = LoadedModel(version=None, ranker=TableRanker(table), retrieval_prior=prior)  # type: ignore[arg-type]
    assert [c.id for c in index.candidates(["heart failure"], 2)[0]] == ["1", "2"]
    given = tuple(Candidate(c.id, c.name) for c in concepts)
    items = [
        LinkItem("heart failure", index=index, k=2),
        LinkItem("heart failure", candidates=given),
    ]
    served = rank_items(model, items, 8)
    # generated: retriever first (rank 0) gets 0, rank 1 gets -2 log 2: 0 > 1 - 1.386
    assert served[0][0]["id"] == "1"
    assert served[0][1]["score"] == pytest.approx(1.0 - 2.0 * math.log(2), abs=1e-6)
    # given: the caller's order is no retriever's; the model alone decides
    assert served[1][0]["id"] == "2" and served[1][0]["score"] == pytest.approx(1.0)
    bare = LoadedModel(version=None, ranker=TableRanker(table))  # type: ignore[arg-type]
    assert rank_items(bare, items[:1], 8)[0][0]["id"] == "2"


# A real task at CI size: ICD-10-CM's first 1,200 inclusion terms (126 dev,
# 116 test queries, BM25 candidates, k = 10), 300 train queries, the tiny
# character CNN. Its model alone stays below BM25, as the demo's version 1 did.
LIMIT, N_TRAIN = 1200, 300


def test_update_job_serves_at_least_the_retrievers_test_top1_on_icd10cm() -> None:
    from dataclasses import replace

    from kronlink.data.builders import build_task
    from kronlink.data.candidates import CandidateIndex
    from kronlink.models import build_ranker
    from kronlink.training import TrainConfig
    from kronlink.update import UpdateRequest, run_update

    task = build_task("icd10cm", seed=0, k=10, limit=LIMIT)
    train = task.split("train")[:N_TRAIN]
    task = replace(task, queries=(*train, *task.split("dev"), *task.split("test")))
    # the builders' own index: the one that made (and shuffled) the candidates
    retriever = CandidateIndex(task.concepts)
    torch.manual_seed(0)
    model = build_ranker(
        "cnn", tokenizer=None, embedding_dim=32, channels=32, hidden_size=32, dropout=0.0
    )
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-2, head_lr=None, seed=0)
    # the worker's gate compares with the retriever's dev top-1 over the whole ontology
    dev = task.split("dev")
    hits = retriever.search([q.mention for q in dev], 1)
    floor = sum(h[0][0] == q.gold for h, q in zip(hits, dev, strict=True)) / len(dev)
    request = UpdateRequest(
        method="none",
        lambdas=0.0,
        kinds=("diag",),
        curvature_batch_size=64,
        train=cfg,
        exact_margin=5.0,
        retriever_dev_top1=floor,
    )
    res = run_update(model, [], task, request, retriever=retriever)
    info = res.retrieval_prior["info"]
    alone = res.ablations["model_alone"]
    numbers = {
        "beta": res.retrieval_prior["beta"],
        "retriever": (info["dev_top1_retriever"], info["test_top1_retriever"]),
        "model alone": (alone["dev"]["accuracy"], alone["test"]["accuracy"]),
        "served": (res.dev.accuracy, res.test.accuracy),
    }
    print("(dev, test) top-1:", numbers)
    assert info["dev_top1_retriever"] == pytest.approx(floor)
    # by construction on dev, measured on test (no slack)
    assert res.dev.accuracy >= max(info["dev_top1_retriever"], alone["dev"]["accuracy"])
    assert res.test.accuracy >= info["test_top1_retriever"], numbers
    # the same version with the prior zeroed ranks below its retriever
    assert alone["test"]["accuracy"] < info["test_top1_retriever"], numbers
    assert res.gate_passed and res.gate_message == ""
    # the model-alone dev numbers reuse the margin scaling's pass: the same as a fresh one
    from kronlink.evaluation import evaluate

    assert alone["dev"] == evaluate(model, dev, batch_size=request.eval_batch_size).as_dict()
    # the margin (5 calibrated nats) was put in score units by the model's own
    # dev temperature, recorded where serving reads it back (Calibrator.score_scale)
    from kronlink.calibration import Calibrator, fit_calibrator, fit_temperature

    assert res.calibration is not None
    own = score_queries(res.model, dev)
    own_right = [max(c, key=lambda x: x[1])[0] == q.gold for q, c in zip(dev, own, strict=True)]
    scale = fit_temperature([[s for _, s, _ in c] for c in own], own_right)
    assert scale != pytest.approx(1.0, abs=0.05)  # the check below could not tell otherwise
    assert res.calibration["info"]["exact_margin_scale"] == pytest.approx(scale, rel=1e-9)
    assert Calibrator.from_dict(res.calibration).score_scale() == pytest.approx(scale, rel=1e-9)
    # the calibrator was fitted on the served score, at that margin
    rows = score_queries(
        res.model,
        dev,
        exact_margin=5.0 * scale,
        retrieval_prior=RetrievalPrior.from_dict(res.retrieval_prior),
        retrieval_ranks=retrieval_ranks(dev, retriever),
    )
    right = [max(c, key=lambda x: x[1])[0] == q.gold for q, c in zip(dev, rows, strict=True)]
    assert sum(right) / len(dev) == pytest.approx(res.dev.accuracy)
    again = fit_calibrator([[s for _, s, _ in c] for c in rows], right)
    for k, v in again.params.items():
        assert res.calibration["params"][k] == pytest.approx(v, rel=1e-6)
    # (without a retriever the job fits no prior and the gate says what to do:
    # tests/worker/test_job.py::test_gate_refuses_a_version_below_its_retrievers_dev_top1)


def test_the_demo_prints_the_top1_table_from_a_versions_metrics() -> None:
    from kronlink.cli._demo_steps import top1_table

    metrics = {
        "dev": {"accuracy": 0.2},
        "test": {"accuracy": 0.25},
        "ablations": {"model_alone": {"dev": {"accuracy": 0.1}, "test": {"accuracy": 0.125}}},
        "retrieval_prior": {
            "beta": 2.0,
            "info": {"dev_top1_retriever": 0.15, "test_top1_retriever": 0.175},
        },
        "retriever_mode": "bm25",
    }
    lines = top1_table(metrics)
    assert [line.split()[-2:] for line in lines[1:5]] == [
        ["0.150", "0.175"],
        ["0.150", "0.175"],
        ["0.100", "0.125"],
        ["0.200", "0.250"],
    ]
    assert "model + priors (served)" in lines[4] and "beta 2" in lines[5]
    assert top1_table({"test": {"accuracy": 0.3}}) == []  # fitted without the prior


def test_serving_never_lists_a_candidate_the_retriever_had_no_evidence_for() -> None:
    """BM25's filler (concepts sharing no word with the mention) is scored,
    so the softmax sees k candidates as on dev, but never served; when the
    model's top is filler, or nothing was found, the answer is no-match."""
    from kronlink.registry.records import OntologyInfo
    from kronlink.retrieval import Retriever
    from service.batching import LinkItem, rank_items
    from service.holder import LoadedModel
    from service.ontologies import OntologyIndex

    names = ["heart failure", "kidney failure", "cholera", "asthma"]
    concepts = [Concept(str(i), n) for i, n in enumerate(names)]
    info = OntologyInfo(1, "toy", None, len(concepts), datetime.now(UTC))
    index = OntologyIndex(info, Retriever(concepts), {c.id: c for c in concepts})
    _, evidence = index.retrieve(["heart failure"], 4)[0]
    assert evidence == (True, True, False, False)
    for table, unfounded in (
        ({"heart failure": 2.0, "kidney failure": 1.0, "cholera": 0.0, "asthma": 0.0}, False),
        ({"heart failure": 0.0, "kidney failure": 1.0, "cholera": 3.0, "asthma": 0.0}, True),
    ):
        model = LoadedModel(version=None, ranker=TableRanker(table))  # type: ignore[arg-type]
        found, nothing = rank_items(
            model,
            [LinkItem("heart failure", index=index, k=4), LinkItem("zzz", index=index, k=4)],
            8,
        )
        best = max(("heart failure", "kidney failure"), key=table.__getitem__)
        assert [r["name"] for r in found] == [best, ({*names[:2]} - {best}).pop()]
        # probabilities are over all four scored candidates, filler included
        assert sum(r["probability"] for r in found) < 1 - 1e-3
        assert found.no_match is unfounded
        assert list(nothing) == [] and nothing.no_match is True
