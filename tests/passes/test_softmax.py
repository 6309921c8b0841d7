"""strip-trailing-softmax: the final Softmax/LogSoftmax moves to recorded post-processing."""

from __future__ import annotations

import numpy as np
import pytest

from qanac.graph import output_names
from qanac.targets import CANONICALIZE
from qanac.testing import apply_pass, assert_outputs_equal, ops, parse, random_inputs, run, verify_pipeline

CLASSIFIER = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,6] x) => (float[N,3] probs)
<float[6,3] w = {0.1, -0.2, 0.3, 0.4, -0.5, 0.6, -0.7, 0.8, 0.9, 1.0, -1.1, 1.2, 0.3, 0.2, -0.1, 0.5, 0.4, -0.3}>
{
  [fc] logits = MatMul(x, w)
  [softmax] probs = %s
}
"""


@pytest.mark.parametrize(
    "node, op",
    [
        ("Softmax(logits)", "Softmax"),
        ("Softmax <axis = 1> (logits)", "Softmax"),
        ("Softmax <axis = -1> (logits)", "Softmax"),
        ("LogSoftmax <axis = 1> (logits)", "LogSoftmax"),
    ],
)
def test_trailing_softmax_becomes_post_processing(node, op):
    model = parse(CLASSIFIER % node)
    compiled, result = apply_pass(model, "strip-trailing-softmax")
    assert result.counts == {f"strip-{op.lower()}": 1}
    assert ops(compiled) == ["MatMul"]
    assert output_names(compiled.to_onnx()) == ["probs"]  # the MatMul now writes 'probs'
    assert compiled.post_processing == [{"op": op, "axis": -1, "output": "probs"}]
    inputs = random_inputs(model, batch=16)
    assert_outputs_equal(model, compiled, inputs)  # with post-processing applied
    raw = compiled.clone()
    raw.post_processing = []
    (logits,) = run(raw, inputs)
    (probs,) = run(model, inputs)
    np.testing.assert_array_equal(np.argmax(logits, axis=-1), np.argmax(probs, axis=-1))


def test_softmax_over_a_middle_axis_stays():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,5] x) => (float[N,4,5] y) {
          r = Relu(x)
          [softmax] y = Softmax <axis = 1> (r)
        }
        """
    )
    compiled, result = apply_pass(model, "strip-trailing-softmax")
    assert not result.changed and compiled.post_processing == []
    assert result.details["skipped"] == {"softmax": "normalises over axis 1, not the last axis of a rank-3 tensor"}


def test_softmax_feeding_another_node_stays():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x) => (int64[N] label) {
          r = Relu(x)
          p = Softmax(r)
          label = ArgMax <axis = 1, keepdims = 0> (p)
        }
        """
    )
    compiled, result = apply_pass(model, "strip-trailing-softmax")
    assert not result.changed and "skipped" not in result.details
    assert ops(compiled) == ["Relu", "Softmax", "ArgMax"]


def test_softmax_whose_output_is_also_consumed_stays():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x) => (float[N,6] p, float[N,6] q) {
          r = Relu(x)
          [softmax] p = Softmax(r)
          q = Neg(p)
        }
        """
    )
    _, result = apply_pass(model, "strip-trailing-softmax")
    assert not result.changed
    assert result.details["skipped"] == {"softmax": "its output also feeds other nodes"}


def test_softmax_of_a_graph_input_stays():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x) => (float[N,6] y) { [softmax] y = Softmax(x) }
        """
    )
    _, result = apply_pass(model, "strip-trailing-softmax")
    assert not result.changed
    assert "graph input" in result.details["skipped"]["softmax"]


def test_stacked_softmaxes_are_recorded_in_application_order():
    stacked = "[inner] s = Softmax(logits)\n  [outer] probs = LogSoftmax(s)"
    model = parse(CLASSIFIER.replace("[softmax] probs = %s", stacked))
    inputs = random_inputs(model)
    compiled, report = verify_pipeline(model, ["strip-trailing-softmax"], inputs)
    assert report.totals()["strip-trailing-softmax"]["counts"] == {"strip-logsoftmax": 1, "strip-softmax": 1}
    assert [p["op"] for p in compiled.post_processing] == ["Softmax", "LogSoftmax"]
    assert_outputs_equal(model, compiled, inputs)


def test_strip_in_the_pipeline_with_verify_each():
    model = parse(CLASSIFIER % "Softmax(logits)")
    compiled, report = verify_pipeline(model, list(CANONICALIZE), random_inputs(model))
    assert report.totals()["strip-trailing-softmax"]["counts"] == {"strip-softmax": 1}
    assert compiled.to_onnx().metadata_props[0].key == "qanac.post_processing"
