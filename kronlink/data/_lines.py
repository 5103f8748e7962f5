"""Line reading shared by every reader: size check first, then UTF-8 line by line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kronlink.errors import DataFormatError


def check_size(path: Path, max_bytes: int) -> None:
    """Refuse a missing file or one over ``max_bytes`` before reading a byte."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataFormatError("file not found", path=path) from None
    if size > max_bytes:
        raise DataFormatError(
            f"file too large: expected at most {max_bytes} bytes, got {size}", path=path
        )


def text_lines(path: Path, max_bytes: int) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its newline).

    Decoding line by line lets invalid UTF-8 be reported with its line. A
    byte order mark at the start of the file is dropped.
    """
    check_size(path, max_bytes)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(
                    f"invalid UTF-8: byte {raw[e.start]:#04x} at column {e.start + 1}",
                    path=path,
                    line=lineno,
                ) from None
            if lineno == 1:
                # A UTF-8 byte order mark (Notepad, Excel exports) is encoding
                # noise, not content: json.loads would refuse the first line.
                text = text.removeprefix("\ufeff")
            yield lineno, text.rstrip("\r\n")
