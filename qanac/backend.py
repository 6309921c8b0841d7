"""The backend interface: what a target's code generator gives the bundle writer and the runner.

A backend turns a legalized float ModelProto plus calibration data into files inside a bundle
(``emit``) and later executes those files (``load_runner``). Backends are looked up by target name
(``qanac.targets``) and imported lazily, so `qanac --help` never pays for TensorFlow or akida.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from qanac.calibration import CalibrationData
from qanac.diagnostics import Diagnostic


@dataclasses.dataclass
class EmitResult:
    """What a backend wrote into the staging directory of a bundle.

    ``files`` maps a role (``compiled``, ``quantized``, ...) to a file name relative to the bundle;
    ``report`` goes into report.json under the backend's name; ``manifest`` entries are merged into
    manifest.json (``device`` and the like); ``summary`` is the human text `qanac compile` prints
    (for Akida, the mapping report).
    """

    files: dict[str, str]
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)
    diagnostics: list[Diagnostic] = dataclasses.field(default_factory=list)
    summary: str = ""


class Runner(Protocol):
    """Executes a compiled model: inputs by name (float32 NCHW, already preprocessed), outputs in order."""

    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend(Protocol):
    """``emit`` writes one device segment's files into ``out_dir``; ``load_runner`` gets that folder and the
    segment's manifest entry (``files`` by role, plus what ``EmitResult.manifest`` held). ``variants``
    names extra models ``extra_runners`` can run besides the compiled one (Akida: ``quantized``)."""

    name: str
    variants: tuple[str, ...]

    def emit(
        self,
        model: onnx.ModelProto,
        calibration: CalibrationData,
        options: dict[str, Any],
        out_dir: Path,
    ) -> EmitResult: ...

    def load_runner(self, segment_dir: Path, segment: dict[str, Any], options: dict[str, Any]) -> Runner: ...
