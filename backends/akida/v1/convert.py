"""The Akida IP v1 recipe: float ONNX -> tf_keras (``lowering``) -> quantizeml at 1-4 bits -> cnn2snn under v1.

quantizeml quantizes ONNX only at 8 bits and cnn2snn refuses ONNX for v1 ("Akida v1 does not support ONNX
models"), so v1 starts from the lowered tf_keras model. Quantization and conversion both run inside
``cnn2snn.set_akida_version(AkidaVersion.v1)`` (it sets CNN2SNN_TARGET_AKIDA_VERSION, which cnn2snn reads
when it picks its block converters; outside it ``convert`` builds an IP v2 model) with

    QuantizationParams(activation_bits=A, weight_bits=W, input_weight_bits=I, per_tensor_activations=True,
                       input_dtype="uint8")

W in ``rules.WEIGHT_BITS`` and A in ``rules.ACTIVATION_BITS`` (default 4 and 4), I = 8 for the first layer,
and ``last_output_bits=A`` when the model ends with a ReLU (else its output quantizer is missing). cnn2snn
builds a v1 model only when the first layer is a Conv with a ReLU over a 1- or 3-channel image, which becomes
the v1 InputConvolutional (4 or 8-bit weights, uint8 input); any other first layer fails in akida ("InputData
sign incompatible with previous layer" with uint8 input, "Convolutional layer only accepts unsigned inputs"
with int8), which lint rule AK1113 reports before any work.

Invariants checked after conversion, each an UnsupportedModelError naming the ONNX nodes behind the Keras
layers involved: every layer was quantized (quantizeml puts a Dequantizer before a layer it cannot quantize
and only warns), cnn2snn built every block, the Akida model is IP v1, and its output shape is the float
model's (Akida's (H, W, C) read in the ONNX layout).

Diagnostic codes (stable; the lint rules of ``rules.py`` are AK11xx):
    AK1301  the lowering has no Keras form for a node (``lowering``)
    AK1302  quantizeml left a layer float
    AK1303  cnn2snn refused a block (unbounded ReLU, pattern, padding, bit width, ...)
    AK1304  the Akida output shape differs from the float model's, or the model is not IP v1
    AK1399  a warning from quantizeml or cnn2snn that does not change the model
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
import warnings
from typing import Any

import numpy as np
import onnx

from qanac.backends.akida import patterns
from qanac.backends.akida.convert import calibration_samples, check_single_io, output_shapes_match
from qanac.calibration import CalibrationData
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError, UsageError

from .lowering import LoweredModel, lower_to_keras, to_nhwc
from .rules import ACTIVATION_BITS, WEIGHT_BITS

INPUT_WEIGHT_BITS = 8  # the v1 InputConvolutional takes 4 or 8 (rules.INPUT_WEIGHT_BITS); 8 keeps the front end precise
DEFAULT_WEIGHT_BITS = 4
DEFAULT_ACTIVATION_BITS = 4
CALIBRATION_BATCH = 32
# quantizeml's configuration of a ReLU with 1-bit (spike) outputs, the input of an Akida v1 learning layer
SPIKE_CONFIG = {"output_quantizer": {"bitwidth": 1, "signed": False, "axis": "per-tensor", "buffer_bitwidth": 32},
                "buffer_bitwidth": 32}

# cnn2snn's messages -> the way out
_HINTS: tuple[tuple[str, str], ...] = (
    ("unbounded QuantizedReLU", "Akida v1 has bounded ReLUs only: use ReLU6 / Clip(0, b) in the model, or compile "
                                "with --approx bound-relu (each ReLU bounded at a high percentile of its "
                                "calibration output, with the deviation reported)"),
    ("must have the same padding", "pool with the padding of the convolution before it ('same' after a 'same' "
                                   "convolution: MaxPool(2, 2) on an even map is both)"),
    ("Model incompatible with akida v1", "every layer but the last must end in a bounded ReLU on Akida v1 "
                                         "(pooling inside a layer comes before its activation)"),
    ("Invalid block found", "Akida v1 layers are Conv/SeparableConv [MaxPool | GlobalAvgPool] [ReLU] and "
                            "[Flatten] Dense [ReLU]; rewrite the block into one of them"),
    ("only one inbound", "Akida v1 runs sequential models only (no Add, Concat or Multiply of two layers)"),
    ("weight", "Akida v1 takes 1, 2 or 4-bit weights (4 or 8 in the input convolution)"),
)


@dataclasses.dataclass(frozen=True)
class BitWidths:
    weight: int
    activation: int
    input_weight: int

    def to_dict(self) -> dict[str, int]:
        return {"weight_bits": self.weight, "activation_bits": self.activation,
                "input_weight_bits": self.input_weight}


@dataclasses.dataclass
class V1Conversion:
    """The lowered float Keras model, its quantized form, the Akida IP v1 model and what happened on the way."""

    lowered: LoweredModel
    quantized: Any  # the quantizeml tf_keras model (ends with a Dequantizer)
    akida_model: Any
    bits: BitWidths
    num_samples: int
    akida_output_shape: tuple[int, ...]
    output_scale: float | None  # float value of one output level when the model ends with a ReLU, else None
    seconds: dict[str, float]
    diagnostics: list[Diagnostic]

    def describe(self) -> dict[str, Any]:
        return {
            "input_name": self.lowered.input_name,
            "output_name": self.lowered.output_name,
            "input_shape": list(self.lowered.input_shape),
            "output_shape": list(self.lowered.output_shape),
            "akida_output_shape": list(self.akida_output_shape),
            "output_scale": self.output_scale,
            "num_samples": self.num_samples,
            **self.bits.to_dict(),
            "rewrites": list(self.lowered.rewrites),
        }


def check_bit_widths(weight_bits: int | None, activation_bits: int | None) -> tuple[int, int]:
    """The requested widths (defaults 4 and 4) when Akida v1 has them; a UsageError otherwise."""

    weight = DEFAULT_WEIGHT_BITS if weight_bits is None else int(weight_bits)
    activation = DEFAULT_ACTIVATION_BITS if activation_bits is None else int(activation_bits)
    if weight not in WEIGHT_BITS:
        raise UsageError(f"Akida v1 takes {', '.join(map(str, WEIGHT_BITS))}-bit weights, not {weight}",
                         hint="--weight-bits 4 (the default) or 2 or 1")
    if activation not in ACTIVATION_BITS:
        raise UsageError(f"Akida v1 takes {ACTIVATION_BITS[0]} to {ACTIVATION_BITS[-1]}-bit activations, "
                         f"not {activation}", hint="--activation-bits 4 (the default) or fewer")
    return weight, activation


def compile_v1(
    model: onnx.ModelProto,
    calibration: CalibrationData,
    weight_bits: int | None = None,
    activation_bits: int | None = None,
    num_samples: int | None = None,
    spike_features: bool = False,
) -> V1Conversion:
    """Lower, quantize and convert ``model`` (never mutated) to an Akida IP v1 model; see the module docstring.

    ``spike_features`` quantizes the ReLU that feeds the final Dense layer to 1 bit (``spike_layer``): the input
    an Akida v1 learning layer requires (``learning.py``)."""

    weight, activation = check_bit_widths(weight_bits, activation_bits)
    check_single_io(model)
    samples = calibration_samples(model, calibration, num_samples)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    lowered = lower_to_keras(model)
    seconds["lower"] = time.perf_counter() - started
    bits = BitWidths(weight, activation, INPUT_WEIGHT_BITS)

    import cnn2snn
    from quantizeml.models import QuantizationParams, quantize

    qparams = QuantizationParams(activation_bits=activation, weight_bits=weight, input_weight_bits=bits.input_weight,
                                 per_tensor_activations=True, input_dtype="uint8",
                                 last_output_bits=activation if _ends_with_relu(lowered) else None)
    q_config = {spike_layer(lowered): SPIKE_CONFIG} if spike_features else None
    with cnn2snn.set_akida_version(cnn2snn.AkidaVersion.v1):
        started = time.perf_counter()
        with _vendor_messages() as messages:
            try:
                quantized = quantize(lowered.keras_model, q_config=q_config, qparams=qparams, samples=to_nhwc(samples),
                                     num_samples=len(samples), batch_size=CALIBRATION_BATCH)
            except (ValueError, RuntimeError, AssertionError) as exc:
                raise _vendor_error("AK1302", "quantizeml cannot quantize the model for Akida v1", exc,
                                    lowered) from exc
        seconds["quantize"] = time.perf_counter() - started
        check_fully_quantized(quantized, lowered, messages)

        started = time.perf_counter()
        with _vendor_messages() as convert_messages:
            try:
                akida_model = cnn2snn.convert(quantized)
            except (ValueError, RuntimeError, AssertionError) as exc:
                raise _vendor_error("AK1303", "cnn2snn cannot convert the model to Akida v1", exc, lowered) from exc
        seconds["convert"] = time.perf_counter() - started

    akida_output_shape = tuple(int(d) for d in akida_model.output_shape)
    check_v1_model(akida_model, akida_output_shape, lowered.output_shape)
    diagnostics = [Diagnostic(Level.WARNING, "AK1399", f"MetaTF: {m}", rule="akida-v1")
                   for m in [*messages, *convert_messages]]
    return V1Conversion(lowered, quantized, akida_model, bits, len(samples), akida_output_shape,
                        output_scale(quantized) if _ends_with_relu(lowered) else None, seconds, diagnostics)


def spike_layer(lowered: LoweredModel) -> str:
    """The Keras name of the ReLU whose output the final Dense layer reads (through an optional Flatten): the
    feature layer that gets 1-bit outputs for edge learning. A model that does not end that way is refused."""

    import tf_keras

    layers = lowered.keras_model.layers
    kinds = (tf_keras.layers.Flatten, tf_keras.layers.Reshape)
    before = [layer for layer in layers[:-1] if not isinstance(layer, kinds)]
    if not isinstance(layers[-1], tf_keras.layers.Dense) or not before or not isinstance(
            before[-1], tf_keras.layers.ReLU):
        raise UsageError("a learnable Akida v1 model ends with a dense classifier (Gemm) read from a ReLU: that "
                         "ReLU becomes the 1-bit feature layer the learning layer needs",
                         hint="end the model with ReLU6 > [Flatten] > Linear, or compile without --learnable")
    return before[-1].name


def _ends_with_relu(lowered: LoweredModel) -> bool:
    """The model's output is a ReLU's: v1 requires every ReLU to have an output quantizer ("in AkidaVersion.v1,
    output_quantizer is mandatory"), which quantizeml gives a model's last layer only through last_output_bits."""

    import tf_keras

    return isinstance(lowered.keras_model.layers[-1], tf_keras.layers.ReLU)


def output_scale(quantized: Any) -> float:
    """The float value of one level of the model's last output quantizer (a ReLU's): 2 ** -frac_bits.

    akida's ``predict`` refuses a model whose last layer has an activation ("Only models whose last layer has
    no activation can be evaluated"); its ``forward`` returns the activation levels, which times this scale
    are the quantized Keras model's outputs."""

    last = [layer for layer in quantized.layers if getattr(layer, "out_quantizer", None) is not None][-1]
    return float(2.0 ** -float(np.asarray(last.out_quantizer.frac_bits).reshape(-1)[0]))


def check_fully_quantized(quantized: Any, lowered: LoweredModel, messages: list[str]) -> None:
    """One Dequantizer, at the very end: quantizeml inserts one before each layer it could not quantize."""

    from quantizeml.layers import Dequantizer

    inner = [layer.name for layer in quantized.layers[:-1] if isinstance(layer, Dequantizer)]
    if not inner and isinstance(quantized.layers[-1], Dequantizer):
        return
    text = " ".join([*messages, *inner])
    nodes = lowered.nodes_named_in(text)
    message = ("quantizeml left part of the model float (a Dequantizer before it), which no Akida v1 layer "
               f"can run: {'; '.join(messages) or ', '.join(inner)}")
    raise UnsupportedModelError(
        message,
        diagnostics=[Diagnostic(Level.ERROR, "AK1302", message, nodes=nodes, rule="akida-v1-quantizable")],
        hint="run `qanac lint MODEL --target akida --device AKD1000` for the v1 rules",
    )


def check_v1_model(akida_model: Any, akida_shape: tuple[int, ...], float_shape: tuple[int, ...]) -> None:
    ip_version = str(akida_model.ip_version).rsplit(".", 1)[-1]
    problem = None
    if ip_version != "v1":
        problem = f"cnn2snn built an Akida IP {ip_version} model, not v1"
    elif not output_shapes_match(akida_shape, float_shape):
        problem = (f"the Akida output (H, W, C) = {akida_shape} is not the float output {tuple(float_shape)}: the "
                   "conversion changed or dropped part of the graph")
    if problem is not None:
        raise UnsupportedModelError(
            problem, diagnostics=[Diagnostic(Level.ERROR, "AK1304", problem, rule="akida-v1-output")])


def _vendor_error(code: str, what: str, exc: Exception, lowered: LoweredModel) -> UnsupportedModelError:
    text = str(exc) or type(exc).__name__
    nodes = lowered.nodes_named_in(text)
    hint = next((h for key, h in _HINTS if key in text), "see docs/akida-v1.md for what Akida v1 runs")
    message = f"{what}: {text.strip()}"
    return UnsupportedModelError(
        message,
        diagnostics=[Diagnostic(Level.ERROR, code, message, nodes=nodes, rule="akida-v1-convertible", hint=hint)],
        hint=hint,
    )


@contextlib.contextmanager
def _vendor_messages():
    """Collect MetaTF's user warnings (quantizeml, cnn2snn, akida) and silence its printing; re-raise the rest."""

    messages: list[str] = []
    with warnings.catch_warnings(record=True) as records, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        yield messages
    for record in records:
        vendor = patterns.from_vendor(record)
        if vendor and issubclass(record.category, UserWarning):
            messages.append(str(record.message))
        elif not vendor:
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
