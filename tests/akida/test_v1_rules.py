"""The Akida v1 rule table: derived from cnn2snn's v1 registry, silent on sequential v1-shaped CNNs, and
naming the nodes v1 cannot run (each rule with a case where it must not fire)."""

from __future__ import annotations

import numpy as np
import onnx

from qanac.backends.akida.v1.rules import AKIDA_V1_RULES, V1_INPUT_PATTERNS, V1_PATTERNS, v1_findings
from qanac.diagnostics import Level
from qanac.graph import CompilationModel
from qanac.lint import lint_model
from qanac.targets import Target, get_target
from tests.akida import v1_models
from tests.akida.akida_models import GraphBuilder
from tests.akida.v1_models import relu6


def _codes(model) -> list[tuple[str, str]]:
    return [(d.code, d.nodes[0]) for d in v1_findings(model)]


def test_patterns_are_cnn2snns_v1_registry():
    import cnn2snn.quantizeml.block_converters_generator  # noqa: F401  (registers every converter)
    from cnn2snn.quantizeml import block_converter

    def names(registry):
        return {tuple(cls.__name__.removeprefix("Quantized") for cls in key) for key in registry}

    assert names(block_converter._V1_PATTERN_CONVERTERS) == set(V1_PATTERNS)
    assert names(block_converter._V1_INPUT_PATTERN_CONVERTERS) == set(V1_INPUT_PATTERNS)


def test_sequential_cnns_pass():
    assert _codes(v1_models.sequential_cnn()) == []
    assert _codes(v1_models.flatten_cnn()) == []
    assert _codes(v1_models.identity_after_pool_cnn()) == []  # the identity conv is dropped, not a layer


def test_residual_cnn_reports_its_adds_and_nothing_else():
    assert _codes(v1_models.residual_cnn()) == [("AK1102", "block1_add"), ("AK1102", "block2_add")]


def test_unbounded_relu_is_reported_and_relu6_is_not():
    g = GraphBuilder()
    x = g.relu(g.conv("input", "conv1", 3, 8), "relu1")
    x = relu6(g, g.conv(x, "conv2", 8, 8), "relu2")
    assert _codes(g.model(g.classifier(x, 8), (3, 8, 8), [10])) == [("AK1104", "relu1")]


def test_standalone_depthwise_is_reported_and_a_separable_pair_is_not():
    g = GraphBuilder()
    x = relu6(g, g.conv("input", "conv1", 3, 8), "relu1")
    x = relu6(g, g.conv(x, "dw", 8, 8, group=8), "dw_relu")  # the ReLU keeps it from the 1x1 conv
    x = relu6(g, g.conv(x, "pw", 8, 8, k=1), "pw_relu")
    assert _codes(g.model(g.classifier(x, 8), (3, 8, 8), [10])) == [("AK1106", "dw")]


def test_layer_without_activation_is_reported_unless_last():
    g = GraphBuilder()
    x = relu6(g, g.conv("input", "conv1", 3, 8), "relu1")
    x = g.conv(x, "conv2", 8, 8)  # read by conv3 without a ReLU
    x = relu6(g, g.conv(x, "conv3", 8, 8), "relu3")
    x = g.op("Flatten", [x], "flatten")
    w, b = g.weight("fc_w", (10, 8 * 64)), g.weight("fc_b", (10,), scale=0.1)
    model = g.model(g.op("Gemm", [x, w, b], "logits", transB=1), (3, 8, 8), [10])  # last: no ReLU needed
    assert _codes(model) == [("AK1112", "conv2")]


def test_maxpool_padded_unlike_its_convolution():
    g = GraphBuilder()
    x = relu6(g, g.conv("input", "conv1", 3, 8), "relu1")
    x = g.conv(x, "conv2", 8, 8)  # 'same'
    x = g.op("MaxPool", [x], "pool", kernel_shape=[3, 3], strides=[2, 2])  # 'valid' on 9x9: not 'same'
    x = relu6(g, x, "relu2")
    x = relu6(g, g.conv(x, "conv3", 8, 8), "relu3")
    assert _codes(g.model(g.classifier(x, 8), (3, 9, 9), [10])) == [("AK1111", "pool")]


def test_input_normalisation_is_not_arithmetic_inside_the_graph():
    g = GraphBuilder()
    x = g.op("Mul", ["input", g.constant("scale", np.array(2.0))], "scale_input")
    x = relu6(g, g.conv(x, "conv1", 3, 8), "relu1")
    x = g.op("Add", [x, g.constant("offset", np.array(1.0))], "shift")
    x = relu6(g, g.conv(x, "conv2", 8, 8), "relu2")
    assert _codes(g.model(g.classifier(x, 8), (3, 8, 8), [10])) == [("AK1103", "shift")]


def _pooled_cnn(height: int, width: int):
    g = GraphBuilder()
    x = relu6(g, g.conv("input", "conv1", 3, 8), "relu1")
    x = relu6(g, g.conv(x, "conv2", 8, 8), "relu2")
    return g.model(g.classifier(x, 8), (3, height, width), [10])


def test_global_pool_over_too_many_pixels():
    assert _codes(_pooled_cnn(17, 16)) == [("AK1114", "head_gap")]
    assert _codes(_pooled_cnn(16, 16)) == []


def test_the_table_runs_in_qanac_lint():
    """The rule set has qanac.lint's format: a target naming it lints with it as it is."""

    target = Target("akida-v1-test", "test", backend="unused:Backend", pipeline=(),
                    rules="qanac.backends.akida.v1.rules:AKIDA_V1_RULES")
    findings = lint_model(CompilationModel.from_onnx(v1_models.residual_cnn()), target)
    assert [(d.code, d.nodes) for d in findings] == [("AK1102", ["block1_add"]), ("AK1102", ["block2_add"])]
    assert len({rule.code for rule in AKIDA_V1_RULES}) == len(AKIDA_V1_RULES)


def test_the_akida_target_lints_a_v1_device_with_the_v1_table():
    # --device AKD1000 picks the v1 table (lint and the partitioner's host nodes); IP v2 devices keep theirs
    akida = get_target("akida")
    residual = CompilationModel.from_onnx(v1_models.residual_cnn())
    v1_codes = {d.code for d in lint_model(residual, akida, "AKD1000") if d.level == Level.ERROR}
    assert v1_codes == {"AK1102"}
    v2_codes = {d.code for d in lint_model(residual, akida, "SixNodesIPv2")}
    assert not any(code.startswith("AK11") for code in v2_codes), v2_codes
    sequential = CompilationModel.from_onnx(onnx.shape_inference.infer_shapes(v1_models.sequential_cnn()))
    assert [d for d in lint_model(sequential, akida, "AKD1500") if d.level == Level.ERROR] == []


def test_first_layer_must_be_an_image_convolution():
    g = GraphBuilder()
    x = relu6(g, g.conv("input", "conv1", 8, 8), "relu1")
    x = relu6(g, g.conv(x, "conv2", 8, 8), "relu2")
    assert _codes(g.model(g.classifier(x, 8), (8, 8, 8), [10])) == [("AK1113", "conv1")]
    g = GraphBuilder()
    w, b = g.weight("fc1_w", (16, 32)), g.weight("fc1_b", (16,), scale=0.1)
    x = relu6(g, g.op("Gemm", ["input", w, b], "fc1", transB=1), "relu1")
    w, b = g.weight("fc2_w", (10, 16)), g.weight("fc2_b", (10,), scale=0.1)
    assert _codes(g.model(g.op("Gemm", [x, w, b], "logits", transB=1), (32,), [10])) == [("AK1113", "fc1")]


def test_global_pool_after_max_pooling_of_a_bounded_relu_passes():
    g = GraphBuilder()
    x = relu6(g, g.conv("input", "conv1", 3, 8), "relu1")
    x = g.op("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    assert _codes(g.model(g.classifier(x, 8), (3, 8, 8), [10])) == []
    g = GraphBuilder()
    x = g.op("MaxPool", [relu6(g, g.conv("input", "conv1", 3, 8), "relu1")], "pool1", kernel_shape=[2, 2],
             strides=[2, 2])
    x = g.relu(x, "relu2")  # unbounded: nothing bounds the identity conv's pooling
    assert _codes(g.model(g.classifier(x, 8), (3, 8, 8), [10])) == [("AK1104", "relu2"), ("AK1114", "head_gap")]
