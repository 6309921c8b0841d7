"""`qanac zoo list/export/train` and `qanac eval`, end to end on a generated HAM10000-shaped data set:
train -> compile for Akida -> eval, as a user would on the real data."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from qanac.calibration import write_ham10000_fixture
from qanac.cli import cli

pytestmark = pytest.mark.slow


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_zoo_list_and_export_both_variants(tmp_path):
    listed = json.loads(invoke("zoo", "list", "--json").output)
    assert {"paper", "native"} <= set(listed[0]["variants"])
    for variant in ("paper", "native"):
        out = tmp_path / f"{variant}.onnx"
        result = invoke("zoo", "export", "qana", "--variant", variant, "-o", out, "--json")
        assert result.exit_code == 0, result.output
        model = onnx.load(str(out))
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims == [1, 3, 64, 64] and model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 7
    assert invoke("zoo", "export", "qana", "--variant", "nope", "-o", tmp_path / "x.onnx").exit_code == 2


def test_train_compile_eval_on_ham10000_layout(tmp_path):
    data = write_ham10000_fixture(tmp_path / "ham", images_per_class=12)
    run = tmp_path / "run"
    result = invoke("zoo", "train", "qana", "--data", data, "--epochs", "1", "--input-size", "32", "--width-mult",
                    "0.25", "-o", run, "--json")
    assert result.exit_code == 0, result.output
    assert {"model.onnx", "config.json", "metrics.json", "float.pt", "calib.npy"} <= {p.name for p in run.iterdir()}
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["grouped"] and config["data"]["group_key"] == "lesion_id"

    bundle = tmp_path / "bundle"
    result = invoke("compile", run / "model.onnx", "--target", "akida", "--calib", run / "calib.npy", "-o", bundle,
                    "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["manifest"]["partition"]["device_mac_share"] == 1.0  # native: all on device

    result = invoke("eval", bundle, "--data", data, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["samples"] > 0 and set(report["float"]["per_class"]) == set(config["class_names"])
    for key in ("top1", "macro_f1", "balanced_accuracy", "confusion_matrix"):
        assert key in report["float"] and key in report["compiled"]
    assert (bundle / "eval" / "confusion.png").stat().st_size > 1000
    assert (bundle / "eval" / "eval.json").exists()

    result = invoke("zoo", "export", "qana", "--checkpoint", run, "-o", tmp_path / "again.onnx")
    assert result.exit_code == 0, result.output
