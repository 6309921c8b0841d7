"""Float ONNX -> quantized ONNX -> Akida: conversion works, and every unsupported case fails loudly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qanac.backends.akida import convert
from qanac.diagnostics import UnsupportedModelError
from tests.akida import akida_models


def compile_failure(model: onnx.ModelProto, **kwargs) -> UnsupportedModelError:
    with pytest.raises(UnsupportedModelError) as caught:
        convert.compile_onnx(model, akida_models.image_calibration(model, count=8), **kwargs)
    assert caught.value.exit_code == 3
    return caught.value


def codes(error: UnsupportedModelError) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for diagnostic in error.diagnostics:
        found.setdefault(diagnostic.code, []).extend(diagnostic.nodes)
    return found


# -- fast: pure graph logic --------------------------------------------------------------------------


def test_input_dtype_follows_the_first_layer():
    assert convert.choose_input_dtype(akida_models.tiny_cnn()) == "uint8"
    assert convert.choose_input_dtype(akida_models.first_gemm()) == "int8"
    assert convert.first_layer(akida_models.first_gemm()).op_type == "Gemm"
    assert convert.first_layer(akida_models.first_batchnorm()).op_type == "BatchNormalization"


@pytest.mark.parametrize(
    "akida_shape, float_shape, match",
    [
        ((1, 1, 10), (10,), True),
        ((1, 1, 10), (10, 1, 1), True),
        ((8, 8, 4), (4, 8, 8), True),
        ((8, 8, 4), (256,), True),
        ((16, 16, 8), (10,), False),  # truncated before the head
        ((8, 8, 4), (8, 8, 4), False),  # HWC is not the float layout
        ((2, 2, 4), (4, 4), False),
    ],
)
def test_output_shapes_match(akida_shape, float_shape, match):
    assert convert.output_shapes_match(akida_shape, float_shape) is match


def test_output_shape_mismatch_is_an_error():
    with pytest.raises(UnsupportedModelError, match=r"\(16, 16, 8\) does not match") as caught:
        convert.check_output_shape((16, 16, 8), (10,))
    assert caught.value.diagnostics[0].code == "AKC120"


def test_akida_outputs_back_in_the_float_layout():
    hwc = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    chw = convert.akida_to_float_layout(hwc, (5, 3, 4))
    assert np.array_equal(chw, hwc.transpose(0, 3, 1, 2))
    assert np.array_equal(convert.akida_to_float_layout(hwc, (60,)), chw.reshape(2, 60))


def test_two_outputs_are_refused_before_quantization():
    model = akida_models.tiny_cnn()
    model.graph.output.append(onnx.helper.make_tensor_value_info("stem_relu", onnx.TensorProto.FLOAT, None))
    with pytest.raises(UnsupportedModelError, match="exactly one input and one output"):
        convert.check_single_io(model)


# -- slow: quantizeml + cnn2snn ----------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_cnn_converts_whole(tiny_model, tiny_conversion):
    conversion = tiny_conversion
    assert all(n.domain == convert.BRAINCHIP_DOMAIN for n in conversion.quantized.graph.node)
    assert conversion.input_dtype == "uint8"
    assert conversion.float_output_shape == (10,)
    assert conversion.akida_output_shape == (1, 1, 10)
    assert str(conversion.akida_model.ip_version).endswith("v2")
    layer_types = {str(layer.parameters.layer_type).rsplit(".", 1)[-1] for layer in conversion.akida_model.layers}
    assert {"InputConv2D", "DepthwiseConv2D", "Conv2D", "Add", "Concatenate", "Dense1D"} <= layer_types
    assert set(conversion.seconds) == {"float_reference", "quantize", "convert"}
    assert not [d for d in conversion.diagnostics if d.level.value == "error"]


@pytest.mark.slow
def test_input_model_is_not_mutated(tiny_model, tiny_conversion):
    assert tiny_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert all(n.domain == "" for n in tiny_model.graph.node)


@pytest.mark.slow
def test_squeeze_excitation_names_every_root_cause():
    error = compile_failure(akida_models.squeeze_excitation())
    found = codes(error)
    # The GAP feeding the gate is the first node quantizeml leaves; Sigmoid and the Mul of two tensors
    # are reported too, and nothing is truncated silently.
    assert "'se_squeeze' (GlobalAveragePool)" in error.message
    assert found["AKC101"] == ["se_squeeze"]
    assert sorted(found["AKC102"]) == ["se_mul", "se_sigmoid"]
    assert "logits" in found["AKC103"]
    mul = next(d for d in error.diagnostics if d.nodes == ["se_mul"])
    assert "Mul of two activation tensors" in mul.message


@pytest.mark.slow
def test_bare_sigmoid_is_named():
    error = compile_failure(akida_models.sigmoid_gate())
    assert "'gate_sigmoid' (Sigmoid)" in error.message
    assert codes(error)["AKC101"] == ["gate_sigmoid"]
    assert "features" in codes(error)["AKC103"]


@pytest.mark.slow
def test_windowed_average_pool_is_named():
    error = compile_failure(akida_models.windowed_average_pool())
    assert "'avg_pool' (AveragePool)" in error.message
    assert "only global average pooling" in error.message


@pytest.mark.slow
def test_first_batchnorm_no_quantizable_pattern():
    error = compile_failure(akida_models.first_batchnorm())
    assert "'input_bn' (BatchNormalization)" in error.message
    assert codes(error) == {"AKC112": ["input_bn"]}
    assert "Sub/Div" in error.hint


@pytest.mark.slow
def test_input_conv_cannot_pool_globally():
    error = compile_failure(akida_models.single_conv_gap())
    assert "node 'stem' (Conv)" in error.message
    assert "InputConv2D can't perform a Global Average Pooling" in error.message
    assert codes(error) == {"AKC111": ["stem"]}
    assert "second Conv" in error.hint


@pytest.mark.slow
def test_first_gemm_on_uint8_explains_the_assertion():
    error = compile_failure(akida_models.first_gemm(), input_dtype="uint8")
    assert "'logits' (Gemm)" in error.message
    assert codes(error) == {"AKC113": ["logits"]}
    assert "int8" in error.hint


@pytest.mark.slow
def test_first_gemm_converts_with_the_default_int8_input():
    model = akida_models.first_gemm()
    conversion = convert.compile_onnx(model, akida_models.image_calibration(model, count=8))
    assert conversion.input_dtype == "int8"
    assert conversion.akida_output_shape == (1, 1, 10)


@pytest.mark.slow
def test_stride2_kernel5_rejected_with_a_hint():
    error = compile_failure(akida_models.stride2_kernel5())
    assert "node 'strided' (Conv)" in error.message
    assert "Stride 2 is only supported with kernel size 1 or 3" in error.message
    assert "3x3" in error.hint


# -- integer model inputs (BrainChip's zoo as shipped: uint8 images, int8 events) -----------------------


def integer_input_cnn(dtype: str, channels: int) -> onnx.ModelProto:
    """An input of ``dtype`` (NCHW, 12x12) -> Cast to float -> Conv/ReLU -> Conv/ReLU -> GAP -> Gemm."""

    from onnx import TensorProto
    from onnx import helper as oh

    g = akida_models.GraphBuilder(seed=3)
    x = g.op("Cast", ["input"], "input_cast", to=TensorProto.FLOAT)
    x = g.relu(g.conv(x, "stem", channels, 8), "stem_relu")
    x = g.relu(g.conv(x, "features", 8, 8), "features_relu")
    model = g.model(g.classifier(x, 8), (channels, 12, 12), [10])
    model.graph.input[0].type.tensor_type.elem_type = getattr(TensorProto, dtype.upper())
    onnx.checker.check_model(model, full_check=True)
    return oh.make_model(model.graph, opset_imports=model.opset_import, ir_version=model.ir_version)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, channels", [("uint8", 3), ("int8", 2)])
def test_an_integer_input_keeps_its_type_and_passes_into_akida_unchanged(dtype, channels):
    """As MetaTF: calibration on integers of the input's type, an identity InputQuantizer (scale 1, zero
    point 0), and an Akida model equal to the quantized ONNX on those integers."""

    from qanac.backends.akida.runners import AkidaSoftwareRunner, QuantizedOnnxRunner
    from qanac.calibration import CalibrationData, Preprocessing
    from qanac.execution import run_onnx

    model = integer_input_cnn(dtype, channels)
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    samples = rng.integers(info.min, info.max, size=(48, channels, 12, 12), endpoint=True).astype(dtype)
    samples[:, :, :6] //= 2  # not the whole range: the input range is pinned, not calibrated
    calibration = CalibrationData(arrays={"input": samples[:32]}, source="test", preprocessing=Preprocessing())
    conversion = convert.compile_onnx(model, calibration)
    assert conversion.input_dtype == dtype
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in conversion.quantized.graph.initializer}
    np.testing.assert_array_equal(weights["quantize_scale"], np.ones(channels, np.float32))
    np.testing.assert_array_equal(weights["quantize_zp"], np.zeros(channels))
    held_out = {"input": samples[32:]}
    quantized = QuantizedOnnxRunner(conversion.quantized).run(held_out)[0]
    akida_out = AkidaSoftwareRunner(conversion.akida_model, "input", conversion.output_name,
                                    conversion.float_output_shape).run(held_out)[0]
    np.testing.assert_array_equal(akida_out, quantized)
    reference = run_onnx(model, held_out)[0]
    assert np.corrcoef(reference.ravel(), quantized.ravel())[0, 1] > 0.9  # the quantized model tracks float


def test_an_input_whose_first_dimension_is_not_a_batch_is_refused_before_quantizeml():
    """MobileViT folds its batch into the patch axis: a device segment reading (4, C, H, W) for one sample."""

    model = akida_models.conv_map_output()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    error = compile_failure(model)
    assert list(codes(error)) == ["AKC115"] and codes(error)["AKC115"] == []
    assert "fixed first dimension of 4" in error.message
    batch = akida_models.conv_map_output()
    convert.check_batch_dimension(batch)  # a symbolic batch passes
    batch.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    convert.check_batch_dimension(batch)  # and a batch of 1
