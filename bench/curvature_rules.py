"""Per-layer error of the Kronecker rules against the exact Fisher block, on
the library's real rankers (issue 13).

    flock /tmp/kronlink-bench.lock .venv/bin/python bench/curvature_rules.py \\
        [--models cnn,transformer] [--candidates 10,25] [--queries 8] [--batch-size 4] \\
        [--out results/curvature/rules.json]
    .venv/bin/python bench/curvature_rules.py --table results/curvature/rules.json

For every Linear/Conv1d layer, the exact Fisher block of the empirical Fisher
is ``F = (1/N) Σ_n v_n v_nᵀ`` with ``v_n = vec ∇W̄_n`` the per-query gradient
(one backward per query, from the same forward). It is never formed: with
``F̂ = Σ_k A_k ⊗ G_k``,

- ``‖F‖² = (1/N²) Σ_{n,m} ⟨∇W̄_n, ∇W̄_m⟩²``,
- ``⟨F̂, F⟩ = (1/N) Σ_n Σ_k sum(∇W̄_n ⊙ (G_k ∇W̄_n A_k))``,
- ``‖F̂‖² = Σ_{k,l} tr(A_k A_l) tr(G_k G_l)``,

so the relative Frobenius error ``‖F̂ - F‖ / ‖F‖`` costs per-query gradients
and small traces. Rules: ``expand`` (the paper's, ``kfc-expand``), ``split``
(the new default: reduce over a query's mean plus expand over deviations),
``reduce`` (the split's mean part alone, curvlinops' REDUCE taken per query)
and ``exact`` (the stored block, for layers with q·p̄ <= 1024; a check of the
code). Also, for a weight change ``Δ`` from real training (AdamW steps on
other synthetic queries), the ratio of each rule's ``vec(Δ̄)ᵀ F̂ vec(Δ̄)`` to
the exact ``(1/N) Σ_n ⟨∇W̄_n, Δ̄⟩²``, and the ratio of traces
``tr F̂ / tr F`` (overstatement). Embeddings and LayerNorms are left out: the
split rule does not apply to them (docs/curvature.md).

The rankers are ``build_ranker(kind)`` at their real sizes (the MiniLM
encoder of the installed package, 3 layers kept; the CNN), untrained head,
eval mode, float32, synthetic queries as in bench/train_step.py with gold =
first candidate. Records the load average: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import synthetic_queries

from kronlink.curvature import estimate_curvature
from kronlink.models import build_ranker, ranking_loss

RULES = ("expand", "split", "reduce", "exact")


def wbar(module: torch.nn.Module, grad_w: torch.Tensor, grad_b: torch.Tensor | None):
    w = grad_w.reshape(grad_w.shape[0], -1)
    return w if grad_b is None else torch.cat([w, grad_b[:, None]], 1)


def per_query_grads(model, batches, names):
    """``{layer: (N, q, p̄)}`` float64, one backward per labelled query."""
    mods = {n: model.get_submodule(n) for n in names}
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    params = [p for n in names for p in mods[n].parameters()]
    for batch in batches:
        losses = ranking_loss(model(batch), batch.candidate_mask, batch.labels, "none")
        for i in range(batch.size):
            if batch.labels[i] < 0:
                continue
            grads = torch.autograd.grad(losses[i], params, retain_graph=i < batch.size - 1)
            k = 0
            for n in names:
                m = mods[n]
                gw = grads[k]
                gb = grads[k + 1] if m.bias is not None else None
                k += 1 + int(m.bias is not None)
                out[n].append(wbar(m, gw, gb).double())
    return {n: torch.stack(v) for n, v in out.items()}


def pairs_of(state, name: str, rule: str):
    if rule == "expand":
        f = state.kfac[name]
        return [(f.A, f.G)]
    sp = state.split[name]
    if rule == "reduce":
        return [(sp.A_mean, sp.G_mean)]
    return [(sp.A_mean, sp.G_mean), (sp.A_dev, sp.G_dev)]


def errors(V: torch.Tensor, pairs, delta: torch.Tensor) -> dict:
    """Relative Frobenius error, trace ratio and penalty ratio of Σ A_k ⊗ G_k."""
    n = V.shape[0]
    flat = V.reshape(n, -1)
    gram = flat @ flat.T
    f_norm2 = float(gram.square().sum()) / n**2
    f_trace = float(gram.diagonal().sum()) / n
    pairs = [(A.double(), G.double()) for A, G in pairs]
    inner = sum(float((V * (G @ V @ A)).sum()) for A, G in pairs) / n
    fhat2 = sum(
        float((Ak * Al).sum()) * float((Gk * Gl).sum()) for Ak, Gk in pairs for Al, Gl in pairs
    )
    err2 = max(fhat2 - 2 * inner + f_norm2, 0.0)
    exact_pen = float(((V * delta).sum((1, 2))).square().mean())
    pen = sum(float((delta * (G @ delta @ A)).sum()) for A, G in pairs)
    return {
        "rel_frobenius": err2**0.5 / f_norm2**0.5,
        "trace_ratio": sum(float(A.trace()) * float(G.trace()) for A, G in pairs) / f_trace,
        "penalty_ratio": pen / exact_pen if exact_pen > 0 else float("nan"),
    }


def exact_errors(V: torch.Tensor, F: torch.Tensor, delta: torch.Tensor) -> dict:
    n = V.shape[0]
    flat = V.transpose(1, 2).reshape(n, -1)  # column-stacking vec
    brute = flat.T @ flat / n
    F = F.double()
    d = delta.T.reshape(-1)
    exact_pen = float((flat @ d).square().mean())
    return {
        "rel_frobenius": float((F - brute).norm() / brute.norm()),
        "trace_ratio": float(F.trace() / brute.trace()),
        "penalty_ratio": float(d @ F @ d) / exact_pen if exact_pen > 0 else float("nan"),
    }


def encode(model, queries, bs):
    return [model.encode(queries[i : i + bs]) for i in range(0, len(queries), bs)]


def training_delta(model, c: int, args) -> dict[str, torch.Tensor]:
    """θ after - θ before a few AdamW steps on other synthetic queries (the
    model is restored afterwards)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    qs = synthetic_queries(args.batch_size * args.train_steps, c, seed=1)
    for batch in encode(model, qs, args.batch_size):
        opt.zero_grad(set_to_none=True)
        ranking_loss(model(batch), batch.candidate_mask, batch.labels, "mean").backward()
        opt.step()
    delta = {n: (p.detach() - before[n]).double() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    return delta


def measure(kind: str, c: int, args) -> dict:
    torch.manual_seed(0)
    model = build_ranker(kind).eval()
    queries = synthetic_queries(args.queries, c, seed=0)
    batches = encode(model, queries, args.batch_size)
    t0 = time.perf_counter()
    state = estimate_curvature(model, batches, kinds=("kfac",))
    est_s = time.perf_counter() - t0
    names = [n for n, i in state.layers.items() if i.rule in ("linear", "conv1d")]
    V = per_query_grads(model, batches, names)
    delta = training_delta(model, c, args)
    layers = {}
    for name in names:
        info = state.layers[name]
        m = model.get_submodule(name)
        d = wbar(m, delta[f"{name}.weight"], delta.get(f"{name}.bias") if info.bias else None)
        row = {
            "params": info.a_dim * info.g_dim,
            **{r: errors(V[name], pairs_of(state, name, r), d) for r in RULES[:3]},
        }
        if name in state.exact:
            row["exact"] = exact_errors(V[name], state.exact[name], d)
        layers[name] = row
    return {
        "model": kind,
        "candidates": c,
        "queries": state.n_examples,
        "estimate_seconds": est_s,
        "layers": layers,
    }


def table(path: Path) -> str:
    """Markdown tables from a record: one per ranker, a column pair per C."""
    rec = json.loads(path.read_text())
    lines = [
        f"From `{path}` ({rec['machine']}, load average {rec['loadavg'][0]:.1f} at the start: "
        f"shared machine; {rec['args']['queries']} queries per setting, Δ from "
        f"{rec['args']['train_steps']} AdamW steps at lr {rec['args']['lr']}). Relative Frobenius "
        "error against the exact block, trace ratio tr F̂ / tr F (overstatement), and the penalty "
        "of the training Δ over its exact value; each as expand → split, with the exact block's "
        "in brackets where one is stored (it replaces split there). "
        "The exact block is from the same queries, so it has rank <= the number of queries: "
        "an error near 1 for a large layer says little (F̂ = 0 scores 1); the trace ratio does."
    ]
    for kind in dict.fromkeys(r["model"] for r in rec["runs"]):
        runs = [r for r in rec["runs"] if r["model"] == kind]
        head = "| layer | q·p̄ |"
        rule = "|---|---|"
        for r in runs:
            c = r["candidates"]
            head += f" C={c} error | C={c} trace ratio | C={c} penalty ratio |"
            rule += "---|---|---|"
        lines += ["", f"**{kind}**", "", head, rule]
        for name in runs[0]["layers"]:
            row = f"| `{name}` | {runs[0]['layers'][name]['params']} |"
            for r in runs:
                lay = r["layers"][name]
                e, s = lay["expand"], lay["split"]
                err = f"{e['rel_frobenius']:.2f} → {s['rel_frobenius']:.2f}"
                pen = f"{e['penalty_ratio']:.2f} → {s['penalty_ratio']:.2f}"
                tr = f"{e['trace_ratio']:.2f} → {s['trace_ratio']:.2f}"
                if "exact" in lay:
                    x = lay["exact"]
                    err += f" ({x['rel_frobenius']:.0e})"
                    tr += f" ({x['trace_ratio']:.3f})"
                    pen += f" ({x['penalty_ratio']:.3f})"
                row += f" {err} | {tr} | {pen} |"
            lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,transformer")
    ap.add_argument("--candidates", default="10,25")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("results/curvature/rules.json"))
    ap.add_argument("--table", type=Path, help="print the markdown table of a record and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    torch.set_num_threads(args.threads)
    rec = {
        "bench": "curvature_rules",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
        "loadavg": list(os.getloadavg()),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [],
    }
    for kind in args.models.split(","):
        for c in (int(x) for x in args.candidates.split(",")):
            t0 = time.perf_counter()
            run = measure(kind, c, args)
            run["seconds"] = time.perf_counter() - t0
            rec["runs"].append(run)
            print(f"{kind} C={c}: {run['seconds']:.0f} s", flush=True)
    rec["loadavg_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=1))
    print(table(args.out))


if __name__ == "__main__":
    main()
