"""A worked example of a third-party qanac pass (docs/writing-a-pass.md walks through it).

``merge-consecutive-relu`` rewrites ``Relu(Relu(x))`` into ``Relu(x)``: ReLU is idempotent, so the
rewrite is exact. It shows the whole contract of a pass made of a rule: the op types it looks at, a
``match`` that picks candidates, a ``check`` that never edits the graph and says why a candidate is left
(``NoMatch``), a ``rewrite`` that keeps graph output names, and the registration (name, documentation,
targets, exactness). tests/passes/test_example_plugin.py tests it with ``qanac.testing``.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qanac.graph import bypass_node
from qanac.rewrite import NoMatch, Rewriter, Rule, register_rules


class MergeConsecutiveRelu(Rule):
    """Replace Relu(Relu(x)) by Relu(x) (ReLU is idempotent, so this is exact).

    Fires on an outer Relu whose input an inner Relu writes, when the inner Relu feeds nothing but the
    outer one; otherwise both stay, and the reason is recorded under the inner Relu's name. The outer
    Relu goes, so graph output names never change.
    """

    name = "merge-relu"
    ops = ("Relu",)

    def match(self, rw: Rewriter, outer: gs.Node) -> bool:
        x = outer.inputs[0]
        return len(x.inputs) == 1 and x.inputs[0].op == "Relu"

    def check(self, rw: Rewriter, outer: gs.Node) -> NoMatch | None:
        inner = outer.inputs[0].inputs[0]
        readers = len(inner.outputs[0].outputs)
        if readers != 1:
            return NoMatch(f"its output has {readers} consumers", inner)
        return None

    def rewrite(self, rw: Rewriter, outer: gs.Node, found: None) -> NoMatch | None:
        if not bypass_node(rw.graph, outer):
            return NoMatch("its input cannot take over its output's name")
        return None


register_rules("merge-consecutive-relu", MergeConsecutiveRelu(), targets=["*"], exact=True)
