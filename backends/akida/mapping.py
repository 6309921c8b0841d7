"""Where an Akida model runs on a device: sequences, NPs, MACs and why a layer falls to software.

``map_on_device`` maps a *copy* of the model (``model.map(device, hw_only=False)``; mapping needs no
hardware, only inference does) and reads what akida exposes without a board: per sequence its backend
(Hardware or Software), passes, layers and program size; per layer its MACs, its NPs by type, skip DMAs
and external memory; for the model the total MACs and the share of them that runs on hardware.

akida gives the reason a layer cannot go to hardware only as the text of the error raised by
``map(..., hw_only=True)``, and only for the first such layer. So each software layer is asked on its
own: the first failing layer of the whole model keeps akida's whole-model message; every other one is
mapped alone in a one-layer model (akida adds an input layer), whose error is the reason. Layers with
several inputs (Add, Concatenate) cannot be isolated; a layer that maps alone but not in place is put in
software by the layout of its sequence (skip connections, a max-pooling layer ending a sequence, ...).

Diagnostic code: AKM201 (warning) a layer with computation runs on akida's software backend.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError
from qanac.graph import lookup_source
from qanac.model_summary import format_share

from .devices import describe_device, device_ip_version, virtual_device

# Layers that move data in and out of the model; they carry no MACs and no NP.
IO_LAYER_TYPES = {"InputData", "Quantizer", "Dequantizer"}

_LAYER_FAILURE = re.compile(r"Cannot map layer '([^']+)'\.\s*(.*)", re.S)


def map_on_device(model: Any, device_name: str, device: Any = None) -> dict[str, Any]:
    """Map a copy of ``model`` on the virtual device ``device_name`` (or the given ``device``) and report it.

    The report is JSON-serializable; ``format_mapping_report`` renders it as text.
    """

    import akida

    if device is None:
        device = virtual_device(device_name, model)
    check_same_ip_version(model, device, device_name)
    mapped = akida.Model(layers=model.layers)
    try:
        mapped.map(device, hw_only=False)
    except RuntimeError as exc:
        raise UnsupportedModelError(f"akida cannot map the model on {device_name}: {exc}") from exc

    first_failure = _first_hardware_failure(model, device)
    layers: list[dict[str, Any]] = []
    sequences: list[dict[str, Any]] = []
    for sequence in mapped.sequences:
        backend = str(sequence.backend).rsplit(".", 1)[-1]
        nps: Counter[str] = Counter()
        names = []
        for index, current_pass in enumerate(sequence.passes):
            for layer in current_pass.layers:
                entry = _layer_entry(layer, sequence.name, backend, index)
                nps.update(entry["nps"])
                names.append(layer.name)
                layers.append(entry)
        program = sequence.program
        sequences.append(
            {
                "name": sequence.name,
                "backend": backend,
                "passes": len(sequence.passes),
                "layers": names,
                "nps": dict(nps),
                "program_bytes": None if program is None else len(program),
            }
        )

    for entry in layers:
        if entry["backend"] == "Software" and entry["type"] not in IO_LAYER_TYPES:
            entry["software_reason"] = _software_reason(model, entry["name"], device, first_failure)

    total_macs = sum(entry["macs"] for entry in layers)
    hardware_macs = sum(entry["macs"] for entry in layers if entry["backend"] == "Hardware")
    return {
        "device": describe_device(device_name, device),
        "fully_on_hardware": all(s["backend"] == "Hardware" for s in sequences),
        "total_macs": total_macs,
        "hardware_macs": hardware_macs,
        "hardware_mac_share": hardware_macs / total_macs if total_macs else 1.0,
        "external_memory_bytes": int(mapped.external_memory_size),
        "components": {_type_name(t): int(n) for t, n in mapped.component_count.items()},
        "sequences": sequences,
        "layers": layers,
        "first_hardware_failure": None if first_failure is None else first_failure[1],
    }


def check_same_ip_version(model: Any, device: Any, device_name: str) -> None:
    """akida's own error is "The IP version of the model and device must be identical."; say which and why."""

    model_ip = str(model.ip_version).rsplit(".", 1)[-1]
    device_ip = device_ip_version(device)
    if model_ip != device_ip:
        raise UnsupportedModelError(
            f"device {device_name} is Akida IP {device_ip} but the model is IP {model_ip}; a model maps only "
            "on a device of its own IP version (models compiled from ONNX are IP v2)",
            hint="choose an IP v2 device (TwoNodesIPv2, FourNodesIPv2, SixNodesIPv2, TwelveNodesIPv2) or auto",
        )


def mapping_diagnostics(report: dict[str, Any]) -> list[Diagnostic]:
    """One warning per layer with computation that runs on akida's software backend, naming the layer (and
    its source-framework name once ``annotate_sources`` ran), akida's reason first."""

    return [
        Diagnostic(
            Level.WARNING,
            "AKM201",
            f"in software on {report['device']['name']}: {entry.get('software_reason') or 'akida gives no reason'} "
            f"({entry['type']} layer, {entry['macs']:,} MACs as mapped)",
            nodes=[entry["name"]],
            sources=[entry["source"]] if entry.get("source") else [],
            rule="akida-hardware-mapping",
            hint=_software_hint(entry.get("software_reason") or ""),
        )
        for entry in report["layers"]
        if entry["backend"] == "Software" and entry["type"] not in IO_LAYER_TYPES
    ]


def _software_hint(reason: str) -> str:
    if "Not enough hardware components" in reason:
        return "map on a larger device (--device auto picks the smallest that holds the model), or narrow the layer"
    return "change the layer as akida's reason says; `qanac lint --device` names the rule and its way out"


def annotate_sources(report: dict[str, Any], source_names: dict[str, str]) -> None:
    """Give every layer the name its node had in the source framework (module path, Keras layer)."""

    for entry in report["layers"]:
        entry["source"] = lookup_source(source_names, entry["name"])


def format_mapping_report(report: dict[str, Any]) -> str:
    """A human rendering of ``map_on_device``'s report: device, totals, then each sequence and its layers."""

    device = report["device"]
    lines = [
        f"Akida mapping on {device['name']} (IP {device['ip_version']}, {device['num_nps']} NPs, "
        f"{device['version']})",
        f"  MACs as mapped (akida's count of the compiled model): {report['total_macs']:,} total, "
        f"{report['hardware_macs']:,} on hardware ({format_share(report['hardware_mac_share'])})",
        f"  external memory: {report['external_memory_bytes']:,} bytes; components: "
        + (", ".join(f"{n} {t}" for t, n in report["components"].items()) or "none"),
    ]
    by_name = {entry["name"]: entry for entry in report["layers"]}
    for sequence in report["sequences"]:
        nps = ", ".join(f"{n} {t}" for t, n in sequence["nps"].items()) or "no NPs"
        program = "" if sequence["program_bytes"] is None else f", program {sequence['program_bytes']:,} bytes"
        lines.append(
            f"  sequence {sequence['name']}: {sequence['backend']}, {sequence['passes']} pass(es), {nps}{program}"
        )
        for name in sequence["layers"]:
            entry = by_name[name]
            parts = [f"{entry['macs']:,} MACs"]
            if entry["nps"]:
                parts.append(", ".join(f"{n} {t}" for t, n in entry["nps"].items()))
            if entry["external_memory_bytes"]:
                parts.append(f"{entry['external_memory_bytes']:,} B external")
            source = f" <- {entry['source']}" if entry.get("source") else ""
            lines.append(f"    {name}{source} ({entry['type']}) {entry['output_shape']}: {'; '.join(parts)}")
            if entry.get("software_reason"):
                lines.append(f"      in software because: {entry['software_reason']}")
    return "\n".join(lines)


def _layer_entry(layer: Any, sequence: str, backend: str, pass_index: int) -> dict[str, Any]:
    mapping = layer.mapping
    nps: Counter[str] = Counter()
    skip_dmas = 0
    external = 0
    if mapping is not None:
        nps.update(_type_name(component.type) for component in mapping.nps)
        skip_dmas = len(mapping.skipdma_stores) + len(mapping.skipdma_loads)
        # As akida's summary(): a layer's external memory is the sum over its NPs and skip DMAs.
        external = sum(
            component.mem_info.external_size
            for component in [*mapping.nps, *mapping.skipdma_stores, *mapping.skipdma_loads]
        )
    return {
        "name": layer.name,
        "type": _type_name(layer.parameters.layer_type),
        "sequence": sequence,
        "pass": pass_index,
        "backend": backend,
        "macs": int(layer.macs),
        "output_shape": [int(d) for d in layer.output_dims],
        "nps": dict(nps),
        "skip_dmas": skip_dmas,
        "external_memory_bytes": int(external),
        "software_reason": None,
    }


def _first_hardware_failure(model: Any, device: Any) -> tuple[str, str] | None:
    """(layer name, akida's reason) for the first layer the whole model cannot map in hardware."""

    import akida

    probe = akida.Model(layers=model.layers)
    try:
        probe.map(device, hw_only=True)
    except RuntimeError as exc:
        match = _LAYER_FAILURE.match(str(exc))
        return (match.group(1), match.group(2).strip()) if match else ("", str(exc))
    return None


def _software_reason(model: Any, name: str, device: Any, first_failure: tuple[str, str] | None) -> str:
    if first_failure is not None and first_failure[0] == name:
        return first_failure[1]
    layer = model.get_layer(name)
    if len(layer.inbounds) > 1:
        return "akida names no reason (a layer with several inputs cannot be mapped alone to ask)"
    refusal = hardware_refusal(model, name, device)
    return refusal or "maps to hardware on its own; placed in software by the layout of its sequence"


def hardware_refusal(model: Any, name: str, device: Any) -> str | None:
    """akida's reason why layer ``name`` alone cannot map in hardware on ``device``; None if it can.

    The layer is copied into a one-layer model (akida adds the input layer); layers with several
    inputs cannot be isolated that way and raise ValueError.
    """

    import akida

    alone = akida.Model(layers=[model.get_layer(name)])
    try:
        alone.map(device, hw_only=True)
    except RuntimeError as exc:
        match = _LAYER_FAILURE.match(str(exc))
        return match.group(2).strip() if match else str(exc)
    return None


def _type_name(value: Any) -> str:
    return str(value).rsplit(".", 1)[-1]

