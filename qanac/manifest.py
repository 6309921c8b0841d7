"""The bundle manifest as typed records: what ``manifest.json`` holds, its JSON form, and its schema.

``Manifest`` and its sub-records are dataclasses; their fields are the schema (docs/bundle.md is the spec).
``to_dict`` gives the JSON form, ``from_dict`` reads it back and refuses, as a ``ManifestError`` (a
UsageError, exit 2) naming the field, anything that is not exactly this format: a field missing or not
known, a value of the wrong type, a path that could leave the bundle (absolute, ``..``, the bundle directory
itself where a file is meant), a segment whose files are not checksummed, post-processing of an output the
manifest does not list. Where those paths lead on disk (regular files inside the bundle, sizes, checksums)
is checked by ``qanac.bundle`` when a bundle is opened.

A backend's own fields of a device segment live in ``SegmentRecord.backend``, a JSON object the core never
looks into; the backend reads it through ``SegmentRecord.backend_record`` with its own record type, so its
fields are validated the same way.

Versions: ``FORMAT_VERSION`` is written. Format 2 (MACs counted on the legalized model, ``device_macs`` the
MACs of device segments) is read with its counts kept and ``device_macs`` made the hardware MACs its share
states; format 1 (the backend's fields merged into each device segment and into the top level) is read by
moving them into ``backend``, then as format 2; any other version is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import PurePosixPath
from typing import Any, Literal, TypeVar

from qanac.calibration import Preprocessing
from qanac.diagnostics import UsageError

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

DEVICE = "device"  # segment kinds
HOST = "host"
COMPILED = "compiled"  # file role of a device segment's deployable model, and the variant that runs it
HOST_MODEL = "model"  # file role of a host segment's float ONNX
REFERENCE_ROLE = "reference"  # file role of the float reference model

R = TypeVar("R", bound="Record")


class ManifestError(UsageError):
    """A manifest that breaks the schema; ``field`` is the dotted path of the offending field."""

    def __init__(self, field: str, problem: str):
        super().__init__(
            f"bundle manifest field '{field or '(top level)'}' {problem}",
            hint="the bundle is damaged or was not written by qanac; compile the model again",
        )
        self.field = field


class Record:
    """A dataclass with a JSON form: ``to_dict`` and a validating ``from_dict``."""

    def to_dict(self) -> dict[str, Any]:
        return _encode(self)

    @classmethod
    def from_dict(cls: type[R], data: Any, field: str = "") -> R:
        return _decode(data, cls, field)


@dataclasses.dataclass
class FileEntry(Record):
    path: str  # relative to the bundle directory
    sha256: str


@dataclasses.dataclass
class SourceRecord(Record):
    path: str
    framework: str
    notes: list[str]
    original_layout: dict[str, str]
    sha256: str | None = None  # when the source is a file


@dataclasses.dataclass
class InputRecord(Record):
    name: str
    shape: list[int | str]  # a string is a symbolic dimension (the batch)
    dtype: str
    layout: str
    preprocessing: Preprocessing


@dataclasses.dataclass
class OutputRecord(Record):
    name: str
    shape: list[int | str]
    dtype: str


@dataclasses.dataclass
class PostProcessingStep(Record):
    """A step the host applies to an output after the bundle's models ran (a Softmax stripped from the end)."""

    op: Literal["Softmax", "LogSoftmax"]
    axis: int
    output: str


@dataclasses.dataclass
class CalibrationRecord(Record):
    source: str
    num_samples: int
    random: bool
    preprocessing: Preprocessing
    warning: str | None = None


@dataclasses.dataclass
class PassApplied(Record):
    """A pass that changed the model: rewrite counts summed over sweeps, time, and the measured change."""

    name: str = dataclasses.field(metadata={"key": "pass"})
    counts: dict[str, int]
    seconds: float
    exact: bool
    max_abs_change: float | None
    details: dict[str, Any]


@dataclasses.dataclass
class PartitionRecord(Record):
    """Where the model runs. MACs are the source model's (the user's count: the imported model after
    canonicalization, ``qanac.model_summary.macs_by_node``), whatever legalization added to them."""

    segments: int
    device_segments: int
    transfers: int  # host <-> device hand-overs per run
    total_macs: int  # the source model's
    device_macs: int  # of those, on the device's hardware (not in a backend's software fallback)
    device_mac_share: float  # device_macs / total_macs
    device_segment_macs: int | None = None  # of total_macs, in device segments (hardware or software)
    legalized_macs: int | None = None  # MACs of the model as compiled, after legalization
    mac_growth: dict[str, int] = dataclasses.field(default_factory=dict)  # pass -> MACs it added


@dataclasses.dataclass
class SegmentRecord(Record):
    """One segment in run order: a device segment runs through its target's backend, a host segment is
    float ONNX run by ONNX Runtime. Tensors pass between segments by name."""

    name: str
    kind: Literal["device", "host"]
    dir: str  # relative to the bundle; "." when the bundle is one segment
    target: str  # the bundle's target for a device segment, "host" for a host segment
    inputs: list[str]
    outputs: list[str]
    macs: int
    nodes: int
    files: dict[str, str]  # role -> path relative to ``dir``
    device: str | None = None  # the device a device segment was compiled for
    variants: list[str] = dataclasses.field(default_factory=list)  # models the backend runs besides ``compiled``
    backend: dict[str, Any] = dataclasses.field(default_factory=dict)  # the backend's own fields
    source_macs: int | None = None  # the source model's MACs this segment computes (``macs``: as compiled)
    hardware_macs: int | None = None  # of ``source_macs``, on the device's hardware (device segments)

    def file(self, role: str) -> str:
        """The path (relative to ``dir``) of the file with ``role``; a missing role is a ManifestError."""

        if role not in self.files:
            raise ManifestError(f"segments[{self.name}].files.{role}", "is missing")
        return self.files[role]

    def backend_record(self, record_type: type[R]) -> R:
        """``backend`` read as the backend's own record type, validated like every other record."""

        return record_type.from_dict(self.backend, f"segments[{self.name}].backend")


@dataclasses.dataclass
class Manifest(Record):
    format_version: int
    target: str
    device: str | None  # the device the (first) device segment was compiled for
    source: SourceRecord
    inputs: list[InputRecord]
    outputs: list[OutputRecord]
    post_processing: list[PostProcessingStep]
    labels: list[str] | None
    calibration: CalibrationRecord
    pipeline: str
    passes_applied: list[PassApplied]
    approximations: list[str]
    tool_versions: dict[str, str]
    segments: list[SegmentRecord]
    partition: PartitionRecord
    files: dict[str, FileEntry]  # role -> file; every file the bundle runs is listed with its checksum

    @classmethod
    def from_dict(cls, data: Any, field: str = "") -> "Manifest":
        """Read a manifest of any readable format; every schema violation is a ManifestError."""

        if not isinstance(data, dict):
            raise ManifestError(field, f"must be a JSON object, not {_json_type(data)}")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ManifestError("format_version", "is missing or not an integer")
        if version not in READABLE_VERSIONS:
            newer = version > FORMAT_VERSION
            raise UsageError(
                f"the bundle has format {version}; this qanac reads formats "
                f"{', '.join(map(str, READABLE_VERSIONS))}",
                hint="update qanac" if newer else "compile the model again with this qanac",
            )
        if version == 1:
            data = _upgrade_from_v1(data)
        if version in (1, 2):
            data = _upgrade_from_v2(data)
        manifest = _decode(data, cls, field)
        manifest.check()
        return manifest

    def check(self) -> None:
        """The rules that span fields: relative paths, a segment's files checksummed, every segment input
        available when it runs, every output produced, post-processing of known outputs and axes."""

        checksummed = {relative_path(e.path, f"files.{role}.path").as_posix() for role, e in self.files.items()}
        if REFERENCE_ROLE not in self.files:
            raise ManifestError(f"files.{REFERENCE_ROLE}", "is missing")
        if not self.inputs:
            raise ManifestError("inputs", "lists no input")
        if not self.segments:
            raise ManifestError("segments", "lists no segment")
        names = [s.name for s in self.segments]
        for index, segment in enumerate(self.segments):
            where = f"segments[{index}]"
            if names.count(segment.name) > 1:
                raise ManifestError(f"{where}.name", f"repeats segment name '{segment.name}'")
            folder = relative_path(segment.dir, f"{where}.dir", directory=True)
            if segment.kind == HOST and segment.target != HOST:
                raise ManifestError(f"{where}.target", f"of a host segment must be '{HOST}'")
            if segment.kind == DEVICE and segment.target != self.target:
                raise ManifestError(f"{where}.target", f"is '{segment.target}', not the bundle's '{self.target}'")
            role = HOST_MODEL if segment.kind == HOST else COMPILED
            if role not in segment.files:
                raise ManifestError(f"{where}.files.{role}", "is missing")
            for role, name in segment.files.items():
                path = (folder / relative_path(name, f"{where}.files.{role}")).as_posix()
                if path not in checksummed:
                    raise ManifestError(f"{where}.files.{role}", f"names {path}, which 'files' does not checksum")
        available = set(self.input_names)
        for index, segment in enumerate(self.segments):
            for name in segment.inputs:
                if name not in available:
                    raise ManifestError(f"segments[{index}].inputs",
                                        f"names '{name}', neither a model input nor an earlier segment's output")
            available.update(segment.outputs)
        for index, name in enumerate(self.output_names):
            if name not in available:
                raise ManifestError(f"outputs[{index}].name", f"is '{name}', which no segment produces")
        for index, step in enumerate(self.post_processing):
            if step.output not in self.output_names:
                raise ManifestError(f"post_processing[{index}].output", f"names '{step.output}', not an output")
            rank = len(self.outputs[self.output_names.index(step.output)].shape)
            if not -rank <= step.axis < rank:
                raise ManifestError(f"post_processing[{index}].axis",
                                    f"is {step.axis}, outside the output's {rank} axes")

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]


def relative_path(value: str, field: str, directory: bool = False) -> PurePosixPath:
    """``value`` as a path inside the bundle: relative, without ``..``; ``.`` only for a ``directory``."""

    path = PurePosixPath(value)
    if not value or "\\" in value or "\x00" in value:
        raise ManifestError(field, f"is not a bundle path: {value!r}")
    if path.is_absolute():
        raise ManifestError(field, f"is an absolute path ({value}); bundle paths are relative to the bundle")
    if ".." in path.parts:
        raise ManifestError(field, f"leaves the bundle directory ({value})")
    if not path.parts and not directory:
        raise ManifestError(field, f"names the bundle directory itself ({value}), not a file")
    return path


def _upgrade_from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 merged a device segment's backend fields into the segment (most of them under the target's
    name) and the first device segment's into the top level; format 2 keeps them in ``backend``."""

    core = {f.name for f in dataclasses.fields(SegmentRecord)} - {"device", "backend"}
    data = dict(data, format_version=FORMAT_VERSION)
    segments = data.get("segments")
    if not isinstance(segments, list):
        return data
    first_extras: dict[str, Any] | None = None
    upgraded = []
    for segment in segments:
        if not isinstance(segment, dict) or segment.get("kind") != DEVICE:
            upgraded.append(segment)
            continue
        extras = {k: v for k, v in segment.items() if k not in core}
        if first_extras is None:
            first_extras = dict(extras)
        device = extras.pop("device", None)
        own = extras.pop(str(segment.get("target")), {})
        backend = {**extras, **own} if isinstance(own, dict) else {**extras, str(segment.get("target")): own}
        upgraded.append({**{k: v for k, v in segment.items() if k in core}, "device": device, "backend": backend})
    data["segments"] = upgraded
    for key, value in (first_extras or {}).items():
        if key != "device" and data.get(key) == value:
            del data[key]
    return data


def _upgrade_from_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Format 2 counted MACs on the legalized model and its ``device_macs`` were the device segments' MACs,
    hardware or software; format 3 names those ``device_segment_macs`` and makes ``device_macs`` the MACs
    on the hardware, as ``device_mac_share`` of ``total_macs``."""

    data = dict(data, format_version=FORMAT_VERSION)
    partition = data.get("partition")
    if isinstance(partition, dict):
        total, device, share = (partition.get(k) for k in ("total_macs", "device_macs", "device_mac_share"))
        partition = dict(partition, legalized_macs=total, device_segment_macs=device)
        if isinstance(total, int) and isinstance(share, (int, float)) and not isinstance(share, bool):
            partition["device_macs"] = round(total * share)
        data["partition"] = partition
    return data


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {_key(f): _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _join(field: str, key: Any) -> str:
    return f"{field}.{key}" if field else str(key)


def _decode(value: Any, hint: Any, field: str) -> Any:
    """``value`` (parsed JSON) as ``hint``: a Record or other dataclass, list, tuple, dict, Literal, union, or
    scalar. Floats may be written as "inf", "-inf" or "nan" (JSON has no literal for them)."""

    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _decode(value, arg, field)
            except ManifestError:
                continue
        raise ManifestError(field, f"must be {' or '.join(_describe(a) for a in args)}, not {_json_type(value)}")
    if origin is Literal:
        if value not in args:
            raise ManifestError(field, f"is {value!r}; allowed: {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        return _decode_dataclass(value, hint, field)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ManifestError(field, f"must be an array, not {_json_type(value)}")
        items = [_decode(v, args[0], f"{field}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(field, f"must be an object, not {_json_type(value)}")
        return {k: _decode(v, args[1], _join(field, k)) for k, v in value.items()}
    return _decode_scalar(value, hint, field)


def _decode_scalar(value: Any, hint: type, field: str) -> Any:
    if hint is float and isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise ManifestError(field, f"must be {_describe(hint)}, not {_json_type(value)}")


def _decode_dataclass(value: Any, cls: type, field: str) -> Any:
    if not isinstance(value, dict):
        raise ManifestError(field, f"must be an object, not {_json_type(value)}")
    fields = {_key(f): f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ManifestError(_join(field, unknown[0]), "is not a field of this format")
    hints = _hints(cls)
    kwargs = {}
    for key, f in fields.items():
        if key in value:
            kwargs[f.name] = _decode(value[key], hints[f.name], _join(field, key))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ManifestError(_join(field, key), "is missing")
    return cls(**kwargs)


def _describe(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint) or typing.get_origin(hint) is dict:
        return "an object"
    if typing.get_origin(hint) in (list, tuple):
        return "an array"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))

