"""Bundles are written atomically and refuse to overwrite without force."""

from __future__ import annotations

import json

import pytest

from qanac import bundle
from qanac.diagnostics import UsageError


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
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UsageError, match="already exists"):
        with bundle.staged_directory(out, force=False):
            pass
    with bundle.staged_directory(out, force=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_forced_write_keeps_the_old_bundle(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with bundle.staged_directory(out, force=True):
            raise RuntimeError("boom")
    assert (out / "old.txt").read_text() == "old"


def test_open_checks_manifest_and_checksums(tmp_path):
    with pytest.raises(UsageError, match="not a qanac bundle"):
        bundle.Bundle.open(tmp_path)
    (tmp_path / "reference.onnx").write_bytes(b"abc")
    manifest = {
        "format_version": bundle.FORMAT_VERSION,
        "target": "onnxruntime",
        "files": bundle.file_entries(tmp_path, {"reference": "reference.onnx"}),
    }
    (tmp_path / bundle.MANIFEST).write_text(json.dumps(manifest))
    assert bundle.Bundle.open(tmp_path).target == "onnxruntime"
    (tmp_path / "reference.onnx").write_bytes(b"abd")
    with pytest.raises(UsageError, match="checksum"):
        bundle.Bundle.open(tmp_path)
