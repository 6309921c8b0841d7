"""`qanac zoo`: list, export and train the model zoo (QANA and its device-native variant)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qanac.cli_support import emit_json, handle_errors, json_option, progress_bar
from qanac.diagnostics import UsageError


@click.group("zoo")
def zoo() -> None:
    """Reference models: QANA as published (fixed) and variants that map fully onto Akida v2 and v1."""


@zoo.command("list")
@json_option
@handle_errors
def list_command(as_json: bool) -> None:
    """List zoo models and their variants."""

    from qanac.zoo.registry import list_models

    entries = [e.describe() for e in list_models()]
    if as_json:
        emit_json(entries)
        return
    for entry in entries:
        click.echo(f"{entry['name']}: {entry['description']}")
        click.echo(f"    input {entry['input_shape']}, {entry['num_classes']} classes; variants:")
        for variant, text in entry["variants"].items():
            default = " (default)" if variant == entry["default_variant"] else ""
            click.echo(f"      {variant}{default}: {text}")


def _model_options(fn):
    for option in reversed([
        click.option("--variant", help="Model variant (see `qanac zoo list`)."),
        click.option("--input-size", type=click.IntRange(min=8), help="Square input size (default: the model's)."),
        click.option("--classes", type=click.IntRange(min=2), help="Number of classes (default: the model's)."),
        click.option("--width-mult", type=click.FloatRange(min=0.05), help="Scale every block's width."),
    ]):
        fn = option(fn)
    return fn


def _spec(name: str, variant: str | None, input_size: int | None, classes: int | None, width_mult: float | None):
    from qanac.zoo.registry import resolve_spec

    extra = {"width_mult": width_mult} if width_mult else {}
    return resolve_spec(name, variant, num_classes=classes, input_size=input_size, **extra)


@zoo.command("export")
@click.argument("name")
@_model_options
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path),
              help="A training run directory (config.json + float.pt) whose weights to export.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="ONNX file to write.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@json_option
@handle_errors
def export_command(name: str, variant: str | None, input_size: int | None, classes: int | None,
                   width_mult: float | None, checkpoint: Path | None, output: Path, force: bool, as_json: bool) -> None:
    """Export a zoo model (untrained, or with a run's weights) as ONNX ready for `qanac compile`."""

    import torch

    from qanac.zoo.export import export_onnx
    from qanac.zoo.registry import ModelSpec, build_model

    if output.exists() and not force:
        raise UsageError(f"output {output} already exists", hint="choose another -o or pass --force")
    if checkpoint is not None:
        config = json.loads((checkpoint / "config.json").read_text()) if checkpoint.is_dir() else None
        if config is None:
            raise UsageError(f"{checkpoint} is not a training run directory (no config.json)")
        spec = ModelSpec.from_dict(config["model"])
        model = build_model(spec)
        model.load_state_dict(torch.load(checkpoint / config["files"]["float_state"], map_location="cpu"))
    else:
        spec = _spec(name, variant, input_size, classes, width_mult)
        model = build_model(spec)
    size = spec.kwargs["input_size"]
    shape = (3, size, size) if isinstance(size, int) else (3, *size)
    export_onnx(model, shape, output)
    params = sum(p.numel() for p in model.parameters())
    if as_json:
        emit_json({"output": str(output), "model": spec.to_dict(), "parameters": params})
    else:
        dims = "x".join(map(str, shape))
        click.echo(f"wrote {output}: {spec.name} ({spec.variant}), {params:,} parameters, input 1x{dims}")


@zoo.command("train")
@click.argument("name")
@_model_options
@click.option("--data", required=True, type=click.Path(exists=True, path_type=Path),
              help="HAM10000 directory (HAM10000_metadata.csv + image folders) or an image folder with one "
                   "sub-folder per class.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True, help="Float training epochs.")
@click.option("--qat-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Quantization-aware fine-tuning epochs after float training, with the variant's recipe "
                   "(8-bit as Akida v2; 4-bit as Akida v1 for the v1 variant).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="torch threads; 1 when another job holds a core (two threads then run far slower).")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Run directory to write.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@json_option
@handle_errors
def train_command(name: str, variant: str | None, input_size: int | None, classes: int | None,
                  width_mult: float | None, data: Path, epochs: int, qat_epochs: int, batch_size: int, lr: float,
                  seed: int, threads: int, output: Path, force: bool, as_json: bool) -> None:
    """Train a zoo model with a lesion-grouped, stratified split; early stopping and schedule use the
    validation split only. Writes checkpoint(s), model.onnx (ready for `qanac compile`), calib.npy
    (training images for `qanac compile --calib`), metrics.json."""

    from qanac.bundle import check_output_dir, staged_directory
    from qanac.zoo.registry import qat_config
    from qanac.zoo.train import TrainConfig, train

    check_output_dir(output, force)
    spec = _spec(name, variant, input_size, classes, width_mult)
    splits = _load_splits(data, spec.kwargs["input_size"], seed)
    config = TrainConfig(epochs=epochs, qat_epochs=qat_epochs, batch_size=batch_size, lr=lr, seed=seed,
                         num_threads=threads, qat=qat_config(spec))
    bar = None

    def on_progress(event) -> None:
        nonlocal bar
        if as_json:
            return
        if event.event == "batch":
            if bar is None:
                bar = progress_bar(f"{event.phase} epoch {event.epoch}/{event.epochs}", event.batches)
                bar.__enter__()
            bar.update(1)
        elif event.event == "epoch_end" and bar is not None:
            bar.__exit__(None, None, None)
            bar = None
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in (event.metrics or {}).items() if isinstance(v, float))
            click.echo(f"  {event.phase} epoch {event.epoch}: loss {event.loss:.4f}; validation {metrics}"
                       + (" *" if event.improved else ""), err=True)

    with staged_directory(output, force) as stage:
        result = train(spec, splits, config, out_dir=stage, callback=on_progress)
    if as_json:
        emit_json({"output": str(output), "metrics": result.metrics})
        return
    click.echo(f"run written to {output} (model.onnx, calib.npy, checkpoint, metrics.json)")
    test = result.metrics.get("test", {})
    for key in ("top1", "macro_f1", "balanced_accuracy"):
        if key in test:
            click.echo(f"  test {key}: {test[key]:.4f}")


def _load_splits(data: Path, input_size, seed: int):
    from qanac.calibration import is_ham10000
    from qanac.zoo.data import load_ham10000, load_image_folder_splits

    if is_ham10000(data):
        return load_ham10000(data, image_size=input_size, seed=seed)
    if data.is_dir():
        return load_image_folder_splits(data, image_size=input_size, seed=seed)
    raise UsageError(f"cannot read training data from {data}", hint="give a HAM10000 directory or an image folder")
