"""The HAM10000 layout: reading it, the lesion-grouped split, and `qanac eval` scoring its test split
without the zoo."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from qanac.calibration import (
    HAM10000_CLASSES,
    HAM10000_METADATA,
    grouped_stratified_split,
    is_ham10000,
    read_ham10000,
    write_ham10000_fixture,
)
from qanac.cli import cli
from qanac.diagnostics import UsageError
from qanac.metrics import classification_metrics


def _lesion_data(seed=0, lesions_per_class=(60, 30, 12, 8)):
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for label, n in enumerate(lesions_per_class):
        for lesion in range(n):
            for _ in range(rng.integers(1, 4)):  # 1..3 images per lesion, like HAM10000
                labels.append(label)
                groups.append(f"L{label}_{lesion}")
    return np.array(labels), np.array(groups)


def test_no_lesion_in_two_splits_and_every_image_assigned():
    labels, groups = _lesion_data()
    train, val, test = grouped_stratified_split(labels, groups, (0.7, 0.15, 0.15), seed=3)
    sets = [set(groups[s]) for s in (train, val, test)]
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(labels)))


def test_split_is_stratified_by_class():
    labels, groups = _lesion_data()
    splits = grouped_stratified_split(labels, groups, (0.6, 0.2, 0.2), seed=1)
    for label in np.unique(labels):
        total = np.sum(labels == label)
        shares = [np.sum(labels[s] == label) / total for s in splits]
        # whole lesions of at most 3 images: each share within 3 images of its target
        for share, target in zip(shares, (0.6, 0.2, 0.2), strict=True):
            assert abs(share - target) * total <= 3, (label, shares)


def test_split_is_seeded():
    labels, groups = _lesion_data()
    first = grouped_stratified_split(labels, groups, seed=7)
    again = grouped_stratified_split(labels, groups, seed=7)
    other = grouped_stratified_split(labels, groups, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_bad_fractions():
    with pytest.raises(UsageError):
        grouped_stratified_split([0, 1], ["a", "b"], (0.5, 0.5, 0.5))


def test_fixture_layout_and_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("QANAC_CACHE_DIR", str(tmp_path / "cache"))
    root = write_ham10000_fixture(tmp_path / "ham", images_per_class=6)
    files = sorted(root.rglob("*"))
    assert is_ham10000(root) and not is_ham10000(tmp_path)
    with open(root / HAM10000_METADATA, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 42 and {r["dx"] for r in rows} == set(HAM10000_CLASSES)
    assert len({r["lesion_id"] for r in rows}) < len(rows)  # repeated lesion ids
    assert any((root / "HAM10000_images_part_2").iterdir())

    data = read_ham10000(root, (24, 32))
    assert data.images.shape == (42, 3, 24, 32) and data.images.dtype == np.uint8
    assert [HAM10000_CLASSES[i] for i in data.labels] == [r["dx"] for r in rows]
    assert data.lesion_ids == tuple(r["lesion_id"] for r in rows)
    assert sorted(root.rglob("*")) == files  # the cache is qanac's, never in the user's data folder
    assert len(list((tmp_path / "cache" / "ham10000").glob("*.npz"))) == 1
    again = read_ham10000(root, (24, 32))
    assert np.array_equal(again.images, data.images)
    train, val, test = data.split(fractions=(0.5, 0.25, 0.25), seed=0)
    assert len(train) + len(val) + len(test) == 42
    assert not {data.lesion_ids[i] for i in test} & {data.lesion_ids[i] for i in train}


def test_missing_metadata_and_unknown_diagnosis_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="HAM10000_metadata.csv"):
        read_ham10000(tmp_path, (8, 8))
    (tmp_path / HAM10000_METADATA).write_text("lesion_id,image_id,dx\nHAM_1,ISIC_1,flu\n")
    with pytest.raises(UsageError, match="unknown diagnoses"):
        read_ham10000(tmp_path, (8, 8))


def test_labelled_ham10000_loads_without_the_zoo(tmp_path, small_model_path, small_calib_path):
    ham = write_ham10000_fixture(tmp_path / "ham", images_per_class=12)
    bundle = _compile(small_model_path, small_calib_path, tmp_path / "bundle")
    script = textwrap.dedent(f"""
        import sys
        from qanac.bundle import Bundle
        from qanac.evaluate import load_labelled
        labelled = load_labelled(Bundle.open({str(bundle)!r}), {str(ham)!r})
        print(len(labelled.labels), sorted(m for m in sys.modules if m.startswith("qanac.zoo")))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    data = read_ham10000(ham, (8, 8))
    assert run.stdout.split() == [str(len(data.split()[2])), "[]"]


def test_eval_scores_the_lesion_grouped_test_split(tmp_path, small_model_path, small_calib_path):
    ham = write_ham10000_fixture(tmp_path / "ham", images_per_class=12)
    bundle = _compile(small_model_path, small_calib_path, tmp_path / "bundle")
    result = CliRunner().invoke(cli, ["eval", str(bundle), "--data", str(ham), "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (bundle / "eval" / "confusion.png").stat().st_size > 1000
    assert json.loads((bundle / "eval" / "eval.json").read_text()) == report

    data = read_ham10000(ham, (8, 8))
    _, _, test = data.split(seed=1)
    assert report["samples"] == len(test) > 0
    assert report["float"]["class_names"] == list(HAM10000_CLASSES)
    # the float column is the reference model on the preprocessed (x / 255) test images, nothing else
    session = ort.InferenceSession(str(bundle / "reference.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(None, {"x": data.images[test].astype(np.float32) / np.float32(255.0)})[0]
    expected = classification_metrics(data.labels[test], probs.argmax(axis=1), len(HAM10000_CLASSES),
                                      HAM10000_CLASSES)
    assert report["float"]["confusion_matrix"] == expected["confusion_matrix"]
    assert report["float"]["top1"] == pytest.approx(expected["top1"])


def _compile(model, calib, out):
    result = CliRunner().invoke(cli, ["compile", str(model), "--target", "onnxruntime", "--calib", str(calib),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out
