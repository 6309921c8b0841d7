"""Lint's human output groups findings by code; its JSON keeps every finding."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from qanac.cli import cli
from tests.conftest import conv_chain

pytestmark = pytest.mark.slow


def test_twenty_findings_of_one_code_are_one_group_for_people_and_twenty_in_json(tmp_path):
    path = tmp_path / "tanh.onnx"
    onnx.save(conv_chain(20, "Tanh"), str(path))
    runner = CliRunner()
    human = runner.invoke(cli, ["lint", str(path), "--target", "akida"])
    assert human.exit_code == 3, human.output
    lines = [line for line in human.output.splitlines() if "AKD102" in line]
    assert len(lines) == 1 and lines[0].startswith("error: AKD102 x20, the first: Tanh 'tanh0'")
    assert "    nodes: tanh0, tanh1, tanh2, tanh3, tanh4, +15 more" in human.output
    assert "20 error(s)" in human.output
    as_json = runner.invoke(cli, ["lint", str(path), "--target", "akida", "--json"])
    findings = json.loads(as_json.output)["findings"]
    assert [f["nodes"] for f in findings if f["code"] == "AKD102"] == [[f"tanh{i}"] for i in range(20)]
