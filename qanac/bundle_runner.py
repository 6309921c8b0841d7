"""Executing a bundle: its segments in order, tensors handed over by name.

Every bundle lists its segments in the manifest (one segment when the whole model runs on the target).
A device segment runs through its target's backend (``Backend.load_runner``); a host segment is float
ONNX run by ONNX Runtime. ``variant`` picks which model of each device segment runs: ``compiled`` (the
deployable one, e.g. the Akida .fbz) or one of the backend's ``variants`` (``quantized``: quantizeml's
simulation, through ``Backend.load_variant``), so verification can compare float, quantized and compiled
end to end.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from qanac.backend import Backend, Runner
from qanac.bundle import Bundle
from qanac.diagnostics import UsageError
from qanac.execution import OnnxRuntimeRunner
from qanac.manifest import COMPILED, HOST, HOST_MODEL, Manifest, SegmentRecord
from qanac.targets import get_target


def available_variants(manifest: Manifest) -> list[str]:
    """``compiled``, plus every other model that all device segments offer (e.g. ``quantized``)."""

    offered: set[str] | None = None
    for segment in manifest.segments:
        if segment.kind == HOST:
            continue
        names = set(segment.variants)
        offered = names if offered is None else offered & names
    return [COMPILED, *sorted(offered or ())]


class BundleRunner:
    """The segments of ``bundle`` with a runner each, for one ``variant``."""

    def __init__(self, bundle: Bundle, options: dict[str, Any], variant: str = COMPILED):
        self.output_names = bundle.output_names
        self.steps: list[tuple[SegmentRecord, Runner]] = []
        backends: dict[str, Backend] = {}
        for segment in bundle.manifest.segments:
            folder = bundle.segment_dir(segment)
            if segment.kind == HOST:
                runner: Runner = OnnxRuntimeRunner(folder / segment.file(HOST_MODEL))
            else:
                backend = backends.get(segment.target) or get_target(segment.target).load_backend()
                backends[segment.target] = backend
                if variant == COMPILED:
                    runner = backend.load_runner(folder, segment, options)
                elif variant in segment.variants and variant in backend.variants:
                    runner = backend.load_variant(variant, folder, segment, options)
                else:
                    raise UsageError(f"segment {segment.name} has no '{variant}' model")
            self.steps.append((segment, runner))

    def run(self, inputs: dict[str, np.ndarray], progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
        tensors = dict(inputs)
        for segment, runner in self.steps:
            missing = [n for n in segment.inputs if n not in tensors]
            if missing:
                raise UsageError(f"no data for input(s) {missing} of segment {segment.name}")
            outputs = runner.run({n: tensors[n] for n in segment.inputs})
            tensors.update(zip(segment.outputs, outputs, strict=False))
        if progress is not None:
            progress(len(next(iter(inputs.values()))))
        return [tensors[name] for name in self.output_names]
