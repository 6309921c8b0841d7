"""The Akida backend: a float ONNX model in, an Akida IP v2 model (.fbz) plus its mapping report out.

``emit`` quantizes with quantizeml and converts with cnn2snn (``convert.compile_onnx``, which refuses
any silent truncation), maps the result on the chosen virtual device (``mapping.map_on_device``), checks
the Akida model against quantizeml's quantized ONNX on calibration samples (``agreement``), and writes

    model.fbz        the Akida model (role ``compiled``)
    quantized.onnx   quantizeml's quantized ONNX (role ``quantized``)

Options:
    device           a name from ``devices.device_names()``; default SixNodesIPv2 (IP v2, 24 NPs: the
                     mid-size v2 IP; ``auto`` sizes the smallest device that holds the whole model, and
                     fails when no device can). IP v1 devices are refused before any work.
    num_samples      calibration samples given to quantizeml (default: all, at most 1024)
    input_dtype      uint8 or int8 (default: ``convert.choose_input_dtype``)
    agreement_samples  samples for the Akida vs quantized ONNX check at compile time (default 32; 0 = skip)
    hardware         (load_runner) run on an attached board instead of the software backend
    device_index     (load_runner, hardware) which board, default 0
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import onnx

from qanac.backend import EmitResult
from qanac.calibration import CalibrationData
from qanac.graph import source_names_of

from .agreement import compare_akida_to_quantized
from .convert import compile_onnx
from .input_layer import with_identity_input_layer
from .devices import DEFAULT_DEVICE, MODEL_IP_VERSION, check_ip_version
from .mapping import annotate_sources, format_mapping_report, map_on_device, mapping_diagnostics
from .runners import AkidaHardwareRunner, AkidaSoftwareRunner, QuantizedOnnxRunner

COMPILED_FILE = "model.fbz"
QUANTIZED_FILE = "quantized.onnx"
DEFAULT_AGREEMENT_SAMPLES = 32


class AkidaBackend:
    name = "akida"
    variants: tuple[str, ...] = ("quantized",)

    def emit(
        self, model: onnx.ModelProto, calibration: CalibrationData, options: dict[str, Any], out_dir: Path
    ) -> EmitResult:
        device_name = options.get("device") or DEFAULT_DEVICE
        check_ip_version(device_name)
        model, identity_input = with_identity_input_layer(model)
        started = time.perf_counter()
        conversion = compile_onnx(
            model,
            calibration,
            num_samples=options.get("num_samples"),
            input_dtype=options.get("input_dtype"),
        )
        seconds = dict(conversion.seconds)

        t_map = time.perf_counter()
        mapping = map_on_device(conversion.akida_model, device_name)
        annotate_sources(mapping, source_names_of(model))
        seconds["map"] = time.perf_counter() - t_map

        out_dir = Path(out_dir)
        conversion.akida_model.save(str(out_dir / COMPILED_FILE))
        onnx.save(conversion.quantized, str(out_dir / QUANTIZED_FILE))

        diagnostics = [*conversion.diagnostics, *mapping_diagnostics(mapping)]
        report: dict[str, Any] = {
            "conversion": conversion.describe(),
            "mapping": mapping,
        }
        agreement_samples = int(options.get("agreement_samples", DEFAULT_AGREEMENT_SAMPLES))
        if agreement_samples > 0:
            t_check = time.perf_counter()
            akida_runner = AkidaSoftwareRunner(
                conversion.akida_model,
                conversion.input_name,
                conversion.output_name,
                conversion.float_output_shape,
            )
            inputs = {conversion.input_name: calibration.arrays[conversion.input_name][:agreement_samples]}
            agreement = compare_akida_to_quantized(akida_runner, conversion.quantized, inputs)
            seconds["agreement"] = time.perf_counter() - t_check
            report["agreement"] = agreement.to_dict()
            diagnostics.extend(agreement.diagnostics())
        seconds["total"] = time.perf_counter() - started
        report["seconds"] = seconds

        return EmitResult(
            files={"compiled": COMPILED_FILE, "quantized": QUANTIZED_FILE},
            report=report,
            manifest={
                "device": device_name,
                "ip_version": MODEL_IP_VERSION,
                "akida": {**conversion.describe(), "device": mapping["device"]},
                **({"identity_input": True} if identity_input else {}),
            },
            diagnostics=diagnostics,
            summary=format_mapping_report(mapping),
        )

    def load_runner(self, segment_dir: Path, segment: dict[str, Any], options: dict[str, Any]) -> AkidaSoftwareRunner:
        """The Akida model on akida's software backend, or on a board when ``options['hardware']`` is set."""

        info = segment["akida"]
        path = Path(segment_dir) / segment["files"]["compiled"]
        args = (str(path), info["input_name"], info["output_name"], tuple(info["output_shape"]))
        if options.get("hardware"):
            return AkidaHardwareRunner(*args, device_index=int(options.get("device_index", 0)))
        return AkidaSoftwareRunner(*args)

    def extra_runners(self, segment_dir: Path, segment: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """quantizeml's quantized ONNX under the name ``quantized``, for float vs quantized vs Akida."""

        path = Path(segment_dir) / segment["files"]["quantized"]
        return {"quantized": QuantizedOnnxRunner(path, output_names=[segment["akida"]["output_name"]])}
