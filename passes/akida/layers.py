"""Building blocks for the Akida legalization passes: the graph facts the passes ask about (spatial sizes,
non-negative tensors, the input layer), and constructors for the small fixed-weight layers the rewrites
insert. The padding forms cnn2snn accepts are in backends/akida/padding.py.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qanac.backends.akida.rules import input_layer
from qanac.graph import constant_value, fresh_tensor_name
from qanac.lint import LintContext
from qanac.passes._rewrite import static_dims
from qanac.rewrite import new_constant


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
