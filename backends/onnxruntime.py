"""The onnxruntime target: a statically quantized int8 QDQ model, calibrated on the user's data.

Quantization is onnxruntime.quantization's own (``quant_pre_process`` then ``quantize_static``):
per-channel symmetric int8 weights, asymmetric uint8 activations (the CPU execution provider's fast
path), calibration by MinMax unless ``calibrate_method`` says Entropy or Percentile. qanac adds only the
data reader and the bundle around it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from qanac.backend import EmitResult
from qanac.calibration import CalibrationData
from qanac.diagnostics import UnsupportedModelError, UsageError
from qanac.execution import make_session, run_session

QDQ_FILE = "model.qdq.onnx"
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


class _Reader(CalibrationDataReader):
    """Feeds calibration samples one batch at a time (batch 1 for models with a fixed batch of 1)."""

    def __init__(self, calibration: CalibrationData, batch_size: int):
        self._batches = iter(list(calibration.batches(batch_size)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def emit(
        self, model: onnx.ModelProto, calibration: CalibrationData, options: dict[str, Any], out_dir: Path
    ) -> EmitResult:
        method_name = options.get("calibrate_method", "minmax")
        if method_name not in CALIBRATION_METHODS:
            raise UsageError(
                f"unknown calibration method '{method_name}'", hint="use " + ", ".join(CALIBRATION_METHODS)
            )
        with tempfile.TemporaryDirectory(prefix="qanac-ort-") as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            try:
                quant_pre_process(model, str(prepared), skip_symbolic_shape=False)
            except Exception as exc:  # the library's own failure, reported with the model named
                raise UnsupportedModelError(
                    f"onnxruntime quantization pre-processing failed: {type(exc).__name__}: {exc}"
                ) from exc
            batch = _fixed_batch(model) or 32
            reader = _Reader(calibration, batch)
            try:
                quantize_static(
                    str(prepared),
                    str(out_dir / QDQ_FILE),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CALIBRATION_METHODS[method_name],
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                )
            except Exception as exc:
                raise UnsupportedModelError(
                    f"onnxruntime static quantization failed: {type(exc).__name__}: {exc}"
                ) from exc
        quantized = onnx.load(str(out_dir / QDQ_FILE))
        histogram: dict[str, int] = {}
        for node in quantized.graph.node:
            histogram[node.op_type] = histogram.get(node.op_type, 0) + 1
        report = {
            "quantization": {
                "format": "QDQ",
                "weights": "int8 symmetric per-channel",
                "activations": "uint8 asymmetric per-tensor",
                "calibrate_method": method_name,
                "calibration_samples": calibration.num_samples,
            },
            "quantized_ops": histogram,
        }
        return EmitResult(files={"compiled": QDQ_FILE}, report=report, manifest={"device": "cpu"})

    def load_runner(self, bundle_dir: Path, manifest: dict[str, Any], options: dict[str, Any]) -> "OnnxRuntimeRunner":
        return OnnxRuntimeRunner(bundle_dir / manifest["files"]["compiled"]["path"])


class OnnxRuntimeRunner:
    """Runs an ONNX file with ONNX Runtime on the CPU (used for QDQ models and host segments)."""

    def __init__(self, path: Path, threads: int = 0):
        self.session = make_session(str(path), threads)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray], progress=None) -> list[np.ndarray]:
        return run_session(self.session, inputs, progress=progress)
