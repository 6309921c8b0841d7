"""The CLI: exit codes, no tracebacks, no half-written bundles, JSON on request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qanac.cli import cli

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "examples" / "plugin" / "qanac_example_plugin" / "__init__.py"


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def compile_args(model, calib, out, *extra):
    return ["compile", model, "--target", "onnxruntime", "--calib", calib, "-o", out, *extra]


@pytest.fixture
def compiled(tmp_path, small_model_path, small_calib_path):
    out = tmp_path / "bundle"
    result = invoke(*compile_args(small_model_path, small_calib_path, out))
    assert result.exit_code == 0, result.output
    return out


def test_compile_writes_a_complete_bundle(compiled, small_calib_path):
    names = sorted(p.name for p in compiled.iterdir())
    assert names == ["manifest.json", "model.qdq.onnx", "reference.onnx", "report.html", "report.json"]
    manifest = json.loads((compiled / "manifest.json").read_text())
    assert manifest["target"] == "onnxruntime"
    assert manifest["inputs"][0]["name"] == "x" and manifest["inputs"][0]["shape"][1:] == [3, 8, 8]
    assert manifest["post_processing"] == [{"op": "Softmax", "axis": -1, "output": "probs"}]
    applied = {p["pass"]: p["counts"] for p in manifest["passes_applied"]}
    assert sum(applied["fold-batchnorm-into-conv"].values()) == 1
    assert set(manifest["files"]) == {"reference", "compiled"}
    assert manifest["calibration"]["num_samples"] == 16 and not manifest["calibration"]["random"]
    assert "onnxruntime" in manifest["tool_versions"]
    reference = onnx.load(str(compiled / "reference.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in reference.graph.node}
    quantized = onnx.load(str(compiled / "model.qdq.onnx"))
    assert "QuantizeLinear" in {n.op_type for n in quantized.graph.node}


def test_verify_passes_and_reports_json(compiled, small_calib_path):
    result = invoke("verify", compiled, "--data", small_calib_path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    compiled_cmp = report["comparisons"]["compiled"][0]
    assert report["passed"] and report["samples"] == 16
    assert compiled_cmp["top1_agreement"] >= 0.95 and compiled_cmp["sqnr_db"] > 15


def test_verify_exits_1_below_threshold_and_says_what_would_pass(compiled, small_calib_path):
    result = invoke("verify", compiled, "--data", small_calib_path, "--min-sqnr", "200")
    assert result.exit_code == 1
    assert "FAILED" in result.output and "--min-sqnr" in result.output


def test_run_matches_verify_outputs(compiled, small_calib_path, tmp_path):
    out = tmp_path / "preds.npy"
    result = invoke("run", compiled, "--input", small_calib_path, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    probs = np.load(out)
    assert probs.shape == (16, 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # the stripped Softmax is applied on the host
    predictions = json.loads(result.output)["predictions"]
    assert [p["top"][0]["class"] for p in predictions] == list(np.argmax(probs, axis=1))


def test_inspect_json(small_model_path):
    result = invoke("inspect", small_model_path, "--json")
    assert result.exit_code == 0
    summary = json.loads(result.output)
    assert summary["ops"]["Conv"] == 1
    assert summary["macs"] == 8 * 8 * 8 * 3 * 3 * 3 + 5 * 8


@pytest.mark.parametrize(
    "setup, args, message",
    [
        ("garbage", [], "not a readable ONNX model"),
        ("truncated", [], "not a readable ONNX model"),
        ("model", ["--target", "nope"], "unknown target"),
        ("model", ["--disable-pass", "nope"], "unknown pass"),
        ("model", ["--calib", "MISSING"], "data not found"),
        ("model", ["--calib", "WRONGSHAPE"], "expects"),
        ("model", ["--calib", "synthetic:nope"], "unknown synthetic calibration method"),
    ],
)
def test_bad_input_is_exit_2_without_traceback_or_output(tmp_path, small_model_path, small_calib_path, setup, args,
                                                         message):
    model = small_model_path
    if setup == "garbage":
        model = tmp_path / "garbage.onnx"
        model.write_text("this is not onnx")
    elif setup == "truncated":
        model = tmp_path / "truncated.onnx"
        model.write_bytes(small_model_path.read_bytes()[:300])
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 3, 9, 9), np.float32))
    base = {"--target": "onnxruntime", "--calib": str(small_calib_path)}
    if args:
        if args[0] in base:
            base[args[0]] = {"MISSING": str(tmp_path / "missing.npy"), "WRONGSHAPE": str(wrong)}.get(args[1], args[1])
            args = []
    cli_args = ["compile", str(model), "-o", str(tmp_path / "out")]
    for key, value in base.items():
        if value is not None:
            cli_args += [key, value]
    result = invoke(*cli_args, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_force(compiled, small_model_path, small_calib_path):
    result = invoke(*compile_args(small_model_path, small_calib_path, compiled))
    assert result.exit_code == 2 and "already exists" in result.output
    result = invoke(*compile_args(small_model_path, small_calib_path, compiled, "--force"))
    assert result.exit_code == 0, result.output


def test_json_error_is_machine_readable(tmp_path, small_calib_path):
    result = invoke("compile", tmp_path / "missing.onnx", "--target", "onnxruntime", "--calib",
                    small_calib_path, "-o", tmp_path / "o", "--json")
    assert result.exit_code == 2
    error = json.loads(result.output)
    assert error["exit_code"] == 2 and "not found" in error["message"]


def test_random_calibration_is_loud(tmp_path, small_model_path):
    result = invoke("compile", small_model_path, "--target", "onnxruntime", "--calib", "random", "-o", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output and "random" in result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["calibration"]["random"] is True and "warning" in manifest["calibration"]


def test_stop_after_writes_the_partial_model(tmp_path, small_model_path, small_calib_path):
    out = tmp_path / "partial"
    result = invoke(*compile_args(small_model_path, small_calib_path, out, "--stop-after", "fold-batchnorm-into-conv"))
    assert result.exit_code == 0, result.output
    partial = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in partial.graph.node]
    assert "BatchNormalization" not in ops and "Softmax" in ops  # stopped before strip-trailing-softmax


def test_plugin_pass_is_listed_and_runs(tmp_path, small_calib_path):
    result = invoke("passes", "--plugin", PLUGIN, "--json")
    assert result.exit_code == 0, result.output
    names = {p["name"]: p for p in json.loads(result.output)}
    assert "merge-consecutive-relu" in names and names["merge-consecutive-relu"]["exact"]

    from tests.conftest import parse

    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,3,8,8] y) {
      a = Relu(x)
      b = Relu(a)
      y = Neg(b)
    }""")
    path = tmp_path / "relus.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "relus-bundle"
    result = invoke("compile", path, "--target", "onnxruntime", "--calib", small_calib_path, "-o", out,
                    "--plugin", PLUGIN, "--pipeline", "merge-consecutive-relu", "--verify-each", "--stop-after",
                    "merge-consecutive-relu")
    assert result.exit_code == 0, result.output
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops == ["Relu", "Neg"]


def test_console_script_hides_tracebacks(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("nope")
    proc = subprocess.run(
        [sys.executable, "-m", "qanac.cli", "inspect", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not a readable ONNX model" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "qanac.cli", "--debug", "inspect", str(bad)], capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_pass_reference_doc_is_in_sync():
    # a fresh process: plugins loaded by other tests must not leak into the reference
    proc = subprocess.run([sys.executable, "-m", "qanac.cli", "passes", "--markdown"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    documented = (REPO / "docs" / "passes.md").read_text()
    assert documented == proc.stdout, "docs/passes.md is stale: regenerate with `qanac passes --markdown`"


def test_akida_rules_doc_is_in_sync():
    result = invoke("rules", "akida", "--markdown")
    assert result.exit_code == 0, result.output
    text = (REPO / "docs" / "akida.md").read_text()
    documented = text.split("<!-- rules:begin -->\n", 1)[1].split("<!-- rules:end -->", 1)[0]
    assert documented == result.output, "docs/akida.md's rule table is stale: `qanac rules akida --markdown`"
