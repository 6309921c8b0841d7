"""Running a bundle and checking it against its float reference.

``run_bundle`` executes the compiled model of a bundle with the post-processing the manifest records, so
its outputs mean what the original model's outputs meant. ``verify_bundle`` runs the float reference and
the compiled model (and any other model the backend offers, such as Akida's quantized ONNX) on the same
data and compares them with explicit thresholds (qanac.compare).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qanac.bundle import Bundle
from qanac.bundle_runner import BundleRunner, available_variants
from qanac.calibration import CalibrationData, InputSpec, Preprocessing, load_data
from qanac.compare import OutputComparison, Thresholds, compare_outputs, failures
from qanac.diagnostics import UsageError
from qanac.execution import apply_post_processing, bundle_session, run_session
from qanac.manifest import REFERENCE_ROLE

Progress = Callable[[int], None]


def bundle_inputs(bundle: Bundle) -> list[InputSpec]:
    return [
        InputSpec(i.name, tuple(d if isinstance(d, int) and d > 0 else 1 for d in i.shape), i.dtype)
        for i in bundle.manifest.inputs
    ]


def bundle_preprocessing(bundle: Bundle) -> Preprocessing:
    return bundle.manifest.inputs[0].preprocessing


def load_bundle_data(bundle: Bundle, source: str | Path) -> CalibrationData:
    return load_data(source, bundle_inputs(bundle), bundle_preprocessing(bundle))


def compiled_runners(bundle: Bundle, options: dict[str, Any]) -> dict[str, BundleRunner]:
    """The whole bundle as ``compiled`` (the deployable models), plus each extra variant (``quantized``)."""

    return {variant: BundleRunner(bundle, options, variant) for variant in available_variants(bundle.manifest)}


def run_bundle(
    bundle: Bundle, data: CalibrationData, options: dict[str, Any] | None = None, progress: Progress | None = None
) -> list[np.ndarray]:
    outputs = BundleRunner(bundle, options or {}).run(data.arrays, progress=progress)
    return post_process(bundle, outputs)


def run_reference(bundle: Bundle, data: CalibrationData, progress: Progress | None = None) -> list[np.ndarray]:
    session = bundle_session(bundle.file(REFERENCE_ROLE))
    return post_process(bundle, run_session(session, data.arrays, progress=progress))


def post_process(bundle: Bundle, outputs: list[np.ndarray]) -> list[np.ndarray]:
    """The host-side steps the manifest records, applied to the outputs of any of the bundle's models."""

    steps = [step.to_dict() for step in bundle.manifest.post_processing]
    return apply_post_processing(outputs, bundle.output_names, steps)


@dataclasses.dataclass
class VerifyResult:
    samples: int
    thresholds: Thresholds
    comparisons: dict[str, list[OutputComparison]]
    failures: list[str]
    label_accuracy: dict[str, float] | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "thresholds": self.thresholds.to_dict(),
            "comparisons": {k: [c.to_dict() for c in v] for k, v in self.comparisons.items()},
            "failures": self.failures,
            "label_accuracy": self.label_accuracy,
        }

    def format(self) -> str:
        lines = [f"{self.samples} samples; thresholds: top-1 agreement >= {self.thresholds.min_top1_agreement}, "
                 f"SQNR >= {self.thresholds.min_sqnr_db} dB"]
        for model_name, results in self.comparisons.items():
            for r in results:
                agreement = "n/a" if r.top1_agreement is None else f"{r.top1_agreement:.4f}"
                lines.append(
                    f"  float vs {model_name:<10} output {r.name}: top-1 agreement {agreement}, "
                    f"max abs err {r.max_abs_error:.4g}, mean abs err {r.mean_abs_error:.4g}, SQNR {r.sqnr_db:.2f} dB"
                )
        if self.label_accuracy:
            lines.append("  accuracy on labels: " + ", ".join(f"{k} {v:.4f}" for k, v in self.label_accuracy.items()))
        lines.append("PASSED" if self.passed else "FAILED:\n  " + "\n  ".join(self.failures))
        return "\n".join(lines)


def verify_bundle(
    bundle: Bundle,
    data: CalibrationData,
    thresholds: Thresholds,
    options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> VerifyResult:
    """Compare every model of the bundle with the float reference; only ``compiled`` decides pass/fail,
    the others (e.g. ``quantized``) are there to tell quantization error from device error."""

    names = bundle.output_names
    reference = run_reference(bundle, data, progress)
    comparisons: dict[str, list[OutputComparison]] = {}
    outputs_by_model: dict[str, list[np.ndarray]] = {"float": reference}
    for model_name, runner in compiled_runners(bundle, options or {}).items():
        outputs = post_process(bundle, runner.run(data.arrays, progress=progress))
        try:
            comparisons[model_name] = compare_outputs(names, reference, outputs)
        except ValueError as exc:
            raise UsageError(f"{model_name} model of the bundle: {exc}",
                             hint="the bundle is damaged or was not written by qanac; compile the model again") from exc
        outputs_by_model[model_name] = outputs
    problems = failures(comparisons["compiled"], thresholds)
    accuracy = None
    if data.labels is not None and len(data.labels) == data.num_samples and (data.labels >= 0).all():
        accuracy = {
            name: float(np.mean(np.argmax(out[0].reshape(len(out[0]), -1), axis=1) == data.labels))
            for name, out in outputs_by_model.items()
        }
    return VerifyResult(data.num_samples, thresholds, comparisons, problems, accuracy)
