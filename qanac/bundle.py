"""Bundles: the directory a compilation produces, written atomically, and read back to run or verify.

Layout (docs/bundle.md is the spec)::

    OUT/
      manifest.json    the typed manifest (qanac.manifest): target, device, inputs (shapes, dtypes,
                       preprocessing), outputs, post-processing, labels, calibration, passes applied with
                       counts, tool versions, segments in run order, partition, file checksums
      reference.onnx   the canonical float model: the reference every check compares against
      report.json      the pipeline record (per pass, per sweep), diagnostics, the backend's report
      ...              the segments' files (model.qdq.onnx, model.fbz, quantized.onnx, host.onnx, ...)

A bundle is assembled in a staging directory beside ``OUT`` (``.OUT.staging-*``, made before any work and
marked as qanac's) and renamed into place at the end, so a failed or interrupted compile never leaves a
half-written bundle; a staging directory that a killed compile left is removed by the next compile to
``OUT``. An existing ``OUT`` is replaced only with ``force``, and only when it is empty or a qanac bundle.
Reading a bundle (``Bundle.open``) validates the manifest and every path it names before anything runs.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

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


STAGING_MARKER = ".qanac-staging"  # inside every directory qanac stages or parks a bundle in; nothing else is
# ever removed as stale
PARTIAL_FILES = {"model.onnx", "pipeline.json"}  # what `qanac compile --stop-after` writes


def check_output_dir(out: Path, force: bool, named: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work, an output directory qanac must not write or replace (UsageError, exit 2,
    naming the path): a path below a file, a symbolic link, an existing path that is not a directory, an
    existing directory without ``force``, and with ``force`` anything but an empty directory, a qanac bundle
    (a manifest that qanac.manifest accepts) or a ``--stop-after`` output. Never the working directory or a
    directory holding it, nor one holding any of the ``named`` paths (the compile's inputs and dump folder)."""

    _check_ancestors(out)
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UsageError(f"output {out} is the working directory or holds it",
                         hint="give -o a new directory, e.g. -o bundle")
    for path in named:
        inner = Path(path).resolve()
        if inner == resolved or resolved in inner.parents:
            raise UsageError(f"output {out} holds {path}, which this command reads or writes",
                             hint="give -o a directory of its own")
    if out.is_symlink():
        raise UsageError(f"output {out} is a symbolic link", hint="give -o the directory itself")
    if not out.exists():
        return
    if not force:
        raise UsageError(f"output {out} already exists", hint="choose another -o or pass --force to replace it")
    if not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory", hint="choose another -o")
    problem = _not_replaceable(out)
    if problem:
        raise UsageError(f"output {out} {problem}; --force replaces only an empty directory or a qanac bundle",
                         hint="choose another -o: qanac never deletes files it did not write")


def check_output_file(path: Path, suffixes: Iterable[str] = ()) -> None:
    """Refuse, before any work, an output file that cannot be written (UsageError, exit 2, naming it): a
    directory, a symbolic link, a parent that is missing, not a directory or not writable, a suffix other
    than ``suffixes`` (when given)."""

    suffixes = tuple(suffixes)
    if suffixes and path.suffix not in suffixes:
        raise UsageError(f"output {path} must end in {' or '.join(suffixes)}", hint=f"e.g. -o out{suffixes[0]}")
    _check_ancestors(path)
    if path.is_symlink() or path.is_dir():
        raise UsageError(f"output {path} is a {'symbolic link' if path.is_symlink() else 'directory'}",
                         hint="give a file name, e.g. out" + (suffixes[0] if suffixes else ""))
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"the directory of output {path} does not exist", hint=f"create {parent} first")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise UsageError(f"cannot write output {path}: {exc.strerror}", hint="choose a writable place") from None
    os.close(handle)
    os.unlink(probe)


def prepare_directory(path: Path, option: str) -> None:
    """Create the directory ``path`` (and its parents) that ``option`` names, before any work: a path that is
    a file, or below one, or cannot be created, is a UsageError naming it."""

    _check_ancestors(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a directory", hint=f"give {option} a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {option} {path}: {exc.strerror}", hint="choose a writable place") from None


def _check_ancestors(path: Path) -> None:
    """Every existing ancestor of ``path`` is a directory (``-o model.onnx/out`` is refused)."""

    for parent in reversed(path.absolute().parents):
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"cannot write {path}: {parent} is a file, not a directory",
                             hint="choose an output path below a directory")


def _not_replaceable(out: Path) -> str:
    """Why ``--force`` must not replace the directory ``out`` ("" when it may: empty, a bundle, a partial)."""

    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        return f"cannot be listed ({exc.strerror})"
    if not entries:
        return ""
    if MANIFEST in entries:
        try:
            Manifest.from_dict(json.loads(b"".join(read_bundle_file(out / MANIFEST, MANIFEST, MAX_MANIFEST_BYTES))))
            return ""
        except (UsageError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return f"has a {MANIFEST} that is not a valid qanac manifest"
    if set(entries) == PARTIAL_FILES:
        try:
            if "stopped_after" in json.loads((out / "pipeline.json").read_text()):
                return ""
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError):
            pass
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    return f"is not a qanac bundle (it holds {shown})"


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; returns those created, outermost first."""

    missing = [p for p in [directory, *directory.parents] if not p.exists()][::-1]
    for path in missing:
        try:
            path.mkdir()
        except OSError as exc:
            _remove_empty(missing[: missing.index(path)])
            raise UsageError(f"cannot create {path}: {exc.strerror}", hint="choose a writable place") from None
    return missing


def _remove_empty(created: list[Path]) -> None:
    for path in reversed(created):
        with contextlib.suppress(OSError):
            path.rmdir()


LIVE_STAGING: dict[Path, list[Path]] = {}  # this process's staging directories not yet renamed or removed,
# each with the parent folders made for it


def remove_live_staging() -> None:
    """Remove this process's staging directories and the parents made for them: what a forced exit
    (``qanac.cli_support.force_exit``) does instead of the cleanups it does not wait for."""

    for staging, created in list(LIVE_STAGING.items()):
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)


def _mark(directory: Path) -> None:
    """Write the marker that makes ``directory`` qanac's to remove once its process is gone (atomically:
    a marker that exists is complete)."""

    data = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    temporary = directory / f"{STAGING_MARKER}.tmp"
    temporary.write_text(data)
    os.replace(temporary, directory / STAGING_MARKER)


def _owner_alive(marker: Path) -> bool:
    try:
        owner = json.loads(marker.read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return True  # another machine's process: cannot tell, so leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> tuple[list[Path], list[Path]]:
    """Remove the staging (and parked old bundle) directories that compiles to ``out`` killed before they
    could clean up (SIGKILL): ``.NAME.staging-*`` and ``.NAME.replaced-*`` beside ``out`` that hold qanac's
    marker file naming a process that is gone. Returns (removed, left); ``left`` are such directories without
    a marker or whose process still runs, never touched."""

    removed, left = [], []
    pattern = glob.escape(out.name)
    for path in sorted([*out.parent.glob(f".{pattern}.staging-*"), *out.parent.glob(f".{pattern}.replaced-*")]):
        if path.is_symlink() or not path.is_dir():
            continue
        marker = path / STAGING_MARKER
        if marker.is_symlink() or not marker.is_file() or _owner_alive(marker):
            left.append(path)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed, left


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait (and are delivered after the block) so a cleanup or the final renames
    run whole."""

    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def staged_directory(
    out: Path, force: bool, named: Iterable[str | Path] = (), on_note: Callable[[str], None] | None = None
) -> Iterator[Path]:
    """Yield a staging directory that becomes ``out`` only if the block completes.

    ``out`` is checked first (``check_output_dir``); stale staging directories of earlier compiles to ``out``
    are removed (``clean_stale``, each reported through ``on_note``); the staging directory is created at once
    beside ``out`` (so an unwritable place fails before any work) with qanac's marker inside. On any
    exception, including KeyboardInterrupt and the CLI's SIGTERM, the staging directory and the parents it
    created are removed. At the end ``out`` is checked again and replaced in two renames.
    """

    named = list(named)
    check_output_dir(out, force, named)
    note = on_note or (lambda text: None)
    created = _make_parents(out.parent)
    try:
        removed, left = clean_stale(out)
        for path in removed:
            note(f"removed {path}, left by an interrupted compile to {out}")
        for path in left:
            note(f"left {path} alone: it is not qanac's, or the compile that made it still runs")
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        except OSError as exc:
            raise UsageError(f"cannot write output {out}: {exc.strerror} ({out.parent})",
                             hint="choose a writable place for -o") from None
        LIVE_STAGING[staging] = created
        _mark(staging)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield staging
        check_output_dir(out, force, named)
    except BaseException:
        with _signals_held():
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(created)
            LIVE_STAGING.pop(staging, None)
        raise
    with _signals_held():
        (staging / STAGING_MARKER).unlink()
        parked = None
        if out.exists():
            parked = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
            _mark(parked)
            os.rename(out, parked / out.name)
        os.rename(staging, out)
        LIVE_STAGING.pop(staging, None)
        if parked is not None:
            shutil.rmtree(parked, ignore_errors=True)


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
            raise UsageError(f"{path / MANIFEST} is not valid JSON: {exc}",
                             hint="the bundle is damaged or was not written by qanac; compile the model again") from exc
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
                raise UsageError(f"bundle file {file} ({role}) does not match its checksum: it was modified",
                                 hint="compile the model again")
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
