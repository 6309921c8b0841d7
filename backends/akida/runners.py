"""Runners for the files the Akida backend writes: the Akida model (.fbz) and quantizeml's quantized ONNX.

Every runner takes float32 inputs by name in the float model's own layout (NCHW for an image model, already
preprocessed) and returns outputs in the float model's layout, so ``qanac verify`` compares float vs
quantized vs Akida on the same arrays without any reshaping of its own.

- ``AkidaSoftwareRunner``: akida's native software backend on the CPU. A mapped model cannot run without a
  board ("An actual hardware device is required."), so it runs an unmapped copy
  (``akida.Model(layers=m.layers)``); a model read from .fbz is unmapped anyway (the mapping is not saved).
  The Akida model begins with a Quantizer that takes the float input and quantizes it as calibrated, and
  ends with a Dequantizer; its (N, H, W, C) outputs are put back in the float layout. Inputs are always
  given as float: akida takes a uint8 array as already quantized and skips the calibrated scale, which
  equals the float path only when calibration spanned exactly the byte range with scale 1/255 and mean 0
  (measured: outputs off by 0.10 on a range of 0.22 when the calibration images used half the range).
- ``AkidaHardwareRunner``: the same model mapped on an attached board (``akida.devices()``). It cannot be
  exercised without hardware; without a board it raises a UsageError.
- ``QuantizedOnnxRunner``: quantizeml's quantized ONNX. Its com.brainchip nodes are ONNX *functions*
  stored in the model (``model.functions``), built from standard operators, so plain ONNX Runtime runs
  them; the onnxruntime-extensions library is registered as quantizeml itself does, which covers
  quantizeml's Python custom ops when quantizeml is imported (only the temporal BufferTempConv layers use
  one, FifoOp; CNNs do not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort

from qanac.diagnostics import UnsupportedModelError, UsageError
from qanac.execution import DEFAULT_BATCH, bundle_session, run_session

from .convert import akida_to_float_layout
from .devices import device_ip_version, hardware_device

Progress = Callable[[int], None]


class AkidaSoftwareRunner:
    """Runs an Akida model on akida's software backend; outputs in the float model's layout."""

    def __init__(
        self,
        model: Any,
        input_name: str,
        output_name: str,
        float_output_shape: tuple[int, ...],
        batch_size: int = DEFAULT_BATCH,
    ):
        import akida

        if isinstance(model, (str, Path)):
            model = akida.Model(str(model))
        if model.device is not None:
            model = akida.Model(layers=model.layers)
        self.model = model
        self.input_name = input_name
        self.output_names = [output_name]
        self.float_output_shape = tuple(float_output_shape)
        self.batch_size = batch_size

    def run(self, inputs: dict[str, np.ndarray], progress: Progress | None = None) -> list[np.ndarray]:
        if self.input_name not in inputs:
            raise UsageError(f"no data for model input '{self.input_name}'; data has {sorted(inputs)}")
        data = np.ascontiguousarray(inputs[self.input_name], dtype=np.float32)
        chunks = []
        for start in range(0, len(data), self.batch_size):
            batch = data[start : start + self.batch_size]
            chunks.append(self.model.predict(batch))
            if progress is not None:
                progress(len(batch))
        outputs = np.concatenate(chunks) if chunks else np.zeros((0, *self.float_output_shape), np.float32)
        return [akida_to_float_layout(outputs, self.float_output_shape)]


class AkidaHardwareRunner(AkidaSoftwareRunner):
    """Runs an Akida model on an attached board (``akida.devices()[index]``).

    Not covered by tests: no Akida hardware is present on the build machines.
    """

    def __init__(
        self,
        model: Any,
        input_name: str,
        output_name: str,
        float_output_shape: tuple[int, ...],
        device_index: int = 0,
        batch_size: int = DEFAULT_BATCH,
    ):
        super().__init__(model, input_name, output_name, float_output_shape, batch_size)
        device = hardware_device(device_index)
        model_ip = str(self.model.ip_version).rsplit(".", 1)[-1]
        if device_ip_version(device) != model_ip:
            raise UnsupportedModelError(
                f"the attached Akida device is IP {device_ip_version(device)} but the model is IP {model_ip}",
                hint="run on akida's software backend, or on an IP v2 board",
            )
        self.model.map(device, hw_only=False)
        self.device = device


class QuantizedOnnxRunner:
    """Runs quantizeml's quantized ONNX with ONNX Runtime (float in, dequantized float out)."""

    def __init__(
        self,
        model: onnx.ModelProto | str | Path,
        output_names: list[str] | None = None,
        batch_size: int = DEFAULT_BATCH,
    ):
        """``output_names`` renames the outputs (quantizeml calls them ``<float name>/dequantize``)."""

        self.session = quantized_session(model)
        self.output_names = output_names or [o.name for o in self.session.get_outputs()]
        self.batch_size = batch_size

    def run(self, inputs: dict[str, np.ndarray], progress: Progress | None = None) -> list[np.ndarray]:
        return run_session(self.session, inputs, batch_size=self.batch_size, progress=progress)


def quantized_session(model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    """An ONNX Runtime session for a quantizeml model, with onnxruntime-extensions registered."""

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        from onnxruntime_extensions import get_library_path
    except ImportError:
        pass
    else:
        options.register_custom_ops_library(get_library_path())
    if isinstance(model, (str, Path)):  # a bundle's file: from its bytes, so no external data is followed
        return bundle_session(Path(model), options=options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
