"""The ``onnxruntime`` target declaration (registered through the ``qanac.targets`` entry point group).

Declarative only (the pipeline and the ``--calibrate-method`` option of compile): importing this module
imports neither onnxruntime.quantization nor anything heavy.
"""

from __future__ import annotations

from qanac.targets import CANONICALIZE, Target, TargetOption

# Calibration methods of onnxruntime.quantization that ``--calibrate-method`` offers (backend.py maps them).
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")

TARGET = Target(
    name="onnxruntime",
    description="int8 QDQ ONNX model for ONNX Runtime (static, per-channel), the reference deployment",
    backend="qanac.backends.onnxruntime.backend:OnnxRuntimeBackend",
    pipeline=CANONICALIZE,
    options=(
        TargetOption("--calibrate-method", key="calibrate_method", commands=("compile",),
                     choices=CALIBRATION_METHODS, default="minmax",
                     help="how activation ranges are calibrated"),
    ),
)
