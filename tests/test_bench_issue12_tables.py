"""docs/benchmarks.md's issue 12 speed tables are what their stored records
re-print (bench/link_table.py, bench/index_build.py --table)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import index_build  # noqa: E402
import link_table  # noqa: E402

DOCS = (REPO / "docs" / "benchmarks.md").read_text()


def _record(path: str) -> dict:
    return json.loads((REPO / path).read_text())


def test_retriever_tables_reprint_from_their_records() -> None:
    for path, fused in (
        ("results/bench/link-fused-vs-bm25.json", "| fused | 1 | 29.2 | 52.3 | 33.5 | 11.79 "),
        (
            "results/bench/link-fused-vs-bm25-openblas1.json",
            "| fused | 1 | 12.3 | 24.3 | 75.5 | 4.83 ",
        ),
        (
            "results/bench/link-fused-vs-bm25-8clients.json",
            "| fused | 8 | 119.7 | 166.4 | 67.1 | 6.77 ",
        ),
        (
            "results/bench/link-fused-vs-bm25-8clients-openblas1.json",
            "| fused | 8 | 49.8 | 68.6 | 157.6 | 3.00 ",
        ),
        (
            "results/bench/link-fused-vs-bm25-torchdot.json",
            "| fused | 1 | 11.5 | 18.2 | 84.9 | 4.23 ",
        ),
    ):
        rec = _record(path)
        assert rec["retrievers"] == ["bm25", "fused"]
        rows = [
            line
            for line in link_table.render_retrievers(rec).splitlines()
            if line.startswith(("| bm25 |", "| fused |"))
        ]
        assert len(rows) == 2
        assert rows[1].startswith(fused)
        assert all(row in DOCS for row in rows), path
        # the ratio is against BM25 measured in the same run, round by round
        by = {r["route"]: r for r in rec["rows"]}
        ratios = [
            f["service"]["p50_ms"] / b["service"]["p50_ms"]
            for f, b in zip(
                by["/v1/link (fused)"]["rounds"], by["/v1/link (bm25)"]["rounds"], strict=True
            )
        ]
        assert len(ratios) == rec["rounds"] == 3
        assert min(ratios) > 1.5  # the target is not met, as the docs say


def test_the_cross_encoder_meets_the_fused_latency_target_in_its_record() -> None:
    """The cross-encoder (bench/link.py's default model; jobs default to the CNN): fused
    p50 within 1.5 times BM25's, each round against the same round's BM25, at 1
    and 8 clients; the table in the docs is the record's."""
    rec = _record("results/bench/link-fused-vs-bm25-transformer.json")
    assert rec["model"] == "transformer" and rec["retrievers"] == ["bm25", "fused"]
    rows = [
        line
        for line in link_table.render_retrievers(rec).splitlines()
        if line.startswith(("| bm25 |", "| fused |"))
    ]
    assert len(rows) == 4 and all(row in DOCS for row in rows)
    for clients in (1, 8):
        by = {r["route"]: r for r in rec["rows"] if r["clients"] == clients}
        ratios = sorted(
            f["service"]["p50_ms"] / b["service"]["p50_ms"]
            for f, b in zip(
                by["/v1/link (fused)"]["rounds"], by["/v1/link (bm25)"]["rounds"], strict=True
            )
        )
        assert len(ratios) == 3
        assert 1.0 < ratios[1] <= 1.5, (clients, ratios)  # the median round


def test_index_build_table_reprints_from_its_record() -> None:
    rec = _record("results/retrieval/index_build.json")
    rows = [line for line in index_build.table(rec).splitlines() if line.startswith("| ")]
    assert all(row in DOCS for row in rows)
    tenk = {r["kind"]: r for r in rec["rows"] if r["concepts"] == 10_000}
    assert (
        round(tenk["dense"]["build_s"], 1) == 105.7
        and tenk["dense"]["artifact_bytes"] == 23_873_132
    )
    assert tenk["bm25"]["peak_rss_growth_mib"] == 14.3 and tenk["bm25"]["artifact_bytes"] == 0
