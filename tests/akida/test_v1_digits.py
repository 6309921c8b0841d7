"""The Akida v1 recipe end to end on a CNN trained on sklearn digits: lowered, quantized 4/4 (8-bit input layer),
converted under v1, mapped on AKD1000 with every MAC on hardware, and scored on held-out digits against the
quantized Keras model and the float model."""

from __future__ import annotations

import pytest

from qanac.calibration import CalibrationData, Preprocessing
from qanac.diagnostics import UnsupportedModelError, UsageError
from qanac.execution import run_onnx
from tests.akida import v1_models

pytestmark = pytest.mark.slow

CALIBRATION = 256
# 4-bit weights and activations cost a little accuracy against float: at most 3 points on held-out digits,
# and the Akida model's top-1 may differ from float on at most 5 % of them.
FLOAT_TOLERANCE = 0.03
MIN_FLOAT_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_test, y_test = v1_models.digits_splits()
    model = v1_models.train_digits_cnn(x_train, y_train)
    calibration = CalibrationData(arrays={"input": x_train[:CALIBRATION]}, source="digits train",
                                  preprocessing=Preprocessing())
    return model, calibration, x_test, y_test


@pytest.fixture(scope="module")
def emitted(digits, tmp_path_factory):
    from qanac.backends.akida.v1.emit import emit_v1

    model, calibration, _, _ = digits
    out = tmp_path_factory.mktemp("v1")
    return emit_v1(model, calibration, {}, out, "AKD1000"), out


def test_akd1000_runs_every_mac_in_hardware(emitted):
    result, _ = emitted
    mapping = result.report["mapping"]
    assert result.hardware_mac_share == 1.0
    assert mapping["fully_on_hardware"]
    assert mapping["device"]["ip_version"] == "v1"
    assert mapping["total_macs"] > 0  # akida reports 0 for v1 layers: the backend counts them
    types = [entry["type"] for entry in mapping["layers"]]
    assert types == ["Quantizer", "InputConvolutional", "SeparableConvolutional", "Convolutional", "FullyConnected"]
    assert result.record["ip_version"] == "v1"
    assert (result.record["weight_bits"], result.record["activation_bits"], result.record["input_weight_bits"]) == (
        4, 4, 8)
    assert sorted(result.files) == ["compiled", "quantized"]


def test_akida_agrees_with_quantized_keras_and_float(digits, emitted):
    from qanac.backends.akida.v1.runners import AkidaV1SoftwareRunner, QuantizedKerasRunner

    model, _, x_test, y_test = digits
    _, out = emitted
    inputs = {"input": x_test}
    float_out = run_onnx(model, inputs)[0]
    keras_out = QuantizedKerasRunner(out / "quantized.h5", "input", "logits", (10,)).run(inputs)[0]
    akida_out = AkidaV1SoftwareRunner(out / "model.fbz", "input", "logits", (10,)).run(inputs)[0]
    accuracy = {name: float((o.argmax(1) == y_test).mean())
                for name, o in (("float", float_out), ("keras", keras_out), ("akida", akida_out))}
    assert accuracy["float"] > 0.95, accuracy
    assert float((akida_out.argmax(1) == keras_out.argmax(1)).mean()) >= 0.95
    assert float((akida_out.argmax(1) == float_out.argmax(1)).mean()) >= MIN_FLOAT_AGREEMENT
    assert accuracy["akida"] >= accuracy["float"] - FLOAT_TOLERANCE, accuracy


def test_compile_time_agreement_is_recorded(emitted):
    result, _ = emitted
    agreement = result.report["agreement"]
    assert not agreement["flagged"]
    assert agreement["comparison"]["top1_agreement"] >= 0.99


def test_two_bit_weights_on_akd1500(digits, tmp_path):
    from qanac.backends.akida.v1.emit import emit_v1

    model, calibration, x_test, y_test = digits
    result = emit_v1(model, calibration, {"weight_bits": 2, "activation_bits": 2, "agreement_samples": 0}, tmp_path,
                     "AKD1500")
    assert (result.record["weight_bits"], result.record["activation_bits"]) == (2, 2)
    assert result.report["mapping"]["device"]["name"] == "AKD1500"
    assert result.hardware_mac_share == 1.0


def test_bit_widths_v1_lacks_are_usage_errors(digits, tmp_path):
    from qanac.backends.akida.v1.emit import emit_v1

    model, calibration, _, _ = digits
    with pytest.raises(UsageError, match="1, 2, 4-bit weights"):
        emit_v1(model, calibration, {"weight_bits": 8}, tmp_path, "AKD1000")
    with pytest.raises(UsageError, match="activations"):
        emit_v1(model, calibration, {"activation_bits": 8}, tmp_path, "AKD1000")


def test_unbounded_relu_is_refused_before_quantizing(tmp_path):
    from qanac.backends.akida.v1.emit import emit_v1
    from tests.akida.akida_models import GraphBuilder

    g = GraphBuilder()
    x = g.relu(g.conv("input", "conv1", 1, 8), "relu1")
    x = v1_models.relu6(g, g.conv(x, "conv2", 8, 8), "relu2")
    model = g.model(g.classifier(x, 8), (1, 8, 8), [10])
    calibration = CalibrationData(arrays={"input": v1_models.random_images((1, 8, 8))}, source="random",
                                  preprocessing=Preprocessing())
    with pytest.raises(UnsupportedModelError) as caught:
        emit_v1(model, calibration, {}, tmp_path, "AKD1000")
    assert [(d.code, d.nodes) for d in caught.value.diagnostics] == [("AK1104", ["relu1"])]
    assert "--approx bound-relu" in caught.value.hint
    assert not list(tmp_path.iterdir())
