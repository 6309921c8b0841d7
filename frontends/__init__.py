"""Frontends (import name ``qanac.frontends``): turn what the user has into an ONNX ModelProto.

``import_model`` dispatches on the source:
    model.onnx                       the ONNX frontend (``onnx_file``)
    pkg.module:factory, file.py:f    PyTorch module factory (``torch``), optional ``weights`` state_dict
    model.pt, model.ts, model.pt2    TorchScript archive or torch.export program (``torch``)
    model.keras, model.h5, DIR/      Keras 2 (tf_keras) or 3, or a TensorFlow SavedModel (``keras``)
Every frontend returns fixed input shapes (the batch may stay dynamic), NCHW image inputs, and, where it
knows them, the framework's names for the ONNX nodes (model metadata ``qanac.source_names``). Framework
frontends check the ONNX export against the framework's own output before returning.

``export_canonical`` is ``qanac export``: import, run the exact CANONICALIZE pipeline, write the ONNX file.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnx

from qanac.atomic import replaced_atomically
from qanac.diagnostics import InternalError, UsageError
from qanac.frontends import onnx_file

if TYPE_CHECKING:  # the pipeline loads passes; import it only when exporting
    from qanac.pipeline import PipelineReport


@dataclasses.dataclass
class ImportedModel:
    """An imported model and what the user should know about the import.

    ``original_layout`` names the inputs whose layout the frontend changed, with the layout the framework
    model took (``{"image": "NHWC"}`` for a Keras image model, which qanac feeds NCHW). ``notes`` are
    sentences for the user (a layout change, a batch dimension that had to be fixed).
    """

    model: onnx.ModelProto
    framework: str  # "onnx", "torch", "keras"
    source: str
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    original_layout: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ExportResult:
    """What ``export_canonical`` wrote: the file, the import, the pipeline's report and timings."""

    path: Path
    imported: ImportedModel
    report: PipelineReport
    seconds: dict[str, float]
    max_abs_change: float


def parse_input_shapes(text: str | None) -> dict[str, tuple[int, ...]] | tuple[int, ...] | None:
    """``1,3,64,64`` (the single input) or ``x:1,3,64,64;y:1,10`` (by name)."""

    if not text:
        return None
    try:
        if ":" not in text:
            shapes: dict[str, tuple[int, ...]] | tuple[int, ...] = tuple(int(v) for v in text.split(","))
        else:
            shapes = {}
            for part in text.split(";"):
                name, _, dims = part.rpartition(":")
                shapes[name.strip()] = tuple(int(v) for v in dims.split(","))
    except ValueError:
        raise UsageError(f"cannot parse --input-shape '{text}'", hint="use 1,3,64,64 or name:1,3,64,64") from None
    for dims in shapes.values() if isinstance(shapes, dict) else [shapes]:
        if any(d <= 0 for d in dims):
            raise UsageError(f"--input-shape '{text}' has a dim that is not positive",
                             hint="every dim is a size of at least 1, e.g. 1,3,64,64")
    return shapes


def import_model(source: str, input_shape: str | None = None, weights: str | None = None) -> ImportedModel:
    """Import ``source`` (see the module docstring) with the shapes of ``input_shape`` (``--input-shape``)."""

    started = time.perf_counter()
    shapes = parse_input_shapes(input_shape)
    path = Path(source)
    from qanac.frontends import keras as keras_frontend
    from qanac.frontends import torch as torch_frontend

    if weights is not None and not torch_frontend.is_factory(source):
        raise UsageError(
            "--weights applies to a PyTorch module factory (pkg.module:factory) only",
            hint="ONNX, TorchScript, torch.export and Keras files carry their weights",
        )
    if path.exists() and not path.is_dir() and not path.is_file():  # reading a FIFO or device may block forever
        raise UsageError(f"{source} is not a regular file (a FIFO, socket or device)",
                         hint="give a model file, a SavedModel directory, or pkg.module:factory")
    if torch_frontend.is_factory(source) or path.suffix in torch_frontend.SUFFIXES:
        model, notes = torch_frontend.load(source, shapes, weights)
        return ImportedModel(model, "torch", source, time.perf_counter() - started, notes)
    if path.suffix in keras_frontend.SUFFIXES or path.is_dir():
        model, notes = keras_frontend.load(path, shapes)
        layouts = {name: "NHWC" for name in _image_inputs(model)}
        return ImportedModel(model, "keras", source, time.perf_counter() - started, notes, layouts)
    if path.suffix == ".onnx" or path.is_file():
        model = onnx_file.load(path, shapes)
        return ImportedModel(model, "onnx", source, time.perf_counter() - started)
    if not path.exists() and ":" not in source:
        raise UsageError(f"model not found: {source}", hint="check the path, or give pkg.module:factory")
    raise UsageError(
        f"cannot tell what kind of model '{source}' is",
        hint="give an .onnx, .pt, .ts, .pt2, .keras or .h5 file, a SavedModel directory, or pkg.module:factory",
    )


def _image_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [
        i.name for i in model.graph.input if i.name not in inits and len(i.type.tensor_type.shape.dim) == 4
    ]


def export_canonical(
    source: str,
    output_path: str | Path,
    input_shape: str | None = None,
    weights: str | None = None,
    pipeline: Sequence[str] | None = None,
) -> ExportResult:
    """Import ``source``, run the exact canonicalization passes (or ``pipeline``) for the onnxruntime target,
    check the result against the imported model on a sample, and write it to ``output_path`` atomically
    (a temporary file in the same directory, renamed into place; nothing is written on failure).

    The default pipeline is CANONICALIZE without strip-trailing-softmax: an exported file stands alone, so
    its outputs must mean what the source model's outputs meant. (A given ``pipeline`` that strips a
    Softmax records it in the model's metadata ``qanac.post_processing``; ``imported.notes`` says so.)
    """

    from qanac.graph import POST_PROCESSING_KEY, CompilationModel
    from qanac.pipeline import PassContext, run_pipeline
    from qanac.registry import load_passes
    from qanac.targets import CANONICALIZE

    output_path = Path(output_path)
    if output_path.is_dir():
        raise UsageError(f"output {output_path} is a directory", hint="give a file name such as model.onnx")
    if not output_path.parent.exists():
        raise UsageError(f"output directory {output_path.parent} does not exist",
                         hint=f"create {output_path.parent} first")
    imported = import_model(source, input_shape, weights)
    load_passes()
    started = time.perf_counter()
    model = CompilationModel.from_onnx(imported.model)
    names = list(pipeline) if pipeline else [p for p in CANONICALIZE if p != "strip-trailing-softmax"]
    report = run_pipeline(model, names, PassContext(target="onnxruntime"))
    canonical = model.to_onnx()
    seconds = {"import": imported.seconds, "pipeline": time.perf_counter() - started}
    change = _check_canonical(imported.model, canonical, model.post_processing)
    for step in model.post_processing:
        imported.notes.append(
            f"the model's final {step.get('op', 'step')} was moved out of the graph into host post-processing "
            f"(metadata '{POST_PROCESSING_KEY}'); the written model's outputs are the values before it"
        )
    _write_atomically(canonical, output_path)
    return ExportResult(output_path, imported, report, seconds, change)


def _check_canonical(imported: onnx.ModelProto, canonical: onnx.ModelProto, post_processing: list) -> float:
    """Max abs output change from canonicalization on one random sample, with the post-processing the
    pipeline recorded applied; an exact pipeline must not change outputs beyond float rounding
    (InternalError otherwise: a bug in a pass)."""

    from qanac.calibration import check_size
    from qanac.compare import max_abs_difference, max_exact_violation
    from qanac.execution import apply_post_processing, run_onnx
    from qanac.graph import input_specs, output_names

    rng = np.random.default_rng(0)
    specs = input_specs(imported)
    for spec in specs:
        check_size(spec, 2)
    feeds = {spec.name: rng.standard_normal((2, *spec.shape[1:])).astype(spec.dtype) for spec in specs}
    before = run_onnx(imported, feeds)
    after = apply_post_processing(run_onnx(canonical, feeds), output_names(canonical), post_processing)
    after = [a.reshape(b.shape) if a.size == b.size else a for b, a in zip(before, after, strict=False)]
    violation = max_exact_violation(before, after)
    if violation is not None:
        raise InternalError(
            f"canonicalization changed the model's outputs: max abs error {violation[0]:.3g} > "
            f"tolerance {violation[1]:.3g}",
            hint="rerun with `qanac compile --verify-each` to find the pass, and report the bug",
        )
    return max_abs_difference(before, after)


def _write_atomically(model: onnx.ModelProto, path: Path) -> None:
    with replaced_atomically(path) as stream:
        stream.write(model.SerializeToString())  # a stream onnx.save cannot name (its ``name`` is the fd)
