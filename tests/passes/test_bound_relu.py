"""bound-relu: Relu -> Clip(0, percentile of its calibration output), per layer; numerics against a
hand-computed bound; Relu6 and never-active Relus left; opt-in only; the measured deviation and
--max-deviation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qanac.calibration import CalibrationData, Preprocessing
from qanac.diagnostics import UsageError, VerificationError
from qanac.execution import run_onnx, tensor_values
from qanac.graph import CompilationModel
from qanac.pipeline import PassContext, PipelineOptions, run_pipeline
from qanac.registry import load_builtin_passes


def relu_model() -> onnx.ModelProto:
    """x (N,3,8,8) -> Conv -> Relu -> Conv -> Relu6 (Clip 0..6) -> Conv(bias -100) -> Relu (always 0) -> + ."""

    rng = np.random.default_rng(0)
    init = {
        "w1": rng.normal(0, 0.5, (4, 3, 3, 3)), "w2": rng.normal(0, 0.5, (4, 4, 3, 3)),
        "w3": rng.normal(0, 0.1, (4, 4, 1, 1)), "b3": np.full(4, -100.0),
        "lo": np.array(0.0), "hi": np.array(6.0),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="dead_relu"),
        helper.make_node("Add", ["r2", "r3"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "relus", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in init.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def calibration(n: int = 32) -> CalibrationData:
    x = np.random.default_rng(1).uniform(0, 1, (n, 3, 8, 8)).astype(np.float32)
    return CalibrationData(arrays={"x": x}, source="test", preprocessing=Preprocessing())


def bound(model: onnx.ModelProto, approximations=frozenset({"bound-relu"}), options=None, **pipeline_options):
    load_builtin_passes()
    cm = CompilationModel.from_onnx(model)
    ctx = PassContext("akida", calibration(), approximations=approximations, options=options or {})
    report = run_pipeline(cm, ["bound-relu"], ctx, PipelineOptions(**pipeline_options))
    return cm, report


@pytest.mark.parametrize("percentile", [99.99, 90.0])
def test_relu_becomes_clip_at_the_calibration_percentile(percentile):
    model = relu_model()
    cm, report = bound(model, options={"bound-relu": {"percentile": percentile}})
    r1 = tensor_values(model, calibration().arrays, ["r1"])["r1"]
    expected = float(np.percentile(r1, percentile))

    relu1 = next(n for n in cm.graph.nodes if n.name == "relu1")
    assert relu1.op == "Clip"
    assert float(relu1.inputs[1].values) == 0.0 and float(relu1.inputs[2].values) == pytest.approx(expected)
    assert [n.op for n in cm.graph.nodes].count("Relu") == 1  # the dead one
    details = report.totals()["bound-relu"]["details"]
    assert details["bounds"]["relu1"]["bound"] == pytest.approx(expected)
    assert details["bounds"]["relu1"]["clipped_share"] == pytest.approx(float((r1 > expected).mean()))
    assert details["skipped"] == {"dead_relu": "zero on every calibration sample"}
    assert "relu6" not in details["bounds"]

    # numerics: the rewritten model is the original with r1 clipped by hand
    clipped = onnx.ModelProto()
    clipped.CopyFrom(model)
    clipped.graph.initializer.append(numpy_helper.from_array(np.array(expected, np.float32), "b"))
    for node in clipped.graph.node:
        if node.name == "relu1":
            node.op_type = "Clip"
            node.input.extend(["lo", "b"])
    data = calibration().arrays
    np.testing.assert_allclose(run_onnx(cm.to_onnx(), data)[0], run_onnx(clipped, data)[0], rtol=1e-6, atol=1e-5)
    change = report.totals()["bound-relu"]["max_abs_change"]
    assert change is not None and (change > 0.0 if percentile < 99.0 else change >= 0.0)


def test_not_run_unless_asked():
    cm, report = bound(relu_model(), approximations=frozenset())
    assert [n.op for n in cm.graph.nodes].count("Relu") == 2
    assert "bound-relu" not in report.totals()


def test_max_deviation_refuses_a_tight_bound():
    with pytest.raises(VerificationError, match="bound-relu"):
        bound(relu_model(), options={"bound-relu": {"percentile": 50.0}}, max_deviation=1e-3)


def test_bad_percentile_is_a_usage_error():
    with pytest.raises(UsageError, match="percentile"):
        bound(relu_model(), options={"bound-relu": {"percentile": 0}})
