"""Check that a zoo model converts completely for Akida IP v2 and maps onto a device in hardware.

This is the zoo's own acceptance check for the ``native`` variants (used by its tests and by
``qanac zoo export --check`` until the Akida backend offers the same report). It runs MetaTF's ONNX
path exactly as the backend does: ``quantizeml.models.quantize`` on a copy of the model with uint8 input,
``cnn2snn.convert``, then ``model.map(device, hw_only=False)``. quantizeml and cnn2snn only *warn* when
they leave nodes unquantized or truncate the model, so the check records those warnings and compares
the Akida output shape with the float one; ``AkidaCheck.ok`` is true only when nothing was dropped, the
shapes agree, and a single hardware sequence holds every layer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import warnings
from typing import Any

import numpy as np
import onnx

from qanac.native_output import import_tensorflow_quietly

_TRUNCATION_MARKERS = ("were not quantized", "Conversion stops")


@dataclasses.dataclass
class AkidaCheck:
    float_output_shape: tuple[int, ...]
    akida_output_shape: tuple[int, ...]
    sequences: list[dict[str, Any]]
    warnings: list[str]
    macs: int
    layers: int
    model: Any = dataclasses.field(repr=False, default=None)

    @property
    def truncated(self) -> bool:
        return any(marker in w for w in self.warnings for marker in _TRUNCATION_MARKERS)

    @property
    def fully_on_hardware(self) -> bool:
        return len(self.sequences) == 1 and self.sequences[0]["backend"] == "Hardware"

    @property
    def ok(self) -> bool:
        return (
            not self.truncated
            and self.fully_on_hardware
            and int(np.prod(self.akida_output_shape)) == int(np.prod(self.float_output_shape))
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "float_output_shape": list(self.float_output_shape),
            "akida_output_shape": list(self.akida_output_shape),
            "sequences": self.sequences,
            "warnings": self.warnings,
            "macs": self.macs,
            "layers": self.layers,
        }


def check_akida_v2(
    model: onnx.ModelProto,
    samples: np.ndarray,
    device: Any = None,
) -> AkidaCheck:
    """Quantize, convert and map ``model`` (float input in [0, 1], NCHW) on ``device``.

    ``samples`` are float32 NCHW calibration images in [0, 1]; ``device`` defaults to
    ``akida.SixNodesIPv2()``. The returned ``model`` attribute is the converted, mapped ``akida.Model``.
    """

    import akida
    import_tensorflow_quietly()
    import cnn2snn
    from quantizeml.layers import QuantizationParams
    from quantizeml.models import quantize

    device = device if device is not None else akida.SixNodesIPv2()
    float_shape = _output_shape(model)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        quantized = quantize(
            copy.deepcopy(model),
            qparams=QuantizationParams(input_dtype="uint8"),
            samples=samples.astype(np.float32),
            num_samples=len(samples),
        )
        converted = cnn2snn.convert(quantized)
    caught = [str(r.message) for r in records if any(m in str(r.message) for m in _TRUNCATION_MARKERS)]
    converted.map(device, hw_only=False)
    sequences = [
        {
            "backend": str(seq.backend).split(".")[-1],
            "passes": len(seq.passes),
            "layers": [layer.name for p in seq.passes for layer in p.layers],
        }
        for seq in converted.sequences
    ]
    return AkidaCheck(
        float_output_shape=float_shape,
        akida_output_shape=tuple(int(d) for d in converted.output_shape),
        sequences=sequences,
        warnings=caught,
        macs=int(converted.macs),
        layers=len(converted.layers),
        model=converted,
    )


def _output_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return tuple(d.dim_value for d in dims[1:])
