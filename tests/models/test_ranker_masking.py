"""Padding (candidate slots, tokens) must not change real scores, the loss or
its gradients; token layouts must describe every module's actual input."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kronlink.models import Ranker, RankerBatch, ranking_loss

# float64 throughout: padding must change nothing, not just a little.
EXACT = 1e-10
SCORE_ATOL = 1e-6

LAYOUT_TYPES = (nn.Linear, nn.Conv1d, nn.Embedding, nn.LayerNorm)
# Any id works in a masked position; not the pad id, so a leak would show.
JUNK_ID = 7


def pad_tokens(batch: RankerBatch, extra: int) -> RankerBatch:
    """Widen every feature's token axis by ``extra`` masked positions."""
    features = {}
    for key, value in batch.features.items():
        fill = JUNK_ID if key.endswith("ids") and key != "token_type_ids" else 0
        features[key] = nn.functional.pad(value, (0, extra), value=fill)
    return RankerBatch(features, batch.candidate_mask, batch.labels, batch.meta)


def pad_candidates(batch: RankerBatch, extra: int) -> RankerBatch:
    """Add ``extra`` masked candidate slots, copies of each query's first slot."""
    features = {}
    for key, value in batch.features.items():
        if value.dim() == 3:  # (B, C, T) per-pair features
            value = torch.cat([value, value[:, :1].expand(-1, extra, -1)], dim=1)
        features[key] = value
    mask = nn.functional.pad(batch.candidate_mask, (0, extra), value=False)
    return RankerBatch(features, mask, batch.labels, batch.meta)


def loss_and_grads(model: Ranker, batch: RankerBatch) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad()
    loss = ranking_loss(model(batch), batch.candidate_mask, batch.labels, reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_scores_do_not_depend_on_batch_mates(kind: str, tiny, queries) -> None:
    model = tiny(kind)
    together = model(model.encode(queries))
    for i, q in enumerate(queries):
        alone = model(model.encode([q]))
        n = len(q.candidates)
        torch.testing.assert_close(together[i, :n], alone[0, :n], rtol=0, atol=SCORE_ATOL)


def test_padding_keeps_scores_loss_and_gradients(kind: str, tiny, queries) -> None:
    model = tiny(kind)
    batch = model.encode(queries)
    padded = pad_candidates(pad_tokens(batch, 5), 3)

    scores, scores_padded = model(batch), model(padded)
    real = batch.candidate_mask
    torch.testing.assert_close(
        scores_padded[:, : real.shape[1]][real], scores[real], rtol=0, atol=SCORE_ATOL
    )

    loss, grads = loss_and_grads(model, batch)
    loss_padded, grads_padded = loss_and_grads(model, padded)
    torch.testing.assert_close(loss_padded, loss, rtol=0, atol=EXACT)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_padded[name], grad, rtol=0, atol=EXACT, msg=name)


def test_token_layouts_cover_modules_and_match_inputs(kind: str, tiny, queries) -> None:
    model = tiny(kind)
    batch = pad_candidates(model.encode(queries), 1)
    layouts = model.token_layouts(batch)

    covered = {name for name, m in model.named_modules() if isinstance(m, LAYOUT_TYPES)}
    assert set(layouts) == covered
    # No parameter sits outside a module with a layout.
    for name, module in model.named_modules():
        if list(module.parameters(recurse=False)):
            assert isinstance(module, LAYOUT_TYPES), name

    seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layouts}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            seen[name].append((args[0], output))
            output.register_hook(lambda g: seen[name].append((g, g)))

        return record

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook(name)) for name in layouts]
    try:
        scores = model(batch)
        ranking_loss(scores, batch.candidate_mask, batch.labels, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()

    for name, layout in layouts.items():
        module = modules[name]
        (inp, out), (grad, _) = seen[name]  # one call forward, one backward
        if isinstance(module, nn.Conv1d):
            positions = (out.shape[0], out.shape[2])
            # Output positions sit on the token axis, the channel axis is 1.
            grad_at = grad.abs().amax(dim=1)
        elif isinstance(module, nn.Embedding):
            positions = tuple(inp.shape)
            grad_at = grad.abs().amax(dim=-1)
        else:
            positions = tuple(inp.shape[:-1])
            grad_at = grad.abs().amax(dim=-1)
        assert tuple(layout.mask.shape) == positions, name
        assert layout.mask.dtype == torch.bool, name
        assert layout.example.dtype == torch.long, name
        assert tuple(layout.example.shape) == (positions[0],), name
        assert 0 < int(layout.mask.sum()) < layout.mask.numel(), name
        # Masked positions carry no gradient (DESIGN.md section 4).
        assert float(grad_at[~layout.mask].max()) <= EXACT, name


def test_sdpa_attention_agrees_with_eager(tiny, queries) -> None:
    eager = tiny("transformer", attn_implementation="eager")
    sdpa = tiny("transformer", attn_implementation="sdpa")
    # two different code paths (the same seeded weights), or the comparison proves nothing
    impls = {m.encoder.config._attn_implementation for m in (eager, sdpa)}
    assert impls == {"eager", "sdpa"}
    assert all(
        torch.equal(a, b) for a, b in zip(eager.parameters(), sdpa.parameters(), strict=True)
    )
    batch = sdpa.encode(queries)
    torch.testing.assert_close(sdpa(batch), eager(batch), rtol=0, atol=SCORE_ATOL)


def test_empty_batch_gives_empty_scores(kind: str, tiny) -> None:
    model = tiny(kind)
    batch = model.encode([])
    assert model(batch).shape == batch.candidate_mask.shape == (0, 1)
    assert all(layout.mask.shape[0] == 0 for layout in model.token_layouts(batch).values())
