"""Backend refusals during partitioning: every device segment of an attempt is emitted, the nodes each
refusal's errors name move to the host together (but for an error whose nodes all depend on another's),
planning repeats, device segments compiled in an earlier attempt are reused, and every step is reported to
the request's progress callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qanac.backend import EmitResult
from qanac.calibration import CalibrationData, Preprocessing
from qanac.compiler import CompileRequest, EmitProgress, emit_segments
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError
from tests.conftest import conv_chain


class RefusingBackend:
    """Refuses any model holding one of ``refused`` (naming it, as the Akida backend names the node it
    cannot convert); records what it was asked to compile."""

    variants = ()

    def __init__(self, refused: set[str]):
        self.refused = refused
        self.calls: list[tuple[str, ...]] = []

    def emit(self, model: onnx.ModelProto, data, options, folder: Path) -> EmitResult:
        # (a segment starting at a 4-channel conv gets an identity input layer: not the test's concern)
        names = tuple(n.name for n in model.graph.node if not n.name.endswith("::identity-input"))
        self.calls.append(names)
        bad = [n for n in names if n in self.refused]
        if bad:
            raise UnsupportedModelError(f"cannot convert '{bad[0]}'",
                                        diagnostics=[Diagnostic(Level.ERROR, "TEST1", "refused", nodes=bad)])
        (folder / "model.bin").write_bytes(b"compiled " + ",".join(names).encode())
        return EmitResult(files={"compiled": "model.bin"}, report={}, summary="ok")


def test_refused_node_moves_and_compiled_segments_are_reused(tmp_path):
    model = conv_chain(5)
    x = np.random.default_rng(1).normal(size=(4, 4, 8, 8)).astype(np.float32)
    data = CalibrationData(arrays={"x": x}, source="test", preprocessing=Preprocessing())
    backend = RefusingBackend({"conv3"})
    request = CompileRequest(source="m.onnx", target="test", output=tmp_path / "unused")
    stage = tmp_path / "stage"
    stage.mkdir()

    emitted = emit_segments(model, {"relu1": "lint error"}, data, backend, request, stage)

    kinds = [(s.segment.kind, len(s.segment.nodes)) for s in emitted.segments]
    assert kinds == [("device", 3), ("host", 1), ("device", 2), ("host", 1), ("device", 3)]
    part004 = [d for d in emitted.diagnostics if d.code == "PART004"]
    assert len(part004) == 1 and part004[0].nodes == ["conv3"]
    # attempt 1: conv0..conv1 (compiled), conv2..relu4 (refused); attempt 2: conv0..conv1 again (from the
    # cache, not the backend), conv2..relu2, relu3..relu4
    assert backend.calls[0] == ("conv0", "relu0", "conv1") and backend.calls[1][:2] == ("conv2", "relu2")
    assert backend.calls.count(("conv0", "relu0", "conv1")) == 1 and len(backend.calls) == 4
    assert (emitted.attempts, emitted.backend_calls) == (2, 4)
    assert sorted(p.name for p in stage.iterdir()) == [f"seg{i}" for i in range(5)]  # no scratch or cache left
    assert (stage / "seg0" / "model.bin").read_bytes() == b"compiled conv0,relu0,conv1"


def branches() -> onnx.ModelProto:
    """conv_in -> relu_in, then two branches conv_a -> relu_a and conv_b -> relu_b, added, conv_out -> relu_out."""

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), f"w_{k}")
             for k in ("in", "a", "b", "out")]

    def conv_relu(x: str, k: str) -> list[onnx.NodeProto]:
        return [helper.make_node("Conv", [x, f"w_{k}"], [f"c_{k}"], name=f"conv_{k}", pads=[1, 1, 1, 1]),
                helper.make_node("Relu", [f"c_{k}"], [f"r_{k}"], name=f"relu_{k}")]

    nodes = [*conv_relu("x", "in"), *conv_relu("r_in", "a"), *conv_relu("r_in", "b"),
             helper.make_node("Add", ["r_a", "r_b"], ["s"], name="add"), *conv_relu("s", "out")]
    graph = helper.make_graph(nodes, "branches",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("r_out", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def compile_with(model: onnx.ModelProto, backend: RefusingBackend, tmp_path, host_nodes=None):
    x = np.random.default_rng(1).normal(size=(4, 4, 8, 8)).astype(np.float32)
    data = CalibrationData(arrays={"x": x}, source="test", preprocessing=Preprocessing())
    events: list[EmitProgress] = []
    request = CompileRequest(source="m.onnx", target="test", output=tmp_path / "unused", progress=events.append)
    stage = tmp_path / "stage"
    stage.mkdir(parents=True)
    return emit_segments(model, host_nodes or {}, data, backend, request, stage), events


def test_every_node_a_refusal_names_moves_in_one_attempt(tmp_path):
    backend = RefusingBackend({"conv_a", "conv_b"})
    emitted, events = compile_with(branches(), backend, tmp_path)

    part004 = [d for d in emitted.diagnostics if d.code == "PART004"]
    assert len(part004) == 1 and part004[0].nodes == ["conv_a", "conv_b"]
    # attempt 1: the whole model, refused; attempt 2: conv_in..relu_in and conv_out..relu_out
    assert backend.calls[1:] == [("conv_in", "relu_in"), ("conv_out", "relu_out")]
    assert (emitted.attempts, emitted.backend_calls) == (2, 3)
    assert {e.attempt for e in events} == {1, 2}
    host = [s.segment.nodes for s in emitted.segments if s.emitted is None]
    assert host == [["conv_a", "relu_a", "conv_b", "relu_b", "add"]]


def test_refusals_of_all_segments_of_an_attempt_move_together(tmp_path):
    # relu1 on the host (lint) splits the chain: both device segments are refused in attempt 1
    backend = RefusingBackend({"conv0", "conv3"})
    emitted, events = compile_with(conv_chain(5), backend, tmp_path, {"relu1": "lint error"})

    assert [d.nodes for d in emitted.diagnostics if d.code == "PART004"] == [["conv0"], ["conv3"]]
    refused = [(e.attempt, e.segment, e.segments) for e in events if e.step == "refused"]
    assert refused == [(1, 1, 3), (1, 3, 3)]
    assert max(e.attempt for e in events) == 2


class OneErrorPerNodeBackend(RefusingBackend):
    """Names each refused node in an error of its own (as the Akida backend names a root cause and the nodes
    left unquantized after it)."""

    def emit(self, model: onnx.ModelProto, data, options, folder: Path) -> EmitResult:
        try:
            return super().emit(model, data, options, folder)
        except UnsupportedModelError as exc:
            named = exc.diagnostics[0].nodes
            raise UnsupportedModelError(exc.message, diagnostics=[
                Diagnostic(Level.ERROR, "TEST1", "refused", nodes=[n]) for n in named]) from None


def test_an_error_whose_nodes_depend_on_another_error_waits_for_the_next_attempt(tmp_path):
    # conv3 depends on conv1: it may fail only because of conv1, so only conv1 moves first
    emitted, _ = compile_with(conv_chain(5), OneErrorPerNodeBackend({"conv1", "conv3"}), tmp_path)
    assert [d.nodes for d in emitted.diagnostics if d.code == "PART004"] == [["conv1"], ["conv3"]]
    # the nodes of one error move together, even when they depend on each other
    emitted, _ = compile_with(conv_chain(5), RefusingBackend({"conv1", "conv3"}), tmp_path / "one")
    assert [d.nodes for d in emitted.diagnostics if d.code == "PART004"] == [["conv1", "conv3"]]


def test_progress_reports_every_step_of_every_attempt(tmp_path):
    backend = RefusingBackend({"conv3"})
    _, events = compile_with(conv_chain(5), backend, tmp_path, {"relu1": "lint error"})

    steps = [(e.attempt, e.step, e.segment, e.segments) for e in events]
    assert steps == [
        (1, "plan", 0, 3), (1, "activations", 0, 3), (1, "emit", 1, 3), (1, "emit", 3, 3), (1, "refused", 3, 3),
        (2, "plan", 0, 5), (2, "activations", 0, 5), (2, "reuse", 1, 5), (2, "emit", 3, 5), (2, "emit", 5, 5),
        (2, "host", 2, 5), (2, "host", 4, 5),  # host segments are written for the accepted plan only
    ]
    emit = next(e for e in events if e.step == "emit")
    assert emit.format() == "[attempt 1, segment 1/3] compiling 3 node(s) (40.0% of MACs) for test"
    assert emit.to_dict() == {"attempt": 1, "step": "emit", "segment": 1, "segments": 3,
                              "message": "compiling 3 node(s) (40.0% of MACs) for test"}


def test_a_refusal_moving_several_nodes_is_one_finding_listing_them(tmp_path):
    emitted, _ = compile_with(conv_chain(5), RefusingBackend({"conv1", "conv2", "conv3"}), tmp_path)

    naming = [d for d in emitted.diagnostics if {"conv1", "conv2", "conv3"} & set(d.nodes)]
    assert [(d.code, d.nodes) for d in naming] == [("PART004", ["conv1", "conv2", "conv3"])]
    assert naming[0].message == "moved to the host: cannot convert 'conv1' (3 node(s) from 'conv1')"
    host = [n for s in emitted.segments if s.emitted is None for n in s.segment.nodes]
    assert {"conv1", "conv2", "conv3"} <= set(host)
