"""verify compares each output by what it is, and says when agreement is no evidence.

A classification output is gated on top-1 agreement and SQNR; a dense output (a detection grid) on SQNR,
with per-cell argmax agreement reported; a float model that gives one class to (nearly) every input, or
whose inputs are mostly near ties, draws a warning that leaves the verdict alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from qanac.cli import cli
from qanac.compare import (
    CLASSIFICATION,
    DENSE,
    VALUE,
    Thresholds,
    compare_outputs,
    failures,
    output_kind,
    passing_thresholds,
    top1_agreement,
)
from qanac.verify import prediction_warnings


@pytest.mark.parametrize("shape, kind, axis", [
    ((4, 10), CLASSIFICATION, 1),
    ((4, 10, 1, 1), CLASSIFICATION, 1),
    ((4, 1, 1, 10), CLASSIFICATION, 3),
    ((4, 13, 13, 85), DENSE, 3),  # YOLO head, N x H x W x C
    ((4, 85, 13, 13), DENSE, 1),  # N x C x H x W
    ((4, 21, 64, 64), DENSE, 1),  # a segmentation map
    ((4, 25200, 85), DENSE, 2),  # N x cells x C
    ((4, 16, 100), DENSE, 1),  # N x C x length
    ((4,), VALUE, None),
    ((4, 1), VALUE, None),
])
def test_the_comparison_is_chosen_by_the_output_shape(shape, kind, axis):
    assert output_kind(shape) == (kind, axis)


def grid_with_tied_peaks(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A detection grid (8 x 13 x 13 x 6) whose every sample has two cells with the same peak score, and the
    same grid with small noise (about 32 dB): the argmax over the whole grid flips on about half of them."""

    reference = rng.normal(0.0, 1.0, (8, 13, 13, 6)).astype(np.float32)
    reference[:, 3, 4, 2] = 6.0
    reference[:, 9, 1, 5] = 6.0
    actual = reference + rng.normal(0.0, 0.025, reference.shape).astype(np.float32)
    return reference, actual


def test_a_detection_grid_is_judged_by_sqnr_and_per_cell_argmax_not_top1():
    reference, actual = grid_with_tied_peaks(np.random.default_rng(0))
    assert top1_agreement(reference, actual) < 0.95  # the metric that failed such grids before
    result = compare_outputs(["grid"], [reference], [actual])[0]
    assert result.kind == DENSE and result.class_axis == 3
    assert result.top1_agreement is None
    assert result.sqnr_db > 30.0
    assert 0.9 < result.cell_agreement <= 1.0
    assert result.decisive_agreement == pytest.approx(1.0, abs=0.01)
    assert failures([result], Thresholds()) == []
    assert passing_thresholds([result]) == {"min_top1_agreement": None,
                                            "min_sqnr_db": np.floor(result.sqnr_db * 100) / 100}


def test_a_noisy_detection_grid_still_fails_on_sqnr():
    rng = np.random.default_rng(1)
    reference = rng.normal(0.0, 1.0, (4, 13, 13, 6)).astype(np.float32)
    actual = reference + rng.normal(0.0, 0.5, reference.shape).astype(np.float32)
    result = compare_outputs(["grid"], [reference], [actual])[0]
    problems = failures([result], Thresholds())
    assert len(problems) == 1 and "SQNR" in problems[0] and "--min-sqnr" in problems[0]


def test_classification_agreement_is_gated_and_says_what_would_pass():
    rng = np.random.default_rng(2)
    reference = rng.normal(0.0, 1.0, (100, 10))
    actual = reference.copy()
    actual[:10] = rng.normal(0.0, 1.0, (10, 10))  # 10 samples replaced: about 9 flip
    result = compare_outputs(["logits"], [reference], [actual])[0]
    assert result.kind == CLASSIFICATION and result.cell_agreement is None
    assert result.top1_agreement == pytest.approx(np.mean(reference.argmax(1) == actual.argmax(1)))
    problems = failures([result], Thresholds(min_top1_agreement=0.95, min_sqnr_db=-100))
    assert problems == [f"output 'logits': top-1 agreement {result.top1_agreement:.4f} < 0.95 "
                        f"(--min-agreement {result.top1_agreement:.4f} would pass)"]


def test_near_ties_are_counted_against_the_noise_of_the_compared_model():
    rng = np.random.default_rng(3)
    reference = rng.normal(0.0, 1.0, (200, 5))
    reference[:100, 1] = reference[:100, 0] = 4.0  # half the samples: an exact tie at the top
    actual = reference + rng.normal(0.0, 0.01, reference.shape)
    result = compare_outputs(["logits"], [reference], [actual])[0]
    assert result.near_tie_share == pytest.approx(0.5, abs=0.02)
    assert result.decisive_agreement == 1.0
    warnings = prediction_warnings([reference], [result], Thresholds())
    assert len(warnings) == 1 and f"{result.near_tie_share:.1%} of the inputs are near ties" in warnings[0]


def test_no_warning_for_a_float_model_with_varied_decisive_predictions():
    rng = np.random.default_rng(4)
    reference = rng.normal(0.0, 1.0, (200, 5))
    reference[np.arange(200), rng.integers(0, 5, 200)] += 6.0
    actual = reference + rng.normal(0.0, 0.05, reference.shape)
    result = compare_outputs(["logits"], [reference], [actual])[0]
    assert result.near_tie_share < 0.01
    assert prediction_warnings([reference], [result], Thresholds()) == []


# -- end to end: one model with a detection grid, a good classifier and a constant-class classifier ------


def three_heads() -> onnx.ModelProto:
    """x (N, 3, 8, 8) -> grid (N, 8, 8, 4), a 1x1 Conv in NHWC; good (N, 3), the mean of each channel times 10,
    so the brightest channel wins; constant (N, 3), whose bias makes class 0 win for every input in [0, 1]."""

    rng = np.random.default_rng(5)
    weights = {
        "w": rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32),
        "good_w": (10.0 * np.eye(3)).astype(np.float32),
        "good_b": np.zeros(3, np.float32),
        "const_w": rng.normal(0, 0.1, (3, 3)).astype(np.float32),
        "const_b": np.array([5.0, 0.0, 0.0], np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="head_conv"),
        helper.make_node("Transpose", ["c"], ["grid"], name="head_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "good_w", "good_b"], ["good"], name="good_fc", transB=1),
        helper.make_node("Gemm", ["f", "const_w", "const_b"], ["constant"], name="const_fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "three_heads",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("grid", onnx.TensorProto.FLOAT, ["N", 8, 8, 4]),
         helper.make_tensor_value_info("good", onnx.TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("constant", onnx.TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def three_heads_bundle(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("three_heads")
    onnx.save(three_heads(), str(root / "model.onnx"))
    rng = np.random.default_rng(6)
    data = rng.uniform(0.0, 0.3, (48, 3, 8, 8)).astype(np.float32)
    data[np.arange(48), np.arange(48) % 3] += 0.6  # one bright channel per sample, each channel 16 times
    np.save(root / "data.npy", data)
    result = CliRunner().invoke(cli, ["compile", str(root / "model.onnx"), "--target", "onnxruntime", "--calib",
                                      str(root / "data.npy"), "-o", str(root / "bundle")])
    assert result.exit_code == 0, result.output
    return root / "bundle", root / "data.npy"


def test_verify_judges_each_output_by_its_kind_and_warns_only_on_the_constant_head(three_heads_bundle):
    bundle, data = three_heads_bundle
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    by_name = {c["name"]: c for c in report["comparisons"]["compiled"]}
    assert by_name["grid"]["kind"] == DENSE and by_name["grid"]["top1_agreement"] is None
    assert by_name["grid"]["class_axis"] == 3 and by_name["grid"]["cell_agreement"] is not None
    assert by_name["good"]["kind"] == CLASSIFICATION and by_name["good"]["top1_agreement"] == 1.0
    assert by_name["constant"]["top1_agreement"] == 1.0
    assert report["passed"]
    assert len(report["warnings"]) == 1, report["warnings"]
    assert report["warnings"][0].startswith("output 'constant': the float model predicts class 0 for 48 of 48")
    assert report["passing_thresholds"]["min_top1_agreement"] == 1.0


def test_verify_prints_the_warning_and_the_thresholds_that_pass(three_heads_bundle):
    bundle, data = three_heads_bundle
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "WARNING: output 'constant'" in result.output
    assert "the strictest thresholds that pass: --min-agreement 1.0000 --min-sqnr " in result.output
    assert "output grid dense: per-cell argmax agreement" in result.output


def test_output_kind_overrides_the_shape(three_heads_bundle):
    bundle, data = three_heads_bundle
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--data", str(data), "--json",
                                      "--output-kind", "good=value", "--output-kind", "grid=classification"])
    assert result.exit_code == 0, result.output
    by_name = {c["name"]: c for c in json.loads(result.output)["comparisons"]["compiled"]}
    assert by_name["good"]["kind"] == VALUE and by_name["good"]["top1_agreement"] is None
    assert by_name["grid"]["kind"] == CLASSIFICATION and by_name["grid"]["top1_agreement"] is not None


@pytest.mark.parametrize("setting, message", [("good", "cannot parse --output-kind 'good'"),
                                              ("good=boxes", "cannot parse --output-kind 'good=boxes'"),
                                              ("boxes=dense", "names 'boxes', which is not an output")])
def test_a_bad_output_kind_is_a_usage_error(three_heads_bundle, setting, message):
    bundle, data = three_heads_bundle
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--data", str(data), "--output-kind", setting])
    assert result.exit_code == 2 and message in result.output, result.output
