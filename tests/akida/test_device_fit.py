"""The NP estimate lint uses (backends/akida/device_fit.py) against akida's own mapper, and the lint rules on it.

The estimate is checked on one-layer akida models built from shapes (no quantization: mapping reads only
shapes), mapped with ``MapMode.Minimal`` on a device large enough for every shape, so the count is
akida's. The lint rules (AKM202, AKM203) are checked on small ONNX graphs; that they predict a real
``map()`` of a converted model is tests/akida/test_lint_reality.py's job.
"""

from __future__ import annotations

import itertools
import re

import akida
import onnx
import pytest
from akida.virtual_devices import create_device

from qanac.backends.akida import device_fit
from qanac.graph import CompilationModel
from qanac.lint import lint_model
from qanac.targets import get_target
from tests.akida.akida_models import GraphBuilder

SIZES = (4, 8, 14, 16, 28, 32, 56, 64, 112)
CHANNELS = (3, 16, 32, 64, 128, 256, 512)
KERNELS = (1, 3, 5, 7)


@pytest.fixture(scope="module")
def large_device():
    return create_device(400, 3)


def mapped_count(layer, size: int, channels: int, device) -> int | None:
    """The CNPs akida gives ``layer`` on a ``size`` x ``size`` x ``channels`` input; None when it cannot map
    at any size (a filter too big for a CNP, a count past an 8-bit field)."""

    model = akida.Model()
    model.add(akida.InputData((size, size, channels), input_bits=8))
    model.add(layer)
    try:
        model.map(device, hw_only=True, mode=akida.MapMode.Minimal)
    except RuntimeError as exc:
        needed = re.search(r"(\d+) are needed", str(exc))
        return int(needed.group(1)) if needed else None
    return len(model.layers[-1].mapping.nps)


def test_conv_estimate_matches_akida_on_most_shapes_and_is_never_high(large_device):
    shapes = [(s, c, k, f) for s, c, k in itertools.product(SIZES, CHANNELS, KERNELS) for f in (8, 256)]
    exact, compared = 0, 0
    for size, channels, kernel, filters in shapes:
        real = mapped_count(akida.Conv2D(filters, kernel, name="c"), size, channels, large_device)
        need = device_fit.conv_need(size, size, channels, filters, kernel)
        if real is None:  # akida refuses the filter itself: the estimate says not even one block fits
            assert need.filters_per_np == 0 or need.count > 255, (size, channels, kernel, filters)
            continue
        compared += 1
        exact += need.count == real
        # tolerance: the tiling is the smallest grid that fits; akida's is sometimes 1-2 tiles larger
        assert need.count <= real <= need.count * 1.17 + 1e-9, (size, channels, kernel, filters, need, real)
    assert compared > 400
    assert exact / compared >= 0.95, (exact, compared)


@pytest.mark.parametrize("channels, filters, kernel", [(16, 256, 3), (64, 512, 3), (128, 1024, 3), (256, 64, 3),
                                                       (512, 512, 3), (96, 256, 3), (192, 256, 1), (640, 256, 1),
                                                       (16, 256, 5), (64, 100, 5), (32, 256, 7)])
def test_filters_per_cnp_is_akidas(large_device, channels, filters, kernel):
    """At 4x4 the input is one tile, so the count is the number of filter groups."""

    real = mapped_count(akida.Conv2D(filters, kernel, name="c"), 4, channels, large_device)
    assert device_fit.conv_need(4, 4, channels, filters, kernel).count == real


@pytest.mark.parametrize("size, channels", [(8, 512), (16, 512), (32, 128), (32, 512), (56, 32), (56, 128),
                                            (56, 256), (64, 64), (64, 512)])
def test_depthwise_estimate_is_akidas(large_device, size, channels):
    real = mapped_count(akida.DepthwiseConv2D(3, name="c"), size, channels, large_device)
    assert device_fit.depthwise_need(size, size, channels).count == real


def test_device_units_come_from_the_mesh():
    assert device_fit.device_units("SixNodesIPv2") == (24, 24)
    assert device_fit.device_units("TwoNodesIPv2") == (8, 8)
    assert device_fit.devices_with(25) == ["TwelveNodesIPv2"]
    assert device_fit.devices_with(49) == []


def wide_model(filters: int, size: int = 32, pool: bool = True, width: int = 256, kernel: int = 3):
    """Conv 3->16 s2 (the input layer, on the HRC), Conv 16->width 3x3, Conv width->filters (``kernel``) at
    size/2, then [GAP, Gemm]; shapes inferred."""

    g = GraphBuilder()
    x = g.relu(g.conv("input", "c1", 3, 16, stride=2), "r1")
    x = g.relu(g.conv(x, "c2", 16, width), "r2")
    x = g.relu(g.conv(x, "c3", width, filters, k=kernel), "r3")
    half = size // 2
    if pool:
        model = g.model(g.classifier(x, filters), (3, size, size), [10])
    else:
        model = g.model(x, (3, size, size), [filters, half, half])
    return onnx.shape_inference.infer_shapes(model)


def lint(model, device=None):
    return lint_model(CompilationModel.from_onnx(model), get_target("akida"), device)


def codes(findings, code):
    return [f for f in findings if f.code == code]


def test_a_layer_that_fits_no_device_of_its_size_is_named_with_the_way_out():
    # 3x3 over 256 channels at 16x16: one tile, 16 filters per CNP -> 512 filters need 32 CNPs
    findings = codes(lint(wide_model(512, pool=False)), "AKM202")
    assert [f.nodes for f in findings] == [["c3"]]
    message = findings[0].message
    assert "needs about 32 CNP1" in message and "SixNodesIPv2 has 24" in message
    assert "TwelveNodesIPv2 (48 CNP1)" in message and "at most 384 filters on SixNodesIPv2" in message
    assert "--device auto" in findings[0].hint


def test_the_device_option_decides_and_auto_is_not_judged():
    model = wide_model(256, pool=False)  # 16 CNPs
    assert codes(lint(model), "AKM202") == []  # the default device, SixNodesIPv2, has 24
    assert codes(lint(model, "SixNodesIPv2"), "AKM202") == []
    assert [f.nodes for f in codes(lint(model, "TwoNodesIPv2"), "AKM202")] == [["c3"]]
    assert codes(lint(model, "auto"), "AKM202") == []


def test_global_pooling_over_a_map_larger_than_a_cnp_input():
    # c3 fuses the global pooling; its input is 6x6 (12x12 input, one stride 2) x width channels
    over = codes(lint(wide_model(32, size=12, width=1821, kernel=1)), "AKM203")  # 6*6*1821 = 65556 bytes
    assert [f.nodes for f in over] == [["c3"]]
    assert codes(lint(wide_model(32, size=12, width=1820, kernel=1)), "AKM203") == []  # 65520 bytes


def residual_model(inner: int):
    """Conv 3->16 s2 (input layer), f: 16->256, a: 256->inner, b: inner->256, Add(f, b), Relu, t: 256->32,
    GAP, Gemm at 16x16 (8x8 after the input layer); shapes inferred."""

    g = GraphBuilder()
    x = g.relu(g.conv("input", "c1", 3, 16, stride=2), "r1")
    f = g.relu(g.conv(x, "f", 16, 256), "rf")
    a = g.relu(g.conv(f, "a", 256, inner), "ra")
    b = g.conv(a, "b", inner, 256)
    x = g.relu(g.op("Add", [f, b], "add"), "radd")
    x = g.relu(g.conv(x, "t", 256, 32), "rt")
    return onnx.shape_inference.infer_shapes(g.model(g.classifier(x, 32), (3, 16, 16), [10]))


def test_a_residual_region_with_a_layer_too_large_falls_whole():
    # a: 256 -> 512 filters of 3x3 at 8x8 needs 32 CNPs, b: 512 -> 256 needs 32: the fork f and the layer
    # that reads the merge fall with them (quantizeml's sanitizer puts an identity conv after the Add; the
    # finding names the Add it stands for); t, after that conv, is outside the region
    findings = lint(residual_model(512))
    assert sorted(n for f in codes(findings, "AKM202") for n in f.nodes) == ["a", "b"]
    region = codes(findings, "AKM204")
    assert sorted(n for f in region for n in f.nodes) == ["add", "f"]
    assert "region of 5 layers where 'a', 'b' are too large" in region[0].message
    # TwelveNodesIPv2 holds each (48 CNPs), but not both at once (measured: the region still runs in software)
    twelve = lint(residual_model(512), "TwelveNodesIPv2")
    assert codes(twelve, "AKM202") == []
    assert "'a' and 'b' need 32 + 32 CNP1 together and TwelveNodesIPv2 has 48" in codes(twelve, "AKM204")[0].message


def test_a_residual_region_whose_consecutive_layers_do_not_fit_together_falls_whole():
    # a and b fit alone (16 CNPs each) but not together on 24
    findings = lint(residual_model(256))
    assert codes(findings, "AKM202") == []
    region = codes(findings, "AKM204")
    assert sorted(n for f in region for n in f.nodes) == ["a", "add", "b", "f"]
    assert "'a' and 'b' need 16 + 16 CNP1 together and SixNodesIPv2 has 24" in region[0].message
    assert codes(lint(residual_model(256), "TwelveNodesIPv2"), "AKM204") == []


@pytest.mark.parametrize("inner", [192, 128])
def test_a_residual_region_that_fits_is_not_reported(inner):
    findings = lint(residual_model(inner))  # a and b need 12 + 11 and 8 + 7 CNPs
    assert codes(findings, "AKM202") == [] and codes(findings, "AKM204") == []


@pytest.mark.slow
def test_lint_names_the_resnet18_layers_that_run_in_software(tmp_path):
    """Full-width torchvision ResNet-18 at 64x64 on SixNodesIPv2: map() puts the backbone from the stem's max
    pooling to the last block in one Software sequence (4.8 % of the MACs on hardware, measured; docs/akida.md).
    Lint names the four layer4 3x3 convolutions as too large and every other backbone convolution as part of
    their residual region, and leaves the input convolution (HRC) and the classifier (FNP) alone."""

    import torch
    import torchvision

    from qanac.compiler import CompileRequest, lint_for_target, prepare_model

    torch.manual_seed(0)
    path = tmp_path / "resnet18.onnx"
    torch.onnx.export(torchvision.models.resnet18(num_classes=10).eval(), (torch.zeros(1, 3, 64, 64),), str(path),
                      opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])
    prepared = prepare_model(CompileRequest(source=str(path), target="akida", output=tmp_path / "unused"),
                             calibration=None)
    findings = lint_for_target(get_target("akida"), prepared.model)
    too_large = {n for f in codes(findings, "AKM202") for n in f.nodes}
    assert too_large == {f"/layer4/layer4.{b}/conv{c}/Conv" for b in (0, 1) for c in (1, 2)}
    named = too_large | {n for f in codes(findings, "AKM204") for n in f.nodes}
    backbone = {n.name for n in prepared.model.graph.nodes if n.op == "Conv" and n.name.startswith("/layer")}
    assert backbone <= named
    assert "/conv1/Conv" not in named and "/fc/Gemm" not in named
