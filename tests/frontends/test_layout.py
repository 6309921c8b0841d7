"""remove-layout-transposes and flatten-dense-to-gemm (passes/layout.py), on text-form models."""

from __future__ import annotations

import numpy as np
import onnx

from qanac.testing import (
    apply_pass,
    assert_outputs_equal,
    ops,
    parse,
    parse_with_shapes,
    random_inputs,
    verify_pipeline,
)

LAYOUT = "remove-layout-transposes"
HEAD = "flatten-dense-to-gemm"


def values(*shape: int, seed: int = 0) -> str:
    data = np.random.default_rng(seed).normal(size=shape)
    return ", ".join(f"{v:.4f}" for v in data.reshape(-1))




def run_layout(text: str, name: str = LAYOUT):
    model = parse(text)
    compiled, result = apply_pass(parse_with_shapes(text), name)
    assert_outputs_equal(model, compiled, random_inputs(model))
    return compiled, result


CONV = f"float[4,3,3,3] w = {{{values(4, 3, 3, 3)}}}"


def test_transpose_pair_around_relu_cancels():
    compiled, result = run_layout(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,6,6] x) => (float[N,4,4,4] y)
        <{CONV}, float lo = {{0.0}}, float hi = {{6.0}}>
        {{
          [to_nhwc] t = Transpose <perm = [0, 2, 3, 1]> (x)
          [relu] r = Relu (t)
          [clip] c = Clip (r, lo, hi)
          [to_nchw] n = Transpose <perm = [0, 3, 1, 2]> (c)
          [conv] y = Conv (n, w)
        }}
        """
    )
    assert result.counts == {"move-transpose-past-elementwise": 1, "cancel-transpose-pair": 1}
    assert ops(compiled) == ["Relu", "Clip", "Conv"]


def test_transpose_pair_composing_to_a_permutation_merges():
    compiled, result = run_layout(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,6,5] x) => (float[N,5,6,3] y)
        {
          [a] t = Transpose <perm = [0, 2, 3, 1]> (x)
          [b] y = Transpose <perm = [0, 2, 1, 3]> (t)
        }
        """
    )
    assert result.counts == {"merge-transpose-pair": 1}
    assert ops(compiled) == ["Transpose"]


def test_cancelled_pair_writing_a_graph_output_keeps_the_output_name():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,6,5] x) => (float[N,3,6,5] y)
        {
          [r] r = Relu (x)
          [a] t = Transpose <perm = [0, 2, 3, 1]> (r)
          [b] y = Transpose <perm = [0, 3, 1, 2]> (t)
        }
        """
    )
    compiled, _ = verify_pipeline(model, ["infer-shapes", LAYOUT, "remove-dropout-identity"], random_inputs(model))
    assert ops(compiled) == ["Relu"]
    assert [o.name for o in compiled.graph.outputs] == ["y"]


def flatten_dense(perm: str, dense: str) -> str:
    return f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,6,6] x) => (float[N,5] y)
        <{CONV}, float[64,5] fc = {{{values(64, 5, seed=2)}}}, float[5,64] fct = {{{values(5, 64, seed=3)}}},
         int64[2] shape = {{-1, 64}}>
        {{
          [conv] c = Conv (x, w)
          [to_nhwc] t = Transpose <perm = {perm}> (c)
          [flatten] f = Reshape (t, shape)
          {dense}
        }}
        """


def test_nhwc_transpose_before_flatten_is_absorbed_into_matmul_weights():
    compiled, result = run_layout(flatten_dense("[0, 2, 3, 1]", "[fc] y = MatMul (f, fc)"))
    assert result.counts == {"absorb-transpose-into-dense": 1}
    assert ops(compiled) == ["Conv", "Reshape", "MatMul"]
    assert compiled.source_of(compiled.graph.nodes[-1].name) == compiled.source_of("fc")


def test_nhwc_transpose_before_flatten_is_absorbed_into_gemm_with_trans_b():
    compiled, result = run_layout(flatten_dense("[0, 3, 2, 1]", "[fc] y = Gemm <transB = 1> (f, fct)"))
    assert result.counts == {"absorb-transpose-into-dense": 1}
    assert ops(compiled) == ["Conv", "Reshape", "Gemm"]


def test_transpose_before_flatten_stays_when_the_dense_weights_are_not_constant():
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,4,4] x, float[64,5] fc) => (float[N,5] y)
        <int64[2] shape = {-1, 64}>
        {
          [to_nhwc] t = Transpose <perm = [0, 2, 3, 1]> (x)
          [flatten] f = Reshape (t, shape)
          [fc] y = MatMul (f, fc)
        }
        """
    compiled, result = apply_pass(parse_with_shapes(text), LAYOUT)
    assert not result.changed
    assert "not a constant" in result.details["skipped"]["to_nhwc"]
    assert ops(compiled) == ["Transpose", "Reshape", "MatMul"]


def test_transpose_with_a_second_consumer_stays():
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,6,6] x) => (float[N,6,6,3] y, float[N,3,6,6] z)
        {
          [to_nhwc] y = Transpose <perm = [0, 2, 3, 1]> (x)
          [back] z = Transpose <perm = [0, 3, 1, 2]> (y)
        }
        """
    compiled, result = apply_pass(parse_with_shapes(text), LAYOUT)
    assert not result.changed
    assert result.details["skipped"]["to_nhwc"] == "its output is a graph output"


def test_transpose_before_a_conv_stays():
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6,6,3] x) => (float[N,4,4,4] y)
        <{CONV}>
        {{
          [to_nchw] t = Transpose <perm = [0, 3, 1, 2]> (x)
          [conv] y = Conv (t, w)
        }}
        """
    _, result = apply_pass(parse_with_shapes(text), LAYOUT)
    assert not result.changed
    assert result.details["skipped"]["to_nchw"] == "followed by Conv"


def test_noop_reshape_is_removed():
    compiled, result = run_layout(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,6,6] x) => (float[N,4,1,1] y)
        <int64[4] shape = {-1, 4, 1, 1}>
        {
          [gap] p = GlobalAveragePool (x)
          [reshape] r = Reshape (p, shape)
          [relu] y = Relu (r)
        }
        """
    )
    assert result.counts == {"remove-noop-reshape": 1}
    assert ops(compiled) == ["GlobalAveragePool", "Relu"]


def test_reshape_that_changes_the_shape_stays():
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,6,6] x) => (float[N,4,36] y)
        <int64[3] shape = {-1, 4, 36}>
        {
          [reshape] y = Reshape (x, shape)
        }
        """
    _, result = apply_pass(parse_with_shapes(text), LAYOUT)
    assert not result.changed


def test_keras_head_becomes_flatten_and_gemm():
    compiled, result = run_layout(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,6,6] x) => (float[N,5] y)
        <float[4,5] fc = {{{values(4, 5)}}}, float[5] b = {{{values(5, seed=1)}}}, int64[2] axes = {{2, 3}}>
        {{
          [gap] p = GlobalAveragePool (x)
          [squeeze] s = Squeeze (p, axes)
          [fc] m = MatMul (s, fc)
          [bias] y = Add (b, m)
        }}
        """,
        HEAD,
    )
    assert result.counts == {"squeeze-to-flatten": 1, "matmul-to-gemm": 1}
    assert ops(compiled) == ["GlobalAveragePool", "Flatten", "Gemm"]


def test_matmul_with_a_non_constant_bias_keeps_its_add():
    compiled, result = run_layout(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x, float[N,5] b) => (float[N,5] y)
        <float[4,5] fc = {{{values(4, 5)}}}>
        {{
          [fc] m = MatMul (x, fc)
          [bias] y = Add (m, b)
        }}
        """,
        HEAD,
    )
    assert result.counts == {"matmul-to-gemm": 1}
    assert ops(compiled) == ["Gemm", "Add"]


def test_matmul_of_a_rank_3_tensor_stays():
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,4] x) => (float[N,3,5] y)
        <float[4,5] fc = {{{values(4, 5)}}}>
        {{
          [fc] y = MatMul (x, fc)
        }}
        """
    _, result = apply_pass(parse_with_shapes(text), HEAD)
    assert not result.changed


def test_layout_passes_sit_in_canonicalize_after_constant_folding():
    from qanac.targets import CANONICALIZE

    position = CANONICALIZE.index("fold-constants")
    assert CANONICALIZE[position + 1 : position + 3] == (LAYOUT, HEAD)


def test_onnx_model_outputs_are_unchanged_through_canonicalize():
    from qanac.targets import CANONICALIZE

    model = parse(flatten_dense("[0, 2, 3, 1]", "[fc] y = MatMul (f, fc)"))
    compiled, report = verify_pipeline(model, list(CANONICALIZE), random_inputs(model))
    assert ops(compiled) == ["Conv", "Flatten", "Gemm"]
    assert isinstance(compiled.to_onnx(check=True), onnx.ModelProto)
    assert report.totals()[LAYOUT]["counts"] == {"absorb-transpose-into-dense": 1}
