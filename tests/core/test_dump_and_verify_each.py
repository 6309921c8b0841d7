"""`qanac compile --verify-each --dump-dir` on a PyTorch-exported CNN with BatchNorm, Dropout and Softmax:
every exact pass is checked with ONNX Runtime, and each dumped model shows that pass's effect."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import torch
from click.testing import CliRunner

from qanac.cli import cli
from qanac.zoo.demo import build_example_cnn


def ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_dumps_show_each_pass(tmp_path):
    torch.manual_seed(0)
    model = build_example_cnn().eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so folding them changes weights
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 24, 24),), str(path), input_names=["image"], output_names=["probs"],
                      dynamic_axes={"image": {0: "N"}, "probs": {0: "N"}}, opset_version=11, dynamo=False,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    assert ops(path)["BatchNormalization"] == 6 and ops(path)["Softmax"] == 1
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).integers(0, 256, (16, 1, 24, 24), dtype=np.uint8))
    dump = tmp_path / "dump"
    result = CliRunner().invoke(cli, ["compile", str(path), "--target", "onnxruntime", "--calib", str(calib),
                                      "-o", str(tmp_path / "bundle"), "--verify-each", "--dump-dir", str(dump),
                                      "--time-passes"])
    assert result.exit_code == 0, result.output

    dumps = sorted(p.name for p in dump.iterdir())
    assert dumps[0] == "000_input.onnx"
    by_pass = {name[4:-5]: dump / name for name in dumps[1:]}
    steps = [name[4:-5] for name in dumps[1:]]
    order = [steps.index(name) for name in ("upgrade-opset", "fold-batchnorm-into-conv", "strip-trailing-softmax")]
    assert order == sorted(order)

    # each dump differs from the one before it in exactly the way its pass says
    previous = {name: dump / dumps[i] for i, name in enumerate(steps)}
    assert ops(by_pass["fold-batchnorm-into-conv"])["BatchNormalization"] == 0
    assert ops(previous["fold-batchnorm-into-conv"])["BatchNormalization"] == 6
    assert ops(by_pass["strip-trailing-softmax"])["Softmax"] == 0
    assert ops(previous["strip-trailing-softmax"])["Softmax"] == 1
    upgraded = onnx.load(str(by_pass["upgrade-opset"]))
    assert next(o.version for o in upgraded.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert "fold-batchnorm-into-conv" in result.output and " ms " in result.output
