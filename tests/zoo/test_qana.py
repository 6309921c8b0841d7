import onnx
import pytest
import torch

from qanac.diagnostics import UsageError
from qanac.zoo.export import export_onnx
from qanac.zoo.profile import count_macs, count_parameters
from qanac.zoo.qana import qana

# Ops Akida IP v2 runs (quantizeml's pattern table) and what the BN fold leaves behind.
AKIDA_V2_OPS = {"Conv", "BatchNormalization", "MaxPool", "Relu", "Clip", "GlobalAveragePool", "Add", "Concat",
                "Flatten", "Gemm", "Constant", "Identity"}


@pytest.mark.parametrize("variant", ["paper", "native"])
def test_default_shapes(variant):
    model = qana(variant).eval()
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("variant", ["paper", "native"])
def test_configurable_widths_classes_input(variant):
    model = qana(variant, num_classes=4, input_size=(32, 48), widths=(8, 16, 24), width_mult=1.0).eval()
    assert model(torch.rand(3, 3, 32, 48)).shape == (3, 4)
    assert model.widths == (8, 16, 24)


def test_paper_size_matches_the_paper():
    model = qana("paper")
    # paper: ~265k parameters and ~36M MACs at 64x64 (the head now sees 256 pooled features)
    assert 255_000 < count_parameters(model) < 275_000
    assert 33e6 < count_macs(model, (3, 64, 64)) < 38e6


def test_width_mult_scales_to_even_widths():
    assert qana("native", width_mult=0.25).widths == (8, 16, 32, 64)
    assert qana("native", width_mult=0.3).widths == (10, 20, 38, 76)


def test_native_rejects_gap_beyond_akida_limit():
    with pytest.raises(UsageError, match="144"):
        qana("native", input_size=224)
    qana("paper", input_size=224)


@pytest.mark.parametrize("bad", [dict(input_size=60), dict(variant="other"), dict(attention="mul"),
                                 dict(num_classes=1), dict(width_mult=0), dict(downsample="avg"),
                                 dict(attention="additive")])
def test_bad_options_are_usage_errors(bad):
    kwargs = {"variant": "native", **bad}
    with pytest.raises(UsageError):
        qana(kwargs.pop("variant"), **kwargs)


@pytest.mark.parametrize("attention, downsample", [("context", "pool"), ("none", "pool"), ("context", "stride"),
                                                   ("additive", "stride"), ("none", "stride")])
def test_native_exports_only_akida_ops(attention, downsample):
    model = qana("native", attention=attention, downsample=downsample, width_mult=0.25, input_size=32)
    proto = export_onnx(model, (3, 32, 32))
    ops = {node.op_type for node in proto.graph.node}
    assert ops <= AKIDA_V2_OPS, ops - AKIDA_V2_OPS
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    for clip in clips:  # Clip(min=0, max=b): the only clip Akida fuses
        init = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
        consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                  if n.op_type == "Constant"}
        low = {**init, **consts}[clip.input[1]]
        assert float(low) == 0.0


def test_paper_exports_its_unsupported_ops():
    proto = export_onnx(qana("paper", width_mult=0.25, input_size=32), (3, 32, 32))
    ops = {node.op_type for node in proto.graph.node}
    assert {"Sigmoid", "Mul", "AveragePool"} <= ops


def test_primary_kernel_one_halves_the_parameters_of_the_ghost_primary():
    big, small = qana("native"), qana("native", primary_kernel=1)
    assert count_parameters(small) < 0.75 * count_parameters(big)
    assert small(torch.rand(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(UsageError):
        qana("native", primary_kernel=5)


def test_native_pools_at_the_end_of_each_block_by_default():
    """downsample="pool": the Ghost module runs at the block's input resolution (3x the MACs of "stride")
    and a 2x2 max pooling fused into the context conv halves it; the parameters are the same."""

    pooled, strided = qana("native"), qana("native", downsample="stride")
    assert count_parameters(pooled) == count_parameters(strided)
    pooled_macs, strided_macs = count_macs(pooled, (3, 64, 64)), count_macs(strided, (3, 64, 64))
    assert 3 * strided_macs < pooled_macs < 3.5 * strided_macs
    assert isinstance(pooled.features[1].context[-2], torch.nn.MaxPool2d)
    assert pooled.features[1].primary[0].stride == (1, 1) and strided.features[1].primary[0].stride == (2, 2)
    x = torch.rand(2, 3, 64, 64)
    assert pooled.eval()(x).shape == strided.eval()(x).shape == (2, 7)
