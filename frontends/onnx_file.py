"""The ONNX frontend: read a file and fix the input shapes the user gave."""

from __future__ import annotations

from pathlib import Path

import onnx

from qanac.diagnostics import UsageError
from qanac.graph import initializer_names, load_onnx


def load(path: Path, shapes: dict[str, tuple[int, ...]] | tuple[int, ...] | None = None) -> onnx.ModelProto:
    model = load_onnx(path)
    if not model.graph.output:
        raise UsageError(f"{path} has no outputs: there is nothing to compute",
                         hint="export the model with its outputs")
    if shapes is not None:
        fix_input_shapes(model, shapes)
    return model


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | tuple[int, ...]) -> None:
    """Set the dynamic dims of the model's real inputs (``--input-shape``); a static dim the shape
    contradicts is refused."""

    inits = initializer_names(model)
    inputs = [v for v in model.graph.input if v.name not in inits]
    if isinstance(shapes, tuple):
        if len(inputs) != 1:
            raise UsageError(f"the model has {len(inputs)} inputs; --input-shape gives one shape",
                             hint="name them: --input-shape 'x:1,3,64,64;y:1,10'")
        shapes = {inputs[0].name: shapes}
    by_name = {v.name: v for v in inputs}
    for name, shape in shapes.items():
        if name not in by_name:
            raise UsageError(f"--input-shape names '{name}', which is not a model input ({', '.join(by_name)})",
                             hint="name a model input: NAME:1,3,64,64")
        dims = by_name[name].type.tensor_type.shape.dim
        if len(dims) and len(dims) != len(shape):
            raise UsageError(f"input '{name}' has rank {len(dims)} but --input-shape gives {len(shape)} dims",
                             hint=f"give {len(dims)} dims for '{name}'")
        declared = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else "?" for d in dims)
        clashes = [i for i, d in enumerate(declared) if d != "?" and d != shape[i]]
        if clashes:
            raise UsageError(f"input '{name}' is fixed at {declared} but --input-shape gives {tuple(shape)} "
                             f"(dim {clashes[0]})",
                             hint="--input-shape sets dynamic dims ('?') only; keep the fixed ones as they are")
        del dims[:]
        for value in shape:
            dims.add().dim_value = value
    # stale value_info may contradict the new shapes; shape inference recomputes them
    del model.graph.value_info[:]
