"""Property test: ONNX's own backend node test cases still reproduce their stored outputs after the full
CANONICALIZE pipeline (with the recorded post-processing applied), and come out in canonical form.

The cases ship inside the ``onnx`` package (``onnx/backend/test/data/node/test_*``: ``model.onnx`` plus
``test_data_set_0/input_*.pb`` and ``output_*.pb``). Selected are the cases built only from the ops the
canonicalization passes rewrite or read. Each runs twice: as shipped (weights are graph inputs, so
mostly nothing folds) and "frozen", with every input but the first turned into an initializer holding
its stored value, so that the weight-dependent rewrites (batchnorm, sum-to-add, ...) fire.

Tolerance: qanac.compare.exact_tolerance (max abs error <= 1e-4 * (1 + max |expected|)); the stored
outputs come from ONNX's NumPy reference, the compiled model runs in ONNX Runtime. Integer and boolean
outputs must match exactly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qanac.compare import exact_tolerance
from qanac.diagnostics import UsageError
from qanac.execution import apply_post_processing, make_session
from qanac.graph import CompilationModel, is_graph_output, output_names
from qanac.passes.opset import MAX_OPSET, MIN_OPSET, default_opset
from qanac.pipeline import PassContext, PipelineReport, run_pipeline
from qanac.registry import load_passes
from qanac.rewrite import node_label
from qanac.targets import CANONICALIZE

NODE_CASES = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
TOUCHED_OPS = frozenset(
    {
        "AveragePool",
        "BatchNormalization",
        "Constant",
        "Conv",
        "ConvTranspose",
        "Dropout",
        "Gemm",
        "Identity",
        "LogSoftmax",
        "MaxPool",
        "Softmax",
        "Sum",
    }
)


@dataclasses.dataclass(frozen=True)
class NodeCase:
    directory: Path
    frozen: bool

    @property
    def id(self) -> str:
        return self.directory.name + ("[frozen]" if self.frozen else "")


def read_tensor(path: Path) -> np.ndarray:
    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(tensor)


def discover() -> list[NodeCase]:
    cases = []
    for directory in sorted(NODE_CASES.glob("test_*")):
        model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
        if not model.graph.node or not {n.op_type for n in model.graph.node} <= TOUCHED_OPS:
            continue
        cases.append(NodeCase(directory, frozen=False))
        if len(model.graph.input) > 1:
            cases.append(NodeCase(directory, frozen=True))
    return cases


CASES = discover()


def load_case(case: NodeCase) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[np.ndarray]]:
    model = onnx.load(str(case.directory / "model.onnx"))
    data = case.directory / "test_data_set_0"
    if not all(v.type.HasField("tensor_type") for v in [*model.graph.input, *model.graph.output]):
        return model, {}, []  # sequence/optional data: never compared (see non_tensor_expectation)
    inputs = {v.name: read_tensor(data / f"input_{i}.pb") for i, v in enumerate(model.graph.input)}
    outputs = [read_tensor(data / f"output_{i}.pb") for i in range(len(model.graph.output))]
    if case.frozen:
        weights = list(model.graph.input)[1:]
        for value in weights:
            model.graph.initializer.append(numpy_helper.from_array(inputs.pop(value.name), value.name))
            model.graph.input.remove(value)
    return model, inputs, outputs


def non_tensor_expectation(model: onnx.ModelProto) -> tuple[str, str] | None:
    """Sequence and optional values are outside qanac's tensor-only pipeline: ``("skip", reason)`` when
    the model cannot even be imported, ``("usage-error", message)`` when the pipeline must refuse it."""

    values = [*model.graph.input, *model.graph.output]
    if any(v.type.HasField("optional_type") for v in values):
        return "skip", "optional types: onnx-graphsurgeon cannot import them (before any pass runs)"
    if any(v.type.HasField("sequence_type") for v in model.graph.input):
        return "usage-error", "input '.*' has no shape"
    return None


def random_dropout(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> bool:
    """A training-mode Dropout with a non-zero ratio: its stored output is one random sample."""

    values = {**{i.name: numpy_helper.to_array(i) for i in model.graph.initializer}, **inputs}
    for node in model.graph.node:
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            training = bool(values[node.input[2]]) if node.input[2] in values else True
            ratio = float(values[node.input[1]]) if len(node.input) > 1 and node.input[1] in values else 0.5
            if training and ratio > 0:
                return True
    return False


def skipped_by(report: PipelineReport, pass_name: str) -> dict[str, str]:
    records = [r for r in report.records if r.name == pass_name]
    return records[-1].details.get("skipped", {}) if records else {}


def canonical_form_violations(compiled: CompilationModel, report: PipelineReport) -> list[str]:
    """What the canonical form forbids, unless the responsible pass said why it left it."""

    graph = compiled.graph
    problems = []
    if not MIN_OPSET <= default_opset(compiled.to_onnx()) <= MAX_OPSET:
        problems.append(f"opset {graph.opset} outside {MIN_OPSET}..{MAX_OPSET}")
    kept = {
        "Identity": skipped_by(report, "remove-dropout-identity"),
        "Dropout": skipped_by(report, "remove-dropout-identity"),
        "BatchNormalization": skipped_by(report, "batchnorm-to-affine"),
        "Softmax": skipped_by(report, "strip-trailing-softmax"),
        "LogSoftmax": skipped_by(report, "strip-trailing-softmax"),
    }
    for node in graph.nodes:
        label = node_label(node)
        if node.op == "Sum" and len(node.inputs) <= 2:
            problems.append(f"Sum '{label}' of {len(node.inputs)} inputs")
        if node.attrs.get("auto_pad", "NOTSET") != "NOTSET" and label not in skipped_by(report, "explicit-pads"):
            problems.append(f"{node.op} '{label}' keeps auto_pad {node.attrs['auto_pad']} without a reason")
        if node.op in ("Softmax", "LogSoftmax") and not is_graph_output(graph, node.outputs[0]):
            continue
        if node.op in kept and label not in kept[node.op]:
            problems.append(f"{node.op} '{label}' left without a reason")
    for tensor in graph.tensors().values():
        if not tensor.is_empty() and tensor.shape is None:
            problems.append(f"tensor '{tensor.name}' has no shape")
    return problems


def test_discovery_finds_the_cases():
    names = {case.directory.name for case in CASES}
    assert len(CASES) >= 100
    assert {"test_batchnorm_example", "test_conv_with_autopad_same", "test_softmax_axis_2", "test_sum_two_inputs",
            "test_maxpool_2d_same_lower", "test_gemm_transposeB", "test_dropout_default_old"} <= names


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_node_case_survives_canonicalization(case):
    load_passes()
    model, inputs, expected = load_case(case)
    expectation = non_tensor_expectation(model)
    if expectation and expectation[0] == "skip":
        pytest.skip(expectation[1])
    if random_dropout(model, inputs):
        pytest.skip("training-mode Dropout draws a random mask: the stored output is one sample of it")
    compiled = CompilationModel.from_onnx(model)
    if expectation:
        with pytest.raises(UsageError, match=expectation[1]):
            run_pipeline(compiled, list(CANONICALIZE), PassContext(target="onnxruntime"))
        return

    report = run_pipeline(compiled, list(CANONICALIZE), PassContext(target="onnxruntime"))
    proto = compiled.to_onnx(check=True)
    assert output_names(proto) == output_names(model)
    assert canonical_form_violations(compiled, report) == []

    session = make_session(proto)
    actual = session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})
    actual = apply_post_processing(actual, output_names(proto), compiled.post_processing)
    for name, want, got in zip(output_names(model), expected, actual, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if np.issubdtype(want.dtype, np.floating):
            error = float(np.max(np.abs(want.astype(np.float64) - got.astype(np.float64)))) if want.size else 0.0
            assert error <= exact_tolerance(want), f"output {name}: max abs error {error:.3g}"
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
