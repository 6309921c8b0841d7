"""Size and cost of a PyTorch model: parameter count and multiply-accumulates per image.

MACs count convolutions (``out_pixels * out_channels * in_channels / groups * kh * kw``) and linear
layers (``in * out``), measured by running one image through forward hooks; element-wise operations,
normalisation and pooling are not counted. This is the convention of Akida's ``model.macs``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (BatchNorm running statistics are buffers and not counted)."""

    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on a single input of shape ``(C, H, W)``."""

    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        per_output = module.in_channels // module.groups * kh * kw
        total += output[0].numel() * per_output

    def linear_hook(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total
