"""Static-shape queries the rules share: a tensor's shape, rank or chosen dimensions when they are known
integers (after infer-shapes), else None. Queries only: nothing here edits the graph.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs


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
