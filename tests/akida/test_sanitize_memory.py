"""The model copies quantizeml's sanitizer discards are freed while it runs, not when it returns, both in
lint's view (``patterns.sanitized``) and in quantizing (``convert.quantize_onnx``, whose ``quantize()``
sanitizes).

Its transforms check and re-infer the model through onnx_ir after each step; each onnx_ir graph is a
reference cycle that holds a full copy of the model, so unless cycles are collected during the sanitize,
about one copy per transform stays resident until it returns. The tests count the onnx_ir graphs alive
(reachable or not yet collected) each time the sanitizer converts a proto to onnx_ir.
"""

from __future__ import annotations

import contextlib
import gc

import onnx_ir
import pytest

from qanac import memory
from qanac.backends.akida import convert, patterns
from tests.akida import akida_models
from tests.conftest import conv_chain


def _ir_graphs() -> int:
    return sum(type(o) is onnx_ir.Graph for o in gc.get_objects())


def _ir_graphs_per_conversion(monkeypatch, run=patterns.sanitized) -> list[int]:
    """``run`` (lint's sanitize, or quantizing) on a 40-layer chain, counting the onnx_ir graphs alive
    beyond those alive before, each time the sanitizer converts a proto to onnx_ir."""

    patterns.vendor()
    patterns.forget_sanitized()  # the same model sanitized by an earlier test would not be sanitized again
    gc.collect()
    before = _ir_graphs()
    counts: list[int] = []
    from_proto = onnx_ir.from_proto

    def counting(proto):
        counts.append(_ir_graphs() - before)
        return from_proto(proto)

    monkeypatch.setattr(onnx_ir, "from_proto", counting)
    run(conv_chain(40, classes=10))
    return counts


def _quantized(model):
    return convert.quantize_onnx(model, akida_models.image_calibration(model, count=4).arrays["input"], "int8")


@pytest.mark.parametrize("held", [0, 2_000_000], ids=["small-heap", "large-heap"])
def test_sanitizer_copies_do_not_accumulate(monkeypatch, held):
    # ``held`` objects alive before the sanitize: CPython's full collections wait for a quarter of the
    # objects the last one kept, so a process holding many (a long test run, a large application) must
    # not change the schedule inside the block
    alive = [[] for _ in range(held)]
    counts = _ir_graphs_per_conversion(monkeypatch)
    del alive
    assert len(counts) > 20  # one per transform that checks the model, over both passes
    # at every conversion, the graphs discarded since the last collection, not one per transform so far
    assert max(counts) <= len(counts) // 4, counts


def test_uncollected_copies_are_what_the_test_detects(monkeypatch):
    # the same sanitize with cycles left to CPython's default schedule keeps most of its copies alive
    monkeypatch.setattr(memory, "collecting_discarded_copies", contextlib.nullcontext)
    counts = _ir_graphs_per_conversion(monkeypatch)
    assert counts[-1] > len(counts) // 2, counts


def test_quantizing_does_not_accumulate_copies_either(monkeypatch):
    counts = _ir_graphs_per_conversion(monkeypatch, _quantized)
    assert len(counts) > 20
    assert max(counts) <= len(counts) // 4, counts
