"""The same CNN from its PyTorch factory and from tf_keras compiles for Akida with identical lint results
and mapping, and every diagnostic and mapped layer names its source layer (module path / Keras layer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from qanac.cli import cli
from tests.frontends.twin_models import SIZE, keras_twin

pytestmark = pytest.mark.slow


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def mapping_shape(report: dict) -> list[tuple[str, str, list[int]]]:
    """Layer types, backends and output shapes in order: what must not depend on the framework."""

    return [(e["type"], e["backend"], e["output_shape"]) for e in report["mapping"]["layers"]]


def test_torch_and_keras_twins_lint_and_map_identically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the factory path is resolved from the working directory too
    keras_path = tmp_path / "twin.keras"
    keras_twin().save(keras_path)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).integers(0, 256, (32, 3, SIZE, SIZE), dtype=np.uint8))
    sources = {
        "torch": ["tests.frontends.twin_models:torch_twin", "--input-shape", f"1,3,{SIZE},{SIZE}"],
        "keras": [keras_path],
    }
    lint, compiled = {}, {}
    for name, source in sources.items():
        result = invoke("lint", *source, "--target", "akida", "--json")
        assert result.exit_code == 0, result.output
        lint[name] = json.loads(result.output)
        result = invoke("compile", *source, "--target", "akida", "--calib", calib, "-o", tmp_path / name, "--json")
        assert result.exit_code == 0, result.output
        compiled[name] = json.loads(result.output)["report"]["backend"]
    assert [f["code"] for f in lint["torch"]["findings"]] == [f["code"] for f in lint["keras"]["findings"]]
    assert mapping_shape(compiled["torch"]) == mapping_shape(compiled["keras"])
    shares = [compiled[framework]["mapping"]["hardware_mac_share"] for framework in ("torch", "keras")]
    assert shares == [1.0, 1.0]
    for name in sources:
        named = {e["source"] for e in compiled[name]["mapping"]["layers"] if e["type"] in ("InputConv2D", "Dense1D")}
        assert all(named), (name, compiled[name]["mapping"]["layers"])


GATED = """
import torch.nn as nn


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.gate = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        y = self.stem(x)
        return self.head(y * self.gate(y))


def make():
    return Gated()
"""


def test_lint_findings_name_the_source_module(tmp_path, monkeypatch):
    (tmp_path / "gated.py").write_text(GATED)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("lint", "gated:make", "--input-shape", "1,3,16,16", "--target", "akida", "--json")
    assert result.exit_code == 3, result.output
    findings = {f["code"]: f for f in json.loads(result.output)["findings"]}
    assert findings["AKD102"]["sources"] == ["gate.1"]  # the Sigmoid, by its module path
    assert findings["AKD113"]["sources"] == ["head.0"]  # the pooling that reads the gated map
    assert findings["AKD103"]["nodes"] == ["/Mul"]  # an op of the root forward has no module path
