"""Layout: removing the channels-last Transposes a TensorFlow/Keras export leaves inside the graph, so
that an imported Keras model is NCHW end to end, like a PyTorch one; and writing the classifier head
(flatten, dense) in one form whichever exporter wrote it.

The model's interface is not touched: graph inputs and outputs keep their layout and names (the Keras
frontend converts image inputs to NCHW before this pass runs, see qanac.frontends.keras). What tf2onnx's
own transpose optimizer leaves is what this pass handles: Transposes around ops that compute alike in any
layout (elementwise and broadcasting ops, reductions, Concat, Pad), which then compute in NCHW, and the
NHWC Transpose in front of Flatten -> Dense, which is absorbed into the Dense weights.

Heads: PyTorch exports GAP -> Flatten -> Gemm, tf2onnx GAP -> Squeeze -> MatMul -> Add (or a Reshape
computed from the input's Shape). ``flatten-dense-to-gemm`` rewrites the latter forms into the former,
so that the same network gives the same canonical graph from either framework; a ReduceMean over the
spatial axes becomes the GlobalAveragePool (and Flatten) PyTorch exports (``reduce-mean-to-global-pool``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qanac.graph import bypass_node, constant_value, is_graph_output, replace_uses, single_consumer
from qanac.passes._rewrite import static_dims
from qanac.rewrite import NoMatch, Rewriter, Rule, node_label, register_rules

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


# Ops that combine their inputs element by element with broadcasting: they commute with one Transpose of
# all their inputs (a constant input is transposed with them).
BROADCAST_ELEMENTWISE = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Greater",
        "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod",
    }
)
REDUCE_OPS = frozenset(
    {
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
        "ReduceLogSumExp", "ReduceSumSquare",
    }
)
AXIS_OPS = frozenset({"Concat", "Softmax", "LogSoftmax", "Hardmax"})
# Inputs after the first that are parameters, not data, and keep their meaning across a layout change
# (Clip's bounds) or are rewritten with it (axes, pads).
PARAMETER_INPUTS = {"Clip": 1, "Pad": 1, **{op: 1 for op in REDUCE_OPS}}
REGION_LIMIT = 4096
REGION_RULE = "move-transposes-through-region"


class _Region:
    """The ops a Transpose's layout reaches: ``nodes`` compute in the transposed layout between ``entries``
    (Transposes with the root's permutation writing ``domain`` tensors) and ``exits`` (Transposes reading
    them); ``side`` are the other non-constant inputs of the ops, in the same layout as the domain."""

    def __init__(self, perm: list[int]):
        self.perm = perm
        self.nodes: list[gs.Node] = []
        self.node_ids: set[int] = set()
        self.domain: dict[int, gs.Tensor] = {}
        self.entries: dict[int, gs.Node] = {}
        self.exits: dict[int, tuple[gs.Node, gs.Tensor]] = {}
        self.side: dict[int, gs.Tensor] = {}

    def outside_readers(self, tensor: gs.Tensor) -> list[gs.Node]:
        """Readers of a domain tensor that are neither region ops nor exits (they keep the old layout)."""

        return [c for c in tensor.outputs if id(c) not in self.node_ids and id(c) not in self.exits]

    def keeps_old_layout(self, graph: gs.Graph, tensor: gs.Tensor) -> bool:
        return bool(self.outside_readers(tensor)) or is_graph_output(graph, tensor)


def _rank_is(tensor: gs.Tensor, rank: int) -> bool:
    return tensor.shape is not None and len(tensor.shape) == rank


def _data_inputs(node: gs.Node) -> list[gs.Tensor]:
    count = PARAMETER_INPUTS.get(node.op, len(node.inputs))
    return [t for t in node.inputs[:count] if not t.is_empty()]


def _axes_of(node: gs.Node) -> list[int] | None:
    """A Reduce's axes (attribute, or constant second input from opset 18), [] for all axes; None when
    they are computed."""

    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and not node.inputs[1].is_empty():
        value = constant_value(node.inputs[1])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    return []


def _regionable(node: gs.Node, rank: int) -> bool:
    """Whether ``node`` computes the same in any layout of its rank-``rank`` data once its constants, axes
    and pads are permuted: elementwise and broadcasting ops, reductions that keep their dimensions,
    Concat, Softmax over one axis, Pad with constant pads."""

    if len(node.outputs) != 1 or not _rank_is(node.outputs[0], rank):
        return False
    if node.op in ELEMENTWISE:
        return _is_elementwise(node)
    if node.op in BROADCAST_ELEMENTWISE:
        return all(_rank_is(t, rank) or (constant_value(t) is not None and constant_value(t).ndim <= rank)
                   for t in node.inputs)
    if node.op in REDUCE_OPS:
        return int(node.attrs.get("keepdims", 1)) == 1 and _axes_of(node) is not None
    if node.op in AXIS_OPS:
        return True
    if node.op == "Pad":
        return all(t.is_empty() or constant_value(t) is not None for t in node.inputs[1:])
    return False


def _find_region(graph: gs.Graph, root: gs.Node) -> _Region | NoMatch:
    """The region of ``root``'s layout (see ``_Region``), or why it cannot be moved."""

    perm = _perm(root)
    if perm is None:
        return NoMatch("no explicit permutation")
    rank = len(perm)
    region = _Region(perm)
    tensors: list[gs.Tensor] = []
    ops: list[gs.Node] = []

    def add_tensor(tensor: gs.Tensor) -> None:
        if id(tensor) not in region.domain:
            region.domain[id(tensor)] = tensor
            tensors.append(tensor)

    def add_node(node: gs.Node) -> None:
        if id(node) not in region.node_ids:
            region.node_ids.add(id(node))
            region.nodes.append(node)
            ops.append(node)

    region.entries[id(root.outputs[0])] = root
    add_tensor(root.outputs[0])
    while tensors or ops:
        if len(region.nodes) > REGION_LIMIT:
            return NoMatch(f"the ops its layout reaches are more than {REGION_LIMIT}")
        if tensors:
            tensor = tensors.pop()
            for reader in tensor.outputs:
                if id(reader) in region.node_ids or id(reader) in region.exits:
                    continue
                if reader.op == "Transpose":
                    if reader.inputs[0] is tensor and len(_perm(reader) or []) == rank:
                        region.exits[id(reader)] = (reader, tensor)
                elif _regionable(reader, rank):
                    add_node(reader)
            continue
        node = ops.pop()
        for tensor in _data_inputs(node):
            value = constant_value(tensor)
            if value is not None:
                if value.ndim > rank or (node.op == "Concat" and value.ndim != rank):
                    return NoMatch(f"{node.op} '{node_label(node)}' reads a constant of another rank")
                continue
            if id(tensor) in region.domain:
                continue
            producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
            if producer is not None and producer.op == "Transpose" and _perm(producer) == perm:
                if id(producer) in region.exits:
                    return NoMatch(f"Transpose '{node_label(producer)}' both reads and feeds its region")
                region.entries[id(tensor)] = producer
                add_tensor(tensor)
            elif producer is not None and _regionable(producer, rank):
                add_node(producer)
            elif _rank_is(tensor, rank):
                region.side[id(tensor)] = tensor
            else:
                return NoMatch(f"{node.op} '{node_label(node)}' reads a tensor of unknown or other rank")
        for out in node.outputs:
            add_tensor(out)
    for tensor in region.domain.values():
        if tensor.shape is None or len(tensor.shape) != rank:
            return NoMatch("shapes on the way are unknown (run infer-shapes)")
    return region


def _is_identity(perm: list[int]) -> bool:
    return perm == list(range(len(perm)))


def _region_balance(graph: gs.Graph, region: _Region) -> tuple[int, int]:
    """(Transposes the move removes, Transposes it inserts)."""

    removed = sum(1 for t in region.domain.values()
                  if id(t) in region.entries and not region.keeps_old_layout(graph, t))
    removed += sum(1 for reader, _ in region.exits.values()
                   if _is_identity([region.perm[i] for i in _perm(reader)]))
    inserted = sum(1 for t in region.domain.values()
                   if id(t) not in region.entries and region.keeps_old_layout(graph, t))
    return removed, inserted + len(region.side)


class MoveTransposesThroughRegion(Rule):
    """T -> ops that compute alike in any layout (elementwise, broadcasting with constants or with each
    other, reductions keeping their dimensions, Concat, Softmax, Pad) -> Transposes: the ops compute in
    the untransposed layout and the Transposes around them cancel."""

    name = REGION_RULE
    ops = ("Transpose",)

    def match(self, rw: Rewriter, transpose: gs.Node) -> bool:
        perm = _perm(transpose)
        out = transpose.outputs[0]
        if perm is None or not any(_regionable(r, len(perm)) for r in out.outputs):
            return False
        simple = MoveTransposePastElementwise()
        return not (simple.match(rw, transpose) and not isinstance(simple.check(rw, transpose), NoMatch))

    def check(self, rw: Rewriter, transpose: gs.Node) -> NoMatch | _Region:
        out = transpose.outputs[0]
        if is_graph_output(rw.graph, out):
            return NoMatch("its output is a graph output")
        region = _find_region(rw.graph, transpose)
        if isinstance(region, NoMatch):
            return region
        outside = region.outside_readers(out)
        if outside:
            return NoMatch(f"followed by {outside[0].op}")
        removed, inserted = _region_balance(rw.graph, region)
        if removed <= inserted:
            return NoMatch(f"moving it through the {len(region.nodes)} ops its layout reaches would remove "
                           f"{removed} Transposes and add {inserted}")
        return region

    def rewrite(self, rw: Rewriter, transpose: gs.Node, region: _Region) -> None:
        removed, inserted = _region_balance(rw.graph, region)
        _move_region(rw, region)
        rw.count(REGION_RULE, removed - inserted)


def _inverse(perm: list[int]) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


def _new_shape(shape: list, perm: list[int]) -> list:
    """The shape of a tensor in the untransposed layout, from its shape in the transposed one."""

    inverse = _inverse(perm)
    return [shape[inverse[j]] for j in range(len(perm))]


def _rewire(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[i] = new


def _move_region(rw: Rewriter, region: _Region) -> None:
    """Make the region's ops compute in the untransposed layout (see ``MoveTransposesThroughRegion``)."""

    graph, perm = rw.graph, region.perm
    inverse = _inverse(perm)
    for node in region.nodes:
        _permute_parameters(rw, node, perm)
        rw.record(node)
    readers = {id(t): [c for c in t.outputs if id(c) in region.node_ids or id(c) in region.exits]
               for t in region.domain.values()}
    gone: list[gs.Node] = []
    for key, tensor in list(region.domain.items()):
        entry = region.entries.get(key)
        if entry is not None:
            new = entry.inputs[0]
            for reader in readers[key]:
                _rewire(reader, tensor, new)
            if not tensor.outputs and not is_graph_output(graph, tensor):
                rw.remove(entry)
                gone.append(entry)
            continue
        producer = tensor.inputs[0]
        new = rw.variable(f"{tensor.name}::{REGION_RULE}", tensor)
        new.shape = _new_shape(list(tensor.shape), perm)
        index = next(i for i, t in enumerate(producer.outputs) if t is tensor)
        producer.outputs[index] = new
        for reader in readers[key]:
            _rewire(reader, tensor, new)
        if tensor.outputs or is_graph_output(graph, tensor):
            graph.nodes.append(gs.Node("Transpose", name=f"{rw.name(producer)}:out{index}",
                                       attrs={"perm": list(perm)}, inputs=[new], outputs=[tensor]))
    for side in region.side.values():
        new = rw.variable(f"{side.name}::{REGION_RULE}", side)
        new.shape = _new_shape(list(side.shape), perm)
        side_readers = [c for c in side.outputs if id(c) in region.node_ids]
        position = next(i for i, t in enumerate(side_readers[0].inputs) if t is side)
        for reader in side_readers:
            _rewire(reader, side, new)
        graph.nodes.append(gs.Node("Transpose", name=f"{rw.name(side_readers[0])}:in{position}",
                                   attrs={"perm": inverse}, inputs=[side], outputs=[new]))
    for reader, _ in region.exits.values():
        composed = [perm[i] for i in _perm(reader)]
        if not _is_identity(composed):
            reader.attrs["perm"] = composed
            rw.rename(reader)
            continue
        out = reader.outputs[0]
        if is_graph_output(graph, out):
            reader.op = "Identity"
            reader.attrs.clear()
            rw.rename(reader)
        else:
            replace_uses(out, reader.inputs[0])
            rw.remove(reader)
            gone.append(reader)
    skipped = rw.result.details.get("skipped", {})
    for node in gone:
        skipped.pop(node_label(node), None)


def _permute_parameters(rw: Rewriter, node: gs.Node, perm: list[int]) -> None:
    """Rewrite ``node``'s constants, axes and pads for its data in the untransposed layout: axis a of the
    transposed layout is axis perm[a] of the untransposed one."""

    rank, inverse = len(perm), _inverse(perm)
    if node.op in BROADCAST_ELEMENTWISE or node.op == "Concat":
        for i, tensor in enumerate(node.inputs):
            value = constant_value(tensor)
            if value is not None and (value.size > 1 or node.op == "Concat"):
                full = value.reshape((1,) * (rank - value.ndim) + value.shape)
                node.inputs[i] = rw.constant(f"{rw.name(node)}/{i}", np.ascontiguousarray(np.transpose(full, inverse)))
    if node.op in REDUCE_OPS:
        axes = sorted(perm[a % rank] for a in _axes_of(node))
        if "axes" in node.attrs:
            node.attrs["axes"] = axes
        elif axes:
            node.inputs[1] = rw.constant(f"{rw.name(node)}/axes", np.array(axes, np.int64))
    if node.op in AXIS_OPS:
        default = 1 if node.op == "Concat" else -1
        node.attrs["axis"] = perm[int(node.attrs.get("axis", default)) % rank]
    if node.op == "Pad":
        pads = [int(p) for p in constant_value(node.inputs[1]).reshape(-1)]
        if len(node.inputs) > 3 and not node.inputs[3].is_empty():
            axes = [perm[int(a) % rank] for a in constant_value(node.inputs[3]).reshape(-1)]
            node.inputs[3] = rw.constant(f"{rw.name(node)}/axes", np.array(axes, np.int64))
        else:
            moved = [0] * (2 * rank)
            for a in range(rank):
                moved[perm[a]], moved[rank + perm[a]] = pads[a], pads[rank + a]
            node.inputs[1] = rw.constant(f"{rw.name(node)}/pads", np.array(moved, np.int64))


class RemoveUnitTranspose(Rule):
    """A Transpose that moves only axes of size 1 (the order of the other axes is kept), read only by
    Flatten or Reshape: the elements are in the same order either way, so they read its input."""

    name = "remove-unit-transpose"
    ops = ("Transpose",)

    def match(self, rw: Rewriter, transpose: gs.Node) -> bool:
        perm, x = _perm(transpose), transpose.inputs[0]
        if perm is None or x.shape is None or len(x.shape) != len(perm):
            return False
        moved = [axis for axis in perm if x.shape[axis] != 1]
        return moved == sorted(moved) and bool(transpose.outputs[0].outputs)

    def check(self, rw: Rewriter, transpose: gs.Node) -> NoMatch | None:
        out = transpose.outputs[0]
        if is_graph_output(rw.graph, out):
            return NoMatch("its output is a graph output")
        for reader in out.outputs:
            if reader.op not in FLATTEN_OPS or reader.inputs[0] is not out:
                return NoMatch(f"moves only axes of size 1, but is read by {reader.op}")
            if reader.op == "Flatten" and not _same_split(transpose, int(reader.attrs.get("axis", 1))):
                return NoMatch(f"Flatten '{node_label(reader)}' splits the moved axes differently")
        return None

    def rewrite(self, rw: Rewriter, transpose: gs.Node, found: None) -> None:
        replace_uses(transpose.outputs[0], transpose.inputs[0])
        rw.remove(transpose)


def _same_split(transpose: gs.Node, axis: int) -> bool:
    """Whether Flatten(axis) of the Transpose's output and of its input put the same axes first."""

    shape, perm = transpose.inputs[0].shape, _perm(transpose)
    axis = axis % (len(perm) + 1)
    before = [shape[a] for a in perm[:axis] if shape[a] != 1]
    return before == [d for d in shape[:axis] if d != 1]


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


class ReduceMeanToGlobalPool(Rule):
    """ReduceMean over every spatial axis (2 and up) of an N-C-spatial tensor: a GlobalAveragePool, and a
    Flatten(axis=1) after it when the ReduceMean drops the reduced axes (keepdims=0), the form PyTorch's
    AdaptiveAvgPool2d(1) and Keras' GlobalAveragePooling2D export to (and quantizeml's sanitizer uses)."""

    name = "reduce-mean-to-global-pool"
    ops = ("ReduceMean",)

    def match(self, rw: Rewriter, node: gs.Node) -> bool:
        x = node.inputs[0]
        axes = _axes_of(node)
        if x.shape is None or len(x.shape) < 3 or not axes:
            return False
        rank = len(x.shape)
        return sorted(a % rank for a in axes) == list(range(2, rank))

    def check(self, rw: Rewriter, node: gs.Node) -> None:
        return None

    def rewrite(self, rw: Rewriter, node: gs.Node, found: None) -> None:
        x, y = node.inputs[0], node.outputs[0]
        keep = int(node.attrs.get("keepdims", 1)) == 1
        pooled = y if keep else rw.variable(f"{rw.name(node, 0)}/out", x)
        if not keep:
            pooled.shape = [*x.shape[:2], *([1] * (len(x.shape) - 2))]
        rw.remove(node)
        rw.graph.nodes.append(gs.Node("GlobalAveragePool", name=rw.name(node, None if keep else 0), inputs=[x],
                                      outputs=[pooled]))
        if not keep:
            rw.graph.nodes.append(gs.Node("Flatten", name=rw.name(node, 1), attrs={"axis": 1}, inputs=[pooled],
                                          outputs=[y]))


class PointwiseConvToGemm(Rule):
    """Conv 1x1 (no padding, one group, constant weights) over a 1x1 map, read only by Flatten(axis=1): the
    Flatten moves before it and the Conv becomes a Gemm (a Keras head writes the classifier as a 1x1
    Conv then Flatten; PyTorch as Flatten then Linear)."""

    name = "pointwise-conv-to-gemm"
    ops = ("Conv",)

    def match(self, rw: Rewriter, conv: gs.Node) -> bool:
        out = conv.outputs[0]
        flatten = single_consumer(out)
        return (flatten is not None and flatten.op == "Flatten" and int(flatten.attrs.get("axis", 1)) == 1
                and not is_graph_output(rw.graph, out) and static_dims(conv.inputs[0], [2, 3]) == (1, 1))

    def check(self, rw: Rewriter, conv: gs.Node) -> NoMatch | np.ndarray:
        weights = constant_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
        has_bias = len(conv.inputs) > 2 and not conv.inputs[2].is_empty()
        if weights is None or weights.ndim != 4 or weights.shape[2:] != (1, 1):
            return NoMatch("weights are not a constant 1x1 kernel")
        if has_bias and constant_value(conv.inputs[2]) is None:
            return NoMatch("bias is not constant")
        if int(conv.attrs.get("group", 1)) != 1 or any(int(p) for p in conv.attrs.get("pads", [])):
            return NoMatch("grouped or padded")
        return weights

    def rewrite(self, rw: Rewriter, conv: gs.Node, weights: np.ndarray) -> None:
        flatten = single_consumer(conv.outputs[0])
        x, y = conv.inputs[0], flatten.outputs[0]
        flat = rw.variable(f"{rw.name(flatten)}/out", y)
        flat.shape = [x.shape[0], int(weights.shape[1])]
        inputs = [flat, rw.constant(f"{rw.name(conv)}/weight", weights.reshape(weights.shape[:2]))]
        if len(conv.inputs) > 2 and not conv.inputs[2].is_empty():
            inputs.append(conv.inputs[2])
        rw.remove(conv)
        rw.remove(flatten)
        rw.graph.nodes.append(gs.Node("Flatten", name=rw.name(flatten), attrs={"axis": 1}, inputs=[x], outputs=[flat]))
        rw.graph.nodes.append(gs.Node("Gemm", name=rw.name(conv), attrs={"transB": 1}, inputs=inputs, outputs=[y]))


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
    MoveTransposesThroughRegion(),
    MoveTransposePastElementwise(),
    FoldTransposeIntoPartner(),
    RemoveUnitTranspose(),
    RemoveNoopReshape(),
    doc="""Cancel, merge and absorb the layout Transposes inside the graph (NHWC <-> NCHW from Keras exports).

    Rewrites, tried on every Transpose T:
        move-transposes-through-region    T -> the ops its layout reaches that compute alike in any
                                          layout (elementwise and broadcasting ops, with constants or with
                                          each other: hard-swish, squeeze-and-excitation gates, residual
                                          Adds; reductions keeping their dimensions; Concat, Softmax, Pad)
                                          -> Transposes: the ops compute in the untransposed layout (their
                                          constants, axes and pads permuted), the Transposes into the
                                          region with T's permutation go, those out of it cancel or merge,
                                          and a Transpose is put back only where a tensor of the region is
                                          read outside it or is a graph output; done when it removes more
                                          Transposes than it puts back (counted: the net number removed)
        move-transpose-past-elementwise   T -> elementwise ops (Relu, Clip, Sigmoid, ...) -> a Transpose,
                                          Flatten or Reshape: T moves after the elementwise ops (they
                                          commute), next to that partner
        cancel-transpose-pair             T -> Transpose whose permutations compose to the identity: both
                                          go (an Identity stays where the second wrote a graph output)
        merge-transpose-pair              T -> Transpose composing to another permutation: one Transpose
        absorb-transpose-into-dense       T (rank 4, batch kept first) -> Flatten or Reshape to
                                          [N, C*H*W] -> MatMul or Gemm with constant weights: the weight
                                          rows are permuted to read the untransposed layout and T goes
        remove-unit-transpose             T moving only axes of size 1, read only by Flatten or Reshape
                                          (which see the same element order): T goes
    and, on every Reshape:
        remove-noop-reshape               a Reshape to the shape its input already has (tf2onnx leaves
                                          them where NHWC and NCHW shapes differed): removed
    Not fired (the reason is in ``details["skipped"]``): a tensor on the way is a graph output or has
    other consumers, shapes are unknown (run infer-shapes), the Dense weights are not constant or are
    shared, T is followed by anything else. Exact: data is only moved, and the model's inputs and
    outputs keep their layout and names.
    """,
)
register_rules("reduce-mean-to-global-pool", ReduceMeanToGlobalPool())
register_rules(
    FLATTEN_RULE,
    SqueezeToFlatten(),
    MatMulToGemm(),
    PointwiseConvToGemm(),
    doc="""Write flattening as Flatten(axis=1) and a dense layer as Gemm, the forms PyTorch exports.

    Rewrites:
        squeeze-to-flatten    Squeeze or Reshape of a tensor [N, d1, ..., dk] (k >= 2, d known) whose
                              output is [N, d1*...*dk]: a Flatten(axis=1) (drops the Shape arithmetic
                              tf2onnx builds for a dynamic batch)
        matmul-to-gemm        MatMul of a 2-D tensor by a constant 2-D matrix, and the Add of a constant
                              [M] or [1, M] bias after it when there is one: a Gemm
        pointwise-conv-to-gemm
                              Conv 1x1 (no padding, one group, constant weights) over a 1x1 map read
                              only by Flatten(axis=1) (a Keras head): Flatten, then a Gemm
    Not candidates: shapes unknown (run infer-shapes), weights not constant; when the MatMul's output is a
    graph output or has other consumers, or the Add's bias is not constant, only the MatMul becomes a
    Gemm. Invariant: outputs unchanged (exact), output names kept.
    """,
)
