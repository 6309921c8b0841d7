"""The pipeline runner: fixed point, convergence bound, instruments and the reproducer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qanac import registry
from qanac.calibration import CalibrationData, Preprocessing
from qanac.diagnostics import InternalError, UsageError, VerificationError
from qanac.graph import CompilationModel, nodes_of
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
