"""Executing a bundle: its segments in order, tensors handed over by name.

Every bundle lists its segments in the manifest (one segment when the whole model runs on the target).
A device segment runs through its target's backend runner; a host segment is float ONNX run by ONNX
Runtime. ``variant`` picks which model of each device segment runs: ``compiled`` (the deployable one,
e.g. the Akida .fbz) or a backend's extra model (``quantized``: quantizeml's simulation), so verification
can compare float, quantized and compiled end to end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from qanac.execution import OnnxRuntimeRunner
from qanac.diagnostics import UsageError
from qanac.targets import get_target

HOST = "host"


def segment_dir(bundle_path: Path, segment: dict[str, Any]) -> Path:
    return bundle_path / segment.get("dir", ".")


def available_variants(manifest: dict[str, Any]) -> list[str]:
    """``compiled``, plus every extra model that all device segments offer (e.g. ``quantized``)."""

    offered: set[str] | None = None
    for segment in manifest["segments"]:
        if segment["kind"] == HOST:
            continue
        names = set(segment.get("variants", []))
        offered = names if offered is None else offered & names
    return ["compiled", *sorted(offered or ())]


class BundleRunner:
    def __init__(self, bundle_path: Path, manifest: dict[str, Any], options: dict[str, Any], variant: str = "compiled"):
        self.output_names = [o["name"] for o in manifest["outputs"]]
        self.steps: list[tuple[dict[str, Any], Any]] = []
        for segment in manifest["segments"]:
            folder = segment_dir(bundle_path, segment)
            if segment["kind"] == HOST:
                runner = OnnxRuntimeRunner(folder / segment["files"]["model"])
            else:
                backend = get_target(segment["target"]).load_backend()
                if variant == "compiled":
                    runner = backend.load_runner(folder, segment, options)
                else:
                    extra = backend.extra_runners(folder, segment, options)
                    if variant not in extra:
                        raise UsageError(f"segment {segment['name']} has no '{variant}' model")
                    runner = extra[variant]
            self.steps.append((segment, runner))

    def run(self, inputs: dict[str, np.ndarray], progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
        tensors = dict(inputs)
        for segment, runner in self.steps:
            missing = [name for name in segment["inputs"] if name not in tensors]
            if missing:
                raise UsageError(f"no data for input(s) {missing} of segment {segment['name']}")
            outputs = runner.run({name: tensors[name] for name in segment["inputs"]})
            tensors.update(zip(segment["outputs"], outputs))
        if progress is not None:
            progress(len(next(iter(inputs.values()))))
        return [tensors[name] for name in self.output_names]
