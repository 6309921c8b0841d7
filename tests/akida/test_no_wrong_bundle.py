"""No wrong bundle with exit 0: an Akida model that disagrees with its own quantized ONNX is never written.

The known case: a Conv fused with a GlobalAveragePool over a 32x32 map saturates Akida's accumulator
(tests/akida/test_akida_gap_saturation.py); with the staging pass disabled the compile meets it. qanac finds
the layer where Akida departs from the quantized ONNX (comparing every layer's integer output) and runs its
float nodes on the host, or, with --no-partition, fails with exit 1 naming it and the numbers. Whatever
bundle is written agrees with its quantized variant.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qanac.backends.akida.agreement import divergent_layers, float_nodes_of
from qanac.backends.akida.convert import compile_onnx
from qanac.bundle import Bundle
from qanac.cli import cli
from qanac.verify import compiled_runners, load_bundle_data
from tests.akida import akida_models

pytestmark = pytest.mark.slow


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def saturating(tmp_path_factory):
    root = tmp_path_factory.mktemp("gap")
    model = akida_models.conv_gap_classifier(size=32)
    onnx.save(model, str(root / "conv_gap.onnx"))
    data = akida_models.image_calibration(model, count=64)
    np.save(root / "images.npy", data.raw["input"])
    return root, model, data


def test_the_saturating_layer_is_found_and_named_by_its_float_nodes(saturating):
    _, model, data = saturating
    conversion = compile_onnx(model, data)
    found = divergent_layers(conversion.akida_model, conversion.quantized, data.arrays["input"][:8])
    assert [d.layer for d in found] == ["features"]  # stem before it is bit-exact, logits after it not judged
    assert found[0].input_map == [32, 32] and found[0].exact_share < 1.0 and found[0].max_abs_difference > 0
    assert float_nodes_of("features", conversion.quantized, model) == ["features", "features_relu", "head_gap"]
    assert float_nodes_of("stem", conversion.quantized, model) == ["stem", "stem_relu"]
    assert float_nodes_of("logits", conversion.quantized, model) == ["head_flatten", "logits"]


def test_the_disagreeing_layer_runs_on_the_host_and_the_bundle_agrees(saturating, tmp_path):
    root, _, _ = saturating
    bundle = tmp_path / "bundle"
    result = invoke("compile", root / "conv_gap.onnx", "--target", "akida", "--calib", root / "images.npy", "-o",
                    bundle, "--disable-pass", "stage-global-average-pool", "--json")
    assert result.exit_code == 0, result.output
    compiled = json.loads(result.output)
    segments = compiled["manifest"]["segments"]
    host = [s for s in segments if s["kind"] == "host"]
    assert [s["kind"] for s in segments] == ["device", "host"] and host[0]["nodes"] >= 3
    part004 = [d for d in compiled["report"]["diagnostics"] if d["code"] == "PART004"]
    assert len(part004) == 1 and part004[0]["nodes"] == ["features", "features_relu", "head_gap"]
    assert "layer 'features' (input map 32x32)" in part004[0]["message"]
    assert "top-1 agreement" in part004[0]["message"] or "SQNR" in part004[0]["message"]

    # the bundle's compiled model equals its quantized variant, and verify against float passes
    opened = Bundle.open(bundle)
    data = load_bundle_data(opened, root / "images.npy")
    runners = compiled_runners(opened, {})
    np.testing.assert_array_equal(runners["compiled"].run(data.arrays)[0], runners["quantized"].run(data.arrays)[0])
    result = invoke("verify", bundle, "--data", root / "images.npy", "--json")
    assert result.exit_code == 0, result.output


def test_without_partitioning_the_disagreement_fails_with_exit_1_naming_the_layer(saturating, tmp_path):
    root, _, _ = saturating
    out = tmp_path / "bundle"
    result = invoke("compile", root / "conv_gap.onnx", "--target", "akida", "--calib", root / "images.npy", "-o",
                    out, "--disable-pass", "stage-global-average-pool", "--no-partition", "--json")
    assert result.exit_code == 1, result.output
    error = json.loads(result.output)
    assert error["error"] == "VerificationError"
    assert "departs at layer 'features' (input map 32x32)" in error["message"]
    assert "of its outputs identical" in error["message"] and "SQNR" in error["message"]
    located = [d for d in error["diagnostics"] if d["code"] == "AKV302"]
    assert located[0]["nodes"] == ["features", "features_relu", "head_gap"]
    assert not out.exists()


def _near_tie_inputs(conversion, data, count: int = 16) -> np.ndarray:
    """Inputs whose every value lies within a few float32 ulps of a rounding tie of the input quantizer
    (``x * scale = k + 0.5``), where Akida's Quantizer and the quantized ONNX's may round apart."""

    scales = np.asarray(conversion.akida_model.layers[0].variables["scales"], np.float32)
    shape = data.arrays["input"].shape[1:]
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 200, size=(count, *shape))
    channel_scales = scales.reshape(-1, *([1] * (len(shape) - 1)))
    ties = ((levels + 0.5) / channel_scales).astype(np.float32)
    ulps = rng.integers(-2, 3, size=ties.shape)
    return np.nextafter(ties, np.where(ulps > 0, np.inf, -np.inf).astype(np.float32)) * (ulps != 0) \
        + ties * (ulps == 0)


def test_input_quantizers_rounding_a_tie_apart_are_not_a_disagreement():
    """The two input quantizers round ``x * scale`` a float ulp apart near a tie; the integer pipelines
    after them are compared on the same integers (the quantized ONNX's), so only a real departure counts."""

    from qanac.backends.akida.agreement import compare_akida_to_quantized
    from qanac.backends.akida.runners import AkidaSoftwareRunner, QuantizedOnnxRunner

    model = akida_models.conv_gap_classifier(size=8)
    data = akida_models.image_calibration(model, count=32)
    conversion = compile_onnx(model, data)
    runner = AkidaSoftwareRunner(conversion.akida_model, conversion.input_name, conversion.output_name,
                                 conversion.float_output_shape)
    inputs = {conversion.input_name: _near_tie_inputs(conversion, data).astype(np.float32)}
    agreement = compare_akida_to_quantized(runner, conversion.quantized, inputs)
    rounding = agreement.input_rounding
    assert rounding["layer"] == "quantize" and rounding["differing_values"] > 0 and rounding["max_difference"] == 1
    assert not agreement.flagged and agreement.exact_share == 1.0, agreement.to_dict()
    end_to_end = runner.run(inputs)[0]  # Akida's own quantizer: the outputs move with the rounded inputs
    assert not np.array_equal(end_to_end, QuantizedOnnxRunner(conversion.quantized).run(inputs)[0])
    assert divergent_layers(conversion.akida_model, conversion.quantized, inputs[conversion.input_name]) == []


def test_an_input_quantizer_departing_by_more_than_rounding_is_a_disagreement():
    from qanac.backends.akida.agreement import compare_akida_to_quantized
    from qanac.backends.akida.runners import AkidaSoftwareRunner

    model = akida_models.conv_gap_classifier(size=8)
    data = akida_models.image_calibration(model, count=32)
    conversion = compile_onnx(model, data)
    quantizer = conversion.akida_model.layers[0]
    quantizer.variables["scales"] = np.asarray(quantizer.variables["scales"], np.float32) * 1.5
    runner = AkidaSoftwareRunner(conversion.akida_model, conversion.input_name, conversion.output_name,
                                 conversion.float_output_shape)
    inputs = {conversion.input_name: data.arrays["input"][:8]}
    agreement = compare_akida_to_quantized(runner, conversion.quantized, inputs)
    assert agreement.flagged and agreement.input_rounding["max_difference"] > 1
    assert any("input Quantizer 'quantize'" in problem for problem in agreement.problems), agreement.problems
    found = divergent_layers(conversion.akida_model, conversion.quantized, inputs[conversion.input_name])
    assert [d.layer for d in found] == ["quantize"] and found[0].max_abs_difference > 1
