"""Akida legalization end to end: models MetaTF refuses, or runs partly in software, convert and map fully
on hardware after the akida pipeline (passes/akida_*.py), and stay equal to the original float model.

Each case is compiled twice with the Akida backend (quantize + convert + map on SixNodesIPv2): with the
canonicalization passes only (the "before", which must fail or leave a layer in software for the stated
reason) and with the full akida pipeline (the "after": no lint finding, every layer on hardware, the Akida
model bit-exact against quantizeml's quantized ONNX on the calibration samples, and the legalized float
model within ``qanac.compare.exact_tolerance`` of the original on them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

from qanac.backends.akida.backend import AkidaBackend
from qanac.calibration import CalibrationData, Preprocessing
from qanac.compare import exact_tolerance
from qanac.compiler import CompileRequest, lint_for_target, prepare_model
from qanac.diagnostics import UnsupportedModelError
from qanac.execution import run_onnx
from qanac.targets import CANONICALIZE, get_target
from tests.akida.lint_cases import cbr, head, stem

pytestmark = pytest.mark.slow

S = nn.Sequential


def calibration(shape: tuple[int, ...], name: str = "x", count: int = 16) -> CalibrationData:
    raw = np.random.default_rng(0).integers(0, 256, (count, *shape), dtype=np.uint8)
    pre = Preprocessing()
    return CalibrationData(arrays={name: pre.apply(raw)}, source="test", preprocessing=pre, raw={name: raw})


def export(module: nn.Module, path: Path, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    torch.onnx.export(module.eval(), (torch.zeros(1, *shape),), str(path), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["y"])


def compile_for_akida(path: Path, data: CalibrationData, out: Path, legalize: bool):
    """(prepared model, emit result or the UnsupportedModelError) with or without legalization."""

    request = CompileRequest(source=str(path), target="akida", output=out / "unused",
                             pipeline=None if legalize else list(CANONICALIZE))
    prepared = prepare_model(request, calibration=data)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return prepared, AkidaBackend().emit(prepared.model.to_onnx(), data, {"agreement_samples": 16}, out)
    except UnsupportedModelError as error:
        return prepared, error


def describe(error: UnsupportedModelError) -> str:
    return " | ".join([error.message, *(d.message for d in error.diagnostics)])


def software_reasons(result) -> list[str]:
    return [entry.get("software_reason") or "" for entry in result.report["mapping"]["layers"]
            if entry["backend"] == "Software" and entry["type"] != "InputData"]


def assert_legalized(path: Path, prepared, result, data: CalibrationData, passes: set[str]) -> None:
    assert not isinstance(result, UnsupportedModelError), describe(result)
    assert lint_for_target(get_target("akida"), prepared.model) == []
    mapping = result.report["mapping"]
    assert mapping["fully_on_hardware"], result.report.get("mapping_text", software_reasons(result))
    assert result.report["agreement"]["exact_share"] == 1.0
    fired = {name for name, info in prepared.pipeline.totals().items() if info["counts"]}
    assert passes <= fired, fired
    original = onnx.load(str(path))
    expected = run_onnx(original, data.arrays)[0]
    actual = run_onnx(prepared.model.to_onnx(), data.arrays)[0]
    assert float(np.max(np.abs(expected - actual))) <= exact_tolerance(expected)


# name: (builder, input shape, what the unlegalized model does, passes that must fire)
CASES = {
    "even_kernel_stride2": (lambda: S(*stem(), *cbr(16, 32, 2, 2, p=0), *cbr(32, 32), *head(32)), (3, 32, 32),
                            "Kernel size must be odd", {"even-kernel-to-odd"}),
    "even_kernel_same": (lambda: S(*stem(), nn.Conv2d(16, 32, 2, padding="same"), nn.ReLU(), *head(32)), (3, 32, 32),
                         "Kernel size must be odd", {"even-kernel-to-odd"}),
    "even_kernel_4x4_stride2": (lambda: S(*stem(), *cbr(16, 32, 4, 2, p=1), *cbr(32, 32), *head(32)), (3, 32, 32),
                                "Kernel size must be odd", {"even-kernel-to-odd", "strided-conv-to-stride1"}),
    "stride2_kernel7": (lambda: S(*stem(), *cbr(16, 32, 7, 2), *cbr(32, 32), *head(32)), (3, 32, 32),
                        "'SameUpper' padding mode is only supported", {"strided-conv-to-stride1"}),
    "dilated_depthwise": (lambda: S(*stem(), *cbr(16, 16, g=16, d=2), *cbr(16, 32, 1), *head(32)), (3, 32, 32),
                          "dilat", {"dilated-conv-to-dense"}),
    "average_pool_2x2": (lambda: S(*stem(), *cbr(16, 32), nn.AvgPool2d(2, 2), *cbr(32, 32), *head(32)), (3, 32, 32),
                         "AveragePool", {"average-pool-to-depthwise"}),
    "maxpool_3x3_s2_p1": (lambda: S(*stem(), *cbr(16, 32), nn.MaxPool2d(3, 2, 1), *cbr(32, 32), *head(32)),
                          (3, 32, 32), "pads", {"split-padded-maxpool"}),
    "global_pool_of_a_large_map": (lambda: S(*cbr(3, 16, 3, 2), *cbr(16, 32), *head(32)), (3, 64, 64),
                                   "Global Average Pooling", {"stage-global-average-pool"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_model_converts_and_maps_after_legalization(case, tmp_path):
    builder, shape, before, passes = CASES[case]
    path = tmp_path / f"{case}.onnx"
    export(builder(), path, shape)
    data = calibration(shape)

    _, unlegalized = compile_for_akida(path, data, tmp_path / "before", legalize=False)
    if isinstance(unlegalized, UnsupportedModelError):
        assert before in describe(unlegalized)
    else:
        assert any(before in reason for reason in software_reasons(unlegalized)), software_reasons(unlegalized)

    prepared, legalized = compile_for_akida(path, data, tmp_path / "after", legalize=True)
    assert_legalized(path, prepared, legalized, data, passes)
