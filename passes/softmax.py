"""Moving a trailing Softmax/LogSoftmax from the graph to host-side post-processing.

A classifier's final Softmax does not change its argmax, costs a lot on spiking and integer hardware,
and is applied on the host from the bundle's ``post_processing`` record instead (see
``qanac.execution.apply_post_processing``), so the compiled model plus post-processing computes what
the float model did.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qanac.graph import bypass_node, is_graph_output
from qanac.passes._rewrite import known_rank
from qanac.rewrite import NoMatch, Rewriter, Rule, register_rules

RULE = "strip-trailing-softmax"


def _normalised_axis(node, rank: int, opset: int) -> int:
    default = -1 if opset >= 13 else 1
    axis = int(node.attrs.get("axis", default))
    return axis + rank if axis < 0 else axis


class StripTrailingSoftmax(Rule):
    """Remove a Softmax or LogSoftmax whose output is a graph output and record it as post-processing.

    Applies only over the last axis (which includes axis 1 of a 2-D tensor) and when the output feeds
    nothing else; the graph output keeps its name (the Softmax's input producer writes it) and
    ``model.post_processing`` gets ``{"op": "Softmax"|"LogSoftmax", "axis": -1, "output": name}`` (the
    last axis, whatever the rank), inserted before any step already recorded for that output. A Softmax
    that does not write a graph output is not a candidate. Invariant: graph outputs with post-processing
    applied equal the model's outputs.
    """

    name = RULE
    ops = ("Softmax", "LogSoftmax")

    def match(self, rw: Rewriter, node: gs.Node) -> bool:
        return is_graph_output(rw.graph, node.outputs[0])

    def check(self, rw: Rewriter, node: gs.Node) -> NoMatch | None:
        y = node.outputs[0]
        if y.outputs:
            return NoMatch("its output also feeds other nodes")
        rank = known_rank(node.inputs[0]) or known_rank(y)
        if rank is None:
            return NoMatch("input rank unknown (run infer-shapes)")
        axis = _normalised_axis(node, rank, rw.graph.opset)
        if axis != rank - 1:
            return NoMatch(f"normalises over axis {axis}, not the last axis of a rank-{rank} tensor")
        return None

    def rewrite(self, rw: Rewriter, node: gs.Node, found: None) -> NoMatch | None:
        op, output = node.op, node.outputs[0].name
        if not bypass_node(rw.graph, node):
            return NoMatch("its input is a graph input, a constant or used elsewhere")
        post = rw.model.post_processing
        position = next((i for i, p in enumerate(post) if p.get("output") == output), len(post))
        post.insert(position, {"op": op, "axis": -1, "output": output})
        rw.count(f"strip-{op.lower()}")
        return None


register_rules(RULE, StripTrailingSoftmax())
