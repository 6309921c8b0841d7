"""The compile driver: frontend -> pipeline -> lint -> backend -> bundle, in one direction.

``compile_model`` is what ``qanac compile`` calls. It checks everything it can before doing expensive
work (target, output directory, calibration data against the model's inputs), then runs the target's
pipeline, lints the result against the target's rules, lets the backend emit its files into a staging
directory, and renames the finished bundle into place.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import onnx

from qanac import bundle as bundle_io
from qanac.calibration import CalibrationData, Preprocessing, load_data
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError, UsageError
from qanac.frontends import ImportedModel, import_model
from qanac.graph import CompilationModel, input_specs, save_onnx
from qanac.model_summary import summarize
from qanac.pipeline import PassContext, PassRecord, PipelineOptions, PipelineReport, run_pipeline
from qanac.registry import load_passes
from qanac.targets import Target, get_target


@dataclasses.dataclass
class CompileRequest:
    source: str
    target: str
    output: Path
    calibration: str | None = None  # a path, or "random"
    input_shape: str | None = None
    weights: str | None = None
    force: bool = False
    pipeline: list[str] | None = None  # overrides the target's pipeline
    pipeline_options: PipelineOptions = dataclasses.field(default_factory=PipelineOptions)
    approximations: frozenset[str] = frozenset()
    pass_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    labels: list[str] | None = None
    num_calibration: int | None = None


@dataclasses.dataclass
class CompileResult:
    output: Path
    manifest: dict[str, Any]
    report: dict[str, Any]
    pipeline: PipelineReport
    seconds: dict[str, float]
    stopped_after: str | None = None


def load_calibration(request: CompileRequest, model: onnx.ModelProto) -> tuple[CalibrationData, list[Diagnostic]]:
    if request.calibration is None:
        raise UsageError(
            f"target '{request.target}' quantizes the model and needs calibration data",
            hint="pass --calib X.npy|X.npz|IMAGE_DIR (real samples), or --calib random to accept unknown accuracy",
        )
    diagnostics = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(request.calibration, input_specs(model), request.preprocessing)
    for w in caught:
        diagnostics.append(Diagnostic(Level.WARNING, "CAL001", str(w.message), rule="calibration data"))
    if request.num_calibration:
        data = data.take(request.num_calibration)
    return data, diagnostics


@dataclasses.dataclass
class PreparedModel:
    """A model imported and run through a target's pipeline: what lint checks and backends emit."""

    imported: ImportedModel
    model: CompilationModel
    context: PassContext
    pipeline: PipelineReport
    seconds: dict[str, float]


def prepare_model(
    request: CompileRequest,
    calibration: CalibrationData | None,
    diagnostics: list[Diagnostic] | None = None,
    on_pass: Callable[[PassRecord], None] | None = None,
    imported: ImportedModel | None = None,
) -> PreparedModel:
    """Import the source (unless given) and run the target's pipeline on it."""

    target = get_target(request.target)
    load_passes(request.plugins)
    pass_names = request.pipeline or list(target.pipeline)
    if imported is None:
        imported = import_model(request.source, request.input_shape, **_frontend_kwargs(request))
    model = CompilationModel.from_onnx(imported.model)
    ctx = PassContext(
        target=target.name,
        calibration=calibration,
        approximations=request.approximations,
        options=request.pass_options,
        diagnostics=list(diagnostics or []),
    )
    started = time.perf_counter()
    report = run_pipeline(model, pass_names, ctx, request.pipeline_options, on_pass=on_pass)
    seconds = {"import": imported.seconds, "pipeline": time.perf_counter() - started}
    return PreparedModel(imported, model, ctx, report, seconds)


def compile_model(
    request: CompileRequest, on_pass: Callable[[PassRecord], None] | None = None
) -> CompileResult:
    started = time.perf_counter()
    target = get_target(request.target)
    bundle_io.check_output_dir(request.output, request.force)
    load_passes(request.plugins)
    imported = import_model(request.source, request.input_shape, **_frontend_kwargs(request))
    calibration, diagnostics = load_calibration(request, imported.model)
    prepared = prepare_model(request, calibration, diagnostics, on_pass, imported)
    model, ctx, report, seconds = prepared.model, prepared.context, prepared.pipeline, prepared.seconds

    if report.stopped_after is not None:
        return _write_partial(request, model, report, seconds, started)

    final = model.to_onnx()
    reference = report.float_reference or final
    lint_diagnostics = lint_for_target(target, model, request.backend_options.get("device"))
    ctx.diagnostics.extend(lint_diagnostics)
    errors = [d for d in lint_diagnostics if d.level == Level.ERROR]
    if errors:
        raise UnsupportedModelError(
            f"{len(errors)} problem(s) keep this model from target '{target.name}' after legalization",
            diagnostics=errors,
            hint=f"run `qanac lint {request.source} --target {target.name}` for every finding and its fix",
        )

    backend = target.load_backend()
    t_backend = time.perf_counter()
    with bundle_io.staged_directory(request.output, request.force) as stage:
        save_onnx(reference, stage / bundle_io.REFERENCE)
        emitted = backend.emit(final, calibration, request.backend_options, stage)
        seconds["backend"] = time.perf_counter() - t_backend
        seconds["total"] = time.perf_counter() - started
        ctx.diagnostics.extend(emitted.diagnostics)
        manifest = build_manifest(request, target, imported, model, reference, calibration, report)
        manifest.update(emitted.manifest)
        manifest["files"] = bundle_io.file_entries(
            stage, {"reference": bundle_io.REFERENCE, **emitted.files}
        )
        full_report = {
            "target": target.name,
            "seconds": seconds,
            "pipeline": [dataclasses.asdict(r) for r in report.records],
            "pipeline_string": report.pipeline_string(),
            "sweeps": report.iterations,
            "diagnostics": [d.to_dict() for d in ctx.diagnostics],
            "model": summarize(reference).to_dict(),
            "backend": emitted.report,
            "backend_summary": emitted.summary,
        }
        bundle_io.write_json(stage / bundle_io.MANIFEST, manifest)
        bundle_io.write_json(stage / bundle_io.REPORT, full_report)
    return CompileResult(request.output, manifest, full_report, report, seconds)


def _frontend_kwargs(request: CompileRequest) -> dict[str, Any]:
    return {"weights": request.weights} if request.weights else {}


def lint_for_target(target: Target, model: CompilationModel, device: str | None = None) -> list[Diagnostic]:
    if target.rules is None:
        return []
    from qanac.lint import lint_model

    return lint_model(model, target, device)


def build_manifest(
    request: CompileRequest,
    target: Target,
    imported: ImportedModel,
    model: CompilationModel,
    reference: onnx.ModelProto,
    calibration: CalibrationData,
    report: PipelineReport,
) -> dict[str, Any]:
    summary = summarize(reference)
    calib = calibration.describe()
    if calibration.random:
        calib["warning"] = "calibrated on random data: accuracy of the compiled model is unknown"
    return {
        "format_version": bundle_io.FORMAT_VERSION,
        "target": target.name,
        "source": {
            "path": str(request.source),
            "framework": imported.framework,
            "notes": imported.notes,
            "original_layout": imported.original_layout,
            **({"sha256": bundle_io.sha256_of(Path(request.source))} if Path(request.source).is_file() else {}),
        },
        "inputs": [
            {**i, "layout": "NCHW", "preprocessing": request.preprocessing.to_dict()} for i in summary.inputs
        ],
        "outputs": summary.outputs,
        "post_processing": model.post_processing,
        "labels": request.labels,
        "calibration": calib,
        "pipeline": report.pipeline_string(),
        "passes_applied": report.applied(),
        "approximations": sorted(request.approximations),
        "tool_versions": bundle_io.tool_versions(),
    }


def _write_partial(
    request: CompileRequest, model: CompilationModel, report: PipelineReport, seconds: dict[str, float], started: float
) -> CompileResult:
    """--stop-after: the model after that pass, without a backend (not a runnable bundle)."""

    seconds["total"] = time.perf_counter() - started
    data = {
        "stopped_after": report.stopped_after,
        "pipeline": report.pipeline_string(),
        "passes_applied": report.applied(),
        "post_processing": model.post_processing,
    }
    with bundle_io.staged_directory(request.output, request.force) as stage:
        save_onnx(model.to_onnx(), stage / "model.onnx")
        bundle_io.write_json(stage / "pipeline.json", data)
    return CompileResult(request.output, data, data, report, seconds, stopped_after=report.stopped_after)
