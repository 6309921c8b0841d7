"""AkidaBackend: emit writes the bundle files, runners agree with each other in the float layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qanac.backend import Backend, EmitResult
from qanac.backends.akida.backend import AkidaBackend, AkidaSegmentRecord
from qanac.compiler import EmittedSegment, segment_record
from qanac.diagnostics import UnsupportedModelError, UsageError
from qanac.manifest import SegmentRecord
from qanac.partition import DEVICE, Segment
from tests.akida import akida_models

pytestmark = pytest.mark.slow


def bundle_manifest(result: EmitResult) -> SegmentRecord:
    """The segment record the bundle writer makes of an EmitResult, as the runner reads it back from JSON."""

    segment = Segment(DEVICE, ["conv"], ["image"], ["logits"], 1)
    emitted = EmittedSegment("seg0", ".", segment, dict(result.files), result)
    record = segment_record(emitted, "akida", AkidaBackend.variants)
    return SegmentRecord.from_dict(json.loads(json.dumps(record.to_dict())))


@pytest.fixture(scope="module")
def emitted(tiny_model, tiny_calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("akida_bundle")
    result = AkidaBackend().emit(tiny_model, tiny_calibration, {"num_samples": 16}, out)
    return out, result


def test_backend_satisfies_the_protocol():
    backend: Backend = AkidaBackend()
    assert backend.name == "akida"


def test_emit_writes_files_and_report(emitted):
    out, result = emitted
    assert result.files == {"compiled": "model.fbz", "quantized": "quantized.onnx"}
    assert (out / "model.fbz").stat().st_size > 0 and (out / "quantized.onnx").stat().st_size > 0
    assert result.device == "SixNodesIPv2"
    assert result.record["ip_version"] == "v2"
    assert result.record["num_samples"] == 16
    assert result.record["output_shape"] == [10]
    json.dumps(result.record)
    assert AkidaSegmentRecord.from_dict(result.record).device["name"] == "SixNodesIPv2"
    report = result.report
    assert report["mapping"]["fully_on_hardware"] is True
    assert report["agreement"]["flagged"] is False
    assert {"quantize", "convert", "map", "agreement", "total"} <= set(report["seconds"])
    assert not result.diagnostics


def test_software_runner_matches_quantized_onnx(emitted, tiny_model):
    out, result = emitted
    manifest = bundle_manifest(result)
    backend = AkidaBackend()
    akida_runner = backend.load_runner(out, manifest, {})
    quantized_runner = backend.load_variant("quantized", out, manifest, {})
    assert akida_runner.output_names == quantized_runner.output_names == ["logits"]

    data = akida_models.image_calibration(tiny_model, count=24, seed=7).arrays
    akida_out = akida_runner.run(data)[0]
    quantized_out = quantized_runner.run(data)[0]
    assert akida_out.shape == quantized_out.shape == (24, 10)
    assert np.array_equal(akida_out, quantized_out)  # bit-exact for this model


def test_runner_reports_progress(emitted, tiny_model):
    out, result = emitted
    runner = AkidaBackend().load_runner(out, bundle_manifest(result), {})
    seen: list[int] = []
    data = akida_models.image_calibration(tiny_model, count=40).arrays
    runner.run(data, progress=seen.append)
    assert sum(seen) == 40


def test_feature_map_output_comes_back_nchw(tmp_path):
    model = akida_models.conv_map_output(size=8)
    calibration = akida_models.image_calibration(model, count=8)
    backend = AkidaBackend()
    result = backend.emit(model, calibration, {"agreement_samples": 0}, tmp_path)
    runner = backend.load_runner(tmp_path, bundle_manifest(result), {})
    from qanac.execution import run_onnx

    akida_out = runner.run(calibration.arrays)[0]
    float_out = run_onnx(model, calibration.arrays)[0]
    assert akida_out.shape == float_out.shape == (8, 4, 8, 8)
    scale = float(np.abs(float_out).max())
    assert float(np.abs(akida_out - float_out).max()) < 0.1 * scale
    assert "agreement" not in result.report


def test_hardware_runner_without_a_board_is_a_usage_error(emitted):
    out, result = emitted
    with pytest.raises(UsageError, match="no Akida hardware device found"):
        AkidaBackend().load_runner(out, bundle_manifest(result), {"hardware": True})


def test_v1_device_fails_before_any_work(tiny_model, tiny_calibration, tmp_path):
    """AKD1000 compiles through the v1 path, whose rules refuse the tiny CNN's Add and Concat up front."""

    with pytest.raises(UnsupportedModelError, match="Akida v1 rules") as caught:
        AkidaBackend().emit(tiny_model, tiny_calibration, {"device": "AKD1000"}, tmp_path)
    assert {"residual_add"} <= {n for d in caught.value.diagnostics if d.code == "AK1102" for n in d.nodes}
    assert list(Path(tmp_path).iterdir()) == []


def test_unsupported_model_writes_nothing(tmp_path):
    model = akida_models.squeeze_excitation()
    with pytest.raises(UnsupportedModelError, match="se_squeeze"):
        AkidaBackend().emit(model, akida_models.image_calibration(model, count=8), {}, tmp_path)
    assert list(Path(tmp_path).iterdir()) == []


def test_runner_validates_its_own_backend_record(emitted):
    out, result = emitted
    segment = bundle_manifest(result)
    segment.backend.pop("output_name")
    with pytest.raises(UsageError, match=r"field 'segments\[seg0\].backend.output_name' is missing"):
        AkidaBackend().load_runner(out, segment, {})
    segment.backend.update(output_name=3)
    with pytest.raises(UsageError, match=r"'segments\[seg0\].backend.output_name' must be a string"):
        AkidaBackend().load_variant("quantized", out, segment, {})
    with pytest.raises(UsageError, match="writes no 'float16' model"):
        AkidaBackend().load_variant("float16", out, bundle_manifest(result), {})
