"""QANA for Akida IP v1 (AKD1000, the paper's chip): a sequential network of v1 layers.

Akida v1 runs sequential models only (no Add, Concat or Multiply of two tensors), bounded ReLUs, no
standalone depthwise convolution, and pools inside a layer before its activation. Its layers are
``InputConvolutional`` (``Conv [MaxPool] ReLU`` on the image), ``Convolutional`` / ``SeparableConvolutional``
(``Conv | SeparableConv [MaxPool | GAP] [ReLU]``) and ``FullyConnected`` (``[Flatten] Dense [ReLU]``). This
variant keeps the paper's widths, its halving per block, its separable convolutions, its bounded ReLUs and
its "spike generator", and drops what v1 cannot run (the Ghost Concat, the sigmoid gate, the residual Add,
squeeze-and-excitation)::

    stem      relu(bn(conv3x3(x)))                                       -> InputConvolutional
    block i   relu(bn(sep3x3(.)));  relu(maxpool2x2(bn(sep3x3(.))))      -> 2 SeparableConvolutional
    spike     spike_relu(bn(sep3x3(.)))                                  -> SeparableConvolutional, 1-bit
    head      linear(flatten(.))                                         -> FullyConnected

``relu`` is ``Clip(0, bound)`` (default 6: ReLU6). ``spike_relu`` is :class:`BinarySpike`, ``Clip(0, 1)``
whose output the v1 QAT recipe quantizes to 1 bit: the classifier reads the binary spike map (4x4 x 256 at
the default 64x64 input), the layer shape Akida v1's edge learning trains (a 1-bit activation feeding a
FullyConnected layer). The spike map is flattened, not globally pooled: v1's pooled layer is
``SeparableConv > GAP > ReLU``, and qanac's compile planning, which lints v1 devices with the IP v2 table,
sends a ReLU after a global pooling to the host. The first block widens from the stem; every block ends with
the 2x2 max pooling (the paper's average pooling, which v1 does not run inside a layer), so the input size
must be a multiple of ``2 ** blocks``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from qanac.diagnostics import UsageError
from qanac.zoo.qana import DEFAULT_INPUT_SIZE, DEFAULT_NUM_CLASSES, DEFAULT_WIDTHS, _pair, scale_widths


class SeparableConv2d(nn.Module):
    """Depthwise ``kernel`` x ``kernel`` convolution (no bias) then a pointwise 1x1 convolution: one v1 layer.

    Exports to ONNX as a depthwise Conv read only by a 1x1 Conv, which the v1 lowering fuses into a Keras
    ``SeparableConv2D``.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, bias: bool = False):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, kernel, padding=kernel // 2, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class BinarySpike(nn.Hardtanh):
    """``Clip(0, bound)`` that quantization-aware training quantizes to ``qat_bits`` = 1 bit (0 or the range)."""

    qat_bits = 1

    def __init__(self, bound: float = 1.0):
        super().__init__(0.0, bound)


def bounded_relu(bound: float) -> nn.Module:
    return nn.ReLU6() if bound == 6.0 else nn.Hardtanh(0.0, bound)


def separable_bn(cin: int, cout: int, act: nn.Module, pool: nn.Module | None = None) -> nn.Sequential:
    """``SeparableConv3x3 -> BN [-> pool] -> act``: one Akida v1 layer once BN is folded into the pointwise conv."""

    return nn.Sequential(SeparableConv2d(cin, cout), nn.BatchNorm2d(cout), *([pool] if pool is not None else []), act)


class QANAV1(nn.Module):
    """Sequential QANA for Akida v1 on float NCHW images in [0, 1]; returns logits of shape (N, num_classes)."""

    def __init__(
        self,
        variant: str = "v1",
        num_classes: int = DEFAULT_NUM_CLASSES,
        input_size: int | Sequence[int] = DEFAULT_INPUT_SIZE,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        width_mult: float = 1.0,
        in_channels: int = 3,
        stem_width: int | None = None,
        relu_bound: float = 6.0,
        spike_bound: float = 1.0,
        spike_width: int | None = None,
        dropout: float = 0.1,
    ):
        super().__init__()
        if variant != "v1":
            raise UsageError(f"QANAV1 builds the 'v1' variant, not {variant!r}")
        if num_classes < 2:
            raise UsageError(f"num_classes must be at least 2, got {num_classes}")
        if in_channels not in (1, 3):
            raise UsageError(f"Akida v1's input layer takes 1- or 3-channel images, not {in_channels}")
        if relu_bound <= 0 or spike_bound <= 0:
            raise UsageError("relu_bound and spike_bound must be positive: Akida v1 has bounded ReLUs only")
        height, width = _pair(input_size)
        widths = scale_widths(widths, width_mult)
        factor = 2 ** len(widths)
        if height % factor or width % factor or min(height, width) < factor:
            raise UsageError(f"input size {height}x{width} must be a positive multiple of {factor} "
                             f"({len(widths)} blocks halve the resolution)")
        final = (height // factor, width // factor)
        self.variant = variant
        self.num_classes = num_classes
        self.input_shape = (in_channels, height, width)
        self.widths = widths
        self.final_map = final

        stem = stem_width or max(8, widths[0] // 2)
        layers: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), bounded_relu(relu_bound))]
        cin = stem
        for w in widths:
            layers.append(nn.Sequential(
                separable_bn(cin, w, bounded_relu(relu_bound)),
                separable_bn(w, w, bounded_relu(relu_bound), pool=nn.MaxPool2d(2)),
            ))
            cin = w
        self.features = nn.Sequential(*layers)
        spike = spike_width or widths[-1]
        self.spike = separable_bn(cin, spike, BinarySpike(spike_bound))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(spike * final[0] * final[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.flatten(self.spike(self.features(x)), 1)))


def qana_v1(variant: str = "v1", **kwargs) -> QANAV1:
    """Build the v1 QANA; see :class:`QANAV1` for the keyword arguments."""

    return QANAV1(variant=variant, **kwargs)
