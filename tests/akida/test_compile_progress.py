"""`qanac compile MODEL --target akida`, typed as is: the bundle lands beside the model as MODEL.akida, the
calibration is synthetic and said so, and the Akida backend's steps (quantize and convert, map, the agreement
check) appear as progress on stderr while stdout, with --json, stays one JSON document."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tests.akida import akida_models

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_plain_akida_compile_reports_the_backend_steps_and_its_calibration(tmp_path):
    model = tmp_path / "model.onnx"
    onnx.save(akida_models.tiny_cnn(), str(model))
    process = subprocess.run([sys.executable, "-m", "qanac.cli", "compile", str(model), "--target", "akida", "--json"],
                             capture_output=True, text=True, cwd=REPO, timeout=900)
    assert process.returncode == 0, process.stderr
    document = json.loads(process.stdout)
    assert document["output"] == str(tmp_path / "model.akida") and (tmp_path / "model.akida" / "model.fbz").is_file()
    assert document["manifest"]["calibration"]["source"].startswith("synthetic:")
    events = [json.loads(line)["progress"] for line in process.stderr.splitlines() if line.startswith('{"progress"')]
    steps = [e["step"] for e in events]
    for step in ("import", "calibration", "pipeline", "lint", "plan", "emit", "quantize", "map", "check"):
        assert step in steps, steps
    assert steps.index("emit") < steps.index("quantize") < steps.index("map") < steps.index("check")
