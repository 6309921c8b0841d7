"""attention-freeze: structure after, numerics against a hand-frozen gate, cases where it must not fire,
opt-in only, and the --max-deviation refusal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from qanac.calibration import CalibrationData, Preprocessing
from qanac.cli import cli
from qanac.diagnostics import VerificationError
from qanac.execution import run_onnx, tensor_values
from qanac.graph import CompilationModel
from qanac.pipeline import PassContext, PipelineOptions, run_pipeline
from qanac.registry import load_builtin_passes

C = 4


def se_model(gate_reader: str = "conv") -> onnx.ModelProto:
    """Conv -> Relu -> SE gate (GAP, 1x1 conv, Sigmoid) -> Mul -> [Conv | GAP] ; x: 1x3x8x8."""

    rng = np.random.default_rng(0)
    init = {
        "w1": rng.normal(0, 0.5, (C, 3, 3, 3)), "b1": rng.normal(0, 0.1, C),
        "wg": rng.normal(0, 0.5, (C, C, 1, 1)), "bg": rng.normal(0, 0.1, C),
        "w2": rng.normal(0, 0.5, (C, C, 3, 3)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["sq"], name="squeeze"),
        helper.make_node("Conv", ["sq", "wg", "bg"], ["ex"], name="excite"),
        helper.make_node("Sigmoid", ["ex"], ["gate"], name="gate_sigmoid"),
        helper.make_node("Mul", ["r1", "gate"], ["gated"], name="gate_mul"),
    ]
    if gate_reader == "conv":
        nodes.append(helper.make_node("Conv", ["gated", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]))
        out_shape = ["N", C, 8, 8]
    else:
        nodes.append(helper.make_node("GlobalAveragePool", ["gated"], ["y"], name="pool"))
        out_shape = ["N", C, 1, 1]
    graph = helper.make_graph(
        nodes, "se", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def calibration(n: int = 16) -> CalibrationData:
    x = np.random.default_rng(1).uniform(0, 1, (n, 3, 8, 8)).astype(np.float32)
    return CalibrationData(arrays={"x": x}, source="test", preprocessing=Preprocessing())


def frozen_reference(model: onnx.ModelProto, data: CalibrationData) -> list[np.ndarray]:
    """The model with its gate replaced by the gate's per-channel mean, computed by hand."""

    gate = tensor_values(model, data.arrays, ["gate"])["gate"].mean(axis=(0, 2, 3)).reshape(1, C, 1, 1)
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    frozen.graph.initializer.append(numpy_helper.from_array(gate.astype(np.float32), "frozen_gate"))
    for node in frozen.graph.node:
        if node.name == "gate_mul":
            node.input[1] = "frozen_gate"
    return run_onnx(frozen, data.arrays)


def freeze(model: onnx.ModelProto, **options):
    load_builtin_passes()
    cm = CompilationModel.from_onnx(model)
    ctx = PassContext("akida", calibration(), approximations=frozenset({"attention-freeze"}))
    report = run_pipeline(cm, ["attention-freeze"], ctx, PipelineOptions(**options))
    return cm, report


@pytest.mark.parametrize("reader, rewrite", [("conv", "freeze-gate-into-next-conv"),
                                             ("pool", "freeze-gate-into-previous-conv")])
def test_gate_is_frozen_and_folded(reader, rewrite):
    model = se_model(reader)
    cm, report = freeze(model)
    assert report.totals()["attention-freeze"]["counts"] == {rewrite: 1}
    ops = [n.op for n in cm.graph.nodes]
    assert "Sigmoid" not in ops and "Mul" not in ops  # the gate branch is gone, nothing left to multiply
    assert ops.count("Conv") == (2 if reader == "conv" else 1)
    actual = run_onnx(cm.to_onnx(), calibration().arrays)[0]
    np.testing.assert_allclose(actual, frozen_reference(model, calibration())[0], rtol=1e-5, atol=1e-5)
    assert report.totals()["attention-freeze"]["max_abs_change"] > 0  # measured against the float model


def test_does_not_fire_on_swish_or_plain_products():
    load_builtin_passes()
    swish = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4] x, float[N,4] z) => (float[N,4] y, float[N,4] p) {
      s = Sigmoid(x)
      y = Mul(x, s)
      p = Mul(x, z)
    }""")
    cm = CompilationModel.from_onnx(swish)
    data = CalibrationData(arrays={"x": np.ones((2, 4), np.float32), "z": np.ones((2, 4), np.float32)},
                           source="t", preprocessing=Preprocessing())
    ctx = PassContext("akida", data, approximations=frozenset({"attention-freeze"}))
    report = run_pipeline(cm, ["attention-freeze"], ctx)
    assert report.totals()["attention-freeze"]["counts"] == {}
    assert [n.op for n in cm.graph.nodes] == ["Sigmoid", "Mul", "Mul"]


def test_runs_only_when_asked_and_respects_max_deviation():
    load_builtin_passes()
    cm = CompilationModel.from_onnx(se_model())
    report = run_pipeline(cm, ["attention-freeze"], PassContext("akida", calibration()))
    assert report.records == [] and "Sigmoid" in [n.op for n in cm.graph.nodes]
    with pytest.raises(VerificationError, match="attention-freeze"):
        freeze(se_model(), max_deviation=1e-9)


def test_cli_refuses_with_exit_1_above_max_deviation(tmp_path):
    path = tmp_path / "se.onnx"
    onnx.save(se_model(), str(path))
    np.save(tmp_path / "calib.npy", calibration().arrays["x"])
    result = CliRunner().invoke(cli, ["compile", str(path), "--target", "onnxruntime", "--calib",
                                      str(tmp_path / "calib.npy"), "-o", str(tmp_path / "b"),
                                      "--pipeline", "infer-shapes,attention-freeze", "--approx", "attention-freeze",
                                      "--max-deviation", "1e-9"])
    assert result.exit_code == 1, result.output
    assert "--max-deviation" in result.output and not (tmp_path / "b").exists()
