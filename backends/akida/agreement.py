"""Akida model vs quantizeml's quantized ONNX: they must agree, and where they do not, Akida is right.

Both are integer pipelines with the same scales, and for every layer type but one they agree bit for bit.
The exception: a Conv with a fused GlobalAveragePool over a large map. Akida saturates the 32-bit post-op
product before the shift, so with large sums the outputs are clipped and top-1 agreement can collapse,
while the quantized ONNX (which does not saturate) still tracks the float model. Verifying only against
the quantized ONNX would pass a broken deployment, so ``compare_akida_to_quantized`` runs both on the
same inputs and flags any disagreement, and ``fused_gap_layers`` names the suspects.

Thresholds are explicit (``qanac.compare.Thresholds``): the two should be identical, so the defaults are
strict: top-1 agreement >= 0.99 and SQNR >= 30 dB, with the quantized ONNX as the reference signal.

Diagnostic code: AKV301 (warning) the Akida model disagrees with the quantized ONNX. A warning, not an
error: the bundle is still the model that would be deployed, and ``qanac verify`` against the float
reference decides whether it is good enough; the warning says why it may not be.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx

from qanac.compare import OutputComparison, Thresholds, compare_outputs, failures
from qanac.diagnostics import Diagnostic, Level

from .runners import AkidaSoftwareRunner, QuantizedOnnxRunner

STRICT = Thresholds(min_top1_agreement=0.99, min_sqnr_db=30.0)


@dataclasses.dataclass
class Agreement:
    """The comparison of Akida (actual) against the quantized ONNX (reference) on ``samples`` inputs."""

    samples: int
    comparison: OutputComparison
    exact_share: float  # share of output values that are identical
    thresholds: Thresholds
    problems: list[str]
    suspects: list[dict[str, Any]]

    @property
    def flagged(self) -> bool:
        return bool(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "flagged": self.flagged,
            "exact_share": self.exact_share,
            "comparison": self.comparison.to_dict(),
            "thresholds": self.thresholds.to_dict(),
            "problems": self.problems,
            "suspects": self.suspects,
        }

    def diagnostics(self) -> list[Diagnostic]:
        if not self.flagged:
            return []
        names = [s["layer"] for s in self.suspects]
        hint = (
            "the suspects are Convs with a fused GlobalAveragePool over a large map: Akida saturates the "
            "post-op product there; pool in stages (a stride-2 Conv or MaxPool first) so the GAP covers "
            "<= 144 pixels"
            if names
            else "report it with the bundle: the Akida model and the quantized ONNX should be bit-exact"
        )
        return [
            Diagnostic(
                Level.WARNING,
                "AKV301",
                "the Akida model disagrees with quantizeml's quantized ONNX: " + "; ".join(self.problems),
                nodes=names,
                rule="akida-matches-quantized",
                hint=hint,
            )
        ]


def compare_akida_to_quantized(
    akida_runner: AkidaSoftwareRunner,
    quantized: onnx.ModelProto | QuantizedOnnxRunner,
    inputs: dict[str, np.ndarray],
    thresholds: Thresholds = STRICT,
) -> Agreement:
    """Run both models on ``inputs`` and compare Akida (actual) to the quantized ONNX (reference)."""

    quantized_runner = quantized if isinstance(quantized, QuantizedOnnxRunner) else QuantizedOnnxRunner(quantized)
    reference = quantized_runner.run(inputs)[0]
    actual = akida_runner.run(inputs)[0]
    name = akida_runner.output_names[0]
    comparison = compare_outputs([name], [reference], [actual])[0]
    exact = float(np.mean(reference.reshape(actual.shape) == actual)) if actual.size else 1.0
    return Agreement(
        samples=len(actual),
        comparison=comparison,
        exact_share=exact,
        thresholds=thresholds,
        problems=failures([comparison], thresholds),
        suspects=fused_gap_layers(akida_runner.model),
    )


def fused_gap_layers(model: Any, min_pixels: int = 1) -> list[dict[str, Any]]:
    """Layers of an Akida model that fuse a global average pooling, largest input map first.

    A layer pools globally when its pool type is Average and its output map is 1x1 (akida returns
    ``parameters.pool_type`` as a plain int, hence the int comparison).
    """

    import akida

    found = []
    for layer in model.layers:
        parameters = layer.parameters
        try:
            pool_type = parameters.pool_type
        except (AttributeError, ValueError):
            continue
        height, width = int(layer.input_dims[0]), int(layer.input_dims[1])
        if int(pool_type) == int(akida.PoolType.Average) and list(layer.output_dims[:2]) == [1, 1]:
            if height * width >= min_pixels:
                found.append({"layer": layer.name, "input_map": [height, width], "pixels": height * width})
    return sorted(found, key=lambda entry: -entry["pixels"])
