"""The compile driver: frontend -> pipeline -> lint -> backend -> bundle, in one direction.

``compile_model`` is what ``qanac compile`` calls. It checks everything it can before doing expensive
work (target, output directory, calibration data against the model's inputs), then runs the target's
pipeline, lints the result against the target's rules, lets the backend emit its files into a staging
directory, and renames the finished bundle into place.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import onnx

from qanac import bundle as bundle_io
from qanac.calibration import CalibrationData, Preprocessing, load_data
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError, UsageError
from qanac.frontends import ImportedModel, import_model
from qanac.execution import tensor_values
from qanac.graph import CompilationModel, input_specs, save_onnx
from qanac.model_summary import summarize
from qanac.partition import (
    DEFAULT_MIN_DEVICE_SHARE,
    DEVICE,
    HOST,
    PartitionPlan,
    Segment,
    extract_segment,
    plan_segments,
)
from qanac.pipeline import PassContext, PassRecord, PipelineOptions, PipelineReport, run_pipeline
from qanac.registry import load_passes
from qanac.targets import Target, get_target

HOST_FILE = "host.onnx"


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
    partition: bool = True  # run what the target rejects on the host (qanac/partition.py)
    min_device_share: float = DEFAULT_MIN_DEVICE_SHARE


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
    lint_diagnostics = lint_for_target(target, model, request.backend_options.get("device"), report)
    errors = [d for d in lint_diagnostics if d.level == Level.ERROR]
    # errors are either fatal below or handled by partitioning (each reported there as PART001)
    ctx.diagnostics.extend(d for d in lint_diagnostics if d.level != Level.ERROR)
    model_errors = [d for d in errors if not d.nodes]
    if model_errors or (errors and not request.partition):
        raise UnsupportedModelError(
            f"{len(errors)} problem(s) keep this model from target '{target.name}' after legalization",
            diagnostics=errors,
            hint=(f"run `qanac lint {request.source} --target {target.name}` for every finding and its fix"
                  + ("" if model_errors else "; without --no-partition those nodes run on the host")),
        )
    host_nodes = {d.nodes[0]: f"{d.code} {d.rule.split(':')[0]}" for d in errors}

    backend = target.load_backend()
    t_backend = time.perf_counter()
    with bundle_io.staged_directory(request.output, request.force) as stage:
        save_onnx(reference, stage / bundle_io.REFERENCE)
        emitted = emit_segments(final, host_nodes, calibration, backend, request, stage)
        seconds["backend"] = time.perf_counter() - t_backend
        seconds["total"] = time.perf_counter() - started
        ctx.diagnostics.extend(emitted.diagnostics)
        manifest = build_manifest(request, target, imported, model, reference, calibration, report)
        manifest.update(emitted.device_manifest)
        manifest["segments"] = emitted.segments
        manifest["partition"] = emitted.partition
        manifest["files"] = bundle_io.file_entries(stage, {"reference": bundle_io.REFERENCE, **emitted.files})
        full_report = {
            "target": target.name,
            "seconds": seconds,
            "pipeline": [dataclasses.asdict(r) for r in report.records],
            "pipeline_string": report.pipeline_string(),
            "sweeps": report.iterations,
            "diagnostics": [d.to_dict() for d in ctx.diagnostics],
            "model": summarize(reference).to_dict(),
            "partition": emitted.partition,
            "segments": emitted.segment_reports,
            **({"backend": emitted.segment_reports[0]["backend"]} if len(emitted.segments) == 1 else {}),
            "backend_summary": emitted.summary,
        }
        bundle_io.write_json(stage / bundle_io.MANIFEST, manifest)
        bundle_io.write_json(stage / bundle_io.REPORT, full_report)
    return CompileResult(request.output, manifest, full_report, report, seconds)


@dataclasses.dataclass
class EmittedSegments:
    segments: list[dict[str, Any]]  # manifest entries, in run order
    segment_reports: list[dict[str, Any]]
    files: dict[str, str]  # role -> path relative to the bundle, for checksums
    partition: dict[str, Any]
    device_manifest: dict[str, Any]  # the first device segment's backend fields (device, ...)
    diagnostics: list[Diagnostic]
    summary: str


def emit_segments(
    final: onnx.ModelProto,
    host_nodes: dict[str, str],
    calibration: CalibrationData,
    backend: Any,
    request: CompileRequest,
    stage: Path,
) -> EmittedSegments:
    """Plan the segments, emit each (device: the backend; host: float ONNX), and move a device segment the
    backend refuses to the host, re-planning, until every device segment compiles (qanac/partition.py)."""

    host_nodes = dict(host_nodes)
    refusals: list[Diagnostic] = []
    # device segments already compiled in an earlier attempt (same nodes, same float inputs): reused
    cache = _SegmentCache(stage / ".compiled-segments")
    try:
        return _emit_until_accepted(final, host_nodes, refusals, calibration, backend, request, stage, cache)
    finally:
        shutil.rmtree(cache.root, ignore_errors=True)


@dataclasses.dataclass
class _SegmentCache:
    """Emitted device segments by their node names, with a copy of their files."""

    root: Path
    entries: dict[tuple[str, ...], tuple[Path, Any]] = dataclasses.field(default_factory=dict)

    def restore(self, segment: Segment, folder: Path) -> Any | None:
        hit = self.entries.get(tuple(segment.nodes))
        if hit is None:
            return None
        shutil.copytree(hit[0], folder, dirs_exist_ok=True)
        return hit[1]

    def store(self, segment: Segment, folder: Path, emitted: Any) -> None:
        kept = self.root / str(len(self.entries))
        shutil.copytree(folder, kept)
        self.entries[tuple(segment.nodes)] = (kept, emitted)


def _emit_until_accepted(
    final: onnx.ModelProto,
    host_nodes: dict[str, str],
    refusals: list[Diagnostic],
    calibration: CalibrationData,
    backend: Any,
    request: CompileRequest,
    stage: Path,
    cache: _SegmentCache,
) -> EmittedSegments:
    for attempt in range(len(final.graph.node) + 1):
        plan = plan_segments(final, host_nodes, request.min_device_share)
        if not any(s.kind == DEVICE for s in plan.segments):
            raise UnsupportedModelError(
                f"no part of the model can run on target '{request.target}'",
                diagnostics=refusals + [d for d in plan.diagnostics if d.code == "PART001"][:20],
                hint=f"run `qanac lint {request.source} --target {request.target}`",
            )
        scratch = stage / f".attempt{attempt}"
        scratch.mkdir()
        try:
            result = _emit_plan(plan, final, calibration, backend, request, scratch, cache)
        except UnsupportedModelError as exc:
            shutil.rmtree(scratch)
            failed = exc.segment if isinstance(exc, _SegmentRefused) else None
            if failed is None or not request.partition:
                raise exc.cause if isinstance(exc, _SegmentRefused) else exc
            # move the first node the backend named (the root of its failure: what follows it may well
            # compile once it runs on the host); a refusal naming none moves the whole segment
            named = [n for d in exc.diagnostics for n in d.nodes if n in failed.nodes]
            moved = named[:1] or failed.nodes
            reason = f"the {request.target} backend refused it: {exc.message}"
            host_nodes.update({name: reason for name in moved})
            refusals.append(Diagnostic(Level.WARNING, "PART004", f"{len(moved)} node(s) from '{moved[0]}' moved "
                                       f"to the host: {exc.message}", nodes=moved[:5], rule="partition"))
            continue
        for child in scratch.iterdir():
            shutil.move(str(child), str(stage / child.name))
        scratch.rmdir()
        result.diagnostics[:0] = plan.diagnostics + refusals
        return result
    raise UnsupportedModelError("partitioning did not settle")  # unreachable: each retry moves nodes to the host


class _SegmentRefused(UnsupportedModelError):
    def __init__(self, segment: Segment, cause: UnsupportedModelError):
        super().__init__(cause.message, diagnostics=cause.diagnostics, hint=cause.hint)
        self.segment = segment
        self.cause = cause


def _emit_plan(
    plan: PartitionPlan,
    final: onnx.ModelProto,
    calibration: CalibrationData,
    backend: Any,
    request: CompileRequest,
    out: Path,
    cache: _SegmentCache,
) -> EmittedSegments:
    single = len(plan.segments) == 1
    device_inputs = [s.inputs[0] for s in plan.segments if s.kind == DEVICE]
    samples = None if single else tensor_values(final, calibration.arrays, device_inputs)
    entries, reports, files, diagnostics, texts, device_summaries = [], [], {}, [], [], []
    device_manifest: dict[str, Any] = {}
    hardware_macs = 0.0
    for index, segment in enumerate(plan.segments):
        name = f"seg{index}"
        folder = "." if single else name
        (out / folder).mkdir(exist_ok=True)
        entry = {"name": name, "kind": segment.kind, "dir": folder, "inputs": segment.inputs,
                 "outputs": segment.outputs, "macs": segment.macs, "nodes": len(segment.nodes)}
        if segment.kind == HOST:
            save_onnx(extract_segment(final, segment), out / folder / HOST_FILE)
            entry.update(target="host", files={"model": HOST_FILE})
            reports.append({"name": name, "kind": HOST, "macs": segment.macs, "first_node": segment.nodes[0],
                            "last_node": segment.nodes[-1]})
            texts.append(f"  {name} host (ONNX Runtime): {len(segment.nodes)} nodes, {segment.macs:,} MACs, "
                         f"'{segment.nodes[0]}' .. '{segment.nodes[-1]}'")
        else:
            model = final if single else extract_segment(final, segment)
            data = calibration if single else dataclasses.replace(
                calibration, arrays={segment.inputs[0]: samples[segment.inputs[0]]}, raw=None,
                source=f"{calibration.source} (float activations at '{segment.inputs[0]}')",
            )
            emitted = cache.restore(segment, out / folder)
            if emitted is None:
                try:
                    emitted = backend.emit(model, data, request.backend_options, out / folder)
                except UnsupportedModelError as exc:
                    raise _SegmentRefused(segment, exc) from exc
                cache.store(segment, out / folder, emitted)
            entry.update(target=request.target, files=dict(emitted.files), variants=list(backend.variants),
                         **emitted.manifest)
            device_manifest = device_manifest or dict(emitted.manifest)
            diagnostics.extend(emitted.diagnostics)
            share = emitted.report.get("mapping", {}).get("hardware_mac_share", 1.0)
            hardware_macs += segment.macs * share
            reports.append({"name": name, "kind": DEVICE, "macs": segment.macs, "backend": emitted.report})
            device_summaries.append(emitted.summary)
            texts.append(f"  {name} {request.target}: {len(segment.nodes)} nodes, {segment.macs:,} MACs\n"
                         + "\n".join("    " + line for line in emitted.summary.splitlines()))
        for role, file in entry["files"].items():
            files[role if single else f"{name}/{role}"] = file if single else f"{folder}/{file}"
        entries.append(entry)
    partition = {
        "segments": len(plan.segments),
        "device_segments": sum(1 for s in plan.segments if s.kind == DEVICE),
        "transfers": plan.transfers,
        "total_macs": plan.total_macs,
        "device_macs": plan.device_macs,
        "device_mac_share": hardware_macs / plan.total_macs if plan.total_macs else 1.0,
    }
    if single:
        summary = device_summaries[0]
    else:
        summary = "\n".join([
            f"partition: {partition['segments']} segments ({partition['device_segments']} on {request.target}), "
            f"{partition['transfers']} host<->device transfers, {partition['device_mac_share']:.1%} of MACs on "
            f"the device hardware",
            *texts,
        ])
    return EmittedSegments(entries, reports, files, partition, device_manifest, diagnostics, summary)


def _frontend_kwargs(request: CompileRequest) -> dict[str, Any]:
    return {"weights": request.weights} if request.weights else {}


def lint_for_target(target: Target, model: CompilationModel, device: str | None = None,
                    pipeline: PipelineReport | None = None) -> list[Diagnostic]:
    """The target's lint findings on a prepared model; with its pipeline report, a finding a pass could
    have fixed says why that pass left the node."""

    if target.rules is None:
        return []
    from qanac.lint import lint_model

    return lint_model(model, target, device, pipeline.skipped() if pipeline is not None else None)


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
