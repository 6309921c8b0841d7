import csv

import numpy as np
import pytest
import torch

from qanac.calibration import HAM10000_CLASSES, grouped_stratified_split, read_ham10000, write_ham10000_fixture
from qanac.diagnostics import UsageError
from qanac.zoo.data import class_weights, load_digits_splits, load_ham10000, load_image_folder_splits


def test_ham10000_fixture_layout_and_loader(tmp_path):
    root = write_ham10000_fixture(tmp_path / "ham", images_per_class=6)
    rows = list(csv.DictReader(open(root / "HAM10000_metadata.csv")))
    assert len(rows) == 42 and {r["dx"] for r in rows} == set(HAM10000_CLASSES)
    assert len({r["lesion_id"] for r in rows}) < len(rows)  # repeated lesion ids
    assert any((root / "HAM10000_images_part_2").iterdir())
    data = load_ham10000(root, image_size=32, fractions=(0.5, 0.25, 0.25), seed=0)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 7
    lesion_of = {r["image_id"]: r["lesion_id"] for r in rows}
    assert len(data.train) + len(data.val) + len(data.test) == 42
    assert data.info["grouped"] and data.describe()["counts"]["train"]["nv"] > 0
    # the cache is reused
    assert not [p for p in root.rglob("*") if "cache" in p.name]  # the resize cache lives in qanac.cache, not here
    again = load_ham10000(root, image_size=32, fractions=(0.5, 0.25, 0.25), seed=0)
    assert np.array_equal(again.test.images, data.test.images)
    assert lesion_of  # metadata read


def test_ham10000_splits_are_the_compilers_lesion_split(tmp_path):
    root = write_ham10000_fixture(tmp_path / "ham", images_per_class=12)
    data = load_ham10000(root, image_size=16, seed=2, augmentation=None)
    ham = read_ham10000(root, (16, 16))
    expected = grouped_stratified_split(ham.labels, ham.lesion_ids, seed=2)
    for split, indices in zip((data.train, data.val, data.test), expected, strict=True):
        assert np.array_equal(split.images, ham.images[indices])
        assert np.array_equal(split.labels, ham.labels[indices])


def test_ham10000_missing_metadata_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="HAM10000_metadata.csv"):
        load_ham10000(tmp_path)


def test_augmentation_only_on_training_split():
    data = load_digits_splits(16)
    for split in (data.val, data.test):
        assert not split.augment
        image, _ = split[0]
        assert torch.equal(image, torch.from_numpy(split.images[0]).float() / 255)
        assert torch.equal(split[0][0], image)
    assert data.train.augment
    views = torch.stack([data.train[0][0] for _ in range(12)])
    assert len({v.numpy().tobytes() for v in views}) > 1
    assert views.min() >= 0 and views.max() <= 1


def test_digits_are_upsampled_rgb_in_unit_range():
    data = load_digits_splits(32, channels=3)
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0 <= int(label) < 10 and data.num_classes == 10
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert data.preprocessing.scale == pytest.approx(1 / 255)


def test_class_weights_balance_the_loss():
    labels = np.array([0] * 90 + [1] * 10)
    weights = class_weights(labels, 3)
    assert weights[2] == 0 and weights[1] / weights[0] == pytest.approx(9.0)
    per_class_mass = weights[:2] * torch.tensor([90.0, 10.0])
    assert per_class_mass[0] == pytest.approx(per_class_mass[1])


def test_image_folder_loader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    data = load_image_folder_splits(tmp_path, 16, fractions=(0.6, 0.2, 0.2))
    assert data.class_names == ("cat", "dog")
    assert data.input_shape == (3, 16, 16)
    assert len(data.train) == 12 and len(data.val) == 4 and len(data.test) == 4


def test_augmentation_policy_flips_and_jitter():
    from qanac.zoo.data import DIGITS_AUGMENTATION, Augmentation

    image = torch.rand(3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    flips_only = Augmentation(brightness=0.0, contrast=0.0)
    seen = {flips_only.apply(image, generator).numpy().tobytes() for _ in range(40)}
    assert len(seen) == 4  # identity, h, v, both
    assert not DIGITS_AUGMENTATION.hflip and not DIGITS_AUGMENTATION.vflip
    jitter = Augmentation(hflip=False, vflip=False)
    for _ in range(10):
        out = jitter.apply(image, generator)
        assert out.min() >= 0 and out.max() <= 1
        assert torch.allclose(out, image, atol=0.25)


def test_cluttered_digits_are_split_before_rendering():
    from qanac.zoo.data import load_cluttered_digits_splits

    data = load_cluttered_digits_splits(32, renders=1, clutter=3, seed=0)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    again = load_cluttered_digits_splits(32, renders=1, clutter=3, seed=0)
    assert np.array_equal(again.test.images, data.test.images)
    # every image holds its digit (a 16x16 upsampled 8x8 glyph has bright pixels) and some clutter
    assert all(image.max() > 100 for image in data.test.images[:, 0])
