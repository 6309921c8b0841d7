"""Constant folding: every subgraph computable without the model's inputs becomes an initializer.

Folding runs through onnx-graphsurgeon's ``fold_constants`` (ONNX Runtime evaluates the constant
subgraphs) with ``error_ok=False``, so a failure is never swallowed. Shape-derived values (``Shape``,
``Shape -> Gather``, ``Shape -> Slice`` over statically known dimensions, and ``Size``) are folded here
from the inferred shapes instead of by graphsurgeon's shape folding, whose int/float cast elision can
change results. A Reshape whose target is computed from a dynamic batch gets a constant target when
its output shape is static after the batch, so no shape computation is left to cross a segment
boundary. After folding, any node that was foldable and is still there is an error naming it.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError
from qanac.execution import make_session
from qanac.graph import CompilationModel, constant_value, derived_name, fresh_tensor_name, is_graph_output
from qanac.passes._rewrite import static_dims, static_shape
from qanac.pipeline import PassContext
from qanac.registry import PassResult, register_pass
from qanac.rewrite import node_label

# Never evaluated at compile time: quantization nodes are kept as the model's own; the others draw
# random numbers, so folding them would freeze one sample.
NEVER_FOLD = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)
# The Constant attributes onnx-graphsurgeon lowers to initializers.
LOWERABLE_CONSTANT_ATTRS = frozenset({"value", "value_float", "value_floats", "value_int", "value_ints"})


def _is_lowerable_constant(node: gs.Node) -> bool:
    return len(node.attrs) == 1 and next(iter(node.attrs)) in LOWERABLE_CONSTANT_ATTRS


def _excluded(node: gs.Node) -> bool:
    """Nodes fold-constants never evaluates, whatever their inputs."""

    return (
        node.op in NEVER_FOLD
        or (node.domain or "") not in ("", "ai.onnx")
        or any(isinstance(v, gs.Graph) for v in node.attrs.values())
        or any(isinstance(v, gs.Node.AttributeRef) for v in node.attrs.values())
    )


def foldable_nodes(graph: gs.Graph) -> list[gs.Node]:
    """The nodes fold-constants folds: lowerable Constant nodes (except those writing a graph output),
    nodes whose inputs are all constant, and shape queries over statically known dimensions.

    ``graph`` must be topologically sorted.
    """

    constant = {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    found = []
    for node in graph.nodes:
        if node.op == "Constant":
            if _is_lowerable_constant(node):
                constant.update(t.name for t in node.outputs)
                if not any(is_graph_output(graph, t) for t in node.outputs):
                    found.append(node)
            continue
        inputs = [t for t in node.inputs if not t.is_empty()]
        if not _excluded(node) and all(t.name in constant for t in inputs):
            found.append(node)
            constant.update(t.name for t in node.outputs)
        elif _shape_query_value(node) is not None:
            found.append(node)
            constant.update(t.name for t in node.outputs)
    return found


def _shape_query_value(node: gs.Node) -> np.ndarray | None:
    """The value of a Shape or Size node (or Shape followed by Gather/Slice) known from static shapes."""

    if node.op == "Size" and not isinstance(node.inputs[0], gs.Constant):
        shape = static_shape(node.inputs[0])
        return None if shape is None else np.array(int(np.prod(shape)), dtype=np.int64)
    if node.op == "Shape" and not isinstance(node.inputs[0], gs.Constant):
        shape = node.inputs[0].shape
        if shape is None:
            return None
        rank = len(shape)
        start, end = _shape_bounds(node, rank)
        dims = static_dims(node.inputs[0], range(start, end))
        return None if dims is None else np.array(dims, dtype=np.int64)
    if node.op in ("Gather", "Slice"):
        data = node.inputs[0]
        if len(data.inputs) != 1 or data.inputs[0].op != "Shape" or data.inputs[0].inputs[0].shape is None:
            return None
        shape_node = data.inputs[0]
        rank = len(shape_node.inputs[0].shape)
        start, end = _shape_bounds(shape_node, rank)
        positions = np.arange(start, end)
        picked = _gather_or_slice(node, positions)
        if picked is None:
            return None
        dims = static_dims(shape_node.inputs[0], [int(p) for p in picked.reshape(-1)])
        return None if dims is None else np.array(dims, dtype=np.int64).reshape(picked.shape)
    return None


def _shape_bounds(node: gs.Node, rank: int) -> tuple[int, int]:
    start = int(node.attrs.get("start", 0))
    end = int(node.attrs.get("end", rank))
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return start, max(start, end)


def _gather_or_slice(node: gs.Node, positions: np.ndarray) -> np.ndarray | None:
    """Apply a Gather or Slice with constant parameters to the positions of a shape vector."""

    if node.op == "Gather":
        indices = constant_value(node.inputs[1])
        if indices is None or int(node.attrs.get("axis", 0)) != 0:
            return None
        return positions[np.asarray(indices, dtype=np.int64)]
    params = [None if t.is_empty() else constant_value(t) for t in node.inputs[1:5]]
    present = [not t.is_empty() for t in node.inputs[1:5]]
    if any(p and v is None for p, v in zip(present, params, strict=True)) or len(params) < 2:
        return None
    starts, ends, axes, steps = (params + [None, None])[:4]
    if axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] not in ([0], [-1]):
        return None
    step = 1 if steps is None else int(np.asarray(steps).reshape(-1)[0])
    start, end = (int(np.asarray(v).reshape(-1)[0]) for v in (starts, ends))
    return positions[slice(start, end, step)]


@register_pass("fold-constants")
def fold_constants(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Replace every constant subgraph by its value, computed by ONNX Runtime.

    Constant nodes become initializers, shape queries over static dimensions become constants, a
    Reshape whose target is computed at run time (from a dynamic batch) and whose output is static after
    the first dimension gets the constant target [-1, d1, ..., dk] (its shape computation goes), and
    nodes whose inputs are all constant are evaluated (never: quantization nodes, random or Dropout
    nodes, nodes of non-default domains, nodes with subgraphs). A constant graph output keeps a
    Constant node so output names and types stay. Invariant: afterwards no foldable node remains; a node
    ONNX Runtime cannot evaluate, or one left unfolded, is an error naming it.
    """

    result = PassResult()
    graph = model.graph
    graph.toposort()
    output_producers = {t.name: t.inputs[0] for t in graph.outputs if len(t.inputs) == 1}
    _warn_unlowerable_constants(model, result)

    nodes = list(graph.nodes)
    fixed = _fix_reshape_targets(graph)
    if fixed:
        result.count("fold-reshape-shape", fixed)
    graph.cleanup()
    nodes = _count_removed(graph, nodes, result, lambda node: "remove-unused-node")

    _fold_shape_queries(graph)
    nodes = _count_removed(
        graph, nodes, result, lambda node: "remove-unused-node" if node.op == "Constant" else "fold-shape-query"
    )

    if foldable_nodes(graph):
        try:
            # graphsurgeon's own warnings repeat the failure this pass turns into an error naming the node
            with G_LOGGER.suppress(G_LOGGER.ERROR):
                graph.fold_constants(
                    fold_shapes=False, error_ok=False, partitioning=None, should_exclude_node=_excluded
                )
        except Exception as exc:  # ONNX Runtime or graphsurgeon failed on a constant subgraph
            raise _fold_error(model, exc) from exc
        graph.cleanup()
    recreated = _keep_constant_outputs(graph, output_producers)
    graph.toposort()
    _count_removed(
        graph,
        [n for n in nodes if id(n) not in recreated],
        result,
        lambda node: "constant-node-to-initializer" if node.op == "Constant" else "fold-node",
    )

    left = foldable_nodes(graph)
    if left:
        raise UnsupportedModelError(
            f"{len(left)} constant node(s) were not folded",
            diagnostics=[_unfolded(model, n, "left unfolded by onnx-graphsurgeon") for n in left],
            hint="report this with the model; disable the pass with --disable-pass fold-constants to go on",
        )
    return result


def _fix_reshape_targets(graph: gs.Graph) -> int:
    """Give every Reshape whose target shape is computed at run time (PyTorch's ``x.view(x.size(0), -1)``
    and ``view(b, g, c // g, h, w)`` with a dynamic batch: Shape -> Gather -> Unsqueeze -> Concat) the
    constant target ``[-1, d1, ..., dk]`` when its output shape is static after the first dimension.

    -1 stands for the only dimension left, the same value the computed target gives whenever the
    Reshape is valid; the shape computation loses its reader and goes with the cleanup. Returns how many
    Reshapes were given constant targets.
    """

    fixed = 0
    for node in graph.nodes:
        if node.op != "Reshape" or len(node.inputs) < 2 or constant_value(node.inputs[1]) is not None:
            continue
        out = node.outputs[0]
        if out.shape is None or len(out.shape) < 1:
            continue
        rest = static_dims(out, range(1, len(out.shape)))
        if rest is None or any(d == 0 for d in rest):
            continue
        target = np.array([-1, *rest], dtype=np.int64)
        node.inputs[1] = gs.Constant(fresh_tensor_name(graph, f"{node_label(node)}/shape"), target)
        fixed += 1
    return fixed


def _count_removed(graph: gs.Graph, nodes: list[gs.Node], result: PassResult, rewrite) -> list[gs.Node]:
    """Count the ``nodes`` no longer in ``graph`` under ``rewrite(node)``; returns those still there."""

    current = {id(n) for n in graph.nodes}
    for node in nodes:
        if id(node) not in current:
            result.count(rewrite(node))
    return [n for n in nodes if id(n) in current]


def _warn_unlowerable_constants(model: CompilationModel, result: PassResult) -> None:
    for node in model.graph.nodes:
        if node.op == "Constant" and not _is_lowerable_constant(node):
            message = f"Constant node with attribute {sorted(node.attrs)} is not folded into an initializer"
            result.diagnostics.append(_diagnostic(model, node, Level.WARNING, "FLD002", message))


def _fold_shape_queries(graph: gs.Graph) -> None:
    """Turn Shape/Size (and Shape->Gather/Slice) over static dimensions into constants."""

    folded = False
    for node in list(graph.nodes):
        value = _shape_query_value(node)
        if value is not None:
            out = node.outputs[0]
            node.outputs.clear()
            out.to_constant(value)
            folded = True
    if folded:
        graph.cleanup()


def _keep_constant_outputs(graph: gs.Graph, producers: dict[str, gs.Node]) -> set[int]:
    """Give every graph output that folding made constant a Constant node again; returns the ids of
    the original Constant nodes that were re-created as they were (no change)."""

    recreated = set()
    for out in graph.outputs:
        if not isinstance(out, gs.Constant):
            continue
        values = out.values
        original = producers.get(out.name)
        if original is not None and original.op == "Constant":
            name, attrs = original.name, dict(original.attrs)
            recreated.add(id(original))
        else:
            name = derived_name(node_label(original), "fold-constants") if original is not None else out.name
            attrs = {"value": gs.Constant(out.name, values)}
        out.to_variable(dtype=values.dtype, shape=list(values.shape))
        graph.nodes.append(gs.Node("Constant", name=name, attrs=attrs, outputs=[out]))
    return recreated


def _diagnostic(model: CompilationModel, node: gs.Node, level: Level, code: str, message: str) -> Diagnostic:
    return Diagnostic(level, code, message, nodes=[node_label(node)], sources=[model.source_of(node.name)],
                      pass_name="fold-constants")


def _unfolded(model: CompilationModel, node: gs.Node, why: str) -> Diagnostic:
    message = f"{node.op} node with constant inputs could not be folded: {why}"
    return _diagnostic(model, node, Level.ERROR, "FLD001", message)


def _fold_error(model: CompilationModel, exc: Exception) -> UnsupportedModelError:
    """Find the first foldable node ONNX Runtime cannot evaluate on its own, and name it."""

    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    culprit = _first_failing_node(model.graph)
    if culprit is None:
        return UnsupportedModelError(
            f"constant folding failed: {type(exc).__name__}: {first_line}",
            hint="disable the pass with --disable-pass fold-constants to go on",
        )
    node, why = culprit
    return UnsupportedModelError(
        f"constant folding failed at node '{node_label(node)}' ({node.op}): {why}",
        diagnostics=[_unfolded(model, node, why)],
        hint="disable the pass with --disable-pass fold-constants to go on",
    )


def _first_failing_node(graph: gs.Graph) -> tuple[gs.Node, str] | None:
    values: dict[str, np.ndarray] = {
        name: t.values for name, t in graph.tensors().items() if isinstance(t, gs.Constant)
    }
    for node in foldable_nodes(graph):
        if node.op == "Constant":
            continue
        inputs = [t for t in node.inputs if not t.is_empty()]
        if not all(t.name in values for t in inputs):
            continue
        single = gs.Graph(
            nodes=[node.copy(inputs=[_const(t, values) for t in node.inputs],
                             outputs=[gs.Variable(t.name) for t in node.outputs])],
            opset=graph.opset,
            ir_version=graph.ir_version,
        )
        single.outputs = single.nodes[0].outputs
        try:
            session = make_session(gs.export_onnx(single, do_type_check=False))
            outputs = session.run(None, {})
        except Exception as exc:
            return node, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        values.update({t.name: v for t, v in zip(node.outputs, outputs, strict=True)})
    return None


def _const(tensor: gs.Tensor, values: dict[str, np.ndarray]) -> gs.Tensor:
    if tensor.is_empty():
        return gs.Variable.empty()
    return gs.Constant(tensor.name, values[tensor.name])
