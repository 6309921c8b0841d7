"""The Akida acceptance table against the installed quantizeml, and lint judging quantizeml's view of a model.

- The table derived from quantizeml equals a pinned snapshot: an upgrade that changes its patterns fails here
  first (review patterns.QANAC and the rules with tests/akida/test_lint_reality.py, then update the snapshot).
- Every op qanac's own table names is one the vendor knows, or one its sanitizer turns into one it knows.
- The matcher finds the blocks quantizeml's own search_block_from_node finds.
- Lint judges the sanitized graph and names the model's nodes; it never mutates the graph it checks.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from qanac.backends.akida import patterns
from qanac.backends.akida.patterns import QANAC, vendor
from qanac.backends.akida.rules import AKIDA_RULES
from qanac.graph import CompilationModel
from qanac.lint import lint_model, topological_order, view_names
from qanac.targets import get_target
from tests.akida import akida_models
from tests.akida.akida_models import GraphBuilder
from tests.akida.lint_cases import bounded_relu_model

SNAPSHOT = {
    "version": "1.2.5",
    "patterns": (
        ("BRNPad", "Conv", "MaxPool", "Relu"), ("BRNPad", "Conv", "MaxPool", "Clip"),
        ("BRNPad", "Conv", "activation"), ("BRNPad", "Conv", "Relu"), ("BRNPad", "Conv", "Clip"),
        ("BRNPad", "Conv"),
        ("Conv", "Relu", "GlobalAveragePool"), ("Conv", "MaxPool", "Relu"), ("Conv", "GlobalAveragePool"),
        ("Conv", "Relu"), ("Conv", "Clip", "GlobalAveragePool"), ("Conv", "MaxPool", "Clip"),
        ("Conv", "activation", "GlobalAveragePool"), ("Conv", "Clip"), ("Conv", "activation"), ("Conv",),
        ("Flatten", "Gemm", "Relu"), ("Flatten", "Gemm", "Clip"), ("Flatten", "Gemm"),
        ("Gemm", "Relu"), ("Gemm", "Clip"), ("Gemm",), ("Add",), ("Concat",),
        ("ConvTranspose", "Clip"), ("ConvTranspose", "Relu"), ("ConvTranspose", "activation"), ("ConvTranspose",),
        ("BufferTempConv", "Relu"), ("DepthwiseBufferTempConv", "Relu"), ("BufferTempConv",),
        ("DepthwiseBufferTempConv",),
    ),
    "input_patterns": (("Cast", "Transpose"), ("Cast",), ("Transpose",)),
    "activation_token": "activation",
    "lut_activations": frozenset({"Gelu", "HardSwish", "LeakyRelu", "Swish"}),
}


def test_the_derived_table_is_the_pinned_snapshot():
    table = vendor()
    derived = {key: getattr(table, key) for key in SNAPSHOT}
    assert derived == SNAPSHOT, (
        f"quantizeml {table.version} changed what it fuses into Akida layers: review backends/akida/patterns.py "
        "(QANAC) and the lint rules against tests/akida/test_lint_reality.py, then update SNAPSHOT"
    )
    assert table.prelude_tokens == {"BRNPad", "Flatten"}


def _main_ops_and_fused_tokens(table):
    mains, fused = set(), set()
    for pattern in table.patterns:
        main = next(i for i, token in enumerate(pattern) if token not in table.prelude_tokens)
        mains.add(pattern[main])
        fused.update(pattern[main + 1:])
    return mains, fused


def test_qanac_table_names_ops_the_vendor_knows():
    table = vendor()
    _, fused = _main_ops_and_fused_tokens(table)
    assert set(QANAC.fused_roles) == fused
    # Relu, Clip and the LUT activations are the vendor's; PRelu is made LeakyRelu by its sanitizer (below).
    assert {"Relu", "Clip"} | table.lut_activations <= QANAC.activations
    assert QANAC.activations - {"PRelu"} <= table.known_ops
    # What the sanitizer removes in front of the first layer is never a layer of its own (an Add is, but
    # not an Add of a constant: that is folded into the layer).
    assert not QANAC.folded_at_input & table.known_ops
    # A refusal of a layer quantizeml matches names a matched op; every op that can be left uncovered has a
    # refusal, so lint reports it.
    for op, entries in QANAC.refusals.items():
        assert all(not e.layer or op in table.known_ops for e in entries), op
    alone = {p[0] for p in table.patterns if len(p) == 1}
    uncoverable = {t for p in table.patterns + table.input_patterns for t in p} - alone - table.prelude_tokens
    assert uncoverable <= set(QANAC.refusals)
    codes = {rule.code for rule in AKIDA_RULES}
    assert {e.code for entries in QANAC.refusals.values() for e in entries} | {QANAC.default_refusal.code} <= codes


def lint(model: onnx.ModelProto):
    return lint_model(CompilationModel.from_onnx(model), get_target("akida"))


def test_relu_min_max_before_global_pooling_is_the_clip_quantizeml_fuses():
    findings = lint(bounded_relu_model("relu_min_max"))
    assert findings == [], [f.format() for f in findings]


def test_a_min_without_lower_bound_is_still_refused_under_the_model_name():
    findings = lint(bounded_relu_model("min_only"))
    by_code = {f.code: f for f in findings}
    assert set(by_code) == {"AKD104"}, [f.format() for f in findings]
    assert by_code["AKD104"].nodes == ["min3"]  # the Min, not the Clip the sanitizer made of it
    assert "min none" in by_code["AKD104"].message


def _maxpool_model(activation_after_pool: bool) -> onnx.ModelProto:
    g = GraphBuilder()
    x = g.relu(g.conv("input", "c1", 3, 16, stride=2), "r1")
    x = g.conv(x, "c2", 16, 16)
    x = g.op("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    if activation_after_pool:
        x = g.relu(x, "r2")
    x = g.relu(g.conv(x, "c3", 16, 32), "r3")
    return g.model(g.classifier(x, 32), (3, 32, 32), [10])


def test_max_pooling_needs_the_activation_quantizeml_fuses_it_with():
    # (Conv, MaxPool) is no quantizeml pattern: the pooling stays unquantized (measured in test_lint_reality)
    findings = lint(_maxpool_model(False))
    assert [(f.code, f.nodes) for f in findings] == [("AKD116", ["pool"])], [f.format() for f in findings]
    assert "no pattern Conv -> MaxPool" in findings[0].message
    assert lint(_maxpool_model(True)) == []


def test_global_pooling_after_a_max_pooled_layer_is_refused():
    g = GraphBuilder()
    x = g.relu(g.conv("input", "c1", 3, 16, stride=2), "r1")
    x = g.op("MaxPool", [g.conv(x, "c2", 16, 32)], "pool", kernel_shape=[2, 2], strides=[2, 2])
    x = g.relu(x, "r2")
    findings = lint(g.model(g.classifier(x, 32), (3, 32, 32), [10]))
    assert {(f.code, f.nodes[0]) for f in findings} == {("AKD113", "head_gap"), ("AKD204", "c2")}
    gap = next(f for f in findings if f.code == "AKD113")
    assert "no pattern Conv -> MaxPool -> Relu -> GlobalAveragePool" in gap.message


def _input_read_twice(scale: str) -> onnx.ModelProto:
    """The input feeds two convolutions whose Concat goes through a per-channel affine (a BatchNorm after the
    Concat, as batchnorm-to-affine leaves it) and a ReLU: the QANA paper variant's first block."""

    g = GraphBuilder()
    x = g.op("Concat", [g.conv("input", "left", 3, 8), g.conv("input", "right", 3, 8)], "cat", axis=1)
    gain = g.constant("gain", np.linspace(0.5, 1.5, 16).reshape(1, 16, 1, 1))
    other = g.relu(g.conv("input", "other", 3, 16), "other_relu")
    x = g.op("Mul", [x, gain if scale == "constant" else other], "affine_mul")
    x = g.op("Add", [x, g.constant("shift", np.full((1, 16, 1, 1), 0.1))], "affine_add")
    x = g.relu(g.conv(g.relu(x, "r1"), "c2", 16, 16), "r2")
    return g.model(g.classifier(x, 16), (3, 8, 8), [10])


def test_an_input_read_by_several_nodes_is_judged_with_the_backend_first_layer():
    # quantizeml's sanitizer refuses an input with several readers; the backend gives every such segment an
    # identity first layer, after which the sanitizer folds the affine into an identity conv after the Concat
    assert lint(_input_read_twice("constant")) == []
    findings = lint(_input_read_twice("tensor"))  # the view is used, not bypassed: a real gate is still found
    assert [(f.code, f.nodes) for f in findings if f.code == "AKD103"] == [("AKD103", ["affine_mul"])], \
        [f.format() for f in findings]


def test_sanitizer_equivalences_the_table_relies_on():
    # Relu -> Min -> Max is one Clip(0, 6); PyTorch's Conv -> Relu -> MaxPool becomes Conv -> MaxPool -> Relu;
    # a PRelu with one slope becomes a LUT activation.
    view = gs.import_onnx(patterns.sanitized(bounded_relu_model("relu_min_max", pool=False)))
    assert [n.op for n in topological_order(view)][-2:] == ["Conv", "Clip"]
    clip = [n for n in view.nodes if n.op == "Clip"][0]
    assert [float(t.values) for t in clip.inputs[1:]] == [0.0, 6.0]

    g = GraphBuilder()
    x = g.relu(g.conv("input", "c1", 3, 16, stride=2), "r1")
    x = g.op("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    x = g.op("PRelu", [g.conv(x, "c2", 16, 16), g.constant("slope", np.full((16, 1, 1), 0.25))], "prelu")
    model = g.model(x, (3, 32, 32), [16, 8, 8])
    view = gs.import_onnx(patterns.sanitized(model))
    assert [patterns.vendor().token(n.op, n.domain) for n in topological_order(view)] == [
        "Conv", "MaxPool", "Relu", "Conv", "activation"]
    names = view_names(CompilationModel.from_onnx(model).graph, view)
    assert sorted(names.get(n.name, n.name) for n in view.nodes) == ["c1", "c2", "pool", "prelu", "r1"]


def test_blocks_are_those_quantizeml_finds():
    from quantizeml.onnx_support.quantization.model import ONNXModel
    from quantizeml.onnx_support.quantization.quantize import search_block_from_node

    for model in (akida_models.tiny_cnn(), _maxpool_model(True), _maxpool_model(False)):
        sanitized = patterns.sanitized(model)
        onnx_model = ONNXModel(sanitized)
        graph = gs.import_onnx(sanitized)
        outputs = {t.name for t in graph.outputs}
        by_name = {n.name: n for n in graph.nodes}
        for node in onnx_model.nodes():
            found = search_block_from_node(node, onnx_model)
            ours = patterns.match_block(by_name[node.name], outputs)
            assert (None if found is None else [n.name for n in found[0]]) == (
                None if ours is None else [n.name for n in ours]), node.name


def test_the_first_layer_has_one_definition():
    from qanac.backends.akida.convert import first_layer

    g = GraphBuilder()
    x = g.op("Mul", ["input", g.constant("scale_k", np.full((1, 3, 1, 1), 2.0))], "scale")
    x = g.op("Sub", [x, g.constant("mean_k", np.full((1, 3, 1, 1), 0.5))], "center")
    x = g.op("Identity", [x], "same")
    x = g.relu(g.conv(x, "first", 3, 8, stride=2), "r")
    model = g.model(g.classifier(x, 8), (3, 16, 16), [10])
    assert first_layer(model).name == "first"
    assert patterns.input_layer(gs.import_onnx(model)).name == "first"
    assert first_layer(akida_models.first_gemm()).op_type == "Gemm"  # past the Flatten prelude
    view = gs.import_onnx(patterns.sanitized(model))
    assert patterns.input_layer(view).op == "Conv"  # the sanitizer folded the rescaling into it


def test_lint_never_mutates_the_graph():
    model = CompilationModel.from_onnx(akida_models.tiny_cnn())
    model.graph.nodes.reverse()  # out of topological order on purpose
    before = [n.name for n in model.graph.nodes]
    findings = lint_model(model, get_target("akida"))
    assert [n.name for n in model.graph.nodes] == before
    assert findings == []


@pytest.mark.parametrize("target", ["onnxruntime"])
def test_a_target_without_a_view_lints_without_the_vendor_stack(target):
    import subprocess
    import sys

    code = ("import sys\nfrom qanac.graph import CompilationModel\nfrom qanac.lint import lint_model\n"
            "from qanac.targets import get_target\nfrom tests.akida.akida_models import tiny_cnn\n"
            f"lint_model(CompilationModel.from_onnx(tiny_cnn()), get_target({target!r}))\n"
            "print(sorted(m for m in ('tensorflow', 'quantizeml') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
