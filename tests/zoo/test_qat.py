import numpy as np
import pytest
import torch
from torch import nn

from qanac.zoo.qana import qana
from qanac.zoo.qat import (
    FakeQuantReLU,
    QATConfig,
    QuantConvBN2d,
    convert_qat_to_float,
    fake_quantize_weight,
    prepare_qat,
)


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("bits,levels", [(8, 255), (4, 15)])
def test_weights_take_at_most_2b_minus_1_levels_per_channel(bits, levels):
    weight = torch.randn(16, 8, 3, 3)
    quantized = fake_quantize_weight(weight, bits)
    for channel in quantized:
        scale = channel.abs().max() / (2 ** (bits - 1) - 1)
        integers = channel / scale
        assert torch.allclose(integers, integers.round(), atol=1e-4)
        assert len(torch.unique(integers.round())) <= levels
        assert integers.round().abs().max() == 2 ** (bits - 1) - 1


def test_quantization_error_is_bounded_by_half_a_step():
    weight = torch.randn(8, 4, 1, 1)
    step = weight.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    assert torch.all((fake_quantize_weight(weight, 8) - weight).abs() <= step / 2 + 1e-7)


def _calibrate_bn(model, x):
    """Give the BN layers the statistics of ``x``, as float training would (QAT starts from those)."""

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def test_straight_through_gradients_reach_weights_bn_and_learned_clip():
    model = _calibrate_bn(qana("native", width_mult=0.25, input_size=32), torch.rand(16, 3, 32, 32))
    qmodel = prepare_qat(model, QATConfig(learn_clip=True))
    qmodel(torch.rand(4, 3, 32, 32)).sum().backward()
    folded = [m for m in qmodel.modules() if isinstance(m, QuantConvBN2d) and m.bn is not None]
    assert folded
    for m in folded:
        assert m.conv.weight.grad is not None and m.conv.weight.grad.abs().sum() > 0
        assert m.bn.weight.grad is not None
    clips = [m for m in qmodel.modules() if isinstance(m, FakeQuantReLU) and isinstance(m.bound, nn.Parameter)]
    assert clips and any(m.bound.grad is not None and m.bound.grad != 0 for m in clips)


def test_fold_equals_conv_then_bn_and_freezes_statistics():
    model = qana("native", width_mult=0.25, input_size=32).eval()
    _randomise_bn(model)
    x = torch.rand(4, 3, 32, 32)
    reference = model(x)
    exact = QATConfig(weight_bits=16, activation_bits=16, first_weight_bits=16)
    qmodel = prepare_qat(model, exact)
    bn = next(m.bn for m in qmodel.modules() if isinstance(m, QuantConvBN2d) and m.bn is not None)
    mean_before = bn.running_mean.clone()
    qmodel.train()
    qmodel(x)  # a training step must not move the folded statistics
    assert torch.equal(bn.running_mean, mean_before)
    qmodel.eval()
    assert torch.allclose(qmodel(x), reference, atol=2e-3, rtol=1e-3)


def test_every_conv_and_bn_of_the_native_variant_is_folded():
    qmodel = prepare_qat(qana("native", width_mult=0.25, input_size=32))
    assert not any(isinstance(m, nn.BatchNorm2d) for name, m in qmodel.named_modules()
                   if not name.endswith(".bn"))
    assert not any(type(m) is nn.Conv2d for name, m in qmodel.named_modules() if not name.endswith(".conv"))


def test_first_layer_bits_and_v1_preset():
    qmodel = prepare_qat(qana("native", width_mult=0.25, input_size=32), QATConfig.akida_v1())
    convs = [m for m in qmodel.modules() if isinstance(m, QuantConvBN2d)]
    assert convs[0].weight_bits == 8 and {c.weight_bits for c in convs[1:]} == {4}
    acts = [m for m in qmodel.modules() if isinstance(m, FakeQuantReLU)]
    assert {a.bits for a in acts} == {4}


def test_activation_levels():
    act = FakeQuantReLU(bits=4, bound=6.0).eval()
    out = act(torch.linspace(-2, 8, 1000))
    assert out.min() == 0 and out.max() == 6.0
    assert len(torch.unique(out)) <= 16


def test_convert_back_to_plain_float_model():
    model = qana("native", width_mult=0.25, input_size=32).eval()
    _randomise_bn(model)
    qmodel = prepare_qat(model, QATConfig(learn_clip=True))
    x = torch.rand(8, 3, 32, 32)
    qmodel.train()
    qmodel(x)  # initialise the tracked ranges
    qmodel.eval()
    plain = convert_qat_to_float(qmodel)
    kinds = {type(m) for m in plain.modules()}
    assert not kinds & {QuantConvBN2d, FakeQuantReLU, nn.BatchNorm2d}
    # the float copy carries the quantized weights: per channel, on a 255-level grid
    for conv in (m for m in plain.modules() if isinstance(m, nn.Conv2d)):
        w = conv.weight.detach()
        scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
        assert torch.allclose(w / scale, (w / scale).round(), atol=1e-3)
    # without activation rounding the outputs agree closely
    np.testing.assert_allclose(plain(x).detach(), qmodel(x).detach(), atol=0.15)
    assert (plain(x).argmax(1) == qmodel(x).argmax(1)).float().mean() >= 0.75


def test_paper_variant_keeps_float_only_parts():
    qmodel = prepare_qat(qana("paper", width_mult=0.25, input_size=32))
    assert any(isinstance(m, nn.Sigmoid) for m in qmodel.modules())
    assert qmodel(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert convert_qat_to_float(qmodel)(torch.rand(2, 3, 32, 32)).shape == (2, 7)
