"""Activations in one canonical form, whichever exporter wrote them.

A bounded ReLU reaches qanac in many spellings: tf2onnx writes Keras' ``ReLU(max_value=b)`` as
Relu -> Min(b) -> Max(0) (or Relu -> Min(b)), and ``relu6`` as Clip(0, 6); PyTorch writes ReLU6 and
Hardtanh(0, b) as Clip with min/max inputs; hand-written graphs use Max(0) -> Min(b) in either order.
Each of these ops clamps its input to an interval (Relu to [0, inf), Max(c) to [c, inf), Min(c) to
(-inf, c], Clip(lo, hi) to [lo, hi]), and a chain of clamps is one clamp to the intersection of the
intervals. ``bounded-relu-to-clip`` writes every chain whose interval is [0, b] as one Clip(0, b) with
constant min/max inputs and every chain whose interval is [0, inf) as one Relu, so backends and lint see
one form.

Keras writes hard_sigmoid as relu6(x + 3) / 6 and hard_swish as x * hard_sigmoid(x) (tf2onnx: Add, Clip,
Mul, Mul); ``hard-sigmoid-and-swish`` writes them as the HardSigmoid and HardSwish ops PyTorch exports.
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


# How far from 1 the product of the Clip's bound and the scale after it may be (float32 rounding of 1/b).
UNIT_TOLERANCE = 1e-6
HARD_RULE = "hard-sigmoid-and-swish"


def _only_reader(graph: gs.Graph, node: gs.Node) -> gs.Node | None:
    out = node.outputs[0]
    return None if is_graph_output(graph, out) else single_consumer(out)


def _scalar_operand(node: gs.Node, data: gs.Tensor) -> float | None:
    """The one-element constant a two-input ``node`` combines with ``data``, or None."""

    if len(node.inputs) != 2 or not any(t is data for t in node.inputs):
        return None
    other = node.inputs[1] if node.inputs[0] is data else node.inputs[0]
    return None if other is data else _bound(other, known_rank(data))


def _factor(scale: gs.Node, data: gs.Tensor) -> float | None:
    """What Mul(data, k) or Div(data, d) multiplies ``data`` by (k, 1/d), or None."""

    if scale.op not in ("Mul", "Div"):
        return None
    factor = _scalar_operand(scale, data)
    if scale.op == "Div":
        return 1.0 / factor if factor and scale.inputs[0] is data else None
    return factor


def _is_hard_swish(alpha: float, beta: float) -> bool:
    return abs(alpha - 1.0 / 6.0) <= UNIT_TOLERANCE and abs(beta - 0.5) <= UNIT_TOLERANCE


class HardSigmoidFromClip(Rule):
    """Add(x, c) -> Clip(0, b) -> Mul(1/b) (or Div(b)): HardSigmoid(x, alpha=1/b, beta=c/b), the form
    PyTorch exports nn.Hardsigmoid to (Keras writes hard_sigmoid as relu6(x + 3) / 6); and
    x * Clip(x + 3, 0, 6) -> Mul(1/6) (or Div(6)), PyTorch's hand-written hard-swish: HardSwish(x)."""

    name = "hard-sigmoid"
    ops = ("Add",)

    def match(self, rw: Rewriter, add: gs.Node) -> bool:
        clip = _only_reader(rw.graph, add)
        if clip is None or clip.op != "Clip" or not _is_canonical(clip) or clip.inputs[0] is not add.outputs[0]:
            return False
        scale = _only_reader(rw.graph, clip)
        return scale is not None and scale.op in ("Mul", "Div")

    def check(self, rw: Rewriter, add: gs.Node) -> NoMatch | tuple:
        x = add.inputs[0] if constant_value(add.inputs[0]) is None else add.inputs[1]
        shift = _scalar_operand(add, x)
        if shift is None:
            return NoMatch("adds a tensor, not one constant")
        clip = _only_reader(rw.graph, add)
        bound = float(constant_value(clip.inputs[2]).reshape(()))
        scale = _only_reader(rw.graph, clip)
        chain = [add, clip, scale]
        if scale.op == "Mul" and any(t is x for t in scale.inputs) and not _scalar_operand(scale, clip.outputs[0]):
            product = scale  # x * Clip(x + c, 0, b), scaled after the product
            scale = _only_reader(rw.graph, product)
            factor = _factor(scale, product.outputs[0]) if scale is not None else None
            if factor is None or abs(factor * bound - 1.0) > UNIT_TOLERANCE or not _is_hard_swish(factor,
                                                                                                   shift * factor):
                return NoMatch(f"x * Clip(x + {shift:g}, 0, {bound:g}) is not scaled into a HardSwish")
            return "HardSwish", x, [*chain, scale], {}
        factor = _factor(scale, clip.outputs[0])
        if factor is None or abs(factor * bound - 1.0) > UNIT_TOLERANCE:
            return NoMatch(f"Clip(0, {bound:g}) is not scaled by 1/{bound:g} after it")
        return "HardSigmoid", x, chain, {"alpha": factor, "beta": shift * factor}

    def rewrite(self, rw: Rewriter, add: gs.Node, found: tuple) -> None:
        op, x, chain, attrs = found
        y = chain[-1].outputs[0]
        for node in chain:
            rw.remove(node)
        rw.graph.nodes.append(gs.Node(op, name=rw.name(add), attrs=attrs, inputs=[x], outputs=[y]))
        rw.count("hard-swish" if op == "HardSwish" else self.name)


class HardSwishFromHardSigmoid(Rule):
    """x * HardSigmoid(x, alpha=1/6, beta=0.5): HardSwish(x), the form PyTorch exports nn.Hardswish to."""

    name = "hard-swish"
    ops = ("HardSigmoid",)

    def match(self, rw: Rewriter, node: gs.Node) -> bool:
        mul = _only_reader(rw.graph, node)
        return mul is not None and mul.op == "Mul" and any(t is node.inputs[0] for t in mul.inputs)

    def check(self, rw: Rewriter, node: gs.Node) -> NoMatch | None:
        alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
        if not _is_hard_swish(alpha, beta):
            return NoMatch(f"HardSigmoid(alpha={alpha:g}, beta={beta:g}) is not HardSwish's (1/6, 0.5)")
        return None

    def rewrite(self, rw: Rewriter, node: gs.Node, found: None) -> None:
        mul = _only_reader(rw.graph, node)
        x, y = node.inputs[0], mul.outputs[0]
        rw.remove(node)
        rw.remove(mul)
        rw.graph.nodes.append(gs.Node("HardSwish", name=rw.name(mul), inputs=[x], outputs=[y]))


register_rules(RULE, BoundedReluToClip())
register_rules(
    HARD_RULE,
    HardSigmoidFromClip(),
    HardSwishFromHardSigmoid(),
    doc="""Write hard-sigmoid and hard-swish as the HardSigmoid and HardSwish ops PyTorch exports.

    Rewrites:
        hard-sigmoid   Add(x, c) -> Clip(0, b) -> Mul(1/b) or Div(b) (Keras' relu6(x + 3) / 6, as tf2onnx
                       writes it): HardSigmoid(x, alpha=1/b, beta=c/b), when the Clip's bound times the
                       scale is 1 within float32 rounding
        hard-swish     x * HardSigmoid(x, alpha=1/6, beta=0.5), the HardSigmoid read by nothing else,
                       and x * Clip(x + 3, 0, 6) -> Mul(1/6) or Div(6) (PyTorch's hand-written
                       hard-swish): HardSwish(x)
    Every intermediate tensor must be read only by the next node; the new node writes the last node's
    output and is named after the first. Left with the reason: an Add of a tensor, a Clip not scaled by
    the inverse of its bound, a HardSigmoid with other parameters. Exact up to float rounding.
    """,
)
