"""Lint's vendor view has a bounded cost.

quantizeml's sanitizer splits every Concat of k inputs into k - 1 two-input Concats and puts a C x C identity
convolution after each, so a dense-concatenation net grows tens of times under it (DenseNet-121 at 64x64:
440 nodes and 32 MB become 1801 nodes and 746 MB), and the sanitizer copies and re-checks the whole model
after each transform. ``patterns.sanitizer_growth`` predicts that growth from the model's shapes, and lint
does not sanitize a model to which it would add more than ``patterns.SANITIZER_GROWTH_BUDGET_BYTES``: it
judges the model as it is and says so; and the backend refuses such a device segment before quantizing it
(AKC116), naming the nodes that add the most, so partitioning runs them on the host. The nets below are
generated (no DenseNet needed): the assertions count sanitizer calls, never seconds.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qanac import memory
from qanac.backends.akida import convert, patterns
from qanac.compiler import CompileRequest, compile_model
from qanac.diagnostics import Level, UnsupportedModelError
from qanac.graph import CompilationModel
from qanac.lint import lint_model
from qanac.progress import listening
from qanac.targets import get_target
from tests.akida import akida_models
from tests.akida.akida_models import GraphBuilder, tiny_cnn


def dense_net(layers: int, stem: int, growth: int, bottleneck: int = 32, size: int = 8) -> onnx.ModelProto:
    """A DenseNet block as torchvision exports it after qanac's pipeline: layer i reads the Concat of the stem
    and every earlier layer's output, through an affine BatchNorm (Mul, Add), ReLU, 1x1 Conv, ReLU, 3x3 Conv."""

    g = GraphBuilder()
    features = [g.relu(g.conv("input", "stem", 3, stem), "stem_relu")]
    for i in range(layers):
        channels = stem + growth * i
        x = g.op("Concat", list(features), f"l{i}_concat", axis=1)
        x = g.op("Mul", [x, g.constant(f"l{i}_scale", np.full((1, channels, 1, 1), 0.5))], f"l{i}_mul")
        x = g.op("Add", [x, g.constant(f"l{i}_shift", np.full((1, channels, 1, 1), 0.1))], f"l{i}_add")
        x = g.relu(g.conv(g.relu(x, f"l{i}_relu1"), f"l{i}_conv1", channels, bottleneck, k=1), f"l{i}_relu2")
        features.append(g.conv(x, f"l{i}_conv2", bottleneck, growth))
    channels = stem + growth * layers
    x = g.relu(g.conv(g.op("Concat", features, "out_concat", axis=1), "head", channels, channels, k=1), "head_relu")
    return g.model(g.classifier(x, channels), (3, size, size), [10])


def _identity_convs(model: onnx.ModelProto, view: onnx.ModelProto) -> list[int]:
    """The channel count of every Conv the view has and the model does not (1x1, C in and C out)."""

    names = {n.name for n in model.graph.node}
    kernels = {i.name: tuple(i.dims) for i in view.graph.initializer}
    return [kernels[n.input[1]][0] for n in view.graph.node
            if n.op_type == "Conv" and n.name not in names and kernels[n.input[1]][2:] == (1, 1)]


def test_the_predicted_growth_bounds_what_the_sanitizer_adds():
    model = dense_net(layers=6, stem=32, growth=16)
    growth = patterns.sanitizer_growth(model)
    added = _identity_convs(model, patterns.sanitized(model))
    assert len(added) >= 6 * 5 // 2  # at least one per two-input Concat of the split
    # every identity conv is predicted; the one extra prediction is the last Concat, which feeds a Conv
    assert len(added) <= growth.identity_convs <= len(added) + 1
    assert sum(4 * c * c for c in added) <= growth.identity_bytes
    assert growth.model_bytes == model.ByteSize() + growth.identity_bytes


def test_a_plain_model_grows_by_nothing():
    g = GraphBuilder()
    x = g.relu(g.conv("input", "stem", 3, 8), "stem_relu")
    x = g.relu(g.conv(x, "features", 8, 8), "features_relu")
    model = g.model(g.classifier(x, 8), (3, 8, 8), [10])
    growth = patterns.sanitizer_growth(model)
    assert (growth.identity_convs, growth.identity_bytes, growth.model_bytes) == (0, 0, model.ByteSize())


def _count_sanitize(monkeypatch, run: bool) -> list[int]:
    """Record every call of quantizeml's sanitize (the node count it gets); it runs when ``run``, else it
    raises as the sanitizer does on a model it refuses."""

    patterns.vendor()
    patterns.forget_sanitized()
    from quantizeml.onnx_support.quantization import transforms

    calls: list[int] = []
    real = transforms.sanitize

    def counting(model, *args, **kwargs):
        calls.append(len(model.nodes()))
        if not run:
            raise ValueError("sanitize was called")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(transforms, "sanitize", counting)
    return calls


def test_a_dense_net_beyond_the_budget_is_linted_without_sanitizing(monkeypatch):
    sanitize_calls = _count_sanitize(monkeypatch, run=False)
    model = dense_net(layers=40, stem=64, growth=32)
    assert len(model.graph.node) > 250
    growth = patterns.sanitizer_growth(model)
    assert growth.identity_bytes > patterns.SANITIZER_GROWTH_BUDGET_BYTES > 10 * model.ByteSize()

    steps = []
    with listening(steps.append):
        findings = lint_model(CompilationModel.from_onnx(model), get_target("akida"))

    assert sanitize_calls == []
    notes = [s.message for s in steps if s.step == "lint"]
    assert len(notes) == 1 and f"{growth.identity_convs} identity convolutions" in notes[0], notes
    # judged as it is: the affine BatchNorm after each Concat, which only the sanitizer's identity
    # convolution would absorb, stays on the host
    errors = {d.nodes[0] for d in findings if d.level == Level.ERROR}
    assert {f"l{i}_mul" for i in range(40)} <= errors


def test_a_model_within_the_budget_is_sanitized_once_per_lint(monkeypatch):
    sanitize_calls = _count_sanitize(monkeypatch, run=True)
    model = tiny_cnn()
    assert patterns.sanitizer_growth(model).identity_bytes <= patterns.SANITIZER_GROWTH_BUDGET_BYTES
    steps = []
    with listening(steps.append):
        lint_model(CompilationModel.from_onnx(model), get_target("akida"))
    assert len(sanitize_calls) == 1
    assert [s for s in steps if s.step == "lint"] == []


def plain_dense_net(layers: int, stem: int, growth: int, bottleneck: int = 32, size: int = 8) -> onnx.ModelProto:
    """A dense block without BatchNorm: each layer's Concat feeds its 1x1 Conv directly, so lint, judging the
    model as it is, accepts every node, and the whole net would be one device segment."""

    g = GraphBuilder()
    features = [g.relu(g.conv("input", "stem", 3, stem), "stem_relu")]
    for i in range(layers):
        channels = stem + growth * i
        x = g.op("Concat", list(features), f"l{i}_concat", axis=1) if i else features[0]
        x = g.relu(g.conv(x, f"l{i}_conv1", channels, bottleneck, k=1), f"l{i}_relu1")
        features.append(g.relu(g.conv(x, f"l{i}_conv2", bottleneck, growth), f"l{i}_relu2"))
    channels = stem + growth * layers
    x = g.relu(g.conv(g.op("Concat", features, "out_concat", axis=1), "head", channels, channels, k=1), "head_relu")
    return g.model(g.classifier(x, channels), (3, size, size), [10])


def test_the_backend_refuses_a_segment_beyond_the_budget_before_quantizing(monkeypatch):
    sanitize_calls = _count_sanitize(monkeypatch, run=False)
    model = plain_dense_net(layers=40, stem=64, growth=32)
    growth = patterns.sanitizer_growth(model)
    assert growth.identity_bytes > patterns.SANITIZER_GROWTH_BUDGET_BYTES
    assert lint_model(CompilationModel.from_onnx(model), get_target("akida")) == []

    with pytest.raises(UnsupportedModelError) as raised:
        convert.compile_onnx(model, akida_models.image_calibration(model, count=4))

    assert sanitize_calls == []
    [diagnostic] = raised.value.diagnostics
    assert diagnostic.code == "AKC116"
    # the Concats that add the most, deepest first, and just enough of them for the rest to fit
    named = diagnostic.nodes
    assert named == sorted(named, key=lambda n: -growth.by_node[n]) and named[0] == "out_concat"
    assert all(n.endswith("concat") for n in named)
    kept = growth.identity_bytes - sum(growth.by_node[n] for n in named)
    assert kept <= patterns.SANITIZER_GROWTH_BUDGET_BYTES < kept + growth.by_node[named[-1]]


def test_sanitizing_and_quantizing_return_the_memory_they_freed(monkeypatch):
    # glibc keeps what the sanitizer's many model copies freed: without a trim after each, every sanitize
    # of a compile (lint's view, then quantize() per segment) would stay resident
    releases = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: releases.append(True))
    model = tiny_cnn()
    patterns.sanitized(model)
    assert len(releases) == 1
    convert.quantize_onnx(model, akida_models.image_calibration(model, count=4).arrays["input"], "uint8")
    assert len(releases) == 2


def test_a_compile_whose_device_segment_is_the_whole_model_sanitizes_it_once(monkeypatch, tmp_path):
    # lint judges the sanitized model and the backend quantizes the same model: one sanitize serves both
    sanitize_calls = _count_sanitize(monkeypatch, run=True)
    model = tiny_cnn()
    onnx.save(model, tmp_path / "model.onnx")
    np.save(tmp_path / "calib.npy", akida_models.image_calibration(model, count=8).raw["input"])
    request = CompileRequest(source=str(tmp_path / "model.onnx"), target="akida", output=tmp_path / "bundle",
                             calibration=str(tmp_path / "calib.npy"))
    result = compile_model(request)
    segments = result.bundle_manifest.segments
    assert [s.kind for s in segments] == ["device"]
    assert len(sanitize_calls) == 1, sanitize_calls


def test_a_different_model_is_sanitized_again(monkeypatch):
    sanitize_calls = _count_sanitize(monkeypatch, run=True)
    model = tiny_cnn()
    patterns.sanitized(model)
    patterns.sanitized(model)
    patterns.sanitized(tiny_cnn(size=24))  # another input size: another sanitize
    patterns.sanitized(model)  # only the last result is kept
    assert len(sanitize_calls) == 3


def test_quantizing_with_the_kept_sanitize_is_quantizemls_own_quantize():
    import copy

    from quantizeml.models import QuantizationParams, quantize

    model = tiny_cnn()
    samples = akida_models.image_calibration(model, count=8).arrays["input"]
    patterns.sanitized(model)  # lint's sanitize, kept
    ours, _, _ = convert.quantize_onnx(model, samples, "uint8")
    theirs = quantize(copy.deepcopy(model), qparams=QuantizationParams(input_dtype="uint8"), samples=samples,
                      num_samples=len(samples), batch_size=len(samples))
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)


def test_metatfs_sanitizer_warnings_reach_the_compile_and_others_do_not(monkeypatch, request):
    import warnings

    from quantizeml.onnx_support.quantization import transforms

    _count_sanitize(monkeypatch, run=True)
    counting = transforms.sanitize

    def warning(model, *args, **kwargs):
        warnings.warn_explicit("a vendor note", UserWarning, "/site-packages/quantizeml/transforms.py", 1)
        warnings.warn_explicit("a library's deprecation", DeprecationWarning, "/site-packages/numpy/core.py", 1)
        return counting(model, *args, **kwargs)

    monkeypatch.setattr(transforms, "sanitize", warning)
    request.addfinalizer(patterns.forget_sanitized)  # the kept sanitize has the fake warning
    model = tiny_cnn()
    assert patterns.sanitized_with_warnings(model)[1] == ["a vendor note"]
    # quantizing reuses that sanitize, and its warning becomes a diagnostic of the compile
    _, diagnostics, _ = convert.quantize_onnx(model, akida_models.image_calibration(model, count=4).arrays["input"],
                                              "uint8")
    assert [d.message for d in diagnostics if d.code == "AKC199"] == ["quantizeml: a vendor note"]
