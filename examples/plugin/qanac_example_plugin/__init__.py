"""A worked example of a third-party qanac pass (docs/writing-a-pass.md walks through it).

``merge-consecutive-relu`` rewrites ``Relu(Relu(x))`` into ``Relu(x)``: ReLU is idempotent, so the
rewrite is exact. It shows the whole pass contract: a registered name, a docstring, the targets served,
``exact=True``, a PassResult with counts, a check that says why a candidate was not rewritten, and
graph edits that keep graph output names.
"""

from __future__ import annotations

from qanac.graph import CompilationModel, bypass_node, nodes_of
from qanac.pipeline import PassContext
from qanac.registry import PassResult, register_pass


@register_pass("merge-consecutive-relu", targets=["*"], exact=True)
def merge_consecutive_relu(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Replace Relu(Relu(x)) by Relu(x) (ReLU is idempotent, so this is exact).

    Fires only when the inner Relu feeds nothing but the outer one; otherwise both stay.
    """

    result = PassResult()
    for outer in nodes_of(model.graph, ["Relu"]):
        inner = outer.i() if outer.inputs[0].inputs else None
        if inner is None or inner.op != "Relu":
            continue
        if len(inner.outputs[0].outputs) != 1:
            result.details.setdefault("not-merged", []).append(
                f"{inner.name}: its output has {len(inner.outputs[0].outputs)} consumers"
            )
            continue
        if bypass_node(model.graph, outer):
            result.count("merge-relu")
    return result
