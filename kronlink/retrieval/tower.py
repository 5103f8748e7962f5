"""The retriever's query tower: MiniLM fine-tuned on mentions, concepts frozen.

The dense retriever is a bi-encoder: one MiniLM encodes concept names into the
ontology's index (:class:`~kronlink.retrieval.dense.DenseIndex`), the same
MiniLM encodes a mention, and the cosine ranks concepts. Here only the
mention side learns. The concept side stays the shipped encoder, so:

- an update never re-encodes an ontology (ICD-10-CM's 47k names take about
  two minutes on 2 CPU cores, ``results/retrieval/index_build.json``), and
  every version serves the index that was built when the ontology was
  registered;
- the loss can use the whole ontology as negatives: the concept vectors are
  constants, so scoring a batch against all 47k of them is one matrix product
  (SapBERT samples in-batch and hard negatives because both sides move; with
  a frozen side the full softmax is exact and cheaper than mining).

:class:`QueryTower` is a :class:`~kronlink.models.base.Ranker` whose candidates
are every concept of a bank: ``forward`` gives (B, concepts) scores, so the
curvature estimator, the penalties and ``TaskState`` apply to it unchanged.
Its Linear, Embedding and LayerNorm layers are all covered.

    tower = QueryTower.build()
    tower.set_bank(dense_index)          # the ontology's frozen concept vectors
    result = tune(tower, train, dev, TuneConfig(), penalty=...)
    Retriever(concepts, mode="fused", dense=dense_index, encoder=tower.query_encoder())
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from kronlink.data.schema import Query
from kronlink.errors import CheckpointError, ConfigError
from kronlink.models.base import Ranker, RankerBatch, TokenLayout, ranking_loss
from kronlink.retrieval.dense import MAX_TOKENS, DenseIndex, encoder_version

__all__ = [
    "TOWER_DIR",
    "QueryEncoder",
    "QueryTower",
    "TuneConfig",
    "TuneResult",
    "recall_at",
    "tune",
]

log = logging.getLogger(__name__)

TOWER_DIR = "tower"  # a version's tower, inside its model folder (worker, service)
WEIGHTS_FILE = "tower.safetensors"
CONFIG_FILE = "tower.json"
# Cosines of MiniLM vectors sit in [-1, 1]; a softmax over them needs a
# temperature to be peaked at all (InfoNCE's usual 0.05).
DEFAULT_SCALE = 20.0


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer

    from kronlink.models._text import TOKENIZER_FILE

    tok = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    # The same truncation as the concept side (DenseIndex): an untuned tower
    # must give exactly the shipped encoder's vectors.
    tok.enable_truncation(MAX_TOKENS)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


class QueryTower(Ranker):
    """MiniLM, mean pooling, unit length; scores = scale x best cosine per concept."""

    kind = "query-tower"

    def __init__(
        self, encoder_config: BertConfig, folder: Path, *, base: str, scale: float = DEFAULT_SCALE
    ) -> None:
        super().__init__()
        encoder_config._attn_implementation = "sdpa"
        self.encoder = BertModel(encoder_config, add_pooling_layer=False)
        self.folder = folder
        self.tokenizer = _tokenizer(folder)
        self.base = base  # the concept side's encoder: the index must have been made by it
        self.scale = float(scale)
        self.config = {"base": base, "scale": self.scale}
        self.ids: tuple[str, ...] = ()
        self._position: dict[str, int] = {}
        # The bank is data, not weights: never saved with the tower, never
        # penalised (buffers are not parameters).
        self.register_buffer("bank", torch.zeros(0, encoder_config.hidden_size), persistent=False)
        self.register_buffer("entry_concept", torch.zeros(0, dtype=torch.long), persistent=False)

    # construction -----------------------------------------------------------

    @classmethod
    def build(cls, scale: float = DEFAULT_SCALE) -> QueryTower:
        """The shipped all-MiniLM-L6-v2, untuned: its vectors are the index's."""
        from kronlink.models._text import DEFAULT_ENCODER, resolve_source
        from kronlink.models.transformer import _load_pretrained

        folder = resolve_source(DEFAULT_ENCODER)
        try:
            encoder_config = BertConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"no BERT config.json in {folder}: {exc}") from exc
        # Training runs in train mode; dropout would make an untuned tower's
        # vectors differ from the index's, and full-softmax training does not need it.
        encoder_config.hidden_dropout_prob = 0.0
        encoder_config.attention_probs_dropout_prob = 0.0
        tower = cls(encoder_config, folder, base=encoder_version(), scale=scale)
        _load_pretrained(tower.encoder, folder)
        return tower.eval()

    def save(self, directory: str | Path) -> None:
        """``tower.json`` and ``tower.safetensors``; the bank stays with the ontology."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        tmp = directory / f".{WEIGHTS_FILE}.tmp"
        save_file(state, str(tmp))
        tmp.replace(directory / WEIGHTS_FILE)
        meta = {"kind": self.kind, **self.config, "encoder_config": self.encoder.config.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, default=str))

    @classmethod
    def load(cls, directory: str | Path) -> QueryTower:
        from safetensors.torch import load_file

        from kronlink.models._text import DEFAULT_ENCODER, resolve_source

        directory = Path(directory)
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
            state = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read a query tower in {directory}: {exc}") from exc
        if meta.get("kind") != cls.kind:
            raise CheckpointError(
                f"{directory}: expected kind {cls.kind!r}, got {meta.get('kind')!r}"
            )
        encoder_config = BertConfig.from_dict(meta["encoder_config"])
        tower = cls(
            encoder_config, resolve_source(DEFAULT_ENCODER), base=meta["base"], scale=meta["scale"]
        )
        try:
            tower.encoder.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{directory}: weights do not fit the tower: {exc}") from exc
        return tower.eval()

    # the bank ---------------------------------------------------------------

    def set_bank(self, index: DenseIndex) -> QueryTower:
        """Score against ``index``'s concepts from now on (frozen vectors)."""
        if index.encoder != self.base:
            raise ConfigError(
                f"the dense index was made by {index.encoder}; this tower's concept side is "
                f"{self.base}: rebuild the index with it"
            )
        weight = self.encoder.embeddings.word_embeddings.weight
        self.bank = torch.from_numpy(np.ascontiguousarray(index.vectors)).to(weight)
        counts = np.diff(np.append(index.starts, len(index.vectors)))
        self.entry_concept = torch.from_numpy(np.repeat(np.arange(len(index.starts)), counts)).to(
            weight.device
        )
        self.ids = tuple(index.ids)
        self._position = {cid: i for i, cid in enumerate(self.ids)}
        return self

    # the Ranker contract ------------------------------------------------------

    def encode(self, queries: Sequence[Query]) -> RankerBatch:
        """Mention word pieces (B, T); every concept of the bank is a candidate.
        A gold concept outside the bank gets label -1 (skipped by the loss)."""
        if not self.ids:
            raise ConfigError("the tower has no bank: call set_bank(dense_index) first")
        ids, mask = self._pieces([q.mention for q in queries])
        labels = torch.tensor([self._position.get(q.gold or "", -1) for q in queries])
        return RankerBatch(
            features={"input_ids": ids, "attention_mask": mask},
            candidate_mask=torch.ones(len(queries), len(self.ids), dtype=torch.bool),
            labels=labels,
        )

    def _pieces(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer.encode_batch(list(texts))
        return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, hidden) unit vectors: the mean of the real tokens' last states."""
        n, width = input_ids.shape
        # explicit (N, T) positions: the curvature hooks need every Embedding
        # to see (N, T) ids (BERT's default is a broadcast (1, T))
        positions = torch.arange(width, device=input_ids.device).expand(n, width)
        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=positions,
        ).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, batch: RankerBatch) -> Tensor:
        f = batch.features
        q = self.embed(f["input_ids"], f["attention_mask"])
        return self.scale * self.concept_cosines(q)

    def concept_cosines(self, q: Tensor) -> Tensor:
        """(B, concepts): each concept's best cosine over its entries."""
        sims = q @ self.bank.T
        if len(self.bank) == len(self.ids):  # one entry a concept
            return sims
        out = sims.new_full((len(q), len(self.ids)), -2.0)  # below any cosine
        index = self.entry_concept.unsqueeze(0).expand_as(sims)
        return out.scatter_reduce(1, index, sims, "amax", include_self=False)

    def token_layouts(self, batch: RankerBatch) -> dict[str, TokenLayout]:
        """Every encoder module sees (B, T) positions, one row per query."""
        mask = batch.features["attention_mask"].bool()
        example = torch.arange(mask.shape[0], device=mask.device)
        return {
            f"encoder.{name}": TokenLayout(mask, example)
            for name, module in self.encoder.named_modules()
            if isinstance(module, nn.Linear | nn.Embedding | nn.LayerNorm)
        }

    def query_encoder(self, batch_size: int = 256) -> QueryEncoder:
        """What a :class:`~kronlink.retrieval.Retriever` calls to encode mentions."""
        return QueryEncoder(self, batch_size)


class QueryEncoder:
    """The tower as a retriever's encoder: ``version`` is the concept side's,
    so a Retriever accepts the ontology's index; ``tuned`` says which tower."""

    def __init__(self, tower: QueryTower, batch_size: int = 256) -> None:
        self.tower = tower
        self.version = tower.base
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), hidden) float32 unit rows, sorted into batches by length."""
        tower = self.tower
        hidden = tower.encoder.config.hidden_size
        out = np.zeros((len(texts), hidden), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        was_training = tower.training
        tower.eval()
        device = tower.bank.device
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                ids, mask = tower._pieces([texts[i] for i in idx])
                out[idx] = tower.embed(ids.to(device), mask.to(device)).float().cpu().numpy()
        tower.train(was_training)
        return out


# training -------------------------------------------------------------------


@dataclass(frozen=True)
class TuneConfig:
    epochs: int = 1
    batch_size: int = 64
    lr: float = 2e-5  # SapBERT's rate for a pretrained BERT
    weight_decay: float = 0.01
    warmup: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    max_train: int | None = None  # a seeded subset of the train mentions (CPU budgets)
    evals_per_epoch: int = 1
    eval_k: int = 10  # the dev metric that picks the kept weights: dense recall@eval_k

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


@dataclass
class TuneResult:
    best_dev: float | None
    start_dev: float | None
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    stopped: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def recall_at(
    tower: QueryTower, queries: Sequence[Query], ks: Sequence[int] = (1, 10, 25, 100)
) -> dict[str, float]:
    """Dense recall@k of the tower alone over its bank (gold outside: a miss)."""
    if not queries:
        return {str(k): float("nan") for k in ks}
    vectors = tower.query_encoder().encode([q.mention for q in queries])
    q = torch.from_numpy(vectors).to(tower.bank)
    top = max(ks)
    hits = {k: 0 for k in ks}
    with torch.inference_mode():
        for s in range(0, len(q), 256):
            sims = tower.concept_cosines(q[s : s + 256])
            ranked = sims.topk(min(top, sims.shape[1]), dim=1).indices.cpu().tolist()
            for row, query in zip(ranked, queries[s : s + 256], strict=True):
                gold = tower._position.get(query.gold or "", -1)
                for k in ks:
                    hits[k] += gold in row[:k]
    return {str(k): round(hits[k] / len(queries), 4) for k in ks}


def tune(
    tower: QueryTower,
    train_queries: Sequence[Query],
    dev_queries: Sequence[Query] = (),
    config: TuneConfig | None = None,
    *,
    penalty: Callable[[nn.Module], Tensor] | None = None,
    on_progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TuneResult:
    """Fine-tune the tower in place: cross-entropy of the gold concept under a
    softmax over the whole bank, plus ``penalty(tower)``; keep the weights
    with the best dev recall@``eval_k`` (the starting weights included, so
    tuning never returns a tower worse on dev than it was given)."""
    cfg = config or TuneConfig()
    if not tower.ids:
        raise ConfigError("the tower has no bank: call set_bank(dense_index) first")
    usable = [q for q in train_queries if (q.gold or "") in tower._position]
    if not usable:
        raise ConfigError("no train mention's gold concept is in the tower's bank")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.max_train is not None and len(usable) > cfg.max_train:
        usable = rng.sample(usable, cfg.max_train)
    data = tower.encode(usable)  # tokenised once
    ids, mask, labels = data.features["input_ids"], data.features["attention_mask"], data.labels
    device = tower.bank.device

    def dev_metric() -> float | None:
        if not dev_queries:
            return None
        return recall_at(tower, dev_queries, (cfg.eval_k,))[str(cfg.eval_k)]

    start = dev_metric()
    best, best_state = start, _copy(tower)
    steps_per_epoch = math.ceil(len(usable) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup * total))
    opt = torch.optim.AdamW(tower.encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    eval_at = {
        round(steps_per_epoch * (j + 1) / cfg.evals_per_epoch) for j in range(cfg.evals_per_epoch)
    }
    history: list[dict] = []
    step, stopped, t0 = 0, False, time.perf_counter()
    order = list(range(len(usable)))
    tower.train()
    for epoch in range(cfg.epochs):
        rng.shuffle(order)
        for b in range(steps_per_epoch):
            if should_stop is not None and should_stop():
                stopped = True
                break
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            m = mask[idx]
            width = int(m.sum(1).max())  # trim the padding this batch does not need
            batch = RankerBatch(
                features={
                    "input_ids": ids[idx, :width].to(device),
                    "attention_mask": m[:, :width].to(device),
                },
                candidate_mask=torch.ones(
                    len(idx), len(tower.ids), dtype=torch.bool, device=device
                ),
                labels=labels[idx].to(device),
            )
            loss = ranking_loss(tower(batch), batch.candidate_mask, batch.labels)
            pen = penalty(tower) if penalty is not None else None
            opt.zero_grad(set_to_none=True)
            (loss + pen if pen is not None else loss).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(tower.encoder.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            event = {
                "epoch": epoch,
                "step": step,
                "total_steps": total,
                "loss": float(loss.detach()),
                "penalty": float(pen.detach()) if pen is not None else 0.0,
            }
            if (b + 1) in eval_at:
                event["dev_recall"] = dev_metric()
                tower.train()
                history.append(dict(event))
                if best is None or (event["dev_recall"] or 0.0) > best:
                    best, best_state = event["dev_recall"], _copy(tower)
            if on_progress is not None:
                on_progress(event)
        if stopped:
            break
    tower.encoder.load_state_dict(best_state)
    tower.eval()
    return TuneResult(
        best_dev=best,
        start_dev=start,
        steps=step,
        seconds=round(time.perf_counter() - t0, 1),
        history=history,
        stopped=stopped,
    )


def _copy(tower: QueryTower) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in tower.encoder.state_dict().items()}
