"""Smoke test of bench/pipeline_scaling.py at tiny sizes, on the onnxruntime target's pipeline (the akida
pipeline's first run imports the vendor stack, which alone takes longer than this test may).

Besides the table's shape it checks the metric the bench exists for: the pipeline's wall time stays
within 1.5x the time inside passes (a pipeline that serialises the model around every pass does not).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import onnx
import pytest

REPO = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("pipeline_scaling", REPO / "bench" / "pipeline_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nets_have_the_stated_structure():
    bench = load_bench()
    chain = bench.chain_net(31)
    onnx.checker.check_model(chain, full_check=True)
    assert [n.op_type for n in chain.graph.node] == ["Conv", "BatchNormalization", "Relu"] * 10
    residual = bench.residual_net(15)
    onnx.checker.check_model(residual, full_check=True)
    assert len(residual.graph.node) == 14 and [n.op_type for n in residual.graph.node].count("Add") == 2
    bn_inputs = {tuple(n.input[1:]) for n in residual.graph.node if n.op_type == "BatchNormalization"}
    assert bn_inputs == {("bn.scale", "bn.bias", "bn.mean", "bn.var")}  # parameters shared by every BN


def test_growth_exponent_is_the_log_log_slope():
    bench = load_bench()
    rows = [{"nodes": n, "pipeline": 0.01 * n**1.5, "passes": 0.01 * n} for n in (10, 40, 160)]
    assert bench.growth_exponent(rows) == pytest.approx(1.5)
    assert bench.growth_exponent(rows, "passes") == pytest.approx(1.0)
    assert bench.growth_exponent(rows[:1]) is None


def test_quick_run_prints_the_table(capsys):
    bench = load_bench()
    assert bench.main(["--quick", "--sizes", "15,30,60", "--target", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    for family in ("chain", "residual"):
        assert re.search(rf"^{family}$", out, re.M)
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [int(r[0]) for r in rows] == [15, 30, 60, 14, 28, 56]
    for _, pipeline, passes, ratio in rows:
        assert float(pipeline) >= float(passes) > 0
        assert float(ratio) <= 1.5
    assert len(re.findall(r"growth exponent: pipeline n\^[\d.]+, in passes n\^[\d.]+", out)) == 2
