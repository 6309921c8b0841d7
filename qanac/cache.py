"""qanac's cache folder: derived data kept between runs, never beside the user's own files.

The folder is ``$QANAC_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/qanac``, else ``~/.cache/qanac``.
A cache is an optimisation only: a folder that cannot be made, or an entry that cannot be read or written,
means working without it, never an error. Entries are written to a temporary name and renamed, so an
interrupted write leaves no truncated entry under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np

from qanac.atomic import replaced_atomically


def cache_root() -> Path:
    configured = os.environ.get("QANAC_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qanac"


def cache_file(kind: str, *key: str, suffix: str = ".npz") -> Path | None:
    """The path of the entry of ``kind`` for ``key`` (hashed into the name), its folder made; None when the
    folder cannot be made."""

    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:24]
    folder = cache_root() / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder / f"{digest}{suffix}"


def load_arrays(path: Path | None) -> dict[str, np.ndarray] | None:
    """The arrays of an ``.npz`` entry, or None when there is none or it cannot be read."""

    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def save_arrays(path: Path | None, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` entry atomically; a failure leaves the cache as it was."""

    if path is None:
        return
    with contextlib.suppress(OSError), replaced_atomically(path) as stream:
        np.savez(stream, **arrays)
