"""Smoke test of bench/akida_coverage.py's machinery on one tiny CNN (not the bench's model set).

The tiny net has a bare sigmoid in the middle, so plain MetaTF must report a silent truncation
(and the node where conversion stopped), and qanac must give a result that the table can show.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("akida_coverage", REPO / "bench" / "akida_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_sigmoid_net(size: int):
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16),
        nn.Sigmoid(),  # a bare sigmoid: quantizeml leaves it unquantized, cnn2snn stops before it
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.mark.slow
def test_one_model_record_and_table(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setitem(bench.MODELS, "tiny_sigmoid", (tiny_sigmoid_net, "tiny CNN with a bare sigmoid"))
    record = bench.run_one("tiny_sigmoid", size=16, steps=0, workdir=tmp_path)
    json.dumps(record, default=str)  # the record is what --out writes

    plain = record["metatf"]
    assert plain["outcome"] == "truncated", plain
    assert plain["stopped_at"], plain["warnings"]
    assert plain["float_output_shape"] == [10]

    q = record["qanac"]
    assert q["status"] in (0, 3), q  # 0 with host partitioning, 3 (named nodes) without
    if q["status"] == 0:
        assert q["segments"] >= 2 and 0.0 < q["device_mac_share"] <= 1.0
        assert q["agreement"] is not None and "verify_error" not in q, q
    else:
        assert q["diagnostics"], q

    table = bench.format_table([record, {"model": "broken", "error": "bench subprocess failed: boom"}])
    assert "tiny_sigmoid" in table and "SILENTLY TRUNCATED" in table
    assert "BENCH FAIL" in table
