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

Labelled data in the HAM10000 layout (``HAM10000_metadata.csv`` with ``lesion_id``, ``image_id`` and ``dx``
columns, ``<image_id>.jpg`` in ``HAM10000_images_part_1/``, ``HAM10000_images_part_2/`` or beside the
metadata) is read by :func:`read_ham10000`. HAM10000 holds several images of one lesion, so its splits are
made by :func:`grouped_stratified_split` over ``lesion_id``: every lesion lands in exactly one split, each
class is divided in the requested proportions, and the same seed gives the same split, so `qanac eval`
scores exactly the test split that training held out.
"""

from __future__ import annotations

import csv
import dataclasses
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qanac.diagnostics import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM10000_METADATA = "HAM10000_metadata.csv"
HAM10000_IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # train, validation, test


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


@dataclasses.dataclass(frozen=True)
class Ham10000:
    """Every image of a HAM10000 directory, in metadata order.

    ``images`` are uint8 NCHW RGB, ``labels`` index :data:`HAM10000_CLASSES`, ``lesion_ids`` name the
    lesion each image shows.
    """

    root: Path
    images: np.ndarray
    labels: np.ndarray
    lesion_ids: tuple[str, ...]

    def split(
        self, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indices of train, validation and test, grouped by lesion and stratified by class."""

        return grouped_stratified_split(self.labels, self.lesion_ids, fractions, seed)


def is_ham10000(path: str | Path) -> bool:
    return (Path(path) / HAM10000_METADATA).is_file()


def read_ham10000_metadata(root: str | Path) -> list[dict[str, str]]:
    path = Path(root) / HAM10000_METADATA
    if not path.is_file():
        raise UsageError(f"{path} not found", hint=f"point at the folder holding {HAM10000_METADATA}")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"lesion_id", "image_id", "dx"} - set(rows[0] if rows else {})
    if missing:
        raise UsageError(f"{path} lacks the columns {sorted(missing)}")
    return rows


def read_ham10000(root: str | Path, size: Sequence[int], cache: bool = True) -> Ham10000:
    """All images of the HAM10000 directory ``root``, resized to ``size`` (height, width).

    With ``cache`` the resized images are stored next to the metadata as ``.qanac_cache_<H>x<W>.npz``
    and reused while the metadata lists the same images in the same order.
    """

    root = Path(root)
    rows = read_ham10000_metadata(root)
    height, width = int(size[0]), int(size[1])
    unknown = sorted({r["dx"] for r in rows} - set(HAM10000_CLASSES))
    if unknown:
        raise UsageError(f"unknown diagnoses in {HAM10000_METADATA}: {unknown}")
    index = {name: i for i, name in enumerate(HAM10000_CLASSES)}
    labels = np.array([index[r["dx"]] for r in rows], dtype=np.int64)
    image_ids = [r["image_id"] for r in rows]

    cache_path = root / f".qanac_cache_{height}x{width}.npz"
    images = None
    if cache and cache_path.is_file():
        with np.load(cache_path, allow_pickle=False) as stored:
            if stored["image_ids"].tolist() == image_ids:
                images = stored["images"]
    if images is None:
        images = load_images([_find_ham10000_image(root, i) for i in image_ids], (1, 3, height, width))
        if cache:
            np.savez(cache_path, images=images, image_ids=np.array(image_ids))
    return Ham10000(root, images, labels, tuple(r["lesion_id"] for r in rows))


def _find_ham10000_image(root: Path, image_id: str) -> Path:
    for folder in (*HAM10000_IMAGE_DIRS, "."):
        path = root / folder / f"{image_id}.jpg"
        if path.is_file():
            return path
    raise UsageError(f"image {image_id}.jpg not found in {', '.join(HAM10000_IMAGE_DIRS)} under {root}")


def grouped_stratified_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[object] | np.ndarray,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train, validation and test such that no group is in two splits.

    A group's class is the most frequent label among its items. Within each class the groups are
    shuffled (seeded) and each goes to the split furthest below its target share of that class's items,
    so every class is divided in ``fractions`` as closely as whole groups allow.
    """

    label_array = np.asarray(labels)
    group_array = np.asarray(groups, dtype=object)
    if len(label_array) != len(group_array):
        raise UsageError(f"{len(label_array)} labels but {len(group_array)} group ids")
    shares = np.asarray(fractions, dtype=np.float64)
    if shares.shape != (3,) or np.any(shares < 0) or not np.isclose(shares.sum(), 1.0):
        raise UsageError(f"split fractions must be three non-negative numbers summing to 1, got {list(shares)}")
    members: dict[object, list[int]] = defaultdict(list)
    for index, group in enumerate(group_array):
        members[group].append(index)
    by_class: dict[int, list[object]] = defaultdict(list)
    for group in sorted(members, key=str):
        votes: Counter[int] = Counter(label_array[members[group]].tolist())
        by_class[votes.most_common(1)[0][0]].append(group)

    rng = np.random.default_rng(seed)
    assignment: list[list[int]] = [[], [], []]
    for label in sorted(by_class):
        class_groups = by_class[label]
        order = rng.permutation(len(class_groups))
        total = sum(len(members[class_groups[i]]) for i in order)
        filled = np.zeros(3)
        for i in order:
            group = class_groups[i]
            deficit = shares * total - filled
            target = int(np.argmax(np.where(shares > 0, deficit, -np.inf)))
            assignment[target].extend(members[group])
            filled[target] += len(members[group])
    train, val, test = (np.sort(np.asarray(a, dtype=np.int64)) for a in assignment)
    return train, val, test


def write_ham10000_fixture(
    root: str | Path,
    images_per_class: int = 6,
    image_size: tuple[int, int] = (48, 36),
    images_per_lesion: int = 2,
    seed: int = 0,
) -> Path:
    """Write a tiny data set in the HAM10000 layout (metadata csv + JPEGs in two part folders).

    Images are random but class-dependent (each class has its own colour and stripe orientation), so a
    model can learn them; lesions hold up to ``images_per_lesion`` images (repeated ``lesion_id``s).
    ``image_size`` is (width, height) like the real 600x450 images.
    """

    from PIL import Image

    root = Path(root)
    for folder in HAM10000_IMAGE_DIRS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = image_size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rows = []
    image_number = 0
    lesion_number = 0
    for label, dx in enumerate(HAM10000_CLASSES):
        colour = np.array([(37 * label) % 200 + 40, (91 * label) % 200 + 40, (53 * label) % 200 + 40], np.float32)
        angle = np.pi * label / len(HAM10000_CLASSES)
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 3.0)
        for k in range(images_per_class):
            if k % images_per_lesion == 0:
                lesion_number += 1
            noise = rng.normal(0, 12, (height, width, 3))
            pixels = colour + 50 * stripes[..., None] + noise
            image_id = f"ISIC_{image_number:07d}"
            path = root / HAM10000_IMAGE_DIRS[image_number % 2] / f"{image_id}.jpg"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=95)
            rows.append({
                "lesion_id": f"HAM_{lesion_number:07d}", "image_id": image_id, "dx": dx, "dx_type": "histo",
                "age": str(30 + k), "sex": "male" if k % 2 else "female", "localization": "back",
            })
            image_number += 1
    with open(root / HAM10000_METADATA, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root
