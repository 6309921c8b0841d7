"""Shared fixtures: small models built in code (text-form ONNX or tiny PyTorch nets), never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qanac.testing import parse  # noqa: F401  (tests import it from here)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _qanac_cache_dir(tmp_path_factory) -> None:
    """qanac's cache folder (qanac.cache) in the session's temporary folder, not the user's ~/.cache."""

    os.environ["QANAC_CACHE_DIR"] = str(tmp_path_factory.mktemp("qanac-cache"))


def conv_bn_relu_softmax(seed: int = 0, batch: str = "N") -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> GAP -> Flatten -> Gemm -> Softmax, random weights, NCHW 1x3x8x8."""

    rng = np.random.default_rng(seed)
    weights = {
        "w": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "bias": rng.normal(0, 0.1, 8).astype(np.float32),
        "mean": rng.normal(0, 0.1, 8).astype(np.float32),
        "var": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "fc_w": rng.normal(0, 0.3, (5, 8)).astype(np.float32),
        "fc_b": rng.normal(0, 0.1, 5).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn_relu_softmax",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, [batch, 5])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_chain(count: int, activation: str = "Relu", batch: int | str = 1, classes: int = 0) -> onnx.ModelProto:
    """conv0 -> {act}0 -> ... -> conv{count-1} -> {act}{count-1} over (batch, 4, 8, 8), every conv 4 -> 4
    channels 3x3 with padding 1 (equal MACs), activation nodes named ``activation.lower() + str(i)``; with
    ``classes``, a head GlobalAveragePool ("gap") -> Flatten -> Gemm ("fc") -> ``logits`` (batch, classes)."""

    rng = np.random.default_rng(0)
    prefix = activation.lower()
    nodes, inits, x = [], [], "x"
    for i in range(count):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node(activation, [f"c{i}"], [f"a{i}"], name=f"{prefix}{i}")]
        x = f"a{i}"
    output = helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [batch, 4, 8, 8])
    if classes:
        inits += [numpy_helper.from_array(rng.normal(0, 1.0, (classes, 4)).astype(np.float32), "fc_w"),
                  numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b")]
        nodes += [helper.make_node("GlobalAveragePool", [x], ["g"], name="gap"),
                  helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
                  helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
        output = helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [batch, classes])
    graph = helper.make_graph(nodes, f"{prefix}_chain",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 4, 8, 8])],
                              [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def small_model_path(tmp_path: Path) -> Path:
    path = tmp_path / "small.onnx"
    onnx.save(conv_bn_relu_softmax(), str(path))
    return path


@pytest.fixture
def small_calib_path(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(1).uniform(0, 1, (16, 3, 8, 8)).astype(np.float32))
    return path
