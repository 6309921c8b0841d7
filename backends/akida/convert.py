"""Float ONNX -> quantizeml quantized ONNX -> cnn2snn -> akida.Model, never silently truncated.

MetaTF's own tools only *warn* when part of a graph has no Akida equivalent: ``quantizeml.models.quantize``
returns a hybrid graph ("The following nodes were not quantized ...") and ``cnn2snn.convert`` then stops
at the first float node ("Conversion stops at node X because of a dequantizer") and returns a model
truncated before it, with the wrong output. Here every such case is an ``UnsupportedModelError`` naming
the node, its op type and why, and three invariants are checked after conversion:

1. every node of the quantized graph is in the ``com.brainchip`` domain;
2. cnn2snn emitted no "Conversion stops" warning;
3. the Akida model's output shape equals the float model's output (excluding batch), Akida's (H, W, C)
   read as the float model's (C, H, W), its squeezed form, or its NCHW flattening.

Calibration samples (what quantizeml wants): ``quantize(model, qparams, samples=X)`` takes ONE float32
array shaped like the model input, batch first (NCHW for an image model), holding the *model-ready*
data, i.e. ``CalibrationData.arrays`` after preprocessing, not raw uint8 images: quantizeml runs the float
model on it with ONNX Runtime and records per-channel min/max of every tensor it quantizes. When
``samples`` is given its ``num_samples`` argument is ignored, so the sample count is applied by slicing.
Only single-input models are accepted.

Input dtype (``QuantizationParams.input_dtype``) is the type the InputQuantizer produces, i.e. what the
first Akida layer receives; the Akida model still takes float input and quantizes it in software.
A model whose own input is uint8 or int8 (BrainChip's zoo as shipped) keeps that type, as MetaTF does:
it calibrates on integer samples of that dtype, and its InputQuantizer is the identity (the input range
pinned to the dtype's, scale 1 and zero point 0, ``integer_input_range``), so the first Akida layer
receives the model's integers unchanged.
``uint8`` is asymmetric (scale 255 / (max - min), zero point from the calibrated minimum, per channel):
for inputs in [0, 1] calibrated on full-range images this is exactly the raw image bytes. ``int8`` is
symmetric without zero point. quantizeml builds a first Gemm or a first depthwise Conv only on int8
input (with uint8 it fails on a bare AssertionError), while a first standard Conv (Akida's InputConv2D,
the image front end) takes both. ``choose_input_dtype`` therefore picks uint8 when the model starts with
a standard Conv and int8 otherwise.

Diagnostic codes (stable):
    AKC101  a node quantizeml could not quantize although its inputs were quantized (a root cause)
    AKC102  a node that has no Akida equivalent, downstream of a root cause
    AKC103  nodes left unquantized only because an input comes from an unquantized node
    AKC110  cnn2snn stopped the conversion at a node (a guard; AKC101 normally fires first)
    AKC111  cnn2snn rejected a layer's parameters (stride, padding, kernel size, pooling)
    AKC112  no quantizable pattern starts at the model input
    AKC113  the first layer cannot take the chosen input type (Gemm or depthwise Conv on uint8)
    AKC114  the model has other than one input and one output, or the input has several consumers
    AKC115  the input's first dimension is fixed at more than 1: not a batch of samples (a model that folds
            the batch into another axis, MobileViT's patches), while an Akida model maps one sample at a time
    AKC116  quantizeml's sanitizer would add more than ``patterns.SANITIZER_GROWTH_BUDGET_BYTES`` to the model
            (a dense concatenation, say): refused before quantizing, naming the nodes that add the most
    AKC120  the Akida output shape differs from the float model's
    AKC190  quantizeml or cnn2snn failed in a way qanac does not recognise (its message is kept)
    AKC199  a warning from quantizeml or cnn2snn that does not change the model (kept as a diagnostic)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import re
import time
import traceback
import warnings
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qanac import memory
from qanac.backends.akida import patterns
from qanac.backends.akida.patterns import BRAINCHIP_DOMAIN
from qanac.backends.akida.tensorflow_import import import_tensorflow_quietly
from qanac.calibration import CalibrationData
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError, UsageError
from qanac.execution import run_onnx

DEFAULT_NUM_SAMPLES = 1024  # quantizeml's own default
CALIBRATION_BATCH = 32

_CONVERSION_HINTS: tuple[tuple[str, str], ...] = (
    (
        "can't perform a Global Average Pooling",
        "Akida's input layer (InputConv2D, on the HRC) cannot fuse a GlobalAveragePool: add a second Conv "
        "between the first Conv and the pooling",
    ),
    (
        "Stride 2 is only supported with kernel size 1 or 3",
        "use a 3x3 or 1x1 kernel for stride-2 convolutions (or stride 1 followed by a fused MaxPool)",
    ),
    (
        "'SameUpper' padding mode is only supported",
        "strided convolutions with 'same' padding must use a 3x3 kernel; use 3x3, or pads of 0 (VALID)",
    ),
    (
        "MaxPool is not supported with 'SameUpper'",
        "use a MaxPool without padding (e.g. kernel 2, stride 2) after the Conv",
    ),
    ("Kernel size must be odd", "use odd kernel sizes (1, 3, 5, 7)"),
    (
        "maxpool",
        "Akida pads a fused MaxPool only at the bottom/right (TensorFlow 'SAME'); PyTorch's symmetric "
        "MaxPool2d(3, 2, 1) padding is rejected: use MaxPool2d(2, 2) or kernel 3 without padding",
    ),
)


@dataclasses.dataclass
class AkidaConversion:
    """The result of ``compile_onnx``: the quantized ONNX, the Akida model and what was learnt on the way.

    ``float_output_shape`` excludes the batch and is in the float model's layout; ``akida_output_shape``
    is Akida's (H, W, C).
    """

    quantized: onnx.ModelProto
    akida_model: Any
    input_name: str
    output_name: str
    input_dtype: str
    num_samples: int
    float_output_shape: tuple[int, ...]
    akida_output_shape: tuple[int, ...]
    seconds: dict[str, float]
    diagnostics: list[Diagnostic]

    def describe(self) -> dict[str, Any]:
        return {
            "input_name": self.input_name,
            "output_name": self.output_name,
            "input_dtype": self.input_dtype,
            "num_samples": self.num_samples,
            "output_shape": list(self.float_output_shape),
            "akida_output_shape": list(self.akida_output_shape),
        }


def compile_onnx(
    model: onnx.ModelProto,
    calibration: CalibrationData,
    num_samples: int | None = None,
    input_dtype: str | None = None,
) -> AkidaConversion:
    """Quantize ``model`` (never mutated) on ``calibration`` and convert it to an Akida IP v2 model.

    Raises UnsupportedModelError, naming nodes, for anything that Akida cannot run as a whole.
    """

    input_name, output_name = check_single_io(model)
    check_batch_dimension(model)
    check_sanitizer_cost(model)
    samples = calibration_samples(model, calibration, num_samples)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    float_output = run_onnx(model, {input_name: samples[:1]})[0]
    float_output_shape = tuple(int(d) for d in float_output.shape[1:])
    seconds["float_reference"] = time.perf_counter() - started

    dtype = input_dtype or choose_input_dtype(model)
    if dtype not in ("uint8", "int8"):
        raise UsageError(f"input_dtype must be 'uint8' or 'int8', not '{dtype}'")

    started = time.perf_counter()
    quantized, diagnostics, failed_blocks = quantize_onnx(model, samples, dtype)
    seconds["quantize"] = time.perf_counter() - started
    check_fully_quantized(quantized, failed_blocks)

    started = time.perf_counter()
    akida_model, convert_diagnostics = convert_to_akida(quantized, model)
    seconds["convert"] = time.perf_counter() - started
    diagnostics.extend(convert_diagnostics)

    akida_output_shape = tuple(int(d) for d in akida_model.output_shape)
    check_output_shape(akida_output_shape, float_output_shape)
    return AkidaConversion(
        quantized=quantized,
        akida_model=akida_model,
        input_name=input_name,
        output_name=output_name,
        input_dtype=dtype,
        num_samples=len(samples),
        float_output_shape=float_output_shape,
        akida_output_shape=akida_output_shape,
        seconds=seconds,
        diagnostics=diagnostics,
    )


def check_single_io(model: onnx.ModelProto) -> tuple[str, str]:
    """The names of the model's only input and only output; anything else cannot become an Akida model."""

    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    outputs = [o.name for o in model.graph.output]
    if len(inputs) != 1 or len(outputs) != 1:
        raise UnsupportedModelError(
            f"an Akida model has exactly one input and one output; this model has inputs {inputs} "
            f"and outputs {outputs}",
            diagnostics=[
                Diagnostic(Level.ERROR, "AKC114", "Akida models have one input and one output", rule="akida-io")
            ],
            hint="split the model, or keep one output",
        )
    return inputs[0], outputs[0]


def check_batch_dimension(model: onnx.ModelProto) -> None:
    """The input's first dimension must be the batch: symbolic, or 1. A fixed larger one means the model
    folded its batch into it (MobileViT reshapes (N, C, H, W) patches into (N * 4, ...)): each row is part
    of a sample, not a sample, and no Akida model takes it. Refused naming no node (the whole segment)."""

    input_name, _ = check_single_io(model)
    spec = next(i for i in model.graph.input if i.name == input_name)
    dims = spec.type.tensor_type.shape.dim
    first = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 0
    if first > 1:
        message = (f"input '{input_name}' has a fixed first dimension of {first}: the batch is folded into it, "
                   "while an Akida model takes one sample per row")
        raise UnsupportedModelError(message, diagnostics=[Diagnostic(Level.ERROR, "AKC115", message,
                                                                     rule="akida-io")],
                                    hint="these nodes run on the host")


def check_sanitizer_cost(model: onnx.ModelProto) -> None:
    """quantizeml's ``quantize()`` sanitizes the model first, at a cost that grows with the size of what the
    sanitizer makes of it (``patterns.sanitizer_growth``). A model to which it would add more than
    ``patterns.SANITIZER_GROWTH_BUDGET_BYTES`` is refused before quantizing, naming the nodes that add the
    most (largest first, until the rest adds at most the budget): partitioning runs them on the host and
    compiles the parts between them."""

    growth = patterns.sanitizer_growth(model)
    budget = patterns.SANITIZER_GROWTH_BUDGET_BYTES
    if growth.identity_bytes <= budget:
        return
    nodes = growth.largest_within(budget)
    message = (f"quantizeml's sanitizer would add {growth.describe()}, over the {budget / 2**20:.0f} MB "
               f"budget of a quantization; the {len(nodes)} node(s) that add the most cannot stay on Akida")
    raise UnsupportedModelError(
        message,
        diagnostics=[Diagnostic(Level.ERROR, "AKC116", message, nodes=nodes, rule="akida-quantization-cost")],
        hint="these nodes run on the host (each Concat or Add that is not read by a Conv gets a C x C identity "
             "convolution from the sanitizer)",
    )


def calibration_samples(
    model: onnx.ModelProto, calibration: CalibrationData, num_samples: int | None = None
) -> np.ndarray:
    """The float32 model-ready array quantizeml calibrates on: the first ``num_samples`` of the input's data."""

    input_name, _ = check_single_io(model)
    if input_name not in calibration.arrays:
        raise UsageError(
            f"calibration data has no array for input '{input_name}' (it has {sorted(calibration.arrays)})"
        )
    samples = calibration.arrays[input_name]
    if len(samples) == 0:
        raise UsageError("the calibration data holds no samples")
    limit = DEFAULT_NUM_SAMPLES if num_samples is None else int(num_samples)
    if limit < 1:
        raise UsageError(f"num_samples must be at least 1, not {num_samples}")
    return np.ascontiguousarray(samples[:limit], dtype=integer_input_dtype(model) or np.float32)


def integer_input_dtype(model: onnx.ModelProto) -> np.dtype | None:
    """uint8 or int8 when the model's (single) input has that type, else None."""

    input_name, _ = check_single_io(model)
    spec = next(i for i in model.graph.input if i.name == input_name)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)
    return dtype if dtype in (np.uint8, np.int8) else None


# the calibrated range of an integer model input that makes quantizeml's InputQuantizer the identity:
# uint8 [0, 255] gives scale 255 / 255 and zero point 0; int8 [-127, 127] gives scale 127 / 127
_IDENTITY_RANGE = {np.dtype(np.uint8): (0.0, 255.0), np.dtype(np.int8): (-127.0, 127.0)}


@contextlib.contextmanager
def integer_input_range(dtype: np.dtype | None):
    """While active, quantizeml's calibration of a model with an integer input of ``dtype`` records the
    dtype's range for the input and the Cast/Transpose chain that reads it (what its InputQuantizer is
    built from), so the quantizer passes the integers through unchanged. No effect for ``dtype`` None."""

    if dtype is None:
        yield
        return
    quantize_module = importlib.import_module("quantizeml.onnx_support.quantization.quantize")  # the module
    calibrate = quantize_module.calibrate
    low, high = _IDENTITY_RANGE[np.dtype(dtype)]

    def pinned(model, *args, **kwargs):
        ranges = calibrate(model, *args, **kwargs)
        for name in _input_chain(model):
            if name in ranges:
                found = ranges[name]
                ranges[name] = type(found)(lowest=np.full_like(found.lowest, low),
                                           highest=np.full_like(found.highest, high))
        return ranges

    quantize_module.calibrate = pinned
    try:
        yield
    finally:
        quantize_module.calibrate = calibrate


def _input_chain(model: onnx.ModelProto) -> list[str]:
    """The graph input and the outputs of the Cast/Transpose nodes that follow it one reader at a time."""

    names = [model.graph.input[0].name]
    while True:
        readers = [n for n in model.graph.node if names[-1] in n.input]
        if len(readers) != 1 or readers[0].op_type not in ("Cast", "Transpose"):
            return names
        names.append(readers[0].output[0])


def first_layer(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The model's first Akida layer (``patterns.input_layer``), or None when the input feeds several nodes."""

    node = patterns.input_layer(gs.import_onnx(model))
    return None if node is None else _node_by_name(model, node.name)


def is_depthwise(node: onnx.NodeProto, model: onnx.ModelProto) -> bool:
    group = _attribute(node, "group", 1)
    if node.op_type != "Conv" or group == 1:
        return False
    weights = {i.name: i for i in model.graph.initializer}.get(node.input[1])
    return weights is not None and weights.dims[0] == group and weights.dims[1] == 1


def choose_input_dtype(model: onnx.ModelProto) -> str:
    """The model input's own type when it is uint8 or int8; else uint8 when the model starts with a
    standard Conv (Akida's InputConv2D), int8 otherwise."""

    own = integer_input_dtype(model)
    if own is not None:
        return np.dtype(own).name
    node = first_layer(model)
    if node is not None and node.op_type == "Conv" and _attribute(node, "group", 1) == 1:
        return "uint8"
    return "int8"


def quantize_onnx(
    model: onnx.ModelProto, samples: np.ndarray, input_dtype: str
) -> tuple[onnx.ModelProto, list[Diagnostic], dict[str, str]]:
    """Quantize ``model`` (never mutated) with quantizeml, as its ``quantize()`` does: sanitize (reusing
    lint's sanitize of the same model, ``patterns.sanitized_with_warnings``), calibrate on ``samples``,
    then ``quantize_calibrated``.

    Returns the quantized model, the warnings that do not change it (AKC199), and, per node name, the
    reasons quantizeml gave for blocks it matched but could not build ("Impossible to quantize ...").
    Errors quantizeml raises become UnsupportedModelError naming the node they concern.
    """

    import_tensorflow_quietly()
    from quantizeml.models import QuantizationParams
    from quantizeml.onnx_support.quantization.model import ONNXModel

    quantize_module = importlib.import_module("quantizeml.onnx_support.quantization.quantize")  # the module
    qparams = QuantizationParams(input_dtype=input_dtype)
    try:
        with _captured_warnings() as caught, contextlib.redirect_stdout(io.StringIO()), \
                integer_input_range(integer_input_dtype(model)), memory.collecting_discarded_copies():
            sanitized, sanitizer_warnings = patterns.sanitized_with_warnings(model, _sample_shape(model, samples))
            onnx_model = ONNXModel(sanitized)
            ranges = quantize_module.calibrate(onnx_model.model, samples, len(samples),
                                               min(len(samples), CALIBRATION_BATCH),
                                               per_tensor_activations=qparams.per_tensor_activations)
            with quantize_module.quantization(qparams):
                quantized = quantize_module.quantize_calibrated(onnx_model, ranges).model
    except UnsupportedModelError:
        raise
    except Exception as exc:
        raise _quantize_error(exc, model, input_dtype) from exc

    diagnostics: list[Diagnostic] = []
    failed_blocks: dict[str, str] = {}
    for message in [*sanitizer_warnings, *caught]:
        if message.startswith("The following nodes were not quantized"):
            continue  # the graph itself says which nodes; check_fully_quantized reports them
        if message.startswith("Impossible to quantize"):
            name, reason = _parse_impossible_block(message)
            if name:
                failed_blocks[name] = reason
                continue
        diagnostics.append(Diagnostic(Level.WARNING, "AKC199", f"quantizeml: {message}"))
    return quantized, diagnostics, failed_blocks


def _sample_shape(model: onnx.ModelProto, samples: np.ndarray) -> tuple[int, ...]:
    """The input shape quantizeml's ``set_model_shape`` gives ``model`` for ``samples``: theirs without the
    batch, with a time dimension of 1 added for a 5-D input calibrated on 4-D samples."""

    shape = list(samples.shape[1:])
    input_name, _ = check_single_io(model)
    rank = next(len(i.type.tensor_type.shape.dim) for i in model.graph.input if i.name == input_name)
    if rank == 5 and len(shape) == 3:
        shape.insert(1, 1)
    return tuple(shape)


def check_fully_quantized(quantized: onnx.ModelProto, failed_blocks: dict[str, str] | None = None) -> None:
    """Every node must be in the com.brainchip domain; otherwise name the nodes and why, root causes first."""

    leftover = [n for n in quantized.graph.node if n.domain != BRAINCHIP_DOMAIN]
    if not leftover:
        return
    failed_blocks = failed_blocks or {}
    quantized_outputs = {o for n in quantized.graph.node if n.domain == BRAINCHIP_DOMAIN for o in n.output}
    constants = _constant_values(quantized)
    graph_inputs = {i.name for i in quantized.graph.input}

    roots, intrinsic, downstream = [], [], []
    reasons: dict[str, tuple[str, str]] = {}
    for node in leftover:
        activations = [i for i in node.input if i and i not in constants]
        refusal = _refusal(node, constants)
        reason, hint = (refusal.reason, refusal.hint) if refusal is not None else ("", "")
        if node.name in failed_blocks:
            reason = f"{reason}; quantizeml: {failed_blocks[node.name]}" if reason else failed_blocks[node.name]
        reasons[node.name] = (reason, hint)
        if all(i in quantized_outputs or i in graph_inputs for i in activations):
            roots.append(node)
        elif (refusal is not None and patterns.is_intrinsic(refusal, node.op_type, node.domain)) \
                or node.name in failed_blocks:
            intrinsic.append(node)
        else:
            downstream.append(node)

    diagnostics = []
    for code, nodes in (("AKC101", roots), ("AKC102", intrinsic)):
        for node in nodes:
            reason, hint = reasons[node.name]
            reason = reason or "no quantizeml pattern starts here"
            diagnostics.append(
                Diagnostic(
                    Level.ERROR,
                    code,
                    f"{node.op_type} node cannot be quantized for Akida: {reason}",
                    nodes=[node.name],
                    rule="akida-quantizable",
                    hint=hint,
                )
            )
    if downstream:
        diagnostics.append(
            Diagnostic(
                Level.ERROR,
                "AKC103",
                f"{len(downstream)} node(s) left unquantized because an input comes from an unquantized node",
                nodes=[n.name for n in downstream],
                rule="akida-quantizable",
            )
        )
    first = (roots or intrinsic or downstream)[0]
    reason, hint = reasons[first.name]
    raise UnsupportedModelError(
        f"{len(leftover)} node(s) cannot be quantized for Akida, so cnn2snn would silently truncate the "
        f"model before them; the first is '{first.name}' ({first.op_type}): "
        f"{reason or 'no quantizeml pattern starts at this node'}",
        diagnostics=diagnostics,
        hint=hint or "rewrite the node into a pattern of quantizeml's PATTERNS_MAP (register_patterns.py)",
    )


def convert_to_akida(
    quantized: onnx.ModelProto, float_model: onnx.ModelProto | None = None
) -> tuple[Any, list[Diagnostic]]:
    """cnn2snn.convert with its "Conversion stops" warning and its errors turned into UnsupportedModelError."""

    import_tensorflow_quietly()
    import cnn2snn

    try:
        with _captured_warnings() as caught, contextlib.redirect_stdout(io.StringIO()):
            akida_model = cnn2snn.convert(quantized)
    except Exception as exc:
        raise _conversion_error(exc, quantized, float_model) from exc
    diagnostics = []
    for message in caught:
        stop = re.search(r"Conversion stops\s+at node (\S+)", message)
        if stop:
            name = stop.group(1)
            node = _node_by_name(quantized, name)
            op_type = node.op_type if node is not None else "?"
            raise UnsupportedModelError(
                f"cnn2snn stops the conversion at node '{name}' ({op_type}) and drops the rest of the graph",
                diagnostics=[
                    Diagnostic(
                        Level.ERROR,
                        "AKC110",
                        f"conversion stops at {op_type} node: the graph after it would be dropped",
                        nodes=[name],
                        rule="akida-convertible",
                    )
                ],
                hint="make the node quantizable (see the AKC101 rules) so the whole graph converts",
            )
        diagnostics.append(Diagnostic(Level.WARNING, "AKC199", f"cnn2snn: {message}"))
    return akida_model, diagnostics


def check_output_shape(akida_shape: tuple[int, ...], float_shape: tuple[int, ...]) -> None:
    """Akida's (H, W, C) must be the float output's (C, H, W), its squeezed form, or its NCHW flattening."""

    if output_shapes_match(akida_shape, float_shape):
        return
    raise UnsupportedModelError(
        f"the Akida model's output shape (H, W, C) = {tuple(akida_shape)} does not match the float model's "
        f"output (N, {', '.join(map(str, float_shape))}): the conversion changed or dropped part of the graph",
        diagnostics=[
            Diagnostic(
                Level.ERROR,
                "AKC120",
                f"Akida output {tuple(akida_shape)} (HWC) != float output {tuple(float_shape)}",
                rule="akida-output-shape",
            )
        ],
    )


def output_shapes_match(akida_shape: tuple[int, ...], float_shape: tuple[int, ...]) -> bool:
    if len(akida_shape) != 3:
        return tuple(akida_shape) == tuple(float_shape)
    height, width, channels = akida_shape
    chw = (channels, height, width)
    if tuple(float_shape) == chw:
        return True
    if int(np.prod(float_shape)) != channels * height * width:
        return False
    squeezed = tuple(d for d in float_shape if d != 1)
    return squeezed == tuple(d for d in chw if d != 1) or tuple(float_shape) == (channels * height * width,)


def akida_to_float_layout(outputs: np.ndarray, float_shape: tuple[int, ...]) -> np.ndarray:
    """Akida's (N, H, W, C) outputs in the float model's layout: (N, C, H, W), squeezed or NCHW-flattened."""

    if outputs.ndim == 4:
        outputs = outputs.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(outputs.reshape(len(outputs), *float_shape), dtype=np.float32)


# -- error translation --------------------------------------------------------------------------------


def _quantize_error(exc: Exception, model: onnx.ModelProto, input_dtype: str) -> Exception:
    text = str(exc)
    node = first_layer(model)
    where = [node.name] if node is not None else []
    label = f"'{node.name}' ({node.op_type})" if node is not None else "the first node"
    if "No quantizable pattern found" in text:
        return UnsupportedModelError(
            f"no Akida pattern starts at the model input: its first layer {label} cannot begin an Akida model "
            "(quantizeml: No quantizable pattern found)",
            diagnostics=[
                Diagnostic(
                    Level.ERROR,
                    "AKC112",
                    "no quantizable pattern starts at the model input",
                    nodes=where,
                    rule="akida-input-layer",
                    hint="an Akida model starts with a Conv (optionally after Sub/Div normalisation) or a Gemm",
                )
            ],
            hint="write input normalisation as Sub/Div (folded exactly into the first Conv) or fold an input "
            "BatchNormalization into the first Conv",
        )
    if "single input" in text or "exactly one consumer" in text:
        return UnsupportedModelError(
            f"quantizeml: {text}",
            diagnostics=[Diagnostic(Level.ERROR, "AKC114", text, nodes=where, rule="akida-io")],
            hint="the model input must feed exactly one node",
        )
    if "Requantizing a model is not supported" in text:
        return UsageError("the model is already quantized by quantizeml", hint="compile the float model")
    if isinstance(exc, AssertionError) and node is not None:
        first_gemm = node.op_type in ("Gemm", "MatMul")
        if input_dtype == "uint8" and (first_gemm or is_depthwise(node, model)):
            kind = "Gemm (fully connected)" if first_gemm else "depthwise Conv"
            return UnsupportedModelError(
                f"the first layer {label} is a {kind}, which quantizeml builds only on int8 input, but "
                "input_dtype is uint8 (quantizeml fails with a bare AssertionError)",
                diagnostics=[
                    Diagnostic(
                        Level.ERROR,
                        "AKC113",
                        f"a first-layer {kind} needs input_dtype int8",
                        nodes=[node.name],
                        rule="akida-input-layer",
                    )
                ],
                hint="set the input_dtype option to int8 (the default for such models), or start the model "
                "with a standard Conv",
            )
    return UnsupportedModelError(
        f"quantizeml failed: {_describe_exception(exc)}",
        diagnostics=[Diagnostic(Level.ERROR, "AKC190", f"quantizeml: {_describe_exception(exc)}", rule="akida")],
    )


def _conversion_error(exc: Exception, quantized: onnx.ModelProto, float_model: onnx.ModelProto | None) -> Exception:
    text = str(exc)
    match = re.match(r"Cannot convert (\S+?): (.*)", text, re.S)
    if match is None:
        return UnsupportedModelError(
            f"cnn2snn failed: {_describe_exception(exc)}",
            diagnostics=[Diagnostic(Level.ERROR, "AKC190", f"cnn2snn: {_describe_exception(exc)}", rule="akida")],
        )
    name, detail = match.group(1), match.group(2).strip()
    qnode = _node_by_name(quantized, name)
    fnode = _node_by_name(float_model, name) if float_model is not None else None
    op_type = fnode.op_type if fnode is not None else (qnode.op_type if qnode is not None else "?")
    akida_layer = f" (quantized as {qnode.op_type})" if qnode is not None else ""
    hint = next((h for key, h in _CONVERSION_HINTS if key in detail), "")
    return UnsupportedModelError(
        f"cnn2snn cannot convert node '{name}' ({op_type}){akida_layer}: {detail}",
        diagnostics=[
            Diagnostic(
                Level.ERROR, "AKC111", f"{op_type} node rejected by cnn2snn: {detail}", nodes=[name],
                rule="akida-convertible", hint=hint,
            )
        ],
        hint=hint,
    )


def _refusal(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> patterns.Refusal | None:
    """qanac's table's reason why quantizeml left ``node`` unquantized (None: only its inputs are to blame)."""

    return patterns.refusal(patterns.NodeFacts.of_proto(node, constants))


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def _parse_impossible_block(message: str) -> tuple[str | None, str]:
    name = re.search(r'^name: "([^"]*)"', message, re.M)
    traces = re.findall(r"^\t\* (.*)$", message, re.M)
    useful = [t for t in traces if "it is handled by the Conv layer" not in t] or traces
    return (name.group(1) if name else None), "; ".join(useful)


def _node_by_name(model: onnx.ModelProto | None, name: str) -> onnx.NodeProto | None:
    if model is None:
        return None
    return next((n for n in model.graph.node if n.name == name), None)


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _describe_exception(exc: Exception) -> str:
    text = str(exc)
    if text:
        return f"{type(exc).__name__}: {text}"
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno} ({frame.line})" if frame else ""
    return f"bare {type(exc).__name__}{where}"


@contextlib.contextmanager
def _captured_warnings():
    """Collect the messages of warnings raised by MetaTF (quantizeml, cnn2snn, akida), let others through."""

    messages: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield messages
    for record in records:
        if patterns.from_vendor(record):
            messages.append(str(record.message))
        else:
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
