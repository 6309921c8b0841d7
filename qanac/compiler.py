"""The compile driver: one function per stage, each handing a typed result to the next.

    CompileRequest
      -> import_source        ImportedSource   the target and plugins loaded, the model, its calibration data
      -> run_target_pipeline  PreparedModel    the target's passes applied; the source's MACs and what each
                                               pass added to them counted (MacAccount)
      -> lint_prepared        LintedModel      the legalized and reference ONNX; nodes the target rejects go
                                               to the host (or the compile stops, exit 3)
      -> emit_segments        EmittedPlan      plan the segments and emit each; a device segment the backend
                                               refuses moves to the host and planning repeats
      -> weigh_mac_growth     (the same)       passes that grew the model by over 25 % weighed against
                                               compiling without them; the cheaper compile kept
      -> assemble_bundle      AssembledBundle  the typed manifest and report.json, every file checksummed
      -> CompileResult

``compile_model`` is that sequence inside a staging directory made before any work (so the output path is
checked first) that becomes the bundle only when every stage succeeded (qanac.bundle.staged_directory).
``prepare_model`` is the first two stages, what `qanac lint` runs.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import shutil
import time
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import onnx

from qanac import bundle as bundle_io
from qanac.backend import Backend, EmitResult
from qanac.calibration import CalibrationData, Preprocessing, check_label_count, load_data
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError, UsageError, VerificationError
from qanac.execution import tensor_values
from qanac.frontends import ImportedModel, import_model
from qanac.graph import CompilationModel, input_specs, lookup_source, save_onnx, source_names_of
from qanac.manifest import (
    FORMAT_VERSION,
    HOST,
    HOST_MODEL,
    REFERENCE_ROLE,
    CalibrationRecord,
    InputRecord,
    Manifest,
    OutputRecord,
    PartitionRecord,
    PassApplied,
    PostProcessingStep,
    SegmentRecord,
    SourceRecord,
)
from qanac.model_summary import (
    ModelSummary,
    format_macs,
    format_share,
    macs_by_node,
    source_macs_by_segment,
    summarize,
)
from qanac.partition import DEFAULT_MIN_DEVICE_SHARE, DEVICE, PartitionPlan, Segment, extract_segment, plan_segments
from qanac.pipeline import PassContext, PassRecord, PipelineOptions, PipelineReport, run_pipeline
from qanac.progress import report as report_progress
from qanac.registry import load_passes
from qanac.report import format_segments
from qanac.report_html import write_report
from qanac.targets import CANONICALIZE, Target, get_target

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
    progress: Callable[[EmitProgress], None] | None = None  # hears each step of planning and emitting


@dataclasses.dataclass
class CompileResult:
    output: Path
    manifest: dict[str, Any]  # manifest.json as written (pipeline.json's content for --stop-after)
    report: dict[str, Any]
    pipeline: PipelineReport
    seconds: dict[str, float]
    stopped_after: str | None = None
    bundle_manifest: Manifest | None = None  # the typed manifest (None for --stop-after)


def compile_model(
    request: CompileRequest,
    on_pass: Callable[[PassRecord], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> CompileResult:
    """`qanac compile`: the stages in order inside a staging directory that becomes the bundle only when all
    succeed. The output paths are checked and the staging directory made before any work
    (qanac.bundle.staged_directory); ``on_note`` hears about stale staging directories removed on the way."""

    started = time.perf_counter()
    named = named_paths(request)
    bundle_io.check_output_dir(request.output, request.force, named)
    dump_dir = request.pipeline_options.dump_dir
    if dump_dir is not None:
        bundle_io.prepare_directory(dump_dir, "--dump-dir")
    with bundle_io.staged_directory(request.output, request.force, named, on_note) as stage:
        source = import_source(request)
        require_calibration(request, source)
        prepared = run_target_pipeline(request, source, on_pass)
        if prepared.pipeline.stopped_after is not None:
            return write_partial(request, prepared, started, stage)
        linted = lint_prepared(request, prepared)
        backend = prepared.target.load_backend()
        emit_started = time.perf_counter()
        emitted = emit_segments(linted.model, linted.host_nodes, prepared.calibration, backend, request, stage)
        prepared, linted, emitted = weigh_mac_growth(request, source, prepared, linted, emitted, backend, stage)
        seconds = {**prepared.seconds, "backend": time.perf_counter() - emit_started,
                   "total": time.perf_counter() - started}
        assembled = assemble_bundle(request, prepared, linted, emitted, backend, seconds, stage)
        assembled.write(stage)
        write_report(stage)
    return CompileResult(request.output, assembled.manifest.to_dict(), assembled.report, prepared.pipeline, seconds,
                         bundle_manifest=assembled.manifest)


def named_paths(request: CompileRequest) -> list[Path]:
    """The files and folders a compile reads (those that exist) or writes (the dump folder) besides its
    output: the output must not hold any of them."""

    names = [request.source, request.calibration, request.weights, *request.plugins]
    read = [Path(n) for n in names if n is not None and n != "random" and Path(n).exists()]
    dump_dir = request.pipeline_options.dump_dir
    return read if dump_dir is None else [*read, dump_dir]


def prepare_model(
    request: CompileRequest,
    calibration: CalibrationData | None = None,
    on_pass: Callable[[PassRecord], None] | None = None,
) -> PreparedModel:
    """Import the source and run the target's pipeline on it (calibration: given, or read as the request
    names it, or none)."""

    return run_target_pipeline(request, import_source(request, calibration), on_pass)


# -- stage 1: import ------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImportedSource:
    """The target (its passes and the request's plugins loaded), the imported model and its calibration data."""

    target: Target
    imported: ImportedModel
    calibration: CalibrationData | None
    diagnostics: list[Diagnostic]  # about the calibration data (CAL001)


def import_source(request: CompileRequest, calibration: CalibrationData | None = None) -> ImportedSource:
    """Look up the target, load plugins, import the model; read the calibration data the request names
    unless ``calibration`` is given."""

    target = get_target(request.target)
    load_passes(request.plugins)
    report_progress("import", f"importing {request.source}")
    imported = import_model(request.source, request.input_shape, **_frontend_kwargs(request))
    if request.labels is not None:
        output = imported.model.graph.output[0]
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in output.type.tensor_type.shape.dim]
        check_label_count(request.labels, output.name, dims, "--labels")
    diagnostics: list[Diagnostic] = []
    if calibration is None and request.calibration is not None:
        calibration, diagnostics = load_calibration(request, imported.model)
    return ImportedSource(target, imported, calibration, diagnostics)


def require_calibration(request: CompileRequest, source: ImportedSource) -> None:
    if source.calibration is None:
        raise UsageError(
            f"target '{request.target}' quantizes the model and needs calibration data",
            hint="pass --calib X.npy|X.npz|IMAGE_DIR (real samples), or --calib random to accept unknown accuracy",
        )


def load_calibration(request: CompileRequest, model: onnx.ModelProto) -> tuple[CalibrationData, list[Diagnostic]]:
    diagnostics = []
    report_progress("calibration", f"calibration data: {request.calibration}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(request.calibration, input_specs(model), request.preprocessing,
                         limit=request.num_calibration, model=model)
    for w in caught:
        diagnostics.append(Diagnostic(Level.WARNING, "CAL001", str(w.message), rule="calibration data"))
    return data, diagnostics


def _frontend_kwargs(request: CompileRequest) -> dict[str, Any]:
    return {"weights": request.weights} if request.weights else {}


# -- stage 2: pipeline ----------------------------------------------------------------------------------


@dataclasses.dataclass
class PreparedModel:
    """A model imported and run through a target's pipeline: what lint checks and backends emit."""

    target: Target
    imported: ImportedModel
    calibration: CalibrationData | None
    model: CompilationModel
    context: PassContext  # its diagnostics: the calibration's, then the passes'
    pipeline: PipelineReport
    seconds: dict[str, float]  # import, pipeline
    macs: MacAccount | None = None  # the source's MACs and what each pass added (None: not counted)


def run_target_pipeline(
    request: CompileRequest, source: ImportedSource, on_pass: Callable[[PassRecord], None] | None = None
) -> PreparedModel:
    model = CompilationModel.from_onnx(source.imported.model)
    ctx = PassContext(
        target=source.target.name,
        calibration=source.calibration,
        approximations=request.approximations,
        options=request.pass_options,
        diagnostics=list(source.diagnostics),
    )
    report_progress("pipeline", f"running the {source.target.name} pipeline")
    started = time.perf_counter()
    counter = _MacCounter(model)

    def counted(record: PassRecord) -> None:
        counter.after(record)
        if on_pass is not None:
            on_pass(record)

    report = run_pipeline(model, request.pipeline or list(source.target.pipeline), ctx, request.pipeline_options,
                          on_pass=counted)
    macs = counter.account()
    ctx.diagnostics.extend(macs.growth_diagnostics())
    seconds = {"import": source.imported.seconds, "pipeline": time.perf_counter() - started}
    return PreparedModel(source.target, source.imported, source.calibration, model, ctx, report, seconds, macs)


# A legalization pass that adds more than this share of the source's MACs is reported (MAC001).
GROWTH_WARNING_SHARE = 0.25


@dataclasses.dataclass
class MacAccount:
    """The user's MAC count and what legalization did to it.

    ``source`` is ``macs_by_node`` of the source model: the imported model after canonicalization (the
    target-independent passes of ``qanac.targets.CANONICALIZE``), just before the first other pass
    changed it. ``growth`` holds, per pass that changed the MAC count after that point, the MACs it added
    (negative: removed), summed over sweeps; ``legalized`` is the total after the pipeline, the source's
    total plus every growth."""

    source: dict[str, int]
    growth: dict[str, int]
    legalized: int

    @property
    def total(self) -> int:
        return sum(self.source.values())

    def growth_diagnostics(self) -> list[Diagnostic]:
        """MAC001 for each pass that grew the model by more than ``GROWTH_WARNING_SHARE`` of the source."""

        return [
            Diagnostic(Level.WARNING, "MAC001",
                       f"pass '{name}' adds {format_macs(added)} MACs ({added / self.total:.0%} of the source "
                       f"model's {format_macs(self.total)}); the device share counts the source's MACs only",
                       rule="legalization growth", pass_name=name,
                       hint=f"compile weighs it against leaving those layers to the host (MAC002); "
                            f"--disable-pass {name} keeps them off the device without compiling twice")
            for name, added in self.growth.items()
            if self.total and added > GROWTH_WARNING_SHARE * self.total
        ]


class _MacCounter:
    """Counts the model's MACs after every pass that changed it (one export and shape inference each)."""

    def __init__(self, model: CompilationModel):
        self.model = model
        self.current = macs_by_node(model.to_onnx())
        self.source: dict[str, int] | None = None
        self.growth: dict[str, int] = {}

    def after(self, record: PassRecord) -> None:
        if not record.changed:
            return
        if self.source is None and record.name not in CANONICALIZE:
            self.source = self.current
        now = macs_by_node(self.model.to_onnx())
        added = sum(now.values()) - sum(self.current.values())
        if self.source is not None and added:
            self.growth[record.name] = self.growth.get(record.name, 0) + added
        self.current = now

    def account(self) -> MacAccount:
        source = self.current if self.source is None else self.source
        return MacAccount(source, self.growth, sum(self.current.values()))


def write_partial(
    request: CompileRequest, prepared: PreparedModel, started: float, stage: Path
) -> CompileResult:
    """--stop-after: the model after that pass, without a backend (not a runnable bundle), into ``stage``."""

    report = prepared.pipeline
    seconds = {**prepared.seconds, "total": time.perf_counter() - started}
    data = {
        "stopped_after": report.stopped_after,
        "pipeline": report.pipeline_string(),
        "passes_applied": report.applied(),
        "post_processing": prepared.model.post_processing,
    }
    save_onnx(prepared.model.to_onnx(), stage / "model.onnx")
    bundle_io.write_json(stage / "pipeline.json", data)
    return CompileResult(request.output, data, data, report, seconds, stopped_after=report.stopped_after)


# -- stage 3: lint --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LintedModel:
    """The legalized model as ONNX with what lint found: nodes the target rejects (they run on the host)."""

    model: onnx.ModelProto  # the legalized model: what is partitioned and emitted
    reference: onnx.ModelProto  # the float truth verification compares to (before any approximation)
    host_nodes: dict[str, str]  # node -> the finding that keeps it off the device
    diagnostics: list[Diagnostic]  # warnings and notes (errors are in host_nodes, or were raised)


def lint_prepared(request: CompileRequest, prepared: PreparedModel) -> LintedModel:
    """Lint the prepared model; errors without a node, or any error with partitioning off, stop the compile."""

    report_progress("lint", f"checking the {prepared.target.name} rules")
    final = prepared.model.to_onnx()
    findings = lint_for_target(prepared.target, prepared.model, request.backend_options.get("device"),
                               prepared.pipeline)
    errors = [d for d in findings if d.level == Level.ERROR]
    model_errors = [d for d in errors if not d.nodes]
    if model_errors or (errors and not request.partition):
        target = prepared.target.name
        raise UnsupportedModelError(
            f"{len(errors)} problem(s) keep this model from target '{target}' after legalization",
            diagnostics=errors,
            hint=(f"run `{lint_command(request)}` for every finding and its fix"
                  + ("" if model_errors else "; without --no-partition those nodes run on the host")),
        )
    return LintedModel(
        model=final,
        reference=prepared.pipeline.float_reference or final,
        host_nodes={d.nodes[0]: f"{d.code} {d.rule.split(':')[0]}" for d in errors},
        diagnostics=[d for d in findings if d.level != Level.ERROR],
    )


def lint_command(request: CompileRequest) -> str:
    """The `qanac lint` command that checks what this compile checked (its source, target and device)."""

    device = request.backend_options.get("device")
    words = ["qanac", "lint", str(request.source), "--target", request.target]
    return shlex.join(words + (["--device", str(device)] if device else []))


def lint_for_target(target: Target, model: CompilationModel, device: str | None = None,
                    pipeline: PipelineReport | None = None) -> list[Diagnostic]:
    """The target's lint findings on a prepared model; with its pipeline report, a finding a pass could
    have fixed says why that pass left the node."""

    if target.rules is None:
        return []
    from qanac.lint import lint_model

    return lint_model(model, target, device, pipeline.skipped() if pipeline is not None else None)


# -- stages 4 and 5: plan and emit ----------------------------------------------------------------------


@dataclasses.dataclass
class EmittedSegment:
    """One planned segment with its files written: a host segment's float ONNX, or the backend's output."""

    name: str
    dir: str  # relative to the bundle; "." when the bundle is this one segment
    segment: Segment
    files: dict[str, str]  # role -> file name inside ``dir``
    emitted: EmitResult | None = None  # device segments: what the backend returned


@dataclasses.dataclass
class EmittedPlan:
    """The plan the backend accepted and every segment's files, in run order."""

    plan: PartitionPlan
    segments: list[EmittedSegment]
    diagnostics: list[Diagnostic]  # planning and refusals (PART00x), then each device segment's findings
    attempts: int = 1  # plans tried: one more than the attempts with refusals
    backend_calls: int = 1  # device segments the backend compiled (the others were reused)


def emit_segments(
    model: onnx.ModelProto,
    host_nodes: dict[str, str],
    calibration: CalibrationData,
    backend: Backend,
    request: CompileRequest,
    stage: Path,
) -> EmittedPlan:
    """Plan the segments, emit each (device: the backend; host: float ONNX) and, when the backend refuses
    device segments (UnsupportedModelError) or finds one disagreeing with its own reference
    (VerificationError), move the nodes each names to the host and plan again, until every device segment
    compiles (qanac/partition.py). Every device segment of an attempt is emitted before the next, so all
    refusals of an attempt move at once; host segments are written for the accepted plan only. A device
    segment compiled in an earlier attempt (same nodes, so same float input) is reused, and the float
    activations at segment inputs are computed once. Without partitioning the first refusal is the error
    (exit 3, or exit 1 for a disagreement); a disagreement that leaves nothing on the device is an error
    too (exit 1). ``request.progress`` hears of each step."""

    host_nodes = dict(host_nodes)
    refusals: list[Diagnostic] = []
    disagreements: list[VerificationError] = []
    emitter = _Emitter(model, calibration, backend, request, _SegmentCache(stage / ".compiled-segments"))
    macs = macs_by_node(model)  # every attempt plans this same model
    try:
        for attempt in range(1, len(model.graph.node) + 2):
            plan = plan_segments(model, host_nodes, request.min_device_share, macs)
            if not any(s.kind == DEVICE for s in plan.segments):
                if disagreements:
                    last = disagreements[-1]
                    raise VerificationError(f"{last.message}; with those nodes on the host no part of the model "
                                            "is left for the device", diagnostics=last.diagnostics, hint=last.hint)
                raise UnsupportedModelError(
                    f"no part of the model can run on target '{request.target}'",
                    diagnostics=refusals + [d for d in plan.diagnostics if d.code == "PART001"][:20],
                    hint=f"run `{lint_command(request)}` for every finding and its fix",
                )
            refused = emitter.compile_device_segments(plan, attempt)
            if refused:
                for one in refused:
                    refusals.append(_move_to_host(one, model, host_nodes, request.target))
                    emitter.report(attempt, plan, one.segment, "refused", refusals[-1].message)
                disagreements = [r.cause for r in refused if isinstance(r.cause, VerificationError)]
                continue
            segments = emitter.write(plan, attempt, stage)
            found = [d for s in segments if s.emitted is not None for d in s.emitted.diagnostics]
            moved = {n for d in refusals for n in d.nodes}  # a refusal is one finding: its PART004
            planned = [d for d in plan.diagnostics if d.code != "PART001" or not set(d.nodes) <= moved]
            return EmittedPlan(plan, segments, planned + refusals + found, attempt, emitter.backend_calls)
        raise UnsupportedModelError("partitioning did not settle")  # unreachable: each retry moves nodes to the host
    finally:
        shutil.rmtree(emitter.cache.root, ignore_errors=True)


def weigh_mac_growth(
    request: CompileRequest,
    source: ImportedSource,
    prepared: PreparedModel,
    linted: LintedModel,
    emitted: EmittedPlan,
    backend: Backend,
    stage: Path,
) -> tuple[PreparedModel, LintedModel, EmittedPlan]:
    """When passes grew the model by more than ``GROWTH_WARNING_SHARE`` of the source's MACs each (and
    partitioning is on), compile it again without them, so that the layers they rewrote go to the host
    (lint or the backend then refuses them), and keep the compile that runs fewer MACs off the device
    hardware (on the host or in the backend's software fallback, as each executes them); the first on a
    tie, so a first compile running every MAC on the hardware is kept without compiling again. The choice
    is reported as MAC002 in the kept compile's diagnostics; the other compile's files are removed from
    ``stage``."""

    macs = prepared.macs
    grown = [] if macs is None or not request.partition or not macs.total else [
        name for name, added in macs.growth.items() if added > GROWTH_WARNING_SHARE * macs.total]
    if not grown:
        return prepared, linted, emitted
    options = request.pipeline_options
    without = dataclasses.replace(request, pipeline_options=dataclasses.replace(
        options, disabled=options.disabled | frozenset(grown), dump_dir=None))
    passes = ", ".join(f"'{name}' (+{format_macs(macs.growth[name])} MACs)" for name in grown)
    kept = off_hardware_macs(emitted)
    if not kept:
        prepared.context.diagnostics.append(Diagnostic(
            Level.INFO, "MAC002", f"kept the rewrites: with {passes}, no MACs run off the device hardware",
            rule="legalization growth"))
        return prepared, linted, emitted
    scratch = stage / ".without-growth"
    scratch.mkdir()
    try:
        other = run_target_pipeline(without, source)
        other_linted = lint_prepared(without, other)
        other_emitted = emit_segments(other_linted.model, other_linted.host_nodes, other.calibration, backend,
                                      without, scratch)
    except (UnsupportedModelError, VerificationError) as exc:
        shutil.rmtree(scratch)
        prepared.context.diagnostics.append(Diagnostic(
            Level.INFO, "MAC002", f"kept {passes}: without, the model does not compile ({exc.message})",
            rule="legalization growth"))
        return prepared, linted, emitted
    dropped = off_hardware_macs(other_emitted)
    take_other = dropped < kept
    choice = (f"without {passes}, {format_macs(dropped)} MACs run off the device hardware, with them "
              f"{format_macs(kept)}")
    if not take_other:
        shutil.rmtree(scratch)
        prepared.context.diagnostics.append(Diagnostic(
            Level.INFO, "MAC002", f"kept the rewrites: {choice}", rule="legalization growth"))
        return prepared, linted, emitted
    for segment in emitted.segments:
        if segment.dir == ".":
            for name in segment.files.values():
                (stage / name).unlink()
        else:
            shutil.rmtree(stage / segment.dir)
    for child in scratch.iterdir():
        shutil.move(str(child), str(stage / child.name))
    scratch.rmdir()
    other.context.diagnostics.append(Diagnostic(
        Level.WARNING, "MAC002", f"compiled without the rewrites: {choice}", rule="legalization growth",
        hint="compile with --disable-pass for each of them to skip the comparison"))
    return other, other_linted, other_emitted


def off_hardware_macs(emitted: EmittedPlan) -> int:
    """MACs a plan executes off the device hardware, as compiled: its host segments', and the share of each
    device segment's that its backend runs in software."""

    return round(sum(s.segment.macs * (1.0 if s.emitted is None else 1.0 - s.emitted.hardware_mac_share)
                     for s in emitted.segments))


@dataclasses.dataclass(frozen=True)
class EmitProgress:
    """A step of planning and emitting, as it starts (``refused``: as it ends), for a progress display.

    ``step`` is ``plan`` (a plan of ``segments`` segments), ``activations`` (float activations at segment
    inputs), ``emit`` (the backend compiling a device segment), ``reuse`` (a device segment compiled in an
    earlier attempt), ``refused`` (a device segment refused: its named nodes move to the host) or ``host``
    (a host segment of the accepted plan written). ``segment`` is 1-based, 0 for steps about the whole
    plan."""

    attempt: int
    step: str
    segment: int
    segments: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        where = f", segment {self.segment}/{self.segments}" if self.segment else ""
        return f"[attempt {self.attempt}{where}] {self.message}"


class _SegmentRefused(Exception):
    def __init__(self, segment: Segment, cause: UnsupportedModelError | VerificationError):
        super().__init__(cause.message)
        self.segment = segment
        self.cause = cause


def _move_to_host(refused: _SegmentRefused, model: onnx.ModelProto, host_nodes: dict[str, str],
                  target: str) -> Diagnostic:
    """Move the nodes of the segment that the refusal's errors name to the host, all at once, except those
    of an error whose every node depends on a node another error names (a consequence: it may well compile
    once that one runs on the host); a refusal naming none moves the whole segment."""

    cause, nodes = refused.cause, refused.segment.nodes
    inside = set(nodes)
    groups = [{n for n in d.nodes if n in inside} for d in cause.diagnostics if d.level == Level.ERROR]
    groups = [g for g in groups if g]
    upstream = _named_upstream(model, inside, set().union(*groups))
    causes = set().union(*(g for g in groups if not all(upstream[n] - g for n in g)))
    moved = [n for n in nodes if n in causes] or nodes
    verb = "disagrees" if isinstance(cause, VerificationError) else "refused it"
    host_nodes.update({name: f"the {target} backend {verb}: {cause.message}" for name in moved})
    return Diagnostic(Level.WARNING, "PART004", f"moved to the host: {cause.message} ({len(moved)} node(s) from "
                      f"'{moved[0]}')", nodes=moved, rule="partition")


def _named_upstream(model: onnx.ModelProto, inside: set[str], named: set[str]) -> dict[str, set[str]]:
    """For each node of ``inside``, the nodes of ``named`` upstream of it within ``inside`` (the model is
    topologically sorted)."""

    producer = {out: n.name for n in model.graph.node if n.name in inside for out in n.output}
    reached: dict[str, set[str]] = {}  # node -> the named nodes upstream of it, and itself when named
    upstream: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.name in inside:
            upstream[node.name] = set().union(*(reached[producer[t]] for t in node.input if t in producer))
            reached[node.name] = upstream[node.name] | ({node.name} & named)
    return upstream


@dataclasses.dataclass
class _SegmentCache:
    """Device segments the backend compiled, by their node names, each in a folder of its own under ``root``."""

    root: Path
    entries: dict[tuple[str, ...], tuple[Path, EmitResult]] = dataclasses.field(default_factory=dict)
    folders: int = 0

    def get(self, segment: Segment) -> tuple[Path, EmitResult] | None:
        return self.entries.get(tuple(segment.nodes))

    def new_folder(self) -> Path:
        self.folders += 1
        folder = self.root / str(self.folders)
        folder.mkdir(parents=True)
        return folder

    def put(self, segment: Segment, folder: Path, emitted: EmitResult) -> None:
        self.entries[tuple(segment.nodes)] = (folder, emitted)


@dataclasses.dataclass
class _Emitter:
    """Compiles and writes plans of one model: what stays the same across attempts (the model with its
    shapes inferred, float activations at segment inputs, compiled device segments) is computed once."""

    model: onnx.ModelProto
    calibration: CalibrationData
    backend: Backend
    request: CompileRequest
    cache: _SegmentCache
    activations: dict[str, Any] = dataclasses.field(default_factory=dict)  # tensor -> float calibration values
    backend_calls: int = 0
    _inferred: onnx.ModelProto | None = None

    def report(self, attempt: int, plan: PartitionPlan, segment: Segment | None, step: str, message: str) -> None:
        if self.request.progress is not None:
            index = 0 if segment is None else next(i for i, s in enumerate(plan.segments, 1) if s is segment)
            self.request.progress(EmitProgress(attempt, step, index, len(plan.segments), message))

    def compile_device_segments(self, plan: PartitionPlan, attempt: int) -> list[_SegmentRefused]:
        """Compile every device segment of ``plan`` not compiled before (into the cache); the refusals, all
        of them unless partitioning is off (then the first raises its error). A device segment that is not
        the whole model calibrates on the float activations at its input."""

        single = len(plan.segments) == 1
        device = [s for s in plan.segments if s.kind == DEVICE]
        self.report(attempt, plan, None, "plan", f"{len(plan.segments)} segment(s), {len(device)} on the device")
        if not single:
            self._compute_activations(attempt, plan, [s.inputs[0] for s in device])
        refused = []
        for segment in device:
            if self.cache.get(segment) is not None:
                self.report(attempt, plan, segment, "reuse", "device segment compiled in an earlier attempt")
                continue
            share = segment.macs / plan.total_macs if plan.total_macs else 1.0
            self.report(attempt, plan, segment, "emit", f"compiling {len(segment.nodes)} node(s) "
                        f"({share:.1%} of MACs) for {self.request.target}")
            part, data = (self.model, self.calibration) if single else (
                self._extract(segment), self._calibration_at(segment.inputs[0]))
            folder = self.cache.new_folder()
            self.backend_calls += 1
            try:
                result = self.backend.emit(part, data, self.request.backend_options, folder)
            except (UnsupportedModelError, VerificationError) as exc:
                shutil.rmtree(folder)
                if not self.request.partition:
                    raise
                refused.append(_SegmentRefused(segment, exc))
                continue
            self.cache.put(segment, folder, result)
        return refused

    def write(self, plan: PartitionPlan, attempt: int, out: Path) -> list[EmittedSegment]:
        """Write every segment of an accepted ``plan`` into ``out`` (its device segments are compiled):
        ``out`` itself for a one-segment plan, else folder ``seg<i>`` per segment."""

        single = len(plan.segments) == 1
        emitted = []
        for index, segment in enumerate(plan.segments):
            name = f"seg{index}"
            folder = "." if single else name
            (out / folder).mkdir(exist_ok=True)
            if segment.kind == HOST:
                self.report(attempt, plan, segment, "host", f"host segment: {len(segment.nodes)} node(s) as ONNX")
                save_onnx(self._extract(segment), out / folder / HOST_FILE)
                emitted.append(EmittedSegment(name, folder, segment, {HOST_MODEL: HOST_FILE}))
                continue
            compiled, result = self.cache.entries.pop(tuple(segment.nodes))
            for child in compiled.iterdir():
                shutil.move(str(child), str(out / folder / child.name))
            emitted.append(EmittedSegment(name, folder, segment, dict(result.files), result))
        return emitted

    def _compute_activations(self, attempt: int, plan: PartitionPlan, tensors: list[str]) -> None:
        missing = [t for t in tensors if t not in self.activations]
        if missing:
            self.report(attempt, plan, None, "activations", f"float activations at {len(missing)} segment input(s)")
            self.activations.update(tensor_values(self.model, self.calibration.arrays, missing))

    def _calibration_at(self, tensor: str) -> CalibrationData:
        return dataclasses.replace(self.calibration, arrays={tensor: self.activations[tensor]}, raw=None,
                                   source=f"{self.calibration.source} (float activations at '{tensor}')")

    def _extract(self, segment: Segment) -> onnx.ModelProto:
        if self._inferred is None:
            self._inferred = onnx.shape_inference.infer_shapes(self.model)
        return extract_segment(self._inferred, segment, shapes_inferred=True)


# -- stage 6: assemble ----------------------------------------------------------------------------------


@dataclasses.dataclass
class AssembledBundle:
    """What the bundle directory holds besides the segments' files: the manifest and the report."""

    manifest: Manifest
    report: dict[str, Any]

    def write(self, stage: Path) -> None:
        bundle_io.write_json(stage / bundle_io.MANIFEST, self.manifest.to_dict())
        bundle_io.write_json(stage / bundle_io.REPORT, self.report)


def assemble_bundle(
    request: CompileRequest,
    prepared: PreparedModel,
    linted: LintedModel,
    emitted: EmittedPlan,
    backend: Backend,
    seconds: dict[str, float],
    stage: Path,
) -> AssembledBundle:
    """Write the reference model and build the manifest (every file checksummed) and report.json."""

    save_onnx(linted.reference, stage / bundle_io.REFERENCE)
    summary = summarize(linted.reference)
    source_macs = source_macs_of(emitted, prepared.macs)
    segments = [segment_record(s, request.target, backend.variants, m)
                for s, m in zip(emitted.segments, source_macs, strict=True)]
    partition = partition_record(emitted, prepared.macs)
    files = {REFERENCE_ROLE: bundle_io.REFERENCE}
    for record in segments:
        for role, name in record.files.items():
            key = role if record.dir == "." else f"{record.name}/{role}"
            files[key] = (PurePosixPath(record.dir) / name).as_posix()
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        target=prepared.target.name,
        device=next((s.device for s in segments if s.kind == DEVICE), None),
        source=source_record(request, prepared.imported),
        inputs=[InputRecord(**i, layout="NCHW", preprocessing=request.preprocessing) for i in summary.inputs],
        outputs=[OutputRecord(**o) for o in summary.outputs],
        post_processing=[PostProcessingStep(**step) for step in prepared.model.post_processing],
        labels=request.labels,
        calibration=calibration_record(prepared.calibration),
        pipeline=prepared.pipeline.pipeline_string(),
        passes_applied=[PassApplied(name=p.pop("pass"), **p) for p in prepared.pipeline.applied()],
        approximations=sorted(request.approximations),
        tool_versions=bundle_io.tool_versions((prepared.target.name, prepared.imported.framework)),
        segments=segments,
        partition=partition,
        files=bundle_io.file_entries(stage, files),
    )
    report = compile_report(prepared, linted, emitted, partition, summary, seconds)
    return AssembledBundle(manifest, report)


def segment_record(emitted: EmittedSegment, target: str, variants: tuple[str, ...],
                   source_macs: int | None = None) -> SegmentRecord:
    """The manifest record of a segment; ``source_macs``: the source model's MACs it computes (default: its
    own count), of which a device segment has the backend's hardware share on the hardware."""

    segment, result = emitted.segment, emitted.emitted
    source_macs = segment.macs if source_macs is None else source_macs
    record = SegmentRecord(name=emitted.name, kind=segment.kind, dir=emitted.dir, target=HOST,
                           inputs=list(segment.inputs), outputs=list(segment.outputs), macs=segment.macs,
                           nodes=len(segment.nodes), files=dict(emitted.files), source_macs=source_macs)
    if result is not None:
        record = dataclasses.replace(record, target=target, device=result.device, variants=list(variants),
                                     backend=dict(result.record),
                                     hardware_macs=hardware_macs(source_macs, result.hardware_mac_share))
    return record


def hardware_macs(source_macs: int, hardware_mac_share: float) -> int:
    """A device segment's source MACs on the hardware: its share as the backend mapped it, rounded down
    unless it is all of them."""

    return source_macs if hardware_mac_share >= 1.0 else math.floor(source_macs * hardware_mac_share)


def source_macs_of(emitted: EmittedPlan, macs: MacAccount | None) -> list[int]:
    """The source model's MACs each segment computes (qanac.model_summary.source_macs_by_segment); without
    an account, each segment's own count."""

    if macs is None:
        return [s.segment.macs for s in emitted.segments]
    return source_macs_by_segment(macs.source, emitted.plan.macs_by_node, [s.segment.nodes for s in emitted.segments])


def partition_record(emitted: EmittedPlan, macs: MacAccount | None = None) -> PartitionRecord:
    """Where the source model's MACs run (without ``macs``: the planned model's own count)."""

    plan = emitted.plan
    source = source_macs_of(emitted, macs)
    total = sum(source)
    on_device = [(m, s.emitted) for m, s in zip(source, emitted.segments, strict=True) if s.emitted is not None]
    hardware = sum(hardware_macs(m, result.hardware_mac_share) for m, result in on_device)
    return PartitionRecord(
        segments=len(plan.segments),
        device_segments=sum(1 for s in plan.segments if s.kind == DEVICE),
        transfers=plan.transfers,
        total_macs=total,
        device_macs=hardware,
        device_mac_share=hardware / total if total else 1.0,
        device_segment_macs=sum(m for m, _ in on_device),
        legalized_macs=plan.total_macs,
        mac_growth=dict(macs.growth) if macs is not None else {},
    )


def source_record(request: CompileRequest, imported: ImportedModel) -> SourceRecord:
    path = Path(request.source)
    return SourceRecord(path=str(request.source), framework=imported.framework, notes=list(imported.notes),
                        original_layout=dict(imported.original_layout),
                        sha256=bundle_io.sha256_of(path) if path.is_file() else None)


def calibration_record(calibration: CalibrationData) -> CalibrationRecord:
    return CalibrationRecord(
        source=calibration.source,
        num_samples=calibration.num_samples,
        random=calibration.random,
        preprocessing=calibration.preprocessing,
        warning=(f"calibrated on {calibration.source} data, not real samples: accuracy of the compiled model is "
                 "unknown" if calibration.random else None),
    )


def compile_report(
    prepared: PreparedModel,
    linted: LintedModel,
    emitted: EmittedPlan,
    partition: PartitionRecord,
    summary: ModelSummary,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """report.json: timings, the pipeline record, every diagnostic, the model, and each segment's report."""

    segment_reports = []
    for s in emitted.segments:
        entry: dict[str, Any] = {"name": s.name, "kind": s.segment.kind, "macs": s.segment.macs}
        if s.emitted is None:
            entry.update(first_node=s.segment.nodes[0], last_node=s.segment.nodes[-1])
        else:
            entry["backend"] = s.emitted.report
        segment_reports.append(entry)
    report = prepared.pipeline
    macs = prepared.macs
    model = summary.to_dict() | {"legalized_macs": summary.macs}
    if macs is not None:
        model.update(macs=macs.total, macs_by_node={k: v for k, v in macs.source.items() if v},
                     mac_growth=dict(macs.growth))
    names = source_names_of(linted.model)
    diagnostics = [with_sources(d, names) for d in [*prepared.context.diagnostics, *linted.diagnostics,
                                                    *emitted.diagnostics]]
    return {
        "target": prepared.target.name,
        "seconds": seconds,
        "pipeline": [dataclasses.asdict(r) for r in report.records],
        "pipeline_string": report.pipeline_string(),
        "sweeps": report.iterations,
        "diagnostics": [d.to_dict() for d in diagnostics],
        "model": model,
        "device_share_warning": device_share_warning(prepared.target.name, emitted, partition, macs),
        "partition": partition.to_dict(),
        "partition_attempts": {"plans": emitted.attempts, "backend_calls": emitted.backend_calls},
        "segments": segment_reports,
        **({"backend": segment_reports[0]["backend"]} if len(segment_reports) == 1 else {}),
        "backend_summary": format_segments(prepared.target.name, emitted, partition),
    }


# Below this share of the source's MACs on the device's hardware, compile ends with a warning.
DEVICE_SHARE_WARNING = 0.9
WARNING_REASONS = 3  # findings the warning names


def device_share_warning(target: str, emitted: EmittedPlan, partition: PartitionRecord,
                         macs: MacAccount | None) -> str | None:
    """One line when less than ``DEVICE_SHARE_WARNING`` of the source's MACs run on the device's hardware,
    naming the findings that moved the most source MACs off it: the partition's (PART001-PART004: nodes on
    the host) and the device segments' backend warnings naming nodes there (layers in the backend's
    software fallback), ranked by the source MACs of the nodes each code names; None otherwise."""

    if not partition.total_macs or partition.device_mac_share >= DEVICE_SHARE_WARNING:
        return None
    nodes = [n for s in emitted.segments for n in s.segment.nodes]
    source = macs.source if macs is not None else emitted.plan.macs_by_node
    per_node = dict(zip(nodes, source_macs_by_segment(source, emitted.plan.macs_by_node, [[n] for n in nodes]),
                        strict=True))
    host = {n for s in emitted.segments if s.emitted is None for n in s.segment.nodes}
    moved: dict[str, tuple[Diagnostic, set[str]]] = {}  # code -> (its first finding, the nodes it moved)
    for d in emitted.diagnostics:
        if d.code.startswith("PART"):
            named = set(d.nodes) & host
        elif d.level != Level.INFO:
            named = set(d.nodes) & (set(per_node) - host)
        else:
            continue
        if named:
            first, so_far = moved.setdefault(d.code, (d, set()))
            so_far.update(named)
    ranked = sorted(((sum(per_node[n] for n in named), first) for first, named in moved.values()),
                    key=lambda entry: -entry[0])
    reasons = "; ".join(f"{first.code} {_shortened(first.message)} ({format_macs(m)} MACs)"
                        for m, first in ranked[:WARNING_REASONS] if m)
    return (f"only {format_share(partition.device_mac_share)} of the model's {format_macs(partition.total_macs)} "
            f"MACs run on the {target} device hardware; " + (f"most moved off it by: {reasons}" if reasons else
                                                             "no finding names the layers that do not"))


def _shortened(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def with_sources(diagnostic: Diagnostic, source_names: dict[str, str]) -> Diagnostic:
    """``diagnostic`` with the source-framework name of each node, when it names nodes but not their sources."""

    if not diagnostic.nodes or diagnostic.sources or not source_names:
        return diagnostic
    return dataclasses.replace(diagnostic, sources=[lookup_source(source_names, n) for n in diagnostic.nodes])
