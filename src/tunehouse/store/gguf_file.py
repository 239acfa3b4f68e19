"""Check a GGUF file before anything loads it: a truncated or corrupt file (an interrupted copy or
download, a file that is not GGUF at all) gets an error that says so, instead of whatever numpy
raises deep inside a reader. Read with gguf-py's own reader (`gguf.GGUFReader`), never by hand."""

from __future__ import annotations

from pathlib import Path

MAGIC = b"GGUF"


class CorruptGGUF(ValueError):
    """The file is not a complete, readable GGUF file; the message says what is wrong."""


def check_gguf(path: Path) -> int:
    """Raise CorruptGGUF unless `path` is a whole GGUF file; returns its number of tensors."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise CorruptGGUF(f"{path} is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise CorruptGGUF(
            f"{path} is not a GGUF file: it starts with {head!r}, not {MAGIC!r}"
            + (" (the file is empty)" if size == 0 else "")
        )
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader's own errors (ValueError, IndexError, struct errors …)
        raise CorruptGGUF(
            f"{path} is a truncated or corrupt GGUF file ({size} bytes; gguf: {type(e).__name__}: {e})"
        ) from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CorruptGGUF(
                f"{path} is truncated: tensor {t.name} ends at byte {end}, the file has {size} bytes"
            )
    if not reader.tensors:
        raise CorruptGGUF(f"{path} holds no tensors: it is not a model")
    return len(reader.tensors)
