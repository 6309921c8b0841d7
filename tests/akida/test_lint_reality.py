"""Lint must agree with what MetaTF does: every rule's example is compiled for real.

For each case the model goes through the akida pipeline (as `qanac compile` does), then lint predicts, and
the Akida backend is run directly, without qanac's lint gate:
- a case with lint ERRORs must fail conversion with UnsupportedModelError (never a silently truncated model);
- a case with only WARNINGs must convert, and the layer of every warned node must run in Software;
- a clean case must convert with every layer on hardware.
The PyTorch cases (CASES) are exported with input "x", the onnx.helper ones (ONNX_CASES) have input "input".
tf2onnx's ReLU(max_value) spelling before a global pooling also compiles through the CLI to one hardware
sequence, because lint judges the Clip quantizeml's sanitizer makes of it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qanac.backends.akida.backend import AkidaBackend
from qanac.calibration import CalibrationData, Preprocessing
from qanac.cli import cli
from qanac.compiler import CompileRequest, lint_for_target, prepare_model
from qanac.diagnostics import Level, UnsupportedModelError
from qanac.pipeline import PipelineOptions
from qanac.targets import get_target
from tests.akida.lint_cases import CASES, DEVICES, DISABLED_PASSES, ONNX_CASES, export

pytestmark = pytest.mark.slow


def calibration(name: str = "x") -> CalibrationData:
    raw = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    pre = Preprocessing()
    return CalibrationData(arrays={name: pre.apply(raw)}, source="test", preprocessing=pre, raw={name: raw})


def layer_of(model, node_name: str) -> str:
    """The Akida layer a node ends up in: a pooling or activation belongs to the conv before it."""

    node = next(n for n in model.graph.nodes if n.name == node_name)
    while node.op not in ("Conv", "Gemm", "ConvTranspose") and node.inputs and node.inputs[0].inputs:
        node = node.inputs[0].inputs[0]
    return node.name


def check_prediction(path, expected: set[str], disabled: frozenset[str], input_name: str, tmp_path,
                     device: str | None = None) -> None:
    request = CompileRequest(
        source=str(path), target="akida", output=tmp_path / "unused",
        pipeline_options=PipelineOptions(disabled=disabled),
    )
    prepared = prepare_model(request, calibration=None)
    findings = lint_for_target(get_target("akida"), prepared.model, device)
    codes = {f.code for f in findings}
    assert codes == expected, [f.format() for f in findings]

    errors = [f for f in findings if f.level == Level.ERROR]
    model = prepared.model.to_onnx()
    backend = AkidaBackend()
    options = {"agreement_samples": 0} | ({"device": device} if device else {})
    if errors:
        with pytest.raises(UnsupportedModelError):
            backend.emit(model, calibration(input_name), options, tmp_path)
        return
    result = backend.emit(model, calibration(input_name), options, tmp_path)
    layers = {entry["name"]: entry["backend"] for entry in result.report["mapping"]["layers"]}
    if not findings:
        assert result.report["mapping"]["fully_on_hardware"], result.report["mapping_text"]
        return
    for finding in findings:
        layer = layer_of(prepared.model, finding.nodes[0])
        assert layers.get(layer) == "Software", (finding.format(), result.report["mapping_text"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_predicts_conversion_and_mapping(case, tmp_path):
    path = tmp_path / f"{case}.onnx"
    export(case, path)
    check_prediction(path, CASES[case][1], DISABLED_PASSES.get(case, frozenset()), "x", tmp_path, DEVICES.get(case))


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_lint_predicts_conversion_of_onnx_spellings(case, tmp_path):
    path = tmp_path / f"{case}.onnx"
    builder, expected = ONNX_CASES[case]
    onnx.save(builder(), path)
    check_prediction(path, expected, frozenset(), "input", tmp_path)


def test_relu_min_max_before_global_pooling_compiles_to_one_hardware_sequence(tmp_path):
    path = tmp_path / "relu_min_max.onnx"
    onnx.save(ONNX_CASES["relu_min_max_gap"][0](), path)
    result = CliRunner().invoke(cli, ["compile", str(path), "--target", "akida", "--calib", "random",
                                      "-o", str(tmp_path / "bundle"), "--json"])
    assert result.exit_code == 0, result.output
    compiled = json.loads(result.output)
    assert compiled["manifest"]["partition"]["segments"] == 1
    assert compiled["manifest"]["partition"]["device_mac_share"] == 1.0
    sequences = compiled["report"]["segments"][0]["backend"]["mapping"]["sequences"]
    assert [s["backend"] for s in sequences] == ["Hardware"]
    assert {"c3", "logits"} <= set(sequences[0]["layers"])  # the conv the Clip and the GAP fuse into, the head
