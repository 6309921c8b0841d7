"""Lower a legalized float ONNX graph to an equivalent tf_keras model (NHWC), the form Akida IP v1 starts from.

cnn2snn reaches IP v1 only from a tf_keras model quantized by quantizeml (its ONNX path is IP v2 only), so the
v1 backend rewrites the ONNX graph it receives as Keras layers, one layer per ONNX node except where noted:

    Sub/Div/Mul/Add by constants on the input   Rescaling(scale, offset), per channel or scalar
    Conv (group 1)                              Conv2D
    depthwise Conv read only by a 1x1 Conv      SeparableConv2D (both nodes; the depthwise bias folded into
                                                the pointwise bias: W_pw (W_dw x + b_dw) + b = W_pw W_dw x + b')
    other depthwise Conv                        DepthwiseConv2D (IP v1 has none: conversion refuses it)
    Relu, Clip(0, b)                            ReLU(), ReLU(max_value=b)
    MaxPool                                     MaxPool2D
    GlobalAveragePool                           GlobalAveragePooling2D (2-D output: (N, C) for ONNX (N, C, 1, 1))
    Flatten, Reshape to (N, -1)                 Flatten
    Gemm, MatMul by a constant                  Dense (rows reordered when the input was flattened from a map)
    Identity, Dropout, identity 1x1 Conv        nothing (``is_identity_conv``)

Invariants: the Keras model takes the ONNX input in NHWC (a 2-D input stays 2-D) and returns the ONNX output
(an NCHW map as NHWC); on the same data ``keras(to_nhwc(x))`` equals ``onnxruntime(x)`` up to float rounding
(tests/akida/test_v1_lowering.py). Convolution and pooling padding becomes 'valid' (no pads) or 'same'
(TensorFlow's: pads ``total // 2`` at the start and the rest at the end, ``total = max((ceil(n/s) - 1) * s + k
- n, 0)``); any other padding, and every op outside the table, raises UnsupportedModelError naming the node,
before TensorFlow is touched for building. Keras layer names are the ONNX node names made valid; the lowered
model keeps which ONNX nodes each layer computes (``LoweredModel.layer_nodes``) so later errors name nodes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qanac.backends.akida.tensorflow_import import import_tensorflow_quietly
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError
from qanac.graph import constant_value

AFFINE_OPS = ("Sub", "Div", "Mul", "Add")
PASS_THROUGH_OPS = ("Identity", "Dropout")
LOWERED_OPS = ("Conv", "Relu", "Clip", "MaxPool", "GlobalAveragePool", "Flatten", "Reshape", "Gemm", "MatMul",
               *AFFINE_OPS, *PASS_THROUGH_OPS)

# How a Keras tensor holds the ONNX tensor it stands for.
MAP = "map"  # ONNX (N, C, H, W) as Keras (N, H, W, C)
VECTOR = "vector"  # ONNX (N, F) or (N, C, 1, 1) as Keras (N, F)
FLAT_HWC = "flat-hwc"  # ONNX Flatten of (N, C, H, W), held as Keras Flatten of NHWC: features in H, W, C order


@dataclasses.dataclass
class LoweredModel:
    """A tf_keras model equivalent to an ONNX graph, and how its layers relate to the ONNX nodes."""

    keras_model: Any
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]  # ONNX input shape without the batch, e.g. (C, H, W)
    output_shape: tuple[int, ...]  # ONNX output shape without the batch
    layer_nodes: dict[str, list[str]]  # Keras layer name -> the ONNX nodes it computes
    rewrites: list[dict[str, Any]]  # where the Keras model is not one layer per node (separable fusions)

    def nodes_named_in(self, text: str) -> list[str]:
        """The ONNX nodes of every Keras layer whose name appears in ``text`` (an error message)."""

        found = [name for name in self.layer_nodes if re.search(rf"(?<![\w.\-]){re.escape(name)}(?![\w.\-])", text)]
        return [node for name in found for node in self.layer_nodes[name]]


def to_nhwc(array: np.ndarray) -> np.ndarray:
    """An NCHW batch as NHWC (what the lowered model takes); other ranks unchanged."""

    return np.ascontiguousarray(array.transpose(0, 2, 3, 1) if array.ndim == 4 else array)


def from_nhwc(array: np.ndarray, onnx_shape: tuple[int, ...]) -> np.ndarray:
    """A Keras or Akida output batch (NHWC, or 2-D) in the ONNX output's layout ``(N, *onnx_shape)``."""

    if array.ndim == 4:
        array = array.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(array.reshape(len(array), *onnx_shape), dtype=np.float32)


def lower_to_keras(model: onnx.ModelProto) -> LoweredModel:
    """The tf_keras model computing what ``model`` computes (see the module docstring); never mutates ``model``."""

    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    graph.toposort()
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise _refusal(
            [], f"an Akida model has one input and one output; this graph has {len(graph.inputs)} input(s) "
            f"and {len(graph.outputs)} output(s)")
    plan = _plan(graph)
    import_tensorflow_quietly()
    return _build(graph, plan)


# -- planning: every decision about the graph, without TensorFlow -------------------------------------------


@dataclasses.dataclass
class _Step:
    kind: str  # rescaling | conv | depthwise | separable | relu | maxpool | gap | flatten | dense | skip
    nodes: list[gs.Node]
    source: gs.Tensor  # the ONNX tensor the step reads
    result: gs.Tensor  # the ONNX tensor it writes
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


def _plan(graph: gs.Graph) -> list[_Step]:
    tensor_input = graph.inputs[0]
    rank = len(tensor_input.shape or ())
    if rank not in (2, 4) or not all(isinstance(d, int) for d in tensor_input.shape[1:]):
        raise _refusal([], f"the input '{tensor_input.name}' has shape {tensor_input.shape}; Akida takes an "
                           "(N, C, H, W) image or an (N, F) vector with fixed sizes")
    kinds = {tensor_input.name: MAP if rank == 4 else VECTOR}
    chw: dict[str, tuple[int, int, int]] = {}  # FLAT_HWC tensors: the (C, H, W) they were flattened from
    affine: dict[str, tuple[np.ndarray, np.ndarray]] = {tensor_input.name: _identity_affine(tensor_input)}
    affine_nodes: dict[str, list[gs.Node]] = {tensor_input.name: []}  # the Sub/Div/Mul/Add nodes composed
    steps: list[_Step] = []
    fused: set[str] = set()
    conv_padding: dict[str, str] = {}  # a convolution's output (and its ReLU's): its Keras padding
    bounded: dict[str, float] = {}  # the output of a bounded ReLU (and of max pooling of one): the bound
    for node in graph.nodes:
        if node.name in fused:
            continue
        if node.op == "Constant":
            continue
        if node.op not in LOWERED_OPS:
            raise _refusal([node], _unsupported_reason(node))
        inputs = [t for t in node.inputs if t.name and constant_value(t) is None]
        if len(inputs) != 1:
            raise _refusal([node], f"{node.op} '{node.name}' reads {len(inputs)} computed tensors; Akida IP v1 "
                                   "runs sequential models only (every layer reads one layer)")
        source, result = inputs[0], node.outputs[0]
        kind = kinds.get(source.name)
        if kind is None:
            raise _refusal([node], f"{node.op} '{node.name}' reads '{source.name}', which nothing lowered wrote")

        if node.op in AFFINE_OPS:
            if source.name not in affine:
                raise _refusal([node], f"{node.op} '{node.name}' by a constant inside the graph: only the input "
                                       "normalisation (Sub/Div/Mul/Add by constants on the model input) has a "
                                       "Keras form quantizeml folds (Rescaling)")
            affine[result.name] = _compose_affine(node, affine[source.name], source, kind)
            affine_nodes[result.name] = [*affine_nodes[source.name], node]
            kinds[result.name] = kind
            continue
        if source.name in affine and source is not tensor_input:
            scale, offset = affine[source.name]
            steps.append(_Step("rescaling", affine_nodes[source.name], tensor_input, source,
                               {"scale": scale, "offset": offset}))
        affine.pop(source.name, None)

        if node.op in PASS_THROUGH_OPS or (is_identity_conv(node) and kind == MAP):
            steps.append(_Step("skip", [node], source, result,
                               {"rewrite": "drop-identity-conv"} if node.op == "Conv" else {}))
            kinds[result.name] = kind
            if kind == FLAT_HWC:
                chw[result.name] = chw[source.name]
            for facts in (bounded, conv_padding):
                if source.name in facts:
                    facts[result.name] = facts[source.name]
            continue
        if node.op == "GlobalAveragePool" and source.name in bounded:
            steps.extend(_pool_behind_identity_conv(node, source, result, bounded[source.name]))
            kinds[result.name] = VECTOR
            continue
        step = _plan_node(node, source, result, kind, chw, conv_padding, graph, fused)
        steps.append(step)
        if step.kind in ("conv", "depthwise", "separable"):
            conv_padding[step.result.name] = step.params["padding"]
        elif step.kind == "relu" and source.name in conv_padding:
            conv_padding[step.result.name] = conv_padding[source.name]
        if step.kind == "relu" and step.params["max_value"] is not None:
            bounded[step.result.name] = step.params["max_value"]
        elif step.kind == "maxpool" and source.name in bounded:
            bounded[step.result.name] = bounded[source.name]
        kinds[step.result.name] = step.params.pop("kind")
        if "chw" in step.params:
            chw[step.result.name] = step.params["chw"]

    output = graph.outputs[0]
    if kinds.get(output.name) == FLAT_HWC and any(d != 1 for d in chw[output.name][1:]):
        raise _refusal([output.inputs[0]] if output.inputs else [],
                       f"the model output '{output.name}' flattens a {chw[output.name]} map (C, H, W order); "
                       "the Keras model would flatten it in H, W, C order")
    if output.name in affine and output is not tensor_input:
        scale, offset = affine[output.name]
        steps.append(_Step("rescaling", affine_nodes[output.name], tensor_input, output,
                           {"scale": scale, "offset": offset}))
    return steps


def _plan_node(node: gs.Node, source: gs.Tensor, result: gs.Tensor, kind: str, chw: dict[str, tuple[int, int, int]],
               conv_padding: dict[str, str], graph: gs.Graph, fused: set[str]) -> _Step:
    op = node.op
    if op in ("Conv", "MaxPool", "GlobalAveragePool") and kind != MAP:
        raise _refusal([node], f"{op} '{node.name}' reads a {len(source.shape or ())}-D tensor, not an image map")
    if op == "Conv":
        return _plan_conv(node, source, result, graph, fused)
    if op == "Relu":
        return _Step("relu", [node], source, result, {"max_value": None, "kind": kind})
    if op == "Clip":
        low = _optional_constant(node, 1) if "min" not in node.attrs else np.float32(node.attrs["min"])
        high = _optional_constant(node, 2) if "max" not in node.attrs else np.float32(node.attrs["max"])
        if low is None or float(low) != 0.0:
            shown = "none" if low is None else f"{float(low):g}"
            raise _refusal([node], f"Clip '{node.name}' with min {shown}: Akida has ReLUs with min 0 only")
        return _Step("relu", [node], source, result, {"max_value": None if high is None else float(high),
                                                      "kind": kind})
    if op == "MaxPool":
        return _plan_maxpool(node, source, result, conv_padding)
    if op == "GlobalAveragePool":
        return _Step("gap", [node], source, result, {"kind": VECTOR})
    if op in ("Flatten", "Reshape"):
        return _plan_flatten(node, source, result, kind, chw)
    return _plan_dense(node, source, result, kind, chw)


def is_identity_conv(node: gs.Node) -> bool:
    """A 1x1 stride-1 unpadded Conv whose weights are the identity and whose bias is zero: it copies its input.
    The Akida IP v2 legalization inserts them (identity-conv-after-maxpool, stage-global-average-pool); on v1
    one without an activation would end a layer without a ReLU, so the lowering drops it (exact)."""

    weights = constant_value(node.inputs[1]) if node.op == "Conv" and len(node.inputs) > 1 else None
    if weights is None or weights.ndim != 4 or weights.shape[2:] != (1, 1) or weights.shape[0] != weights.shape[1]:
        return False
    if int(node.attrs.get("group", 1)) != 1 or any(int(s) != 1 for s in node.attrs.get("strides", [1, 1])):
        return False
    if any(int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])) or _auto_pad(node) not in ("NOTSET", "VALID"):
        return False
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    identity = np.eye(weights.shape[0], dtype=weights.dtype)
    return bool(np.array_equal(weights[:, :, 0, 0], identity)) and (bias is None or not np.any(bias))


def _pool_behind_identity_conv(gap: gs.Node, source: gs.Tensor, result: gs.Tensor, bound: float) -> list[_Step]:
    """ReLU(b) -> GAP as ReLU(b) -> identity 1x1 Conv -> GAP -> ReLU(b), exact: the mean of values in [0, b]
    is in [0, b]. IP v1 pools inside a layer before its activation (Conv > GAP > ReLU), so a pooling after an
    activation needs a convolution of its own to pool in."""

    channels = int(source.shape[1])
    convolved = gs.Variable(f"{gap.name}::identity-conv")
    pooled = gs.Variable(f"{gap.name}::pooled")
    weights = np.eye(channels, dtype=np.float32).reshape(channels, channels, 1, 1)
    return [
        _Step("conv", [gap], source, convolved, {"kernel": (1, 1), "strides": (1, 1), "padding": "valid",
                                                 "weights": weights, "bias": None, "name": f"{gap.name}_identity",
                                                 "rewrite": "identity-conv-before-global-pool"}),
        _Step("gap", [gap], convolved, pooled),
        _Step("relu", [gap], pooled, result, {"max_value": bound, "name": f"{gap.name}_relu"}),
    ]


def _plan_conv(node: gs.Node, source: gs.Tensor, result: gs.Tensor, graph: gs.Graph, fused: set[str]) -> _Step:
    weights = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weights is None or weights.ndim != 4:
        raise _refusal([node], f"Conv '{node.name}' has no constant 2-D kernel")
    bias = _optional_constant(node, 2)
    dilations = list(node.attrs.get("dilations", [1, 1]))
    if any(d != 1 for d in dilations):
        raise _refusal([node], f"Conv '{node.name}' is dilated {dilations}; Akida IP v1 has no dilated convolution")
    strides = tuple(int(s) for s in node.attrs.get("strides", [1, 1]))
    kernel = (int(weights.shape[2]), int(weights.shape[3]))
    padding = _keras_padding(node, source, kernel, strides)
    group = int(node.attrs.get("group", 1))
    channels = int(source.shape[1])
    params: dict[str, Any] = {"kernel": kernel, "strides": strides, "padding": padding, "kind": MAP}
    if group == 1:
        params.update(weights=weights, bias=bias)
        return _Step("conv", [node], source, result, params)
    if group != channels or weights.shape[1] != 1:
        raise _refusal([node], f"Conv '{node.name}' has {group} groups over {channels} channels; only ordinary "
                               "and depthwise convolutions have a Keras (and Akida) form")
    params.update(depthwise=weights, depthwise_bias=bias, multiplier=int(weights.shape[0]) // channels)
    pointwise = pointwise_reader(result, graph)
    if pointwise is None:
        return _Step("depthwise", [node], source, result, params)
    pw_weights = constant_value(pointwise.inputs[1])
    pw_bias = _optional_constant(pointwise, 2)
    matrix = pw_weights[:, :, 0, 0].astype(np.float64)
    folded = np.zeros(matrix.shape[0]) if pw_bias is None else pw_bias.astype(np.float64)
    if bias is not None:
        folded = folded + matrix @ bias.astype(np.float64)
    fused.add(pointwise.name)
    params.update(pointwise=pw_weights, bias=folded.astype(np.float32))
    return _Step("separable", [node, pointwise], source, pointwise.outputs[0], params)


def pointwise_reader(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The 1x1 stride-1 unpadded ordinary Conv that is the only reader of ``tensor`` (not a graph output)."""

    if len(tensor.outputs) != 1 or any(out is tensor for out in graph.outputs):
        return None
    reader = tensor.outputs[0]
    weights = constant_value(reader.inputs[1]) if reader.op == "Conv" and len(reader.inputs) > 1 else None
    if weights is None or weights.ndim != 4 or weights.shape[2:] != (1, 1) or reader.inputs[0] is not tensor:
        return None
    if int(reader.attrs.get("group", 1)) != 1 or any(int(s) != 1 for s in reader.attrs.get("strides", [1, 1])):
        return None
    if any(int(p) for p in reader.attrs.get("pads", [0, 0, 0, 0])) or _auto_pad(reader) not in ("NOTSET", "VALID"):
        return None
    return reader


def _plan_maxpool(node: gs.Node, source: gs.Tensor, result: gs.Tensor, conv_padding: dict[str, str]) -> _Step:
    kernel = tuple(int(k) for k in node.attrs["kernel_shape"])
    strides = tuple(int(s) for s in node.attrs.get("strides", [1, 1]))
    if any(int(d) != 1 for d in node.attrs.get("dilations", [1, 1])):
        raise _refusal([node], f"MaxPool '{node.name}' is dilated")
    if int(node.attrs.get("storage_order", 0)) != 0 or len(node.outputs) > 1:
        raise _refusal([node], f"MaxPool '{node.name}' returns indices")
    padding = _keras_padding(node, source, kernel, strides)
    size = _spatial(node, source)
    if same_pads(size, kernel, strides) == [0, 0, 0, 0]:
        padding = conv_padding.get(source.name, padding)  # both paddings agree: match the conv's, as v1 needs
    expected = _output_size(size, kernel, strides, padding)
    shape = result.shape
    if shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]) and \
            tuple(shape[2:]) != expected:
        raise _refusal([node], f"MaxPool '{node.name}' (ceil_mode) gives a {tuple(shape[2:])} map where Keras "
                               f"'{padding}' pooling gives {expected}")
    return _Step("maxpool", [node], source, result, {"kernel": kernel, "strides": strides, "padding": padding,
                                                     "kind": MAP})


def _plan_flatten(node: gs.Node, source: gs.Tensor, result: gs.Tensor, kind: str,
                  chw: dict[str, tuple[int, int, int]]) -> _Step:
    shape = tuple(source.shape)
    if node.op == "Flatten" and int(node.attrs.get("axis", 1)) != 1:
        raise _refusal([node], f"Flatten '{node.name}' with axis {node.attrs['axis']} (only axis 1 keeps the batch)")
    if node.op == "Reshape":
        target = _optional_constant(node, 1)
        out = tuple(result.shape or ())
        flat = target is not None and len(out) == 2 and out[1] == int(np.prod(shape[1:]))
        if not flat:
            raise _refusal([node], f"Reshape '{node.name}' to {None if target is None else target.tolist()}: only "
                                   "flattening to (N, features) has a form Akida IP v1 runs")
    if kind == MAP and any(d != 1 for d in shape[2:]):
        return _Step("flatten", [node], source, result, {"kind": FLAT_HWC, "chw": tuple(int(d) for d in shape[1:])})
    if kind == MAP:
        return _Step("flatten", [node], source, result, {"kind": VECTOR})
    params: dict[str, Any] = {"kind": kind}
    if kind == FLAT_HWC:
        params["chw"] = chw[source.name]
    return _Step("skip", [node], source, result, params)


def _plan_dense(node: gs.Node, source: gs.Tensor, result: gs.Tensor, kind: str,
                chw: dict[str, tuple[int, int, int]]) -> _Step:
    if kind == MAP:
        raise _refusal([node], f"{node.op} '{node.name}' reads a 4-D map; flatten it first")
    weights = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weights is None or weights.ndim != 2 or node.inputs[0] is not source:
        raise _refusal([node], f"{node.op} '{node.name}' does not multiply its input by a constant 2-D matrix")
    bias = None
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            raise _refusal([node], f"Gemm '{node.name}' transposes its input (transA)")
        weights = weights.T if int(node.attrs.get("transB", 0)) else weights
        weights = weights * float(node.attrs.get("alpha", 1.0))
        bias = _optional_constant(node, 2)
        if bias is not None:
            bias = np.broadcast_to(bias * float(node.attrs.get("beta", 1.0)), (weights.shape[1],))
    if kind == FLAT_HWC:
        channels, height, width = chw[source.name]
        weights = weights.reshape(channels, height, width, -1).transpose(1, 2, 0, 3).reshape(weights.shape)
    return _Step("dense", [node], source, result, {"weights": weights, "bias": bias, "kind": VECTOR})


def _keras_padding(node: gs.Node, source: gs.Tensor, kernel: tuple[int, int], strides: tuple[int, int]) -> str:
    """'valid' or 'same' when the node's padding is exactly one of them on its input size; else a refusal."""

    auto_pad = _auto_pad(node)
    pads = [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])]
    size = None if auto_pad != "NOTSET" or not any(pads) else _spatial(node, source)
    padding = keras_padding(auto_pad, pads, size, kernel, strides)
    if padding is not None:
        return padding
    raise _refusal([node], f"{node.op} '{node.name}' pads {pads if auto_pad == 'NOTSET' else auto_pad} a "
                           f"{kernel[0]}x{kernel[1]} window at stride {strides[0]}x{strides[1]} on a "
                           f"{size[0]}x{size[1]} map; Keras (and Akida) pad either nothing ('valid') or "
                           f"{same_pads(size, kernel, strides)} ('same': top, left, bottom, right)")


def keras_padding(auto_pad: str, pads: list[int], size: tuple[int, int] | None, kernel: tuple[int, int],
                  strides: tuple[int, int]) -> str | None:
    """The Keras padding ('valid' or 'same') equal to ONNX ``auto_pad``/``pads`` on a ``size`` map, or None.
    ``size`` is needed only for explicit non-zero pads."""

    if auto_pad == "VALID" or (auto_pad == "NOTSET" and not any(pads)):
        return "valid"
    if auto_pad == "SAME_UPPER":
        return "same"
    if auto_pad == "NOTSET" and size is not None and pads == same_pads(size, kernel, strides):
        return "same"
    return None


def _auto_pad(node: gs.Node) -> str:
    value = node.attrs.get("auto_pad", "NOTSET")
    return value.decode() if isinstance(value, bytes) else str(value)


def same_pads(size: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int]) -> list[int]:
    """ONNX pads [top, left, bottom, right] of TensorFlow's 'same' padding (the extra pixel at the end)."""

    totals = [max((math.ceil(n / s) - 1) * s + k - n, 0) for n, k, s in zip(size, kernel, strides, strict=True)]
    return [totals[0] // 2, totals[1] // 2, totals[0] - totals[0] // 2, totals[1] - totals[1] // 2]


def _output_size(size: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int],
                 padding: str) -> tuple[int, int]:
    if padding == "same":
        return tuple(math.ceil(n / s) for n, s in zip(size, strides, strict=True))
    return tuple((n - k) // s + 1 for n, k, s in zip(size, kernel, strides, strict=True))


def _spatial(node: gs.Node, tensor: gs.Tensor) -> tuple[int, int]:
    shape = tensor.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        raise _refusal([node], f"{node.op} '{node.name}' reads '{tensor.name}' of unknown spatial size {shape}")
    return int(shape[2]), int(shape[3])


def _optional_constant(node: gs.Node, index: int) -> np.ndarray | None:
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    value = constant_value(node.inputs[index])
    if value is None:
        raise _refusal([node], f"{node.op} '{node.name}' input {index} ('{node.inputs[index].name}') is not a "
                               "constant")
    return np.asarray(value, dtype=np.float32)


def _identity_affine(tensor: gs.Tensor) -> tuple[np.ndarray, np.ndarray]:
    channels = int(tensor.shape[1])
    return np.ones(channels, np.float64), np.zeros(channels, np.float64)


def _compose_affine(node: gs.Node, current: tuple[np.ndarray, np.ndarray], source: gs.Tensor,
                    kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per channel of ``node`` applied after ``x * scale + offset``."""

    scale, offset = current
    position = next(i for i, t in enumerate(node.inputs) if t is source)
    value = np.asarray(constant_value(node.inputs[1 - position]), dtype=np.float64)
    channels = scale.size
    per_channel = _per_channel(value, channels, kind)
    if per_channel is None:
        raise _refusal([node], f"{node.op} '{node.name}' by a constant of shape {list(value.shape)}: only a scalar "
                               f"or one value per channel ({channels}) is a Rescaling")
    if node.op == "Mul":
        return scale * per_channel, offset * per_channel
    if node.op == "Add":
        return scale, offset + per_channel
    if node.op == "Sub":
        return (scale, offset - per_channel) if position == 0 else (-scale, per_channel - offset)
    if position == 1:
        raise _refusal([node], f"Div '{node.name}' divides a constant by the input (not an affine map)")
    return scale / per_channel, offset / per_channel


def _per_channel(value: np.ndarray, channels: int, kind: str) -> np.ndarray | None:
    """``value`` as one number per channel when it broadcasts along the channel axis only (axis 1)."""

    if value.size == 1:
        return np.full(channels, float(value.reshape(())))
    rank = 4 if kind == MAP else 2
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    if shape[1] == channels and all(d == 1 for i, d in enumerate(shape) if i != 1):
        return value.reshape(channels)
    return None


def _unsupported_reason(node: gs.Node) -> str:
    if node.op in ("Add", "Concat", "Sum", "Mul"):
        return (f"{node.op} '{node.name}' joins computed tensors: Akida IP v1 runs sequential models only "
                "(no Add, Concat or Multiply of two layers)")
    if node.op in ("AveragePool", "ReduceMean"):
        return f"{node.op} '{node.name}': Akida IP v1 pools only with max pooling or global average pooling"
    return f"op {node.op} ('{node.name}') has no Akida IP v1 layer"


def _refusal(nodes: list[gs.Node], message: str) -> UnsupportedModelError:
    names = [n.name for n in nodes]
    return UnsupportedModelError(
        message,
        diagnostics=[Diagnostic(Level.ERROR, "AK1301", message, nodes=names, rule="akida-v1-lowering")],
        hint="rewrite the node into a layer of Akida IP v1 (docs/akida-v1.md), or let it run on the host",
    )


# -- building the Keras model ----------------------------------------------------------------------------


def _build(graph: gs.Graph, steps: list[_Step]) -> LoweredModel:
    import tf_keras

    layers = tf_keras.layers
    tensor_input = graph.inputs[0]
    input_shape = tuple(int(d) for d in tensor_input.shape[1:])
    keras_input = tf_keras.Input(shape=_keras_shape(input_shape), name=_layer_name(tensor_input.name, set()))
    values = {tensor_input.name: keras_input}
    names: set[str] = {keras_input.node.layer.name}
    layer_nodes: dict[str, list[str]] = {}
    rewrites: list[dict[str, Any]] = []
    for step in steps:
        x = values[step.source.name]
        if step.kind == "skip":
            values[step.result.name] = x
            if "rewrite" in step.params:
                rewrites.append({"rewrite": step.params["rewrite"], "layer": None,
                                 "nodes": [n.name for n in step.nodes]})
            continue
        base = step.params.get("name") or step.nodes[0].name
        name = _layer_name(base, names)
        if "rewrite" in step.params:
            rewrites.append({"rewrite": step.params["rewrite"], "layer": name, "nodes": [n.name for n in step.nodes]})
        names.add(name)
        p = step.params
        weights: list[np.ndarray] | None = None
        if step.kind == "rescaling":
            layer = layers.Rescaling(scale=_scalar_or_list(p["scale"]), offset=_scalar_or_list(p["offset"]),
                                     name=name)
        elif step.kind == "conv":
            layer = layers.Conv2D(int(p["weights"].shape[0]), p["kernel"], strides=p["strides"],
                                  padding=p["padding"], use_bias=p["bias"] is not None, name=name)
            weights = [p["weights"].transpose(2, 3, 1, 0)] + ([p["bias"]] if p["bias"] is not None else [])
        elif step.kind == "depthwise":
            layer = layers.DepthwiseConv2D(p["kernel"], strides=p["strides"], padding=p["padding"],
                                           depth_multiplier=p["multiplier"],
                                           use_bias=p["depthwise_bias"] is not None, name=name)
            weights = [_depthwise_kernel(p["depthwise"], p["multiplier"])]
            weights += [p["depthwise_bias"]] if p["depthwise_bias"] is not None else []
        elif step.kind == "separable":
            layer = layers.SeparableConv2D(int(p["pointwise"].shape[0]), p["kernel"], strides=p["strides"],
                                           padding=p["padding"], depth_multiplier=p["multiplier"], name=name)
            weights = [_depthwise_kernel(p["depthwise"], p["multiplier"]), p["pointwise"].transpose(2, 3, 1, 0),
                       p["bias"]]
            rewrites.append({"rewrite": "depthwise-pointwise-to-separable", "layer": name,
                             "nodes": [n.name for n in step.nodes]})
        elif step.kind == "relu":
            layer = layers.ReLU(max_value=p["max_value"], name=name)
        elif step.kind == "maxpool":
            layer = layers.MaxPool2D(p["kernel"], strides=p["strides"], padding=p["padding"], name=name)
        elif step.kind == "gap":
            layer = layers.GlobalAveragePooling2D(name=name)
        elif step.kind == "flatten":
            layer = layers.Flatten(name=name)
        else:
            layer = layers.Dense(int(p["weights"].shape[1]), use_bias=p["bias"] is not None, name=name)
            weights = [p["weights"]] + ([p["bias"]] if p["bias"] is not None else [])
        values[step.result.name] = layer(x)
        if weights is not None:
            layer.set_weights([np.asarray(w, dtype=np.float32) for w in weights])
        layer_nodes[name] = [n.name for n in step.nodes]

    output = graph.outputs[0]
    keras_model = tf_keras.Model(keras_input, values[output.name], name="qanac_v1")
    output_shape = tuple(int(d) for d in output.shape[1:]) if output.shape else tuple(
        int(d) for d in keras_model.output_shape[1:])
    return LoweredModel(keras_model, tensor_input.name, output.name, input_shape, output_shape, layer_nodes, rewrites)


def _keras_shape(onnx_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*onnx_shape[1:], onnx_shape[0]) if len(onnx_shape) == 3 else onnx_shape


def _depthwise_kernel(weights: np.ndarray, multiplier: int) -> np.ndarray:
    """ONNX (C * m, 1, kh, kw), output channel c * m + j, as Keras (kh, kw, C, m)."""

    count, _, kh, kw = weights.shape
    return weights.reshape(count // multiplier, multiplier, kh, kw).transpose(2, 3, 0, 1)


def _scalar_or_list(values: np.ndarray) -> float | list[float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values[0]) if np.all(values == values[0]) else [float(v) for v in values]


def _layer_name(onnx_name: str, taken: set[str]) -> str:
    """A valid, unused Keras layer name for an ONNX name (letters, digits, '_', '.', '-'; a letter first)."""

    base = re.sub(r"[^A-Za-z0-9_.\-]", "_", onnx_name).strip("_.-") or "layer"
    if not base[0].isalpha():
        base = f"n_{base}"
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    return name
