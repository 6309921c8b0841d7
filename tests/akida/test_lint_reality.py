"""Lint must agree with what MetaTF does: every rule's example is compiled for real.

For each case the model goes through the akida pipeline (as `qanac compile` does), then lint predicts, and
the Akida backend is run directly, without qanac's lint gate:
- a case with lint ERRORs must fail conversion with UnsupportedModelError (never a silently truncated model);
- a case with only WARNINGs must convert, and the layer of every warned node must run in Software;
- a clean case must convert with every layer on hardware.
"""

from __future__ import annotations

import numpy as np
import pytest

from qanac.backends.akida.backend import AkidaBackend
from qanac.calibration import CalibrationData, Preprocessing
from qanac.compiler import CompileRequest, lint_for_target, prepare_model
from qanac.diagnostics import Level, UnsupportedModelError
from qanac.targets import get_target
from qanac.pipeline import PipelineOptions
from tests.akida.lint_cases import CASES, DISABLED_PASSES, export

pytestmark = pytest.mark.slow


def calibration() -> CalibrationData:
    raw = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    pre = Preprocessing()
    return CalibrationData(arrays={"x": pre.apply(raw)}, source="test", preprocessing=pre, raw={"x": raw})


def layer_of(model, node_name: str) -> str:
    """The Akida layer a node ends up in: a pooling or activation belongs to the conv before it."""

    node = next(n for n in model.graph.nodes if n.name == node_name)
    while node.op not in ("Conv", "Gemm", "ConvTranspose") and node.inputs and node.inputs[0].inputs:
        node = node.inputs[0].inputs[0]
    return node.name


@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_predicts_conversion_and_mapping(case, tmp_path):
    path = tmp_path / f"{case}.onnx"
    export(case, path)
    request = CompileRequest(
        source=str(path), target="akida", output=tmp_path / "unused",
        pipeline_options=PipelineOptions(disabled=DISABLED_PASSES.get(case, frozenset())),
    )
    prepared = prepare_model(request, calibration=None)
    findings = lint_for_target(get_target("akida"), prepared.model)
    codes = {f.code for f in findings}
    assert codes == CASES[case][1], [f.format() for f in findings]

    errors = [f for f in findings if f.level == Level.ERROR]
    model = prepared.model.to_onnx()
    backend = AkidaBackend()
    if errors:
        with pytest.raises(UnsupportedModelError):
            backend.emit(model, calibration(), {"agreement_samples": 0}, tmp_path)
        return
    result = backend.emit(model, calibration(), {"agreement_samples": 0}, tmp_path)
    layers = {entry["name"]: entry["backend"] for entry in result.report["mapping"]["layers"]}
    if not findings:
        assert result.report["mapping"]["fully_on_hardware"], result.report["mapping_text"]
        return
    for finding in findings:
        layer = layer_of(prepared.model, finding.nodes[0])
        assert layers.get(layer) == "Software", (finding.format(), result.report["mapping_text"])
