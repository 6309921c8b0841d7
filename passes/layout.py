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

from qanac.graph import (
    CompilationModel,
    bypass_node,
    constant_value,
    is_graph_output,
    nodes_of,
    replace_uses,
    single_consumer,
)
from qanac.pipeline import PassContext
from qanac.registry import PassResult, register_pass
from qanac.passes._rewrite import derived_node_name, new_constant, node_label, static_dims

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


@register_pass(RULE)
def remove_layout_transposes(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Cancel, merge and absorb the layout Transposes inside the graph (NHWC <-> NCHW from Keras exports).

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
    """

    result = PassResult()
    skipped: dict[str, str] = {}
    graph = model.graph
    for transpose in nodes_of(graph, ["Transpose"]):
        if not transpose.outputs or not transpose.inputs:
            continue  # taken apart by an earlier rewrite in this sweep
        not_moved = _move_past_elementwise(model, transpose, result)
        consumer = _only_consumer(graph, transpose)
        if isinstance(consumer, str):
            reason: str | None = consumer
        elif consumer.op == "Transpose":
            reason = _cancel_or_merge(model, transpose, consumer, result)
        elif consumer.op in FLATTEN_OPS:
            reason = _absorb_into_dense(model, transpose, consumer, result)
        else:
            reason = not_moved or f"followed by {consumer.op}"
        if reason is not None:
            skipped[node_label(transpose)] = reason
    for reshape in nodes_of(graph, ["Reshape"]):
        if _is_noop_reshape(reshape) and bypass_node(graph, reshape):
            result.count("remove-noop-reshape")
    if skipped:
        result.details["skipped"] = skipped
    return result


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


def _only_consumer(graph: gs.Graph, node: gs.Node) -> gs.Node | str:
    out = node.outputs[0]
    if is_graph_output(graph, out):
        return "its output is a graph output"
    consumer = single_consumer(out)
    if consumer is None:
        return f"its output has {len(out.outputs)} consumers"
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


def _move_past_elementwise(model: CompilationModel, transpose: gs.Node, result: PassResult) -> str | None:
    """Move ``transpose`` after the chain of elementwise ops it feeds when a Transpose, Flatten or Reshape
    follows the chain; None when moved (or nothing to move past), else why it stayed."""

    graph = model.graph
    chain: list[gs.Node] = []
    node = transpose
    while True:
        consumer = _only_consumer(graph, node)
        if isinstance(consumer, str):
            return f"elementwise ops follow, then {consumer}" if chain else None
        if not _is_elementwise(consumer):
            break
        chain.append(consumer)
        node = consumer
    if not chain:
        return None
    last = chain[-1].outputs[0]
    if consumer.op != "Transpose" and consumer.op not in FLATTEN_OPS:
        return f"elementwise ops follow, then {consumer.op}, not a Transpose, Flatten or Reshape"
    if consumer.inputs[0] is not last:
        return f"elementwise ops follow, then {consumer.op} reading them as a parameter"
    source = transpose.inputs[0]
    moved_out = transpose.outputs[0]
    chain[0].inputs[0] = source
    for op in chain:
        op.outputs[0].shape = source.shape
    transpose.inputs[0] = last
    consumer.inputs[0] = moved_out
    transpose.name = derived_node_name(transpose, RULE)
    model.record(transpose, RULE)
    result.count("move-transpose-past-elementwise")
    return None


def _cancel_or_merge(model: CompilationModel, first: gs.Node, second: gs.Node, result: PassResult) -> str | None:
    p1, p2 = _perm(first), _perm(second)
    if p1 is None or p2 is None or len(p1) != len(p2):
        return "a Transpose pair without explicit permutations of one rank"
    composed = [p1[i] for i in p2]
    source, out = first.inputs[0], second.outputs[0]
    if composed == list(range(len(composed))):
        if is_graph_output(model.graph, out):
            second.op = "Identity"
            second.attrs.clear()
            second.inputs[0] = source
            second.name = derived_node_name(second, RULE)
            model.record(second, RULE)
        else:
            replace_uses(out, source)
            second.inputs.clear()
            second.outputs.clear()
        result.count("cancel-transpose-pair")
        return None
    second.inputs[0] = source
    second.attrs["perm"] = composed
    second.name = derived_node_name(second, RULE)
    model.record(second, RULE)
    result.count("merge-transpose-pair")
    return None


def _flattened_width(flatten: gs.Node) -> int | None:
    """The second dimension of Flatten(axis=1)'s or Reshape's output when that output is 2-D and known."""

    if flatten.op == "Flatten" and int(flatten.attrs.get("axis", 1)) != 1:
        return None
    out = flatten.outputs[0]
    if out.shape is None or len(out.shape) != 2:
        return None
    dims = static_dims(out, [1])
    return None if dims is None else dims[0]


def _absorb_into_dense(model: CompilationModel, transpose: gs.Node, flatten: gs.Node, result: PassResult) -> str | None:
    graph = model.graph
    perm = _perm(transpose)
    source = transpose.inputs[0]
    if flatten.inputs[0] is not transpose.outputs[0]:
        return f"it is the shape input of {flatten.op}"
    if perm is None or len(perm) != 4 or perm[0] != 0:
        return "not a layout Transpose of a 4-D tensor (perm must keep the batch first)"
    dims = static_dims(source, [1, 2, 3])
    if dims is None:
        return "its input shape is unknown (run infer-shapes)"
    size = int(np.prod(dims))
    if _flattened_width(flatten) != size:
        return f"{flatten.op} does not flatten to [N, C*H*W] (or its output shape is unknown)"
    dense = _only_consumer(graph, flatten)
    if isinstance(dense, str):
        return f"the flattened tensor: {dense}"
    if dense.op not in DENSE_OPS or dense.inputs[0] is not flatten.outputs[0]:
        return f"the flattened tensor feeds {dense.op}, not the data input of MatMul or Gemm"
    weights = constant_value(dense.inputs[1])
    if weights is None or weights.ndim != 2 or len(dense.inputs[1].outputs) != 1:
        return "the Dense weights are not a constant 2-D matrix used only here"
    if dense.op == "Gemm" and int(dense.attrs.get("transA", 0)):
        return "Gemm with transA"
    trans_b = dense.op == "Gemm" and int(dense.attrs.get("transB", 0))
    # order[j]: the position in the untransposed flattening of the element at position j of the
    # transposed one; the Dense row for untransposed position i is then the old row argsort(order)[i].
    positions = np.arange(size).reshape((1, *dims))
    rows = np.argsort(np.transpose(positions, perm).reshape(-1))
    new_weights = weights[:, rows] if trans_b else weights[rows, :]
    name = derived_node_name(dense, RULE)
    dense.inputs[1] = new_constant(graph, f"{name}/weight", new_weights)
    dense.name = name
    model.record(dense, RULE)
    flatten.inputs[0] = source
    transpose.inputs.clear()
    transpose.outputs.clear()
    result.count("absorb-transpose-into-dense")
    return None


@register_pass(FLATTEN_RULE)
def flatten_dense_to_gemm(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Write flattening as Flatten(axis=1) and a dense layer as Gemm, the forms PyTorch exports.

    Rewrites:
        squeeze-to-flatten    Squeeze or Reshape of a tensor [N, d1, ..., dk] (k >= 2, d known) whose
                              output is [N, d1*...*dk]: a Flatten(axis=1) (drops the Shape arithmetic
                              tf2onnx builds for a dynamic batch)
        matmul-to-gemm        MatMul of a 2-D tensor by a constant 2-D matrix, and the Add of a constant
                              [M] or [1, M] bias after it when there is one: a Gemm
    Not fired: shapes unknown (run infer-shapes), the MatMul's output is a graph output or has other
    consumers (then only the MatMul becomes a Gemm), weights or bias not constant. Exact.
    """

    result = PassResult()
    graph = model.graph
    for node in nodes_of(graph, ["Squeeze", "Reshape"]):
        if _is_flatten(node):
            flatten = gs.Node(
                "Flatten",
                name=derived_node_name(node, FLATTEN_RULE),
                attrs={"axis": 1},
                inputs=[node.inputs[0]],
                outputs=[node.outputs[0]],
            )
            node.inputs.clear()
            node.outputs.clear()
            graph.nodes.append(flatten)
            model.record(flatten, FLATTEN_RULE)
            result.count("squeeze-to-flatten")
    for matmul in nodes_of(graph, ["MatMul"]):
        weights = constant_value(matmul.inputs[1])
        data = matmul.inputs[0]
        if weights is None or weights.ndim != 2 or weights.dtype.kind != "f" or data.shape is None or len(data.shape) != 2:
            continue
        out = matmul.outputs[0]
        inputs = [data, matmul.inputs[1]]
        add = single_consumer(out) if not is_graph_output(graph, out) else None
        bias = _dense_bias(add, out, weights.shape[1]) if add is not None else None
        if bias is not None:
            inputs.append(new_constant(graph, f"{derived_node_name(add, FLATTEN_RULE)}/bias", bias))
            out = add.outputs[0]
            add.inputs.clear()
            add.outputs.clear()
        gemm = gs.Node("Gemm", name=derived_node_name(matmul, FLATTEN_RULE), inputs=inputs, outputs=[out])
        matmul.inputs.clear()
        matmul.outputs.clear()
        graph.nodes.append(gemm)
        model.record(gemm, FLATTEN_RULE)
        result.count("matmul-to-gemm")
    return result


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
