"""Layout: removing the channels-last Transposes a TensorFlow/Keras export leaves inside the graph, so
that an imported Keras model is NCHW end to end, like a PyTorch one; and writing the classifier head
(flatten, dense) in one form whichever exporter wrote it.

The model's interface is not touched: graph inputs and outputs keep their layout and names (the Keras
frontend converts image inputs to NCHW before this pass runs, see qanac.frontends.keras). What tf2onnx's
own transpose optimizer leaves is what this pass handles: pairs of Transposes separated by elementwise
ops, and the NHWC Transpose in front of Flatten -> Dense, which is absorbed into the Dense weights.

Heads: PyTorch exports GAP -> Flatten -> Gemm, tf2onnx GAP -> Squeeze -> MatMul -> Add (or a Reshape
computed from the input's Shape). ``flatten-dense-to-gemm`` rewrites the latter forms into the former,
so that the same network gives the same canonical graph from either framework.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qanac.graph import bypass_node, constant_value, is_graph_output, replace_uses, single_consumer
from qanac.passes._rewrite import static_dims
from qanac.rewrite import NoMatch, Rewriter, Rule, register_rules

RULE = "remove-layout-transposes"

# Ops that act on every element alone, so they commute with any Transpose of their (only) data input.
# Clip's min/max must be scalars; other extra inputs are not allowed.
ELEMENTWISE = frozenset(
    {
        "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Selu",
        "Softplus", "Softsign", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Identity", "Cast",
    }
)
FLATTEN_OPS = frozenset({"Flatten", "Reshape"})
FLATTEN_RULE = "flatten-dense-to-gemm"
DENSE_OPS = frozenset({"MatMul", "Gemm"})


class MoveTransposePastElementwise(Rule):
    """T -> elementwise ops -> a Transpose, Flatten or Reshape: T moves after the elementwise ops (they
    commute), next to that partner."""

    name = "move-transpose-past-elementwise"
    ops = ("Transpose",)

    def match(self, rw: Rewriter, transpose: gs.Node) -> bool:
        consumer = _only_consumer(rw.graph, transpose)
        return not isinstance(consumer, NoMatch) and _is_elementwise(consumer)

    def check(self, rw: Rewriter, transpose: gs.Node) -> NoMatch | tuple[list[gs.Node], gs.Node]:
        chain: list[gs.Node] = []
        node = transpose
        while True:
            consumer = _only_consumer(rw.graph, node)
            if isinstance(consumer, NoMatch):
                return NoMatch(f"elementwise ops follow, then {consumer.reason}")
            if not _is_elementwise(consumer):
                break
            chain.append(consumer)
            node = consumer
        if consumer.op != "Transpose" and consumer.op not in FLATTEN_OPS:
            return NoMatch(f"elementwise ops follow, then {consumer.op}, not a Transpose, Flatten or Reshape")
        if consumer.inputs[0] is not chain[-1].outputs[0]:
            return NoMatch(f"elementwise ops follow, then {consumer.op} reading them as a parameter")
        return chain, consumer

    def rewrite(self, rw: Rewriter, transpose: gs.Node, found: tuple[list[gs.Node], gs.Node]) -> None:
        chain, partner = found
        source = transpose.inputs[0]
        moved_out = transpose.outputs[0]
        last = chain[-1].outputs[0]
        chain[0].inputs[0] = source
        for op in chain:
            op.outputs[0].shape = source.shape
        transpose.inputs[0] = last
        partner.inputs[0] = moved_out
        rw.rename(transpose)


class FoldTransposeIntoPartner(Rule):
    """T -> Transpose: the pair cancels (cancel-transpose-pair) or merges into one (merge-transpose-pair);
    T (rank 4, batch first) -> Flatten or Reshape to [N, C*H*W] -> MatMul or Gemm with constant weights:
    the weight rows are permuted to read the untransposed layout and T goes (absorb-transpose-into-dense)."""

    name = RULE
    ops = ("Transpose",)

    def check(self, rw: Rewriter, transpose: gs.Node) -> NoMatch | tuple:
        consumer = _only_consumer(rw.graph, transpose)
        if isinstance(consumer, NoMatch):
            return consumer
        if consumer.op == "Transpose":
            p1, p2 = _perm(transpose), _perm(consumer)
            if p1 is None or p2 is None or len(p1) != len(p2):
                return NoMatch("a Transpose pair without explicit permutations of one rank")
            return "pair", consumer, [p1[i] for i in p2]
        if consumer.op in FLATTEN_OPS:
            return _absorb_plan(rw.graph, transpose, consumer)
        return NoMatch(f"followed by {consumer.op}")

    def rewrite(self, rw: Rewriter, transpose: gs.Node, found: tuple) -> None:
        if found[0] == "pair":
            _, second, composed = found
            _cancel_or_merge(rw, transpose, second, composed)
            return
        _, flatten, dense, new_weights = found
        rw.rename(dense)
        dense.inputs[1] = rw.constant(f"{dense.name}/weight", new_weights)
        flatten.inputs[0] = transpose.inputs[0]
        rw.remove(transpose)
        rw.count("absorb-transpose-into-dense")


class RemoveNoopReshape(Rule):
    """A Reshape to the shape its input already has (tf2onnx leaves them where NHWC and NCHW shapes
    differed) is removed."""

    name = "remove-noop-reshape"
    ops = ("Reshape",)

    def match(self, rw: Rewriter, reshape: gs.Node) -> bool:
        return _is_noop_reshape(reshape)

    def check(self, rw: Rewriter, reshape: gs.Node) -> None:
        return None

    def rewrite(self, rw: Rewriter, reshape: gs.Node, found: None) -> NoMatch | None:
        if not bypass_node(rw.graph, reshape):
            return NoMatch("a no-op, but its input cannot take over its output's name "
                           "(graph input, constant or shared)")
        return None


def _is_noop_reshape(node: gs.Node) -> bool:
    """A Reshape to a constant shape that equals its input's (static except the batch) shape."""

    target = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    data = node.inputs[0]
    if target is None or data.shape is None or target.ndim != 1 or len(target) != len(data.shape):
        return False
    rest = static_dims(data, range(1, len(data.shape)))
    if rest is None or len(data.shape) < 1:
        return False
    batch = data.shape[0]
    first_ok = int(target[0]) in (-1, 0) or (isinstance(batch, (int, np.integer)) and int(target[0]) == batch)
    return first_ok and [int(v) for v in target[1:]] == list(rest)


def _perm(node: gs.Node) -> list[int] | None:
    perm = node.attrs.get("perm")
    return None if perm is None else [int(p) for p in perm]


def _only_consumer(graph: gs.Graph, node: gs.Node) -> gs.Node | NoMatch:
    out = node.outputs[0]
    if is_graph_output(graph, out):
        return NoMatch("its output is a graph output")
    consumer = single_consumer(out)
    if consumer is None:
        return NoMatch(f"its output has {len(out.outputs)} consumers")
    return consumer


def _is_elementwise(node: gs.Node) -> bool:
    if node.op not in ELEMENTWISE or len(node.outputs) != 1:
        return False
    if node.op == "Clip":
        for bound in node.inputs[1:]:
            if bound.is_empty():
                continue
            value = constant_value(bound)
            if value is None or value.size != 1:
                return False
        return True
    return len(node.inputs) == 1


def _cancel_or_merge(rw: Rewriter, first: gs.Node, second: gs.Node, composed: list[int]) -> None:
    source, out = first.inputs[0], second.outputs[0]
    if composed != list(range(len(composed))):
        second.inputs[0] = source
        second.attrs["perm"] = composed
        rw.rename(second)
        rw.count("merge-transpose-pair")
        return
    if is_graph_output(rw.graph, out):
        second.op = "Identity"
        second.attrs.clear()
        second.inputs[0] = source
        rw.rename(second)
    else:
        replace_uses(out, source)
        rw.remove(second)
    rw.count("cancel-transpose-pair")


def _flattened_width(flatten: gs.Node) -> int | None:
    """The second dimension of Flatten(axis=1)'s or Reshape's output when that output is 2-D and known."""

    if flatten.op == "Flatten" and int(flatten.attrs.get("axis", 1)) != 1:
        return None
    out = flatten.outputs[0]
    if out.shape is None or len(out.shape) != 2:
        return None
    dims = static_dims(out, [1])
    return None if dims is None else dims[0]


def _absorb_plan(graph: gs.Graph, transpose: gs.Node, flatten: gs.Node) -> NoMatch | tuple:
    """What absorb-transpose-into-dense does with ``transpose`` read by ``flatten``, or why it cannot."""

    perm = _perm(transpose)
    source = transpose.inputs[0]
    if flatten.inputs[0] is not transpose.outputs[0]:
        return NoMatch(f"it is the shape input of {flatten.op}")
    if perm is None or len(perm) != 4 or perm[0] != 0:
        return NoMatch("not a layout Transpose of a 4-D tensor (perm must keep the batch first)")
    dims = static_dims(source, [1, 2, 3])
    if dims is None:
        return NoMatch("its input shape is unknown (run infer-shapes)")
    size = int(np.prod(dims))
    if _flattened_width(flatten) != size:
        return NoMatch(f"{flatten.op} does not flatten to [N, C*H*W] (or its output shape is unknown)")
    dense = _only_consumer(graph, flatten)
    if isinstance(dense, NoMatch):
        return NoMatch(f"the flattened tensor: {dense.reason}")
    if dense.op not in DENSE_OPS or dense.inputs[0] is not flatten.outputs[0]:
        return NoMatch(f"the flattened tensor feeds {dense.op}, not the data input of MatMul or Gemm")
    weights = constant_value(dense.inputs[1])
    if weights is None or weights.ndim != 2 or len(dense.inputs[1].outputs) != 1:
        return NoMatch("the Dense weights are not a constant 2-D matrix used only here")
    if dense.op == "Gemm" and int(dense.attrs.get("transA", 0)):
        return NoMatch("Gemm with transA")
    trans_b = dense.op == "Gemm" and int(dense.attrs.get("transB", 0))
    # order[j]: the position in the untransposed flattening of the element at position j of the
    # transposed one; the Dense row for untransposed position i is then the old row argsort(order)[i].
    positions = np.arange(size).reshape((1, *dims))
    rows = np.argsort(np.transpose(positions, perm).reshape(-1))
    new_weights = weights[:, rows] if trans_b else weights[rows, :]
    return "absorb", flatten, dense, new_weights


class SqueezeToFlatten(Rule):
    """Squeeze or Reshape of a tensor [N, d1, ..., dk] (k >= 2, d known) whose output is [N, d1*...*dk]:
    a Flatten(axis=1) (drops the Shape arithmetic tf2onnx builds for a dynamic batch)."""

    name = "squeeze-to-flatten"
    ops = ("Squeeze", "Reshape")

    def match(self, rw: Rewriter, node: gs.Node) -> bool:
        return _is_flatten(node)

    def check(self, rw: Rewriter, node: gs.Node) -> None:
        return None

    def rewrite(self, rw: Rewriter, node: gs.Node, found: None) -> None:
        flatten = gs.Node("Flatten", name=rw.name(node), attrs={"axis": 1}, inputs=[node.inputs[0]],
                          outputs=[node.outputs[0]])
        rw.remove(node)
        rw.graph.nodes.append(flatten)


class MatMulToGemm(Rule):
    """MatMul of a 2-D tensor by a constant 2-D float matrix, and the Add of a constant [M] or [1, M] bias
    after it when there is one: a Gemm."""

    name = "matmul-to-gemm"
    ops = ("MatMul",)

    def match(self, rw: Rewriter, matmul: gs.Node) -> bool:
        weights = constant_value(matmul.inputs[1])
        data = matmul.inputs[0]
        return (weights is not None and weights.ndim == 2 and weights.dtype.kind == "f" and data.shape is not None
                and len(data.shape) == 2)

    def check(self, rw: Rewriter, matmul: gs.Node) -> tuple[gs.Node, np.ndarray] | None:
        out = matmul.outputs[0]
        add = single_consumer(out) if not is_graph_output(rw.graph, out) else None
        bias = _dense_bias(add, out, constant_value(matmul.inputs[1]).shape[1]) if add is not None else None
        return None if bias is None else (add, bias)

    def rewrite(self, rw: Rewriter, matmul: gs.Node, found: tuple[gs.Node, np.ndarray] | None) -> None:
        inputs = [matmul.inputs[0], matmul.inputs[1]]
        out = matmul.outputs[0]
        if found is not None:
            add, bias = found
            inputs.append(rw.constant(f"{rw.name(add)}/bias", bias))
            out = add.outputs[0]
            rw.remove(add)
        gemm = gs.Node("Gemm", name=rw.name(matmul), inputs=inputs, outputs=[out])
        rw.remove(matmul)
        rw.graph.nodes.append(gemm)


def _is_flatten(node: gs.Node) -> bool:
    """Squeeze or Reshape whose output is [N, product of the other input dims] (so dim 0 is kept)."""

    data, out = node.inputs[0], node.outputs[0]
    if data.shape is None or len(data.shape) < 3 or out.shape is None or len(out.shape) != 2:
        return False
    dims = static_dims(data, range(1, len(data.shape)))
    width = static_dims(out, [1])
    return dims is not None and width is not None and width[0] == int(np.prod(dims))


def _dense_bias(add: gs.Node, product: gs.Tensor, width: int) -> np.ndarray | None:
    """The bias an Add after a MatMul adds, as a [M] vector, when it is a constant broadcast over rows."""

    if add.op != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is product else add.inputs[0]
    if other is product:
        return None
    value = constant_value(other)
    if value is None or value.shape not in ((width,), (1, width)):
        return None
    return value.reshape(width)


register_rules(
    RULE,
    MoveTransposePastElementwise(),
    FoldTransposeIntoPartner(),
    RemoveNoopReshape(),
    doc="""Cancel, merge and absorb the layout Transposes inside the graph (NHWC <-> NCHW from Keras exports).

    Rewrites, tried on every Transpose T:
        move-transpose-past-elementwise   T -> elementwise ops (Relu, Clip, Sigmoid, ...) -> a Transpose,
                                          Flatten or Reshape: T moves after the elementwise ops (they
                                          commute), next to that partner
        cancel-transpose-pair             T -> Transpose whose permutations compose to the identity: both
                                          go (an Identity stays where the second wrote a graph output)
        merge-transpose-pair              T -> Transpose composing to another permutation: one Transpose
        absorb-transpose-into-dense       T (rank 4, batch kept first) -> Flatten or Reshape to
                                          [N, C*H*W] -> MatMul or Gemm with constant weights: the weight
                                          rows are permuted to read the untransposed layout and T goes
    and, on every Reshape:
        remove-noop-reshape               a Reshape to the shape its input already has (tf2onnx leaves
                                          them where NHWC and NCHW shapes differed): removed
    Not fired (the reason is in ``details["skipped"]``): a tensor on the way is a graph output or has
    other consumers, shapes are unknown (run infer-shapes), the Dense weights are not constant or are
    shared, T is followed by anything else. Exact: data is only moved, and the model's inputs and
    outputs keep their layout and names.
    """,
)
register_rules(
    FLATTEN_RULE,
    SqueezeToFlatten(),
    MatMulToGemm(),
    doc="""Write flattening as Flatten(axis=1) and a dense layer as Gemm, the forms PyTorch exports.

    Rewrites:
        squeeze-to-flatten    Squeeze or Reshape of a tensor [N, d1, ..., dk] (k >= 2, d known) whose
                              output is [N, d1*...*dk]: a Flatten(axis=1) (drops the Shape arithmetic
                              tf2onnx builds for a dynamic batch)
        matmul-to-gemm        MatMul of a 2-D tensor by a constant 2-D matrix, and the Add of a constant
                              [M] or [1, M] bias after it when there is one: a Gemm
    Not candidates: shapes unknown (run infer-shapes), weights not constant; when the MatMul's output is a
    graph output or has other consumers, or the Add's bias is not constant, only the MatMul becomes a
    Gemm. Invariant: outputs unchanged (exact), output names kept.
    """,
)
