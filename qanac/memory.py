"""Keeping a compile's memory to what it uses: discarded copies collected while a library makes them, and
freed memory returned to the system.

The libraries a compile drives (tf2onnx's graph optimizer, quantizeml's sanitizer and ``quantize()``)
work on copies of the model and discard them step by step. What holds a copy (a tf2onnx graph, an onnx_ir
graph: nodes and values that refer to each other) is a reference cycle, freed only by CPython's full
collection. CPython runs one only when the objects made since the last one reach a quarter of those the
last one kept, hundreds of thousands in a process that imported TensorFlow, so without
``collecting_discarded_copies`` most copies stay resident until the step returns: one copy per optimizer
or transform, gigabytes on a ResNet-50.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from collections.abc import Iterator
from typing import Any

_depth = 0  # how many collecting_discarded_copies blocks are open


@contextlib.contextmanager
def collecting_discarded_copies() -> Iterator[None]:
    """Within the block, collect unreachable reference cycles soon after they form, scanning only the
    objects made inside the block.

    On entry the heap memory already freed is returned to the system (glibc's ``malloc_trim``). The
    objects alive on entry are frozen (``gc.freeze``: never scanned, so a full collection costs only
    what the block made); one full collection over the empty rest resets CPython's count of long-lived
    objects, so the schedule does not depend on what the process held before; a full collection is then
    considered after every young one. On exit, error or not, the objects are unfrozen, the thresholds
    restored and the memory freed returned to the system (``release_freed_memory``). A block inside
    another changes nothing: the outer one already collects."""

    global _depth
    if _depth:
        yield
        return
    threshold = gc.get_threshold()
    _depth += 1
    _return_free_heap()  # what earlier steps freed, so that the block's peak starts from what is in use
    gc.freeze()
    gc.collect()  # over nothing (all frozen): sets the count of long-lived objects to zero
    gc.set_threshold(threshold[0], 1, 1)
    try:
        yield
    finally:
        _depth -= 1
        gc.set_threshold(*threshold)
        gc.unfreeze()
        release_freed_memory()


def release_freed_memory() -> None:
    """Return to the system the memory Python has freed (glibc's ``malloc_trim``; elsewhere only a garbage
    collection). glibc keeps freed blocks in its heap, so without this each step that made and dropped
    copies of the model would leave the process larger by about its own peak, and a compile that
    sanitizes four times would hold all four."""

    gc.collect()
    _return_free_heap()


def _return_free_heap() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    return getattr(ctypes.CDLL(None), "malloc_trim", None)
