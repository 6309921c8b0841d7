"""Regression: a Conv with a fused GlobalAveragePool over a large map saturates in Akida.

The quantized ONNX keeps tracking the float model (SQNR ~40 dB) while Akida's outputs are clipped
(measured here: SQNR of Akida vs quantized ONNX 11.5 dB at 32x32 on random images, 0 % identical values;
bit-exact at 8x8). ``compare_akida_to_quantized`` must flag the large map and stay quiet on the small one.
"""

from __future__ import annotations

import pytest

from qanac.backends.akida.agreement import compare_akida_to_quantized, fused_gap_layers
from qanac.backends.akida.backend import AkidaBackend
from qanac.backends.akida.convert import compile_onnx
from qanac.backends.akida.runners import AkidaSoftwareRunner
from qanac.compare import compare_outputs
from qanac.diagnostics import VerificationError
from qanac.execution import run_onnx
from tests.akida import akida_models

pytestmark = pytest.mark.slow


def akida_and_quantized(size: int):
    model = akida_models.conv_gap_classifier(size=size)
    data = akida_models.image_calibration(model, count=32)
    conversion = compile_onnx(model, data)
    runner = AkidaSoftwareRunner(
        conversion.akida_model, conversion.input_name, conversion.output_name, conversion.float_output_shape
    )
    return model, data, conversion, runner


def test_large_map_gap_is_flagged():
    model, data, conversion, runner = akida_and_quantized(32)
    agreement = compare_akida_to_quantized(runner, conversion.quantized, data.arrays)
    assert agreement.flagged
    assert agreement.comparison.sqnr_db < 20.0
    assert agreement.exact_share < 0.5
    assert agreement.suspects[0] == {"layer": "features", "input_map": [32, 32], "pixels": 1024}
    diagnostic = agreement.diagnostics()[0]
    assert diagnostic.code == "AKV301" and diagnostic.nodes == ["features"]
    assert "SQNR" in diagnostic.message

    # The quantized ONNX alone would have passed: it still tracks the float model closely.
    reference = run_onnx(model, data.arrays)[0]
    quantized_vs_float = compare_outputs(["logits"], [reference], run_onnx(conversion.quantized, data.arrays))[0]
    assert quantized_vs_float.sqnr_db > 30.0


def test_small_map_gap_is_bit_exact():
    _, data, conversion, runner = akida_and_quantized(8)
    agreement = compare_akida_to_quantized(runner, conversion.quantized, data.arrays)
    assert not agreement.flagged
    assert agreement.exact_share == 1.0
    assert agreement.diagnostics() == []
    assert fused_gap_layers(runner.model) == [{"layer": "features", "input_map": [8, 8], "pixels": 64}]


def test_emit_reports_the_disagreement(tmp_path):
    model = akida_models.conv_gap_classifier(size=32)
    with pytest.raises(VerificationError) as raised:  # and writes nothing
        AkidaBackend().emit(model, akida_models.image_calibration(model, count=32), {}, tmp_path)
    codes = [d.code for d in raised.value.diagnostics]
    assert "AKV301" in codes and "AKV302" in codes
    assert "AKM201" in codes  # and the GAP layer runs in software
    assert list(tmp_path.iterdir()) == []
