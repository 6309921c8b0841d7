"""explicit-pads (auto_pad resolved from the input shape into pads), fuse-pad-into-conv and
fuse-pad-into-maxpool (a Pad folded into the reader's pads; outputs equal within the ``--verify-each``
tolerance, max abs error <= 1e-4 * (1 + max |reference|))."""

from __future__ import annotations

import numpy as np
import pytest

from qanac.testing import (
    apply_pass,
    assert_outputs_equal,
    ops,
    parse,
    parse_with_shapes,
    random_inputs,
    rewrite_and_compare,
    run,
    verify_pipeline,
)


def values(*shape: int, seed: int = 0) -> str:
    data = np.random.default_rng(seed).normal(size=shape)
    return ", ".join(f"{v:.4f}" for v in data.reshape(-1))


def single_node(op: str, attrs: str, x: str = "float[N,2,7,6] x", weight: str = "") -> str:
    inputs = "(x, w)" if weight else "(x)"
    return f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g ({x}) => (float[N,?,?,?] y)
        {weight}
        {{
          [node] y = {op} <{attrs}> {inputs}
        }}
        """


CONV_WEIGHT = f"<float[3,2,3,3] w = {{{values(3, 2, 3, 3)}}}>"
CONV_T_WEIGHT = f"<float[2,3,3,3] w = {{{values(2, 3, 3, 3)}}}>"

CASES = {
    # op, attributes, weight, expected pads [h_begin, w_begin, h_end, w_end] for a 7x6 input
    "conv-same-upper-stride-2": ("Conv", 'auto_pad = "SAME_UPPER", strides = [2, 2]', CONV_WEIGHT, [1, 0, 1, 1]),
    "conv-same-lower-stride-1": ("Conv", 'auto_pad = "SAME_LOWER"', CONV_WEIGHT, [1, 1, 1, 1]),
    "conv-valid": ("Conv", 'auto_pad = "VALID", strides = [2, 2]', CONV_WEIGHT, [0, 0, 0, 0]),
    "maxpool-same-upper": (
        "MaxPool", 'auto_pad = "SAME_UPPER", kernel_shape = [2, 2], strides = [2, 2]', "", [0, 0, 1, 0]
    ),
    "maxpool-same-lower": (
        "MaxPool", 'auto_pad = "SAME_LOWER", kernel_shape = [2, 2], strides = [2, 2]', "", [1, 0, 0, 0]
    ),
    "avgpool-same-lower": ("AveragePool", 'auto_pad = "SAME_LOWER", kernel_shape = [3, 2]', "", [1, 1, 1, 0]),
    "avgpool-same-upper-count-pad": (
        "AveragePool", 'auto_pad = "SAME_UPPER", kernel_shape = [2, 3], strides = [3, 2], count_include_pad = 1', "",
        [0, 0, 1, 1],
    ),
    "convtranspose-same-upper": (
        "ConvTranspose", 'auto_pad = "SAME_UPPER", strides = [2, 2]', CONV_T_WEIGHT, [0, 0, 1, 1]
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_auto_pad_becomes_explicit_pads(case):
    op, attrs, weight, expected = CASES[case]
    model = parse(single_node(op, attrs, weight=weight))
    compiled, result = apply_pass(model, "explicit-pads")
    mode = attrs.split('"')[1]
    assert result.counts == {f"explicit-pads-{mode.lower().replace('_', '-')}": 1}
    node = compiled.graph.nodes[0]
    assert "auto_pad" not in node.attrs
    assert list(node.attrs["pads"]) == expected
    assert_outputs_equal(model, compiled, random_inputs(model))


def test_dilated_same_padding_that_onnx_runtime_refuses_becomes_runnable():
    # ONNX Runtime refuses "Dilation ... for AutoPadType::SAME_UPPER" (and onnx.reference gets the size
    # wrong), so there is no reference run: the pads are checked by hand. Rows: 7 in, stride 2 -> 4 out,
    # dilated extent 5, total (4-1)*2 + 5 - 7 = 4 -> 2 + 2; columns: 6 -> 3, extent 3, total 1 -> 0 + 1.
    attrs = 'auto_pad = "SAME_UPPER", dilations = [2, 1], strides = [2, 2]'
    model = parse(single_node("Conv", attrs, weight=CONV_WEIGHT))
    compiled, result = apply_pass(model, "explicit-pads")
    assert list(compiled.graph.nodes[0].attrs["pads"]) == [2, 0, 2, 1]
    (output,) = run(compiled, random_inputs(model))
    assert output.shape == (4, 3, 4, 3)


def test_notset_is_left_alone():
    model = parse(single_node("Conv", 'pads = [1, 1, 1, 1], strides = [2, 2]', weight=CONV_WEIGHT))
    compiled, result = apply_pass(model, "explicit-pads")
    assert not result.changed and "skipped" not in result.details
    assert list(compiled.graph.nodes[0].attrs["pads"]) == [1, 1, 1, 1]


def test_pooling_whose_ceil_mode_disagrees_with_valid_is_left_alone():
    # VALID with ceil_mode: ceil((6 - 2 + 1) / 2) = 3 columns; pads of 0 with ceil_mode give 3 too,
    # but on the 7 rows: ceil((7 - 2 + 1) / 2) = 3 against ceil((7 - 2) / 2) + 1 = 4
    model = parse(single_node("MaxPool", 'auto_pad = "VALID", kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1'))
    compiled, result = apply_pass(model, "explicit-pads")
    assert not result.changed
    assert compiled.graph.nodes[0].attrs["auto_pad"] == "VALID"
    assert "auto_pad VALID gives 3" in result.details["skipped"]["node"]


def test_unknown_spatial_size_is_left_for_a_later_sweep():
    model = parse(single_node("MaxPool", 'auto_pad = "SAME_UPPER", kernel_shape = [2, 2]', x="float[N,2,H,W] x"))
    _, result = apply_pass(model, "explicit-pads")
    assert not result.changed
    assert "unknown" in result.details["skipped"]["node"]


def test_explicit_pads_in_the_pipeline_with_verify_each():
    model = parse(single_node("Conv", 'auto_pad = "SAME_UPPER", strides = [2, 2]', weight=CONV_WEIGHT))
    compiled, report = verify_pipeline(model, ["infer-shapes", "explicit-pads"], random_inputs(model))
    assert report.totals()["explicit-pads"]["counts"] == {"explicit-pads-same-upper": 1}
    assert compiled.graph.nodes[0].outputs[0].shape == ["N", 3, 4, 3]


# --- fuse-pad-into-conv ----------------------------------------------------------------------------------

PAD_WEIGHT = f"<float[3,2,3,3] w = {{{values(3, 2, 3, 3)}}}, float[3,2,1,1] w1 = {{{values(3, 2, 1, 1, seed=1)}}}>"


def pad_then_conv(pads: str, value: str = "", mode: str = "", conv_pads: str = "pads = [1, 0, 0, 1], strides = [2, 2]",
                  second_reader: str = "") -> str:
    value_input = ", v" if value else ""
    value_init = f", float v = {{{value}}}" if value else ""
    mode_attr = f'<mode = "{mode}">' if mode else ""
    extra = f"\n          z = {second_reader}" if second_reader else ""
    out_z = ", float[N,?,?,?] z" if second_reader else ""
    return f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2,7,6] x) => (float[N,?,?,?] y{out_z})
        <int64[8] p = {{{pads}}}{value_init}, {PAD_WEIGHT[1:-1]}>
        {{
          [pad] padded = Pad {mode_attr} (x, p{value_input})
          [conv] y = Conv <{conv_pads}> (padded, w){extra}
        }}
        """


@pytest.mark.parametrize("pads, conv_pads, expected", [
    ("0, 0, 0, 1, 0, 0, 1, 0", "pads = [1, 0, 0, 1], strides = [2, 2]", [1, 1, 1, 1]),
    ("0, 0, 1, 1, 0, 0, 1, 1", "strides = [1, 1]", [1, 1, 1, 1]),  # ZeroPad2d(1) + Conv(padding=0)
])
def test_zero_pad_folds_into_the_conv(pads, conv_pads, expected):
    model = parse(pad_then_conv(pads, conv_pads=conv_pads))
    compiled, result = apply_pass(model, "fuse-pad-into-conv")
    assert result.counts == {"fuse-pad-into-conv": 1}
    assert [n.op for n in compiled.graph.nodes] == ["Conv"]
    assert list(compiled.graph.nodes[0].attrs["pads"]) == expected
    assert_outputs_equal(model, compiled, random_inputs(model))


def test_pad_read_by_two_convs_folds_into_both():
    model = parse(pad_then_conv("0, 0, 1, 1, 0, 0, 1, 1", conv_pads="strides = [1, 1]",
                                second_reader="Conv <strides = [2, 2]> (padded, w1)"))
    compiled, result = apply_pass(model, "fuse-pad-into-conv")
    assert result.counts == {"fuse-pad-into-conv": 2}
    assert [n.op for n in compiled.graph.nodes] == ["Conv", "Conv"]
    assert_outputs_equal(model, compiled, random_inputs(model))


@pytest.mark.parametrize("kwargs, reason", [
    ({"pads": "0, 0, 1, 1, 0, 0, 1, 1", "value": "0.5"}, "a value other than 0"),
    ({"pads": "0, 0, 1, 1, 0, 0, 1, 1", "mode": "reflect"}, "mode 'reflect'"),
    ({"pads": "0, 1, 1, 1, 0, 0, 1, 1"}, "batch or channel"),
    ({"pads": "0, 0, -1, 0, 0, 0, 0, 0"}, "negative pads"),
    ({"pads": "0, 0, 1, 1, 0, 0, 1, 1", "second_reader": "Relu (padded)"}, "something other than"),
])
def test_pad_left_with_reason(kwargs, reason):
    model = parse(pad_then_conv(conv_pads="strides = [1, 1]", **kwargs))
    compiled, result = apply_pass(model, "fuse-pad-into-conv")
    assert result.counts == {}
    assert "Pad" in [n.op for n in compiled.graph.nodes]
    assert reason in result.details["skipped"]["pad"]


# --- fuse-pad-into-maxpool -------------------------------------------------------------------------------


def pad_then_maxpool(pads: str = "0, 0, 1, 1, 0, 0, 1, 1", source: str = "Relu", value: str = "",
                     pool: str = "kernel_shape = [3, 3], strides = [2, 2]", size: str = "7,6") -> str:
    """x -> Conv 1x1 -> ``source`` -> Pad(``pads``, ``value``) -> MaxPool <``pool``>: Keras' ZeroPadding2D
    before MaxPooling2D, as tf2onnx writes it."""

    value_input = ", v" if value else ""
    value_init = f", float v = {{{value}}}" if value else ""
    act = f"[act] a = {source} (c)" if source else "[act] a = Identity (c)"
    return f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2,{size}] x) => (float[N,?,?,?] y)
        <int64[8] p = {{{pads}}}{value_init}, {PAD_WEIGHT[1:-1]}>
        {{
          [conv] c = Conv (x, w1)
          {act}
          [pad] padded = Pad (a, p{value_input})
          [pool] y = MaxPool <{pool}> (padded)
        }}
        """


@pytest.mark.parametrize("size", ["7,6", "8,8"])
@pytest.mark.parametrize("source, value", [("Relu", ""), ("Sigmoid", "0.0"), ("", "-3.4028234663852886e38")])
def test_pad_before_a_maxpool_folds_into_its_pads(source, value, size):
    model = parse(pad_then_maxpool(source=source, value=value, size=size))
    compiled, counts, _ = rewrite_and_compare(model, "fuse-pad-into-maxpool")
    assert counts == {"fuse-pad-into-maxpool": 1}
    assert ops(compiled)[-1] == "MaxPool" and "Pad" not in ops(compiled)
    assert list(compiled.graph.nodes[-1].attrs["pads"]) == [1, 1, 1, 1]


def test_keras_zero_padding_and_maxpool_reach_split_padded_maxpool():
    from qanac.targets import CANONICALIZE, get_target

    get_target("akida").load_passes()
    model = parse(pad_then_maxpool(size="8,8"))
    compiled, report = verify_pipeline(model, [*CANONICALIZE, "split-padded-maxpool"], random_inputs(model))
    assert report.totals()["split-padded-maxpool"]["counts"] == {"split-padded-maxpool": 1}
    assert "Pad" not in ops(compiled)
    assert [list(n.attrs["kernel_shape"]) for n in compiled.graph.nodes if n.op == "MaxPool"] == [[2, 2], [2, 2]]


@pytest.mark.parametrize("kwargs, reason", [
    ({"source": "Neg"}, "may be negative"),
    ({"source": "Relu", "value": "0.5"}, "may be negative"),
    ({"pads": "0, 0, 3, 3, 0, 0, 0, 0"}, "would cover only padding"),
    ({"pool": "kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1", "pads": "0, 0, 0, 0, 0, 0, 1, 1"},
     "ceil_mode"),
    ({"pads": "0, 1, 1, 1, 0, 0, 1, 1"}, "batch or channel"),
])
def test_pad_before_a_maxpool_left_with_reason(kwargs, reason):
    compiled, result = apply_pass(parse_with_shapes(pad_then_maxpool(**kwargs)), "fuse-pad-into-maxpool")
    assert result.counts == {} and "Pad" in ops(compiled)
    assert reason in result.details["skipped"]["pad"]
