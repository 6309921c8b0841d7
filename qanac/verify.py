"""Running a bundle and checking it against its float reference.

``run_bundle`` executes the compiled model of a bundle with the post-processing the manifest records, so
its outputs mean what the original model's outputs meant. ``verify_bundle`` runs the float reference and
the compiled model (and any other model the backend offers, such as Akida's quantized ONNX) on the same
data and compares them with explicit thresholds (qanac.compare), each output by the metrics of its kind
(classification, dense, value).

Agreement is evidence only when the float model's predictions are: ``prediction_warnings`` says when they
are not, without changing the verdict (exit codes stay those of the thresholds):
    one class   the float model gives one class to at least ``DOMINANT_SHARE`` of the inputs (with at
                least ``MIN_SPREAD_SAMPLES`` inputs), so a model answering that class always would agree as
                often
    near ties   more of the inputs than the agreement threshold lets flip are near ties for the float model
                (qanac.compare: top-2 margin within twice the compiled model's RMS error), so whether they
                agree is chance
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qanac.bundle import Bundle
from qanac.bundle_runner import BundleRunner, available_variants
from qanac.calibration import CalibrationData, InputSpec, Preprocessing, load_data
from qanac.compare import (
    CLASSIFICATION,
    KINDS,
    OutputComparison,
    Thresholds,
    compare_outputs,
    failures,
    passing_thresholds,
)
from qanac.diagnostics import UsageError
from qanac.execution import apply_post_processing, bundle_session, run_session
from qanac.manifest import REFERENCE_ROLE

Progress = Callable[[int], None]
DOMINANT_SHARE = 0.9
MIN_SPREAD_SAMPLES = 10


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
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def passing(self) -> dict[str, float | None]:
        """The strictest thresholds the compiled model meets (``qanac.compare.passing_thresholds``)."""

        return passing_thresholds(self.comparisons["compiled"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "thresholds": self.thresholds.to_dict(),
            "passing_thresholds": self.passing,
            "comparisons": {k: [c.to_dict() for c in v] for k, v in self.comparisons.items()},
            "failures": self.failures,
            "warnings": self.warnings,
            "label_accuracy": self.label_accuracy,
        }

    def format(self) -> str:
        lines = [f"{self.samples} samples; thresholds: top-1 agreement >= {self.thresholds.min_top1_agreement} "
                 f"(classification outputs), SQNR >= {self.thresholds.min_sqnr_db} dB"]
        for model_name, results in self.comparisons.items():
            for r in results:
                lines.append(f"  float vs {model_name:<10} output {r.name} {r.describe()}")
        if self.label_accuracy:
            lines.append("  accuracy on labels: " + ", ".join(f"{k} {v:.4f}" for k, v in self.label_accuracy.items()))
        passing = self.passing
        would = [f"--min-agreement {passing['min_top1_agreement']:.4f}"] if passing["min_top1_agreement"] is not None \
            else []
        if passing["min_sqnr_db"] is not None:
            would.append(f"--min-sqnr {passing['min_sqnr_db']:.2f}")
        if would:
            lines.append("  the strictest thresholds that pass: " + " ".join(would))
        lines += [f"WARNING: {w}" for w in self.warnings]
        lines.append("PASSED" if self.passed else "FAILED:\n  " + "\n  ".join(self.failures))
        return "\n".join(lines)


def prediction_warnings(
    reference: list[np.ndarray],
    compared: list[OutputComparison],
    thresholds: Thresholds,
    labels: list[str] | None = None,
) -> list[str]:
    """Why agreement on the classification outputs of ``compared`` (float vs compiled) is no evidence, if it
    is not: the float model predicts one class (nearly) always, or too many inputs are near ties."""

    found = []
    for values, result in zip(reference, compared, strict=True):
        if result.kind != CLASSIFICATION or result.class_axis is None:
            continue
        predicted = np.argmax(values, axis=result.class_axis).ravel()
        counts = np.bincount(predicted)
        top = int(np.argmax(counts))
        share = counts[top] / len(predicted)
        if len(predicted) >= MIN_SPREAD_SAMPLES and share >= DOMINANT_SHARE:
            name = f" ('{labels[top]}')" if labels and top < len(labels) else ""
            found.append(
                f"output '{result.name}': the float model predicts class {top}{name} for {counts[top]} of "
                f"{len(predicted)} inputs; a model answering {top} always would agree on {share:.1%}, so top-1 "
                "agreement is no evidence: verify on data whose float predictions vary (or check the float model)"
            )
        allowed = 1.0 - thresholds.min_top1_agreement
        if result.near_tie_share is not None and result.near_tie_share > allowed:
            decisive = "none" if result.decisive_agreement is None else f"{result.decisive_agreement:.4f}"
            found.append(
                f"output '{result.name}': {result.near_tie_share:.1%} of the inputs are near ties for the float "
                f"model (top-2 margin within twice the compiled model's RMS error), more than the {allowed:.1%} "
                f"the agreement threshold lets flip: their agreement is chance; agreement on the others: {decisive}"
            )
    return found


def parse_output_kinds(values: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``NAME=KIND`` settings (``--output-kind``) as a dict; KIND is one of qanac.compare.KINDS."""

    kinds = {}
    for value in values:
        name, sep, kind = value.rpartition("=")
        if not sep or not name or kind not in KINDS:
            raise UsageError(f"cannot parse --output-kind '{value}'",
                             hint="use NAME=KIND with KIND one of " + ", ".join(KINDS))
        kinds[name] = kind
    return kinds


def verify_bundle(
    bundle: Bundle,
    data: CalibrationData,
    thresholds: Thresholds,
    options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    kinds: dict[str, str] | None = None,
) -> VerifyResult:
    """Compare every model of the bundle with the float reference; only ``compiled`` decides pass/fail,
    the others (e.g. ``quantized``) are there to tell quantization error from device error. ``kinds`` overrides
    the kind of comparison of outputs by name (qanac.compare)."""

    names = bundle.output_names
    unknown = sorted(set(kinds or {}) - set(names))
    if unknown:
        raise UsageError(f"--output-kind names '{unknown[0]}', which is not an output of the bundle",
                         hint="outputs: " + ", ".join(names))
    reference = run_reference(bundle, data, progress)
    comparisons: dict[str, list[OutputComparison]] = {}
    outputs_by_model: dict[str, list[np.ndarray]] = {"float": reference}
    for model_name, runner in compiled_runners(bundle, options or {}).items():
        outputs = post_process(bundle, runner.run(data.arrays, progress=progress))
        try:
            comparisons[model_name] = compare_outputs(names, reference, outputs, kinds)
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
    warnings = prediction_warnings(reference, comparisons["compiled"], thresholds, bundle.labels)
    return VerifyResult(data.num_samples, thresholds, comparisons, problems, accuracy, warnings)
