"""`qanac compile --target akida` end to end, through the CLI as a user runs it.

- A trained PyTorch CNN with Conv/BN/ReLU6/depthwise/residual Add/Concat/GAP/Linear agrees with its float
  model on >= 99 % of a held-out set (397 scikit-learn digits not used for training or calibration), and
  `qanac run` reproduces akida.Model.predict exactly.
- Models Akida cannot run exit 3 naming the node, and leave no bundle.
- An IP v1 device is refused with the reason.
- A conv+GAP over a large map, which saturates Akida, is staged by the default pipeline and agrees.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from qanac.cli import cli
from qanac.zoo.demo import digits_uint8
from tests.akida import akida_models
from tests.akida.lint_cases import export

pytestmark = pytest.mark.slow


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


class ResidualDigitsNet(nn.Module):
    """Conv/BN/ReLU6, a depthwise-separable residual block (Add), two branches joined by Concat, GAP, Linear."""

    def __init__(self):
        super().__init__()

        def cbr(cin, cout, k=3, s=1, g=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU6())

        self.stem = nn.Sequential(cbr(1, 16), cbr(16, 16, s=2))
        self.block = nn.Sequential(cbr(16, 16, g=16), cbr(16, 16, k=1))
        self.left = cbr(16, 16, s=2)
        self.right = cbr(16, 16, k=1, s=2)
        self.mix = cbr(32, 32, k=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        y = self.stem(x)
        y = y + self.block(y)
        y = torch.cat([self.left(y), self.right(y)], dim=1)
        return self.head(self.mix(y))


@pytest.fixture(scope="module")
def digits_bundle(tmp_path_factory):
    """The residual net trained on 1400 digits, exported, compiled for Akida; the other 397 held out."""

    root = tmp_path_factory.mktemp("digits")
    images, labels = digits_uint8()
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = ResidualDigitsNet()
    x = torch.from_numpy(images[train] / 255.0).float()
    y = torch.from_numpy(labels[train])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        model.train()
        perm = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = perm[start : start + 64]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    path = root / "residual.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 24, 24),), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    np.save(root / "calib.npy", images[train[:256]])
    np.savez(root / "test.npz", image=images[test], labels=labels[test])
    bundle = root / "bundle"
    result = invoke("compile", path, "--target", "akida", "--calib", root / "calib.npy", "-o", bundle, "--json")
    assert result.exit_code == 0, result.output
    return root, bundle, json.loads(result.output)


def test_residual_concat_net_maps_and_agrees_with_float(digits_bundle):
    root, bundle, compiled = digits_bundle
    mapping = compiled["report"]["backend"]["mapping"]
    assert mapping["hardware_mac_share"] == 1.0, compiled["report"]["backend_summary"]
    result = invoke("verify", bundle, "--data", root / "test.npz", "--min-agreement", "0.99", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["samples"] == 397
    assert report["comparisons"]["compiled"][0]["top1_agreement"] >= 0.99
    assert report["label_accuracy"]["float"] > 0.9


def test_run_reproduces_akida_predict_exactly(digits_bundle, tmp_path):
    import akida

    root, bundle, _ = digits_bundle
    out = tmp_path / "preds.npy"
    result = invoke("run", bundle, "--input", root / "test.npz", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    test_images = np.load(root / "test.npz")["image"]
    direct = akida.Model(str(bundle / "model.fbz")).predict((test_images / np.float32(255.0)).astype(np.float32))
    np.testing.assert_array_equal(np.load(out), direct.reshape(len(test_images), -1))


def test_a_bundle_in_the_previous_format_runs_and_verifies_the_same(digits_bundle, tmp_path):
    """Format 1 (before the typed manifest) kept the Akida fields in the segment, most under "akida", and
    copied them to the top level; such a bundle still runs and offers its quantized model."""

    import shutil

    root, bundle, _ = digits_bundle
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    segment = manifest["segments"][0]
    backend = segment.pop("backend")
    identity = {"identity_input": True} if backend.pop("identity_input") else {}
    fields = {"device": segment.pop("device"), "ip_version": backend.pop("ip_version"), "akida": backend, **identity}
    segment.update(fields)
    manifest.update(fields, format_version=1)
    (old / "manifest.json").write_text(json.dumps(manifest))

    test = np.load(root / "test.npz")
    np.savez(tmp_path / "few.npz", image=test["image"][:32], labels=test["labels"][:32])
    outputs = []
    for path in (bundle, old):
        result = invoke("run", path, "--input", tmp_path / "few.npz", "-o", tmp_path / f"{path.name}.npy")
        assert result.exit_code == 0, result.output
        outputs.append(np.load(tmp_path / f"{path.name}.npy"))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    result = invoke("verify", old, "--data", tmp_path / "few.npz", "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)["comparisons"]) == {"compiled", "quantized"}


@pytest.mark.parametrize("case, node", [
    ("squeeze_excite", "/6/Mul"),
    ("sigmoid", "/5/Sigmoid"),
])
def test_unsupported_models_exit_3_naming_the_node_without_partitioning(case, node, tmp_path):
    model = tmp_path / f"{case}.onnx"
    export(case, model)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8))
    out = tmp_path / "bundle"
    result = invoke("compile", model, "--target", "akida", "--calib", calib, "-o", out, "--no-partition")
    assert result.exit_code == 3, result.output
    assert node in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_lint_says_why_the_fixing_pass_left_a_node(tmp_path):
    """MaxPool(3, 2, 1) straight after a Conv (no activation, so the map may be negative): the exact
    rewrite does not apply, and the AKD109 finding carries the pass's reason instead of a bare name."""

    model = tmp_path / "maxpool_signed.onnx"
    torch.onnx.export(nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1),
                                    nn.MaxPool2d(3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval(),
                      (torch.zeros(1, 3, 32, 32),), str(model), opset_version=17, dynamo=False)
    result = invoke("lint", model, "--target", "akida", "--json")
    assert result.exit_code == 3, result.output
    findings = [f for f in json.loads(result.output)["findings"] if f["code"] == "AKD109"]
    assert len(findings) == 1 and "MaxPool" in findings[0]["nodes"][0]
    assert "pass 'split-padded-maxpool' left this node: its input may be negative" in findings[0]["hint"]


def test_v1_device_refuses_what_v1_cannot_run(tmp_path):
    """AKD1000 is judged by the v1 rules (docs/akida-v1.md), which refuse this model's unbounded ReLUs and
    PyTorch's stride-2 padding node by node: no part of it reaches the device (exit 3, reasons named, and the
    lint command suggested checks the same device)."""

    model = tmp_path / "ok.onnx"
    export("clean_relu", model)
    result = invoke("compile", model, "--target", "akida", "--calib", "random", "--device", "AKD1000", "-o",
                    tmp_path / "b")
    assert result.exit_code == 3, result.output
    assert "no part of the model can run" in result.output and "AK1109 padding" in result.output
    assert "--target akida --device AKD1000" in result.output
    assert not (tmp_path / "b").exists()
    linted = invoke("lint", model, "--target", "akida", "--device", "AKD1000")
    assert linted.exit_code == 3 and "unbounded ReLU" in linted.output and "AK1109" in linted.output, linted.output


def test_staging_keeps_a_large_conv_gap_on_the_device_and_agreeing(tmp_path):
    """A Conv fused with a global pooling over 32x32 saturates Akida's accumulator; the default pipeline
    stages the pooling, so the whole model stays on the device and agrees with float (with the staging pass
    disabled, the layer runs on the host: tests/akida/test_no_wrong_bundle.py)."""

    model = akida_models.conv_gap_classifier(size=32)
    path = tmp_path / "conv_gap.onnx"
    onnx.save(model, str(path))
    data = akida_models.image_calibration(model, count=64)
    np.save(tmp_path / "images.npy", data.raw["input"])
    staged = tmp_path / "staged"
    result = invoke("compile", path, "--target", "akida", "--calib", tmp_path / "images.npy", "-o", staged)
    assert result.exit_code == 0 and "AKV30" not in result.output and "PART004" not in result.output, result.output
    assert "stage-global-average-pool" in result.output
    result = invoke("verify", staged, "--data", tmp_path / "images.npy", "--json")
    assert result.exit_code == 0, result.output
    compiled = json.loads(result.output)["comparisons"]["compiled"][0]
    assert compiled["sqnr_db"] > 25.0 and compiled["top1_agreement"] >= 0.95


def test_squeeze_excite_runs_its_gate_on_the_host(tmp_path):
    """By default the SE gate is partitioned to the host: the bundle's outputs are the model's, and
    nearly all MACs stay on the device."""

    model = tmp_path / "se.onnx"
    export("squeeze_excite", model)
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(0).integers(0, 256, (32, 3, 32, 32), dtype=np.uint8))
    bundle = tmp_path / "bundle"
    result = invoke("compile", model, "--target", "akida", "--calib", images, "-o", bundle, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)["manifest"]
    kinds = [s["kind"] for s in manifest["segments"]]
    assert kinds == ["device", "host"]
    host = manifest["segments"][1]
    assert host["inputs"] == manifest["segments"][0]["outputs"]
    assert manifest["partition"]["transfers"] == 1 and manifest["partition"]["device_mac_share"] > 0.99
    codes = {d["code"] for d in json.loads(result.output)["report"]["diagnostics"]}
    assert {"PART001", "PART002"} <= codes
    result = invoke("verify", bundle, "--data", images, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["comparisons"]["compiled"][0]["shape"] == [32, 5]  # the model's output, not a truncated map


def test_image_folder_calibration_and_run_on_image_files(digits_bundle, tmp_path):
    """Calibrate from a folder of PNGs (resized to the model input), record the preprocessing, and
    `qanac run` image files with labels; predictions equal running the same pixels as an array."""

    from PIL import Image

    root, _, _ = digits_bundle
    images, labels = digits_uint8()
    folder = tmp_path / "calib"
    for i in range(40):
        target = folder / str(labels[i])
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.kron(images[i, 0], np.ones((2, 2), np.uint8))).save(target / f"{i}.png")  # 48x48
    (tmp_path / "labels.txt").write_text("\n".join(f"digit-{d}" for d in range(10)))
    bundle = tmp_path / "bundle"
    result = invoke("compile", root / "residual.onnx", "--target", "akida", "--calib", folder, "--labels",
                    tmp_path / "labels.txt", "--mean", "0.1", "--std", "0.9", "-o", bundle, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)["manifest"]
    assert manifest["calibration"]["num_samples"] == 40
    preprocessing = manifest["inputs"][0]["preprocessing"]
    assert preprocessing["mean"] == [0.1] and preprocessing["std"] == [0.9]
    files = [folder / str(labels[i]) / f"{i}.png" for i in range(3)]
    result = invoke("run", bundle, *[a for f in files for a in ("--input", f)], "--json")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.output)["predictions"]
    assert [p["input"] for p in predictions] == [str(f) for f in files]
    assert all(p["top"][0]["label"].startswith("digit-") for p in predictions)
    arrays = tmp_path / "same.npy"
    np.save(arrays, np.stack([np.asarray(Image.open(f).resize((24, 24), Image.BILINEAR))[None] for f in files]))
    again = json.loads(invoke("run", bundle, "--input", arrays, "--json").output)["predictions"]
    assert [p["top"][0]["class"] for p in again] == [p["top"][0]["class"] for p in predictions]
