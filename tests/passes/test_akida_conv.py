"""dilated-conv-to-dense, grouped-conv-to-dense, even-kernel-to-odd, strided-conv-to-stride1: structure after
the rewrite, ONNX Runtime outputs equal to the original (``--verify-each`` tolerance, max abs error <= 1e-4 *
(1 + max |reference|)), and the cases each pass must leave alone, with their reasons."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qanac.testing import graph_model, rewrite_and_compare


def conv_model(c_in: int, c_out: int, kernel: int, size: int = 8, stem: bool = True, relu: bool = True,
               **attrs) -> onnx.ModelProto:
    """[stem 3x3 Conv] -> Conv(kernel, **attrs) -> [Relu]; the stem makes the tested Conv a non-input layer."""

    rng = np.random.default_rng(0)
    group = attrs.get("group", 1)
    inits = {"w": rng.normal(size=(c_out, c_in // group, kernel, kernel)), "b": rng.normal(size=c_out)}
    nodes, x = [], "x"
    if stem:
        inits["ws"] = rng.normal(size=(c_in, c_in, 3, 3))
        nodes.append(helper.make_node("Conv", ["x", "ws"], ["s"], name="stem", pads=[1, 1, 1, 1]))
        x = "s"
    nodes.append(helper.make_node("Conv", [x, "w", "b"], ["c" if relu else "y"], name="conv", **attrs))
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    return graph_model(nodes, inits, ["N", c_in, size, size])



def node(compiled, name: str):
    return next(n for n in compiled.graph.nodes if n.name == name)


# --- dilated-conv-to-dense ------------------------------------------------------------------------------


@pytest.mark.parametrize("group, dilation, dense", [(1, 2, 5), (4, 2, 5), (1, 3, 7)])
def test_dilated_conv_becomes_dense_kernel(group, dilation, dense):
    model = conv_model(4, 4, 3, size=12, dilations=[dilation] * 2, pads=[dilation] * 4, group=group)
    compiled, counts, _ = rewrite_and_compare(model, "dilated-conv-to-dense")
    assert counts == {"dilated-conv-to-dense": 1}
    conv = node(compiled, "conv::dilated-conv-to-dense")
    weights = conv.inputs[1].values
    assert "dilations" not in conv.attrs and weights.shape[2:] == (dense, dense)
    original = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    np.testing.assert_array_equal(weights[:, :, ::dilation, ::dilation], original)
    assert np.count_nonzero(weights) == np.count_nonzero(original)
    assert compiled.provenance[conv.name] == "dilated-conv-to-dense"


def test_dilated_conv_larger_than_7x7_is_left():
    model = conv_model(4, 4, 3, size=12, dilations=[4, 4], pads=[4, 4, 4, 4])
    compiled, counts, details = rewrite_and_compare(model, "dilated-conv-to-dense")
    assert counts == {}
    assert details["skipped"] == {"conv": "dense kernel 9x9 is larger than 7x7"}
    assert node(compiled, "conv").attrs["dilations"] == [4, 4]


# --- grouped-conv-to-dense ------------------------------------------------------------------------------


def test_grouped_conv_becomes_block_diagonal():
    model = conv_model(8, 12, 3, pads=[1, 1, 1, 1], group=4)
    compiled, counts, _ = rewrite_and_compare(model, "grouped-conv-to-dense")
    assert counts == {"grouped-conv-to-dense": 1}
    conv = node(compiled, "conv::grouped-conv-to-dense")
    weights = conv.inputs[1].values
    assert conv.attrs["group"] == 1 and weights.shape == (12, 8, 3, 3)
    blocks = np.abs(weights).sum(axis=(2, 3)) > 0  # [out, in]
    expected = np.kron(np.eye(4, dtype=bool), np.ones((3, 2), dtype=bool))
    np.testing.assert_array_equal(blocks, expected)


@pytest.mark.parametrize("group", [1, 8])
def test_plain_and_depthwise_convs_are_left(group):
    model = conv_model(8, 8, 3, pads=[1, 1, 1, 1], group=group)
    compiled, counts, _ = rewrite_and_compare(model, "grouped-conv-to-dense")
    assert counts == {} and node(compiled, "conv").attrs["group"] == group


# --- even-kernel-to-odd ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel, strides, pads, size, grown", [
    (2, 2, [0, 0, 0, 0], 8, [0, 0, 1, 1]),  # patchify 2x2/2: zeros at the end, Akida "same"
    (2, 1, [0, 0, 1, 1], 8, [1, 1, 1, 1]),  # PyTorch padding="same" for k=2: zeros at the start
    (4, 2, [1, 1, 1, 1], 8, [1, 1, 2, 2]),  # DCGAN-style 4x4/2
    (2, 2, [0, 0, 0, 0], 7, [0, 0, 0, 0]),  # odd map: the 3x3/2 window fits without padding
])
def test_even_kernel_grows_to_odd_with_accepted_pads(kernel, strides, pads, size, grown):
    model = conv_model(4, 4, kernel, size=size, strides=[strides] * 2, pads=pads)
    compiled, counts, _ = rewrite_and_compare(model, "even-kernel-to-odd")
    assert counts == {"even-kernel-to-odd": 1}
    conv = node(compiled, "conv::even-kernel-to-odd")
    assert conv.inputs[1].values.shape[2:] == (kernel + 1, kernel + 1)
    assert conv.attrs["pads"] == grown and conv.attrs["kernel_shape"] == [kernel + 1] * 2


def test_even_kernel_that_shrinks_the_map_by_one_is_left():
    compiled, counts, details = rewrite_and_compare(conv_model(4, 4, 2, pads=[0, 0, 0, 0]), "even-kernel-to-odd")
    assert counts == {}
    assert "needs one-sided pads" in details["skipped"]["conv"]
    assert node(compiled, "conv").inputs[1].values.shape[2:] == (2, 2)


# --- strided-conv-to-stride1 ----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel, pads, size, relu", [
    (5, [2, 2, 2, 2], 8, True),
    (5, [2, 2, 2, 2], 9, False),
    (7, [3, 3, 3, 3], 8, True),
    (5, [0, 0, 0, 0], 11, True),
])
def test_stride2_conv_becomes_stride1_and_selection(kernel, pads, size, relu):
    model = conv_model(4, 6, kernel, size=size, relu=relu, strides=[2, 2], pads=pads)
    compiled, counts, _ = rewrite_and_compare(model, "strided-conv-to-stride1")
    assert counts == {"strided-conv-to-stride1": 1}
    conv = node(compiled, "conv::strided-conv-to-stride1")
    select = node(compiled, "conv::strided-conv-to-stride1:0")
    assert conv.attrs["strides"] == [1, 1]
    assert select.attrs["strides"] == [2, 2] and select.attrs["group"] == 6
    taps = select.inputs[1].values
    assert taps.shape == (6, 1, 3, 3) and np.count_nonzero(taps) == 6 and taps.max() == 1.0
    # the selection follows the activation, which stays fused to the stride-1 conv
    expected = ["Conv", "Conv", "Relu", "Conv"] if relu else ["Conv", "Conv", "Conv"]
    assert [n.op for n in compiled.graph.nodes] == expected
    assert compiled.graph.outputs[0].name == "y"


@pytest.mark.parametrize("why, model", [
    ("the input layer takes this stride", conv_model(4, 6, 5, stem=False, strides=[2, 2], pads=[2, 2, 2, 2])),
    (None, conv_model(4, 6, 3, strides=[2, 2], pads=[1, 1, 1, 1])),  # 3x3/2 is accepted
    (None, conv_model(4, 4, 5, strides=[2, 2], pads=[2, 2, 2, 2], group=4)),  # depthwise: quantizeml splits it
])
def test_stride2_conv_left_alone(why, model):
    compiled, counts, details = rewrite_and_compare(model, "strided-conv-to-stride1")
    assert counts == {}
    assert details.get("skipped", {}).get("conv") == why
    assert node(compiled, "conv").attrs["strides"] == [2, 2]
