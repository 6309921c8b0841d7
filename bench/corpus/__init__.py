"""The conformance corpus: models nobody on this project wrote, built in code, never downloaded.

Three sources (the registry :data:`CORPUS`, name -> :class:`Entry`):

- ``akida_models``: BrainChip's model zoo (akida_models 1.14.2 builders), saved as shipped: ``.h5``
  with the builder's uint8 input (convtiny_dvs: int8);
- ``tf_keras.applications``: Keras application models (``weights=None``), ``.h5``, float32 input;
- ``torchvision`` / ``timm``: one or more architectures per family (plain, residual, inverted residual,
  squeeze-and-excitation, channel shuffle, grouped and mixed kernels, dense concatenation,
  re-parameterised VGG, conv/attention hybrid), exported to ONNX, float32 input.

Every model has random weights, BatchNorm statistics and a standardised readout set from structured
inputs of its own dtype (:mod:`bench.corpus.data`). :func:`build` writes what a user hands qanac: the
model file, ``calib.npy`` (64 samples, NCHW, the input's dtype) and ``heldout.npz`` (128 other samples,
array ``input``, NCHW).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.corpus.data import structured_inputs, to_nchw
from bench.corpus.keras_models import KERAS_APPLICATIONS, VENDOR_MODELS
from bench.corpus.torch_models import TORCH_MODELS

CALIB_SAMPLES = 64
HELDOUT_SAMPLES = 128
SEED = 0


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    family: str
    source: str  # akida_models | tf_keras.applications | torchvision | timm
    description: str

    @property
    def is_keras(self) -> bool:
        return self.source in ("akida_models", "tf_keras.applications")

    @property
    def is_vendor_zoo(self) -> bool:
        return self.source == "akida_models"


_VENDOR_FAMILIES = {
    "akidanet_imagenet": "separable (AkidaNet)",
    "mobilenet_imagenet": "separable (MobileNet v1)",
    "ds_cnn_kws": "separable (DS-CNN)",
    "vgg_utk_face": "plain, regression",
    "gxnor_mnist": "plain, max pooling",
    "convtiny_dvs": "plain, int8 events",
    "yolo_base": "separable, detection head",
}
_KERAS_FAMILIES = {
    "keras_mobilenet_v2": "inverted residual",
    "keras_mobilenet_v3_small": "inverted residual + SE",
    "keras_resnet50": "residual",
}


CORPUS: dict[str, Entry] = {
    **{name: Entry(name, _VENDOR_FAMILIES[name], "akida_models", spec[2]) for name, spec in VENDOR_MODELS.items()},
    **{name: Entry(name, spec[2], spec[3], spec[4]) for name, spec in TORCH_MODELS.items()},
    **{name: Entry(name, _KERAS_FAMILIES[name], "tf_keras.applications", spec[2])
       for name, spec in KERAS_APPLICATIONS.items()},
}

# the CI-sized slice: small models whose compiles each take well under a minute on 2 cores
SLICES: dict[str, tuple[str, ...]] = {
    "ci": ("gxnor_mnist", "shufflenet_v2"),  # one vendor zoo model (uint8 input), one torchvision family
}


def build(name: str, folder: Path) -> dict[str, Any]:
    """Build ``name`` into ``folder``: the model file, calib.npy, heldout.npz and build.json (returned)."""

    entry = CORPUS[name]
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = dataclasses.asdict(entry)
    if entry.is_keras:
        record.update(_build_keras(name, folder))
    else:
        record.update(_build_torch(name, folder))
    (folder / "build.json").write_text(json.dumps(record, indent=2))
    return record


def _save_data(folder: Path, shape: tuple[int, ...], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    calib = structured_inputs(shape, dtype, CALIB_SAMPLES, SEED + 1)
    heldout = structured_inputs(shape, dtype, HELDOUT_SAMPLES, SEED + 2)
    np.save(folder / "calib.npy", to_nchw(calib))
    np.savez(folder / "heldout.npz", input=to_nchw(heldout))
    return calib, heldout


def _distinct_top1(outputs: np.ndarray) -> int:
    return int(len(np.unique(outputs.reshape(len(outputs), -1).argmax(axis=1))))


def _build_keras(name: str, folder: Path) -> dict[str, Any]:
    from bench.corpus.keras_models import build_keras, input_spec, set_statistics_from_data

    model = build_keras(name, SEED)
    shape, dtype = input_spec(model)
    fit = structured_inputs(shape, dtype, 256, SEED)
    counts = set_statistics_from_data(model, fit)
    _, heldout = _save_data(folder, shape, dtype)
    path = folder / "model.h5"
    model.save(path)
    outputs = model.predict(heldout, verbose=0)
    return {"model_file": path.name, "input_shape": [int(d) for d in to_nchw(heldout[:1]).shape[1:]],
            "input_dtype": dtype, "params": int(model.count_params()), "statistics_set": counts,
            "float_distinct_top1": _distinct_top1(outputs)}


def _build_torch(name: str, folder: Path) -> dict[str, Any]:
    import torch

    from bench.corpus.torch_models import build_torch, export_onnx

    size = TORCH_MODELS[name][1]
    shape = (size, size, 3)
    fit = to_nchw(structured_inputs(shape, "float32", 256, SEED))
    model, counts = build_torch(name, fit, SEED)
    _, heldout = _save_data(folder, shape, "float32")
    path = folder / "model.onnx"
    export_onnx(model, size, path)
    with torch.no_grad():
        outputs = model(torch.from_numpy(to_nchw(heldout))).numpy()
    return {"model_file": path.name, "input_shape": [3, size, size], "input_dtype": "float32",
            "params": int(sum(p.numel() for p in model.parameters())), "statistics_set": counts,
            "float_distinct_top1": _distinct_top1(outputs)}
