"""One small PyTorch model per Akida lint rule (and models that must pass clean), for lint-vs-reality tests,
plus ONNX_CASES: spellings no PyTorch export produces, written with onnx.helper.

Each case is (builder, expected lint codes); DISABLED_PASSES names the pass a case must skip to reach its
rule (a BatchNorm input layer, say, is otherwise rewritten before lint sees it), and FIXED_BY_PASS adds the
same model with that pass on, which must then be clean. 32x32x3 input; the stem downsamples to 8x8 so a final global
pooling stays within the 144-pixel limit unless the case is about that limit.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn as nn

from tests.akida.akida_models import GraphBuilder


def cbr(cin, cout, k=3, s=1, g=1, d=1, p=None):
    return [nn.Conv2d(cin, cout, k, s, k // 2 * d if p is None else p, groups=g, dilation=d), nn.ReLU()]


def stem():
    return cbr(3, 16, 3, 2) + cbr(16, 16, 3, 2)


def head(c, n=5):
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n)]


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c, 1),
                               nn.Sigmoid())

    def forward(self, x):
        return x * self.f(x)


class ResidualConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(*stem())
        self.b = nn.Sequential(*cbr(16, 16))
        self.c = nn.Sequential(*cbr(16, 16))
        self.h = nn.Sequential(*head(32))

    def forward(self, x):
        y = self.a(x)
        return self.h(torch.cat([self.b(y) + y, self.c(y)], 1))


class Join(nn.Module):
    """Two conv branches of a 16-channel map, joined by Concat (32 channels) or a residual Add (16)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Sequential(*cbr(16, 16))
        self.b = nn.Sequential(*cbr(16, 16, 1))

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1) if self.how == "concat" else self.a(x) + x


class WideResidual(nn.Module):
    """f: 16 -> 256, then a: 256 -> inner, b: inner -> 256 added to f, at 8x8."""

    def __init__(self, inner: int):
        super().__init__()
        self.f = nn.Sequential(*stem(), *cbr(16, 256))
        self.ab = nn.Sequential(*cbr(256, inner), nn.Conv2d(inner, 256, 3, 1, 1))
        self.t = nn.Sequential(nn.ReLU(), *cbr(256, 32), *head(32))

    def forward(self, x):
        y = self.f(x)
        return self.t(y + self.ab(y))


S = nn.Sequential
CASES = {
    # must pass clean and map fully on hardware
    "clean_relu": (lambda: S(*stem(), *cbr(16, 32), *head(32)), set()),
    "clean_relu6": (lambda: S(*stem(), nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU6(), *head(32)), set()),
    "clean_depthwise": (lambda: S(*stem(), *cbr(16, 16, g=16), *cbr(16, 32, 1), *head(32)), set()),
    "clean_prelu_per_channel": (lambda: S(*stem(), nn.Conv2d(16, 32, 3, 1, 1), nn.PReLU(32), *head(32)), set()),
    "clean_hardswish": (lambda: S(*stem(), nn.Conv2d(16, 32, 3, 1, 1), nn.Hardswish(), *head(32)), set()),
    "clean_residual_concat": (ResidualConcat, set()),
    "clean_batchnorm_first": (lambda: S(nn.BatchNorm2d(3), *stem(), *cbr(16, 32), *head(32)), set()),
    "clean_depthwise_first": (lambda: S(*cbr(3, 3, 3, 2, g=3), *cbr(3, 32, 3, 2), *cbr(32, 32), *head(32)), set()),
    # errors: conversion fails or would be truncated
    "sigmoid": (lambda: S(*stem(), nn.Conv2d(16, 32, 3, 1, 1), nn.Sigmoid(), *head(32)), {"AKD102", "AKD113"}),
    "tanh": (lambda: S(*stem(), nn.Conv2d(16, 32, 3, 1, 1), nn.Tanh(), *head(32)), {"AKD102", "AKD113"}),
    "squeeze_excite": (lambda: S(*stem(), *cbr(16, 32), SqueezeExcite(32), *head(32)), {"AKD102", "AKD103", "AKD113"}),
    "clip_min_nonzero": (lambda: S(*stem(), nn.Conv2d(16, 32, 3, 1, 1), nn.Hardtanh(-1, 1), *head(32)), {"AKD104"}),
    "grouped_conv": (lambda: S(*stem(), *cbr(16, 32, g=4), *head(32)), {"AKD105"}),
    "dilated_conv": (lambda: S(*stem(), *cbr(16, 32, d=2), *head(32)), {"AKD106"}),
    "stride2_kernel5": (lambda: S(*stem(), *cbr(16, 32, 5, 2), *cbr(32, 32), *head(32)), {"AKD107"}),
    "depthwise_5x5_stride2": (lambda: S(*stem(), *cbr(16, 16, 5, 2, g=16), *cbr(16, 32, 1), *cbr(32, 32), *head(32)),
                              set()),
    "even_kernel": (lambda: S(*stem(), *cbr(16, 32, 2, 1, p=0), *head(32)), {"AKD108"}),
    "maxpool_padded": (lambda: S(*stem(), *cbr(16, 32), nn.MaxPool2d(3, 2, 1), *cbr(32, 32), *head(32)), {"AKD109"}),
    "batchnorm_first_unfolded": (lambda: S(nn.BatchNorm2d(3), *stem(), *cbr(16, 32), *head(32)), {"AKD110"}),
    "input_conv_gap": (lambda: S(nn.Conv2d(3, 16, 3, 4, 1), nn.ReLU(), *head(16)), {"AKD111", "AKD115", "AKD202"}),
    "average_pool": (lambda: S(*stem(), *cbr(16, 32), nn.AvgPool2d(2, 2), *cbr(32, 32), *head(32)), {"AKD112"}),
    "gap_after_maxpool": (lambda: S(*stem(), nn.Conv2d(16, 32, 3, 1, 1), nn.MaxPool2d(2, 2), nn.ReLU(), *head(32)),
                          {"AKD113", "AKD204"}),
    "maxpool_after_concat": (lambda: S(*stem(), Join("concat"), nn.MaxPool2d(2, 2), *cbr(32, 32), *head(32)),
                             {"AKD116"}),
    "maxpool_after_add": (lambda: S(*stem(), Join("add"), nn.MaxPool2d(2, 2), *cbr(16, 32), *head(32)), {"AKD116"}),
    "maxpool_without_activation": (lambda: S(*stem(), nn.Conv2d(16, 32, 3, 1, 1), nn.MaxPool2d(2, 2), *cbr(32, 32),
                                             *head(32)), {"AKD116"}),  # (Conv, MaxPool) is no quantizeml pattern
    "maxpool_after_activation": (lambda: S(*stem(), *cbr(16, 32), nn.MaxPool2d(2, 2), *cbr(32, 32), *head(32)), set()),
    "conv_pads_2": (lambda: S(*stem(), nn.Conv2d(16, 32, 3, 1, 2), nn.ReLU(), *head(32)), {"AKD115"}),
    "zero_pad_before_conv": (lambda: S(*stem(), nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(16, 32, 3, 2, 0), nn.ReLU(),
                                       *cbr(32, 32), *head(32)), set()),  # fuse-pad-into-conv
    "input_conv_without_padding": (lambda: S(nn.Conv2d(3, 16, 3, 2, 0), nn.ReLU(), *cbr(16, 16, 3, 2), *cbr(16, 32),
                                             *head(32)), set()),
    # warnings: converts, but the layer runs in software
    "conv_without_padding": (lambda: S(*stem(), nn.Conv2d(16, 32, 3, 1, 0), nn.ReLU(), *head(32)), {"AKD208"}),
    "depthwise_without_padding": (lambda: S(*stem(), nn.Conv2d(16, 16, 3, 1, 0, groups=16), nn.ReLU(), *cbr(16, 32, 1),
                                            *head(32)), {"AKD208"}),
    "gap_too_large": (lambda: S(*cbr(3, 16, 3, 2), *cbr(16, 32), *head(32)), {"AKD201"}),
    "gap_after_strided_conv": (lambda: S(*stem(), *cbr(16, 32, 3, 2), *head(32)), {"AKD202"}),
    "filter_too_big": (lambda: S(*stem(), *cbr(16, 704, 1), *cbr(704, 64), *head(64)), {"AKD203"}),
    "maxpool_before_dense": (lambda: S(*stem(), nn.Conv2d(16, 32, 3, 1, 1), nn.MaxPool2d(2, 2), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(32 * 4 * 4, 5)), {"AKD204"}),
    "dense_too_wide": (lambda: S(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU(), nn.Linear(64, 5)), {"AKD206"}),
    "input_conv_too_many_filters": (lambda: S(nn.Conv2d(3, 640, 3, 2, 1), nn.ReLU(), *cbr(640, 32, 1, 2), *cbr(32, 32),
                                              *head(32)), {"AKD205"}),
    # device fit on SixNodesIPv2 (24 CNPs), at the edge: a 3x3 conv over 256 channels at 8x8 puts 16 filters in
    # a CNP, so 384 filters need 24 and 392 need 25
    "fits_device_filters": (lambda: S(*stem(), *cbr(16, 256), *cbr(256, 384), *cbr(384, 32, 1), *head(32)), set()),
    "too_large_for_device_filters": (lambda: S(*stem(), *cbr(16, 256), *cbr(256, 392), *cbr(392, 32, 1), *head(32)),
                                     {"AKM202"}),
    # ... and over 128 channels at 32x32: 40 filters per CNP x 3 tiles of the map, so 320 filters need 24 and
    # 384 need 30
    "fits_device_tiles": (lambda: S(*cbr(3, 128), *cbr(128, 320), *cbr(320, 16, 1, 2), *cbr(16, 16, 3, 2),
                                    *cbr(16, 32), *head(32)), set()),
    "too_large_for_device_tiles": (lambda: S(*cbr(3, 128), *cbr(128, 384), *cbr(384, 16, 1, 2), *cbr(16, 16, 3, 2),
                                             *cbr(16, 32), *head(32)), {"AKM202"}),
    # a 3x3 conv over 256 channels with 256 filters at 8x8 needs 16 CNPs: SixNodesIPv2 has them, TwoNodesIPv2
    # (8) does not (DEVICES)
    "wide_conv": (lambda: S(*stem(), *cbr(16, 256), *cbr(256, 256), *cbr(256, 32, 1), *head(32)), set()),
    "wide_conv_two_nodes": (lambda: S(*stem(), *cbr(16, 256), *cbr(256, 256), *cbr(256, 32, 1), *head(32)),
                            {"AKM202"}),
    # a residual block whose two convs need 32 CNPs each: the fork and the layer after the merge fall with them;
    # with 16 + 16 each fits alone but not both on 24 CNPs; with 12 + 11 the block maps
    "residual_too_large": (lambda: WideResidual(512), {"AKM202", "AKM204"}),
    "residual_pair_too_large": (lambda: WideResidual(256), {"AKM204"}),
    "residual_fits": (lambda: WideResidual(192), set()),
    # the global pooling fused into a 1x1 conv over 8x8x1088 = 69632 bytes (a CNP holds 65536)
    "gap_over_split_map": (lambda: S(*stem(), *cbr(16, 1088, 1), *cbr(1088, 32, 1), *head(32)), {"AKM203"}),
}
# the device a case is linted and mapped on, when not the default (SixNodesIPv2)
DEVICES = {"wide_conv_two_nodes": "TwoNodesIPv2"}

# Cases whose rule an exact pass fixes. Each runs with that pass disabled (the rule itself must still
# predict MetaTF) and again as "<case>+<pass>" with the whole pipeline, where lint must find nothing and
# the model must convert with every layer on hardware.
FIXED_BY_PASS = {
    "batchnorm_first_unfolded": "batchnorm-to-affine",
    "grouped_conv": "grouped-conv-to-dense",
    "dilated_conv": "dilated-conv-to-dense",
    "stride2_kernel5": "strided-conv-to-stride1",
    "maxpool_padded": "split-padded-maxpool",
    "average_pool": "average-pool-to-depthwise",
    "gap_after_maxpool": "stage-global-average-pool",
    "gap_too_large": "stage-global-average-pool",
    "gap_after_strided_conv": "stage-global-average-pool",
    "maxpool_before_dense": "identity-conv-after-maxpool",
}
DISABLED_PASSES = {case: frozenset({name}) for case, name in FIXED_BY_PASS.items()}
# The identity conv identity-conv-after-maxpool puts after a max-pooled layer also gives the global pooling a
# Conv to fuse into: off too, to reach the rule.
DISABLED_PASSES["gap_after_maxpool"] |= {"identity-conv-after-maxpool"}
# a first BatchNorm that maps 0 to 0 (PyTorch's initial statistics) folds forward into the first conv: the
# case is about one that stays
DISABLED_PASSES["batchnorm_first_unfolded"] |= {"fold-batchnorm-into-conv"}
CASES.update({f"{case}+{name}": (CASES[case][0], set()) for case, name in FIXED_BY_PASS.items()})


def export(name: str, path) -> None:
    builder, _ = CASES[name]
    torch.manual_seed(0)
    model = builder().eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["y"])


def bounded_relu_model(spelling: str, pool: bool = True) -> onnx.ModelProto:
    """Conv(s2)/ReLU, Conv(s2)/ReLU, Conv with a bounded ReLU spelled ``spelling``, [GAP], Flatten, Gemm."""

    g = GraphBuilder()
    x = g.relu(g.conv("input", "c1", 3, 16, stride=2), "r1")
    x = g.relu(g.conv(x, "c2", 16, 16, stride=2), "r2")
    x = g.conv(x, "c3", 16, 32)
    six, zero = g.constant("six", np.array(6.0)), g.constant("zero", np.array(0.0))
    if spelling == "relu_min_max":  # tf2onnx's Keras ReLU(max_value=6)
        x = g.op("Max", [g.op("Min", [g.relu(x, "r3"), six], "min3"), zero], "max3")
    elif spelling == "min_only":  # no lower bound: not a ReLU
        x = g.op("Min", [x, six], "min3")
    if pool:
        x = g.op("GlobalAveragePool", [x], "gap")
        out = g.op("Flatten", [x], "flat")
        w, b = g.weight("fc_w", (10, 32)), g.weight("fc_b", (10,), scale=0.1)
        out = g.op("Gemm", [out, w, b], "logits", transB=1)
        return g.model(out, (3, 32, 32), [10])
    return g.model(x, (3, 32, 32), [32, 8, 8])


def prelu_model(slopes: np.ndarray) -> onnx.ModelProto:
    """Conv(s2)/ReLU, Conv(s2)/PReLU with ``slopes`` (16, 1, 1), Conv/ReLU, GAP, Flatten, Gemm."""

    g = GraphBuilder()
    x = g.relu(g.conv("input", "c1", 3, 16, stride=2), "r1")
    x = g.op("PRelu", [g.conv(x, "c2", 16, 16, stride=2), g.constant("slope", slopes)], "prelu")
    x = g.relu(g.conv(x, "c3", 16, 32), "r3")
    return g.model(g.classifier(x, 32), (3, 32, 32), [10])


# onnx.helper-built cases: (builder, expected lint codes). 3x32x32 input named "input".
ONNX_CASES = {
    # tf2onnx's Keras ReLU(max_value=6): quantizeml's sanitizer makes it one Clip(0, 6), fused with the GAP
    "relu_min_max_gap": (lambda: bounded_relu_model("relu_min_max"), set()),
    # a Min alone is a Clip without a lower bound: no bounded ReLU
    "min_without_max": (lambda: bounded_relu_model("min_only"), {"AKD104"}),
    # a PReLU with one slope per channel is no LeakyReLU, so no LUT activation
    "prelu_per_channel_slopes": (lambda: prelu_model(np.linspace(0.1, 0.4, 16).reshape(16, 1, 1)), {"AKD101"}),
}
