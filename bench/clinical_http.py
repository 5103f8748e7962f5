"""The clinical list (tests/clinical_mentions.py) through HTTP on a served model:
top-1 per mention against the accepted codes, a record of every answer.

    kronlink demo --dir demo          # in another shell: serves on :8000
    python bench/clinical_http.py results/clinical/demo_http.json [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _record import loadavg, write_record
from clinical_mentions import LISTS, accepted


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    args = p.parse_args()
    record: dict = {"loadavg_before": loadavg()}
    with httpx.Client(base_url=args.url, timeout=60) as client:
        for onto, items in LISTS.items():
            rows = []
            for mention, codes in items.items():
                r = client.post("/v1/link", json={"mention": mention, "ontology": onto, "top_k": 5})
                r.raise_for_status()
                body = r.json()
                # no results: the retriever found nothing (an explicit no-match), a miss
                top = body["results"][0] if body["results"] else {"id": None, "name": None}
                rows.append(
                    {
                        "mention": mention,
                        "answer": top["id"],
                        "name": top["name"],
                        "version": body["model_version"],
                        "ok": top["id"] is not None and accepted(top["id"], codes),
                        # the version's calibrated P(top-1 right); null for an uncalibrated one
                        "confidence": body.get("confidence"),
                        "no_match": body.get("no_match"),
                        # the next answers too, to tell a ranking miss from a retrieval miss
                        "top5": [
                            [x["id"], x["name"], round(x["probability"], 4)]
                            for x in body["results"]
                        ],
                    }
                )
            record[onto] = {"correct": sum(r["ok"] for r in rows), "n": len(rows), "rows": rows}
            for key, ok in (("mean_confidence_right", True), ("mean_confidence_wrong", False)):
                cs = [
                    r["confidence"] for r in rows if r["ok"] is ok and r["confidence"] is not None
                ]
                record[onto][key] = sum(cs) / len(cs) if cs else None
            print(f"{onto}: {record[onto]['correct']} / {len(rows)} top-1 accepted")
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
