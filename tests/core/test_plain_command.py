"""`qanac compile MODEL --target T` as typed: the bundle goes next to the model as <stem>.<target>, the model
is calibrated on synthetic data and every command using the bundle says so; progress goes to stderr."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qanac.cli import cli

REPO = Path(__file__).resolve().parents[2]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def model(tmp_path, small_model_path):
    path = tmp_path / "work" / "model.onnx"
    path.parent.mkdir()
    shutil.copy(small_model_path, path)
    return path


@pytest.fixture
def plain_bundle(model):
    result = invoke("compile", model, "--target", "onnxruntime")
    assert result.exit_code == 0, result.output
    return model.with_name("model.onnxruntime"), result


def test_plain_compile_writes_the_bundle_next_to_the_model_and_says_how_it_calibrated(plain_bundle, model):
    bundle, result = plain_bundle
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx", "model.onnxruntime"]
    assert (bundle / "manifest.json").is_file()
    assert f"into {bundle}" in result.stderr and f"bundle      {bundle}" in result.stdout
    calibration = json.loads((bundle / "manifest.json").read_text())["calibration"]
    assert calibration["source"].startswith("synthetic:") and calibration["random"]
    assert calibration["warning"] and calibration["num_samples"] > 0
    assert "warning: this bundle was calibrated on" in result.stderr and "synthetic:" in result.stderr
    assert f"qanac compile {model} --target onnxruntime --calib REAL_SAMPLES" in result.stderr


def test_verify_run_and_eval_warn_about_a_synthetic_calibration(plain_bundle, small_calib_path, tmp_path):
    bundle, _ = plain_bundle
    labelled = tmp_path / "labelled.npz"
    np.savez(labelled, x=np.load(small_calib_path), labels=np.arange(16) % 5)
    for command in (["verify", bundle, "--data", small_calib_path, "--min-agreement", "0", "--min-sqnr", "-100"],
                    ["run", bundle, "--input", small_calib_path],
                    ["eval", bundle, "--data", labelled, "-o", tmp_path / "eval"]):
        human = invoke(*command)
        assert human.exit_code == 0, human.output
        assert "warning: this bundle was calibrated on" in human.stderr and "--calib" in human.stderr
        if command[0] == "eval":  # its --json document is eval.json as written
            continue
        as_json = invoke(*command, "--json")
        assert as_json.exit_code == 0, as_json.output
        warnings = json.loads(as_json.stdout)["warnings"]
        assert any("calibrated on" in w and "synthetic:" in w for w in warnings)


def test_a_bundle_calibrated_on_real_data_carries_no_calibration_warning(tmp_path, model, small_calib_path):
    out = tmp_path / "real"
    result = invoke("compile", model, "--target", "onnxruntime", "--calib", small_calib_path, "-o", out)
    assert result.exit_code == 0, result.output
    assert "calibrated on" not in result.stderr
    assert not model.with_name("model.onnxruntime").exists()  # -o given: the default is not used
    run = invoke("run", out, "--input", small_calib_path, "--json")
    assert json.loads(run.stdout)["warnings"] == []
    assert "calibrated on" not in invoke("run", out, "--input", small_calib_path).stderr


def test_the_default_output_keeps_the_safe_output_rules(plain_bundle, model):
    bundle, _ = plain_bundle
    again = invoke("compile", model, "--target", "onnxruntime")
    assert again.exit_code == 2 and "already exists" in again.stderr
    forced = invoke("compile", model, "--target", "onnxruntime", "--force")
    assert forced.exit_code == 0, forced.output
    shutil.rmtree(bundle)
    bundle.mkdir()
    (bundle / "notes.txt").write_text("mine")
    refused = invoke("compile", model, "--target", "onnxruntime", "--force")
    assert refused.exit_code == 2 and "replaces only an empty directory or a qanac bundle" in refused.stderr
    assert [p.name for p in bundle.iterdir()] == ["notes.txt"]


def test_progress_lines_go_to_stderr_and_json_stays_one_document_on_stdout(model):
    process = subprocess.run(
        [sys.executable, "-m", "qanac.cli", "compile", str(model), "--target", "onnxruntime", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert process.returncode == 0, process.stderr
    document = json.loads(process.stdout)
    assert document["output"] == str(model.with_name("model.onnxruntime"))
    events = [json.loads(line)["progress"] for line in process.stderr.splitlines() if line.startswith("{")]
    steps = [e["step"] for e in events]
    for step in ("import", "calibration", "pipeline", "sweep", "lint", "plan", "emit"):
        assert step in steps, steps
    assert all(isinstance(e["elapsed"], float | int) and e["message"] for e in events)
    assert [e["elapsed"] for e in events] == sorted(e["elapsed"] for e in events)


def test_progress_in_human_mode(model, tmp_path):
    result = invoke("compile", model, "--target", "onnxruntime", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if " s] " in line]
    assert any("importing" in line for line in lines) and any("pipeline sweep 1" in line for line in lines)
    assert any("compiling" in line and "for onnxruntime" in line for line in lines)
    assert " s] " not in result.stdout
