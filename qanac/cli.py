"""The ``qanac`` command line (click). Each command's docstring is its --help text.

The commands here name no target: a target's own options (``--device`` ...) join ``compile``, ``lint`` and
``run`` from its ``Target.options``, and its own commands (``devices`` ...) and the zoo's join the group
from the registry (``qanac.targets``), so ``qanac --help`` imports no backend.

Exit codes: 0 ok; 1 verification failed; 2 bad usage or unreadable input; 3 model not supported by the
target; 4 internal error (a bug: please report it with the reproducer qanac wrote).
Errors print one line and a hint on stderr (or a JSON object with --json); --debug shows the traceback.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402

from qanac import __version__  # noqa: E402
from qanac.cli_support import (  # noqa: E402
    Interrupted,
    ProgressPrinter,
    RegistryGroup,
    TargetOptionsCommand,
    calibration_warning,
    default_output,
    emit_json,
    exit_if_interrupted,
    handle_errors,
    install_signal_handlers,
    json_option,
    progress_bar,
    target_options,
)
from qanac.diagnostics import EXIT_VERIFY_FAILED, UsageError  # noqa: E402


@click.group(cls=RegistryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qanac")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """qanac: compile convolutional networks for neuromorphic hardware, verified against the float model."""


def _parse_pass_options(values: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    for value in values:
        key, sep, raw = value.partition("=")
        pass_name, dot, option = key.rpartition(".")
        if not sep or not dot:
            raise UsageError(f"cannot parse --pass-option '{value}'", hint="use PASS.OPTION=VALUE")
        try:
            parsed: Any = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw
        options.setdefault(pass_name, {})[option] = parsed
    return options


def _check_pass_options(options: dict[str, dict[str, Any]], pipeline: list[str], target: str,
                        approximations: tuple[str, ...], disabled: tuple[str, ...]) -> None:
    """Every pass a --pass-option names exists, runs in this compile and declares the option."""

    from qanac.registry import get_pass

    for name in options:
        info = get_pass(name)
        if name not in pipeline:
            raise UsageError(f"--pass-option names pass '{name}', which is not in the {target} pipeline",
                             hint="pipeline: " + ",".join(pipeline))
        if name in disabled:
            raise UsageError(f"--pass-option names pass '{name}', which --disable-pass turns off",
                             hint=f"drop --disable-pass {name} or the option")
        if not info.exact and name not in approximations:
            raise UsageError(f"--pass-option names approximate pass '{name}', which runs only when enabled",
                             hint=f"add --approx {name}")
        unknown = sorted(set(options[name]) - set(info.options))
        if unknown:
            raise UsageError(
                f"--pass-option: pass '{name}' has no option '{unknown[0]}'",
                hint=f"options of {name}: {', '.join(info.options)}" if info.options else f"{name} takes no options",
            )


def _parse_floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--{name} takes comma-separated numbers, got '{text}'",
                         hint=f"e.g. --{name} 0.5 or --{name} 0.485,0.456,0.406") from None


@cli.command("compile", cls=TargetOptionsCommand)
@click.argument("source")
@click.option("--target", "-t", required=True, help="Target to compile for (see `qanac targets`).")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Bundle directory to write (default: <source stem>.<target> next to the source).")
@click.option("--calib", help="Calibration data: X.npy, X.npz or an image folder (default: synthetic data, "
              "see docs/cli.md; 'synthetic:METHOD' or 'random' choose it explicitly).")
@click.option("--num-calib", type=click.IntRange(min=1), help="Use only the first N calibration samples.")
@click.option("--input-shape", help="Fix input shapes: 1,3,64,64 or NAME:1,3,64,64;NAME2:... .")
@click.option("--weights", type=click.Path(), help="state_dict for a PyTorch factory source.")
@click.option("--scale", type=float, help="Preprocessing: raw uint8 images are multiplied by this (default 1/255).")
@click.option("--mean", help="Preprocessing: per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406.")
@click.option("--std", help="Preprocessing: per-channel std divided by after the mean.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), help="Text file: one class label per line.")
@click.option("--pipeline", "pipeline_text", help="Comma-separated pass names replacing the target's pipeline.")
@click.option("--disable-pass", multiple=True, help="Skip this pass (repeatable).")
@click.option("--stop-after", help="Run the pipeline up to this pass, write OUTPUT/model.onnx, skip the backend.")
@click.option("--approx", multiple=True, help="Enable an approximate pass (repeatable); always reported.")
@click.option("--max-deviation", type=float, help="Fail (exit 1) if an approximation changes outputs by more.")
@click.option("--no-partition", is_flag=True, help="Refuse (exit 3) instead of running unsupported nodes on the host.")
@click.option("--min-device-share", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="A device segment with a smaller share of the model's MACs runs on the host instead.")
@click.option("--pass-option", multiple=True, help="PASS.OPTION=VALUE setting for a pass (repeatable).")
@click.option("--plugin", multiple=True, type=click.Path(), help="Python file registering extra passes.")
@click.option("--dump-dir", type=click.Path(path_type=Path), help="Write the model after every changing pass.")
@click.option("--time-passes", is_flag=True, help="Print the time spent in each pass.")
@click.option("--verify-each", is_flag=True, help="Check outputs on calibration data after every pass.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@json_option
@handle_errors
def compile_command(source: str, target: str, output: Path | None, calib: str | None, num_calib: int | None,
                    input_shape: str | None, weights: str | None,
                    scale: float | None, mean: str | None, std: str | None, labels: str | None,
                    pipeline_text: str | None, disable_pass: tuple[str, ...], stop_after: str | None,
                    approx: tuple[str, ...], max_deviation: float | None, no_partition: bool,
                    min_device_share: float, pass_option: tuple[str, ...],
                    plugin: tuple[str, ...], dump_dir: Path | None, time_passes: bool, verify_each: bool,
                    force: bool, as_json: bool) -> None:
    """Compile SOURCE (an .onnx file, or a framework model) for a target into a bundle directory.

    Without -o the bundle is written next to SOURCE as <stem>.<target> (model.onnx -> model.akida).
    Without --calib the model is calibrated on synthetic data, with a warning here, in the manifest and
    in every later verify and run: pass --calib with real samples for an accuracy you can trust.
    Options marked with a target's name are that target's own (`qanac targets` lists them).
    """

    from qanac.bundle import check_output_dir
    from qanac.calibration import SYNTHETIC, Preprocessing, read_labels
    from qanac.compiler import CompileRequest, compile_model
    from qanac.pipeline import PipelineOptions, parse_pipeline
    from qanac.progress import Step, listening
    from qanac.registry import load_passes
    from qanac.report import format_compile_result
    from qanac.targets import get_target

    target_info = get_target(target)
    backend_options = target_options([target_info.name])
    output = output if output is not None else default_output(source, target_info.name)
    load_passes(plugin)
    preprocessing = Preprocessing(
        scale=scale if scale is not None else 1.0 / 255.0,
        mean=_parse_floats(mean, "mean") or (0.0,),
        std=_parse_floats(std, "std") or (1.0,),
    )
    preprocessing.check()
    if labels:  # the request carries the names, not the file: keep --force off the folder holding it
        check_output_dir(output, force, [Path(labels)])
    pipeline = parse_pipeline(pipeline_text) if pipeline_text else None
    pass_options = _parse_pass_options(pass_option)
    _check_pass_options(pass_options, pipeline or list(target_info.pipeline), target_info.name, approx, disable_pass)
    request = CompileRequest(
        source=source,
        target=target,
        output=output,
        calibration=calib if calib is not None else SYNTHETIC,
        num_calibration=num_calib,
        input_shape=input_shape,
        weights=weights,
        force=force,
        pipeline=pipeline,
        pipeline_options=PipelineOptions(
            dump_dir=dump_dir,
            time_passes=time_passes,
            verify_each=verify_each,
            disabled=frozenset(disable_pass),
            stop_after=stop_after,
            max_deviation=max_deviation,
        ),
        approximations=frozenset(approx),
        pass_options=pass_options,
        backend_options=backend_options,
        plugins=plugin,
        preprocessing=preprocessing,
        labels=read_labels(labels) if labels else None,
        partition=not no_partition,
        min_device_share=min_device_share,
    )

    printer = ProgressPrinter(as_json)
    sweeps = [0]

    def on_pass(record) -> None:
        if record.iteration > sweeps[0]:
            sweeps[0] = record.iteration
            printer(Step("sweep", f"pipeline sweep {record.iteration}"))
        if not as_json and record.changed:
            counts = ", ".join(f"{k} x{v}" for k, v in record.counts.items())
            click.echo(f"  [{record.iteration}] {record.name}: {counts}", err=True)

    def on_note(text: str) -> None:
        if not as_json:
            click.echo(f"note: {text}", err=True)

    request.progress = printer

    if not as_json:
        click.echo(f"compiling {source} for {target} into {output} ...", err=True)
    with listening(printer):
        result = compile_model(request, on_pass=on_pass, on_note=on_note)
    if not as_json:
        for note in result.manifest.get("source", {}).get("notes", []):
            click.echo(f"note: {note}", err=True)
    if as_json:
        emit_json({"output": str(result.output), "manifest": result.manifest, "report": result.report})
        return
    click.echo(format_compile_result(result, time_passes=time_passes))
    if result.bundle_manifest is not None and result.bundle_manifest.calibration.random:
        real = shlex.join(["qanac", "compile", source, "--target", target, "--calib", "REAL_SAMPLES",
                           "-o", str(output), "--force"])
        click.echo(f"warning: {calibration_warning(result.bundle_manifest.calibration)}\n"
                   f"hint: calibrate on real samples (X.npy, X.npz or an image folder, a few hundred inputs as "
                   f"the model sees them):\n  {real}", err=True)


@cli.command("export")
@click.argument("source")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="ONNX file to write.")
@click.option("--input-shape", help="Input shapes: 1,3,64,64 or NAME:1,3,64,64;... (needed for PyTorch factories).")
@click.option("--weights", type=click.Path(), help="state_dict for a PyTorch factory source.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@json_option
@handle_errors
def export_command(source: str, output: Path, input_shape: str | None, weights: str | None, force: bool,
                   as_json: bool) -> None:
    """Write SOURCE (PyTorch, Keras or ONNX) as a canonical ONNX model, checked against the framework's output."""

    from qanac.bundle import check_output_file
    from qanac.frontends import export_canonical

    if output.exists() and not force:
        raise UsageError(f"output {output} already exists", hint="choose another -o or pass --force")
    check_output_file(output)
    result = export_canonical(source, output, input_shape=input_shape, weights=weights)
    applied = result.report.applied()
    if as_json:
        emit_json({"output": str(result.path), "framework": result.imported.framework, "notes": result.imported.notes,
                   "passes_applied": applied, "seconds": result.seconds, "max_abs_change": result.max_abs_change})
        return
    click.echo(f"wrote {result.path} ({result.imported.framework} model, checked against the framework: "
               f"max abs difference {result.max_abs_change:.3g})")
    for note in result.imported.notes:
        click.echo(f"note: {note}")
    for entry in applied:
        counts = ", ".join(f"{k} x{v}" for k, v in entry["counts"].items())
        click.echo(f"  {entry['pass']}: {counts}")


@cli.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Data to compare on: X.npy, X.npz (optional 'labels') or an image folder.")
@click.option("--min-agreement", type=float, default=0.95, show_default=True, help="Minimum top-1 agreement.")
@click.option("--min-sqnr", type=float, default=15.0, show_default=True, help="Minimum SQNR in dB.")
@click.option("--output-kind", multiple=True, metavar="NAME=KIND",
              help="Compare output NAME as classification, dense or value instead of what its shape says "
                   "(repeatable).")
@json_option
@handle_errors
def verify_command(bundle: Path, data: str, min_agreement: float, min_sqnr: float, output_kind: tuple[str, ...],
                   as_json: bool) -> None:
    """Compare a bundle's compiled model with its float reference on DATA; exit 1 below the thresholds.

    Each output is compared by what it is: classification outputs by top-1 agreement and SQNR, dense ones
    (detection grids, maps) by SQNR with per-cell argmax agreement shown, single values by SQNR. Warnings
    say when the float model's predictions make agreement no evidence (one class for nearly every input,
    or mostly near ties); they leave the exit code alone.
    """

    from qanac.bundle import Bundle
    from qanac.compare import Thresholds
    from qanac.report_html import update_report
    from qanac.verify import compiled_runners, load_bundle_data, parse_output_kinds, verify_bundle

    opened = Bundle.open(bundle)
    warning = _calibration_warning(opened, as_json)
    samples = load_bundle_data(opened, data)
    models = 1 + len(compiled_runners(opened, {}))
    with progress_bar("verifying", samples.num_samples * models, enabled=not as_json) as bar:
        result = verify_bundle(opened, samples, Thresholds(min_agreement, min_sqnr), progress=bar.update,
                               kinds=parse_output_kinds(output_kind))
    note = update_report(opened, "verify", result.to_dict())
    if as_json:
        emit_json({**result.to_dict(), "warnings": [*([warning] if warning else []), *result.warnings]})
    else:
        click.echo(result.format())
    if note:
        click.echo(f"note: {note}", err=True)
    if not result.passed:
        click.get_current_context().exit(EXIT_VERIFY_FAILED)


def _calibration_warning(opened: Any, as_json: bool) -> str | None:
    """The bundle's warning about calibration without real data (None for real data), printed on stderr
    unless --json; verify and run put it in their JSON's ``warnings``."""

    warning = calibration_warning(opened.manifest.calibration)
    if warning and not as_json:
        click.echo(f"warning: {warning}; recompile with --calib and real samples", err=True)
    return warning


@cli.command("run", cls=TargetOptionsCommand)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--input", "inputs", required=True, multiple=True,
              help="X.npy / X.npz, an image folder, or image files (repeatable).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Save the outputs (.npy, or .npz for several).")
@click.option("--top", type=click.IntRange(min=1), default=1, show_default=True, help="Classes to print per sample.")
@json_option
@handle_errors
def run_command(bundle: Path, inputs: tuple[str, ...], output: Path | None, top: int, as_json: bool) -> None:
    """Run a bundle on inputs with its recorded preprocessing; print predictions (with labels if recorded).

    Options marked with a target's name are that target's own: they apply to bundles of that target.
    """

    from qanac.bundle import Bundle
    from qanac.run import check_run_output, load_run_inputs, predictions, save_outputs
    from qanac.verify import run_bundle

    opened = Bundle.open(bundle)
    warning = _calibration_warning(opened, as_json)
    runner_options = target_options([opened.target])
    if output is not None:
        check_run_output(opened, output)
    data, names = load_run_inputs(opened, inputs)
    with progress_bar("running", data.num_samples, enabled=not as_json) as bar:
        outputs = run_bundle(opened, data, runner_options, progress=bar.update)
    if output is not None:
        save_outputs(opened, outputs, output)
    preds = predictions(outputs[0], opened.labels, names, top)
    if as_json:
        emit_json({"predictions": preds, "output_file": str(output) if output else None,
                   "warnings": [warning] if warning else []})
    else:
        for p in preds:
            classes = ", ".join(f"{c['label']} ({c['score']:.4g})" for c in p["top"])
            click.echo(f"{p['input']}: {classes}")


@cli.command("lint", cls=TargetOptionsCommand)
@click.argument("source")
@click.option("--target", "-t", required=True, help="Target whose rules to check (see `qanac targets`).")
@click.option("--input-shape", help="Fix input shapes: 1,3,64,64 or NAME:1,3,64,64;... .")
@click.option("--weights", type=click.Path(), help="state_dict for a PyTorch factory source.")
@click.option("--plugin", multiple=True, type=click.Path(), help="Python file registering extra passes.")
@json_option
@handle_errors
def lint_command(source: str, target: str, input_shape: str | None, weights: str | None, plugin: tuple[str, ...],
                 as_json: bool) -> None:
    """Check SOURCE against every rule of a target and list all problems at once (exit 3 on errors).

    The model is first run through the target's exact pipeline, as `qanac compile` would, so what is
    listed is what legalization could not fix. Each finding names the node (and its layer in the source
    framework), the rule, what the vendor toolchain would do, and the way out. A target with devices also
    checks that the device (`--device`, else its default) can take each layer.
    """

    from qanac.compiler import CompileRequest, lint_for_target, prepare_model
    from qanac.diagnostics import EXIT_UNSUPPORTED, Level, format_grouped
    from qanac.progress import listening
    from qanac.progress import report as report_progress
    from qanac.targets import get_target

    target_info = get_target(target)
    options = target_options([target_info.name])
    device = options.get("device")
    request = CompileRequest(source=source, target=target, output=Path("."), input_shape=input_shape,
                             weights=weights, plugins=plugin, backend_options=options)
    with listening(ProgressPrinter(as_json)):
        prepared = prepare_model(request, calibration=None)
        report_progress("lint", f"checking the {target_info.name} rules")
        findings = lint_for_target(target_info, prepared.model, device, prepared.pipeline)
    errors = sum(1 for f in findings if f.level == Level.ERROR)
    warnings_count = sum(1 for f in findings if f.level == Level.WARNING)
    applied = prepared.pipeline.applied()
    if as_json:
        emit_json({
            "source": source, "target": target, "device": device,
            "errors": errors, "warnings": warnings_count,
            "findings": [f.to_dict() for f in findings],
            "passes_applied": applied,
        })
    else:
        for line in format_grouped(findings):
            click.echo(line)
        if applied:
            rewrites = ", ".join(f"{p['pass']} ({sum(p['counts'].values())})" for p in applied)
            click.echo(f"passes applied before linting: {rewrites}")
        click.echo(f"{errors} error(s), {warnings_count} warning(s) for target {target}"
                   + (f" on {device}" if device else " on its default device" if target_info.device_check else ""))
    if errors:
        click.get_current_context().exit(EXIT_UNSUPPORTED)


@cli.command("rules")
@click.argument("target")
@click.option("--markdown", is_flag=True, help="Print the rule table as Markdown (as in the target's docs page).")
@json_option
@handle_errors
def rules_command(target: str, markdown: bool, as_json: bool) -> None:
    """List the lint rules of TARGET: code, level, what breaks, what the vendor toolchain does, the way out."""

    from qanac.lint import load_rules
    from qanac.report import format_rules_reference
    from qanac.targets import get_target

    rules = load_rules(get_target(target))
    if as_json:
        emit_json([r.to_dict() for r in rules])
    elif markdown:
        click.echo(format_rules_reference(target, rules), nl=False)
    else:
        for rule in rules:
            fixed = f" [fixed by {rule.fixed_by}]" if rule.fixed_by else ""
            click.echo(f"{rule.code} {rule.level.value:<7} {rule.title}{fixed}\n    {rule.consequence}\n"
                       f"    fix: {rule.fix}")


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@json_option
@handle_errors
def inspect_command(model: Path, as_json: bool) -> None:
    """Show a model's inputs and outputs, op histogram, parameter count and MACs per sample."""

    from qanac.graph import load_onnx
    from qanac.model_summary import summarize

    summary = summarize(load_onnx(model))
    if as_json:
        emit_json(summary.to_dict())
    else:
        click.echo(summary.format())


@cli.command("passes")
@click.option("--plugin", multiple=True, type=click.Path(), help="Python file registering extra passes.")
@click.option("--target", help="Show only passes serving this target, in its pipeline order first.")
@click.option("--markdown", is_flag=True, help="Print the pass reference as Markdown (docs/passes.md).")
@json_option
@handle_errors
def passes_command(plugin: tuple[str, ...], target: str | None, markdown: bool, as_json: bool) -> None:
    """List the registered passes (built-in, entry points, plugins) with their documentation."""

    from qanac.registry import all_passes, load_passes
    from qanac.targets import get_target

    load_passes(plugin)
    infos = all_passes()
    if target is not None:
        infos = [p for p in infos if p.serves(target)]
        pipeline = get_target(target).pipeline
        infos.sort(key=lambda p: pipeline.index(p.name) if p.name in pipeline else len(pipeline))
    if as_json:
        emit_json([p.to_dict() for p in infos])
        return
    if markdown:
        from qanac.report import format_pass_reference

        click.echo(format_pass_reference(infos), nl=False)
        return
    for p in infos:
        kind = "exact" if p.exact else "approximate (opt-in)"
        click.echo(f"{p.name}  [{kind}; targets: {', '.join(sorted(p.targets))}]")
        click.echo(f"    {p.summary}")
        if p.options:
            click.echo(f"    options: {', '.join(p.options)} (--pass-option {p.name}.KEY=VALUE)")
        click.echo(f"    from {p.origin}")


@cli.command("targets")
@json_option
@handle_errors
def targets_command(as_json: bool) -> None:
    """List the registered targets: pipeline, command-line options and commands of each."""

    from qanac.targets import all_targets

    if as_json:
        emit_json([t.to_dict() for t in all_targets().values()])
        return
    for t in all_targets().values():
        click.echo(f"{t.name}: {t.description}\n    pipeline: {','.join(t.pipeline)}")
        for option in t.options:
            click.echo(f"    option {option.flag} ({', '.join(option.commands)}): {option.help}")
        if t.commands:
            click.echo(f"    commands: {', '.join(sorted(t.commands))}")


@cli.command("eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, path_type=Path),
              help="Labelled data: .npz with 'labels', an image folder with a sub-folder per class, or a "
                   "HAM10000 directory (its lesion-grouped test split).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Where to write eval.json and confusion.png "
              "(default: BUNDLE/eval).")
@click.option("--recall-drop", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Flag classes whose recall drops by more than this after compilation.")
@click.option("--seed", type=int, default=0, show_default=True, help="HAM10000 split seed (as in training).")
@json_option
@handle_errors
def eval_command(bundle: Path, data: Path, output: Path | None, recall_drop: float, seed: int, as_json: bool) -> None:
    """Classification quality of a bundle: float reference and compiled model side by side (top-1, macro-F1,
    balanced accuracy, per-class precision/recall/F1, confusion matrices as JSON and PNG)."""

    from qanac.bundle import Bundle, prepare_directory
    from qanac.evaluate import evaluate_bundle, format_evaluation, load_labelled
    from qanac.report_html import update_report

    opened = Bundle.open(bundle)
    _calibration_warning(opened, as_json)  # with --json the document is eval.json as written: no warnings key
    out_dir = output or bundle / "eval"
    labelled = load_labelled(opened, data, seed)
    prepare_directory(out_dir, "-o")
    with progress_bar("evaluating", 2 * len(labelled.labels), enabled=not as_json) as bar:
        result = evaluate_bundle(opened, labelled, out_dir, recall_drop, progress=bar.update)
    note = update_report(opened, "eval", result)
    if as_json:
        emit_json(result)
    else:
        click.echo(format_evaluation(result))
    if note:
        click.echo(f"note: {note}", err=True)


@cli.command("report")
@click.argument("bundle", type=click.Path(path_type=Path))
@json_option
@handle_errors
def report_command(bundle: Path, as_json: bool) -> None:
    """Write BUNDLE/report.html again: the model graph coloured by where each layer runs, the segments and
    transfers, the passes, the diagnostics, and the last verify and eval results. Self-contained: open it in
    any browser, offline."""

    from qanac.bundle import Bundle
    from qanac.report_html import write_report

    path = write_report(Bundle.open(bundle).path)
    if as_json:
        emit_json({"report": str(path)})
    else:
        click.echo(f"wrote {path}")


def main() -> None:
    install_signal_handlers()
    try:
        cli(prog_name="qanac")
    except Interrupted as exc:  # arrived outside a command's error handling
        exit_if_interrupted(exc.exit_code)
    except SystemExit as exc:
        exit_if_interrupted(exc.code)
        raise


if __name__ == "__main__":
    main()
