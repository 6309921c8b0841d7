"""The ONNX -> tf_keras lowering for Akida v1: Keras on NHWC equals ONNX Runtime on NCHW, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest

from qanac.backends.akida.v1.lowering import from_nhwc, lower_to_keras, same_pads, to_nhwc
from qanac.diagnostics import UnsupportedModelError
from qanac.execution import run_onnx
from tests.akida import v1_models
from tests.akida.akida_models import GraphBuilder

TOLERANCE = 1e-4  # float32 rounding of the same arithmetic in another order (measured: below 1e-5)


def _keras_vs_onnx(model, count: int = 16):
    lowered = lower_to_keras(model)
    x = v1_models.random_images(lowered.input_shape, count)
    reference = run_onnx(model, {lowered.input_name: x})[0]
    actual = from_nhwc(lowered.keras_model.predict(to_nhwc(x), verbose=0), lowered.output_shape)
    return lowered, reference, actual


def _layer_types(lowered) -> list[str]:
    return [type(layer).__name__ for layer in lowered.keras_model.layers]


def test_sequential_cnn_lowers_exactly():
    lowered, reference, actual = _keras_vs_onnx(v1_models.sequential_cnn())
    assert np.abs(reference - actual).max() < TOLERANCE
    assert _layer_types(lowered) == [
        "InputLayer", "Rescaling", "Conv2D", "ReLU", "MaxPooling2D", "SeparableConv2D", "ReLU", "MaxPooling2D",
        "Conv2D", "ReLU", "Conv2D", "GlobalAveragePooling2D", "ReLU", "Dense",
    ]
    assert lowered.layer_nodes["norm_sub"] == ["norm_sub", "norm_div"]
    assert lowered.layer_nodes["dw"] == ["dw", "pw"]
    assert [(r["rewrite"], r["nodes"]) for r in lowered.rewrites] == [
        ("depthwise-pointwise-to-separable", ["dw", "pw"]), ("identity-conv-before-global-pool", ["head_gap"])]


def test_rescaling_is_per_channel():
    lowered = lower_to_keras(v1_models.sequential_cnn(channels=3))
    rescaling = lowered.keras_model.get_layer("norm_sub")
    np.testing.assert_allclose(rescaling.scale, 1 / np.linspace(0.2, 0.3, 3), rtol=1e-6)
    np.testing.assert_allclose(rescaling.offset, -np.linspace(0.3, 0.5, 3) / np.linspace(0.2, 0.3, 3), rtol=1e-6)


def test_flatten_of_a_map_reorders_the_dense_rows():
    lowered, reference, actual = _keras_vs_onnx(v1_models.flatten_cnn())
    assert np.abs(reference - actual).max() < TOLERANCE
    assert lowered.keras_model.get_layer("conv1").padding == "same"
    assert _layer_types(lowered) == ["InputLayer", "Conv2D", "ReLU", "Conv2D", "ReLU", "Flatten", "Dense", "ReLU",
                                     "Dense"]


def test_maxpool_takes_the_padding_of_its_convolution():
    """A 2x2/2 pooling of an even map is both 'valid' and 'same'; v1 wants the convolution's ('same')."""

    lowered = lower_to_keras(v1_models.sequential_cnn())
    assert lowered.keras_model.get_layer("conv1").padding == "same"
    assert lowered.keras_model.get_layer("pool1").padding == "same"


def test_same_pads_put_the_extra_pixel_at_the_end():
    assert same_pads((16, 16), (3, 3), (1, 1)) == [1, 1, 1, 1]
    assert same_pads((16, 16), (3, 3), (2, 2)) == [0, 0, 1, 1]
    assert same_pads((8, 8), (2, 2), (2, 2)) == [0, 0, 0, 0]


def test_symmetric_pads_at_stride_2_are_refused_naming_the_node():
    g = GraphBuilder()
    x = v1_models.relu6(g, g.conv("input", "stem", 3, 8, stride=2, pads=[1, 1, 1, 1]), "stem_relu")
    model = g.model(g.classifier(x, 8), (3, 16, 16), [10])
    with pytest.raises(UnsupportedModelError) as caught:
        lower_to_keras(model)
    assert caught.value.diagnostics[0].nodes == ["stem"]
    assert "[0, 0, 1, 1]" in caught.value.message


def test_residual_add_is_refused_naming_the_add():
    with pytest.raises(UnsupportedModelError) as caught:
        lower_to_keras(v1_models.residual_cnn())
    assert caught.value.diagnostics[0].nodes == ["block1_add"]
    assert "sequential" in caught.value.message


def test_depthwise_without_pointwise_stays_depthwise():
    """Only a depthwise Conv read by nothing but a 1x1 Conv fuses; this one feeds a ReLU first."""

    g = GraphBuilder()
    x = v1_models.relu6(g, g.conv("input", "dw", 3, 3, group=3), "dw_relu")
    x = v1_models.relu6(g, g.conv(x, "pw", 3, 8, k=1), "pw_relu")
    model = g.model(g.classifier(x, 8), (3, 8, 8), [10])
    lowered, reference, actual = _keras_vs_onnx(model)
    assert np.abs(reference - actual).max() < TOLERANCE
    assert "DepthwiseConv2D" in _layer_types(lowered)
    assert "SeparableConv2D" not in _layer_types(lowered)


def test_identity_conv_is_dropped():
    lowered, reference, actual = _keras_vs_onnx(v1_models.identity_after_pool_cnn())
    assert np.abs(reference - actual).max() < TOLERANCE
    assert _layer_types(lowered) == ["InputLayer", "Conv2D", "ReLU", "MaxPooling2D", "Flatten", "Dense"]
    assert lowered.rewrites == [{"rewrite": "drop-identity-conv", "layer": None,
                                 "nodes": ["pool1::identity-conv-after-maxpool"]}]


def test_global_pool_after_max_pooling_gets_its_own_convolution():
    """Conv > ReLU6 > MaxPool > GAP: v1 has no layer with both poolings, so the GAP pools in an identity conv
    followed by the same bounded ReLU (exact: the mean of values in [0, 6] is in [0, 6])."""

    g = GraphBuilder()
    x = v1_models.relu6(g, g.conv("input", "conv1", 3, 8), "relu1")
    x = g.op("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    model = g.model(g.classifier(x, 8), (3, 8, 8), [10])
    lowered, reference, actual = _keras_vs_onnx(model)
    assert np.abs(reference - actual).max() < TOLERANCE
    assert _layer_types(lowered) == ["InputLayer", "Conv2D", "ReLU", "MaxPooling2D", "Conv2D",
                                     "GlobalAveragePooling2D", "ReLU", "Dense"]
    assert lowered.keras_model.layers[-2].max_value == 6.0
