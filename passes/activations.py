"""Activations in one canonical form, whichever exporter wrote them.

A bounded ReLU reaches qanac in many spellings: tf2onnx writes Keras' ``ReLU(max_value=b)`` as
Relu -> Min(b) -> Max(0) (or Relu -> Min(b)), and ``relu6`` as Clip(0, 6); PyTorch writes ReLU6 and
Hardtanh(0, b) as Clip with min/max inputs; hand-written graphs use Max(0) -> Min(b) in either order.
Each of these ops clamps its input to an interval (Relu to [0, inf), Max(c) to [c, inf), Min(c) to
(-inf, c], Clip(lo, hi) to [lo, hi]), and a chain of clamps is one clamp to the intersection of the
intervals. ``bounded-relu-to-clip`` writes every chain whose interval is [0, b] as one Clip(0, b) with
constant min/max inputs and every chain whose interval is [0, inf) as one Relu, so backends and lint see
one form.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from qanac.graph import constant_value, is_graph_output, single_consumer
from qanac.passes._rewrite import known_rank
from qanac.rewrite import NoMatch, Rewriter, Rule, node_label, register_rules

RULE = "bounded-relu-to-clip"
CLAMP_OPS = ("Relu", "Max", "Min", "Clip")


def _bound(tensor: gs.Tensor, rank: int | None) -> float | None:
    """The value of a constant that clamps every element alike: one element, and no more dimensions than
    the data (so broadcasting does not change the output shape); None otherwise."""

    value = constant_value(tensor)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    if value.ndim > 0 and (rank is None or value.ndim > rank):
        return None
    return float(value.reshape(()))


def clamp_interval(node: gs.Node) -> tuple[float, float] | None:
    """The interval ``node`` clamps its data input to, when it is a clamp by constants; None otherwise.

    Relu: [0, inf); Max(x, c) or Max(c, x): [c, inf); Min: (-inf, c]; Clip(x, lo, hi) with constant
    scalar (or absent) bounds, lo <= hi: [lo, hi].
    """

    if len(node.outputs) != 1:
        return None
    x = node.inputs[0] if node.inputs else None
    rank = known_rank(x) if x is not None else None
    if node.op == "Relu":
        return 0.0, math.inf
    if node.op in ("Max", "Min"):
        if len(node.inputs) != 2:
            return None
        data, value = _data_and_bound(node)
        if data is None:
            return None
        bound = _bound(value, known_rank(data))
        if bound is None:
            return None
        return (bound, math.inf) if node.op == "Max" else (-math.inf, bound)
    if node.op == "Clip":
        bounds = [-math.inf, math.inf]
        for i in (1, 2):
            if len(node.inputs) > i and not node.inputs[i].is_empty():
                value = _bound(node.inputs[i], rank)
                if value is None:
                    return None
                bounds[i - 1] = value
        return (bounds[0], bounds[1]) if bounds[0] <= bounds[1] else None
    return None


def _data_and_bound(node: gs.Node) -> tuple[gs.Tensor | None, gs.Tensor | None]:
    """The data input and the bound of a two-input Min or Max (the bound is the constant one)."""

    first, second = node.inputs
    if constant_value(second) is not None and constant_value(first) is None:
        return first, second
    if constant_value(first) is not None and constant_value(second) is None:
        return second, first
    return None, None


def _data_input(node: gs.Node) -> gs.Tensor:
    return _data_and_bound(node)[0] if node.op in ("Max", "Min") else node.inputs[0]


def _computed_bound(node: gs.Node) -> bool:
    """A Min, Max or Clip whose bound is a tensor computed at run time."""

    if node.op in ("Max", "Min"):
        return len(node.inputs) == 2 and all(constant_value(t) is None for t in node.inputs)
    if node.op == "Clip":
        return any(not t.is_empty() and constant_value(t) is None for t in node.inputs[1:3])
    return False


def _is_canonical(node: gs.Node) -> bool:
    """A lone Relu, or a Clip whose min and max inputs are constants of one element (shape [] or [1]), 0 and
    b > 0."""

    if node.op == "Relu":
        return True
    if node.op != "Clip" or len(node.inputs) != 3 or any(t.is_empty() for t in node.inputs[1:]):
        return False
    low, high = (constant_value(t) for t in node.inputs[1:])
    return (low is not None and high is not None and low.size == 1 and high.size == 1 and low.ndim <= 1
            and high.ndim <= 1 and float(low.reshape(())) == 0.0 and 0.0 < float(high.reshape(())) < math.inf)


def _chain(graph: gs.Graph, head: gs.Node) -> list[gs.Node]:
    """``head`` and the clamps after it, each the only reader of the one before (which is no graph output)."""

    chain = [head]
    while True:
        out = chain[-1].outputs[0]
        nxt = single_consumer(out)
        if (nxt is None or is_graph_output(graph, out) or clamp_interval(nxt) is None
                or _data_input(nxt) is not out):
            return chain
        chain.append(nxt)


def _interval(chain: list[gs.Node]) -> tuple[float, float]:
    """The intersection of the chain's intervals (empty when low > high)."""

    low, high = -math.inf, math.inf
    for node in chain:
        lo, hi = clamp_interval(node)
        low, high = max(low, lo), min(high, hi)
    return low, high


def _is_head(graph: gs.Graph, node: gs.Node) -> bool:
    """Whether ``node`` is a clamp that no clamp before it leads into (a chain starts here)."""

    if clamp_interval(node) is None:
        return False
    x = _data_input(node)
    before = x.inputs[0] if len(x.inputs) == 1 else None
    return before is None or clamp_interval(before) is None or len(x.outputs) != 1 or is_graph_output(graph, x)


class BoundedReluToClip(Rule):
    """Write a chain of clamps whose interval is [0, b] as one Clip(0, b), and [0, inf) as one Relu (exact).

    A chain is Relu, Max(c), Min(c) and Clip(lo, hi) nodes with constant scalar bounds (one element, no
    more dimensions than the data: tf2onnx's [1, 1, 1, 1] constants qualify), each the only reader of the
    one before. Its interval is the intersection of the nodes' intervals, so the chain computes
    clip(x, L, H) exactly. The new node is ``<head>::bounded-relu-to-clip``, reads the head's input and
    writes the last node's output (names of graph outputs are kept); its min and max are new float
    scalars of the data's type. Not candidates: a lone Relu, a lone Clip(0, b) with constant scalar
    inputs. Left with the reason: a chain whose lower bound is not 0 (a Clip(-1, 1) stays), one whose
    bounds leave a constant, and a Relu followed by a Min, Max or Clip whose bound is computed at run time.
    Invariant: every rewritten chain is one Clip(0, b) or Relu with the same outputs.
    """

    name = RULE
    ops = CLAMP_OPS

    def match(self, rw: Rewriter, node: gs.Node) -> bool:
        if not _is_head(rw.graph, node):
            return False
        chain = _chain(rw.graph, node)
        if _interval(chain)[0] == -math.inf:
            return False  # a Min alone (or Mins) is no ReLU
        if len(chain) > 1 or not _is_canonical(node):
            return True
        out = node.outputs[0]
        nxt = single_consumer(out)
        return nxt is not None and not is_graph_output(rw.graph, out) and _computed_bound(nxt)

    def check(self, rw: Rewriter, head: gs.Node) -> NoMatch | tuple[list[gs.Node], float]:
        chain = _chain(rw.graph, head)
        low, high = _interval(chain)
        out = chain[-1].outputs[0]
        nxt = single_consumer(out)
        if len(chain) == 1 and _is_canonical(head):
            return NoMatch(f"the bound of {nxt.op} '{node_label(nxt)}' is computed at run time", nxt)
        if low > high or low == high:
            return NoMatch(f"the bounds [{low:g}, {high:g}] leave a constant")
        if low != 0.0:
            return NoMatch(f"clamps to [{low:g}, {high:g}]: the lower bound is not 0, not a bounded ReLU")
        return chain, high

    def rewrite(self, rw: Rewriter, head: gs.Node, found: tuple[list[gs.Node], float]) -> None:
        chain, high = found
        x, y = _data_input(head), chain[-1].outputs[0]
        dtype = x.dtype if x.dtype is not None else np.float32
        name = rw.name(head)
        for node in chain:
            rw.remove(node)
        if high == math.inf:
            rw.graph.nodes.append(gs.Node("Relu", name=name, inputs=[x], outputs=[y]))
            rw.count("clamp-chain-to-relu")
            return
        low_t = rw.constant(f"{name}/min", np.array(0.0, dtype=dtype))
        high_t = rw.constant(f"{name}/max", np.array(high, dtype=dtype))
        rw.graph.nodes.append(gs.Node("Clip", name=name, inputs=[x, low_t, high_t], outputs=[y]))
        rw.count(RULE)


register_rules(RULE, BoundedReluToClip())
