"""QANA (Quantization-Aware Neuromorphic Architecture) in PyTorch, in two variants.

``paper`` follows the architecture of the QANA paper and its released Keras code, with the head bug
fixed. Four blocks of widths 32/64/128/256, each::

    ghost   = concat(p, cheap(p)),  p = conv1x1(x) -> f/2,  cheap = separable conv3x3 f/2 -> f/2
    ghost   = dropout(relu6(bn(ghost)))
    gated   = ghost * sigmoid(conv1x1(bn(depthwise3x3(ghost))))     "spatial channel gate" (ECA)
    out     = avgpool2x2(gated + bn(conv1x1(x)))                    residual projection

then the "spike generator" (separable conv3x3, BN, ReLU bounded at 1) with squeeze-and-excitation
(GAP, 1x1 conv to C/16, ReLU, 1x1 conv to C, sigmoid, multiply), global average pooling and a dense
head. The released code applies the dense head to the 4x4x256 map and does not build; here the map is
pooled first. The released code's separable 1x1 convolutions (a depthwise 1x1 scale followed by a
pointwise conv) are plain 1x1 convs: the per-channel scale is redundant with the pointwise weights.
With the default widths the model has 263k parameters (the paper states ~265k) and 35M MACs at 64x64.

``native`` keeps the block structure but uses only what Akida IP v2 runs in hardware (see
``docs/qana.md`` and ``docs/akida.md``): every convolution is a ``Conv [MaxPool] [ReLU6 | Clip(0, b)]
[GAP]`` pattern, a depthwise conv, an Add, a Concat or a Gemm. Each block (``downsample="pool"``, the
default)::

    p       = relu6(bn(conv3x3(x)))                              Ghost primary, full resolution
    ghost   = concat(p, relu6(bn(conv1x1(bn(depthwise3x3(p))))))  Ghost cheap branch
    context = relu6(maxpool2x2(bn(conv1x1(relu6(bn(depthwise3x3(ghost)))))))
    out     = context + bn(conv1x1/2(x))                          residual projection, stride 2

* Spatial gate -> context branch: Akida cannot multiply two tensors nor evaluate a bare sigmoid, so the
  gate becomes a branch that sees a 3x3 neighbourhood per channel and mixes channels like the paper's
  gate, and is *added* to the residual, which the device runs.
* Downsampling: the paper pools at the end of the block; non-global AveragePool does not exist on
  Akida, so the 2x2 pooling is a max pooling fused into the context conv (``Conv -> BN -> MaxPool ->
  ReLU6`` is one Akida layer; without the ReLU6 quantizeml cannot quantize the pooling), and the
  residual projection is a stride-2 1x1 conv (Akida strides 1x1 and 3x3 kernels). ``downsample="stride"``
  instead strides the Ghost primary conv (the block then works at half resolution: 3x fewer MACs, but
  measured far less accurate where locating the object matters, see docs/qana.md).
* Ghost: primary and cheap branch each end in BN + ReLU6 (as in GhostNet), so each is one Akida layer;
  BN after a Concat would not fold into a conv.
* Spike generator: separable conv3x3 with BN, Clip(0, ``spike_bound``) and fused GAP (the final map must
  have at most 144 pixels); squeeze-and-excitation is left out (a multiply by a tensor).
* The first layer is a standard 3x3 conv stem (Akida's input layer must be a standard convolution and
  feeds a single consumer).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from qanac.diagnostics import UsageError

VARIANTS = ("paper", "native")
DEFAULT_WIDTHS = (32, 64, 128, 256)
DEFAULT_INPUT_SIZE = 64
DEFAULT_NUM_CLASSES = 7
AKIDA_GAP_MAX_PIXELS = 144
ATTENTIONS = ("context", "additive", "none")
DOWNSAMPLING = ("pool", "stride")


class Add(nn.Module):
    """Element-wise sum of two tensors, as a module so QAT can quantize its output like Akida does."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


def conv_bn(
    cin: int,
    cout: int,
    kernel: int = 1,
    stride: int = 1,
    groups: int = 1,
    pool: bool = False,
    act: nn.Module | None = None,
) -> nn.Sequential:
    """``Conv -> BN [-> MaxPool2x2] [-> act]``: one Akida layer once BN is folded into the conv."""

    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


def depthwise(channels: int, kernel: int = 3, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=bias)


def bounded_relu(bound: float) -> nn.Module:
    """ReLU clipped at ``bound``; exports to ONNX ``Clip(0, bound)``, which Akida fuses into a conv."""

    return nn.ReLU6() if bound == 6.0 else nn.Hardtanh(0.0, bound)


class PaperBlock(nn.Module):
    """Ghost module, multiplicative spatial channel gate, residual projection, 2x2 average pooling."""

    def __init__(self, cin: int, width: int, dropout: float):
        super().__init__()
        half = width // 2
        self.primary = nn.Conv2d(cin, half, 1)
        self.cheap = nn.Sequential(depthwise(half, bias=False), nn.Conv2d(half, half, 1))
        self.post = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU6(), nn.Dropout(dropout))
        self.gate = nn.Sequential(depthwise(width), nn.BatchNorm2d(width), nn.Conv2d(width, width, 1), nn.Sigmoid())
        self.residual = nn.Sequential(nn.Conv2d(cin, width, 1), nn.BatchNorm2d(width))
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.primary(x)
        ghost = self.post(torch.cat([primary, self.cheap(primary)], dim=1))
        gated = ghost * self.gate(ghost)
        return self.pool(gated + self.residual(x))


class NativeBlock(nn.Module):
    """Akida-native block: Ghost module, residual projection, spatial context branch, downsampling by 2.

    ``y = concat(p, cheap(p))`` with ``p = relu6(bn(conv(x)))``; the residual is a stride-2 1x1 projection
    ``r(x)``; ``ctx = bn(conv1x1(relu6(bn(depthwise3x3(.)))))``.

    ``downsample="pool"``: ``p`` keeps the input's resolution and the block's output is
    ``relu6(maxpool2x2(ctx(y))) + r(x)``; with ``attention="none"`` the context branch is a plain
    ``relu6(maxpool2x2(bn(conv1x1(y))))`` transition. ``attention="additive"`` needs ``"stride"``.

    ``downsample="stride"``: ``p`` is computed with stride 2 and ``attention`` decides how ``y`` meets
    ``r(x)``:

    * ``none``:     ``z = y + r(x)``. quantizeml inserts an identity 1x1 conv between the Concat and the
      Add (an Add needs power-of-two input scales, a Concat does not provide them).
    * ``context``:  ``z = ctx(y) + r(x)``: the identity conv becomes a learned spatial-context conv at the
      same place and almost the same cost.
    * ``additive``: ``z = m + ctx(m)``, ``m = y + r(x)``: a residual context branch after the merge.
      Three more layers per block; at full width it needs more than the 24 NPs of SixNodesIPv2.
    """

    def __init__(self, cin: int, width: int, dropout: float, attention: str, primary_kernel: int = 3,
                 downsample: str = "pool"):
        super().__init__()
        half = width // 2
        pool = downsample == "pool"
        self.attention = attention
        self.primary = conv_bn(cin, half, primary_kernel, stride=1 if pool else 2, act=nn.ReLU6())
        self.cheap = nn.Sequential(
            depthwise(half, bias=False),
            nn.BatchNorm2d(half),
            *conv_bn(half, half, 1, act=nn.ReLU6()),
        )
        self.dropout = nn.Dropout(dropout)
        self.residual = conv_bn(cin, width, 1, stride=2)
        self.residual_add = Add()
        self.context = None
        if attention != "none":
            self.context = nn.Sequential(
                depthwise(width, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU6(),
                *conv_bn(width, width, 1, pool=pool, act=nn.ReLU6() if pool else None),
            )
        self.transition = conv_bn(width, width, 1, pool=True, act=nn.ReLU6()) if pool and self.context is None else None
        if attention == "additive":
            self.context_add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.primary(x)
        ghost = self.dropout(torch.cat([primary, self.cheap(primary)], dim=1))
        if self.attention == "context":
            return self.residual_add(self.context(ghost), self.residual(x))
        if self.transition is not None:
            return self.residual_add(self.transition(ghost), self.residual(x))
        merged = self.residual_add(ghost, self.residual(x))
        if self.attention == "none":
            return merged
        return self.context_add(merged, self.context(merged))


class SqueezeExcitation(nn.Module):
    """Multiplicative squeeze-and-excitation over a feature map (paper variant)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.excite = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excite(x)


class QANA(nn.Module):
    """QANA classifier on float NCHW images in [0, 1]; returns logits of shape (N, num_classes)."""

    def __init__(
        self,
        variant: str = "paper",
        num_classes: int = DEFAULT_NUM_CLASSES,
        input_size: int | Sequence[int] = DEFAULT_INPUT_SIZE,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        width_mult: float = 1.0,
        in_channels: int = 3,
        dropout: float = 0.25,
        spike_bound: float = 1.0,
        se_reduction: int = 16,
        attention: str = "context",
        stem_width: int | None = None,
        primary_kernel: int = 3,
        downsample: str = "pool",
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise UsageError(f"unknown QANA variant {variant!r}", hint=f"choose one of {', '.join(VARIANTS)}")
        if attention not in ATTENTIONS:
            raise UsageError(
                f"unknown attention {attention!r} for the native variant", hint=f"one of {', '.join(ATTENTIONS)}"
            )
        if downsample not in DOWNSAMPLING:
            raise UsageError(f"unknown downsample {downsample!r}", hint=f"one of {', '.join(DOWNSAMPLING)}")
        if variant == "native" and downsample == "pool" and attention == "additive":
            raise UsageError("additive attention merges before the context branch and needs downsample='stride'")
        if primary_kernel not in (1, 3):
            raise UsageError(f"primary_kernel must be 1 or 3 (Akida strides only those), got {primary_kernel}")
        if num_classes < 2:
            raise UsageError(f"num_classes must be at least 2, got {num_classes}")
        height, width = _pair(input_size)
        widths = scale_widths(widths, width_mult)
        final = _check_input_size(variant, (height, width), len(widths))
        self.variant = variant
        self.num_classes = num_classes
        self.input_shape = (in_channels, height, width)
        self.widths = widths
        self.final_map = final

        blocks: list[nn.Module] = []
        if variant == "paper":
            cin = in_channels
            for w in widths:
                blocks.append(PaperBlock(cin, w, dropout))
                cin = w
        else:
            stem = stem_width or max(8, widths[0] // 2)
            blocks.append(nn.Sequential(*conv_bn(in_channels, stem, 3, act=nn.ReLU6()),
                                        *conv_bn(stem, stem, 1, act=nn.ReLU6())))
            cin = stem
            for w in widths:
                blocks.append(NativeBlock(cin, w, dropout, attention, primary_kernel, downsample))
                cin = w
        self.features = nn.Sequential(*blocks)

        channels = widths[-1]
        spike = [
            depthwise(channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            bounded_relu(spike_bound),
        ]
        if variant == "paper":
            spike.append(SqueezeExcitation(channels, se_reduction))
        self.spike = nn.Sequential(*spike, nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(self.spike(self.features(x)), 1)
        return self.head(pooled)


def qana(variant: str = "paper", **kwargs) -> QANA:
    """Build a QANA model; see :class:`QANA` for the keyword arguments."""

    return QANA(variant=variant, **kwargs)


def scale_widths(widths: Sequence[int], width_mult: float) -> tuple[int, ...]:
    """Multiply block widths by ``width_mult``, rounded to an even number of at least 8 channels."""

    if width_mult <= 0:
        raise UsageError(f"width_mult must be positive, got {width_mult}")
    if not widths:
        raise UsageError("widths must name at least one block")
    scaled = tuple(max(8, 2 * round(w * width_mult / 2)) for w in widths)
    if any(w % 2 for w in widths):
        raise UsageError(f"block widths must be even (Ghost halves them), got {tuple(widths)}")
    return scaled


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise UsageError(f"input_size must be an int or (height, width), got {size}")
    return size  # type: ignore[return-value]


def _check_input_size(variant: str, size: tuple[int, int], num_blocks: int) -> tuple[int, int]:
    factor = 2**num_blocks
    if size[0] % factor or size[1] % factor or min(size) < factor:
        raise UsageError(
            f"input size {size[0]}x{size[1]} must be a positive multiple of {factor} "
            f"({num_blocks} blocks halve the resolution)"
        )
    final = (size[0] // factor, size[1] // factor)
    if variant == "native" and final[0] * final[1] > AKIDA_GAP_MAX_PIXELS:
        raise UsageError(
            f"input size {size[0]}x{size[1]} leaves a {final[0]}x{final[1]} map for global average pooling; "
            f"Akida v2 pools at most {AKIDA_GAP_MAX_PIXELS} pixels in hardware",
            hint=f"use an input of at most {12 * factor}x{12 * factor} or add a block",
        )
    return final
