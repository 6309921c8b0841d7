"""Seeded structured inputs for the conformance corpus: smooth random fields, not white noise.

White noise makes every conv see nearly the same statistics and gives BatchNorm statistics that no real
input has; smooth fields (a coarse Gaussian grid bilinearly upsampled, plus a little fine noise) have
edges, blobs and varying contrast, so activations spread and predictions differ between samples.
Every array is channels-last (N, H, W, C) or (N, features); ``to_nchw`` gives what qanac reads.
"""

from __future__ import annotations

import numpy as np

# what each dtype's samples span: uint8 images in [0, 255], int8 event counts in [-128, 127],
# float32 images in [0, 1]
_RANGES = {"uint8": (0.0, 255.0), "int8": (-128.0, 127.0), "float32": (0.0, 1.0)}


def structured_inputs(shape: tuple[int, ...], dtype: str, count: int, seed: int) -> np.ndarray:
    """``count`` samples of ``shape`` (without the batch dim, channels last), in ``dtype``'s range.

    Same (shape, dtype, count, seed) -> the same array. Each sample is a smooth field (a 4x4 grid of
    Gaussian values per channel, bilinearly upsampled) plus 10 % fine noise, rescaled per sample to a
    random sub-interval of the dtype's range (so contrast and brightness vary).
    """

    from scipy.ndimage import zoom

    low, high = _RANGES[dtype]
    rng = np.random.default_rng(seed)
    if len(shape) == 3:
        height, width, channels = shape
        coarse = rng.normal(size=(count, 4, 4, channels))
        smooth = zoom(coarse, (1, height / 4, width / 4, 1), order=1, mode="nearest")[:, :height, :width]
    else:
        smooth = rng.normal(size=(count, *shape))
    field = smooth + 0.1 * rng.normal(size=smooth.shape)
    flat = field.reshape(count, -1)
    unit = (flat - flat.min(axis=1, keepdims=True)) / np.ptp(flat, axis=1, keepdims=True)
    start = rng.uniform(0.0, 0.4, size=(count, 1))
    span = rng.uniform(0.6, 1.0, size=(count, 1)) * (1.0 - start)
    values = low + (start + span * unit) * (high - low)
    values = values.reshape(field.shape)
    if dtype == "float32":
        return values.astype(np.float32)
    return np.clip(np.rint(values), low, high).astype(dtype)


def to_nchw(array: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N, C, H, W); other ranks unchanged."""

    return np.ascontiguousarray(array.transpose(0, 3, 1, 2)) if array.ndim == 4 else array
