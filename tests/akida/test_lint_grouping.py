"""Lint's human output groups findings by code; its JSON keeps every finding."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from qanac.cli import cli

pytestmark = pytest.mark.slow


def tanh_chain(count: int) -> onnx.ModelProto:
    """conv0 -> tanh0 -> ... -> conv{count-1} -> tanh{count-1}, 1x4x8x8: one AKD102 per Tanh."""

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(count):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Tanh", [f"c{i}"], [f"t{i}"], name=f"tanh{i}")]
        x = f"t{i}"
    graph = helper.make_graph(nodes, "tanh_chain",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_twenty_findings_of_one_code_are_one_group_for_people_and_twenty_in_json(tmp_path):
    path = tmp_path / "tanh.onnx"
    onnx.save(tanh_chain(20), str(path))
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
