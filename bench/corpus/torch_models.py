"""PyTorch models of the corpus: torchvision and timm definitions, one or more per architecture family.

Never pretrained (``weights=None`` / ``pretrained=False``), 10 classes, 64x64 to 96x96 inputs. Each gets
BatchNorm statistics and a standardised readout from data (:func:`set_statistics_from_data`) and is
exported to ONNX (opset 17, eval mode, TorchScript exporter) with a float32 NCHW input in [0, 1].
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

NUM_CLASSES = 10


def _torchvision(name: str, **kwargs: Any) -> Callable[[], Any]:
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **kwargs)

    return build


def _timm(name: str, **kwargs: Any) -> Callable[[], Any]:
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)

    return build


def _vgg_half() -> Any:
    """VGG-11 with batch norm (torchvision's ``make_layers``), half width, global-average-pool head."""

    from torch import nn
    from torchvision.models.vgg import make_layers

    config = [32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256, "M"]
    return nn.Sequential(make_layers(config, batch_norm=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(256, NUM_CLASSES))


# name -> (factory, input size, family, source, what it is)
TORCH_MODELS: dict[str, tuple[Callable[[], Any], int, str, str, str]] = {
    "vgg11_bn_half": (_vgg_half, 64, "plain", "torchvision",
                      "torchvision VGG-11-BN features at half width, GAP + Linear head"),
    "resnet18": (_torchvision("resnet18"), 64, "residual", "torchvision", "torchvision resnet18"),
    "mobilenet_v2": (_torchvision("mobilenet_v2", width_mult=0.5), 64, "inverted residual", "torchvision",
                     "torchvision mobilenet_v2, width 0.5"),
    "mobilenet_v3_small": (_torchvision("mobilenet_v3_small", width_mult=0.75), 64, "inverted residual + SE",
                           "torchvision", "torchvision mobilenet_v3_small, width 0.75 (hard-swish, SE)"),
    "efficientnet_b0": (_torchvision("efficientnet_b0"), 64, "squeeze-and-excitation", "torchvision",
                        "torchvision efficientnet_b0 (SiLU, squeeze-and-excitation)"),
    "shufflenet_v2": (_torchvision("shufflenet_v2_x0_5"), 64, "channel shuffle", "torchvision",
                      "torchvision shufflenet_v2_x0_5"),
    "regnet_x_400mf": (_torchvision("regnet_x_400mf"), 64, "grouped conv", "torchvision",
                       "torchvision regnet_x_400mf (grouped 3x3 convs)"),
    "resnext26ts": (_timm("resnext26ts"), 64, "grouped conv", "timm", "timm resnext26ts (32 groups)"),
    "mixnet_s": (_timm("mixnet_s"), 64, "mixed kernels", "timm", "timm mixnet_s (3/5/7/9 kernels in one layer, SE)"),
    "densenet121": (_torchvision("densenet121"), 64, "dense concatenation", "torchvision", "torchvision densenet121"),
    "repvgg_a0": (_timm("repvgg_a0"), 64, "re-parameterised VGG", "timm",
                  "timm repvgg_a0, re-parameterised for deployment (timm.utils.reparameterize_model)"),
    "mobilevit_xxs": (_timm("mobilevit_xxs"), 64, "conv/attention hybrid", "timm", "timm mobilevit_xxs"),
}
# deployed in their inference form: training branches merged after the statistics are set
REPARAMETERIZED = frozenset({"repvgg_a0"})


def build_torch(name: str, samples: np.ndarray, seed: int) -> tuple[Any, dict[str, int]]:
    """The eval-mode model ``name`` with statistics from ``samples`` (float32 NCHW), re-parameterised
    when its entry says so, and the counts :func:`set_statistics_from_data` returns."""

    import torch

    torch.manual_seed(seed)
    model = TORCH_MODELS[name][0]()
    counts = set_statistics_from_data(model, torch.from_numpy(samples))
    if name in REPARAMETERIZED:
        from timm.utils.model import reparameterize_model

        model = reparameterize_model(model)
    return model.eval(), counts


def set_statistics_from_data(model, samples, batch_size: int = 32) -> dict[str, int]:
    """BatchNorm running statistics from ``samples``, then the readout standardised on them.

    1. Every BatchNorm's running mean and variance become the cumulative statistics of what it receives
       on ``samples`` (train-mode forward passes, ``momentum=None``; dropout and drop-path run too but
       change no statistic the model keeps).
    2. The readout (the last Linear or Conv2d module) gets its weight and
       bias rescaled so that each output unit has zero mean and unit variance over ``samples``, in eval
       mode: random features share a large common component, and without this one class wins for
       every input and top-1 agreement says nothing.
    """

    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for batch in samples.split(batch_size):
            model(batch)
    model.eval()
    readout = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    outputs: list = []
    handle = readout.register_forward_hook(lambda module, inputs, out: outputs.append(out.detach()))
    with torch.no_grad():
        for batch in samples.split(batch_size):
            model(batch)
    handle.remove()
    out = torch.cat(outputs)
    axes = [0, *range(2, out.ndim)]
    mean, std = out.mean(dim=axes), out.std(dim=axes)
    std = torch.where(std > 0, std, torch.ones_like(std))
    with torch.no_grad():
        shape = (-1,) + (1,) * (readout.weight.ndim - 1)
        readout.weight.div_(std.reshape(shape))
        bias = readout.bias if readout.bias is not None else torch.zeros_like(mean)
        new_bias = (bias - mean) / std
        if readout.bias is None:
            readout.bias = torch.nn.Parameter(new_bias)
        else:
            readout.bias.copy_(new_bias)
    return {"batchnorm": len(norms), "readout": 1}


def export_onnx(model, size: int, path: Path) -> None:
    """ONNX opset 17 with one float32 input ``input`` (1, 3, size, size) and output ``logits``."""

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.zeros(1, 3, size, size), str(path), input_names=["input"],
                          output_names=["logits"], opset_version=17, do_constant_folding=True, dynamo=False)
