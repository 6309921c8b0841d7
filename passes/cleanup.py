"""Removal of nodes that do nothing at inference time, and of legacy graph forms."""

from __future__ import annotations

from qanac.graph import CompilationModel, bypass_node, nodes_of
from qanac.pipeline import PassContext
from qanac.registry import PassResult, register_pass


@register_pass("remove-dropout-identity")
def remove_dropout_identity(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Remove Identity nodes and inference-mode Dropout (including opset-9 Dropout with a mask output).

    A Dropout whose mask output is consumed, or whose ``training_mode`` input is not a constant false,
    is left alone. Graph output names never change.
    """

    result = PassResult()
    for node in nodes_of(model.graph, ["Identity", "Dropout"]):
        if node.op == "Dropout":
            if len(node.outputs) > 1 and node.outputs[1].outputs:
                continue
            if len(node.inputs) > 2 and node.inputs[2].name:
                continue
            while len(node.outputs) > 1:
                node.outputs.pop()
        if bypass_node(model.graph, node):
            result.count(f"remove-{node.op.lower() or 'node'}")
    return result
