"""Bundles: the directory a compilation produces, written atomically, and read back to run or verify.

Layout::

    OUT/
      manifest.json    target, device, inputs (shapes, dtypes, preprocessing), outputs, post-processing,
                       labels, calibration, passes applied with counts, tool versions, file checksums
      reference.onnx   the canonical float model: the reference every check compares against
      report.json      the pipeline record (per pass, per sweep), diagnostics, the backend's report
      ...              the backend's files (model.qdq.onnx, model.fbz, quantized.onnx, ...)

A bundle is assembled in a staging directory beside ``OUT`` and renamed into place at the end, so a
failed or interrupted compile never leaves a half-written bundle; an existing ``OUT`` is replaced only
with ``force``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qanac.diagnostics import UsageError

MANIFEST = "manifest.json"
REFERENCE = "reference.onnx"
REPORT = "report.json"
FORMAT_VERSION = 1

TOOLS = ("qanac", "onnx", "onnxruntime", "onnx-graphsurgeon", "numpy", "torch", "quantizeml", "cnn2snn", "akida")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for tool in TOOLS:
        try:
            versions[tool] = importlib.metadata.version(tool)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing path unless forced; done before any work starts."""

    if out.exists() and not force:
        raise UsageError(f"output {out} already exists", hint="choose another -o or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")


@contextlib.contextmanager
def staged_directory(out: Path, force: bool) -> Iterator[Path]:
    """Yield a staging directory that becomes ``out`` only if the block completes."""

    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = None
    if out.exists():
        replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.rename(out, replaced)
    os.rename(staging, out)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def json_text(data: Any) -> str:
    """Standard JSON (no NaN/Infinity literals: non-finite floats become the strings "inf", "-inf", "nan")."""

    return json.dumps(_finite(data), indent=2, default=_json_default, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.floating):
        return _finite(float(value))
    return value


def write_json(path: Path, data: Any) -> None:
    path.write_text(json_text(data) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def file_entries(directory: Path, files: dict[str, str]) -> dict[str, dict[str, str]]:
    return {role: {"path": name, "sha256": sha256_of(directory / name)} for role, name in files.items()}


class Bundle:
    """A compiled bundle on disk: its manifest, its reference model, and a runner for its target."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, verify_checksums: bool = True) -> "Bundle":
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise UsageError(f"{path} is not a qanac bundle (no {MANIFEST})", hint="create one with qanac compile")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{manifest_path} is not valid JSON: {exc}") from exc
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UsageError(
                f"{path} has bundle format {manifest.get('format_version')}; this qanac reads {FORMAT_VERSION}"
            )
        bundle = cls(path, manifest)
        if verify_checksums:
            bundle.check_files()
        return bundle

    def check_files(self) -> None:
        for role, entry in self.manifest["files"].items():
            file = self.path / entry["path"]
            if not file.exists():
                raise UsageError(f"bundle file missing: {file} ({role})")
            if sha256_of(file) != entry["sha256"]:
                raise UsageError(f"bundle file {file} ({role}) does not match its checksum: it was modified")

    def file(self, role: str) -> Path:
        return self.path / self.manifest["files"][role]["path"]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    @property
    def labels(self) -> list[str] | None:
        return self.manifest.get("labels")

    def report(self) -> dict[str, Any]:
        path = self.path / REPORT
        return json.loads(path.read_text()) if path.exists() else {}
