"""`qanac compile --device AKD1000` and `qanac verify` end to end: a sequential digits CNN compiles with every
MAC on the device and verifies against float on held-out digits; a residual CNN compiles with its Adds (and
what follows them) on the host, and its device segment, which ends in a ReLU, agrees with the quantized model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qanac.cli import cli
from tests.akida import v1_models

pytestmark = pytest.mark.slow


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_digits_cnn_compiles_for_akd1000_and_verifies(tmp_path):
    x_train, y_train, x_test, y_test = v1_models.digits_splits()
    model = tmp_path / "digits.onnx"
    onnx.save(v1_models.train_digits_cnn(x_train, y_train), str(model))
    np.save(tmp_path / "calib.npy", x_train[:256])
    np.savez(tmp_path / "heldout.npz", input=x_test, labels=y_test)
    out = tmp_path / "bundle"

    result = invoke("compile", model, "--target", "akida", "--device", "AKD1000", "--calib", tmp_path / "calib.npy",
                    "--weight-bits", "4", "--activation-bits", "4", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["segments"][0]["backend"]
    assert manifest["device"] == "AKD1000" and record["ip_version"] == "v1"
    assert (record["weight_bits"], record["activation_bits"]) == (4, 4)
    assert manifest["partition"]["device_mac_share"] == 1.0

    result = invoke("verify", out, "--data", tmp_path / "heldout.npz")
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output


def test_residual_cnn_runs_its_adds_on_the_host(tmp_path):
    model = tmp_path / "residual.onnx"
    onnx.save(v1_models.residual_cnn(), str(model))
    np.save(tmp_path / "calib.npy", v1_models.random_images((3, 16, 16), 64))
    out = tmp_path / "bundle"

    result = invoke("compile", model, "--target", "akida", "--device", "AKD1000", "--calib", tmp_path / "calib.npy",
                    "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    kinds = [(s["kind"], s["backend"].get("ip_version")) for s in manifest["segments"]]
    assert kinds == [("device", "v1"), ("host", None)]
    assert manifest["segments"][0]["backend"]["output_scale"] > 0  # the stem ends in a ReLU
    report = json.loads((out / "report.json").read_text())
    predicted = {n for d in report["diagnostics"] if d["code"] == "PART001" for n in d["nodes"]}
    assert {"block1_add", "block2_add"} <= predicted  # lint with the v1 table sends them to the host up front

    data = tmp_path / "data.npz"
    np.savez(data, input=v1_models.random_images((3, 16, 16), 32, seed=5))
    result = invoke("verify", out, "--data", data, "--min-agreement", "0.8")
    assert result.exit_code == 0, result.output
    assert "float vs compiled" in result.output
