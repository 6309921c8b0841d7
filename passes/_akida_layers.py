"""Building blocks for the Akida legalization passes: the padding forms cnn2snn accepts, the graph facts
the passes ask about (spatial sizes, non-negative tensors, the input layer), and constructors for the
small fixed-weight layers the rewrites insert.

Padding forms (cnn2snn/quantizeml/onnx_conversion/padding.py, cnn2snn 2.19.3). Per spatial axis of size
``n``, a kernel ``k`` and a stride ``s`` give ``total = max(k - s, 0)`` when ``n % s == 0``, else
``max(k - n % s, 0)``; a convolution's ``pads`` must then be, on both axes in the same form:

    valid       (0, 0)
    same        (total // 2, total - total // 2)   Akida "Same" (TensorFlow SAME: the odd pixel at the end)
    same_upper  (total - total // 2, total // 2)   } Akida "SameUpper": stride 2 only, 3x3 kernels (input
    symmetric   (total - total // 2,) * 2          } layer: 3x3, 5x5, 7x7), and never with max pooling

A max pooling fused after a convolution needs the convolution in the ``same`` form and its own pads in
the ``same`` form of its output size, pool size and pool stride. Anything else is refused by convert()
("Expect pads to be one of ..."). The ``valid`` form converts, but map() puts a layer with a kernel larger
than 1x1 in it in software ("Only padding 'Same' and 'SameUpper' are supported."), so the passes take it
only when no other form fits (``accepted_forms`` lists it last).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qanac.akida_rules import input_layer
from qanac.graph import constant_value
from qanac.lint import LintContext
from qanac.passes._rewrite import fresh_tensor_name, new_constant, static_dims

# SameUpper kernels (cnn2snn padding.py, _check_same_upper_padding_constraints); stride 2 only.
SAME_UPPER_KERNELS = {3}
SAME_UPPER_INPUT_KERNELS = {3, 5, 7}
SAME_UPPER_STRIDE = 2


def axis_pads(size: int, kernel: int, stride: int, form: str) -> tuple[int, int]:
    """(begin, end) padding of one axis in one of cnn2snn's ``PAD_FORMS``."""

    remainder = size % stride
    total = max(kernel - (stride if remainder == 0 else remainder), 0)
    small, large = total // 2, total - total // 2
    return {"valid": (0, 0), "same": (small, large), "same_upper": (large, small), "symmetric": (large, large)}[form]


def form_pads(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], form: str) -> list[int]:
    """ONNX ``pads`` [h_begin, w_begin, h_end, w_end] of a 2-D window in ``form``."""

    (hb, he), (wb, we) = (axis_pads(size[i], kernel[i], stride[i], form) for i in range(2))
    return [hb, wb, he, we]


def accepted_forms(kernel: tuple[int, int], stride: tuple[int, int], is_input_layer: bool) -> tuple[str, ...]:
    """The padding forms cnn2snn accepts for a convolution with this kernel and stride, ``valid`` last (it
    maps to software)."""

    upper_kernels = SAME_UPPER_INPUT_KERNELS if is_input_layer else SAME_UPPER_KERNELS
    if stride == (SAME_UPPER_STRIDE,) * 2 and kernel[0] == kernel[1] and kernel[0] in upper_kernels:
        return ("same", "same_upper", "symmetric", "valid")
    return ("same", "valid")


def pads_form(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], pads: list[int],
              is_input_layer: bool) -> str | None:
    """The accepted padding form that ``pads`` is, or None when cnn2snn would reject them."""

    for form in accepted_forms(kernel, stride, is_input_layer):
        if form_pads(size, kernel, stride, form) == list(pads):
            return form
    return None


def output_size(size: int, kernel: int, stride: int, begin: int, end: int) -> int:
    return (size + begin + end - kernel) // stride + 1


def spatial_size(tensor: gs.Tensor) -> tuple[int, int] | None:
    """(H, W) of a 4-D NCHW tensor when both are known."""

    shape = tensor.shape
    if shape is None or len(shape) != 4:
        return None
    return static_dims(tensor, (2, 3))


def channels(tensor: gs.Tensor) -> int | None:
    dims = static_dims(tensor, (1,)) if tensor.shape is not None and len(tensor.shape) == 4 else None
    return None if dims is None else dims[0]


def conv_attrs(node: gs.Node) -> tuple[tuple[int, int], tuple[int, int], list[int], tuple[int, int]] | None:
    """(kernel, strides, pads, dilations) of a 2-D Conv with constant weights, or None."""

    weights = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weights is None or weights.ndim != 4:
        return None
    kernel = (int(weights.shape[2]), int(weights.shape[3]))
    strides = tuple(int(s) for s in node.attrs.get("strides", [1, 1]))
    pads = [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])]
    dilations = tuple(int(d) for d in node.attrs.get("dilations", [1, 1]))
    return kernel, strides, pads, dilations


def is_input_layer(graph: gs.Graph, node: gs.Node) -> bool:
    """Whether ``node`` is the model's first layer (Akida's input layer), as the lint rules see it."""

    return input_layer(LintContext(graph)) is node


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def is_non_negative(tensor: gs.Tensor) -> bool:
    """True when ``tensor`` is the output of a Relu or of a Clip whose minimum is a constant >= 0."""

    node = producer(tensor)
    if node is None:
        return False
    if node.op == "Relu":
        return True
    if node.op == "Clip" and len(node.inputs) > 1 and node.inputs[1].name:
        low = constant_value(node.inputs[1])
        return low is not None and float(low) >= 0.0
    return False


def shaped_like(graph: gs.Graph, base: str, like: gs.Tensor, chw: tuple[int, int, int]) -> gs.Variable:
    """A fresh float tensor shaped (batch of ``like``, *chw)."""

    batch = like.shape[0] if like.shape is not None else 1
    return gs.Variable(fresh_tensor_name(graph, base), dtype=np.float32, shape=[batch, *chw])


def conv_node(graph: gs.Graph, name: str, x: gs.Tensor, weights: np.ndarray, out: gs.Tensor, *,
              strides: tuple[int, int] = (1, 1), pads: list[int] | None = None, group: int = 1,
              bias: np.ndarray | None = None) -> gs.Node:
    """A Conv node reading ``x`` and writing ``out`` with constant ``weights`` (and ``bias``)."""

    kernel = [int(weights.shape[2]), int(weights.shape[3])]
    inputs = [x, new_constant(graph, f"{name}/weight", weights.astype(np.float32))]
    if bias is not None:
        inputs.append(new_constant(graph, f"{name}/bias", bias.astype(np.float32)))
    attrs = {"kernel_shape": kernel, "strides": list(strides), "pads": list(pads or [0, 0, 0, 0]), "group": group}
    node = gs.Node("Conv", name, attrs=attrs, inputs=inputs, outputs=[out])
    graph.nodes.append(node)
    return node


def identity_pointwise_weights(count: int) -> np.ndarray:
    """(C, C, 1, 1) weights of a 1x1 convolution that copies its input."""

    return np.eye(count, dtype=np.float32).reshape(count, count, 1, 1)
