"""The compile driver stage by stage: each stage's typed result, and compile_model as their sequence."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qanac import compiler
from qanac.bundle import MANIFEST, Bundle
from qanac.compiler import (
    AssembledBundle,
    CompileRequest,
    EmittedPlan,
    ImportedSource,
    LintedModel,
    PreparedModel,
)
from qanac.diagnostics import UsageError
from qanac.manifest import Manifest
from qanac.partition import DEVICE, HOST


@pytest.fixture
def request_for(tmp_path, small_model_path, small_calib_path):
    def make(**changes) -> CompileRequest:
        fields = {"source": str(small_model_path), "target": "onnxruntime", "output": tmp_path / "bundle",
                  "calibration": str(small_calib_path)}
        return CompileRequest(**{**fields, **changes})

    return make


def test_each_stage_hands_a_typed_result_to_the_next(request_for, tmp_path):
    request = request_for()

    source = compiler.import_source(request)
    assert isinstance(source, ImportedSource)
    assert source.target.name == "onnxruntime" and source.imported.framework == "onnx"
    assert source.calibration.num_samples == 16 and source.diagnostics == []

    prepared = compiler.run_target_pipeline(request, source)
    assert isinstance(prepared, PreparedModel) and prepared.target is source.target
    assert {p["pass"] for p in prepared.pipeline.applied()} >= {"fold-batchnorm-into-conv", "strip-trailing-softmax"}
    assert set(prepared.seconds) == {"import", "pipeline"}

    linted = compiler.lint_prepared(request, prepared)
    assert isinstance(linted, LintedModel)
    assert linted.host_nodes == {} and linted.reference is linted.model  # no rules, no approximation
    assert "Softmax" not in {n.op_type for n in linted.model.graph.node}

    backend = prepared.target.load_backend()
    stage = tmp_path / "stage"
    stage.mkdir()
    emitted = compiler.emit_segments(linted.model, linted.host_nodes, prepared.calibration, backend, request, stage)
    assert isinstance(emitted, EmittedPlan)
    assert [(s.name, s.dir, s.segment.kind, s.files) for s in emitted.segments] == [
        ("seg0", ".", DEVICE, {"compiled": "model.qdq.onnx"})]
    assert emitted.segments[0].emitted.device == "cpu"

    assembled = compiler.assemble_bundle(request, prepared, linted, emitted, backend, {"total": 1.0}, stage)
    assert isinstance(assembled, AssembledBundle) and isinstance(assembled.manifest, Manifest)
    manifest = assembled.manifest
    assert manifest.device == "cpu" and manifest.partition.device_mac_share == 1.0
    assert [o.name for o in manifest.outputs] == ["probs"] and manifest.post_processing[0].op == "Softmax"
    assert set(manifest.files) == {"reference", "compiled"}
    assert assembled.report["backend_summary"] == emitted.segments[0].emitted.summary
    assembled.write(stage)
    assert Bundle.open(stage).manifest == manifest


def test_compile_model_is_the_sequence_and_returns_the_manifest_it_wrote(request_for):
    request = request_for()
    result = compiler.compile_model(request)
    written = json.loads((request.output / MANIFEST).read_text())
    assert result.manifest == json.loads(json.dumps(written)) == result.bundle_manifest.to_dict()
    assert list(result.seconds) == ["import", "pipeline", "backend", "total"]


def test_prepare_model_is_import_and_pipeline_without_calibration(request_for):
    prepared = compiler.prepare_model(request_for(calibration=None))
    assert prepared.calibration is None and prepared.target.name == "onnxruntime"
    assert "BatchNormalization" not in {n.op_type for n in prepared.model.to_onnx().graph.node}


def test_calibration_is_required_before_the_pipeline_runs(request_for, monkeypatch):
    ran = []
    monkeypatch.setattr(compiler, "run_target_pipeline", lambda *a, **k: ran.append(a))
    with pytest.raises(UsageError, match="needs calibration data"):
        compiler.compile_model(request_for(calibration=None))
    assert ran == []


def test_a_host_segment_is_float_onnx_and_its_record_names_no_backend(request_for, tmp_path):
    """Planning places a lint error's node on the host: the assembled manifest runs it as float ONNX."""

    request = request_for()
    prepared = compiler.prepare_model(request)
    linted = compiler.lint_prepared(request, prepared)
    relu = next(n.name for n in linted.model.graph.node if n.op_type == "Relu")
    backend = prepared.target.load_backend()
    stage = tmp_path / "stage"
    stage.mkdir()
    emitted = compiler.emit_segments(linted.model, {relu: "test"}, prepared.calibration, backend,
                                     request_for(min_device_share=0.0), stage)
    kinds = [s.segment.kind for s in emitted.segments]
    assert HOST in kinds and DEVICE in kinds
    records = [compiler.segment_record(s, "onnxruntime", backend.variants) for s in emitted.segments]
    host = records[kinds.index(HOST)]
    assert (host.target, host.device, host.backend, host.variants, host.files) == (
        "host", None, {}, [], {"model": "host.onnx"})
    model = onnx.load(str(stage / host.dir / "host.onnx"))
    assert [n.name for n in model.graph.node] == emitted.segments[kinds.index(HOST)].segment.nodes
    partition = compiler.partition_record(emitted)
    device_macs = sum(s.segment.macs for s in emitted.segments if s.segment.kind == DEVICE)
    assert partition.device_macs == device_macs and partition.transfers == emitted.plan.transfers >= 1
    assert np.isclose(partition.device_mac_share, device_macs / partition.total_macs)  # all on the "hardware"
