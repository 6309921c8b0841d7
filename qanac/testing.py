"""Helpers for testing rewrite passes and rules, for qanac's own tests and for plugin authors.

Build the model in ONNX text form (``parse``) or from nodes (``graph_model``), run the pass once
(``apply_pass``: the pass's ``PassResult`` with its counts and ``details["skipped"]``) or under
``--verify-each`` (``rewrite_and_compare``, ``verify_pipeline``), and compare ONNX Runtime outputs with
the tolerance ``--verify-each`` holds exact passes to (``assert_outputs_equal``). A good pass test asserts
the counts, the structure after the rewrite (``ops``, node names), equal outputs, and a case where the
rule must not fire, with its reason. docs/writing-a-pass.md shows them in use.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.parser

from qanac.calibration import CalibrationData, Preprocessing
from qanac.compare import exact_tolerance
from qanac.execution import apply_post_processing, make_session
from qanac.graph import CompilationModel, output_names, refresh_tensor_names
from qanac.pipeline import PassContext, PipelineOptions, PipelineReport, run_pipeline
from qanac.registry import PassResult, get_pass, load_passes

__all__ = [
    "apply_pass",
    "assert_outputs_equal",
    "graph_model",
    "ops",
    "parse",
    "random_inputs",
    "rewrite_and_compare",
    "run",
    "verify_pipeline",
]


def parse(text: str) -> onnx.ModelProto:
    """A model from ONNX text form (``onnx.parser``), checked by ``onnx.checker``."""

    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def graph_model(nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], x_shape: list,
                outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    """An opset-17 model with float input ``x`` of ``x_shape``, float ``weights`` and untyped outputs."""

    graph = onnx.helper.make_graph(
        nodes, "test", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs],
        [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def rewrite_and_compare(model: onnx.ModelProto, rule: str):
    """Run infer-shapes and ``rule`` under --verify-each, then compare outputs on fresh inputs; returns
    (compiled model, the rule's counts, its details)."""

    compiled, report = verify_pipeline(model, ["infer-shapes", rule], random_inputs(model, seed=1))
    assert_outputs_equal(model, compiled, random_inputs(model, seed=2))
    totals = report.totals()[rule]
    return compiled, totals["counts"], totals["details"]


def apply_pass(model: onnx.ModelProto | CompilationModel, name: str) -> tuple[CompilationModel, PassResult]:
    """Run one pass once, as the pipeline does (including its cleanup after a change)."""

    load_passes()
    compiled = model if isinstance(model, CompilationModel) else CompilationModel.from_onnx(model)
    refresh_tensor_names(compiled.graph)
    result = get_pass(name).fn(compiled, PassContext(target="onnxruntime"))
    if result.changed:
        compiled.graph.cleanup().toposort()
    return compiled, result


def parse_with_shapes(text: str) -> CompilationModel:
    """The model of ``text`` after infer-shapes, for rules that read shapes (they run after it in a pipeline)."""

    return apply_pass(parse(text), "infer-shapes")[0]


def ops(model: CompilationModel | onnx.ModelProto) -> list[str]:
    """The op types of the model's nodes, in graph order."""

    if isinstance(model, CompilationModel):
        return [n.op for n in model.graph.nodes]
    return [n.op_type for n in model.graph.node]


def random_inputs(model: onnx.ModelProto, batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Normal samples for every real input; a symbolic first dimension becomes ``batch``."""

    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feed = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feed[value.name] = rng.normal(size=dims).astype(dtype)
    return feed


def run(model: onnx.ModelProto | CompilationModel, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` in ONNX Runtime, with its recorded post-processing applied."""

    proto = model.to_onnx() if isinstance(model, CompilationModel) else model
    post = model.post_processing if isinstance(model, CompilationModel) else []
    session = make_session(proto)
    feed = {i.name: inputs[i.name] for i in session.get_inputs()}
    return apply_post_processing(session.run(None, feed), output_names(proto), post)


def assert_outputs_equal(
    reference: onnx.ModelProto, compiled: CompilationModel, inputs: dict[str, np.ndarray]
) -> None:
    """Same output names, shapes and values up to ``qanac.compare.exact_tolerance`` (max abs error
    <= 1e-4 * (1 + max |reference|)), the tolerance ``--verify-each`` holds exact passes to."""

    proto = compiled.to_onnx(check=True)
    assert output_names(proto) == output_names(reference)
    expected = run(reference, inputs)
    actual = run(compiled, inputs)
    for name, want, got in zip(output_names(reference), expected, actual, strict=True):
        assert got.shape == want.shape, name
        error = float(np.max(np.abs(want.astype(np.float64) - got.astype(np.float64)))) if want.size else 0.0
        assert error <= exact_tolerance(want), f"output {name}: max abs error {error:.3g}"


def verify_pipeline(
    model: onnx.ModelProto, passes: list[str], inputs: dict[str, np.ndarray]
) -> tuple[CompilationModel, PipelineReport]:
    """Run ``passes`` through ``run_pipeline`` with ``verify_each`` on ``inputs`` (batched arrays)."""

    load_passes()
    compiled = CompilationModel.from_onnx(model)
    calibration = CalibrationData(arrays=inputs, source="test", preprocessing=Preprocessing())
    report = run_pipeline(
        compiled, passes, PassContext(target="onnxruntime", calibration=calibration), PipelineOptions(verify_each=True)
    )
    return compiled, report
