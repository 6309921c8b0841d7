"""Calibration data: formats, preprocessing, shape checks, and random data only on request."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from qanac.calibration import InputSpec, Preprocessing, load_data
from qanac.diagnostics import UsageError

SPEC = [InputSpec("x", (1, 3, 8, 8))]


def test_uint8_npy_is_preprocessed_and_kept_raw(tmp_path):
    raw = np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8)
    np.save(tmp_path / "a.npy", raw)
    pre = Preprocessing(scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    data = load_data(tmp_path / "a.npy", SPEC, pre)
    np.testing.assert_allclose(data.arrays["x"], (raw / 255 - 0.5) / 0.25, rtol=0, atol=1e-6)  # float32
    assert data.raw["x"] is raw or np.array_equal(data.raw["x"], raw)


def test_npz_with_labels_and_names(tmp_path):
    x = np.zeros((4, 3, 8, 8), np.float32)
    np.savez(tmp_path / "a.npz", x=x, labels=np.arange(4))
    data = load_data(tmp_path / "a.npz", SPEC)
    assert data.num_samples == 4 and list(data.labels) == [0, 1, 2, 3]


def test_nhwc_data_gets_a_hint(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(UsageError, match="expects") as excinfo:
        load_data(tmp_path / "a.npy", SPEC)
    assert "NHWC" in excinfo.value.hint


def test_unreadable_and_missing(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(UsageError, match="cannot read"):
        load_data(tmp_path / "bad.npy", SPEC)
    with pytest.raises(UsageError, match="not found"):
        load_data(tmp_path / "missing.npy", SPEC)


def test_image_folder_with_classes(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
    data = load_data(tmp_path, SPEC)
    assert data.arrays["x"].shape == (4, 3, 8, 8)
    assert list(data.labels) == [0, 0, 1, 1]


def test_random_only_when_asked_and_loud():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data("random", SPEC)
    assert data.random and data.describe()["random"] is True
    assert any("RANDOM" in str(w.message) for w in caught)


def _conv_bn(mean: np.ndarray, var: np.ndarray, weight: np.ndarray, channels: int = 3, size: int = 16):
    """x (N, channels, size, size) -> Conv 3x3 (pads 1, stride 2) -> BatchNormalization(mean, var)."""

    import onnx
    from onnx import helper, numpy_helper

    outputs = len(weight)
    tensors = {"w": weight.astype(np.float32), "scale": np.ones(outputs, np.float32),
               "bias": np.zeros(outputs, np.float32), "mean": mean.astype(np.float32), "var": var.astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], name="bn")],
        "conv_bn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _conv_outputs(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_synthetic_batchnorm_data_gives_the_first_conv_the_statistics_its_batchnorm_recorded():
    """The BatchNorm statistics come from 'real' images (smooth fields, channel means 0.3/0.5/0.7 on [0, 1]);
    synthetic data must reproduce them at the conv output: means within 0.15 std, stds within 20 %; uniform
    noise, the vendors' choice, misses them by more."""

    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.3, (8, 3, 3, 3))
    model = _conv_bn(np.zeros(8), np.ones(8), weight)
    spec = [InputSpec("x", (1, 3, 16, 16))]
    smooth = np.cumsum(np.cumsum(rng.normal(0, 1, (256, 3, 16, 16)), axis=2), axis=3)
    smooth = (smooth - smooth.mean(axis=(2, 3), keepdims=True)) / smooth.std(axis=(2, 3), keepdims=True)
    real = np.clip(np.array([0.3, 0.5, 0.7])[None, :, None, None] + 0.12 * smooth, 0, 1).astype(np.float32)
    conv = _conv_outputs(model, real)
    model = _conv_bn(conv.mean(axis=(0, 2, 3)), conv.var(axis=(0, 2, 3)), weight)
    target_mean, target_std = conv.mean(axis=(0, 2, 3)), conv.std(axis=(0, 2, 3))

    errors = {}
    for method in ("batchnorm", "uniform"):
        data = load_data(f"synthetic:{method}", spec, Preprocessing(), model=model)
        assert data.source == f"synthetic:{method}" and data.random and data.raw["x"].dtype == np.uint8
        out = _conv_outputs(model, data.arrays["x"])
        errors[method] = (np.abs(out.mean(axis=(0, 2, 3)) - target_mean) / target_std,
                          out.std(axis=(0, 2, 3)) / target_std)
    mean_error, std_ratio = errors["batchnorm"]
    assert mean_error.max() < 0.15 and 0.8 < std_ratio.min() and std_ratio.max() < 1.2, errors["batchnorm"]
    uniform_mean_error, uniform_std_ratio = errors["uniform"]
    assert uniform_mean_error.max() > 2 * mean_error.max() or np.abs(np.log(uniform_std_ratio)).max() > 2 * np.abs(
        np.log(std_ratio)).max()


def test_synthetic_default_method_follows_the_model(small_model_path):
    from qanac.graph import load_onnx

    with_bn = load_onnx(small_model_path)
    assert load_data("synthetic", SPEC, model=with_bn).source == "synthetic:batchnorm"
    assert load_data("synthetic", SPEC).source == "synthetic:uniform"  # no model: nothing to match
    without_bn = _conv_bn(np.zeros(8), np.ones(8), np.ones((8, 3, 3, 3)))
    without_bn.graph.node.pop()  # Conv alone
    assert load_data("synthetic", SPEC, model=without_bn).source == "synthetic:uniform"
    integers = load_data("synthetic", [InputSpec("x", (1, 3, 8, 8), "int8")], model=with_bn)
    assert integers.source == "synthetic:uniform" and integers.arrays["x"].dtype == np.int8


def test_synthetic_data_is_seeded_limited_and_refuses_unknown_methods(small_model_path):
    from qanac.graph import load_onnx

    model = load_onnx(small_model_path)
    first = load_data("synthetic", SPEC, model=model)
    again = load_data("synthetic", SPEC, model=model)
    np.testing.assert_array_equal(first.raw["x"], again.raw["x"])
    assert first.num_samples == 64 and load_data("synthetic", SPEC, model=model, limit=5).num_samples == 5
    assert np.isfinite(first.arrays["x"]).all()
    with pytest.raises(UsageError, match="unknown synthetic calibration method"):
        load_data("synthetic:noise", SPEC)
    with pytest.raises(UsageError, match="needs input 'x' to feed a Conv"):
        load_data("synthetic:batchnorm", SPEC)
