"""Files replaced atomically: a reader sees the old content or the new, never part of it, and a failed write
leaves nothing behind. Imports nothing of qanac, so any module may use it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def replaced_atomically(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary stream whose content replaces ``path`` when the block ends: written to a temporary file
    beside it, then renamed, so a reader sees the old file or the new one, never part of one. Any failure,
    an interruption too, removes the temporary file and propagates. ``mode`` sets the new file's
    permissions (else mkstemp's 0600)."""

    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
