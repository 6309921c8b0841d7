"""Output that native libraries write straight to file descriptors, past Python's sys.stdout/sys.stderr.

TensorFlow 2.19 prints, on import, absl log lines about cuDNN/cuBLAS factories and computation placers
"already registered" (E0000 / W0000 lines, before absl is initialised, so TF_CPP_MIN_LOG_LEVEL does not
silence them). They are harmless on a CPU machine and would otherwise precede every Akida compile;
``import_tensorflow_quietly`` discards them. An import that fails still raises its Python exception.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def native_output_discarded(fd: int) -> Iterator[None]:
    """Discard what native code writes to file descriptor ``fd`` (1 or 2) inside the block."""

    stream = sys.stdout if fd == 1 else sys.stderr
    stream.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        stream.flush()
        os.dup2(saved, fd)
        os.close(saved)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (once) with its native start-up log lines discarded."""

    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with native_output_discarded(2):
        import tensorflow  # noqa: F401
