"""The pipeline runner: fixed point, convergence bound, instruments and the reproducer; the graph indexes
(fresh tensor names, identity disconnection) that keep its cost linear."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from qanac import registry
from qanac.calibration import CalibrationData, Preprocessing
from qanac.diagnostics import InternalError, UsageError, VerificationError
from qanac.graph import CompilationModel, disconnect, fresh_tensor_name, nodes_of, refresh_tensor_names, replace_uses
from qanac.pipeline import PassContext, PipelineOptions, run_pipeline
from qanac.registry import PassResult, register_pass
from tests.conftest import parse

RELU_CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) {
  a = Relu(x)
  b = Identity(a)
  y = Neg(b)
}
"""


@pytest.fixture
def clean_registry():
    registry.load_builtin_passes()
    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


def calibration(n: int = 8) -> CalibrationData:
    data = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    return CalibrationData(arrays={"x": data}, source="test", preprocessing=Preprocessing())


def model() -> CompilationModel:
    return CompilationModel.from_onnx(parse(RELU_CHAIN))


def test_runs_to_fixed_point_and_counts(clean_registry, tmp_path):
    m = model()
    options = PipelineOptions(dump_dir=tmp_path, verify_each=True)
    report = run_pipeline(m, ["remove-dropout-identity"], PassContext("onnxruntime", calibration()), options)
    assert report.iterations == 2  # one sweep that changed, one that confirmed the fixed point
    assert report.totals()["remove-dropout-identity"]["counts"] == {"remove-identity": 1}
    assert [n.op for n in m.graph.nodes] == ["Relu", "Neg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_input.onnx", "001_remove-dropout-identity.onnx"]
    dumped = onnx.load(str(tmp_path / "001_remove-dropout-identity.onnx"))
    assert [n.op_type for n in dumped.graph.node] == ["Relu", "Neg"]


def test_non_convergence_is_an_error(clean_registry):
    @register_pass("test-flip")
    def flip(model, ctx):
        """Toggle Neg <-> Abs forever (a broken pass pair in one)."""
        result = PassResult()
        for node in nodes_of(model.graph, ["Neg", "Abs"]):
            node.op = "Abs" if node.op == "Neg" else "Neg"
            result.count("flip")
        return result

    with pytest.raises(InternalError, match="did not converge in 3 sweeps.*test-flip"):
        run_pipeline(model(), ["test-flip"], PassContext("onnxruntime"), PipelineOptions(max_iterations=3))


def register_neg_to_abs(name: str) -> None:
    """A pass that claims to be exact but turns Neg into Abs (a bug verify-each must catch)."""

    @register_pass(name)
    def wrong(model, ctx):
        """Claims to be exact but turns Neg into Abs."""
        result = PassResult()
        for node in nodes_of(model.graph, ["Neg"]):
            node.op = "Abs"
            result.count("neg-to-abs")
        return result


def test_verify_each_catches_a_wrong_exact_pass(clean_registry, tmp_path):
    register_neg_to_abs("test-wrong")
    with pytest.raises(InternalError, match="exact pass 'test-wrong' changed the outputs") as excinfo:
        run_pipeline(
            model(), ["test-wrong"], PassContext("onnxruntime", calibration()),
            PipelineOptions(verify_each=True, dump_dir=tmp_path),
        )
    assert "reproducer" in excinfo.value.hint
    assert (tmp_path / "reproducer" / "before_test-wrong.onnx").exists()


def test_without_verify_each_a_wrong_exact_pass_is_not_checked(clean_registry):
    register_neg_to_abs("test-wrong-unchecked")
    report = run_pipeline(model(), ["test-wrong-unchecked"], PassContext("onnxruntime", calibration()))
    assert report.records[0].max_abs_change is None


def test_crashing_pass_leaves_reproducer(clean_registry, tmp_path):
    @register_pass("test-crash")
    def crash(model, ctx):
        """Always fails."""
        raise ZeroDivisionError("boom")

    with pytest.raises(InternalError, match="test-crash.*ZeroDivisionError: boom"):
        run_pipeline(
            model(), ["remove-dropout-identity", "test-crash"], PassContext("onnxruntime"),
            PipelineOptions(dump_dir=tmp_path),
        )
    repro = tmp_path / "reproducer"
    before = onnx.load(str(repro / "before_test-crash.onnx"))
    assert [n.op_type for n in before.graph.node] == ["Relu", "Neg"]  # the state just before the crash
    assert "remove-dropout-identity,test-crash" in (repro / "pipeline.txt").read_text()


def test_approximate_pass_needs_opt_in_and_reports_deviation(clean_registry):
    @register_pass("test-approx", exact=False)
    def approx(model, ctx):
        """Replace Relu by Identity (approximate)."""
        result = PassResult()
        for node in nodes_of(model.graph, ["Relu"]):
            node.op = "Identity"
            result.count("relu-to-identity")
        return result

    skipped = run_pipeline(model(), ["test-approx"], PassContext("onnxruntime", calibration()))
    assert skipped.records == []

    ctx = PassContext("onnxruntime", calibration(), approximations=frozenset({"test-approx"}))
    report = run_pipeline(model(), ["test-approx"], ctx)
    deviation = report.totals()["test-approx"]["max_abs_change"]
    x = calibration().arrays["x"][:8]
    assert deviation == pytest.approx(float(np.max(np.abs(np.minimum(x, 0)))), rel=1e-6)
    assert report.float_reference is not None

    with pytest.raises(VerificationError, match="max-deviation"):
        run_pipeline(model(), ["test-approx"], ctx, PipelineOptions(max_deviation=deviation / 2))


def test_disable_and_stop_after(clean_registry):
    m = model()
    report = run_pipeline(m, ["remove-dropout-identity"], PassContext("onnxruntime"),
                          PipelineOptions(disabled=frozenset({"remove-dropout-identity"})))
    assert report.records == [] and [n.op for n in m.graph.nodes] == ["Relu", "Identity", "Neg"]
    report = run_pipeline(m, ["remove-dropout-identity"], PassContext("onnxruntime"),
                          PipelineOptions(stop_after="remove-dropout-identity"))
    assert report.stopped_after == "remove-dropout-identity"
    with pytest.raises(UsageError, match="unknown pass"):
        run_pipeline(m, ["remove-dropout-identity"], PassContext("onnxruntime"),
                     PipelineOptions(stop_after="nope"))


def register_approx_relu_to_identity(name: str) -> None:
    @register_pass(name, exact=False)
    def approx(model, ctx):
        """Replace Relu by Identity (approximate)."""
        result = PassResult()
        for node in nodes_of(model.graph, ["Relu"]):
            node.op = "Identity"
            result.count("relu-to-identity")
        return result


def test_stop_after_a_pass_that_would_not_run_is_refused(clean_registry):
    register_approx_relu_to_identity("test-approx-stop")
    pipeline = ["remove-dropout-identity", "test-approx-stop"]
    with pytest.raises(UsageError, match="approximate pass 'test-approx-stop'") as excinfo:
        run_pipeline(model(), pipeline, PassContext("onnxruntime", calibration()),
                     PipelineOptions(stop_after="test-approx-stop"))
    assert "--approx test-approx-stop" in excinfo.value.hint
    assert excinfo.value.exit_code == 2
    with pytest.raises(UsageError, match="--disable-pass"):
        run_pipeline(model(), pipeline, PassContext("onnxruntime"),
                     PipelineOptions(stop_after="remove-dropout-identity",
                                     disabled=frozenset({"remove-dropout-identity"})))

    # enabled, the same stop-after runs up to that pass and stops there
    ctx = PassContext("onnxruntime", calibration(), approximations=frozenset({"test-approx-stop"}))
    m = model()
    report = run_pipeline(m, pipeline, ctx, PipelineOptions(stop_after="test-approx-stop"))
    assert report.stopped_after == "test-approx-stop"
    assert [n.op for n in m.graph.nodes] == ["Identity", "Neg"]


def test_a_plain_run_never_serialises_the_model(clean_registry, monkeypatch):
    exports = []
    real = CompilationModel.to_onnx
    monkeypatch.setattr(CompilationModel, "to_onnx", lambda self, **kw: exports.append(1) or real(self, **kw))
    m = model()
    report = run_pipeline(m, ["remove-dropout-identity", "fold-constants"], PassContext("onnxruntime", calibration()))
    assert report.totals()["remove-dropout-identity"]["counts"] == {"remove-identity": 1}
    assert exports == []

    # an approximate pass needs the model before it (the float reference) and after it (its deviation)
    register_approx_relu_to_identity("test-approx-export")
    ctx = PassContext("onnxruntime", calibration(), approximations=frozenset({"test-approx-export"}))
    report = run_pipeline(model(), ["remove-dropout-identity", "test-approx-export"], ctx)
    # sweep 1: the approximation changes the graph (before and after); sweep 2 removes the Identity it left
    # (before it, unchanged); sweep 3 confirms the fixed point (before it, unchanged)
    assert report.iterations == 3
    assert len(exports) == 4


def register_mutate_then_crash(name: str) -> None:
    @register_pass(name)
    def crash(model, ctx):
        """Turns Neg into Abs, then fails."""
        for node in nodes_of(model.graph, ["Neg"]):
            node.op = "Abs"
        raise ZeroDivisionError("boom")


def test_reproducer_is_the_model_before_a_pass_that_changed_it_and_crashed(clean_registry, tmp_path):
    register_mutate_then_crash("test-mutate-crash")
    with pytest.raises(InternalError, match="test-mutate-crash.*boom"):
        run_pipeline(model(), ["remove-dropout-identity", "test-mutate-crash"], PassContext("onnxruntime"),
                     PipelineOptions(dump_dir=tmp_path))
    repro = tmp_path / "reproducer"
    before = onnx.load(str(repro / "before_test-mutate-crash.onnx"))
    assert [n.op_type for n in before.graph.node] == ["Relu", "Neg"]  # replayed, without the crash's own edit
    text = (repro / "pipeline.txt").read_text()
    assert "the model just before the failing pass" in text
    assert "--stop-after test-mutate-crash" in text


def test_reproducer_without_a_known_input_is_the_model_as_the_pass_left_it(clean_registry, tmp_path):
    register_mutate_then_crash("test-mutate-crash-unknown")
    m = model()
    m.replace_graph(m.graph)  # the pipeline's input is no longer known as a ModelProto
    with pytest.raises(InternalError, match="boom"):
        run_pipeline(m, ["remove-dropout-identity", "test-mutate-crash-unknown"], PassContext("onnxruntime"),
                     PipelineOptions(dump_dir=tmp_path))
    repro = tmp_path / "reproducer"
    left = onnx.load(str(repro / "at_failure_test-mutate-crash-unknown.onnx"))
    assert [n.op_type for n in left.graph.node] == ["Relu", "Abs"]
    assert not (repro / "before_test-mutate-crash-unknown.onnx").exists()
    assert "as the failing pass left it" in (repro / "pipeline.txt").read_text()


def test_reproducer_of_an_approximate_pass_enables_it(clean_registry, tmp_path):
    @register_pass("test-approx-crash", exact=False)
    def crash(model, ctx):
        """Fails."""
        raise ValueError("approx boom")

    ctx = PassContext("onnxruntime", calibration(), approximations=frozenset({"test-approx-crash"}))
    with pytest.raises(InternalError, match="approx boom"):
        run_pipeline(model(), ["test-approx-crash"], ctx, PipelineOptions(dump_dir=tmp_path))
    text = (tmp_path / "reproducer" / "pipeline.txt").read_text()
    assert "--approx test-approx-crash --stop-after test-approx-crash" in text
    assert (tmp_path / "reproducer" / "before_test-approx-crash.onnx").exists()


def chain_graph(length: int) -> gs.Graph:
    x = gs.Variable("x", dtype=np.float32, shape=[1, 4])
    tensors = [x]
    nodes = []
    for i in range(length):
        out = gs.Variable(f"t{i}", dtype=np.float32, shape=[1, 4])
        nodes.append(gs.Node("Relu", name=f"relu{i}", inputs=[tensors[-1]], outputs=[out]))
        tensors.append(out)
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[tensors[-1]], opset=17)


def test_fresh_tensor_names_never_collide_and_walk_the_graph_once(monkeypatch):
    graph = chain_graph(300)
    walks = []
    real = gs.Graph.tensors
    monkeypatch.setattr(gs.Graph, "tensors", lambda self, *a, **kw: walks.append(1) or real(self, *a, **kw))

    handed_out = []
    for i in range(2000):
        base = ["t5", "w", "x"][i % 3]  # t5 and x already exist
        name = fresh_tensor_name(graph, base)
        handed_out.append(name)
        if i % 2:  # half are attached, on nodes appended to the graph
            graph.nodes.append(gs.Node("Identity", inputs=[graph.inputs[0]],
                                       outputs=[gs.Variable(name, dtype=np.float32)]))
        if i % 97 == 0:  # a name made by hand, on an appended node: the next fresh name must avoid it
            made = f"w_{i + 1}"
            graph.nodes.append(gs.Node("Identity", inputs=[graph.inputs[0]],
                                       outputs=[gs.Variable(made, dtype=np.float32)]))
            assert fresh_tensor_name(graph, made) == f"{made}_1"
    assert len(walks) == 1
    assert len(set(handed_out)) == len(handed_out)
    assert not {"t5", "x"} & set(handed_out) and "w" in handed_out
    graph.tensors(check_duplicates=True)

    # a tensor attached by hand to a node already in the graph is seen after a refresh
    graph.nodes[0].outputs[0].name = "renamed"
    refresh_tensor_names(graph)
    assert fresh_tensor_name(graph, "renamed") == "renamed_1"
    assert len(walks) == 3  # the refresh's walk, and check_duplicates above


def test_disconnect_removes_by_identity_without_comparing_nodes(monkeypatch):
    params = [gs.Constant(f"p{i}", np.ones(4, np.float32)) for i in range(4)]
    twins = [gs.Node("BatchNormalization", name="bn", inputs=[gs.Variable("x"), *params], outputs=[gs.Variable("y")])
             for _ in range(3)]
    for twin in twins[1:]:  # equal by graphsurgeon's __eq__: same name, op, attributes and tensor names
        assert twin == twins[0]
    compared = []
    real = gs.Node.__eq__
    monkeypatch.setattr(gs.Node, "__eq__", lambda self, other: compared.append(1) or real(self, other))
    disconnect(twins[1])
    assert all([id(n) for n in p.outputs] == [id(twins[0]), id(twins[2])] for p in params)
    assert list(twins[1].inputs) == [] and list(twins[1].outputs) == []
    assert twins[0].inputs[1] is params[0] and twins[2].outputs[0].inputs[0] is twins[2]

    many = [gs.Node("BatchNormalization", name=f"bn{i}", inputs=[gs.Variable(f"x{i}"), *params],
                    outputs=[gs.Variable(f"y{i}")]) for i in range(300)]
    order = list(np.random.default_rng(0).permutation(len(many)))
    for i in order:
        disconnect(many[i])
    assert compared == []
    assert all([id(n) for n in p.outputs] == [id(twins[0]), id(twins[2])] for p in params)

    old, new = gs.Variable("old"), gs.Variable("new")
    readers = [gs.Node("Relu", name="r", inputs=[old], outputs=[gs.Variable(f"o{i}")]) for i in range(3)]
    replace_uses(old, new)
    assert compared == [] and old.outputs == [] and [id(n) for n in new.outputs] == [id(n) for n in readers]
    assert all(r.inputs[0] is new for r in readers)
