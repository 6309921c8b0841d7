"""The Akida backend: a float ONNX model in, an Akida IP v2 model (.fbz) plus its mapping report out.

``emit`` quantizes with quantizeml and converts with cnn2snn (``convert.compile_onnx``, which refuses
any silent truncation), maps the result on the chosen virtual device (``mapping.map_on_device``), checks
the Akida model against quantizeml's quantized ONNX on calibration samples (``agreement``), and writes
the files only when they agree (else a VerificationError naming the float nodes of the layer where the Akida
model departs: the compiler runs them on the host, or fails with exit 1):

    model.fbz        the Akida model (role ``compiled``)
    quantized.onnx   quantizeml's quantized ONNX (role ``quantized``, the variant of the same name)

What the runners need to read those files back (tensor names, output shapes, the device) is the segment's
backend record in the manifest, ``AkidaSegmentRecord``.

Options:
    device           a name from ``devices.device_names()``; default SixNodesIPv2 (IP v2, 24 NPs: the
                     mid-size v2 IP; ``auto`` sizes the smallest device that holds the whole model, and
                     fails when no device can). IP v1 devices (AKD1000, AKD1500) are compiled by
                     ``v1.emit.emit_v1`` (ONNX lowered to tf_keras; files and record in that module).
    weight_bits, activation_bits  (IP v1 devices) quantization bit widths, default 4 and 4
    num_samples      calibration samples given to quantizeml (default: all, at most 1024)
    input_dtype      uint8 or int8 (default: ``convert.choose_input_dtype``)
    agreement_samples  samples for the Akida vs quantized ONNX check at compile time (default 32; 0 = skip)
    learnable        record the feature statistics ``qanac learn`` needs (``learning.prime_v2``; IP v1:
                     ``learning.prime_v1``), from labelled calibration data
    hardware         (load_runner) run on an attached board instead of the software backend
    device_index     (load_runner, hardware) which board, default 0
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qanac.backend import EmitResult
from qanac.calibration import CalibrationData
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError, UsageError, VerificationError
from qanac.graph import source_names_of
from qanac.manifest import COMPILED, Record, SegmentRecord
from qanac.progress import report as report_progress

from .agreement import Agreement, compare_akida_to_quantized, disagreement_error, divergent_layers, float_nodes_of
from .convert import AkidaConversion, compile_onnx
from .devices import AUTO, DEFAULT_DEVICE, MODEL_IP_VERSION, V1_IP_VERSION, check_ip_version, device_spec
from .input_layer import with_identity_input_layer
from .learning import LearningRecord, prime_v2
from .mapping import annotate_sources, format_mapping_report, map_on_device, mapping_diagnostics
from .runners import AkidaHardwareRunner, AkidaSoftwareRunner, QuantizedOnnxRunner
from .v1.emit import emit_v1, load_v1_quantized, load_v1_runner

COMPILED_FILE = "model.fbz"
QUANTIZED_FILE = "quantized.onnx"
DEFAULT_AGREEMENT_SAMPLES = 32
LOCATE_SAMPLES = 8  # samples the search for a disagreeing layer runs on
QUANTIZED = "quantized"


@dataclasses.dataclass
class AkidaSegmentRecord(Record):
    """The Akida backend's own fields of a device segment's manifest record (``SegmentRecord.backend``)."""

    ip_version: str
    input_name: str  # the float model's input and output tensor names
    output_name: str
    input_dtype: str  # what the Akida input layer takes: uint8 or int8
    num_samples: int  # calibration samples quantizeml used
    output_shape: list[int]  # float output shape without the batch (the runners return this layout)
    akida_output_shape: list[int]
    device: dict[str, Any]  # the device the model was mapped on (``devices.describe_device``)
    identity_input: bool = False  # an identity input layer was inserted (``input_layer``)
    learning: LearningRecord | None = None  # compiled --learnable: what ``learning.py`` learned from


class AkidaBackend:
    name = "akida"
    variants: tuple[str, ...] = (QUANTIZED,)

    def emit(
        self, model: onnx.ModelProto, calibration: CalibrationData, options: dict[str, Any], out_dir: Path
    ) -> EmitResult:
        device_name = options.get("device") or DEFAULT_DEVICE
        if device_name != AUTO and device_spec(device_name).ip_version == V1_IP_VERSION:
            report_progress("quantize", f"quantizing, converting and mapping for {device_name} (IP v1)")
            return emit_v1(model, calibration, options, out_dir, device_name)
        check_ip_version(device_name)
        model, identity_input = with_identity_input_layer(model)
        started = time.perf_counter()
        report_progress("quantize", f"quantizing ({calibration.num_samples} calibration samples) with quantizeml, "
                        "converting with cnn2snn")
        conversion = compile_onnx(
            model,
            calibration,
            num_samples=options.get("num_samples"),
            input_dtype=options.get("input_dtype"),
        )
        seconds = dict(conversion.seconds)

        t_map = time.perf_counter()
        report_progress("map", f"mapping on {device_name}")
        check_mapping_survives(conversion.akida_model, device_name)
        mapping = map_on_device(conversion.akida_model, device_name)
        annotate_sources(mapping, source_names_of(model))
        seconds["map"] = time.perf_counter() - t_map

        diagnostics = [*conversion.diagnostics, *mapping_diagnostics(mapping)]
        report: dict[str, Any] = {
            "conversion": conversion.describe(),
            "mapping": mapping,
        }
        agreement_samples = int(options.get("agreement_samples", DEFAULT_AGREEMENT_SAMPLES))
        if agreement_samples > 0:
            t_check = time.perf_counter()
            report_progress("check", f"checking the Akida model against the quantized ONNX on {agreement_samples} "
                            "samples")
            akida_runner = AkidaSoftwareRunner(
                conversion.akida_model,
                conversion.input_name,
                conversion.output_name,
                conversion.float_output_shape,
            )
            inputs = {conversion.input_name: calibration.arrays[conversion.input_name][:agreement_samples]}
            agreement = compare_akida_to_quantized(akida_runner, conversion.quantized, inputs)
            seconds["agreement"] = time.perf_counter() - t_check
            if agreement.flagged:
                raise _disagreement(conversion, model, agreement, inputs[conversion.input_name], diagnostics)
            report["agreement"] = agreement.to_dict()
        out_dir = Path(out_dir)
        conversion.akida_model.save(str(out_dir / COMPILED_FILE))
        onnx.save(conversion.quantized, str(out_dir / QUANTIZED_FILE))
        files = {COMPILED: COMPILED_FILE, QUANTIZED: QUANTIZED_FILE}
        learning = None
        if options.get("learnable"):
            learning_files, learning, report["learning"] = prime_v2(
                conversion.akida_model, model, calibration, conversion.input_name, out_dir)
            files.update(learning_files)
        seconds["total"] = time.perf_counter() - started
        report["seconds"] = seconds

        record = AkidaSegmentRecord(ip_version=MODEL_IP_VERSION, **conversion.describe(), device=mapping["device"],
                                    identity_input=identity_input, learning=learning)
        return EmitResult(
            files=files,
            device=device_name,
            record=record.to_dict(),
            hardware_mac_share=mapping["hardware_mac_share"],
            report=report,
            diagnostics=diagnostics,
            summary=format_mapping_report(mapping),
        )

    def load_runner(self, segment_dir: Path, segment: SegmentRecord, options: dict[str, Any]) -> AkidaSoftwareRunner:
        """The Akida model on akida's software backend, or on a board when ``options['hardware']`` is set."""

        if segment.backend.get("ip_version") == V1_IP_VERSION:
            return load_v1_runner(segment_dir, segment, options)
        record = segment.backend_record(AkidaSegmentRecord)
        path = Path(segment_dir) / segment.file(COMPILED)
        args = (str(path), record.input_name, record.output_name, tuple(record.output_shape))
        if options.get("hardware"):
            return AkidaHardwareRunner(*args, device_index=int(options.get("device_index", 0)))
        return AkidaSoftwareRunner(*args)

    def load_variant(
        self, variant: str, segment_dir: Path, segment: SegmentRecord, options: dict[str, Any]
    ) -> QuantizedOnnxRunner:
        """quantizeml's quantized ONNX (``quantized``), for float vs quantized vs Akida."""

        if variant != QUANTIZED:
            raise UsageError(f"the Akida backend writes no '{variant}' model", hint=f"it writes '{QUANTIZED}'")
        if segment.backend.get("ip_version") == V1_IP_VERSION:
            return load_v1_quantized(segment_dir, segment)
        record = segment.backend_record(AkidaSegmentRecord)
        path = Path(segment_dir) / segment.file(QUANTIZED)
        return QuantizedOnnxRunner(path, output_names=[record.output_name])


# maps the .fbz in argv[1] on the device argv[2] as ``mapping.map_on_device`` does
_MAP_PROBE = """
import sys
import akida
from qanac.backends.akida.devices import virtual_device
model = akida.Model(sys.argv[1])
model.map(virtual_device(sys.argv[2], model), hw_only=False)
"""
MAP_PROBE_SECONDS = 600.0


def check_mapping_survives(akida_model: Any, device_name: str) -> None:
    """Map ``akida_model`` in a child process first: akida's mapper (``Model.map``, native code) kills the
    process on some graphs (SIGSEGV in ``_map_search`` on a ShuffleNetV2 unit: two branches of two or more
    layers each joined by a Concatenate), which no Python handler can catch. A child killed by a signal is
    an ``UnsupportedModelError`` (AKM210) naming no node, so the partitioner runs the segment on the host;
    any other outcome leaves mapping to ``map_on_device`` in this process (its errors are its own)."""

    with tempfile.TemporaryDirectory(prefix="qanac-map-") as folder:
        path = Path(folder) / COMPILED_FILE
        akida_model.save(str(path))
        try:
            probe = subprocess.run([sys.executable, "-c", _MAP_PROBE, str(path), device_name],
                                   capture_output=True, text=True, timeout=MAP_PROBE_SECONDS,
                                   env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        except subprocess.TimeoutExpired:
            return
    if probe.returncode >= 0:
        return
    frames = [line.strip() for line in probe.stderr.splitlines() if line.strip().startswith("File ")]
    where = f" ({frames[0]})" if frames else ""
    message = (f"akida's mapper crashed (killed by {signal.Signals(-probe.returncode).name}) mapping this segment "
               f"on {device_name}{where}")
    raise UnsupportedModelError(
        message,
        diagnostics=[Diagnostic(Level.ERROR, "AKM210", message, rule="akida-maps",
                                hint="the segment runs on the host; report the model to BrainChip")],
        hint="the segment runs on the host (without --no-partition)",
    )


def _disagreement(conversion: AkidaConversion, model: onnx.ModelProto, agreement: Agreement, inputs: np.ndarray,
                  diagnostics: list[Diagnostic]) -> VerificationError:
    """The error for an Akida model that disagrees with its quantized ONNX, naming the float nodes of the
    layers where it departs, found on (at most ``LOCATE_SAMPLES`` of) the samples whose outputs differ."""

    samples = inputs[agreement.differing_samples[:LOCATE_SAMPLES]]
    divergences = divergent_layers(conversion.akida_model, conversion.quantized, samples)
    nodes = {d.layer: float_nodes_of(d.layer, conversion.quantized, model) for d in divergences}
    return disagreement_error(agreement, divergences, nodes, diagnostics)
