"""The onnxruntime target: a statically quantized int8 QDQ model, calibrated on the user's data.

Quantization is onnxruntime.quantization's own (``quant_pre_process`` then ``quantize_static``):
per-channel symmetric int8 weights, asymmetric uint8 activations (the CPU execution provider's fast
path), calibration by MinMax unless ``calibrate_method`` says Entropy or Percentile. qanac adds only the
data reader and the bundle around it.

Weights use ``reduce_range`` (7 bits) by default. ONNX Runtime's fused int8 kernels on x86 CPUs without
VNNI can saturate the intermediate sums of 8-bit products. Measured on the demo digits CNN on this
machine (AVX2, no VNNI), the same QDQ model scored 89.4 % with ORT's optimizations on and 97.7 % with
them off (float 97.5 %); with reduce_range it scores 97.7 % either way. After quantizing, ``emit``
runs the model both ways on calibration samples and reports any disagreement (ORT001), so this kind of
kernel error is never silent.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qanac.backend import EmitResult
from qanac.calibration import CalibrationData
from qanac.compare import compare_outputs
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError, UsageError
from qanac.execution import OnnxRuntimeRunner, run_session
from qanac.manifest import COMPILED, SegmentRecord

QDQ_FILE = "model.qdq.onnx"
KERNEL_CHECK_SAMPLES = 64
MIN_KERNEL_AGREEMENT = 0.99
# --calibrate-method names -> onnxruntime.quantization.CalibrationMethod members (imported only to emit:
# running a bundle needs neither onnxruntime.quantization nor the torch it imports)
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


class _Reader:
    """Feeds calibration samples one batch at a time (batch 1 for models with a fixed batch of 1).

    A ``CalibrationDataReader`` by onnxruntime's own subclass hook (it has ``get_next``), iterable too.
    """

    def __init__(self, calibration: CalibrationData, batch_size: int):
        self._batches = iter(list(calibration.batches(batch_size)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def __iter__(self):
        return self._batches


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


class OnnxRuntimeBackend:
    name = "onnxruntime"
    variants: tuple[str, ...] = ()

    def emit(
        self, model: onnx.ModelProto, calibration: CalibrationData, options: dict[str, Any], out_dir: Path
    ) -> EmitResult:
        method_name = options.get("calibrate_method", "minmax")
        if method_name not in CALIBRATION_METHODS:
            raise UsageError(
                f"unknown calibration method '{method_name}'", hint="use " + ", ".join(CALIBRATION_METHODS)
            )
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
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
                    reduce_range=bool(options.get("reduce_range", True)),
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method_name]),
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
        kernels = check_fused_kernels(out_dir / QDQ_FILE, calibration)
        report = {
            "kernel_check": kernels,
            "quantization": {
                "format": "QDQ",
                "weights": "int8 symmetric per-channel"
                + (", 7-bit range (reduce_range)" if options.get("reduce_range", True) else ""),
                "activations": "uint8 asymmetric per-tensor",
                "calibrate_method": method_name,
                "calibration_samples": calibration.num_samples,
            },
            "quantized_ops": histogram,
        }
        diagnostics = []
        if kernels["top1_agreement"] < MIN_KERNEL_AGREEMENT:
            diagnostics.append(
                Diagnostic(
                    Level.WARNING,
                    "ORT001",
                    f"ONNX Runtime's fused int8 kernels disagree with the quantized model's own arithmetic on "
                    f"{kernels['samples']} calibration samples (top-1 agreement {kernels['top1_agreement']:.3f}, "
                    f"max abs difference {kernels['max_abs_difference']:.3g})",
                    rule="int8 kernels on CPUs without VNNI can saturate",
                    hint="keep reduce_range on (the default), or run on a CPU with VNNI",
                )
            )
        summary = (
            f"onnxruntime QDQ model: {report['quantization']['weights']} weights, "
            f"{report['quantization']['activations']} activations; fused int8 kernels agree with the QDQ "
            f"arithmetic on {kernels['top1_agreement']:.1%} of {kernels['samples']} calibration samples"
        )
        return EmitResult(files={COMPILED: QDQ_FILE}, device="cpu", report=report, diagnostics=diagnostics,
                          summary=summary)

    def load_runner(self, segment_dir: Path, segment: SegmentRecord, options: dict[str, Any]) -> OnnxRuntimeRunner:
        return OnnxRuntimeRunner(segment_dir / segment.file(COMPILED))

    def load_variant(
        self, variant: str, segment_dir: Path, segment: SegmentRecord, options: dict[str, Any]
    ) -> OnnxRuntimeRunner:
        raise UsageError(f"the onnxruntime backend writes no '{variant}' model", hint="it writes only 'compiled'")


def check_fused_kernels(path: Path, calibration: CalibrationData) -> dict[str, Any]:
    """Run the QDQ model with ORT's fused int8 kernels and with its plain QDQ arithmetic (the reference);
    compare them (``qanac.compare.compare_outputs``) on the first output."""

    from onnxruntime import GraphOptimizationLevel, InferenceSession, SessionOptions

    samples = calibration.take(KERNEL_CHECK_SAMPLES).arrays
    outputs = []
    for level in (GraphOptimizationLevel.ORT_ENABLE_ALL, GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = SessionOptions()
        options.graph_optimization_level = level
        options.log_severity_level = 3
        session = InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs.append(run_session(session, samples)[0])
    fused, plain = outputs
    comparison = compare_outputs(["output"], [plain], [fused])[0]
    return {
        "samples": int(len(fused)),
        "top1_agreement": 1.0 if comparison.top1_agreement is None else comparison.top1_agreement,
        "max_abs_difference": comparison.max_abs_error,
    }
