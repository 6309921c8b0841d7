"""The example plugin (examples/plugin): its rule fires on Relu(Relu(x)), and where it must not, it says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from qanac import registry
from qanac.testing import apply_pass, assert_outputs_equal, ops, parse, random_inputs, rewrite_and_compare

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "plugin" / "qanac_example_plugin" / "__init__.py"
PASS = "merge-consecutive-relu"


@pytest.fixture(autouse=True)
def example_plugin():
    """The plugin freshly loaded from its file; the registry as it was afterwards."""

    passes, plugins = dict(registry._REGISTRY), set(registry._loaded_plugins)
    registry.unregister_pass(PASS)
    registry._loaded_plugins.discard(str(PLUGIN))
    registry.load_plugin_file(PLUGIN)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(passes)
    registry._loaded_plugins.clear()
    registry._loaded_plugins.update(plugins)


def test_double_relu_merges_and_outputs_stay():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y) {
          [neg] n = Neg(x)
          [inner] r = Relu(n)
          [outer] y = Relu(r)
        }
        """
    )
    compiled, counts, details = rewrite_and_compare(model, PASS)
    assert counts == {"merge-relu": 1} and details == {}
    assert ops(compiled) == ["Neg", "Relu"]
    assert compiled.graph.nodes[1].name == "inner" and compiled.graph.outputs[0].name == "y"


def test_chain_of_three_relus_merges_in_one_application():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y) {
          [a] r1 = Relu(x)
          [b] r2 = Relu(r1)
          [c] y = Relu(r2)
        }
        """
    )
    compiled, result = apply_pass(model, PASS)
    assert result.counts == {"merge-relu": 2}
    assert ops(compiled) == ["Relu"]
    assert_outputs_equal(model, compiled, random_inputs(model))


def test_inner_relu_read_twice_is_left_with_its_reason():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y, float[N,4] z) {
          [inner] r = Relu(x)
          [outer] y = Relu(r)
          [other] z = Neg(r)
        }
        """
    )
    compiled, result = apply_pass(model, PASS)
    assert not result.changed and result.counts == {}
    assert result.details["skipped"] == {"inner": "its output has 2 consumers"}
    assert ops(compiled) == ["Relu", "Relu", "Neg"]
