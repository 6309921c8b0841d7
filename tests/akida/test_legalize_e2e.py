"""Akida legalization end to end: models MetaTF refuses, or runs partly in software, convert and map fully
on hardware after the akida pipeline (passes/akida_*.py), and stay equal to the original float model.

Each case is compiled twice with the Akida backend (quantize + convert + map on SixNodesIPv2): with the
canonicalization passes only (the "before", which must fail or leave a layer in software for the stated
reason) and with the full akida pipeline (the "after": no lint finding, every layer on hardware, the Akida
model bit-exact against quantizeml's quantized ONNX on the calibration samples, and the legalized float
model within ``qanac.compare.exact_tolerance`` of the original on them). A legacy zoo graph (opset 9, IR 3
initializer inputs, Dropout with a mask output, Sum) goes through canonicalization to the same end.
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
from qanac.diagnostics import UnsupportedModelError, VerificationError
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
    """(prepared model, emit result or the error) with or without legalization: UnsupportedModelError when the
    toolchain refuses the model, VerificationError when the Akida model it makes departs from its quantized
    ONNX (AKV302)."""

    request = CompileRequest(source=str(path), target="akida", output=out / "unused",
                             pipeline=None if legalize else list(CANONICALIZE))
    prepared = prepare_model(request, calibration=data)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return prepared, AkidaBackend().emit(prepared.model.to_onnx(), data, {"agreement_samples": 16}, out)
    except (UnsupportedModelError, VerificationError) as error:
        return prepared, error


def describe(error: UnsupportedModelError) -> str:
    return " | ".join([error.message, *(d.message for d in error.diagnostics)])


def software_reasons(result) -> list[str]:
    return [entry.get("software_reason") or "" for entry in result.report["mapping"]["layers"]
            if entry["backend"] == "Software" and entry["type"] != "InputData"]


def assert_legalized(path: Path, prepared, result, data: CalibrationData, passes: set[str]) -> None:
    assert not isinstance(result, (UnsupportedModelError, VerificationError)), describe(result)
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
    if isinstance(unlegalized, VerificationError):  # what the saturating conv+GAP gives since AKV302
        assert {d.code for d in unlegalized.diagnostics} >= {"AKV302"}, describe(unlegalized)
    elif isinstance(unlegalized, UnsupportedModelError):
        assert before in describe(unlegalized)
    else:
        assert any(before in reason for reason in software_reasons(unlegalized)), software_reasons(unlegalized)

    prepared, legalized = compile_for_akida(path, data, tmp_path / "after", legalize=True)
    assert_legalized(path, prepared, legalized, data, passes)


def legacy_zoo_graph() -> onnx.ModelProto:
    """What old model zoos ship: opset 9, every initializer also listed as a graph input, a Dropout with
    its mask output named, and Sum joining two branches."""

    rng = np.random.default_rng(0)
    weights = {
        "w0": rng.normal(0, 0.3, (16, 3, 3, 3)), "b0": rng.normal(0, 0.1, 16),
        "w1": rng.normal(0, 0.2, (16, 16, 3, 3)), "w2": rng.normal(0, 0.2, (16, 16, 1, 1)),
        "w3": rng.normal(0, 0.2, (32, 16, 3, 3)), "fc": rng.normal(0, 0.2, (5, 32)), "fb": np.zeros(5),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c0"], ["r0"], name="stem_relu"),
        helper.make_node("Dropout", ["r0"], ["d0", "d0_mask"], name="dropout", ratio=0.2),
        helper.make_node("Conv", ["d0", "w1"], ["c1"], name="left", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="left_relu"),
        helper.make_node("Conv", ["d0", "w2"], ["c2"], name="right", strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="right_relu"),
        helper.make_node("Sum", ["r1", "r2"], ["s"], name="join"),
        helper.make_node("Conv", ["s", "w3"], ["c3"], name="mix", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"], name="mix_relu"),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], name="classifier", transB=1),
    ]
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 32, 32])]
    inputs += [helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, list(t.dims)) for t in inits]
    output = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5])
    graph = helper.make_graph(nodes, "legacy", inputs, [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)


def test_legacy_zoo_graph_is_canonicalized_and_maps(tmp_path):
    path = tmp_path / "legacy.onnx"
    onnx.save(legacy_zoo_graph(), str(path))
    data = calibration((3, 32, 32))
    prepared, result = compile_for_akida(path, data, tmp_path / "out", legalize=True)
    assert_legalized(path, prepared, result, data,
                     {"remove-initializer-inputs", "upgrade-opset", "remove-dropout-identity", "sum-to-add"})
    assert {n.op for n in prepared.model.graph.nodes}.isdisjoint({"Dropout", "Sum"})
