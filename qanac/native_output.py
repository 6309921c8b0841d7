"""Output that native libraries write straight to file descriptors, past Python's sys.stdout/sys.stderr.

Some frameworks print on import: TensorFlow 2.19, for one, writes absl log lines about cuDNN/cuBLAS
factories "already registered" (E0000 / W0000 lines, before absl is initialised, so its log-level variable
does not silence them). They are harmless on a CPU machine and would otherwise precede every compile that
needs the framework; ``import_quietly`` discards them. An import that fails still raises its Python
exception.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Mapping
from types import ModuleType


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


def import_quietly(module: str, environ: Mapping[str, str] | None = None) -> ModuleType:
    """Import ``module`` (once) with what native code writes to stderr during the import discarded;
    ``environ`` (a library's own log-level switches) is set first where the user has not set it."""

    if module in sys.modules:
        return sys.modules[module]
    for key, value in (environ or {}).items():
        os.environ.setdefault(key, value)
    with native_output_discarded(2):
        return importlib.import_module(module)
