"""Bundles: the directory a compilation produces, written atomically, and read back to run or verify.

Layout (docs/bundle.md is the spec)::

    OUT/
      manifest.json    the typed manifest (qanac.manifest): target, device, inputs (shapes, dtypes,
                       preprocessing), outputs, post-processing, labels, calibration, passes applied with
                       counts, tool versions, segments in run order, partition, file checksums
      reference.onnx   the canonical float model: the reference every check compares against
      report.json      the pipeline record (per pass, per sweep), diagnostics, the backend's report
      ...              the segments' files (model.qdq.onnx, model.fbz, quantized.onnx, host.onnx, ...)

A bundle is assembled in a staging directory beside ``OUT`` and renamed into place at the end, so a
failed or interrupted compile never leaves a half-written bundle; an existing ``OUT`` is replaced only
with ``force``. Reading a bundle (``Bundle.open``) validates the manifest and every path it names before
anything runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from qanac.diagnostics import UsageError
from qanac.manifest import FileEntry, Manifest, ManifestError, Record, SegmentRecord, relative_path

MANIFEST = "manifest.json"
REFERENCE = "reference.onnx"
REPORT = "report.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_FILE_BYTES = 4 << 30  # any file a manifest names (ONNX protobufs stop at 2 GiB)

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tool_versions(extras: Iterable[str] = ()) -> dict[str, str]:
    """The versions of Python, qanac, its dependencies, and the dependencies of its optional ``extras``
    (pyproject.toml: a target's toolchain under the target's name, a frontend's framework under its name),
    as installed."""

    versions = {"python": platform.python_version()}
    try:
        versions["qanac"] = importlib.metadata.version("qanac")
        requirements = importlib.metadata.requires("qanac") or []
    except importlib.metadata.PackageNotFoundError:
        return versions
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        if name is None or (extra is not None and extra.group(1) not in extras):
            continue
        try:
            versions[name.group()] = importlib.metadata.version(name.group())
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
    if isinstance(value, Record):
        return _finite(value.to_dict())
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


def file_entries(directory: Path, files: dict[str, str]) -> dict[str, FileEntry]:
    return {role: FileEntry(name, sha256_of(directory / name)) for role, name in files.items()}


def bundle_path(root: Path, relative: str, field: str, directory: bool = False) -> Path:
    """``root / relative`` after checking, without following any link, that every component exists, none
    is a symbolic link, and the last is a regular file (or a directory when ``directory``)."""

    path = root
    for part in relative_path(relative, field, directory).parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise UsageError(f"bundle file missing: {path} (manifest field '{field}')",
                             hint="the bundle is incomplete; compile the model again") from None
        if stat.S_ISLNK(mode):
            raise ManifestError(field, f"leads through a symbolic link ({path}); a bundle holds its own files")
    mode = os.lstat(path).st_mode
    if directory and not stat.S_ISDIR(mode):
        raise ManifestError(field, f"names {path}, which is not a directory")
    if not directory and not stat.S_ISREG(mode):
        raise ManifestError(field, f"names {path}, which is not a regular file (a directory, device, FIFO or socket)")
    return path


def read_bundle_file(path: Path, field: str, limit: int) -> Iterator[bytes]:
    """The bytes of ``path`` in chunks, refusing a link, anything but a regular file, and more than ``limit``
    bytes (checked before reading, and again while reading). Opening never blocks (O_NONBLOCK)."""

    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ManifestError(field, f"names {path}, which cannot be opened as a regular file: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ManifestError(field, f"names {path}, which is not a regular file")
        if info.st_size > limit:
            raise ManifestError(field, f"names {path} of {info.st_size:,} bytes, above the limit of {limit:,}")
        total = 0
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            total += len(chunk)
            if total > limit:
                raise ManifestError(field, f"names {path}, which grew above the limit of {limit:,} bytes")
            yield chunk


class Bundle:
    """A compiled bundle on disk: its typed manifest, its files, and their integrity.

    ``open`` accepts a bundle only when its manifest follows the schema (qanac.manifest) and every path the
    manifest names is a regular file (or segment directory) inside the bundle, reached without symbolic
    links, of at most ``MAX_FILE_BYTES``, with the recorded checksum. Every violation is a UsageError naming
    the manifest field; nothing outside the bundle directory is opened.
    """

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, verify_checksums: bool = True) -> "Bundle":
        path = Path(path)
        try:
            mode = os.lstat(path / MANIFEST).st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise UsageError(f"{path} is not a qanac bundle (no {MANIFEST})",
                             hint="create one with qanac compile") from None
        if not stat.S_ISREG(mode):
            raise UsageError(f"{path / MANIFEST} is not a regular file",
                             hint="a bundle's manifest is a plain JSON file")
        text = b"".join(read_bundle_file(path / MANIFEST, MANIFEST, MAX_MANIFEST_BYTES))
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path / MANIFEST} is not valid JSON: {exc}") from exc
        bundle = cls(path, Manifest.from_dict(data))
        bundle.check_files(verify_checksums)
        return bundle

    def check_files(self, verify_checksums: bool = True) -> None:
        """Every file and segment directory the manifest names is inside the bundle (see the class doc)."""

        for role, entry in self.manifest.files.items():
            field = f"files.{role}.path"
            file = bundle_path(self.path, entry.path, field)
            if not verify_checksums:
                continue
            digest = hashlib.sha256()
            for chunk in read_bundle_file(file, field, MAX_FILE_BYTES):
                digest.update(chunk)
            if digest.hexdigest() != entry.sha256:
                raise UsageError(f"bundle file {file} ({role}) does not match its checksum: it was modified")
        for index, segment in enumerate(self.manifest.segments):
            bundle_path(self.path, segment.dir, f"segments[{index}].dir", directory=True)

    def file(self, role: str) -> Path:
        return self.path / self.manifest.files[role].path

    def segment_dir(self, segment: SegmentRecord) -> Path:
        return self.path / segment.dir

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def input_names(self) -> list[str]:
        return self.manifest.input_names

    @property
    def output_names(self) -> list[str]:
        return self.manifest.output_names

    @property
    def labels(self) -> list[str] | None:
        return self.manifest.labels
