"""Queries the rules share: a tensor's shape, rank or chosen dimensions when they are known integers
(after infer-shapes), else None; whether a tensor is non-negative by construction. Queries only: nothing
here edits the graph.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qanac.graph import constant_value


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


# Ops whose output is >= 0 whatever their input.
NON_NEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "HardSigmoid", "Abs", "Exp", "Softplus", "Softmax"})
# Ops whose output is >= 0 when their (first) input is: they select, average or move values.
NON_NEGATIVE_PRESERVING = frozenset(
    {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "Reshape", "Flatten", "Transpose",
     "Squeeze", "Unsqueeze"}
)


def is_non_negative(tensor: gs.Tensor, depth: int = 8) -> bool:
    """True when every value of ``tensor`` is >= 0 by construction: the output of an op that is never
    negative (Relu, a Clip whose minimum is a constant >= 0, Sigmoid, ...), or of a pooling or reshaping
    of such a tensor (followed back at most ``depth`` nodes). A query only."""

    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is None:
        return False
    if node.op in NON_NEGATIVE_OPS:
        return True
    if node.op == "Clip" and len(node.inputs) > 1 and not node.inputs[1].is_empty():
        low = constant_value(node.inputs[1])
        return low is not None and low.size == 1 and float(low.reshape(())) >= 0.0
    if node.op in NON_NEGATIVE_PRESERVING and depth > 0:
        return is_non_negative(node.inputs[0], depth - 1)
    return False
