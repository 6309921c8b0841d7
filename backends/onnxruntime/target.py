"""The ``onnxruntime`` target declaration (registered through the ``qanac.targets`` entry point group).

Declarative only: importing this module imports neither onnxruntime.quantization nor anything heavy.
"""

from __future__ import annotations

from qanac.targets import CANONICALIZE, Target

TARGET = Target(
    name="onnxruntime",
    description="int8 QDQ ONNX model for ONNX Runtime (static, per-channel), the reference deployment",
    backend="qanac.backends.onnxruntime.backend:OnnxRuntimeBackend",
    pipeline=CANONICALIZE,
)
