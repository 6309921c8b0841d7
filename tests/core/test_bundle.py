"""Bundles are written atomically and refuse to overwrite without force; reading one checks its manifest
and every file it names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qanac import bundle
from qanac.calibration import Preprocessing
from qanac.diagnostics import UsageError
from qanac.manifest import (
    FORMAT_VERSION,
    CalibrationRecord,
    InputRecord,
    Manifest,
    OutputRecord,
    PartitionRecord,
    SegmentRecord,
    SourceRecord,
)


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with bundle.staged_directory(out, force=False) as stage:
            (stage / "half.txt").write_text("x")
            raise RuntimeError("backend failed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    write_bundle(out)
    with pytest.raises(UsageError, match="already exists"):
        with bundle.staged_directory(out, force=False):
            pass
    with bundle.staged_directory(out, force=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_forced_write_keeps_the_old_bundle(tmp_path):
    out = tmp_path / "out"
    written = write_bundle(out)
    with pytest.raises(RuntimeError):
        with bundle.staged_directory(out, force=True):
            raise RuntimeError("boom")
    assert json.loads((out / bundle.MANIFEST).read_text()) == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]



def write_bundle(root: Path, **changes: Any) -> dict[str, Any]:
    """A bundle of files with made-up contents (reference.onnx, seg0/model.bin, seg1/host.onnx: 10, 20 and 30
    bytes) and a manifest that follows the schema, with ``changes`` applied to its JSON form; returns that
    JSON."""

    (root / "seg0").mkdir(parents=True)
    (root / "seg1").mkdir()
    files = {"reference": "reference.onnx", "seg0/compiled": "seg0/model.bin", "seg1/model": "seg1/host.onnx"}
    for size, name in enumerate(files.values(), start=1):
        (root / name).write_bytes(b"x" * 10 * size)
    manifest = Manifest(
        format_version=FORMAT_VERSION, target="onnxruntime", device="cpu",
        source=SourceRecord(path="m.onnx", framework="onnx", notes=[], original_layout={}),
        inputs=[InputRecord(name="x", shape=["N", 3, 8, 8], dtype="float32", layout="NCHW",
                            preprocessing=Preprocessing())],
        outputs=[OutputRecord(name="y", shape=["N", 5], dtype="float32")],
        post_processing=[], labels=None,
        calibration=CalibrationRecord(source="c.npy", num_samples=4, random=False, preprocessing=Preprocessing()),
        pipeline="p", passes_applied=[], approximations=[], tool_versions={},
        segments=[
            SegmentRecord(name="seg0", kind="device", dir="seg0", target="onnxruntime", inputs=["x"], outputs=["t"],
                          macs=10, nodes=2, files={"compiled": "model.bin"}, device="cpu"),
            SegmentRecord(name="seg1", kind="host", dir="seg1", target="host", inputs=["t"], outputs=["y"],
                          macs=1, nodes=1, files={"model": "host.onnx"}),
        ],
        partition=PartitionRecord(segments=2, device_segments=1, transfers=1, total_macs=11, device_macs=10,
                                  device_mac_share=10 / 11),
        files=bundle.file_entries(root, files),
    )
    data = {**manifest.to_dict(), **changes}
    (root / bundle.MANIFEST).write_text(json.dumps(data))
    return data


def test_open_checks_manifest_and_checksums(tmp_path):
    with pytest.raises(UsageError, match="not a qanac bundle"):
        bundle.Bundle.open(tmp_path)
    write_bundle(tmp_path)
    assert bundle.Bundle.open(tmp_path).target == "onnxruntime"
    (tmp_path / "reference.onnx").write_bytes(b"abd")
    with pytest.raises(UsageError, match="checksum"):
        bundle.Bundle.open(tmp_path)


def test_a_bundle_with_segment_folders_opens_and_its_paths_resolve_inside(tmp_path):
    write_bundle(tmp_path)
    opened = bundle.Bundle.open(tmp_path)
    segment = opened.manifest.segments[0]
    assert opened.segment_dir(segment) / segment.file("compiled") == tmp_path / "seg0" / "model.bin"
    assert opened.file("reference") == tmp_path / "reference.onnx"
    assert opened.input_names == ["x"] and opened.output_names == ["y"] and opened.manifest.device == "cpu"


def test_a_file_above_the_size_limit_is_refused_before_hashing(tmp_path, monkeypatch):
    write_bundle(tmp_path)
    monkeypatch.setattr(bundle, "MAX_FILE_BYTES", 29)
    with pytest.raises(UsageError, match=r"field 'files.seg1/model.path' names .* of 30 bytes, above the limit"):
        bundle.Bundle.open(tmp_path)
    monkeypatch.setattr(bundle, "MAX_FILE_BYTES", 30)
    bundle.Bundle.open(tmp_path)


def test_a_symlink_anywhere_on_a_path_is_refused_even_inside_the_bundle(tmp_path):
    write_bundle(tmp_path)
    (tmp_path / "seg0").rename(tmp_path / "real")
    (tmp_path / "seg0").symlink_to("real")
    with pytest.raises(UsageError, match="field 'files.seg0/compiled.path' leads through a symbolic link"):
        bundle.Bundle.open(tmp_path)


def test_a_manifest_that_is_a_symlink_is_refused(tmp_path):
    real = tmp_path / "real"
    write_bundle(real)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / bundle.MANIFEST).symlink_to(real / bundle.MANIFEST)
    with pytest.raises(UsageError, match="manifest.json is not a regular file"):
        bundle.Bundle.open(linked)
