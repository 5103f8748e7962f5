"""The maths of the curvature estimator, free of hooks and models.

Notation (DESIGN.md section 4; Martens & Grosse 2015, Grosse & Martens 2016):
a layer ``y = W x + b`` with ``W`` (q, p) is applied at positions t of an
example n; ``x̄ = [x; 1]``, ``W̄ = [W, b]``, ``g_t = ∂ℓ_n/∂y_t``.

- ``A = mean over real (n, t) of x̄ x̄ᵀ``          ((p+1)², "expand" rule)
- ``G = mean over n of Σ_t g_t g_tᵀ``            (q²)
- ``∇W̄_n = Σ_t g_t x̄_tᵀ``                       (per-example gradient)
- ``diag F = E_n[(∇W̄_n)²]``                      (EWC, every parameter)
- ``s = E_n[(U_Gᵀ ∇W̄_n U_A)²]``                  (EKFAC, George et al. 2018)

Every function here takes the real positions of one module call already
flattened: ``x`` (P, p̄), ``g`` (P, q) and ``example`` (P,), the example each
position belongs to. Sums are returned; the estimator divides at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Upper bound on the elements of one chunk of per-example gradients
# (B_chunk * q * p̄): 2**25 float32 numbers are 128 MiB.
_CHUNK_ELEMENTS = 2**25
# Elements of one chunk of gathered Conv1d patches (``conv1d_lag_sums``):
# 2**19 float32 numbers are 2 MiB, about a core's share of cache here.
_PATCH_CHUNK = 2**19


def augment(x: Tensor) -> Tensor:
    """``x̄ = [x; 1]`` along the last dimension (the bias column of ``W̄``)."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def conv1d_patches(module: nn.Conv1d, x: Tensor) -> Tensor:
    """Unfolded input patches of a Conv1d, (N, T_out, C_in·k), ordered as
    ``weight.reshape(C_out, C_in·k)`` flattens the kernel (Grosse & Martens
    2016: a convolution is a Linear layer applied at every output position).
    Without dilation, a view (N, T_out, C_in, k) of the same numbers: flatten
    its last two dimensions after selecting positions."""
    left, right = conv1d_padding(module)
    if left or right:
        x = F.pad(x, (left, right))
    if module.dilation[0] == 1:
        # A strided view (N, T_out, C_in, k): the caller's selection of real
        # positions is then the only copy (im2col copied every position,
        # padding included, before the selection copied the real ones again).
        return x.unfold(2, module.kernel_size[0], module.stride[0]).permute(0, 2, 1, 3)
    cols = F.unfold(
        x.unsqueeze(2),
        kernel_size=(1, module.kernel_size[0]),
        dilation=(1, module.dilation[0]),
        stride=(1, module.stride[0]),
    )  # (N, C_in·k, T_out)
    return cols.transpose(1, 2)


def conv1d_padding(module: nn.Conv1d) -> tuple[int, int]:
    """(left, right) zeros a Conv1d adds to its input."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return 0, 0
        # "same": PyTorch pads the extra element on the right
        total = module.dilation[0] * (module.kernel_size[0] - 1)
        return total // 2, total - total // 2
    return module.padding[0], module.padding[0]


@dataclass
class ConvInput:
    """A Conv1d call's input and its real output positions, kept instead of
    its patches so that the split rule's x-side sums come from lagged
    products (``conv1d_lag_sums``)."""

    module: nn.Conv1d
    x: Tensor  # (N, C_in, T)
    keep: Tensor  # (N, T_out) bool: real output positions
    row_example: Tensor  # (N,) the query of each row

    @staticmethod
    def supports(module: nn.Conv1d) -> bool:
        return module.stride[0] == 1 and module.dilation[0] == 1


class Workspace:
    """Flat buffers reused from one call to the next within a pass. The
    lagged sums' two large temporaries, allocated afresh for every batch,
    came back from the allocator as new pages (glibc returns freed heap
    tops to the system), and on the CNN the page faults were a visible
    share of the pass (docs/benchmarks.md, issue 14 item 4)."""

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = 1
        for d in shape:
            numel *= d
        buf = self.buffers.get(name)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = like.new_empty(numel)
            self.buffers[name] = buf
        return buf[:numel].view(shape)


def conv1d_lag_sums(
    conv: ConvInput, n_examples: int, work: Workspace | None = None
) -> dict[str, Tensor | tuple]:
    """``split_sums``' x side of a Conv1d (stride 1, no dilation), without
    forming its patches.

    A patch at output position t stacks the (padded) input at t, ..., t+k-1,
    so block (a, b) of ``Σ_t x̄_t x̄_tᵀ`` is ``Σ_t z_{t+a} z_{t+b}ᵀ``: the lag
    b - a product of the input itself, with weights ``keep[s - a]`` that
    differ from ``keep[s - a + 1]`` only where a run of real positions
    starts or ends. So one product of the real patches' first tap (C_in x P)
    by the patches (P x k·C_in) gives block row 0, and each later row is the
    one before plus a product over the run edges: (C_in·k)²·P multiply-adds
    become about C_in²·k·P. Each query's inputs are first centred on their mean at the
    kernel's centre tap, so the deviations' sum ``a_dev`` is a difference of
    a large and a small term, as exact in float32 as ``split_sums``' direct
    one."""
    module, keep, rows = conv.module, conv.keep, conv.row_example
    k = module.kernel_size[0]
    left, right = conv1d_padding(module)
    n, c, length = conv.x.shape
    tp, t_out = length + left + right, keep.shape[1]
    # (N, Tp, C): row s of a sequence is the padded input x_s. One copy,
    # centred in place below.
    work = work if work is not None else Workspace()
    buf = work.take("padded", (n * tp + k - 1, c), conv.x)
    buf[n * tp :] = 0  # read (and then cut off) by the last sequence's edge patches
    zt = buf[: n * tp].view(n, tp, c)
    zt[:, :left] = 0
    zt[:, left + length :] = 0
    zt[:, left : left + length] = conv.x.transpose(1, 2)
    z = zt.view(-1, c)
    # Row i of ``patch`` is z_i ... z_{i+k-1}, contiguous in memory: the
    # patch at flat position i in (tap, channel) order, a view.
    patch = buf.as_strided((n * tp, k * c), (c, 1))
    keep8 = keep.to(torch.int8)
    keep_p = F.pad(keep8, (0, tp - t_out))  # weights of block row a = 0
    counts = torch.zeros(n_examples, dtype=z.dtype, device=z.device)
    counts.index_add_(0, rows, keep.sum(1).to(z.dtype))
    real = counts > 0
    t = counts.clamp_min(1)[:, None]
    idx0 = keep_p.view(-1).nonzero().squeeze(1)  # flat (row·Tp + s) indices
    q0 = rows[idx0 // tp]

    centre = z.index_select(0, idx0 + (k - 1) // 2)
    mu = centre.new_zeros(n_examples, c).index_add_(0, q0, centre) / t
    del centre
    zt.sub_(mu[rows][:, None, :])
    # Blocks (0, d) side by side, and each query's summed patch (tap,
    # channel order), over chunks of real positions: a chunk of patches
    # stays in cache between its gather and its product, and the buffer is
    # small.
    row0 = z.new_zeros(c, k * c)
    dm = z.new_zeros(n_examples, k * c)
    step = max(1, _PATCH_CHUNK // (k * c))
    for start in range(0, idx0.shape[0], step):
        sel = idx0[start : start + step]
        chunk = work.take("patches", (sel.shape[0], k * c), z)
        torch.index_select(patch, 0, sel, out=chunk)
        row0.addmm_(chunk[:, :c].T, chunk)
        dm.index_add_(0, q0[start : start + step], chunk)
    dm /= t  # the mean patch of query n minus its centring
    blocks: dict[tuple[int, int], Tensor] = {(0, d): row0[:, d * c : (d + 1) * c] for d in range(k)}
    prev = keep_p
    for a in range(1, k):
        # keep[s - a] - keep[s - a + 1]: ±1 where a run of real positions
        # starts or ends, so block row a is row a - 1 plus a few products
        shifted = F.pad(keep8, (a, tp - t_out - a))
        diff = (shifted - prev).view(-1)
        prev = shifted
        idx = diff.nonzero().squeeze(1)
        edge = patch.index_select(0, idx)[:, : (k - a) * c]
        corr = (edge[:, :c] * diff[idx].to(z.dtype)[:, None]).T @ edge
        for d in range(k - a):
            blocks[(a, a + d)] = blocks[(a - 1, a - 1 + d)] + corr[:, d * c : (d + 1) * c]
    full = z.new_empty(c, k, c, k)
    for (a, b), blk in blocks.items():
        full[:, a, :, b] = blk
        if a != b:
            full[:, b, :, a] = blk.T
    p = c * k
    full = full.reshape(p, p)
    dm = dm.view(n_examples, k, c).transpose(1, 2).reshape(n_examples, p)  # (channel, tap)
    dev = full - (dm * counts[:, None]).T @ dm
    m = dm + mu.repeat_interleave(k, dim=1)
    if module.bias is not None:
        dev = F.pad(dev, (0, 1, 0, 1))  # a deviation's bias entry is 1 - 1 = 0
        m = augment(m)
    mr = m[real]
    return {"a_dev": dev, "a_rows": (mr, mr, counts[real])}


def layer_norm_hat(module: nn.LayerNorm, x: Tensor) -> Tensor:
    """``x̂ = (x - mean) / sqrt(var + eps)`` over the normalised dimensions,
    flattened to (..., D): the per-position gradient of the LayerNorm weight is
    ``g ⊙ x̂`` and of its bias ``g``."""
    d = len(module.normalized_shape)
    flat = x.reshape(*x.shape[: x.dim() - d], -1)
    mean = flat.mean(-1, keepdim=True)
    var = flat.var(-1, unbiased=False, keepdim=True)
    return (flat - mean) / torch.sqrt(var + module.eps)


def per_example_outer(g: Tensor, x: Tensor, example: Tensor, n_examples: int) -> Iterator[Tensor]:
    """Yield ``∇W̄_n = Σ_{t ∈ n} g_t x̄_tᵀ`` for all examples n, in chunks of
    shape (B_chunk, q, p̄).

    The positions are scattered into a (B, L_max, ·) buffer by example (no
    Python loop over examples), then one batched matrix product per chunk sums
    each example's positions. Memory: B·L_max·(p̄+q) for the buffers and
    at most ``_CHUNK_ELEMENTS`` for the gradients.
    """
    q, p = g.shape[1], x.shape[1]
    if g.shape[0] == 0:
        return
    order = torch.argsort(example, stable=True)
    ex = example[order]
    counts = torch.bincount(ex, minlength=n_examples)
    offsets = counts.cumsum(0) - counts
    slot = torch.arange(ex.shape[0], device=ex.device) - offsets[ex]
    length = int(counts.max())
    gp = g.new_zeros(n_examples, length, q)
    xp = x.new_zeros(n_examples, length, p)
    gp[ex, slot] = g[order]
    xp[ex, slot] = x[order]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, q * p))
    for start in range(0, n_examples, chunk):
        stop = min(start + chunk, n_examples)
        yield torch.bmm(gp[start:stop].transpose(1, 2), xp[start:stop])


def per_example_rows(values: Tensor, example: Tensor, n_examples: int) -> Tensor:
    """``Σ_{t ∈ n} v_t`` per example: (P, D) -> (B, D), by ``index_add``."""
    out = values.new_zeros(n_examples, values.shape[1])
    return out.index_add_(0, example, values)


def embedding_pairs(
    ids: Tensor, g: Tensor, example: Tensor, num_embeddings: int
) -> tuple[Tensor, Tensor]:
    """Per-example gradient rows of an Embedding, only where they are nonzero.

    The weight gradient of example n is ``Σ_{t ∈ n, id_t = v} g_t`` in row v.
    Returns ``(token, rows)``: one entry per distinct (example, token) pair,
    ``rows`` (K, d). Never builds the dense (B, V, d) tensor.
    """
    key = example * num_embeddings + ids
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = g.new_zeros(uniq.shape[0], g.shape[1]).index_add_(0, inverse, g)
    return uniq % num_embeddings, rows


def symmetric_eigenbasis(matrix: Tensor) -> Tensor:
    """Orthonormal eigenvectors of a symmetric PSD factor (columns), computed
    in float64 because float32 ``eigh`` loses orthogonality on ill-conditioned
    activation covariances, which EKFAC's rotations then amplify."""
    sym = 0.5 * (matrix + matrix.T)
    _, vectors = torch.linalg.eigh(sym.double())
    return vectors.to(matrix.dtype).contiguous()


def accumulate_squares(target: Tensor, chunks: Iterator[Tensor], fn: Callable[[Tensor], Tensor]):
    """``target += Σ_chunks Σ_n fn(chunk)_n ** 2`` (sum over the example axis)."""
    for chunk in chunks:
        target.add_(fn(chunk).square().sum(0))


class MeanSums:
    """``red = Σ_n u_n u_nᵀ`` and ``wm = Σ_n T_n v_n v_nᵀ`` over queries n
    (the split rule's mean parts, ``split_sums``), kept as the rows ``u``,
    ``v`` and ``T`` until there are as many rows as the dimension, then
    folded into the two dense sums. A pass over fewer queries than the
    layer is wide never holds the dense (dim, dim) pair while the backward
    runs; it is formed once, by ``result``, after the pass."""

    def __init__(self, dim: int, *, dtype: torch.dtype, device: torch.device) -> None:
        self.dim, self.dtype, self.device = dim, dtype, device
        self.rows: list[tuple[Tensor, Tensor, Tensor]] = []
        self.n_rows = 0
        self.red: Tensor | None = None
        self.wm: Tensor | None = None

    def add(self, u: Tensor, v: Tensor, counts: Tensor) -> None:
        self.rows.append((u, v, counts))
        self.n_rows += u.shape[0]
        if self.n_rows >= self.dim:
            self.fold()

    def fold(self) -> None:
        if self.red is None:
            self.red = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
            self.wm = torch.zeros_like(self.red)
        if not self.rows:
            return
        u = torch.cat([r[0] for r in self.rows])
        v = torch.cat([r[1] for r in self.rows])
        t = torch.cat([r[2] for r in self.rows])
        self.rows, self.n_rows = [], 0
        self.red.add_(u.T @ u)
        self.wm.add_((v * t[:, None]).T @ v)

    def result(self) -> tuple[Tensor, Tensor]:
        """``(red, wm)``; the rows are folded in."""
        self.fold()
        return self.red, self.wm


def split_sums(
    x: Tensor,
    g: Tensor,
    example: Tensor,
    n_examples: int,
    cache: dict[Hashable, dict[str, Tensor]] | None = None,
    key: Hashable | None = None,
    x_sums: dict | None = None,
) -> dict[str, Tensor | tuple[Tensor, Tensor, Tensor]]:
    """The sums behind the candidate-aware ("split") rule and the expand rule.

    With ``m_n``, ``h_n`` the means of a query's ``x̄_t`` and ``g_t`` over its
    T_n real positions, ``d_t = x̄_t - m_n``, ``e_t = g_t - h_n``, ``s_n = Σ_t g_t``:

    - ``a_dev = Σ_t d dᵀ``, ``g_dev = Σ_t e eᵀ`` (deviations, expand-style),
    - ``a_red = Σ_n m mᵀ``, ``g_red = Σ_n s sᵀ`` (means, reduce-style),
    - ``a_wm = Σ_n T_n m mᵀ``, ``g_wm = Σ_n T_n h hᵀ``, so that the expand
      rule's ``Σ_t x̄ x̄ᵀ = a_dev + a_wm`` and ``Σ_t g gᵀ = g_dev + g_wm``
      without cancellation.

    Returns ``a_dev`` and ``g_dev``, and the mean parts as the rows of the
    queries with a real position, ``"a_rows": (m, m, T)`` and
    ``"g_rows": (s, h, T)``, for ``MeanSums.add``.

    The deviations are accumulated directly: subtracting the mean part from
    ``Σ x̄ x̄ᵀ`` afterwards would cancel badly in float32 when the mean
    dominates (a scoring head's inputs).

    ``cache`` (per batch) keeps the x-side sums under ``key`` for modules
    that share one input tensor (query, key and value); no ``key``, no
    sharing. ``x_sums`` is the x side already taken (``conv1d_lag_sums``);
    ``x`` is then not read."""
    hit = x_sums
    if hit is None and cache is not None and key is not None:
        hit = cache.get(key)
    counts = torch.bincount(example, minlength=n_examples).to(g.dtype)
    real = counts > 0
    # Per-query sums by ``index_add_``: 4x to 7x faster than the product
    # with the (P, B) one-hot that replaced it (commit 64dc2d8, measured at
    # load 12), at 400 to 40,000 positions, 128 to 1,536 wide, 1 or 2
    # threads (torch 2.13, this 2-core CPU, idle but for one job).
    t = counts.clamp_min(1)[:, None]
    sg = per_example_rows(g, example, n_examples)
    h = sg / t
    # The deviations overwrite the gathered means (same values as
    # ``g - h[example]``, one (P, q) buffer fewer) and are freed at once:
    # this runs inside the backward, where every byte adds to the peak.
    e = h[example]
    e = torch.sub(g, e, out=e)
    out = {"g_dev": e.T @ e, "g_rows": (sg[real], h[real], counts[real])}
    del e
    if hit is None:
        m = per_example_rows(x, example, n_examples) / t
        d = m[example]
        d = torch.sub(x, d, out=d)
        mr = m[real]
        hit = {"a_dev": d.T @ d, "a_rows": (mr, mr, counts[real])}
        del d
        if cache is not None and key is not None:
            cache[key] = hit
    return {**hit, **out}
