"""Mapping on virtual devices: report fields, MAC shares, software-fallback reasons, IP-version refusal."""

from __future__ import annotations

import json

import pytest

from qanac.backends.akida import convert, devices, mapping
from qanac.diagnostics import UnsupportedModelError
from tests.akida import akida_models

pytestmark = pytest.mark.slow


def test_tiny_cnn_maps_fully_on_hardware(tiny_conversion):
    report = mapping.map_on_device(tiny_conversion.akida_model, "SixNodesIPv2")
    json.dumps(report)  # serializable as it is
    assert report["device"]["name"] == "SixNodesIPv2"
    assert report["device"]["ip_version"] == "v2"
    assert report["fully_on_hardware"] is True
    assert report["hardware_mac_share"] == 1.0
    assert report["total_macs"] == int(tiny_conversion.akida_model.macs) > 0
    assert report["first_hardware_failure"] is None
    for sequence in report["sequences"]:
        assert {"name", "backend", "passes", "layers", "nps", "program_bytes"} <= set(sequence)
    layers = {entry["name"]: entry for entry in report["layers"]}
    assert layers["stem"]["type"] == "InputConv2D" and layers["stem"]["nps"] == {"HRC": 1}
    assert layers["dw"]["type"] == "DepthwiseConv2D" and layers["dw"]["nps"].get("CNP1", 0) > 0
    assert layers["logits"]["type"] == "Dense1D" and "FNP3" in layers["logits"]["nps"]
    assert sum(entry["macs"] for entry in report["layers"]) == report["total_macs"]
    assert all("external_memory_bytes" in entry for entry in report["layers"])
    assert mapping.mapping_diagnostics(report) == []
    text = mapping.format_mapping_report(report)
    assert "100.0 %" in text and "dw (DepthwiseConv2D)" in text


def test_the_model_itself_stays_unmapped(tiny_conversion):
    mapping.map_on_device(tiny_conversion.akida_model, "TwoNodesIPv2")
    assert tiny_conversion.akida_model.device is None


def test_large_gap_falls_to_software_with_akidas_reason():
    model = akida_models.conv_gap_classifier(size=16)
    conversion = convert.compile_onnx(model, akida_models.image_calibration(model, count=8))
    report = mapping.map_on_device(conversion.akida_model, "SixNodesIPv2")
    assert report["fully_on_hardware"] is False
    layers = {entry["name"]: entry for entry in report["layers"]}
    assert layers["features"]["backend"] == "Software"
    assert "width * height cannot exceed 144" in layers["features"]["software_reason"]
    assert layers["stem"]["backend"] == "Hardware"
    assert 0.0 < report["hardware_mac_share"] < 1.0
    assert report["hardware_macs"] == sum(e["macs"] for e in report["layers"] if e["backend"] == "Hardware")
    warnings = mapping.mapping_diagnostics(report)
    assert [d.nodes for d in warnings] == [["features"]] and warnings[0].code == "AKM201"
    assert "in software because: When using Global Average Pooling" in mapping.format_mapping_report(report)


def test_hardware_refusal_asks_one_layer_alone():
    model = akida_models.conv_gap_classifier(size=16)
    conversion = convert.compile_onnx(model, akida_models.image_calibration(model, count=8))
    device = devices.virtual_device("SixNodesIPv2")
    refusal = mapping.hardware_refusal(conversion.akida_model, "features", device)
    assert refusal == "When using Global Average Pooling, input dimensions width * height cannot exceed 144."
    assert mapping.hardware_refusal(conversion.akida_model, "stem", device) is None


def test_auto_sizes_a_device_or_says_why_not(tiny_conversion):
    report = mapping.map_on_device(tiny_conversion.akida_model, "auto")
    assert report["fully_on_hardware"] is True and report["device"]["ip_version"] == "v2"

    model = akida_models.conv_gap_classifier(size=16)
    conversion = convert.compile_onnx(model, akida_models.image_calibration(model, count=8))
    with pytest.raises(UnsupportedModelError, match="no Akida IP v2 device can run the whole model"):
        mapping.map_on_device(conversion.akida_model, "auto")


@pytest.mark.parametrize("device", ["AKD1000", "AKD1500"])
def test_v2_model_on_v1_device_is_a_clear_error(tiny_conversion, device):
    with pytest.raises(UnsupportedModelError, match=f"device {device} is Akida IP v1 but the model is IP v2"):
        mapping.map_on_device(tiny_conversion.akida_model, device)
