"""Backend refusals during partitioning: the node a refusal names first moves to the host, planning
repeats, and device segments compiled in an earlier attempt are reused, not compiled again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qanac.backend import EmitResult
from qanac.calibration import CalibrationData, Preprocessing
from qanac.compiler import CompileRequest, emit_segments
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError


def five_convs() -> onnx.ModelProto:
    """conv0 -> relu0 -> ... -> conv4 -> relu4, 1x4x8x8 (equal MACs per conv)."""

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(5):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


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


def test_refused_node_moves_alone_and_compiled_segments_are_reused(tmp_path):
    model = five_convs()
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
    assert sorted(p.name for p in stage.iterdir()) == [f"seg{i}" for i in range(5)]  # no scratch or cache left
    assert (stage / "seg0" / "model.bin").read_bytes() == b"compiled conv0,relu0,conv1"
