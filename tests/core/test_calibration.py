"""Calibration data: formats, preprocessing, shape checks, and random data only on request."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from qanac.calibration import InputSpec, Preprocessing, load_data
from qanac.diagnostics import UsageError

SPEC = [InputSpec("x", (1, 3, 8, 8))]


def test_uint8_npy_is_preprocessed_and_kept_raw(tmp_path):
    raw = np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8)
    np.save(tmp_path / "a.npy", raw)
    pre = Preprocessing(scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    data = load_data(tmp_path / "a.npy", SPEC, pre)
    np.testing.assert_allclose(data.arrays["x"], (raw / 255 - 0.5) / 0.25, rtol=0, atol=1e-6)  # float32
    assert data.raw["x"] is raw or np.array_equal(data.raw["x"], raw)


def test_npz_with_labels_and_names(tmp_path):
    x = np.zeros((4, 3, 8, 8), np.float32)
    np.savez(tmp_path / "a.npz", x=x, labels=np.arange(4))
    data = load_data(tmp_path / "a.npz", SPEC)
    assert data.num_samples == 4 and list(data.labels) == [0, 1, 2, 3]


def test_nhwc_data_gets_a_hint(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(UsageError, match="expects") as excinfo:
        load_data(tmp_path / "a.npy", SPEC)
    assert "NHWC" in excinfo.value.hint


def test_unreadable_and_missing(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(UsageError, match="cannot read"):
        load_data(tmp_path / "bad.npy", SPEC)
    with pytest.raises(UsageError, match="not found"):
        load_data(tmp_path / "missing.npy", SPEC)


def test_image_folder_with_classes(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
    data = load_data(tmp_path, SPEC)
    assert data.arrays["x"].shape == (4, 3, 8, 8)
    assert list(data.labels) == [0, 0, 1, 1]


def test_random_only_when_asked_and_loud():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data("random", SPEC)
    assert data.random and data.describe()["random"] is True
    assert any("RANDOM" in str(w.message) for w in caught)
