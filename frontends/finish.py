"""What every framework frontend does once its exporter has produced ONNX: attach the framework's names
for the nodes, and prove the export right by running it.

The check runs the ONNX model in ONNX Runtime on the same sample the framework ran and requires, per
output, max abs error <= 1e-4 * (1 + max |framework output|) (``qanac.compare.exact_tolerance``, the
rule for exact rewrites): an exporter only re-expresses the model, so it must be exact up to float
rounding. A failing check is a UsageError naming the output, the error and the tolerance, because the
usual cause is the model (training-mode layers, data-dependent control flow), not qanac.
"""

from __future__ import annotations

import json

import numpy as np
import onnx

from qanac.compare import compare_outputs, exact_tolerance
from qanac.diagnostics import UsageError
from qanac.execution import run_onnx
from qanac.graph import SOURCE_NAMES_KEY, output_names


def set_source_names(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Record ``{onnx node name: framework name}`` where ``CompilationModel.from_onnx`` reads it."""

    kept = [p for p in model.metadata_props if p.key != SOURCE_NAMES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    names = {node: source for node, source in names.items() if source}
    if names:
        onnx.helper.set_model_props(
            model, {**{p.key: p.value for p in kept}, SOURCE_NAMES_KEY: json.dumps(names, sort_keys=True)}
        )


def check_export(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    expected: list[np.ndarray],
    framework: str,
) -> float:
    """Run ``model`` on ``feeds`` and compare with the framework's ``expected`` outputs; returns the max
    abs error. Raises UsageError when ONNX Runtime cannot run the export or an output is off."""

    try:
        actual = run_onnx(model, feeds)
    except Exception as exc:  # ORT's own exception types differ by failure; all mean the same here
        raise UsageError(
            f"ONNX Runtime cannot run the model exported from {framework}: {first_line(exc)}",
            hint="export the model to ONNX yourself and pass the .onnx file",
        ) from exc
    if len(actual) != len(expected):
        raise UsageError(
            f"the ONNX export from {framework} has {len(actual)} outputs but the model returned {len(expected)}"
        )
    expected = [np.asarray(ref, dtype=np.float32) for ref in expected]
    try:
        results = compare_outputs(output_names(model), expected, actual)
    except ValueError as exc:
        raise UsageError(f"the ONNX export from {framework} does not match the model: {exc}") from None
    for result, ref in zip(results, expected, strict=True):
        tolerance = exact_tolerance(ref)
        if not result.max_abs_error <= tolerance:
            raise UsageError(
                f"the ONNX export from {framework} disagrees with the model on output '{result.name}': "
                f"max abs error {result.max_abs_error:.3g} > tolerance {tolerance:.3g}",
                hint="layers in training mode or data-dependent control flow export wrongly; "
                "check the model runs in inference mode",
            )
    return max((r.max_abs_error for r in results), default=0.0)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (framework errors can be pages long)."""

    for line in str(exc).splitlines():
        if line.strip():
            return f"{type(exc).__name__}: {line.strip()}"
    return type(exc).__name__
