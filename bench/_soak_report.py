"""The report of bench/soak.py: registry facts, the checks, the printed tables."""

from __future__ import annotations

import argparse
import os
from typing import Any

LINEAGE = "main"


def registry_facts(pg_url: str) -> dict[str, Any]:
    """The activation order (promoted / rolled back, by audit id) and the versions."""
    from kronlink.registry import (
        active_version,
        create_engine_from_url,
        list_audit,
        list_versions,
        make_session_factory,
    )

    engine = create_engine_from_url(pg_url)
    try:
        with make_session_factory(engine).begin() as s:
            versions = {v.id: v for v in list_versions(s, LINEAGE)}
            rows = list_audit(s, action="promoted") + list_audit(s, action="rolled_back")
            active = active_version(s, LINEAGE)
    finally:
        engine.dispose()
    order = []
    for r in sorted(rows, key=lambda r: r.id):
        vid = int(r.subject.split(":")[1])
        order.append({"version_id": vid, "number": versions[vid].number, "action": r.action})
    return {
        "activation_order": order,
        "active": {"version_id": active.id, "number": active.number} if active else None,
        "versions": [
            {"id": v.id, "number": v.number, "state": v.state.value, "job_id": v.job_id}
            for v in versions.values()
        ],
    }


def is_subsequence(seq: list[int], of: list[int]) -> bool:
    it = iter(of)
    return all(any(x == y for y in it) for x in seq)


def evaluate(report: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    """Each target as a named check."""
    checks = {
        "scenario completed": report.get("scenario_error") is None,
        "every process alive at the end": all(report.get("alive_at_end", {"-": False}).values()),
        "registry and API read after the load": report.get("facts_error") is None,
    }
    if "registry" not in report:
        return checks
    order = [a["version_id"] for a in report["registry"]["activation_order"]]
    active = report["registry"]["active"]["version_id"]
    checks["no failed request"] = report["all"]["failed"] == 0
    for name, rep in report["replicas"].items():
        seq = [v["version_id"] for v in rep["versions_served"]]
        checks[f"{name}: served order follows the activation order"] = is_subsequence(seq, order)
        checks[f"{name}: last served = active"] = bool(seq) and seq[-1] == active
    jobs = report["jobs"]
    for role in ("bootstrap", "update-1", "update-2"):
        checks[f"job {role} succeeded"] = jobs.get(role, {}).get("state") == "succeeded"
    cancelled = jobs.get("cancelled", {"state": None, "version_id": None, "id": None})
    checks["cancelled job cancelled, no version"] = (
        cancelled["state"] == "cancelled"
        and cancelled["version_id"] is None
        and not any(v["job_id"] == cancelled["id"] for v in report["registry"]["versions"])
        and not report["cancelled_artifacts"]
    )
    checks["rollback active"] = order[-1] == active and (
        report["registry"]["activation_order"][-1]["action"] == "rolled_back"
    )
    for name, m in report["memory"].items():
        checks[f"{name}: RSS growth within bound"] = m["growth_mib"] <= bound_mib(m, args)
        checks[f"{name}: RSS flat after the swaps"] = m["steady_growth_mib"] <= args.rss_steady_mib
    checks["no job left open"] = not report["jobs_open"]
    checks["staging empty"] = not report["staging_left"]
    return checks


def bound_mib(m: dict[str, float], args: argparse.Namespace) -> float:
    return max(args.rss_bound_mib, m["start_mib"] * args.rss_bound_pct / 100)


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    p = print
    p(
        f"\nsoak: model {args.model}{' (tiny)' if args.short else ''}, {args.clients} clients, "
        f"load {report.get('load_seconds')} s, {os.cpu_count()} CPUs"
    )
    if "all" in report:
        p(
            "\n| replica | served | failed | p50 ms | p99 ms | max ms | versions served, in order (answers) |"
        )
        p("|---|---:|---:|---:|---:|---:|---|")
        for name, r in [*report["replicas"].items(), ("both", report["all"])]:
            runs = " → ".join(
                f"v{v['number']} ({v['answers']})" for v in r.get("versions_served", [])
            )
            p(
                f"| {name} | {r['served']} | {r['failed']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {runs or str(r['requests_per_s']) + ' requests/s'} |"
            )
        p(
            "\n| replica | answers within 1 s of a swap | p50 ms | p99 ms | max ms | other answers | p50 ms | p99 ms | max ms |"
        )
        p("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in report["replicas"].items():
            n, e = r["latency_around_swaps"]["near_swaps"], r["latency_around_swaps"]["elsewhere"]
            p(
                f"| {name} | {n['answers']} | {n['p50_ms']} | {n['p99_ms']} | {n['max_ms']} | "
                f"{e['answers']} | {e['p50_ms']} | {e['p99_ms']} | {e['max_ms']} |"
            )
        for name, r in report["replicas"].items():
            for reason, n in r["failure_reasons"].items():
                p(f"  failure on {name}: {n} x {reason}")
    if "registry" in report:
        order = " → ".join(
            f"v{a['number']}" + (" (rollback)" if a["action"] == "rolled_back" else "")
            for a in report["registry"]["activation_order"]
        )
        p(f"\nregistry activation order: {order}; active v{report['registry']['active']['number']}")
        p(
            "\n| process | pid | RSS start MiB | after swaps | end | peak | growth MiB (%) "
            "| bound MiB | growth after swaps | bound |"
        )
        p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, m in report["memory"].items():
            p(
                f"| {name} | {m['pid']} | {m['start_mib']} | {m['after_swaps_mib']} | "
                f"{m['end_mib']} | {m['peak_mib']} | {m['growth_mib']} ({m['growth_pct']}%) | "
                f"{bound_mib(m, args):.0f} | {m['steady_growth_mib']} | {args.rss_steady_mib:g} |"
            )
        p("\n| job | role | task | state | version id | seconds | error |")
        p("|---:|---|---|---|---:|---:|---|")
        for role, j in report["jobs"].items():
            p(
                f"| {j['id']} | {role} | {j['task']} | {j['state']} | {j['version_id']} | {j['seconds']} | {j['error'] or ''} |"
            )
        p(
            f"\ncancelled while {report['cancelled_in']}; jobs left open: {report['jobs_open']}; "
            f"staging left: {report['staging_left']}; log error lines: {report['log_errors']}"
        )
    p("")
    for name, ok in report["checks"].items():
        p(f"  [{'ok' if ok else 'FAIL'}] {name}")
    if report.get("exit_codes"):
        p(f"  processes that exited during the run (exit code): {report['exit_codes']}")
    for key in ("scenario_error", "facts_error"):
        if report.get(key):
            p(f"  {key.replace('_', ' ')}: {report[key]}")
