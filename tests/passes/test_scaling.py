"""scale-to-depthwise: a constant per-channel Mul after an activation becomes a centre-tap 3x3 depthwise conv."""

from __future__ import annotations

import numpy as np
import pytest

from qanac.calibration import CalibrationData, Preprocessing
from qanac.compare import exact_tolerance
from qanac.execution import run_onnx
from qanac.graph import CompilationModel
from qanac.pipeline import PassContext, PipelineOptions, run_pipeline
from qanac.registry import load_builtin_passes
from qanac.testing import parse

TEMPLATE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,6,6] x) => (float[N,3,1,1] y) {{
  w = Constant <value = float[3,3,1,1] {{1,0,0, 0,1,0, 0,0,1}}> ()
  c = Conv (x, w)
  a = {activation} (c)
  s = Constant <value = float[3,1,1] {{0.5, 2.0, 1.5}}> ()
  m = Mul (a, s)
  y = {reader} (m)
}}
"""


def run(text: str):
    load_builtin_passes()
    model = parse(text)
    x = np.random.default_rng(0).normal(size=(4, 3, 6, 6)).astype(np.float32)
    data = CalibrationData(arrays={"x": x}, source="t", preprocessing=Preprocessing())
    cm = CompilationModel.from_onnx(model)
    report = run_pipeline(cm, ["fold-constants", "infer-shapes", "scale-to-depthwise"], PassContext("akida", data),
                          PipelineOptions(verify_each=True))
    expected, actual = run_onnx(model, {"x": x})[0], run_onnx(cm.to_onnx(), {"x": x})[0]
    return cm, report, expected, actual


def test_scale_after_activation_becomes_depthwise_conv():
    cm, report, expected, actual = run(TEMPLATE.format(activation="Relu", reader="GlobalAveragePool"))
    assert report.totals()["scale-to-depthwise"]["counts"] == {"scale-to-depthwise": 1}
    dw = [n for n in cm.graph.nodes if n.name.endswith("::scale-to-depthwise")][0]
    assert dw.op == "Conv" and dw.attrs["group"] == 3 and dw.attrs["pads"] == [1, 1, 1, 1]
    weights = dw.inputs[1].values
    assert weights.shape == (3, 1, 3, 3) and np.count_nonzero(weights) == 3
    np.testing.assert_allclose(weights[:, 0, 1, 1], [0.5, 2.0, 1.5])
    assert "Mul" not in [n.op for n in cm.graph.nodes]
    assert np.max(np.abs(actual - expected)) <= exact_tolerance(expected)


@pytest.mark.parametrize("activation, reader, why", [
    ("Identity", "GlobalAveragePool", "no activation before it: quantizeml folds it into the conv"),
    ("Relu", "Relu", "fires"),
])
def test_fires_only_where_quantizeml_cannot_fold(activation, reader, why):
    cm, report, expected, actual = run(TEMPLATE.format(activation=activation, reader=reader))
    fired = report.totals().get("scale-to-depthwise", {}).get("counts", {})
    assert bool(fired) == (why == "fires")
    assert np.max(np.abs(actual - expected)) <= exact_tolerance(expected)


def test_left_alone_when_only_convs_read_it():
    text = TEMPLATE.format(activation="Relu", reader="Identity").replace(
        "  y = Identity (m)",
        "  w2 = Constant <value = float[3,3,1,1] {1,0,0, 0,1,0, 0,0,1}> ()\n  y2 = Conv (m, w2)\n"
        "  y = GlobalAveragePool (y2)",
    )
    cm, report, expected, actual = run(text)
    assert report.totals().get("scale-to-depthwise", {}).get("counts", {}) == {}
    assert "Mul" in [n.op for n in cm.graph.nodes]
