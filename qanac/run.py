"""Inputs for ``qanac run`` and the predictions it prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qanac.bundle import Bundle
from qanac.calibration import IMAGE_SUFFIXES, CalibrationData, check_shape, load_data, load_images
from qanac.diagnostics import UsageError
from qanac.verify import bundle_inputs, bundle_preprocessing


def load_run_inputs(bundle: Bundle, sources: Sequence[str]) -> tuple[CalibrationData, list[str]]:
    """Read one array file or image folder, or several image files; returns the data and a name per sample."""

    specs = bundle_inputs(bundle)
    preprocessing = bundle_preprocessing(bundle)
    if all(Path(s).suffix.lower() in IMAGE_SUFFIXES for s in sources):
        missing = [s for s in sources if not Path(s).is_file()]
        if missing:
            raise UsageError(f"image not found: {missing[0]}")
        if len(specs) != 1:
            raise UsageError("image files can feed only a single-input model")
        raw = load_images([Path(s) for s in sources], specs[0].shape)
        array = preprocessing.apply(raw)
        check_shape(specs[0], array, Path(sources[0]))
        data = CalibrationData(
            arrays={specs[0].name: array},
            source=",".join(sources),
            preprocessing=preprocessing,
            raw={specs[0].name: raw},
        )
        return data, list(sources)
    if len(sources) != 1:
        raise UsageError("give one array file or image folder, or several image files")
    data = load_data(sources[0], specs, preprocessing)
    return data, [f"{sources[0]}[{i}]" for i in range(data.num_samples)]


def predictions(output: np.ndarray, labels: list[str] | None, names: list[str], top: int) -> list[dict[str, Any]]:
    """The ``top`` highest-scoring classes per sample, with their labels when the bundle records them."""

    flat = output.reshape(len(output), -1)
    result = []
    for name, row in zip(names, flat):
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
