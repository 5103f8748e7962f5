"""Row assembly: contexts are cut to the budget, the mention never."""

from __future__ import annotations

import pytest

from kronlink.models._text import WordPieces


@pytest.fixture
def pieces() -> WordPieces:
    return WordPieces.tiny()


# (left length, mention length, right length, budget) -> kept (left, right)
CASES = [
    ((10, 3, 10, 100), (10, 10)),
    ((10, 3, 10, 15), (5, 5)),  # room 10 split evenly
    ((2, 3, 10, 15), (2, 8)),  # the right side takes what the left leaves
    ((10, 3, 1, 15), (9, 1)),
    ((10, 3, 10, 4), (0, 0)),  # no room: contexts dropped
    ((10, 30, 10, 4), (0, 0)),  # mention longer than the budget: kept whole
]


@pytest.mark.parametrize(("sizes", "kept"), CASES)
def test_query_pieces_cut_contexts_only(pieces: WordPieces, sizes, kept) -> None:
    n_left, n_mention, n_right, budget = sizes
    left = list(range(100, 100 + n_left))
    mention = list(range(200, 200 + n_mention))
    right = list(range(300, 300 + n_right))
    out = pieces.query_pieces(left, mention, right, budget)
    start, end = pieces.markers
    i, j = out.index(start), out.index(end)
    assert out[i + 1 : j] == mention
    assert (i, len(out) - j - 1) == kept
    # The left context keeps the words next to the mention, so does the right.
    assert out[:i] == left[len(left) - kept[0] :] if kept[0] else out[:i] == []
    assert out[j + 1 :] == right[: kept[1]]


def test_unmarked_mention_is_concatenated() -> None:
    pieces = WordPieces.tiny(mention_markers=None)
    assert pieces.query_pieces([1, 2], [3], [4], 10) == [1, 2, 3, 4]


def test_tiny_vocabulary_round_trips_ascii(pieces: WordPieces) -> None:
    ids = pieces.ids(["Myocardial infarction, type 2"])[0]
    assert pieces.tokenizer.decode(ids) == "myocardial infarction, type 2"
