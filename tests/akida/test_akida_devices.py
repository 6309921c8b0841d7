"""The virtual device catalogue and the IP-version rule (fast: akida only, no TensorFlow)."""

from __future__ import annotations

import pytest

from qanac.backends.akida import devices
from qanac.diagnostics import UsageError


def test_catalogue_names_and_ip_versions():
    assert devices.device_names()[0] == "auto"
    assert devices.DEFAULT_DEVICE in devices.VIRTUAL_DEVICES
    versions = {name: spec.ip_version for name, spec in devices.VIRTUAL_DEVICES.items()}
    assert versions == {
        "TwoNodesIPv2": "v2",
        "FourNodesIPv2": "v2",
        "SixNodesIPv2": "v2",
        "TwelveNodesIPv2": "v2",
        "AKD1000": "v1",
        "AKD1500": "v1",
    }


@pytest.mark.parametrize("name", sorted(devices.VIRTUAL_DEVICES))
def test_catalogue_matches_akida(name):
    device = devices.virtual_device(name)
    spec = devices.device_spec(name)
    assert devices.device_ip_version(device) == spec.ip_version
    assert len(device.mesh.nps) == spec.num_nps
    assert devices.describe_device(name, device)["ip_version"] == spec.ip_version


def test_unknown_device_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown Akida device 'SevenNodes'"):
        devices.device_spec("SevenNodes")


@pytest.mark.parametrize("name", ["AKD1000", "AKD1500"])
def test_v1_device_accepted(name):
    """IP v1 devices compile through the v1 path (qanac.backends.akida.v1): ONNX lowered to tf_keras."""

    devices.check_ip_version(name)


@pytest.mark.parametrize("name", ["auto", "TwoNodesIPv2", "SixNodesIPv2"])
def test_v2_device_accepted(name):
    devices.check_ip_version(name)


def test_auto_needs_a_model():
    with pytest.raises(UsageError, match="computed from the model"):
        devices.virtual_device("auto")


def test_no_hardware_is_a_usage_error():
    if devices.list_hardware_devices():
        pytest.skip("an Akida board is attached")
    with pytest.raises(UsageError, match="no Akida hardware device found"):
        devices.hardware_device()
