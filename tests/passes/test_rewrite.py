"""The rule framework (qanac.rewrite): counts, skip reasons under node names, provenance names, candidates
that must not fire, iteration that stays safe while rewrites edit the graph, and registration as a pass."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qanac import registry
from qanac.graph import CompilationModel, bypass_node, constant_value, is_graph_output, single_consumer
from qanac.pipeline import PassContext
from qanac.registry import PassRegistrationError, PassResult
from qanac.rewrite import NoMatch, Rewriter, Rule, apply_rules, register_rules
from qanac.testing import assert_outputs_equal, ops, parse, random_inputs, verify_pipeline

ADDS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y)
<float[4] c1 = {1.0, -2.0, 3.0, 0.5}, float[4] c2 = {0.25, 0.5, -1.0, 2.0}>
{
  [a1] t = Add(x, c1)
  [a2] u = Add(t, x)
  [a3] y = Add(u, c2)
}
"""


class AddConstantToSub(Rule):
    """Write x + c (c constant) as x - (-c): a new Sub node and a new constant."""

    name = "add-constant-to-sub"
    ops = ("Add",)

    def check(self, rw: Rewriter, add: gs.Node) -> NoMatch | np.ndarray:
        value = constant_value(add.inputs[1])
        if value is None:
            return NoMatch("adds a computed tensor")
        return value

    def rewrite(self, rw: Rewriter, add: gs.Node, value: np.ndarray) -> None:
        name = rw.name(add)
        sub = gs.Node("Sub", name, inputs=[add.inputs[0], rw.constant(f"{name}/negated", -value)],
                      outputs=[add.outputs[0]])
        rw.remove(add)
        rw.graph.nodes.append(sub)
        rw.count("add-to-sub")


def run_rules(text: str, *rules: Rule, name: str = "test-rules") -> tuple[CompilationModel, PassResult]:
    model = CompilationModel.from_onnx(parse(text))
    result = apply_rules(model, PassContext(target="onnxruntime"), name, rules)
    model.graph.cleanup().toposort()
    return model, result


def test_counts_skip_reasons_and_provenance_names():
    model, result = run_rules(ADDS, AddConstantToSub(), name="add-to-sub-pass")
    assert result.changed and result.counts == {"add-to-sub": 2}
    assert result.details == {"skipped": {"a2": "adds a computed tensor"}}
    assert ops(model) == ["Sub", "Add", "Sub"]
    assert [n.name for n in model.graph.nodes] == ["a1::add-to-sub-pass", "a2", "a3::add-to-sub-pass"]
    assert model.provenance == {"a1::add-to-sub-pass": "add-to-sub-pass", "a3::add-to-sub-pass": "add-to-sub-pass"}
    assert model.graph.nodes[0].inputs[1].name == "a1::add-to-sub-pass/negated"
    assert_outputs_equal(parse(ADDS), model, random_inputs(parse(ADDS)))


def test_a_candidate_that_must_not_fire_leaves_the_graph_as_it_was():
    text = ADDS.replace("Add(x, c1)", "Add(x, x)").replace("Add(u, c2)", "Add(u, u)")
    model, result = run_rules(text, AddConstantToSub())
    assert not result.changed and result.counts == {}
    assert result.details["skipped"] == {name: "adds a computed tensor" for name in ("a1", "a2", "a3")}
    assert ops(model) == ["Add", "Add", "Add"] and model.provenance == {}


class ReluChainRule(Rule):
    """Base for the Relu-chain rules below: candidates are Relus."""

    ops = ("Relu",)

    def check(self, rw: Rewriter, relu: gs.Node) -> None:
        return None


class AppendRelu(ReluChainRule):
    """Put a new Relu after every Relu: the rule creates nodes of the op type it looks at."""

    name = "append-relu"

    def rewrite(self, rw: Rewriter, relu: gs.Node, found: None) -> None:
        out = relu.outputs[0]
        fresh = rw.variable(f"{rw.name(relu)}/in", out)
        relu.outputs[0] = fresh
        rw.graph.nodes.append(gs.Node("Relu", rw.name(relu), inputs=[fresh], outputs=[out]))


class AbsorbNextRelu(ReluChainRule):
    """Remove the Relu that reads this one: the rule disconnects a later candidate."""

    name = "absorb-next-relu"

    def match(self, rw: Rewriter, relu: gs.Node) -> bool:
        reader = single_consumer(relu.outputs[0])
        return reader is not None and reader.op == "Relu" and not is_graph_output(rw.graph, reader.outputs[0])

    def rewrite(self, rw: Rewriter, relu: gs.Node, found: None) -> NoMatch | None:
        if not bypass_node(rw.graph, relu.outputs[0].outputs[0]):
            return NoMatch("the next Relu cannot be bypassed")
        return None


RELUS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y)
{
  [r1] a = Relu(x)
  [r2] b = Relu(a)
  [r3] c = Relu(b)
  [r4] y = Relu(c)
}
"""


def test_nodes_a_rewrite_creates_wait_for_the_next_application():
    model, result = run_rules(RELUS, AppendRelu())
    assert result.counts == {"append-relu": 4} and len(model.graph.nodes) == 8
    assert sum(1 for tag in model.provenance.values() if tag == "test-rules") == 4
    _, again = run_rules(RELUS, AppendRelu())
    assert again.counts == {"append-relu": 4}


def test_a_candidate_disconnected_by_an_earlier_rewrite_is_not_visited():
    model, result = run_rules(RELUS, AbsorbNextRelu())
    # r1 absorbs r2; r2 is gone before its turn; r3 feeds r4, which writes the graph output
    assert result.counts == {"absorb-next-relu": 1}
    assert [n.name for n in model.graph.nodes] == ["r1", "r3", "r4"]
    assert "skipped" not in result.details
    assert_outputs_equal(parse(RELUS), model, random_inputs(parse(RELUS)))


class Refuse(ReluChainRule):
    """Refuse every Relu, naming ``about`` (a node name) or the candidate."""

    def __init__(self, name: str, about: str | None = None):
        self.name = name
        self.about = about

    def check(self, rw: Rewriter, relu: gs.Node) -> NoMatch:
        if self.about is None:
            return NoMatch(f"refused by {self.name}")
        other = next(n for n in rw.graph.nodes if n.name == self.about)
        return NoMatch(f"refused by {self.name}", other)


def test_the_first_reason_for_a_node_is_kept_and_a_reason_goes_under_the_nodes_it_names():
    _, result = run_rules(RELUS, Refuse("first"), Refuse("second"), Refuse("about-r4", about="r4"))
    # r4's reason is recorded while r1 is the candidate, before r4's own turn; "second" never gets a say
    assert result.details["skipped"] == {"r1": "refused by first", "r4": "refused by about-r4",
                                         "r2": "refused by first", "r3": "refused by first"}


def test_a_rewrite_that_refuses_counts_nothing_and_leaves_its_reason():
    class RefuseLate(ReluChainRule):
        name = "refuse-late"

        def rewrite(self, rw: Rewriter, relu: gs.Node, found: None) -> NoMatch:
            return NoMatch("changed its mind")

    model, result = run_rules(RELUS, RefuseLate())
    assert not result.changed and result.counts == {}
    assert set(result.details["skipped"].values()) == {"changed its mind"} and len(result.details["skipped"]) == 4
    assert ops(model) == ["Relu"] * 4 and model.provenance == {}


def test_a_rewrite_that_names_no_count_counts_under_the_rule_name():
    class Rename(ReluChainRule):
        name = "rename-relu"

        def rewrite(self, rw: Rewriter, relu: gs.Node, found: None) -> None:
            rw.rename(relu)

    model, result = run_rules(RELUS, Rename(), name="renamer")
    assert result.counts == {"rename-relu": 4}
    assert [n.name for n in model.graph.nodes] == [f"r{i}::renamer" for i in range(1, 5)]
    assert set(model.provenance.values()) == {"renamer"}


def test_prepare_runs_once_before_any_rewrite_with_this_rules_candidates_only():
    seen: list[list[str]] = []

    class Measure(Rule):
        name = "measure"
        ops = ("Relu",)

        def prepare(self, rw: Rewriter, candidates: list[gs.Node]) -> dict[str, int]:
            seen.append([n.name for n in candidates])
            return {n.name: i for i, n in enumerate(candidates)}

        def check(self, rw: Rewriter, relu: gs.Node) -> int:
            return rw.prepared[relu.name]

        def rewrite(self, rw: Rewriter, relu: gs.Node, position: int) -> None:
            rw.note("positions", relu, position)

    _, result = run_rules(ADDS.replace("[a2] u = Add(t, x)", "[relu] u = Relu(t)"), AddConstantToSub(), Measure())
    assert seen == [["relu"]]
    assert result.details["positions"] == {"relu": 0}
    seen.clear()
    run_rules(ADDS, Measure())
    assert seen == []  # no Relu: no candidates, no prepare


@pytest.fixture
def add_to_sub_pass():
    yield register_rules("test-add-to-sub", AddConstantToSub())
    registry.unregister_pass("test-add-to-sub")


def test_rules_register_as_a_pass_the_pipeline_runs(add_to_sub_pass):
    info = add_to_sub_pass
    assert info.summary == "Write x + c (c constant) as x - (-c): a new Sub node and a new constant."
    assert "test_rewrite" in info.origin and info.exact and info.serves("onnxruntime")
    assert [type(rule) for rule in info.fn.rules] == [AddConstantToSub]
    model = parse(ADDS)
    compiled, report = verify_pipeline(model, ["test-add-to-sub"], random_inputs(model))
    totals = report.totals()["test-add-to-sub"]
    assert totals["counts"] == {"add-to-sub": 2} and totals["max_abs_change"] <= 1e-6
    assert report.skipped() == {"test-add-to-sub": {"a2": "adds a computed tensor"}}
    assert ops(compiled) == ["Sub", "Add", "Sub"]


def test_a_pass_of_several_rules_needs_its_own_documentation():
    with pytest.raises(PassRegistrationError, match="no docstring"):
        register_rules("test-undocumented", AddConstantToSub(), AppendRelu())
    with pytest.raises(PassRegistrationError, match="no rules"):
        register_rules("test-empty")
