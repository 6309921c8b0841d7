"""`qanac learn` on sklearn digits: a CNN trained on 7 classes, compiled --learnable for an IP v2 device and for
AKD1000 (IP v1), learns 3 new classes from 10 samples each; scored on held-out digits neither training nor
learning saw. New classes reach 70 %, the 7 known classes lose at most 3 points, the learned bundle verifies
against its float reference and learns again. The statistics, head quantization and label mapping are checked
without the vendor stack."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qanac.cli import cli
from qanac.diagnostics import UsageError
from tests.akida import v1_models

BASE, NEW, SHOTS = 7, (7, 8, 9), 10
MIN_NEW_ACCURACY = 0.70
MAX_OLD_LOSS = 0.03


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def accuracy(bundle_path, data):
    from qanac.bundle import Bundle
    from qanac.verify import load_bundle_data, run_bundle

    bundle = Bundle.open(bundle_path)
    labels = np.load(data)["labels"]
    predicted = run_bundle(bundle, load_bundle_data(bundle, data))[0].argmax(1)
    old = labels < BASE
    return float((predicted[old] == labels[old]).mean()), float((predicted[~old] == labels[~old]).mean())


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The 7-class model, labelled calibration samples of the 7 classes, 10 shots of each new class (all from the
    training split) and the held-out split."""

    root = tmp_path_factory.mktemp("digits")
    x_train, y_train, x_test, y_test = v1_models.digits_splits()
    base = y_train < BASE
    onnx.save(v1_models.train_digits_cnn(x_train[base], y_train[base], epochs=10, classes=BASE),
              str(root / "digits7.onnx"))
    np.savez(root / "calib.npz", input=x_train[base][:512], labels=y_train[base][:512])
    rng = np.random.default_rng(0)
    shots = np.concatenate([rng.choice(np.flatnonzero(y_train == c), SHOTS, replace=False) for c in NEW])
    np.savez(root / "shots.npz", input=x_train[shots], labels=y_train[shots])
    np.savez(root / "heldout.npz", input=x_test, labels=y_test)
    return root


def compile_learnable(digits, device):
    out = digits / f"learnable-{device}"
    if not out.exists():
        result = invoke("compile", digits / "digits7.onnx", "--target", "akida", "--device", device, "--calib",
                        digits / "calib.npz", "--learnable", "-o", out)
        assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
@pytest.mark.parametrize("device", ["SixNodesIPv2", "AKD1000"])
def test_learns_three_new_classes_from_ten_shots(digits, device):
    bundle = compile_learnable(digits, device)
    old_before, _ = accuracy(bundle, digits / "heldout.npz")
    learned = digits / f"learned-{device}"
    result = invoke("learn", bundle, "--data", digits / "shots.npz", "-o", learned)
    assert result.exit_code == 0, result.output

    old_after, new = accuracy(learned, digits / "heldout.npz")
    assert new >= MIN_NEW_ACCURACY, (old_before, old_after, new)
    assert old_after >= old_before - MAX_OLD_LOSS, (old_before, old_after, new)

    manifest = json.loads((learned / "manifest.json").read_text())
    assert manifest["labels"] == [str(k) for k in range(10)]
    assert manifest["outputs"][0]["shape"][-1] == 10
    segment = manifest["segments"][0]
    learning = segment["backend"]["learning"]
    assert learning["method"] == ("akida-unsupervised" if device == "AKD1000" else "discriminant-head")
    assert [c["samples"] for c in learning["classes"][BASE:]] == [SHOTS] * 3
    assert sum(c["samples"] for c in learning["classes"][:BASE]) == 512
    assert learning["steps"][-1] == {"data": str(digits / "shots.npz"), "samples": 30, "added": ["7", "8", "9"],
                                     "refined": []}
    assert segment["variants"] == [] and "quantized" not in manifest["files"]

    verified = invoke("verify", learned, "--data", digits / "heldout.npz")
    assert verified.exit_code == 0, verified.output
    evaluated = invoke("eval", learned, "--data", digits / "heldout.npz", "--json")
    assert evaluated.exit_code == 0, evaluated.output


@pytest.mark.slow
def test_akd1000_learnable_bundle_maps_its_learning_layer_on_hardware(digits):
    bundle = compile_learnable(digits, "AKD1000")
    manifest = json.loads((bundle / "manifest.json").read_text())
    record = manifest["segments"][0]["backend"]
    assert record["learning"]["neurons_per_class"] == 10
    assert record["akida_output_shape"] == [1, 1, BASE * 10]
    assert manifest["partition"]["device_mac_share"] == 1.0
    report = json.loads((bundle / "report.json").read_text())
    layers = report["segments"][0]["backend"]["mapping"]["layers"]
    assert layers[-1]["type"] == "FullyConnected" and layers[-1]["backend"] == "Hardware"
    assert report["segments"][0]["backend"]["learning"]["float_spike_agreement"] > 0.9


@pytest.mark.slow
def test_a_learned_bundle_learns_again_from_an_image_folder(digits, tmp_path):
    from PIL import Image

    learned = digits / "learned-again-source"
    result = invoke("learn", compile_learnable(digits, "SixNodesIPv2"), "--data", digits / "shots.npz", "-o",
                    learned)
    assert result.exit_code == 0, result.output
    x_train, y_train, _, _ = v1_models.digits_splits()
    folder = tmp_path / "images"
    for name, digit in (("8", 8), ("eight-again", 8)):
        (folder / name).mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(y_train == digit)[20:25]):
            Image.fromarray((x_train[index, 0] * 255).astype(np.uint8)).save(folder / name / f"{i}.png")
    again = tmp_path / "again"
    result = invoke("learn", learned, "--data", folder, "-o", again, "--json")
    assert result.exit_code == 0, result.output
    step = json.loads(result.output)["step"]
    assert (step["added"], step["refined"], step["samples"]) == (["eight-again"], ["8"], 10)
    manifest = json.loads((again / "manifest.json").read_text())
    assert manifest["labels"][-2:] == ["9", "eight-again"]
    counts = {c["label"]: c["samples"] for c in manifest["segments"][0]["backend"]["learning"]["classes"]}
    assert (counts["8"], counts["eight-again"]) == (SHOTS + 5, 5)
    assert len(manifest["segments"][0]["backend"]["learning"]["steps"]) == 3
    assert invoke("verify", again, "--data", digits / "heldout.npz", "--min-agreement", "0.9").exit_code == 0


@pytest.mark.slow
def test_learning_refuses_a_bundle_compiled_without_learnable(digits, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(compile_learnable(digits, "SixNodesIPv2"), plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest["segments"][0]["backend"]["learning"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("learn", plain, "--data", digits / "shots.npz", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "--learnable" in result.output
    assert not (tmp_path / "out").exists()


# -- without the vendor stack ---------------------------------------------------------------------------------


def test_statistics_merged_in_steps_equal_those_of_all_samples():
    from qanac.backends.akida.learning import FeatureStatistics

    rng = np.random.default_rng(0)
    features, classes = rng.normal(size=(90, 6)), np.repeat([0, 1, 2], 30)
    whole = FeatureStatistics.empty(6, np.ones(1))
    whole.add(features, classes)
    parts = FeatureStatistics.empty(6, np.ones(1))
    parts.add(features[classes < 2], classes[classes < 2])
    parts.add(features[::2], classes[::2])
    parts.add(features[1::2], classes[1::2])
    twice = FeatureStatistics.empty(6, np.ones(1))
    twice.add(features[classes < 2], classes[classes < 2])
    twice.add(features[classes == 2], classes[classes == 2])
    np.testing.assert_allclose(twice.means, whole.means)
    np.testing.assert_allclose(twice.scatter, whole.scatter, atol=1e-9)
    np.testing.assert_array_equal(parts.counts, [60, 60, 30])  # classes 0 and 1 were added twice


def test_the_quantized_head_keeps_the_float_head_decisions():
    from qanac.backends.akida.learning import quantize_head

    rng = np.random.default_rng(1)
    weights, bias = rng.normal(size=(64, 5)) * 0.01, rng.normal(size=5) * 3
    levels = rng.integers(0, 128, size=(200, 64)).astype(np.float64)
    head = quantize_head(weights, bias)
    assert head["weights"].dtype == np.int8 and head["bias"].dtype == np.int8 and head["bias_shift"].dtype == np.uint8
    quantized = (levels @ head["weights"] + head["bias"] * 2.0 ** head["bias_shift"]) * head["scales"]
    exact = levels @ weights + bias
    assert np.abs(quantized - exact).max() < 0.02 * np.abs(exact).max()
    assert (quantized.argmax(1) == exact.argmax(1)).mean() >= 0.97


def test_labels_map_onto_known_and_new_classes():
    from qanac.backends.akida.learning import class_indices, new_class_names

    names = ["cat", "dog"]
    classes, added = new_class_names(names, np.array([0, 1, 1, 2]), ["bird", "dog", "fox"])
    assert classes.tolist() == [2, 1, 1, 3] and added == ["bird", "fox"]
    classes, added = new_class_names(names, np.array([1, 2, 3, 3]), None)
    assert classes.tolist() == [1, 2, 3, 3] and added == ["2", "3"]
    with pytest.raises(UsageError, match="without gaps"):
        new_class_names(names, np.array([0, 3]), None)
    with pytest.raises(UsageError, match="label"):
        class_indices(None, 2, "calib.npy")
    with pytest.raises(UsageError, match="missing \\[1\\]"):
        class_indices(np.array([0, 0, 2]), 3, "calib.npz")


def test_the_float_reference_carries_the_learned_head_and_a_second_head_replaces_it():
    from qanac.backends.akida.learning import float_classifier_input, reference_with_head
    from qanac.execution import run_onnx

    model = v1_models.sequential_cnn()  # ReLU6 > GlobalAveragePool > Flatten > Gemm: the head reads an NCHW map
    x = v1_models.random_images((3, 16, 16), 8)
    features = float_classifier_input(model, {"input": x})
    rng = np.random.default_rng(2)
    binary = rng.integers(0, 2, size=(features.shape[1], 6)).astype(np.float64)
    learned = reference_with_head(model, binary, np.zeros(6), spike_threshold=0.5, neurons_per_class=2)
    expected = ((features >= 0.5) @ binary).reshape(8, 3, 2).max(-1)
    np.testing.assert_allclose(run_onnx(learned, {"input": x})[0], expected, atol=1e-5)

    weights, bias = rng.normal(size=(features.shape[1], 4)), rng.normal(size=4)
    again = reference_with_head(learned, weights, bias)
    np.testing.assert_allclose(run_onnx(again, {"input": x})[0], features @ weights + bias, rtol=1e-4, atol=1e-4)
    assert [n.op_type for n in again.graph.node if n.name.startswith("learned/")] == ["Transpose", "Flatten", "Gemm"]
