"""Calibration and evaluation data: loading, shape checks and the preprocessing that maps raw images
to what the model takes.

Calibration decides quantization quality, so random data exists only behind an explicit request
(``--calib random``) and is recorded loudly in the manifest.

Accepted sources:
    X.npy            one array, NCHW (float or uint8), for a single-input model
    X.npz            arrays named after the model inputs (or a single array), optional ``labels``
    DIR/             a folder of images (png/jpg/bmp), optionally in one sub-folder per class;
                     resized to the model's input size
    random           uniform random data in the preprocessing range (explicit opt-in only)

Preprocessing: a raw uint8 image ``r`` in NCHW becomes ``(r * scale - mean[c]) / std[c]``. The default
(scale 1/255, mean 0, std 1) maps images to [0, 1]. Arrays that are already float are used as they are.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qanac.diagnostics import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw uint8 NCHW images map to the model input: ``(raw * scale - mean) / std`` per channel."""

    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"

    def apply(self, raw: np.ndarray) -> np.ndarray:
        x = raw.astype(np.float32) * np.float32(self.scale)
        channels = x.shape[1] if x.ndim == 4 else 1
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        if x.ndim == 4:
            mean = np.broadcast_to(mean, (channels,)).reshape(1, channels, 1, 1)
            std = np.broadcast_to(std, (channels,)).reshape(1, channels, 1, 1)
        return ((x - mean) / std).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std), "layout": self.layout}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(
            scale=float(data.get("scale", 1.0 / 255.0)),
            mean=tuple(float(v) for v in data.get("mean", (0.0,))),
            std=tuple(float(v) for v in data.get("std", (1.0,))),
            layout=data.get("layout", "NCHW"),
        )


@dataclasses.dataclass
class CalibrationData:
    """Model-ready float32 arrays by input name, plus where they came from.

    ``raw`` keeps the uint8 images when the source was images (backends that quantize the input,
    such as Akida, want them); ``labels`` are present when the source carried them.
    """

    arrays: dict[str, np.ndarray]
    source: str
    preprocessing: Preprocessing
    random: bool = False
    raw: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self, batch_size: int):
        for start in range(0, self.num_samples, batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.arrays.items()}

    def take(self, n: int) -> "CalibrationData":
        return dataclasses.replace(
            self,
            arrays={k: v[:n] for k, v in self.arrays.items()},
            raw=None if self.raw is None else {k: v[:n] for k, v in self.raw.items()},
            labels=None if self.labels is None else self.labels[:n],
        )

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "num_samples": self.num_samples,
            "random": self.random,
            "preprocessing": self.preprocessing.to_dict(),
        }


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # fixed, batch first (batch may be any size at run time)
    dtype: str = "float32"


def load_data(
    source: str | Path,
    inputs: Sequence[InputSpec],
    preprocessing: Preprocessing | None = None,
    num_random: int = 32,
    seed: int = 0,
) -> CalibrationData:
    """Load data for ``inputs`` from ``source`` and check it against their shapes."""

    preprocessing = preprocessing or Preprocessing()
    if str(source) == "random":
        return _random_data(inputs, preprocessing, num_random, seed)
    path = Path(source)
    if not path.exists():
        raise UsageError(f"data not found: {path}", hint="give a .npy/.npz file, an image folder, or 'random'")
    labels = None
    if path.is_dir():
        if len(inputs) != 1:
            raise UsageError("an image folder can feed only a single-input model")
        raw, labels = load_image_folder(path, inputs[0].shape)
        arrays = {inputs[0].name: raw}
    elif path.suffix == ".npy":
        if len(inputs) != 1:
            raise UsageError(f"{path} holds one array but the model has {len(inputs)} inputs; use .npz")
        arrays = {inputs[0].name: _read_npy(path)}
    elif path.suffix == ".npz":
        arrays, labels = _read_npz(path, inputs)
    else:
        raise UsageError(f"unsupported data file {path}", hint="use .npy, .npz or a folder of images")

    model_ready: dict[str, np.ndarray] = {}
    raw_images: dict[str, np.ndarray] = {}
    for spec in inputs:
        array = arrays[spec.name]
        if array.dtype == np.uint8:
            raw_images[spec.name] = array
            array = preprocessing.apply(array)
        else:
            array = array.astype(np.float32)
        check_shape(spec, array, path)
        model_ready[spec.name] = array
    return CalibrationData(
        arrays=model_ready,
        source=str(path),
        preprocessing=preprocessing,
        raw=raw_images or None,
        labels=labels,
    )


def _random_data(inputs, preprocessing, n, seed) -> CalibrationData:
    warnings.warn(
        "calibrating on RANDOM data: quantization ranges will not match real inputs; "
        "accuracy of the compiled model is unknown. Pass --calib with real samples.",
        stacklevel=2,
    )
    rng = np.random.default_rng(seed)
    raw = {s.name: rng.integers(0, 256, size=(n, *s.shape[1:]), dtype=np.uint8) for s in inputs}
    arrays = {k: preprocessing.apply(v) for k, v in raw.items()}
    return CalibrationData(arrays=arrays, source="random", preprocessing=preprocessing, random=True, raw=raw)


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UsageError(f"cannot read {path} as a NumPy array: {exc}") from exc


def _read_npz(path: Path, inputs: Sequence[InputSpec]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError) as exc:
        raise UsageError(f"cannot read {path} as a NumPy archive: {exc}") from exc
    labels = stored.pop("labels", None)
    if all(spec.name in stored for spec in inputs):
        return {spec.name: stored[spec.name] for spec in inputs}, labels
    if len(inputs) == 1 and len(stored) == 1:
        return {inputs[0].name: next(iter(stored.values()))}, labels
    names = ", ".join(spec.name for spec in inputs)
    raise UsageError(f"{path} has arrays {sorted(stored)}; expected arrays named after the inputs: {names}")


def check_shape(spec: InputSpec, array: np.ndarray, path: Path) -> None:
    expected = tuple(spec.shape[1:])
    if array.ndim != len(spec.shape) or tuple(array.shape[1:]) != expected:
        hint = ""
        if array.ndim == 4 and tuple(array.shape[1:]) == (expected[1], expected[2], expected[0]):
            hint = "the data looks NHWC; transpose it to NCHW (x.transpose(0, 3, 1, 2))"
        raise UsageError(
            f"data from {path} has shape {tuple(array.shape)} but input '{spec.name}' expects "
            f"(N, {', '.join(map(str, expected))})",
            hint=hint,
        )
    if len(array) == 0:
        raise UsageError(f"data from {path} holds no samples")


def load_image_folder(path: Path, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Read images below ``path`` as uint8 NCHW resized to ``shape`` (N, C, H, W).

    Images in sub-folders get integer labels from the sorted sub-folder names.
    """

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {path}")
    classes = sorted({p.parent.relative_to(path).as_posix() for p in files} - {"."})
    labels = None
    if classes:
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index.get(p.parent.relative_to(path).as_posix(), -1) for p in files])
    return load_images(files, shape), labels


def load_images(files: Sequence[Path], shape: Sequence[int]) -> np.ndarray:
    """Read image files as uint8 NCHW resized to ``shape`` (N, C, H, W)."""

    from PIL import Image

    channels, height, width = shape[1], shape[2], shape[3]
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise UsageError(f"images need a 1- or 3-channel input; the model has {channels}")
    images = []
    for file in files:
        try:
            with Image.open(file) as img:
                array = np.asarray(img.convert(mode).resize((width, height), Image.BILINEAR), dtype=np.uint8)
        except OSError as exc:
            raise UsageError(f"cannot read image {file}: {exc}") from exc
        images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    return np.stack(images)
