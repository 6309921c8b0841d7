"""qanac's rules against onnxscript's and onnx_ir's stock rules for the same canonical rewrite
(docs/writing-a-pass.md says where qanac keeps its own and why): fuse-pad-into-conv against FuseConvPad,
fold-batchnorm-into-conv against FuseBatchNormIntoConv, remove-dropout-identity against the no-op rules and
IdentityEliminationPass. Where both fire they agree; the cases where they differ are pinned here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qanac.execution import make_session
from qanac.testing import apply_pass, ops, parse, random_inputs
from tests.passes.test_batchnorm import conv_bn
from tests.passes.test_padding import pad_then_conv

# onnxscript and onnx_ir come with the torch exporter (pinned in constraints.txt), not with qanac itself
ir = pytest.importorskip("onnx_ir")
fuse_pad_into_conv = pytest.importorskip("onnxscript.rewriter.fuse_pad_into_conv")
fuse_batchnorm = pytest.importorskip("onnxscript.rewriter.fuse_batchnorm")
no_op = pytest.importorskip("onnxscript.rewriter.no_op")


def stock(rules, model: onnx.ModelProto) -> tuple[int, onnx.ModelProto]:
    """An onnxscript rule set applied to ``model`` (through onnx_ir, as onnxscript runs them)."""

    converted = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))
    count = rules.apply_to_model(converted)
    return count, ir.serde.serialize_model(converted)


def stock_fuse_pad(model: onnx.ModelProto) -> tuple[int, onnx.ModelProto]:
    return stock(fuse_pad_into_conv.fuse_pad_into_conv_rule_set(), model)


def max_error(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> float:
    """The largest absolute difference over all outputs, on random inputs."""

    inputs = random_inputs(reference)
    want = make_session(reference).run(None, inputs)
    got = make_session(candidate).run(None, inputs)
    return max(float(np.max(np.abs(w - g))) for w, g in zip(want, got, strict=True))


@pytest.mark.parametrize("pads, conv_pads", [
    ("0, 0, 0, 1, 0, 0, 1, 0", "pads = [1, 0, 0, 1], strides = [2, 2]"),
    ("0, 0, 1, 1, 0, 0, 1, 1", "strides = [1, 1]"),
])
def test_both_fuse_a_zero_pad_into_the_same_conv(pads, conv_pads):
    model = parse(pad_then_conv(pads, conv_pads=conv_pads))
    count, stock = stock_fuse_pad(model)
    compiled, result = apply_pass(model, "fuse-pad-into-conv")
    assert count == 1 and result.counts == {"fuse-pad-into-conv": 1}
    (stock_conv,) = [n for n in stock.graph.node if n.op_type == "Conv"]
    stock_pads = next(list(a.ints) for a in stock_conv.attribute if a.name == "pads")
    assert ops(compiled) == ["Conv"] and list(compiled.graph.nodes[0].attrs["pads"]) == stock_pads


def test_a_crop_is_fused_by_the_stock_rule_with_a_different_result_and_left_by_qanac():
    """Pad with a negative pad crops the map; adding it to the Conv's own zero padding is not the same
    convolution. The stock rule (onnxscript 0.4) fuses it; qanac leaves it with the reason."""

    model = parse(pad_then_conv("0, 0, -1, 0, 0, 0, 0, 0", conv_pads="pads = [1, 1, 1, 1], strides = [1, 1]"))
    count, stock = stock_fuse_pad(model)
    assert count == 1 and max_error(model, stock) > 0.1
    compiled, result = apply_pass(model, "fuse-pad-into-conv")
    assert result.counts == {} and result.details["skipped"] == {"pad": "negative pads (a crop)"}
    assert max_error(model, compiled.to_onnx()) == 0.0


def test_a_pad_with_another_reader_stays_beside_the_stock_rules_conv_and_is_left_by_qanac():
    model = parse(pad_then_conv("0, 0, 1, 1, 0, 0, 1, 1", conv_pads="strides = [1, 1]", second_reader="Relu (padded)"))
    count, stock = stock_fuse_pad(model)
    assert count == 1 and [n.op_type for n in stock.graph.node] == ["Pad", "Conv", "Relu"]
    compiled, result = apply_pass(model, "fuse-pad-into-conv")
    assert result.counts == {} and ops(compiled) == ["Pad", "Conv", "Relu"]
    assert "something other than the data input of a Conv" in result.details["skipped"]["pad"]


def test_both_fold_a_batchnorm_into_its_conv():
    model = parse(conv_bn())
    count, fused = stock(fuse_batchnorm.fuse_batchnorm_rule_set(), model)
    compiled, result = apply_pass(model, "fold-batchnorm-into-conv")
    assert count == 1 and result.counts == {"fold-batchnorm-into-conv": 1}
    assert [n.op_type for n in fused.graph.node] == ops(compiled) == ["Conv"]
    assert max_error(model, fused) < 1e-4 and max_error(model, compiled.to_onnx()) < 1e-4


def test_weights_shared_with_another_conv_are_overwritten_by_the_stock_rule_and_kept_by_qanac():
    """The stock rule (onnxscript 0.4) writes the folded weights under the original initializer's name,
    which the second Conv reads too; qanac writes new constants."""

    model = parse(conv_bn(extra="[conv2] z = Conv <pads = [1, 1, 1, 1]> (x, w, b)",
                          outputs="float[N,4,5,5] y, float[N,4,5,5] z"))
    count, fused = stock(fuse_batchnorm.fuse_batchnorm_rule_set(), model)
    assert count == 1 and max_error(model, fused) > 0.1
    compiled, result = apply_pass(model, "fold-batchnorm-into-conv")
    assert result.counts == {"fold-batchnorm-into-conv": 1} and max_error(model, compiled.to_onnx()) < 1e-4


def test_an_inference_dropout_is_left_by_the_stock_rules_and_removed_by_qanac():
    """The stock dropout rules (onnxscript 0.4) match ``ratio`` and ``training_mode`` as attributes; from
    opset 12 on they are inputs, and a Dropout without them is in inference mode too."""

    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,8] x) => (float[N,8] y) { a = Relu(x)  d = Dropout(a)  i = Identity(d)  y = Neg(i) }
        """
    )
    count, cleaned = stock(no_op.rules, model)
    converted = ir.serde.deserialize_model(cleaned)
    ir.passes.common.IdentityEliminationPass()(converted)
    assert count == 0
    assert [n.op_type for n in ir.serde.serialize_model(converted).graph.node] == ["Relu", "Dropout", "Neg"]
    compiled, result = apply_pass(model, "remove-dropout-identity")
    assert result.counts == {"remove-dropout": 1, "remove-identity": 1} and ops(compiled) == ["Relu", "Neg"]
