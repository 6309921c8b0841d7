"""upgrade-opset: into the window 13..21, untouched inside it, a clear error when conversion fails."""

from __future__ import annotations

import pytest

from qanac.diagnostics import UsageError
from qanac.passes.opset import MAX_OPSET, MIN_OPSET, UPGRADE_TARGET, default_opset
from qanac.testing import apply_pass, assert_outputs_equal, ops, parse, random_inputs, verify_pipeline

# opset 10: Pad takes its pads as an attribute, Softmax flattens from `axis` (here 1, over C*L), Dropout
# has no training input
OPSET_10 = """
<ir_version: 5, opset_import: ["" : 10]>
g (float[N,3,5] x) => (float[N,3,5] y)
<float[2,3,1] w = {0.5, -1.0, 2.0, 1.5, 0.25, -0.75}>
{
  [conv] c = Conv <pads = [0, 0]> (x, w)
  [drop] d = Dropout <ratio = 0.3> (c)
  [pad] p = Pad <pads = [0, 1, 0, 0, 0, 0], mode = "constant"> (d)
  [softmax] y = Softmax <axis = 1> (p)
}
"""


def test_old_model_is_upgraded_to_17():
    model = parse(OPSET_10)
    compiled, result = apply_pass(model, "upgrade-opset")
    assert result.counts == {"convert-opset": 1}
    assert result.details["opset"] == {"from": 10, "to": UPGRADE_TARGET}
    proto = compiled.to_onnx(check=True)
    assert default_opset(proto) == UPGRADE_TARGET and proto.ir_version == 8
    # Pad now takes its pads as an input; Softmax-10 semantics are kept by a Flatten and a Reshape
    assert {"Conv", "Dropout", "Pad", "Softmax"} <= set(ops(compiled))
    assert {n.name for n in compiled.graph.nodes} >= {"conv", "drop", "pad", "softmax"}
    assert_outputs_equal(model, compiled, random_inputs(model))


@pytest.mark.parametrize("opset", [MIN_OPSET, 17, MAX_OPSET])
def test_model_inside_the_window_is_left_alone(opset):
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[N,3,5] x) => (float[N,3,5] y) {{
          d = Dropout(x)
          y = Softmax <axis = 1> (d)
        }}
        """
    )
    compiled, result = apply_pass(model, "upgrade-opset")
    assert not result.changed and result.counts == {}
    proto = compiled.to_onnx()
    assert default_opset(proto) == opset and proto.ir_version == 8
    assert ops(compiled) == ["Dropout", "Softmax"]


def test_newer_model_is_converted_down_to_21():
    model = parse(
        """
        <ir_version: 10, opset_import: ["" : 22]>
        g (float[N,2,6,6] x) => (float[N,2,3,3] y) {
          [pool] y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)
        }
        """
    )
    compiled, result = apply_pass(model, "upgrade-opset")
    assert result.details["opset"] == {"from": 22, "to": MAX_OPSET}
    proto = compiled.to_onnx(check=True)
    assert default_opset(proto) == MAX_OPSET and proto.ir_version == 10
    assert_outputs_equal(model, compiled, random_inputs(model))


def test_operator_without_adapter_is_a_usage_error_naming_it():
    model = parse(
        """
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[N,3,4] x, float[4] s) => (float[N,3,4] y) { [rms] y = RMSNormalization(x, s) }
        """
    )
    with pytest.raises(UsageError, match="operator 'RMSNormalization' \\(nodes: rms\\)"):
        apply_pass(model, "upgrade-opset")


def test_removed_experimental_operator_is_named():
    model = parse(
        """
        <ir_version: 3, opset_import: ["" : 8]>
        g (float[N,1,4,4] x) => (float[N,1,4,4] y) { [scaler] y = ImageScaler <scale = 2.0> (x) }
        """
    )
    with pytest.raises(UsageError, match="operator 'ImageScaler' \\(nodes: scaler\\)") as caught:
        apply_pass(model, "upgrade-opset")
    assert "13 and 21" in caught.value.hint


def test_upgrade_through_the_pipeline_with_verify_each():
    model = parse(OPSET_10)
    compiled, report = verify_pipeline(model, ["upgrade-opset"], random_inputs(model))
    assert report.iterations == 2
    assert report.totals()["upgrade-opset"]["counts"] == {"convert-opset": 1}
    assert default_opset(compiled.to_onnx()) == UPGRADE_TARGET
