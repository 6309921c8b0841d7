"""Akida devices: the virtual device catalogue used for mapping, and real hardware kept apart.

For IP v2 devices qanac builds the model from ONNX through quantizeml's ONNX path (8-bit). For IP v1
devices (AKD1000, AKD1500) it lowers the ONNX graph to tf_keras and quantizes it to 1-4 bits under
cnn2snn's v1 target (qanac.backends.akida.v1), the only way MetaTF reaches v1.

Virtual devices need no hardware: mapping on them is exact (same mapper as on a chip), only inference
needs a real device. The name ``auto`` asks akida for the smallest v2 device that holds the whole model
in hardware (``akida.compute_min_device``).

akida is imported inside the functions so that listing device names costs nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qanac.diagnostics import UnsupportedModelError, UsageError

AUTO = "auto"
DEFAULT_DEVICE = "SixNodesIPv2"


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """One virtual device: ``factory`` is the name of the akida function that builds it."""

    name: str
    ip_version: str  # "v1" or "v2"
    factory: str
    num_nps: int
    description: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


VIRTUAL_DEVICES: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in (
        DeviceSpec("TwoNodesIPv2", "v2", "TwoNodesIPv2", 8, "Akida IP v2, 2 nodes (8 NPs)"),
        DeviceSpec("FourNodesIPv2", "v2", "FourNodesIPv2", 16, "Akida IP v2, 4 nodes (16 NPs)"),
        DeviceSpec("SixNodesIPv2", "v2", "SixNodesIPv2", 24, "Akida IP v2, 6 nodes (24 NPs)"),
        DeviceSpec("TwelveNodesIPv2", "v2", "TwelveNodesIPv2", 48, "Akida IP v2, 12 nodes (48 NPs)"),
        DeviceSpec("AKD1000", "v1", "AKD1000", 78, "AKD1000 NSoC, Akida IP v1 (78 NPs)"),
        DeviceSpec("AKD1500", "v1", "AKD1500", 32, "AKD1500 chip, Akida IP v1 (32 NPs)"),
    )
}

# The IP version of every model the ONNX path produces.
MODEL_IP_VERSION = "v2"
# The IP version of the devices the tf_keras path (qanac.backends.akida.v1) compiles for.
V1_IP_VERSION = "v1"


def device_names() -> list[str]:
    """Names accepted by the ``device`` option, ``auto`` first."""

    return [AUTO, *VIRTUAL_DEVICES]


def device_spec(name: str) -> DeviceSpec:
    """The catalogue entry for ``name`` (not ``auto``); unknown names are a usage error."""

    try:
        return VIRTUAL_DEVICES[name]
    except KeyError:
        raise UsageError(
            f"unknown Akida device '{name}'", hint="devices: " + ", ".join(device_names())
        ) from None


def check_ip_version(name: str, model_ip_version: str = MODEL_IP_VERSION) -> None:
    """Refuse a device whose IP version differs from the model's, saying why (before any work is done).
    IP v1 devices are never refused: their models are built by the v1 path, IP v1 by construction."""

    if name == AUTO:
        return
    spec = device_spec(name)
    if spec.ip_version in (model_ip_version, V1_IP_VERSION):
        return
    v2 = ", ".join(n for n, s in VIRTUAL_DEVICES.items() if s.ip_version == "v2")
    raise UnsupportedModelError(
        f"device {name} is an Akida IP {spec.ip_version} device but the model is Akida IP {model_ip_version}: "
        "models compiled from ONNX are always IP v2, because quantizeml's ONNX path produces only 8-bit "
        "IP v2 models; IP v1 (AKD1000, AKD1500) needs 1/2/4-bit weights and activations, which only the "
        "tf_keras quantization path can produce, and that path is not reachable from ONNX",
        hint=f"choose an IP v2 device ({v2}) or 'auto'",
    )


def virtual_device(name: str, model: Any = None) -> Any:
    """The akida virtual device called ``name``; ``auto`` needs the akida ``model`` to size the device.

    ``auto`` fails with UnsupportedModelError when no v2 device holds the whole model in hardware
    (akida then names the first layer that cannot map and why).
    """

    import akida

    if name == AUTO:
        if model is None:
            raise UsageError("device 'auto' is computed from the model; no model was given")
        try:
            return akida.compute_min_device(model)
        except (RuntimeError, ValueError) as exc:
            raise UnsupportedModelError(
                f"no Akida IP v2 device can run the whole model in hardware: {exc}",
                hint="choose a named device (e.g. SixNodesIPv2) to map with software fallback and see "
                "every layer that falls to software, or change the layer akida names",
            ) from exc
    return getattr(akida, device_spec(name).factory)()


def device_ip_version(device: Any) -> str:
    """'v1', 'v2' or 'pico' for an akida Device or HardwareDevice."""

    return str(device.ip_version).rsplit(".", 1)[-1]


def describe_device(name: str, device: Any) -> dict[str, Any]:
    """JSON-ready facts about a device: catalogue name, akida version string, IP version, NP count."""

    return {
        "name": name,
        "version": str(device.version),
        "ip_version": device_ip_version(device),
        "num_nps": len(device.mesh.nps),
    }


# ---------------------------------------------------------------------------------------------------
# Real hardware. Nothing below can be exercised without an Akida board (akida.devices() is empty on a
# machine without one), so it is not covered by the test suite; it is kept small and separate on purpose.
# ---------------------------------------------------------------------------------------------------


def list_hardware_devices() -> list[dict[str, Any]]:
    """The Akida boards attached to this machine (PCIe/USB), as reported by ``akida.devices()``.

    Untested here: no hardware is present on the build machines, where this returns an empty list.
    """

    import akida

    return [
        {"index": i, "desc": str(d.desc), "version": str(d.version), "ip_version": device_ip_version(d)}
        for i, d in enumerate(akida.devices())
    ]


def hardware_device(index: int = 0) -> Any:
    """The attached Akida board at ``index``; a UsageError when there is none.

    Untested here (no hardware on the build machines).
    """

    import akida

    found = akida.devices()
    if not found:
        raise UsageError(
            "no Akida hardware device found (akida.devices() is empty)",
            hint="run on akida's software backend (leave the 'hardware' option off), or attach a board "
            "and check its driver (akida devices)",
        )
    if not 0 <= index < len(found):
        raise UsageError(f"Akida device index {index} out of range: {len(found)} device(s) attached")
    return found[index]
