"""Inputs for ``qanac run`` and the predictions it prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qanac.atomic import replaced_atomically
from qanac.bundle import Bundle, check_output_file
from qanac.calibration import IMAGE_SUFFIXES, CalibrationData, load_data, load_images, prepare_array
from qanac.diagnostics import UsageError
from qanac.verify import bundle_inputs, bundle_preprocessing


def load_run_inputs(bundle: Bundle, sources: Sequence[str]) -> tuple[CalibrationData, list[str]]:
    """Read one array file or image folder, or several image files; returns the data and a name per sample."""

    specs = bundle_inputs(bundle)
    preprocessing = bundle_preprocessing(bundle)
    if all(Path(s).suffix.lower() in IMAGE_SUFFIXES for s in sources):
        missing = [s for s in sources if not Path(s).exists()]
        if missing:
            raise UsageError(f"image not found: {missing[0]}", hint="check the path of the image")
        if len(specs) != 1:
            raise UsageError("image files can feed only a single-input model",
                             hint="give an .npz with one array per input, named after it")
        source = ",".join(sources)
        array, raw = prepare_array(specs[0], load_images([Path(s) for s in sources], specs[0]), source,
                                   preprocessing)
        data = CalibrationData(arrays={specs[0].name: array}, source=source, preprocessing=preprocessing,
                               raw=None if raw is None else {specs[0].name: raw})
        return data, list(sources)
    if len(sources) != 1:
        raise UsageError(f"{len(sources)} --input values that are not all image files",
                         hint="give one array file or image folder, or several image files")
    data = load_data(sources[0], specs, preprocessing)
    return data, [f"{sources[0]}[{i}]" for i in range(data.num_samples)]


def check_run_output(bundle: Bundle, output: Path) -> None:
    """Before running: ``-o`` can be written, ends in .npy (a bundle of one output) or .npz."""

    check_output_file(output, (".npy", ".npz"))
    if output.suffix == ".npy" and len(bundle.output_names) != 1:
        raise UsageError(f"the bundle has {len(bundle.output_names)} outputs; -o {output} holds one array",
                         hint=f"use -o {output.with_suffix('.npz')}")


def save_outputs(bundle: Bundle, outputs: list[np.ndarray], output: Path) -> None:
    """Write the outputs to ``output`` (.npy: the one output; .npz: one array per output name) atomically."""

    with replaced_atomically(output) as stream:
        if output.suffix == ".npy":
            np.save(stream, outputs[0])
        else:
            np.savez(stream, **dict(zip(bundle.output_names, outputs, strict=True)))


def predictions(output: np.ndarray, labels: list[str] | None, names: list[str], top: int) -> list[dict[str, Any]]:
    """The ``top`` highest-scoring classes per sample, with their labels when the bundle records them."""

    flat = output.reshape(len(output), -1)
    result = []
    for name, row in zip(names, flat, strict=True):
        order = np.argsort(-row)[:top]
        result.append(
            {
                "input": name,
                "top": [
                    {
                        "class": int(c),
                        "label": labels[c] if labels and c < len(labels) else str(int(c)),
                        "score": float(row[c]),
                    }
                    for c in order
                ],
            }
        )
    return result
