"""The backend interface: what a target's code generator gives the bundle writer and the runner.

A backend turns a legalized float ModelProto plus calibration data into the files of one device segment
(``emit``) and later executes them (``load_runner``, and ``load_variant`` for the other models it wrote,
such as Akida's quantized ONNX). This protocol is everything the core calls on a backend. Backends are
looked up by target name (``qanac.targets``) and imported lazily, so `qanac --help` never pays for
TensorFlow or akida.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from qanac.calibration import CalibrationData
from qanac.diagnostics import Diagnostic
from qanac.manifest import SegmentRecord


@dataclasses.dataclass
class EmitResult:
    """What a backend wrote into one device segment's folder of a bundle.

    ``files`` maps a role (``compiled``, the deployable model, which every backend writes; others such as
    ``quantized`` name the models of ``Backend.variants``) to a file name in that folder. ``device`` is the
    device the segment was compiled for. ``record`` holds the backend's own fields of the segment's manifest
    record (``SegmentRecord.backend``): only this backend reads them back. ``hardware_mac_share`` is the
    share of the segment's MACs on the device's hardware (the rest in the backend's software fallback).
    ``report`` goes into report.json; ``summary`` is the human text `qanac compile` prints (for Akida, the
    mapping report).
    """

    files: dict[str, str]
    device: str | None = None
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    hardware_mac_share: float = 1.0
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    diagnostics: list[Diagnostic] = dataclasses.field(default_factory=list)
    summary: str = ""


class Runner(Protocol):
    """Executes a compiled model: inputs by name (float32 NCHW, already preprocessed), outputs in order."""

    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend(Protocol):
    """``emit`` writes one device segment's files into ``out_dir``. ``load_runner`` runs the ``compiled``
    model of a segment read back from a bundle: it gets the segment's folder and its record (``files`` by
    role, ``backend`` as the ``EmitResult.record`` it wrote). ``variants`` names the other models the backend
    writes; ``load_variant`` runs one of them (Akida: ``quantized``) and is called only with a name from
    ``variants``."""

    name: str
    variants: tuple[str, ...]

    def emit(
        self,
        model: onnx.ModelProto,
        calibration: CalibrationData,
        options: dict[str, Any],
        out_dir: Path,
    ) -> EmitResult: ...

    def load_runner(self, segment_dir: Path, segment: SegmentRecord, options: dict[str, Any]) -> Runner: ...

    def load_variant(
        self, variant: str, segment_dir: Path, segment: SegmentRecord, options: dict[str, Any]
    ) -> Runner: ...
