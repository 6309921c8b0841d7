"""Quantization-aware training that simulates what the Akida backend does to a model.

``prepare_qat(model, config)`` returns a copy of a float model in which

* every ``Conv2d`` directly followed by a ``BatchNorm2d`` in an ``nn.Sequential`` becomes one
  :class:`QuantConvBN2d` that folds the BN into the conv weights and bias with the BN's *running*
  statistics, exactly as the compiler folds it (quantizeml's sanitizer, or qanac's fold pass):
  ``w' = w * gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``. The
  running statistics are frozen during QAT (a fold with batch statistics would train against weights the
  compiler never sees); ``gamma`` and ``beta`` keep training. Other ``Conv2d`` and ``Linear`` layers get
  the same weight quantization without a fold.
* folded weights are fake-quantized per output channel, symmetric: ``scale = max|w_c| / (2**(b-1) - 1)``,
  integers in ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (255 levels at 8 bits, 15 at 4 bits), as quantizeml
  does; the first convolution may use its own bit width (8 bits on Akida v1). A
  :class:`~qanac.zoo.qana_v1.SeparableConv2d` followed by a BatchNorm becomes one
  :class:`QuantSeparableConvBN2d`: depthwise kernel quantized per tensor (quantizeml's SeparableConv2D),
  BN folded into the pointwise kernel, quantized per output channel.
* bounded activations (``ReLU6``, ``Hardtanh(0, b)``) become :class:`FakeQuantReLU`: clip to ``[0, b]``
  and round to ``2**bits - 1`` steps; with ``learn_clip`` the bound ``b`` is a trained parameter (PACT).
  An unbounded ``ReLU`` gets a bound tracked from the data (exponential moving average of the maximum).
  With ``calibrated_activations`` (the Akida v1 recipe) the steps follow the range quantizeml calibrates
  instead (:func:`calibrated_step`). A module with a ``qat_bits`` attribute is quantized to that many bits.
* outputs that Akida requantizes without an activation (a conv not followed by one, an :class:`Add`)
  are fake-quantized to signed ``bits`` with a range tracked the same way.

Everything uses the straight-through estimator: rounding passes gradients unchanged, clipping passes
them inside the range. Operations Akida cannot run (sigmoid gates, tensor products, average pooling,
a BatchNorm that follows a Concat) stay in float: QAT of the ``paper`` variant is a simulation of its
convolutions only.

``convert_qat_to_float(qat_model)`` returns a plain float model for ONNX export: folded convs with the
fake-quantized weights (values on the quantization grid, so the compiler's own per-channel quantization
reproduces them), ``Identity`` where the BNs were, and ``Clip(0, b)`` activations with the trained
bounds. A 1-bit activation (0, or its level ``s`` from ``s / 2`` on) is exported as ``Clip(0, s)`` of the
preceding convolution scaled by :data:`BINARY_EXPORT_GAIN` about its threshold ``s / 2``: a step from 0 to
``s`` over ``s / BINARY_EXPORT_GAIN``, so the compiled layer is binary at any activation bit width and exactly the
QAT model's at 1 bit.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qanac.diagnostics import UsageError
from qanac.zoo.qana import Add
from qanac.zoo.qana_v1 import SeparableConv2d

# Gain of a 1-bit activation's exported step (see the module docstring): features within s / (2 * gain) of
# the threshold s / 2 come out graded instead of binary at more than 1 bit.
BINARY_EXPORT_GAIN = 64.0


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """Bit widths and options of the simulated quantization.

    ``akida_v2()`` (the default) is what quantizeml's ONNX path produces: 8-bit weights and 8-bit
    activations. ``akida_v1()`` is the Akida v1 recipe of ``qanac compile --device AKD1000`` (quantizeml
    with ``activation_bits=4, weight_bits=4, input_weight_bits=8, per_tensor_activations=True``): 4-bit
    weights and activations, an 8-bit first layer, activation steps from the calibrated range
    (``calibrated_activations``).
    """

    weight_bits: int = 8
    activation_bits: int = 8
    first_weight_bits: int = 8
    learn_clip: bool = False
    quantize_outputs: bool = True
    range_momentum: float = 0.1
    calibrated_activations: bool = False

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits", "first_weight_bits"):
            bits = getattr(self, name)
            if not 2 <= bits <= 16:
                raise UsageError(f"QAT {name} must be between 2 and 16, got {bits}")
        if not 0.0 < self.range_momentum <= 1.0:
            raise UsageError(f"range_momentum must be in (0, 1], got {self.range_momentum}")

    @classmethod
    def akida_v2(cls, **overrides: Any) -> "QATConfig":
        return cls(**overrides)

    @classmethod
    def akida_v1(cls, **overrides: Any) -> "QATConfig":
        return cls(**{"weight_bits": 4, "activation_bits": 4, "first_weight_bits": 8, "calibrated_activations": True,
                      **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer in the forward pass, identity in the backward pass."""

    return x + (torch.round(x) - x).detach()


def fake_quantize_weight(weight: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """Symmetric fake quantization per output channel (axis 0) or per tensor, with a straight-through gradient."""

    int_max = 2 ** (bits - 1) - 1
    reduce = tuple(range(1 if per_channel else 0, weight.dim()))
    abs_max = weight.detach().abs().amax(dim=reduce, keepdim=True).clamp_min(2.0**-16)
    scale = abs_max / int_max
    return round_ste(weight / scale).clamp(-int_max, int_max) * scale


def _tracked_range(module: nn.Module, x: torch.Tensor, signed: bool) -> torch.Tensor:
    """Update (in training) and return the EMA of max|x| (signed) or max(x) (unsigned)."""

    if module.training:
        observed = (x.detach().abs() if signed else x.detach().clamp_min(0)).amax()
        if not bool(module.initialized):
            module.running_max.copy_(observed)
            module.initialized.fill_(True)
        else:
            module.running_max.lerp_(observed, module.momentum)
    return module.running_max.clamp_min(2.0**-16)


class FakeQuantSigned(nn.Module):
    """Signed fake quantization of a tensor whose range is tracked from the data."""

    def __init__(self, bits: int, momentum: float = 0.1):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bound = _tracked_range(self, x, signed=True)
        int_max = 2 ** (self.bits - 1) - 1
        scale = bound / int_max
        return round_ste(torch.maximum(torch.minimum(x, bound), -bound) / scale) * scale


def calibrated_step(range_max: torch.Tensor, bits: int) -> torch.Tensor:
    """The float step quantizeml's per-tensor unsigned OutputQuantizer gives an activation of range ``range_max``.

    quantizeml calibrates ``r`` (moving average of batch maxima), then equalizes it against the next layer:
    ``ideal = (2**bits - 1) * 2**(floor(log2 r) - bits)``, ``r`` scaled to ``ideal``, quantized with
    ``frac_bits = min(bits, bits - ceil(log2 ideal))``. For ``r >= 1`` that is ``2**bits - 1`` steps of
    ``r / (2**bits - 1)``; below 1 the clamp of ``frac_bits`` leaves fewer, coarser steps.
    """

    floor_log2 = torch.floor(torch.log2(range_max))
    ideal = (2**bits - 1) * torch.pow(2.0, floor_log2 - bits)
    frac_bits = torch.clamp(bits - torch.ceil(torch.log2(ideal)), max=float(bits))
    return torch.pow(2.0, -frac_bits) * range_max / ideal


class FakeQuantReLU(nn.Module):
    """ReLU clipped at ``bound`` and rounded to ``2**bits - 1`` steps of ``bound / (2**bits - 1)``.

    ``bound`` is fixed (ReLU6, Hardtanh), learned (``learn=True``, PACT: the gradient of the clip reaches
    the bound), or tracked from the data (``bound=None``: an unbounded ReLU). With ``calibrated=True`` the
    steps are quantizeml's for the range of the clipped output, tracked from the data
    (:func:`calibrated_step`; levels ``min(floor(x / step + 1/2), 2**bits - 1) * step``).
    """

    def __init__(self, bits: int, bound: float | None, learn: bool = False, momentum: float = 0.1,
                 calibrated: bool = False):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.tracked = bound is None
        self.calibrated = calibrated
        if self.tracked or calibrated:
            self.register_buffer("running_max", torch.zeros(()))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        if not self.tracked and learn:
            self.bound = nn.Parameter(torch.tensor(float(bound)))
        elif not self.tracked:
            self.register_buffer("bound", torch.tensor(float(bound)))

    def current_bound(self) -> torch.Tensor:
        return self.running_max.clamp_min(2.0**-16) if self.tracked else self.bound.abs().clamp_min(2.0**-8)

    def current_range(self) -> torch.Tensor:
        """The range the output is quantized over: the bound, or the tracked range when ``calibrated``."""

        return self.running_max.clamp_min(2.0**-16) if self.calibrated or self.tracked else self.current_bound()

    def step(self) -> torch.Tensor:
        """The float value of one output level (at 1 bit: the only non-zero output, reached from half of it)."""

        if self.calibrated:
            return calibrated_step(self.current_range(), self.bits)
        return self.current_bound() / (2**self.bits - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrated:
            clipped = F.relu(x) if self.tracked else torch.minimum(F.relu(x), self.current_bound())
            step = calibrated_step(_tracked_range(self, clipped, signed=False), self.bits)
            scaled = clipped / step
            levels = torch.clamp(scaled + (torch.floor(scaled + 0.5) - scaled).detach(), max=2**self.bits - 1)
            return levels * step
        bound = _tracked_range(self, x, signed=False) if self.tracked else self.current_bound()
        clipped = torch.minimum(F.relu(x), bound)
        scale = bound / (2**self.bits - 1)
        return round_ste(clipped / scale) * scale


class QuantConvBN2d(nn.Module):
    """A conv with an optional BatchNorm folded in (running statistics) and fake-quantized weights."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, weight_bits: int, output: nn.Module | None):
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.weight_bits = weight_bits
        self.output = output if output is not None else nn.Identity()

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv weight and bias with the BN folded in, before quantization."""

        weight = self.conv.weight
        bias = self.conv.bias if self.conv.bias is not None else torch.zeros_like(weight[:, 0, 0, 0])
        if self.bn is None:
            return weight, bias
        factor = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        return weight * factor.reshape(-1, 1, 1, 1), self.bn.bias + (bias - self.bn.running_mean) * factor

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self.folded()
        return fake_quantize_weight(weight, self.weight_bits), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.quantized()
        conv = self.conv
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self.output(y)


class QuantSeparableConvBN2d(QuantConvBN2d):
    """A :class:`SeparableConv2d` with an optional BatchNorm folded into its pointwise conv.

    The depthwise kernel is fake-quantized per tensor (quantizeml's SeparableConv2D quantizes it so), the
    folded pointwise kernel per output channel, both at ``weight_bits``; nothing is quantized between them
    (one Akida layer).
    """

    def __init__(self, separable: SeparableConv2d, bn: nn.BatchNorm2d | None, weight_bits: int,
                 output: nn.Module | None):
        super().__init__(separable.pointwise, bn, weight_bits, output)
        self.depthwise = separable.depthwise

    def quantized_depthwise(self) -> torch.Tensor:
        return fake_quantize_weight(self.depthwise.weight, self.weight_bits, per_channel=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dw = self.depthwise
        x = F.conv2d(x, self.quantized_depthwise(), None, dw.stride, dw.padding, dw.dilation, dw.groups)
        return super().forward(x)


class QuantLinear(nn.Module):
    """A linear layer with fake-quantized per-output weights."""

    def __init__(self, linear: nn.Linear, weight_bits: int, output: nn.Module | None = None):
        super().__init__()
        self.linear = linear
        self.weight_bits = weight_bits
        self.output = output if output is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize_weight(self.linear.weight, self.weight_bits)
        return self.output(F.linear(x, weight, self.linear.bias))


class QuantAdd(nn.Module):
    """An :class:`Add` whose output is requantized to signed ``bits``, as an Akida Add layer does."""

    def __init__(self, bits: int, momentum: float):
        super().__init__()
        self.output = FakeQuantSigned(bits, momentum)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.output(a + b)


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_PASS_THROUGH = (nn.MaxPool2d, nn.Dropout, nn.Identity)


def prepare_qat(model: nn.Module, config: QATConfig | None = None) -> nn.Module:
    """Copy ``model`` and replace its layers by their fake-quantized counterparts (see module doc).

    The copy is in training mode with BatchNorm statistics frozen; call it like the float model.
    """

    config = config or QATConfig()
    qmodel = copy.deepcopy(model)
    first_conv = next((m for m in qmodel.modules() if isinstance(m, nn.Conv2d)), None)
    if any(isinstance(m, (QuantConvBN2d, QuantLinear)) for m in qmodel.modules()):
        raise UsageError("the model is already prepared for QAT")
    _prepare_children(qmodel, config, first_conv)
    qmodel.train()
    return qmodel


def _prepare_children(module: nn.Module, config: QATConfig, first_conv: nn.Conv2d | None) -> None:
    names = list(module._modules)
    children = [module._modules[n] for n in names]
    sequential = isinstance(module, nn.Sequential)
    for index, (name, child) in enumerate(zip(names, children, strict=True)):
        if child is None:
            continue
        following = children[index + 1 :] if sequential else []
        if isinstance(child, (nn.Conv2d, SeparableConv2d)):
            bn = following[0] if following and isinstance(following[0], nn.BatchNorm2d) else None
            if bn is not None:
                bn.eval()
                bn.requires_grad_(True)
                module._modules[names[index + 1]] = nn.Identity()
            activated = _followed_by_activation(following[1:] if bn is not None else following)
            first = first_conv is not None and any(first_conv is m for m in child.modules())
            bits = config.first_weight_bits if first else config.weight_bits
            output = None
            if config.quantize_outputs and not activated:
                output = FakeQuantSigned(config.activation_bits, config.range_momentum)
            quant = QuantSeparableConvBN2d if isinstance(child, SeparableConv2d) else QuantConvBN2d
            module._modules[name] = quant(child, bn, bits, output)
        elif isinstance(child, nn.Linear):
            module._modules[name] = QuantLinear(child, config.weight_bits)
        elif isinstance(child, _ACTIVATIONS) and _bounded_range(child) is not None:
            module._modules[name] = _quant_activation(child, config)
        elif isinstance(child, Add):
            if config.quantize_outputs:
                module._modules[name] = QuantAdd(config.activation_bits, config.range_momentum)
        elif isinstance(child, (QuantConvBN2d, QuantLinear, FakeQuantReLU, FakeQuantSigned, QuantAdd)):
            continue
        else:
            _prepare_children(child, config, first_conv)


def _followed_by_activation(following: list[nn.Module]) -> bool:
    for module in following:
        if isinstance(module, _PASS_THROUGH):
            continue
        return isinstance(module, _ACTIVATIONS) and _bounded_range(module) is not None
    return False


def _bounded_range(act: nn.Module) -> tuple[float, float | None] | None:
    """``(0, bound)`` for ReLU-like activations (bound None when unbounded); None for anything else."""

    if isinstance(act, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(act, nn.Hardtanh):
        return (0.0, float(act.max_val)) if act.min_val == 0.0 else None
    if isinstance(act, nn.ReLU):
        return 0.0, None
    return None


def _quant_activation(act: nn.Module, config: QATConfig) -> FakeQuantReLU:
    _, bound = _bounded_range(act)
    return FakeQuantReLU(getattr(act, "qat_bits", config.activation_bits), bound,
                         learn=config.learn_clip and bound is not None, momentum=config.range_momentum,
                         calibrated=config.calibrated_activations)


def convert_qat_to_float(qat_model: nn.Module) -> nn.Module:
    """A plain float copy of a QAT model: folded convs with quantized weights, Clip(0, b) activations.

    Its outputs equal the QAT model's in eval mode except for activation rounding, which the compiler
    reintroduces. The result contains only standard torch layers and exports to ONNX.
    """

    model = copy.deepcopy(qat_model)
    _to_float_children(model)
    model.eval()
    return model


def _to_float_children(module: nn.Module) -> None:
    steps = _binary_steps(module) if isinstance(module, nn.Sequential) else {}
    for name, child in list(module._modules.items()):
        if isinstance(child, QuantConvBN2d):
            weight, bias = child.quantized()
            if name in steps:  # a 1-bit activation of level s reads this conv: y = Clip(0, s)(gain * (z - s/2) + s/2)
                gain, half = BINARY_EXPORT_GAIN, steps[name] / 2
                weight, bias = weight * gain, bias * gain + (1.0 - gain) * half
            conv = child.conv
            plain = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
            )
            with torch.no_grad():
                plain.weight.copy_(weight)
                plain.bias.copy_(bias)
            if isinstance(child, QuantSeparableConvBN2d):
                dw = child.depthwise
                separable = SeparableConv2d(dw.in_channels, conv.out_channels, dw.kernel_size[0], bias=True)
                with torch.no_grad():
                    separable.depthwise.weight.copy_(child.quantized_depthwise())
                separable.pointwise = plain
                plain = separable
            module._modules[name] = plain
        elif isinstance(child, QuantLinear):
            plain = nn.Linear(child.linear.in_features, child.linear.out_features)
            with torch.no_grad():
                plain.weight.copy_(fake_quantize_weight(child.linear.weight, child.weight_bits))
                plain.bias.copy_(child.linear.bias)
            module._modules[name] = plain
        elif isinstance(child, FakeQuantReLU):
            bound = float(child.current_bound().detach())
            if child.bits == 1:
                module._modules[name] = nn.Hardtanh(0.0, float(child.step().detach()))
            elif child.tracked:
                module._modules[name] = nn.ReLU()
            else:
                module._modules[name] = nn.ReLU6() if bound == 6.0 else nn.Hardtanh(0.0, bound)
        elif isinstance(child, QuantAdd):
            module._modules[name] = Add()
        elif isinstance(child, FakeQuantSigned):
            module._modules[name] = nn.Identity()
        else:
            _to_float_children(child)


def _binary_steps(sequence: nn.Sequential) -> dict[str, float]:
    """Convs of ``sequence`` read by a 1-bit activation through pass-through layers only: name -> its level."""

    steps: dict[str, float] = {}
    conv_name = None
    for name, child in sequence._modules.items():
        if isinstance(child, QuantConvBN2d):
            conv_name = name
        elif isinstance(child, FakeQuantReLU) and child.bits == 1 and conv_name is not None:
            steps[conv_name] = float(child.step().detach())
            conv_name = None
        elif not isinstance(child, _PASS_THROUGH):
            conv_name = None
    return steps
