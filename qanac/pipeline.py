"""Running a named, ordered list of passes to a bounded fixed point, with instruments.

The pipeline sweeps its passes in order and repeats the sweep while any pass changed the graph, at most
``max_iterations`` times; a pipeline still changing after that is an error naming the passes that kept
changing it (two passes undoing each other, usually).

Instruments (all optional, see ``PipelineOptions``):
    dump_dir      the model before the pipeline (000_input.onnx) and after every pass that changed it
                  (NNN_<pass>.onnx), numbered in execution order
    time_passes   wall time per pass, summed over sweeps
    verify_each   ONNX Runtime outputs on calibration samples before and after each changing pass; an
                  exact pass whose change exceeds float rounding raises InternalError naming the pass
    disabled      pass names to skip; stop_after: the last pass to run (refused when it would not run:
                  disabled, or an approximation that is not enabled)
A pass that raises leaves a reproducer (the model just before it, and the pipeline string) in
``dump_dir/reproducer`` (or a fresh temporary directory when no dump dir was given).

Approximate passes run only when named in ``PassContext.approximations``; their deviation from the
float outputs is always measured on the calibration data and checked against ``max_deviation``.

Serialisation: the graph is exported to a ModelProto only where a ModelProto is consumed: before each
pass under ``verify_each`` and before each approximate pass (the first of these is
``PipelineReport.float_reference``), after each changing pass under ``dump_dir`` or when its outputs are
measured, and on a crash. A plain run exports nothing, so its cost is the passes' own. The crash
reproducer therefore is rebuilt after the fact: the pipeline's input (``CompilationModel.source``, the
ModelProto it was imported from) is imported again and put through the pass runs recorded so far, and
the result is kept if the failing pass then fails the same way. When the input is not known or the
replay does not fail the same way, the reproducer holds the model as the failing pass left it and
says so. With ``verify_each`` (or for an approximate pass) the model before the pass is at hand and is
written directly.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from qanac.calibration import CalibrationData
from qanac.compare import max_abs_difference, max_exact_violation
from qanac.diagnostics import Diagnostic, InternalError, QanacError, UsageError, VerificationError
from qanac.execution import apply_post_processing, run_onnx
from qanac.graph import POST_PROCESSING_KEY, CompilationModel, output_names, refresh_tensor_names, save_onnx
from qanac.registry import PassInfo, PassResult, get_pass

VERIFY_SAMPLES = 8


@dataclasses.dataclass
class PassContext:
    """What a pass may read besides the graph, and where it reports.

    ``options`` holds pass settings by pass name (``{"bound-relu": {"percentile": 99.99}}``).
    """

    target: str
    calibration: CalibrationData | None = None
    approximations: frozenset[str] = frozenset()
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    diagnostics: list[Diagnostic] = dataclasses.field(default_factory=list)

    def option(self, pass_name: str, key: str, default: Any) -> Any:
        return self.options.get(pass_name, {}).get(key, default)


@dataclasses.dataclass
class PipelineOptions:
    dump_dir: Path | None = None
    time_passes: bool = False
    verify_each: bool = False
    disabled: frozenset[str] = frozenset()
    stop_after: str | None = None
    max_iterations: int = 8
    max_deviation: float | None = None  # for approximate passes: max abs output change allowed


@dataclasses.dataclass
class PassRecord:
    name: str
    iteration: int
    changed: bool
    counts: dict[str, int]
    seconds: float
    exact: bool
    max_abs_change: float | None = None  # measured with verify_each or for approximate passes
    dump: str | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PipelineReport:
    pipeline: list[str]
    records: list[PassRecord]
    iterations: int
    stopped_after: str | None = None
    # the model just before the first approximate pass: the float truth that verification compares to
    float_reference: onnx.ModelProto | None = None

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per pass: counts summed over sweeps, total seconds, and the largest measured change."""

        totals: dict[str, dict[str, Any]] = {}
        for r in self.records:
            entry = totals.setdefault(
                r.name, {"counts": {}, "seconds": 0.0, "exact": r.exact, "max_abs_change": None, "details": {}}
            )
            for key, n in r.counts.items():
                entry["counts"][key] = entry["counts"].get(key, 0) + n
            entry["seconds"] += r.seconds
            if r.max_abs_change is not None:
                entry["max_abs_change"] = max(entry["max_abs_change"] or 0.0, r.max_abs_change)
            entry["details"].update(r.details)
        return totals

    def skipped(self) -> dict[str, dict[str, str]]:
        """Per pass: the nodes it left, with its reason (its details' "skipped" entry)."""

        return {name: dict(info["details"].get("skipped", {})) for name, info in self.totals().items()
                if info["details"].get("skipped")}

    def applied(self) -> list[dict[str, Any]]:
        """Passes that changed the model, for the manifest."""

        return [
            {"pass": name, **info}
            for name, info in self.totals().items()
            if info["counts"]
        ]

    def pipeline_string(self) -> str:
        return ",".join(self.pipeline)


def parse_pipeline(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        get_pass(name)
    return names


def _check_names(pass_names: list[str], ctx: PassContext, options: PipelineOptions) -> None:
    """Refuse disabled or stop-after names that are unknown or not in the pipeline, and a stop-after
    pass that would not run (disabled, or an approximation that is not enabled)."""

    for name in [*options.disabled, *([options.stop_after] if options.stop_after else [])]:
        get_pass(name)
        if name not in pass_names:
            raise UsageError(
                f"pass '{name}' is not in the {ctx.target} pipeline",
                hint="pipeline: " + ",".join(pass_names),
            )
    stop = options.stop_after
    if stop is None:
        return
    if stop in options.disabled:
        raise UsageError(f"--stop-after names pass '{stop}', which --disable-pass turns off",
                         hint=f"drop --disable-pass {stop}, or stop after another pass")
    if not get_pass(stop).exact and stop not in ctx.approximations:
        raise UsageError(
            f"--stop-after names approximate pass '{stop}', which runs only when enabled",
            hint=f"add --approx {stop}, or stop after another pass",
        )


def run_pipeline(
    model: CompilationModel,
    pass_names: list[str],
    ctx: PassContext,
    options: PipelineOptions | None = None,
    on_pass: Callable[[PassRecord], None] | None = None,
) -> PipelineReport:
    """Run ``pass_names`` on ``model`` in place (see the module docstring); returns what each run did."""

    options = options or PipelineOptions()
    _check_names(pass_names, ctx, options)
    passes = [get_pass(n) for n in pass_names if n not in options.disabled]
    passes = [p for p in passes if p.exact or p.name in ctx.approximations]
    report = PipelineReport(pipeline=[p.name for p in passes], records=[], iterations=0)

    source = model.source  # the pipeline's input as imported (None if unknown): a crash replays from it
    checker = _OutputChecker(ctx, options)
    step = 0
    if options.dump_dir is not None:
        options.dump_dir.mkdir(parents=True, exist_ok=True)
        save_onnx(model.to_onnx(), options.dump_dir / "000_input.onnx")

    for iteration in range(1, options.max_iterations + 1):
        report.iterations = iteration
        changed_this_sweep: list[str] = []
        for info in passes:
            before = model.to_onnx() if options.verify_each or not info.exact else None
            if not info.exact and report.float_reference is None:
                report.float_reference = before
            started = time.perf_counter()
            result = _run_one(info, model, ctx, before, source, report, options)
            seconds = time.perf_counter() - started
            record = PassRecord(
                name=info.name,
                iteration=iteration,
                changed=result.changed,
                counts=dict(result.counts),
                seconds=seconds,
                exact=info.exact,
                details=dict(result.details),
            )
            ctx.diagnostics.extend(result.diagnostics)
            if result.changed:
                model.source = None
                changed_this_sweep.append(info.name)
                step += 1
                record.max_abs_change = checker.check(info, model, before, report)
                if options.dump_dir is not None:
                    path = options.dump_dir / f"{step:03d}_{info.name}.onnx"
                    save_onnx(model.to_onnx(), path)
                    record.dump = path.name
            report.records.append(record)
            if on_pass is not None:
                on_pass(record)
            if options.stop_after == info.name:
                report.stopped_after = info.name
                return report
        if not changed_this_sweep:
            return report
    raise InternalError(
        f"pipeline did not converge in {options.max_iterations} sweeps; passes still changing the graph: "
        + ", ".join(dict.fromkeys(changed_this_sweep)),
        hint="two passes probably undo each other; disable one with --disable-pass and report the bug",
    )


def _apply(info: PassInfo, model: CompilationModel, ctx: PassContext) -> PassResult:
    """One run of one pass, then the cleanup and topological sort that every changing pass gets."""

    refresh_tensor_names(model.graph)
    result = info.fn(model, ctx)
    if not isinstance(result, PassResult):
        raise InternalError(f"pass '{info.name}' ({info.origin}) returned {type(result).__name__}, not PassResult")
    if result.changed:
        model.graph.cleanup().toposort()
    return result


def _run_one(
    info: PassInfo,
    model: CompilationModel,
    ctx: PassContext,
    before: onnx.ModelProto | None,
    source: onnx.ModelProto | None,
    report: PipelineReport,
    options: PipelineOptions,
) -> PassResult:
    try:
        return _apply(info, model, ctx)
    except QanacError:
        raise
    except Exception as exc:
        if before is None and source is not None:
            before = _replay_until(source, [r.name for r in report.records], info, exc, ctx)
        if before is not None:
            where = write_reproducer(before, info.name, report.pipeline, ctx, options.dump_dir)
        else:
            where = write_reproducer(_export_or_none(model), info.name, report.pipeline, ctx, options.dump_dir,
                                     before=False)
        raise InternalError(
            f"pass '{info.name}' ({info.origin}) failed: {type(exc).__name__}: {exc}",
            hint=f"reproducer written to {where}",
        ) from exc


def _replay_until(
    source: onnx.ModelProto, runs: list[str], failing: PassInfo, error: Exception, ctx: PassContext
) -> onnx.ModelProto | None:
    """The model just before ``failing``: ``source`` re-imported and put through ``runs`` again.

    Returned only when ``failing`` then raises the same exception type again (the replay reproduced
    the failure); None otherwise.
    """

    replay_ctx = dataclasses.replace(ctx, diagnostics=[])
    try:
        model = CompilationModel.from_onnx(source)
        for name in runs:
            _apply(get_pass(name), model, replay_ctx)
        before = model.to_onnx()
    except Exception:
        return None
    try:
        _apply(failing, model, replay_ctx)
    except Exception as again:
        return before if type(again) is type(error) else None
    return None


def _export_or_none(model: CompilationModel) -> onnx.ModelProto | None:
    try:
        return model.to_onnx()
    except Exception:
        return None


def write_reproducer(
    model: onnx.ModelProto | None,
    pass_name: str,
    pipeline: list[str],
    ctx: PassContext,
    dump_dir: Path | None,
    before: bool = True,
) -> Path:
    """Save the model just before a failing pass (``before``) or as the failing pass left it, and the
    pipeline that reproduces the failure; a model that cannot be exported leaves the pipeline only."""

    where = (dump_dir / "reproducer") if dump_dir is not None else Path(tempfile.mkdtemp(prefix="qanac-reproducer-"))
    where.mkdir(parents=True, exist_ok=True)
    file = where / (f"before_{pass_name}.onnx" if before else f"at_failure_{pass_name}.onnx")
    if model is not None:
        save_onnx(model, file)
    start = pipeline.index(pass_name) if pass_name in pipeline else 0
    rest = pipeline[start:]
    approx = "".join(f" --approx {name}" for name in rest if name in ctx.approximations)
    state = (
        "the model just before the failing pass" if before else
        "the model as the failing pass left it (replaying the pipeline from its input did not reproduce the failure)"
    )
    (where / "pipeline.txt").write_text(
        f"failing pass: {pass_name}\n"
        f"full pipeline: {','.join(pipeline)}\n"
        f"model: {file.name if model is not None else '(could not be exported)'}: {state}\n"
        f"reproduce: qanac compile {file} --target {ctx.target} "
        f"--pipeline {','.join(rest)}{approx} --stop-after {pass_name} -o /tmp/qanac-repro --force\n"
    )
    return where


class _OutputChecker:
    """Measures how much a pass changed the model's outputs (with post-processing applied).

    An approximate pass's deviation is measured against ``PipelineReport.float_reference`` (the model
    just before the first approximate pass), so the exact passes' float rounding before it is not
    counted; a verified exact pass is compared with the model just before it.
    """

    def __init__(self, ctx: PassContext, options: PipelineOptions):
        self.ctx = ctx
        self.options = options
        self.samples = None
        if ctx.calibration is not None:
            self.samples = ctx.calibration.take(VERIFY_SAMPLES).arrays
        self.reference: list[np.ndarray] | None = None

    def _outputs(self, proto: onnx.ModelProto) -> list[np.ndarray]:
        assert self.samples is not None
        return apply_post_processing(run_onnx(proto, self.samples), output_names(proto), post_processing_of(proto))

    def check(
        self, info: PassInfo, model: CompilationModel, before: onnx.ModelProto | None, report: PipelineReport
    ) -> float | None:
        wanted = self.options.verify_each or not info.exact
        if not wanted or self.samples is None:
            if not info.exact and self.samples is None:
                raise UsageError(
                    f"approximate pass '{info.name}' needs calibration data to measure its deviation",
                    hint="pass --calib with real samples",
                )
            return None
        assert before is not None  # the pipeline exports it whenever a check is wanted
        try:
            previous = self._outputs(before) if info.exact else None
            current = self._outputs(model.to_onnx())
        except QanacError:
            raise
        except Exception as exc:
            where = write_reproducer(before, info.name, report.pipeline, self.ctx, self.options.dump_dir)
            raise InternalError(
                f"pass '{info.name}' produced a model ONNX Runtime cannot run: {type(exc).__name__}: {exc}",
                hint=f"reproducer written to {where}",
            ) from exc
        if previous is not None:
            violation = max_exact_violation(previous, current)
            if violation is not None:
                where = write_reproducer(before, info.name, report.pipeline, self.ctx, self.options.dump_dir)
                raise InternalError(
                    f"exact pass '{info.name}' changed the outputs: max abs error {violation[0]:.3g} > "
                    f"tolerance {violation[1]:.3g}",
                    hint=f"this is a bug in the pass; reproducer written to {where}",
                )
            return max_abs_difference(previous, current)
        if self.reference is None:
            assert report.float_reference is not None  # set before the first approximate pass ran
            self.reference = self._outputs(report.float_reference)
        deviation = max_abs_difference(self.reference, current)
        limit = self.options.max_deviation
        if limit is not None and deviation > limit:
            raise VerificationError(
                f"approximation '{info.name}' changed the outputs by {deviation:.4g} (max abs) on the "
                f"calibration data, above --max-deviation {limit}",
                hint=f"raise --max-deviation to at least {deviation:.4g}, or do not enable '{info.name}'",
            )
        return deviation


def post_processing_of(proto: onnx.ModelProto) -> list[dict[str, Any]]:
    """The post-processing steps a model exported by ``CompilationModel.to_onnx`` carries."""

    return json.loads(next((p.value for p in proto.metadata_props if p.key == POST_PROCESSING_KEY), "[]"))
