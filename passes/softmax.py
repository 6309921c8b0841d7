"""Moving a trailing Softmax/LogSoftmax from the graph to host-side post-processing.

A classifier's final Softmax does not change its argmax, costs a lot on spiking and integer hardware,
and is applied on the host from the bundle's ``post_processing`` record instead (see
``qanac.execution.apply_post_processing``), so the compiled model plus post-processing computes what
the float model did.
"""

from __future__ import annotations

from qanac.graph import CompilationModel, bypass_node, is_graph_output, nodes_of
from qanac.pipeline import PassContext
from qanac.registry import PassResult, register_pass
from qanac.passes._rewrite import known_rank, node_label

RULE = "strip-trailing-softmax"


def _normalised_axis(node, rank: int, opset: int) -> int:
    default = -1 if opset >= 13 else 1
    axis = int(node.attrs.get("axis", default))
    return axis + rank if axis < 0 else axis


@register_pass(RULE)
def strip_trailing_softmax(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Remove a Softmax or LogSoftmax whose output is a graph output and record it as post-processing.

    Applies only over the last axis (which includes axis 1 of a 2-D tensor) and when the output feeds
    nothing else; the graph output keeps its name (the Softmax's input producer writes it) and
    ``model.post_processing`` gets ``{"op": "Softmax"|"LogSoftmax", "axis": -1, "output": name}`` (the
    last axis, whatever the rank), inserted before any step already recorded for that output. A Softmax feeding another node is left alone.
    Invariant: graph outputs with post-processing applied equal the model's outputs.
    """

    result = PassResult()
    skipped: dict[str, str] = {}
    graph = model.graph
    for node in nodes_of(graph, ["Softmax", "LogSoftmax"]):
        y = node.outputs[0]
        if not is_graph_output(graph, y):
            continue
        label = node_label(node)
        if y.outputs:
            skipped[label] = "its output also feeds other nodes"
            continue
        rank = known_rank(node.inputs[0]) or known_rank(y)
        if rank is None:
            skipped[label] = "input rank unknown (run infer-shapes)"
            continue
        axis = _normalised_axis(node, rank, graph.opset)
        if axis != rank - 1:
            skipped[label] = f"normalises over axis {axis}, not the last axis of a rank-{rank} tensor"
            continue
        op, output = node.op, y.name
        if not bypass_node(graph, node):
            skipped[label] = "its input is a graph input, a constant or used elsewhere"
            continue
        step = {"op": op, "axis": -1, "output": output}
        position = next(
            (i for i, p in enumerate(model.post_processing) if p.get("output") == output), len(model.post_processing)
        )
        model.post_processing.insert(position, step)
        result.count(f"strip-{op.lower()}")
    if skipped:
        result.details["skipped"] = skipped
    return result
