"""Runners for the files the Akida v1 backend writes: the Akida IP v1 model (.fbz) and the quantized Keras model.

Like every qanac runner they take float32 inputs by name in the float ONNX model's layout (NCHW for an image,
already preprocessed) and return outputs in its layout. An Akida v1 model, and the Keras model it was
converted from, read NHWC: both runners transpose the input and put the output back (``lowering.to_nhwc``,
``from_nhwc``). The Akida model starts with a Quantizer that takes the float input, as on v2.

- ``AkidaV1SoftwareRunner``: akida's software backend on an unmapped copy (a model mapped on a virtual
  AKD1000 raises "An actual hardware device is required." in ``predict``); ``backends/akida/runners.py``.
  A model ending with a ReLU (a device segment that feeds the host) runs with ``forward`` and the output
  scale the backend recorded (``convert.output_scale``).
- ``AkidaV1HardwareRunner``: the same on an attached board. Untested here: no Akida hardware on the build
  machines.
- ``QuantizedKerasRunner``: quantizeml's quantized tf_keras model (``quantized.h5``) on TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from qanac.backends.akida.runners import AkidaHardwareRunner, AkidaSoftwareRunner
from qanac.backends.akida.tensorflow_import import import_tensorflow_quietly
from qanac.diagnostics import UsageError
from qanac.execution import DEFAULT_BATCH

from .lowering import from_nhwc, to_nhwc

Progress = Callable[[int], None]


def _input_array(inputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in inputs:
        raise UsageError(f"no data for model input '{name}'; data has {sorted(inputs)}")
    return np.asarray(inputs[name], dtype=np.float32)


class _V1Run:
    """``run`` of the Akida v1 runners: NCHW in, NHWC to akida, the float model's layout out. A model that ends
    with a ReLU is run with ``forward`` (its levels) times ``output_scale``: akida's ``predict`` refuses it. A
    model that ends with a learning layer of ``neurons_per_class`` neurons per class outputs, per class, the
    largest potential of its neurons (the class akida's ``predict_classes`` picks has the largest)."""

    model: Any
    input_name: str
    float_output_shape: tuple[int, ...]
    batch_size: int
    output_scale: float | None = None
    neurons_per_class: int = 1

    def run(self, inputs: dict[str, np.ndarray], progress: Progress | None = None) -> list[np.ndarray]:
        data = to_nhwc(_input_array(inputs, self.input_name))
        chunks = []
        for start in range(0, len(data), self.batch_size):
            batch = np.ascontiguousarray(data[start : start + self.batch_size])
            if self.output_scale is None:
                potentials = self.model.predict(batch)
                chunks.append(potentials.reshape(len(batch), -1, self.neurons_per_class).max(-1))
            else:
                chunks.append(self.model.forward(batch).astype(np.float32) * np.float32(self.output_scale))
            if progress is not None:
                progress(len(batch))
        if not chunks:
            return [np.zeros((0, *self.float_output_shape), np.float32)]
        return [from_nhwc(np.concatenate(chunks), self.float_output_shape)]


class AkidaV1SoftwareRunner(_V1Run, AkidaSoftwareRunner):
    """An Akida IP v1 model on akida's software backend (an unmapped copy)."""

    def __init__(self, model: Any, input_name: str, output_name: str, float_output_shape: tuple[int, ...],
                 output_scale: float | None = None, batch_size: int = DEFAULT_BATCH, neurons_per_class: int = 1):
        super().__init__(model, input_name, output_name, float_output_shape, batch_size)
        self.output_scale = output_scale
        self.neurons_per_class = neurons_per_class


class AkidaV1HardwareRunner(_V1Run, AkidaHardwareRunner):
    """An Akida IP v1 model on an attached AKD1000/AKD1500 board. Not covered by tests (no hardware here)."""

    def __init__(self, model: Any, input_name: str, output_name: str, float_output_shape: tuple[int, ...],
                 output_scale: float | None = None, device_index: int = 0, batch_size: int = DEFAULT_BATCH,
                 neurons_per_class: int = 1):
        super().__init__(model, input_name, output_name, float_output_shape, device_index, batch_size)
        self.output_scale = output_scale
        self.neurons_per_class = neurons_per_class


class QuantizedKerasRunner:
    """quantizeml's quantized tf_keras model (a model or its .h5 file): NCHW float in, ONNX layout out."""

    def __init__(self, model: Any, input_name: str, output_name: str, output_shape: tuple[int, ...],
                 batch_size: int = DEFAULT_BATCH):
        if isinstance(model, (str, Path)):
            import_tensorflow_quietly()
            from quantizeml import load_model

            model = load_model(str(model), compile_model=False)
        self.model = model
        self.input_name = input_name
        self.output_names = [output_name]
        self.output_shape = tuple(output_shape)
        self.batch_size = batch_size

    def run(self, inputs: dict[str, np.ndarray], progress: Progress | None = None) -> list[np.ndarray]:
        data = to_nhwc(_input_array(inputs, self.input_name))
        chunks = []
        for start in range(0, len(data), self.batch_size):
            batch = data[start : start + self.batch_size]
            chunks.append(from_nhwc(np.asarray(self.model(batch, training=False)), self.output_shape))
            if progress is not None:
                progress(len(batch))
        return [np.concatenate(chunks) if chunks else np.zeros((0, *self.output_shape), np.float32)]
