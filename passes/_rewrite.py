"""Small editing helpers shared by the rewrite families: names for what a rewrite creates, new constants,
and static shapes.

New nodes are named with ``qanac.graph.derived_name`` from the node they replace (or, for an unnamed node,
from its first output), so that every node still traces back to the input model. New tensors get a name
derived the same way and made unique in the graph by ``qanac.graph.fresh_tensor_name`` (an index kept
on the graph, so a new name costs constant time).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qanac.graph import derived_name, fresh_tensor_name


def node_label(node: gs.Node) -> str:
    """The name to report a node by: its name, or its first output's name when it has none."""

    if node.name:
        return node.name
    return node.outputs[0].name if node.outputs else f"<unnamed {node.op}>"


def derived_node_name(node: gs.Node, rule: str, index: int | None = None) -> str:
    return derived_name(node_label(node), rule, index)


def new_constant(graph: gs.Graph, base: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(fresh_tensor_name(graph, base), np.ascontiguousarray(values))


def new_variable(graph: gs.Graph, base: str, like: gs.Tensor) -> gs.Variable:
    """A fresh intermediate tensor with the dtype and shape of ``like``."""

    return gs.Variable(fresh_tensor_name(graph, base), dtype=like.dtype, shape=like.shape)


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The shape of ``tensor`` when every dimension is a known integer, else None."""

    shape = tensor.shape
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def known_rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def static_dims(tensor: gs.Tensor, dims: Sequence[int]) -> tuple[int, ...] | None:
    """Selected dimensions of ``tensor`` when all of them are known integers, else None."""

    shape = tensor.shape
    if shape is None:
        return None
    picked = []
    for d in dims:
        if d >= len(shape) or not isinstance(shape[d], (int, np.integer)) or shape[d] < 0:
            return None
        picked.append(int(shape[d]))
    return tuple(picked)
