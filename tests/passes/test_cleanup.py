"""remove-initializer-inputs, sum-to-add and remove-dropout-identity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qanac.testing import apply_pass, assert_outputs_equal, ops, parse, random_inputs, verify_pipeline

# IR 3: the weight is an initializer and, as IR < 4 requires, a graph input too
INITIALIZER_INPUT = """
<ir_version: 3, opset_import: ["" : 13]>
g (float[N,4] x, float[4] w) => (float[N,4] y)
<float[4] w = {1.0, -2.0, 3.0, 0.5}>
{
  y = Mul(x, w)
}
"""


def test_initializer_inputs_are_removed_and_ir_raised():
    model = parse(INITIALIZER_INPUT)
    compiled, result = apply_pass(model, "remove-initializer-inputs")
    assert result.counts == {"remove-initializer-input": 1}
    proto = compiled.to_onnx(check=True)
    assert [i.name for i in proto.graph.input] == ["x"]
    assert proto.ir_version == 4
    assert_outputs_equal(model, compiled, random_inputs(model))


def test_old_zoo_model_through_the_pipeline_with_verify_each():
    model = parse(INITIALIZER_INPUT.replace('"" : 13', '"" : 8'))
    compiled, report = verify_pipeline(model, ["remove-initializer-inputs", "upgrade-opset"], random_inputs(model))
    assert report.totals()["remove-initializer-inputs"]["counts"] == {"remove-initializer-input": 1}
    assert report.totals()["upgrade-opset"]["counts"] == {"convert-opset": 1}
    proto = compiled.to_onnx(check=True)
    assert [i.name for i in proto.graph.input] == ["x"] and proto.ir_version == 8


def test_modern_model_keeps_its_inputs():
    model = parse(INITIALIZER_INPUT.replace("ir_version: 3", "ir_version: 8").replace(", float[4] w)", ")"))
    compiled, result = apply_pass(model, "remove-initializer-inputs")
    assert not result.changed and result.counts == {}
    assert compiled.to_onnx().ir_version == 8


SUMS = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,4] a, float[4] b, float[N,4] c) => (float[N,4] two, float[N,4] three, float[N,4] one)
{
  [sum2] two = Sum(a, b)
  three = Sum(a, b, c)
  r = Relu(c)
  s1 = Sum(r)
  one = Neg(s1)
}
"""


def test_sum_of_two_becomes_add_and_of_three_stays():
    model = parse(SUMS)
    compiled, result = apply_pass(model, "sum-to-add")
    assert result.counts == {"sum-to-add": 1, "sum-to-identity": 1}
    assert ops(compiled) == ["Add", "Sum", "Relu", "Identity", "Neg"]
    add = compiled.graph.nodes[0]
    assert add.name == "sum2::sum-to-add"
    assert compiled.provenance[add.name] == "sum-to-add"
    assert "Sum of 3 inputs" in result.details["skipped"].values()
    assert_outputs_equal(model, compiled, random_inputs(model))


def test_sum_pipeline_removes_the_identity_it_leaves():
    model = parse(SUMS)
    inputs = random_inputs(model)
    compiled, report = verify_pipeline(model, ["sum-to-add", "remove-dropout-identity"], inputs)
    assert ops(compiled) == ["Add", "Sum", "Relu", "Neg"]
    assert report.totals()["remove-dropout-identity"]["counts"] == {"remove-identity": 1}
    assert_outputs_equal(model, compiled, inputs)


DROPOUTS = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,8] x, bool t) => (float[N,8] y, float[N,8] kept_training, float[N,8] kept_input, bool[N,8] mask)
{
  a = Relu(x)
  d1 = Dropout(a)
  i1 = Identity(d1)
  off = Constant <value = bool {0}> ()
  ratio = Constant <value = float {0.5}> ()
  d2, unused_mask = Dropout(i1, ratio, off)
  y = Identity(d2)
  on = Constant <value = bool {1}> ()
  zero = Constant <value = float {0.0}> ()
  kept_training = Dropout(y, zero, on)
  kept_input = Dropout(y, ratio, t)
  r = Relu(y)
  m_out, mask = Dropout(r)
}
"""


def test_inference_dropout_and_identity_are_removed():
    model = parse(DROPOUTS)
    compiled, result = apply_pass(model, "remove-dropout-identity")
    assert result.counts == {"remove-dropout": 2, "remove-identity": 2}
    skipped = result.details["skipped"]
    assert sorted(skipped.values()) == [
        "its mask output is used", "training_mode is not a constant", "training_mode is true"
    ]
    # the Relu now writes the graph output 'y' itself
    assert ops(compiled).count("Dropout") == 3 and "Identity" not in ops(compiled)
    assert any(n.op == "Relu" and n.outputs[0].name == "y" for n in compiled.graph.nodes)
    inputs = random_inputs(model)
    inputs["t"] = np.array(False)  # the kept Dropouts are deterministic: ratio 0, or training off
    assert_outputs_equal(model, compiled, inputs)


def test_identity_between_graph_input_and_output_stays():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,8] x) => (float[N,8] y) { y = Identity(x) }
        """
    )
    compiled, result = apply_pass(model, "remove-dropout-identity")
    assert not result.changed
    assert ops(compiled) == ["Identity"]
    assert "graph input" in next(iter(result.details["skipped"].values()))


def test_dropout_pipeline_is_exact_with_verify_each():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,8] x) => (float[N,8] y) {
          a = Relu(x)
          b = Dropout(a)
          c = Identity(b)
          y = Neg(c)
        }
        """
    )
    compiled, report = verify_pipeline(model, ["remove-dropout-identity"], random_inputs(model))
    assert ops(compiled) == ["Relu", "Neg"]
    assert report.totals()["remove-dropout-identity"]["counts"] == {"remove-dropout": 1, "remove-identity": 1}
    assert report.totals()["remove-dropout-identity"]["max_abs_change"] == 0.0


@pytest.mark.parametrize("training", [True, False])
def test_opset_12_dropout_training_input(training):
    text = f"""
        <ir_version: 7, opset_import: ["" : 12]>
        g (float[N,8] x) => (float[N,8] y) {{
          flag = Constant <value = bool {{{int(training)}}}> ()
          y = Dropout(x, , flag)
        }}
        """
    compiled, result = apply_pass(parse(text), "remove-dropout-identity")
    # the Dropout writes a graph output from a graph input: it can only go when something else can take over
    assert ops(compiled) == ["Constant", "Dropout"]
    reason = next(iter(result.details["skipped"].values()))
    cannot = "its input cannot take over its output's name (graph input, constant or shared)"
    assert reason == ("training_mode is true" if training else cannot)
    assert onnx.checker.check_model(compiled.to_onnx()) is None
