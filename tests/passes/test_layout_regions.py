"""remove-layout-transposes on what tf2onnx leaves of Keras graphs (hard-swish, squeeze-and-excitation,
residual Adds, Pads and Concats in NHWC between Transposes), remove-unit-transpose and
reduce-mean-to-global-pool: structure after the rewrite, outputs equal to the original within the
``--verify-each`` tolerance (max abs error <= 1e-4 * (1 + max |reference|)), and the cases left alone
with their reasons."""

from __future__ import annotations

import numpy as np
import pytest

from qanac.testing import apply_pass, ops, parse, rewrite_and_compare

LAYOUT = "remove-layout-transposes"
REGION = "move-transposes-through-region"
NHWC, NCHW = "[0, 2, 3, 1]", "[0, 3, 1, 2]"


def values(*shape: int, seed: int = 0) -> str:
    data = np.random.default_rng(seed).normal(size=shape)
    return ", ".join(f"{v:.4f}" for v in data.reshape(-1))


def model(body: str, inputs: str = "float[N,4,6,6] x", outputs: str = "float[N,4,6,6] y", extra: str = "") -> str:
    """Conv weights w (4 -> 4, 3x3) and w1 (4 -> 4, 1x1), the hard-swish constants, and ``extra``."""

    return f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g ({inputs}) => ({outputs})
        <float[4,4,3,3] w = {{{values(4, 4, 3, 3)}}}, float[4,4,1,1] w1 = {{{values(4, 4, 1, 1, seed=1)}}},
         float three = {{3.0}}, float zero = {{0.0}}, float six = {{6.0}}, float sixth = {{0.16666667}}{extra}>
        {{
          {body}
        }}
        """


HARD_SWISH = f"""
          [to_nhwc] t = Transpose <perm = {NHWC}> (c)
          [plus3] a = Add (t, three)
          [relu6] r = Clip (a, zero, six)
          [div6] h = Mul (r, sixth)
          [swish] s = Mul (t, h)
          [to_nchw] n = Transpose <perm = {NCHW}> (s)
"""


def test_hard_swish_between_layout_transposes_computes_in_nchw():
    compiled, counts, _ = rewrite_and_compare(parse(model(
        "[conv] c = Conv <pads = [1, 1, 1, 1]> (x, w)" + HARD_SWISH + "[conv2] y = Conv (n, w1)")), LAYOUT)
    assert counts == {REGION: 2}
    assert ops(compiled) == ["Conv", "Add", "Clip", "Mul", "Mul", "Conv"]


def test_squeeze_excitation_with_per_channel_constants_computes_in_nchw():
    body = f"""
          [conv] c = Conv <pads = [1, 1, 1, 1]> (x, w)
          [to_nhwc] t = Transpose <perm = {NHWC}> (c)
          [bias] b = Add (t, bias)
          [pool] m = ReduceMean <axes = [1, 2], keepdims = 1> (b)
          [se_in] p = Transpose <perm = {NCHW}> (m)
          [reduce] q = Conv (p, w1)
          [se_out] o = Transpose <perm = {NHWC}> (q)
          [plus3] a = Add (o, three)
          [relu6] r = Clip (a, zero, six)
          [div6] h = Mul (r, sixth)
          [gate] s = Mul (b, h)
          [to_nchw] n = Transpose <perm = {NCHW}> (s)
          [conv2] y = Conv (n, w1)
    """
    compiled, counts, _ = rewrite_and_compare(parse(model(body, extra=f", float[4] bias = {{{values(4)}}}")), LAYOUT)
    assert counts == {REGION: 4}
    assert "Transpose" not in ops(compiled)
    bias = next(n for n in compiled.graph.nodes if n.name.startswith("bias")).inputs[1].values
    assert bias.shape == (1, 4, 1, 1)
    reduce = next(n for n in compiled.graph.nodes if n.op == "ReduceMean")
    assert list(reduce.attrs["axes"]) == [2, 3]


def test_residual_add_of_two_transposed_tensors_computes_in_nchw():
    body = f"""
          [conv_a] ca = Conv <pads = [1, 1, 1, 1]> (x, w)
          [conv_b] cb = Conv (x, w1)
          [nhwc_a] ta = Transpose <perm = {NHWC}> (ca)
          [nhwc_b] tb = Transpose <perm = {NHWC}> (cb)
          [add] s = Add (ta, tb)
          [relu] r = Relu (s)
          [to_nchw] n = Transpose <perm = {NCHW}> (r)
          [conv2] y = Conv (n, w1)
    """
    compiled, counts, _ = rewrite_and_compare(parse(model(body)), LAYOUT)
    assert counts == {REGION: 3}
    assert ops(compiled) == ["Conv", "Conv", "Add", "Relu", "Conv"]


def test_pad_and_concat_in_nhwc_get_nchw_pads_and_axis():
    body = f"""
          [conv] c = Conv (x, w1)
          [to_nhwc] t = Transpose <perm = {NHWC}> (c)
          [relu] r = Relu (t)
          [pad] p = Pad (r, pads)
          [cat] k = Concat <axis = 3> (p, p)
          [to_nchw] n = Transpose <perm = {NCHW}> (k)
          [conv2] y = Conv (n, w8)
    """
    extra = f", int64[8] pads = {{0, 1, 2, 0, 0, 1, 2, 0}}, float[4,8,3,3] w8 = {{{values(4, 8, 3, 3, seed=2)}}}"
    compiled, counts, _ = rewrite_and_compare(parse(model(body, outputs="float[N,4,6,8] y", extra=extra)), LAYOUT)
    assert counts == {REGION: 2}
    assert ops(compiled) == ["Conv", "Relu", "Pad", "Concat", "Conv"]
    pad = next(n for n in compiled.graph.nodes if n.op == "Pad")
    assert pad.inputs[1].values.tolist() == [0, 0, 1, 2, 0, 0, 1, 2]
    assert next(n for n in compiled.graph.nodes if n.op == "Concat").attrs["axis"] == 1


def test_a_region_that_would_need_as_many_new_transposes_stays_with_the_reason():
    # the Relu's output is a graph output in NHWC: removing the Transpose needs one in front of it
    text = model(f"[conv] c = Conv (x, w1)\n [to_nhwc] t = Transpose <perm = {NHWC}> (c)\n [relu] y = Relu (t)",
                 outputs="float[N,6,6,4] y")
    compiled, result = apply_pass(apply_pass(parse(text), "infer-shapes")[0], LAYOUT)
    assert not result.changed
    assert result.details["skipped"]["to_nhwc"] == (
        "moving it through the 1 ops its layout reaches would remove 1 Transposes and add 1")


def test_transpose_of_unit_axes_before_flatten_is_removed():
    body = f"""
          [pool] p = GlobalAveragePool (x)
          [logits] c = Conv (p, w1)
          [to_nhwc] t = Transpose <perm = {NHWC}> (c)
          [flatten] y = Flatten <axis = 1> (t)
    """
    compiled, counts, _ = rewrite_and_compare(parse(model(body, outputs="float[N,4] y")), LAYOUT)
    assert counts == {"remove-unit-transpose": 1}
    assert ops(compiled) == ["GlobalAveragePool", "Conv", "Flatten"]


def test_transpose_of_unit_axes_before_a_matmul_stays():
    body = f"""
          [pool] p = GlobalAveragePool (x)
          [to_nhwc] t = Transpose <perm = {NHWC}> (p)
          [dense] y = MatMul (t, fc)
    """
    text = model(body, outputs="float[N,1,1,4] y", extra=f", float[4,4] fc = {{{values(4, 4, seed=3)}}}")
    compiled, result = apply_pass(apply_pass(parse(text), "infer-shapes")[0], LAYOUT)
    assert not result.changed and "Transpose" in ops(compiled)
    assert result.details["skipped"]["to_nhwc"] == "followed by MatMul"


@pytest.mark.parametrize("keepdims, expected", [(1, ["GlobalAveragePool"]), (0, ["GlobalAveragePool", "Flatten"])])
def test_spatial_reduce_mean_becomes_global_average_pool(keepdims, expected):
    out = "float[N,4,1,1] y" if keepdims else "float[N,4] y"
    text = model(f"[mean] y = ReduceMean <axes = [-2, -1], keepdims = {keepdims}> (x)", outputs=out)
    compiled, counts, _ = rewrite_and_compare(parse(text), "reduce-mean-to-global-pool")
    assert counts == {"reduce-mean-to-global-pool": 1}
    assert ops(compiled) == expected and compiled.graph.nodes[-1].outputs[0].name == "y"


def test_reduce_mean_over_channels_stays():
    text = model("[mean] y = ReduceMean <axes = [1], keepdims = 1> (x)", outputs="float[N,1,6,6] y")
    _, result = apply_pass(apply_pass(parse(text), "infer-shapes")[0], "reduce-mean-to-global-pool")
    assert not result.changed


def test_keras_pointwise_conv_head_becomes_flatten_and_gemm():
    body = """
          [pool] p = GlobalAveragePool (x)
          [logits] c = Conv (p, w1, b)
          [flatten] y = Flatten <axis = 1> (c)
    """
    text = model(body, outputs="float[N,4] y", extra=f", float[4] b = {{{values(4, seed=5)}}}")
    compiled, counts, _ = rewrite_and_compare(parse(text), "flatten-dense-to-gemm")
    assert counts == {"pointwise-conv-to-gemm": 1}
    assert ops(compiled) == ["GlobalAveragePool", "Flatten", "Gemm"]
    gemm = compiled.graph.nodes[-1]
    assert gemm.name == "logits::flatten-dense-to-gemm" and gemm.outputs[0].name == "y"


def test_pointwise_conv_over_a_larger_map_stays():
    text = model("[logits] c = Conv (x, w1)\n [flatten] y = Flatten <axis = 1> (c)", outputs="float[N,144] y")
    _, result = apply_pass(apply_pass(parse(text), "infer-shapes")[0], "flatten-dense-to-gemm")
    assert not result.changed
