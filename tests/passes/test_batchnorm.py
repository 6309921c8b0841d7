"""fold-batchnorm-into-conv and batchnorm-to-affine."""

from __future__ import annotations

import numpy as np
import pytest

from qanac.targets import CANONICALIZE
from qanac.testing import (
    apply_pass,
    assert_outputs_equal,
    ops,
    parse,
    parse_with_shapes,
    random_inputs,
    rewrite_and_compare,
    verify_pipeline,
)


def values(*shape: int, low: float | None = None, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    data = rng.uniform(low, 1.5, size=shape) if low is not None else rng.normal(size=shape)
    return ", ".join(f"{v:.4f}" for v in data.reshape(-1))


def bn_params(channels: int, seed: int = 1) -> str:
    """Initializers scale, shift, mean and var, to go inside the model's ``<...>`` initializer list."""

    return (
        f"float[{channels}] scale = {{{values(channels, low=0.5, seed=seed)}}}, "
        f"float[{channels}] shift = {{{values(channels, seed=seed + 1)}}}, "
        f"float[{channels}] mean = {{{values(channels, seed=seed + 2)}}}, "
        f"float[{channels}] var = {{{values(channels, low=0.2, seed=seed + 3)}}}"
    )


def conv_bn(group: int = 1, bias: bool = True, extra: str = "", outputs: str = "float[N,4,5,5] y") -> str:
    weight = f"float[4,{4 // group},3,3] w = {{{values(4, 4 // group, 3, 3)}}}, float[4] b = {{{values(4, seed=9)}}}"
    conv_inputs = "(x, w, b)" if bias else "(x, w)"
    return f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,5,5] x) => ({outputs})
        <{weight}, {bn_params(4)}>
        {{
          [conv] c = Conv <pads = [1, 1, 1, 1], group = {group}> {conv_inputs}
          [bn] y = BatchNormalization <epsilon = 0.001> (c, scale, shift, mean, var)
          {extra}
        }}
        """


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_folds_into_conv(group, bias):
    model = parse(conv_bn(group, bias))
    compiled, result = apply_pass(model, "fold-batchnorm-into-conv")
    assert result.counts == {"fold-batchnorm-into-conv": 1}
    assert ops(compiled) == ["Conv"]
    conv = compiled.graph.nodes[0]
    assert conv.name == "conv::fold-batchnorm-into-conv"
    assert compiled.provenance[conv.name] == "fold-batchnorm-into-conv"
    assert conv.outputs[0].name == "y" and len(conv.inputs) == 3
    assert_outputs_equal(model, compiled, random_inputs(model))


def test_shared_weights_are_not_overwritten():
    text = conv_bn(extra="[conv2] z = Conv <pads = [1, 1, 1, 1]> (x, w, b)",
                   outputs="float[N,4,5,5] y, float[N,4,5,5] z")
    model = parse(text)
    compiled, result = apply_pass(model, "fold-batchnorm-into-conv")
    assert result.counts == {"fold-batchnorm-into-conv": 1}
    assert_outputs_equal(model, compiled, random_inputs(model))


def test_conv_output_used_twice_is_not_folded_but_made_affine():
    text = conv_bn(extra="[relu] r = Relu(c)", outputs="float[N,4,5,5] y, float[N,4,5,5] r")
    model = parse(text)
    compiled, result = apply_pass(model, "fold-batchnorm-into-conv")
    assert not result.changed
    assert result.details["skipped"] == {"bn": "output of Conv 'conv' has other consumers"}
    compiled, result = apply_pass(compiled, "batchnorm-to-affine")
    assert result.counts == {"batchnorm-to-affine": 1}
    assert ops(compiled) == ["Conv", "Relu", "Mul", "Add"]
    mul = next(n for n in compiled.graph.nodes if n.op == "Mul")
    assert mul.name == "bn::batchnorm-to-affine:0" and mul.inputs[1].values.shape == (4, 1, 1)
    assert_outputs_equal(model, compiled, random_inputs(model))


def test_training_mode_batchnorm_is_left_alone():
    text = conv_bn().replace("<epsilon = 0.001>", "<epsilon = 0.001, training_mode = 1>")
    model = parse(text)
    for name in ("fold-batchnorm-into-conv", "batchnorm-to-affine"):
        compiled, result = apply_pass(model, name)
        assert not result.changed
        assert result.details["skipped"] == {"bn": "training_mode=1 (uses batch statistics)"}
        assert ops(compiled) == ["Conv", "BatchNormalization"]


GEMM_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,6] x) => (float[N,3] y)
<float[{w_shape}] w = {{{w}}}, float[3] c = {{{c}}}, {bn}>
{{
  [fc] h = Gemm <transB = {trans_b}, alpha = 0.5, beta = 2.0> ({gemm_inputs})
  [bn] y = BatchNormalization(h, scale, shift, mean, var)
}}
"""


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_folds_into_gemm(trans_b, bias):
    model = parse(
        GEMM_BN.format(
            w_shape="3,6" if trans_b else "6,3",
            w=values(18),
            c=values(3, seed=5),
            bn=bn_params(3),
            trans_b=trans_b,
            gemm_inputs="x, w, c" if bias else "x, w",
        )
    )
    compiled, result = apply_pass(model, "fold-batchnorm-into-conv")
    assert result.counts == {"fold-batchnorm-into-gemm": 1}
    gemm = compiled.graph.nodes[0]
    assert ops(compiled) == ["Gemm"] and gemm.attrs["alpha"] == 1.0 and gemm.attrs["beta"] == 1.0
    assert_outputs_equal(model, compiled, random_inputs(model))


@pytest.mark.parametrize("group", [1, 2])
def test_batchnorm_folds_into_conv_transpose(group):
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,3,3] x) => (float[N,6,5,5] y)
        <float[4,{6 // group},3,3] w = {{{values(4, 6 // group, 3, 3)}}}, {bn_params(6)}>
        {{
          [up] t = ConvTranspose <group = {group}> (x, w)
          [bn] y = BatchNormalization(t, scale, shift, mean, var)
        }}
        """
    )
    compiled, result = apply_pass(model, "fold-batchnorm-into-conv")
    assert result.counts == {"fold-batchnorm-into-convtranspose": 1}
    assert_outputs_equal(model, compiled, random_inputs(model))


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_standalone_batchnorm_becomes_mul_add(rank):
    dims = ["N", "4", "5", "6"][:rank]
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{",".join(dims)}] x) => (float[{",".join(dims)}] y)
        <{bn_params(4)}>
        {{
          [relu] r = Relu(x)
          [bn] y = BatchNormalization(r, scale, shift, mean, var)
        }}
        """
    )
    compiled, result = apply_pass(model, "fold-batchnorm-into-conv")
    assert not result.changed
    compiled, result = apply_pass(compiled, "batchnorm-to-affine")
    assert result.counts == {"batchnorm-to-affine": 1}
    assert ops(compiled) == ["Relu", "Mul", "Add"]
    mul, add = compiled.graph.nodes[1:]
    assert mul.inputs[1].values.shape == add.inputs[1].values.shape == (4,) + (1,) * (rank - 2)
    assert add.outputs[0].name == "y" and add.name == "bn::batchnorm-to-affine:1"
    assert_outputs_equal(model, compiled, random_inputs(model))


def test_batchnorm_after_conv_is_left_to_the_fold():
    compiled, result = apply_pass(parse(conv_bn()), "batchnorm-to-affine")
    assert not result.changed
    assert result.details["skipped"] == {"bn": "left to fold-batchnorm-into-conv"}


def test_batchnorm_passes_in_the_pipeline_with_verify_each():
    text = conv_bn(extra="[relu] r = Relu(y)\n [bn2] z = BatchNormalization(r, scale, shift, mean, var)",
                   outputs="float[N,4,5,5] z")
    model = parse(text)
    compiled, report = verify_pipeline(model, list(CANONICALIZE), random_inputs(model))
    totals = report.totals()
    assert totals["fold-batchnorm-into-conv"]["counts"] == {"fold-batchnorm-into-conv": 1}
    assert totals["batchnorm-to-affine"]["counts"] == {"batchnorm-to-affine": 1}
    assert ops(compiled) == ["Conv", "Relu", "Mul", "Add"]


def random_layer_bn(seed: int):
    """A random Conv/ConvTranspose (group, stride, dilation, pads, bias) followed by a BatchNormalization."""

    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    group = int(rng.choice([1, 2, 3]))
    c_in, c_out = group * int(rng.integers(1, 3)), group * int(rng.integers(1, 4))
    k, stride = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    dilation, pad = int(rng.integers(1, 3)), int(rng.integers(0, 2))
    op = "Conv" if rng.random() < 0.6 else "ConvTranspose"
    shape = (c_out, c_in // group, k, k) if op == "Conv" else (c_in, c_out // group, k, k)
    inits = {"w": rng.normal(size=shape), "b": rng.normal(size=c_out), "scale": rng.uniform(0.5, 1.5, c_out),
             "shift": rng.normal(size=c_out), "mean": rng.normal(size=c_out), "var": rng.uniform(0.1, 2.0, c_out)}
    bias = rng.random() < 0.5
    layer = helper.make_node(op, ["x", "w", "b"] if bias else ["x", "w"], ["t"], name="layer", group=group,
                             strides=[stride] * 2, dilations=[dilation] * 2, pads=[pad] * 4)
    bn = helper.make_node("BatchNormalization", ["t", "scale", "shift", "mean", "var"], ["y"], name="bn",
                          epsilon=float(rng.uniform(1e-5, 1e-2)))
    graph = helper.make_graph(
        [layer, bn], "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items() if k != "b" or bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("seed", range(12))
def test_random_layer_batchnorm_pairs_fold_exactly(seed):
    model = random_layer_bn(seed)
    inputs = random_inputs(model, seed=seed)
    compiled, report = verify_pipeline(model, list(CANONICALIZE), inputs)
    assert [n.op for n in compiled.graph.nodes] in (["Conv"], ["ConvTranspose"])
    assert sum(report.totals()["fold-batchnorm-into-conv"]["counts"].values()) == 1
    assert_outputs_equal(model, compiled, inputs)


def conv_pool_bn(scale: str, pool: str = "kernel_shape = [2, 2], strides = [2, 2]", norm: str | None = None) -> str:
    """Conv -> MaxPool -> (BatchNormalization with ``scale``, or the ``norm`` lines) -> Relu: Keras'
    Conv -> MaxPool -> BatchNorm -> ReLU block, as BrainChip's zoo writes it."""

    norm = norm or "[bn] n = BatchNormalization <epsilon = 0.001> (p, scale, shift, mean, var)"
    return f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,6,6] x) => (float[N,4,3,3] y)
        <float[4,4,3,3] w = {{{values(4, 4, 3, 3)}}}, float[4] b = {{{values(4, seed=9)}}},
         float[4] scale = {{{scale}}}, float[4] shift = {{{values(4, seed=2)}}},
         float[4] mean = {{{values(4, seed=3)}}}, float[4] var = {{{values(4, low=0.2, seed=4)}}},
         float[1,4,1,1] s4 = {{{scale}}},
         float[4,1,1] t3 = {{{values(4, seed=5)}}}>
        {{
          [conv] c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
          [pool] p = MaxPool <{pool}> (c)
          {norm}
          [relu] y = Relu (n)
        }}
        """


POSITIVE = "0.5, 1.25, 0.0, 2.0"  # a zero scale commutes with max pooling too
NEGATIVE = "0.5, 1.25, -0.75, 2.0"


@pytest.mark.parametrize("pool", ["kernel_shape = [2, 2], strides = [2, 2]",
                                  "kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]"])
def test_batchnorm_after_maxpool_folds_into_the_conv_before_it(pool):
    model = parse(conv_pool_bn(POSITIVE, pool))
    compiled, counts, _ = rewrite_and_compare(model, "fold-batchnorm-into-conv")
    assert counts == {"fold-batchnorm-through-maxpool": 1}
    assert ops(compiled) == ["Conv", "MaxPool", "Relu"]
    conv, maxpool, _ = compiled.graph.nodes
    assert conv.name == "conv::fold-batchnorm-into-conv" and maxpool.outputs[0] is compiled.graph.nodes[2].inputs[0]
    assert compiled.provenance["pool"] == "fold-batchnorm-into-conv"


def test_batchnorm_after_maxpool_with_a_negative_scale_stays_with_the_channel_named():
    model = parse(conv_pool_bn(NEGATIVE))
    compiled, result = apply_pass(parse_with_shapes(conv_pool_bn(NEGATIVE)), "fold-batchnorm-into-conv")
    assert not result.changed and ops(compiled) == ["Conv", "MaxPool", "BatchNormalization", "Relu"]
    reason = result.details["skipped"]["bn"]
    assert reason.startswith("negative scale") and "on channel 2" in reason and "MaxPool 'pool'" in reason
    compiled, result = apply_pass(compiled, "batchnorm-to-affine")
    assert result.counts == {"batchnorm-to-affine": 1}
    compiled, result = apply_pass(compiled, "fold-batchnorm-into-conv")
    assert not result.changed and "on channel 2" in result.details["skipped"]["bn::batchnorm-to-affine:0"]
    assert_outputs_equal(model, compiled, random_inputs(model))


MUL_ADD = "[mul] m = Mul (s4, p)\n [add] n = Add (m, t3)"


def test_mul_add_after_maxpool_folds_into_the_conv_before_it():
    model = parse(conv_pool_bn(POSITIVE, norm=MUL_ADD))
    compiled, counts, _ = rewrite_and_compare(model, "fold-batchnorm-into-conv")
    assert counts == {"fold-scale-through-maxpool": 1}
    assert ops(compiled) == ["Conv", "MaxPool", "Relu"]


def test_mul_add_after_maxpool_with_a_negative_scale_stays():
    compiled, result = apply_pass(parse_with_shapes(conv_pool_bn(NEGATIVE, norm=MUL_ADD)), "fold-batchnorm-into-conv")
    assert not result.changed and "on channel 2" in result.details["skipped"]["mul"]


def test_mul_add_after_a_conv_folds_into_it_whatever_the_sign():
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,6,6] x) => (float[N,4,6,6] y)
        <float[4,4,3,3] w = {{{values(4, 4, 3, 3)}}}, float[1,4,1,1] s4 = {{{NEGATIVE}}},
         float[4,1,1] t3 = {{{values(4, seed=5)}}}>
        {{
          [conv] c = Conv <pads = [1, 1, 1, 1]> (x, w)
          [mul] m = Mul (c, s4)
          [add] y = Add (t3, m)
        }}
        """)
    compiled, counts, _ = rewrite_and_compare(model, "fold-batchnorm-into-conv")
    assert counts == {"fold-scale-into-conv": 1}
    assert ops(compiled) == ["Conv"] and compiled.graph.nodes[0].outputs[0].name == "y"


def test_a_scale_that_is_not_per_channel_stays():
    text = conv_pool_bn(POSITIVE, norm="[mul] n = Mul (p, p)")
    _, result = apply_pass(parse(text), "fold-batchnorm-into-conv")
    assert not result.changed
    text = conv_pool_bn(POSITIVE, norm="[mul] n = Mul (p, w33)").replace(
        "float[4,1,1] t3", f"float[1,1,3,3] w33 = {{{values(9)}}}, float[4,1,1] t3")
    compiled, result = apply_pass(parse_with_shapes(text), "fold-batchnorm-into-conv")
    assert not result.changed and result.details["skipped"]["mul"] == "the scale is not one constant per channel"


def bn_conv(shift: str, conv: str = "pads = [1, 1, 1, 1]", group: int = 1, second: str = "") -> str:
    """x -> BatchNormalization (the model's input normalisation; var + epsilon = 1, so the BN computes
    scale * x + shift) -> Conv <``conv``> [-> a second Conv]."""

    return f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,6,6] x) => (float[N,?,?,?] y{", float[N,?,?,?] z" if second else ""})
        <float[6,{4 // group},3,3] w = {{{values(6, 4 // group, 3, 3)}}}, float[6] b = {{{values(6, seed=9)}}},
         float[2,4,1,1] w2 = {{{values(2, 4, 1, 1, seed=8)}}},
         float[4] scale = {{0.5, 1.25, -0.75, 2.0}}, float[4] shift = {{{shift}}},
         float[4] mean = {{0.0, 0.0, 0.0, 0.0}}, float[4] var = {{0.999, 0.999, 0.999, 0.999}}>
        {{
          [bn] n = BatchNormalization <epsilon = 0.001> (x, scale, shift, mean, var)
          [conv] y = Conv <{conv}, group = {group}> (n, w, b)
          {"[conv2] z = Conv (n, w2)" if second else ""}
        }}
        """


SHIFTED = "0.25, -1.0, 0.0, 3.0"
ZERO = "0.0, 0.0, 0.0, 0.0"


@pytest.mark.parametrize("shift, conv, group", [
    (SHIFTED, "pads = [0, 0, 0, 0]", 1),  # no padding: any shift folds
    (SHIFTED, "pads = [0, 0, 0, 0], strides = [2, 2]", 2),
    (ZERO, "pads = [1, 1, 1, 1]", 1),  # the BN maps 0 to 0: the padding means the same
])
def test_batchnorm_before_a_conv_folds_into_it_when_the_padding_keeps_its_meaning(shift, conv, group):
    model = parse(bn_conv(shift, conv, group))
    compiled, counts, _ = rewrite_and_compare(model, "fold-batchnorm-into-conv")
    assert counts == {"fold-batchnorm-into-next-conv": 1}
    assert ops(compiled) == ["Conv"] and compiled.graph.nodes[0].inputs[0].name == "x"
    assert compiled.graph.nodes[0].name == "conv::fold-batchnorm-into-conv"


def test_batchnorm_before_two_unpadded_convs_folds_into_both():
    model = parse(bn_conv(SHIFTED, "pads = [0, 0, 0, 0]", second="yes"))
    compiled, counts, _ = rewrite_and_compare(model, "fold-batchnorm-into-conv")
    assert counts == {"fold-batchnorm-into-next-conv": 2} and ops(compiled) == ["Conv", "Conv"]


def test_batchnorm_before_a_padded_conv_that_moves_zero_stays_with_the_padding_value():
    model = parse(bn_conv(SHIFTED))
    compiled, result = apply_pass(parse_with_shapes(bn_conv(SHIFTED)), "fold-batchnorm-into-conv")
    assert not result.changed
    reason = result.details["skipped"]["bn"]
    assert "Conv 'conv' pads its input with zeros" in reason and "maps 0 to 0.25 on channel 0" in reason
    assert "would have to be -0.5 of the raw input" in reason
    compiled, result = apply_pass(compiled, "batchnorm-to-affine")
    assert result.counts == {"batchnorm-to-affine": 1} and ops(compiled) == ["Mul", "Add", "Conv"]
    assert_outputs_equal(model, compiled, random_inputs(model))


@pytest.mark.parametrize("padding", [0, 1])
def test_torch_input_batchnorm_before_the_first_conv(padding):
    torch = pytest.importorskip("torch")
    import io

    import onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 8, 3, padding=padding), torch.nn.ReLU())
    net[0].running_mean.uniform_(-1, 1)
    net[0].running_var.uniform_(0.5, 2)
    buffer = io.BytesIO()
    torch.onnx.export(net.eval(), torch.zeros(1, 3, 8, 8), buffer, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=17, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    compiled, report = verify_pipeline(model, list(CANONICALIZE), random_inputs(model))
    if padding:
        assert ops(compiled) == ["Mul", "Add", "Conv", "Relu"]
        assert "pads its input with zeros" in next(iter(report.skipped()["fold-batchnorm-into-conv"].values()))
    else:
        assert ops(compiled) == ["Conv", "Relu"]
        assert report.totals()["fold-batchnorm-into-conv"]["counts"] == {"fold-batchnorm-into-next-conv": 1}
    assert_outputs_equal(model, compiled, random_inputs(model, seed=3))
