"""Data sets for the zoo: HAM10000, image folders and sklearn digits, as torch datasets for training.

Every loader returns :class:`DataSplits`: train / validation / test :class:`ImageDataset` objects over
uint8 NCHW arrays already resized to the model input. A dataset yields float32 CHW tensors in [0, 1]
(``raw / 255``, the compiler's default preprocessing; nothing is normalised, so ``mean = 0`` and
``std = 1`` are recorded) and int64 labels.

Splits are made before anything else touches the data. HAM10000 holds several images of one lesion,
so the split is grouped by ``lesion_id``: every lesion lands in exactly one split. It is stratified by
class (each class's lesions are divided in the requested proportions, counted in images) and seeded.
Reading the HAM10000 layout and the split itself belong to the compiler's data loading
(:mod:`qanac.calibration`), which `qanac eval` uses to score the same test split.
Augmentation (:class:`Augmentation`: random horizontal and vertical flips, brightness and contrast
jitter of at most ``+-10 %``; no flips for digits) is applied on the fly to the training split only;
validation and test images are never altered.

Class imbalance (HAM10000 is 67 % ``nv`` and 1 % ``df``) is handled by a class-weighted cross-entropy
(:func:`class_weights`, computed on the training split only), not by a weighted sampler: a sampler would
show the 80-odd training lesions of ``df`` dozens of times per epoch while dropping most ``nv`` images,
whereas the weighted loss keeps every image once per epoch and leaves the data distribution of
validation and test untouched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from qanac.calibration import (
    DEFAULT_SPLIT_FRACTIONS,
    HAM10000_CLASSES,
    IMAGE_SUFFIXES,
    Preprocessing,
    grouped_stratified_split,
    load_image_folder,
    read_ham10000,
)
from qanac.diagnostics import UsageError


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Random flips and brightness/contrast jitter of at most ``+-brightness`` / ``+-contrast``."""

    hflip: bool = True
    vflip: bool = True
    brightness: float = 0.1
    contrast: float = 0.1

    def apply(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment one float CHW image in [0, 1]; the result stays in [0, 1]."""

        draws = torch.rand(4, generator=generator)
        if self.hflip and draws[0] < 0.5:
            image = image.flip(-1)
        if self.vflip and draws[1] < 0.5:
            image = image.flip(-2)
        brightness = 1.0 + self.brightness * (2 * float(draws[2]) - 1)
        contrast = 1.0 + self.contrast * (2 * float(draws[3]) - 1)
        mean = image.mean()
        return ((image - mean) * contrast + mean * brightness).clamp_(0.0, 1.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DIGITS_AUGMENTATION = Augmentation(hflip=False, vflip=False)


class ImageDataset(Dataset):
    """uint8 NCHW images with integer labels; float CHW in [0, 1] out, augmented if ``augmentation``.

    Augmentation draws from the dataset's own seeded generator; use it with ``num_workers=0``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise UsageError(f"images must be uint8 NCHW, got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise UsageError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.augmentation = augmentation
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def augment(self) -> bool:
        return self.augmentation is not None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(self.images[index]).float().div_(255.0)
        if self.augmentation is not None:
            image = self.augmentation.apply(image, self._generator)
        return image, torch.tensor(self.labels[index])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All images as float32 NCHW in [0, 1] (never augmented) and the labels."""

        return self.images.astype(np.float32) / np.float32(255.0), self.labels


@dataclasses.dataclass
class DataSplits:
    """Train/validation/test datasets, class names, and how the split was made."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    class_names: tuple[str, ...]
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def describe(self) -> dict:
        counts = {}
        for name, split in (("train", self.train), ("val", self.val), ("test", self.test)):
            per_class = np.bincount(split.labels, minlength=self.num_classes)
            counts[name] = {c: int(n) for c, n in zip(self.class_names, per_class, strict=True)}
        return {
            "class_names": list(self.class_names),
            "input_shape": list(self.input_shape),
            "preprocessing": self.preprocessing.to_dict(),
            "counts": counts,
            **self.info,
        }


def class_weights(labels: np.ndarray, num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Cross-entropy class weights ``(n / (k * n_c)) ** power``, normalised to mean 1 over present classes.

    ``power = 1`` is sklearn's "balanced" weighting; ``0.5`` softens it. Absent classes get weight 0.
    """

    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = (counts.sum() / (present.sum() * counts[present])) ** power
    weights[present] /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)


def _make_splits(
    images: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[object] | np.ndarray,
    class_names: Sequence[str],
    fractions: Sequence[float],
    seed: int,
    info: dict,
    augmentation: Augmentation | None,
) -> DataSplits:
    train, val, test = grouped_stratified_split(labels, groups, fractions, seed)
    if len(train) == 0 or len(val) == 0 or len(test) == 0:
        raise UsageError(
            f"the split {list(fractions)} leaves an empty split ({len(train)}/{len(val)}/{len(test)} images)",
            hint="use more data or larger validation/test fractions",
        )
    info = {
        **info,
        "split": {"fractions": list(fractions), "seed": seed, "grouped": info.get("grouped", False)},
        "augmentation": augmentation.to_dict() if augmentation is not None else None,
    }
    return DataSplits(
        train=ImageDataset(images[train], labels[train], augmentation, seed=seed),
        val=ImageDataset(images[val], labels[val]),
        test=ImageDataset(images[test], labels[test]),
        class_names=tuple(class_names),
        info=info,
    )


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def load_ham10000(
    root: str | Path,
    image_size: int | Sequence[int] = 64,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    cache: bool = True,
    augmentation: Augmentation | None = Augmentation(),
) -> DataSplits:
    """HAM10000 from its public layout, resized to ``image_size``, split by lesion (see module doc).

    With ``cache`` the resized images are stored next to the metadata as
    ``.qanac_cache_<H>x<W>.npz`` and reused when the metadata is unchanged.
    """

    data = read_ham10000(root, _pair(image_size), cache)
    return _make_splits(
        data.images, data.labels, data.lesion_ids, HAM10000_CLASSES, fractions, seed,
        {"dataset": "HAM10000", "root": str(data.root), "grouped": True, "group_key": "lesion_id"}, augmentation,
    )


def load_image_folder_splits(
    root: str | Path,
    image_size: int | Sequence[int] = 64,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    augmentation: Augmentation | None = Augmentation(),
) -> DataSplits:
    """An image folder with one sub-folder per class (names sorted = label order), split per image."""

    root = Path(root)
    height, width = _pair(image_size)
    images, labels = load_image_folder(root, (1, 3, height, width))
    if labels is None or np.any(labels < 0):
        raise UsageError(f"{root} must hold one sub-folder per class with the images inside")
    class_names = sorted(
        {p.parent.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    )
    return _make_splits(
        images, labels, np.arange(len(labels)), class_names, fractions, seed,
        {"dataset": "image-folder", "root": str(root)}, augmentation,
    )


def load_digits_splits(
    image_size: int | Sequence[int] = 32,
    channels: int = 3,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    augmentation: Augmentation | None = DIGITS_AUGMENTATION,
) -> DataSplits:
    """sklearn's bundled 8x8 handwritten digits (1797 real images, 10 classes), bilinearly upsampled.

    The default augmentation has no flips: a mirrored 2 or 6 is not a 2 or 6.
    """

    from sklearn.datasets import load_digits

    digits = load_digits()
    height, width = _pair(image_size)
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    large = torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    images = (large.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    images = np.repeat(images, channels, axis=1)
    labels = digits.target.astype(np.int64)
    return _make_splits(
        images, labels, np.arange(len(labels)), [str(d) for d in range(10)], fractions, seed,
        {"dataset": "sklearn-digits"}, augmentation,
    )


def load_cluttered_digits_splits(
    image_size: int = 32,
    digit_size: int = 16,
    clutter: int = 6,
    renders: int = 2,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    channels: int = 3,
    augmentation: Augmentation | None = DIGITS_AUGMENTATION,
) -> DataSplits:
    """Cluttered digits: a harder task where where-to-look matters (the classic attention benchmark).

    sklearn's digits are split first (stratified, seeded); then each digit is drawn ``renders`` times at
    ``digit_size`` pixels and a random place on an ``image_size`` canvas, over ``clutter`` random 8x8
    fragments of other digits *of the same split* (no image content crosses splits). Deterministic for a
    given ``seed``.
    """

    from sklearn.datasets import load_digits

    digits = load_digits()
    source = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    splits = grouped_stratified_split(labels, np.arange(len(labels)), fractions, seed)
    big = torch.nn.functional.interpolate(
        torch.from_numpy(source)[:, None], size=(digit_size, digit_size), mode="bilinear", align_corners=False
    )[:, 0].clamp(0, 1).numpy()
    fragment = max(4, digit_size // 2)
    rng = np.random.default_rng(seed)
    parts = []
    for indices in splits:
        images = np.zeros((len(indices) * renders, image_size, image_size), np.float32)
        for k, index in enumerate(np.repeat(indices, renders)):
            canvas = images[k]
            for other in rng.choice(indices, size=clutter):
                y, x = rng.integers(0, digit_size - fragment + 1, 2)
                top, left = rng.integers(0, image_size - fragment + 1, 2)
                window = canvas[top : top + fragment, left : left + fragment]
                np.maximum(window, big[other, y : y + fragment, x : x + fragment], out=window)
            top, left = rng.integers(0, image_size - digit_size + 1, 2)
            window = canvas[top : top + digit_size, left : left + digit_size]
            np.maximum(window, big[index], out=window)
        parts.append(((images * 255).round().astype(np.uint8), np.repeat(labels[indices], renders)))
    as_nchw = [np.repeat(images[:, None], channels, axis=1) for images, _ in parts]
    return DataSplits(
        train=ImageDataset(as_nchw[0], parts[0][1], augmentation, seed=seed),
        val=ImageDataset(as_nchw[1], parts[1][1]),
        test=ImageDataset(as_nchw[2], parts[2][1]),
        class_names=tuple(str(d) for d in range(10)),
        info={
            "dataset": "cluttered-digits",
            "clutter": clutter,
            "digit_size": digit_size,
            "renders": renders,
            "split": {"fractions": list(fractions), "seed": seed, "grouped": True, "group_key": "source digit"},
            "augmentation": augmentation.to_dict() if augmentation is not None else None,
        },
    )

