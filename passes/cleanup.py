"""Removal of nodes that do nothing at inference time, and of legacy graph forms.

sum-to-add and remove-dropout-identity are rules (``qanac.rewrite``); remove-initializer-inputs edits the
graph's input list and IR version, not nodes, and stays a function.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qanac.graph import CompilationModel, bypass_node, constant_value, is_graph_output
from qanac.pipeline import PassContext
from qanac.registry import PassResult, register_pass
from qanac.rewrite import NoMatch, Rewriter, Rule, register_rules

# IR version 4 is the first in which an initializer need not also be listed as a graph input.
FIRST_IR_WITHOUT_INITIALIZER_INPUTS = 4


@register_pass("remove-initializer-inputs")
def remove_initializer_inputs(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Stop listing initializers as graph inputs (old zoo models, IR version < 4).

    Before IR 4 every initializer had to appear in ``graph.input`` too, which makes weights look like
    model inputs. onnx-graphsurgeon already keeps initializers out of ``graph.inputs`` on import; this
    pass removes any constant still listed there and raises the IR version to at least 4 so that the
    exported model is valid without them. Invariant: ``graph.inputs`` holds only real (fed) inputs.
    """

    result = PassResult()
    graph = model.graph
    listed = [t for t in graph.inputs if isinstance(t, gs.Constant)]
    if listed:
        graph.inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
        result.count("remove-initializer-input", len(listed))
    if graph.ir_version is not None and graph.ir_version < FIRST_IR_WITHOUT_INITIALIZER_INPUTS:
        initializers = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
        if initializers and not listed:
            # a valid IR<4 model listed every initializer as an input; the importer dropped them
            result.count("remove-initializer-input", len(initializers))
        result.details["ir_version"] = {"from": graph.ir_version, "to": FIRST_IR_WITHOUT_INITIALIZER_INPUTS}
        graph.ir_version = FIRST_IR_WITHOUT_INITIALIZER_INPUTS
        model.ir_version = FIRST_IR_WITHOUT_INITIALIZER_INPUTS
        result.changed = True
    return result


class SumToAdd(Rule):
    """Rewrite the legacy variadic ``Sum`` of exactly two inputs as ``Add`` (same broadcasting).

    A one-input Sum is its input and becomes an Identity (removed by remove-dropout-identity); a Sum of
    three or more inputs is left alone, with the reason. The node is renamed ``<name>::sum-to-add``.
    Invariant: no Sum with one or two inputs remains.
    """

    name = "sum-to-add"
    ops = ("Sum",)

    def check(self, rw: Rewriter, node: gs.Node) -> NoMatch | None:
        if len(node.inputs) not in (1, 2):
            return NoMatch(f"Sum of {len(node.inputs)} inputs")
        return None

    def rewrite(self, rw: Rewriter, node: gs.Node, found: None) -> None:
        node.op = "Add" if len(node.inputs) == 2 else "Identity"
        rw.rename(node)
        rw.count("sum-to-add" if node.op == "Add" else "sum-to-identity")


class RemoveDropoutIdentity(Rule):
    """Remove Identity nodes and inference-mode Dropout (including opset-9 Dropout with a mask output).

    A Dropout is in inference mode when it has no ``training_mode`` input or that input is a constant
    false. Left alone, with the reason: a Dropout whose mask output is consumed or is a graph output, or
    whose ``training_mode`` is not a constant false, and a node whose input cannot take over its output's
    name. Invariant: graph output names never change (when the removed node writes a graph output, its
    input's producer is made to write it); outputs are unchanged.
    """

    name = "remove-dropout-identity"
    ops = ("Identity", "Dropout")

    def check(self, rw: Rewriter, node: gs.Node) -> NoMatch | None:
        return _dropout_kept_because(rw.graph, node) if node.op == "Dropout" else None

    def rewrite(self, rw: Rewriter, node: gs.Node, found: None) -> NoMatch | None:
        op = node.op
        if not bypass_node(rw.graph, node):
            return NoMatch("its input cannot take over its output's name (graph input, constant or shared)")
        rw.count(f"remove-{op.lower()}")
        return None


def _dropout_kept_because(graph: gs.Graph, node: gs.Node) -> NoMatch | None:
    if len(node.outputs) > 1 and (node.outputs[1].outputs or is_graph_output(graph, node.outputs[1])):
        return NoMatch("its mask output is used")
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        training = constant_value(node.inputs[2])
        if training is None:
            return NoMatch("training_mode is not a constant")
        if bool(np.asarray(training).reshape(-1)[0]):
            return NoMatch("training_mode is true")
    return None


register_rules("sum-to-add", SumToAdd())
register_rules("remove-dropout-identity", RemoveDropoutIdentity())
