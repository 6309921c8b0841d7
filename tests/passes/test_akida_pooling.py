"""average-pool-to-depthwise, split-padded-maxpool, stage-global-average-pool: structure after the rewrite,
ONNX Runtime outputs equal to the original (``--verify-each`` tolerance, max abs error <= 1e-4 * (1 + max
|reference|)), and the cases each pass must leave alone, with their reasons."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from qanac.testing import graph_model, rewrite_and_compare

C = 4


def model(tail: list[tuple[str, dict]], size: tuple[int, int] = (8, 8), stem: str = "relu",
          strides: int = 1) -> onnx.ModelProto:
    """x (N, 4, H, W) -> stem 3x3 Conv (pads 1) -> conv 3x3 Conv (pads 1, ``strides``) [-> act] -> tail ops.

    ``tail`` is a list of (op, attributes); each reads the previous output. ``stem`` names the activation
    after the second conv: "relu", "sigmoid" or "none".
    """

    rng = np.random.default_rng(0)
    inits = {"w0": rng.normal(size=(C, C, 3, 3)), "w1": rng.normal(size=(C, C, 3, 3)), "b1": rng.normal(size=C)}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["s", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[strides] * 2),
    ]
    x = "c"
    if stem != "none":
        nodes.append(helper.make_node(stem.capitalize(), ["c"], ["a"], name="act"))
        x = "a"
    for i, (op, attrs) in enumerate(tail):
        out = "y" if i == len(tail) - 1 else f"t{i}"
        nodes.append(helper.make_node(op, [x], [out], name=op.lower(), **attrs))
        x = out
    return graph_model(nodes, inits, ["N", C, *size])



def ops(compiled) -> list[str]:
    return [n.op for n in compiled.graph.nodes]


def avg(kernel, strides, pads=(0, 0, 0, 0), **attrs) -> tuple[str, dict]:
    return "AveragePool", {"kernel_shape": [kernel] * 2, "strides": [strides] * 2, "pads": list(pads), **attrs}


# --- average-pool-to-depthwise --------------------------------------------------------------------------


@pytest.mark.parametrize("pool, size, K, pads, taps", [
    (avg(2, 2), (8, 8), 3, [0, 0, 1, 1], (slice(0, 2), slice(0, 2))),
    (avg(2, 2), (7, 9), 3, [0, 0, 0, 0], (slice(0, 2), slice(0, 2))),
    (avg(3, 2, (1, 1, 1, 1), count_include_pad=1), (8, 8), 3, [1, 1, 0, 0], (slice(0, 3), slice(0, 3))),
    (avg(3, 1, (1, 1, 1, 1), count_include_pad=1), (8, 8), 3, [1, 1, 1, 1], (slice(0, 3), slice(0, 3))),
    (avg(5, 1, (2, 2, 2, 2), count_include_pad=1), (8, 8), 5, [2, 2, 2, 2], (slice(0, 5), slice(0, 5))),
    (avg(2, 2, ceil_mode=1), (8, 8), 3, [0, 0, 1, 1], (slice(0, 2), slice(0, 2))),
    (avg(3, 1), (8, 8), 3, [0, 0, 0, 0], (slice(0, 3), slice(0, 3))),
])
def test_average_pool_becomes_masked_depthwise_conv(pool, size, K, pads, taps):
    compiled, counts, _ = rewrite_and_compare(model([pool], size), "average-pool-to-depthwise")
    assert counts == {"average-pool-to-depthwise": 1}
    conv = next(n for n in compiled.graph.nodes if n.name == "averagepool::average-pool-to-depthwise")
    assert conv.op == "Conv" and conv.attrs["group"] == C and conv.attrs["pads"] == pads
    weights = conv.inputs[1].values[:, 0]
    window = pool[1]["kernel_shape"][0] ** 2
    expected = np.zeros((C, K, K), np.float32)
    expected[:, taps[0], taps[1]] = 1.0 / window
    np.testing.assert_array_equal(weights, expected)
    assert "AveragePool" not in ops(compiled)


@pytest.mark.parametrize("pool, size, reason", [
    (avg(2, 1), (8, 8), "no depthwise kernel"),  # shrinks the map by one pixel: one-sided padding
    (avg(3, 1, (1, 1, 1, 1)), (8, 8), "count_include_pad=0 with windows over the padding"),
    (avg(2, 2, ceil_mode=1), (7, 7), "a ceil_mode window runs past the padding"),
    (avg(4, 4), (8, 8), "strides [4, 4]"),
])
def test_average_pool_left_with_reason(pool, size, reason):
    compiled, counts, details = rewrite_and_compare(model([pool], size), "average-pool-to-depthwise")
    assert counts == {} and "AveragePool" in ops(compiled)
    assert reason in details["skipped"]["averagepool"]


def test_whole_map_average_pool_is_left_to_quantizeml():
    compiled, counts, details = rewrite_and_compare(model([avg(8, 1)]), "average-pool-to-depthwise")
    assert counts == {} and details == {}


# --- split-padded-maxpool -------------------------------------------------------------------------------

MAXPOOL_3_2_1 = ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})


@pytest.mark.parametrize("size", [(8, 8), (7, 7), (8, 5), (2, 2)])
def test_padded_maxpool_becomes_two_2x2_pools_around_a_shift(size):
    compiled, counts, _ = rewrite_and_compare(model([MAXPOOL_3_2_1], size), "split-padded-maxpool")
    assert counts == {"split-padded-maxpool": 1}
    assert ops(compiled) == ["Conv", "Conv", "Relu", "MaxPool", "Conv", "MaxPool", "Relu"]
    first, shift, second = compiled.graph.nodes[3:6]
    assert first.attrs == {"kernel_shape": [2, 2], "strides": [1, 1], "pads": [0, 0, 1, 1]}
    assert second.attrs["pads"] == [0, 0, size[0] % 2, size[1] % 2]
    weights = shift.inputs[1].values
    assert shift.attrs["group"] == 1 and np.count_nonzero(weights) == C
    np.testing.assert_array_equal(weights[:, :, 0, 0], np.eye(C))
    assert compiled.graph.outputs[0].name == "y"


@pytest.mark.parametrize("stem, pool, reason", [
    ("none", MAXPOOL_3_2_1, "its input may be negative"),
    ("sigmoid", MAXPOOL_3_2_1, "its input may be negative"),
    ("relu", ("MaxPool", {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}), "only MaxPool 3x3"),
])
def test_padded_maxpool_left_with_reason(stem, pool, reason):
    compiled, counts, details = rewrite_and_compare(model([pool], stem=stem), "split-padded-maxpool")
    assert counts == {} and ops(compiled).count("MaxPool") == 1
    assert reason in details["skipped"]["maxpool"]


def test_padded_maxpool_after_a_strided_conv_gets_an_identity_host():
    compiled, counts, _ = rewrite_and_compare(model([MAXPOOL_3_2_1], (16, 16), strides=2), "split-padded-maxpool")
    assert counts == {"split-padded-maxpool-with-identity-host": 1}
    assert ops(compiled) == ["Conv", "Conv", "Relu", "Conv", "MaxPool", "Relu", "Conv", "MaxPool", "Relu"]
    host = compiled.graph.nodes[3]
    assert host.name == "maxpool::split-padded-maxpool:0"
    np.testing.assert_array_equal(host.inputs[1].values[:, :, 0, 0], np.eye(C))


def test_maxpool_without_begin_pads_is_not_a_candidate():
    pool = ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]})
    compiled, counts, details = rewrite_and_compare(model([pool]), "split-padded-maxpool")
    assert counts == {} and details == {}


# --- stage-global-average-pool --------------------------------------------------------------------------

GAP = ("GlobalAveragePool", {})


@pytest.mark.parametrize("size, strides, stages", [
    ((8, 8), 2, 0),  # after a strided conv: the identity alone
    ((16, 16), 1, 1),
    ((13, 13), 1, 1),
    ((30, 30), 1, 2),
    ((1, 200), 1, 1),
])
def test_global_pool_gets_sum_preserving_stages_and_identity(size, strides, stages):
    compiled, counts, details = rewrite_and_compare(model([GAP], size, strides=strides), "stage-global-average-pool")
    expected = {"identity-conv-before-global-pool": 1}
    if stages:
        expected["halve-before-global-pool"] = stages
    assert counts == expected
    staged = [n for n in compiled.graph.nodes if n.name.startswith("globalaveragepool::")]
    assert [n.attrs["group"] for n in staged] == [C] * stages + [1]
    identity = staged[-1]
    np.testing.assert_array_equal(identity.inputs[1].values[:, :, 0, 0], np.eye(C))
    assert identity.outputs[0].outputs[0].op == "GlobalAveragePool"
    pixels = [n.outputs[0].shape[2] * n.outputs[0].shape[3] for n in staged]
    assert pixels[-1] <= 144 and all(p > 144 for p in pixels[:-2])


def test_global_pool_after_maxpool():
    maxpool = ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]})
    compiled, counts, details = rewrite_and_compare(model([maxpool, GAP]), "stage-global-average-pool")
    assert counts == {"identity-conv-before-global-pool": 1}
    assert "after MaxPool" in details["staged"]["globalaveragepool"]


def test_global_pool_of_a_map_read_elsewhere_is_left():
    """A squeeze-and-excitation: the 16x16 map is pooled (too large for Akida) and multiplied by the gate."""

    original = model([GAP, ("Sigmoid", {})], size=(16, 16))
    original.graph.node.append(helper.make_node("Mul", ["a", "y"], ["gated"], name="gate"))
    original.graph.output[0].name = "gated"
    compiled, counts, details = rewrite_and_compare(original, "stage-global-average-pool")
    assert counts == {}
    assert "also read elsewhere" in details["skipped"]["globalaveragepool"]


@pytest.mark.parametrize("stem, reason", [
    ("relu", None),  # 8x8 after a stride-1 conv: Akida fuses it as it is
    ("sigmoid", "reads Sigmoid 'act', which Akida does not run"),
])
def test_global_pool_left_alone(stem, reason):
    compiled, counts, details = rewrite_and_compare(model([GAP], stem=stem), "stage-global-average-pool")
    assert counts == {}
    assert details.get("skipped", {}).get("globalaveragepool") == reason


def test_average_pool_read_by_pointwise_convs_folds_into_them():
    """A residual block's hand-over: 2x2/2 average pooling read by two 1x1 Convs becomes two 3x3/2 Convs."""

    rng = np.random.default_rng(3)
    inits = {"w0": rng.normal(size=(C, C, 3, 3)), "pa": rng.normal(size=(6, C, 1, 1)),
             "pb": rng.normal(size=(8, C, 1, 1)),
             "bb": rng.normal(size=8)}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["a"], name="act"),
        helper.make_node("AveragePool", ["a"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "pa"], ["ya"], name="primary"),
        helper.make_node("Conv", ["p", "pb", "bb"], ["yb"], name="projection"),
    ]
    original = graph_model(nodes, inits, ["N", C, 8, 8], outputs=("ya", "yb"))
    compiled, counts, _ = rewrite_and_compare(original, "average-pool-to-depthwise")
    assert counts == {"fold-average-pool-into-pointwise-conv": 2}
    assert "AveragePool" not in ops(compiled) and ops(compiled).count("Conv") == 3
    for name in ("primary", "projection"):
        conv = next(n for n in compiled.graph.nodes if n.name.startswith(name))
        assert conv.attrs["kernel_shape"] == [3, 3] and conv.attrs["strides"] == [2, 2]
        assert conv.attrs["pads"] == [0, 0, 1, 1] and conv.inputs[0].name == "a"



# --- identity-conv-after-maxpool -------------------------------------------------------------------------

MAXPOOL = ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]})


def test_maxpool_layer_feeding_the_output_gets_an_identity_conv():
    original = model([MAXPOOL, ("Relu", {})], stem="none")
    compiled, counts, _ = rewrite_and_compare(original, "identity-conv-after-maxpool")
    assert counts == {"identity-conv-after-maxpool": 1}
    assert ops(compiled)[-1] == "Conv" and compiled.graph.outputs[0].name == "y"
    identity = compiled.graph.nodes[-1]
    np.testing.assert_array_equal(identity.inputs[1].values[:, :, 0, 0], np.eye(C))


def test_maxpool_layer_feeding_only_convs_is_left():
    rng = np.random.default_rng(4)
    inits = {"w0": rng.normal(size=(C, C, 3, 3)), "w1": rng.normal(size=(C, C, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Relu", ["p"], ["a"], name="act"),
        helper.make_node("Conv", ["a", "w1"], ["y"], name="next"),
    ]
    original = graph_model(nodes, inits, ["N", C, 8, 8])
    compiled, counts, _ = rewrite_and_compare(original, "identity-conv-after-maxpool")
    assert counts == {} and ops(compiled) == ["Conv", "MaxPool", "Relu", "Conv"]


def test_average_pool_of_a_host_bound_map_is_not_folded():
    """The pooled map is a residual Add of a sigmoid gate (AKD103, runs on the host): folding would only
    multiply the host's MACs, so the pooling becomes a depthwise layer and the 1x1 Conv stays."""

    rng = np.random.default_rng(5)
    inits = {"w0": rng.normal(size=(C, C, 3, 3)), "pa": rng.normal(size=(6, C, 1, 1)),
             "wg": rng.normal(size=(C, C, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["a"], name="act"),
        helper.make_node("Conv", ["a", "wg"], ["g"], name="gate_conv"),
        helper.make_node("Sigmoid", ["g"], ["s"], name="gate"),
        helper.make_node("Mul", ["a", "s"], ["m"], name="gated"),
        helper.make_node("Add", ["m", "a"], ["t"], name="residual"),
        helper.make_node("AveragePool", ["t"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "pa"], ["y"], name="primary"),
    ]
    original = graph_model(nodes, inits, ["N", C, 8, 8])
    compiled, counts, _ = rewrite_and_compare(original, "average-pool-to-depthwise")
    assert counts == {"average-pool-to-depthwise": 1}
    primary = next(n for n in compiled.graph.nodes if n.name == "primary")
    assert list(primary.inputs[1].shape) == [6, C, 1, 1]


def test_average_pool_folds_after_an_earlier_pool_was_rewritten():
    """Two average poolings in a row, the second read by a 1x1 Conv (fuzzer seed 57): the fold's lint of the
    model runs after the first pooling was rewritten, on a graph still holding it disconnected."""

    rng = np.random.default_rng(6)
    inits = {"w0": rng.normal(size=(C, C, 3, 3)), "pa": rng.normal(size=(6, C, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["a"], name="act"),
        helper.make_node("AveragePool", ["a"], ["p1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("AveragePool", ["p1"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "pa"], ["y"], name="head"),
    ]
    original = graph_model(nodes, inits, ["N", C, 17, 17])
    compiled, counts, _ = rewrite_and_compare(original, "average-pool-to-depthwise")
    assert counts == {"average-pool-to-depthwise": 1, "fold-average-pool-into-pointwise-conv": 1}
    assert ops(compiled) == ["Conv", "Relu", "Conv", "Conv"]


def test_lint_passes_over_a_node_a_running_rewrite_disconnected():
    """Rewriter.remove disconnects a node and the pass's cleanup drops it; a lint in between (a rule that
    measures the model, as the fold above does) reports nothing about it and does not fail on it."""

    from qanac.graph import CompilationModel, disconnect
    from qanac.lint import lint_model
    from qanac.targets import get_target

    compiled = CompilationModel.from_onnx(model([avg(2, 2)], stem="relu"))
    pool = next(n for n in compiled.graph.nodes if n.op == "AveragePool")
    assert any("averagepool" in d.nodes for d in lint_model(compiled, get_target("akida")))
    disconnect(pool)
    assert not any("averagepool" in d.nodes for d in lint_model(compiled, get_target("akida")))
