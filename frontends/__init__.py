"""Frontends (import name ``qanac.frontends``): turn what the user has into an ONNX ModelProto.

``import_model`` dispatches on the source: an ``.onnx`` file goes to the ONNX frontend; framework models
are added by the framework frontends. Every frontend returns fixed input shapes (batch may stay dynamic)
and, where it knows them, the source framework's names for the ONNX nodes.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import onnx

from qanac.diagnostics import UsageError
from qanac.frontends import onnx_file


@dataclasses.dataclass
class ImportedModel:
    model: onnx.ModelProto
    framework: str  # "onnx", "torch", "keras"
    source: str
    seconds: float


def parse_input_shapes(text: str | None) -> dict[str, tuple[int, ...]] | tuple[int, ...] | None:
    """``1,3,64,64`` (the single input) or ``x:1,3,64,64;y:1,10`` (by name)."""

    if not text:
        return None
    try:
        if ":" not in text:
            return tuple(int(v) for v in text.split(","))
        shapes = {}
        for part in text.split(";"):
            name, _, dims = part.rpartition(":")
            shapes[name.strip()] = tuple(int(v) for v in dims.split(","))
        return shapes
    except ValueError:
        raise UsageError(f"cannot parse --input-shape '{text}'", hint="use 1,3,64,64 or name:1,3,64,64") from None


def import_model(source: str, input_shape: str | None = None) -> ImportedModel:
    started = time.perf_counter()
    shapes = parse_input_shapes(input_shape)
    path = Path(source)
    if path.suffix == ".onnx" or (path.exists() and path.is_file() and path.suffix not in {".pt", ".pt2", ".h5", ".keras"}):
        model = onnx_file.load(path, shapes)
        return ImportedModel(model, "onnx", source, time.perf_counter() - started)
    raise UsageError(
        f"cannot tell what kind of model '{source}' is",
        hint="give an .onnx file",
    )
