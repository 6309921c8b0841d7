"""QANA for Akida IP v1: the sequential ``v1`` variant, its 4-bit QAT of the v1 recipe with a 1-bit spike
generator, and `qanac compile --device AKD1000` of a trained run with every MAC on the device and the compiled
model classifying like the QAT model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qanac.diagnostics import UsageError
from qanac.zoo.export import export_onnx
from qanac.zoo.qana_v1 import BinarySpike, SeparableConv2d
from qanac.zoo.qat import (
    BINARY_EXPORT_GAIN,
    FakeQuantReLU,
    QATConfig,
    QuantSeparableConvBN2d,
    calibrated_step,
    convert_qat_to_float,
    prepare_qat,
)
from qanac.zoo.registry import create_model, get_entry, qat_config, resolve_spec

TINY = dict(input_size=32, width_mult=0.25)
V1_OPS = {"Conv", "Clip", "MaxPool", "Flatten", "Gemm"}


def test_v1_is_registered_with_the_v1_recipe():
    entry = get_entry("qana")
    assert "v1" in entry.variants and entry.default_variant == "native"
    assert qat_config(resolve_spec("qana", "v1")) == QATConfig.akida_v1()
    assert qat_config(resolve_spec("qana", "native")) == QATConfig.akida_v2()
    recipe = QATConfig.akida_v1()
    assert (recipe.weight_bits, recipe.activation_bits, recipe.first_weight_bits) == (4, 4, 8)
    assert recipe.calibrated_activations


def test_default_model_size_is_the_papers():
    model = create_model("qana", "v1")
    assert model.input_shape == (3, 64, 64) and model.final_map == (4, 4)
    assert 200_000 < sum(p.numel() for p in model.parameters()) < 265_000  # the paper: ~265k
    assert model.head.in_features == 4 * 4 * 256  # the flattened 1-bit spike map
    with pytest.raises(UsageError, match="multiple of 16"):
        create_model("qana", "v1", input_size=40)


def test_exported_graph_is_sequential_and_passes_the_v1_rules():
    from backends.akida.v1.rules import v1_findings

    proto = export_onnx(create_model("qana", "v1", **TINY), (3, 32, 32))
    ops = [node.op_type for node in proto.graph.node if node.op_type not in ("Constant", "Identity")]
    assert set(ops) == V1_OPS
    assert ops[-3:] == ["Clip", "Flatten", "Gemm"]  # the spike generator's ReLU feeds the classifier
    readers: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    assert max(readers[node.output[0]] for node in proto.graph.node if node.op_type in V1_OPS - {"Gemm"}) == 1
    assert [d for d in v1_findings(proto) if d.level.name == "ERROR"] == []


@pytest.mark.parametrize(("range_max", "bits", "step"), [
    (6.0, 4, 6 / 15), (1.0, 4, 1 / 15), (3.0, 2, 1.0), (1.0, 1, 1.0),
    # below 1 quantizeml clamps the fractional bits at the bit width: 0.25 keeps 4 of its 15 steps
    (0.25, 4, 1 / 16 * 0.25 / (15 / 64)),
])
def test_calibrated_step_is_quantizemls(range_max, bits, step):
    assert float(calibrated_step(torch.tensor(range_max), bits)) == pytest.approx(step)


def _qat_v1(seed: int = 0):
    """A QAT v1 model whose BatchNorms normalise random images (running statistics from 30 batches), with the
    spike pre-activations centred on the 1-bit threshold, as after training."""

    torch.manual_seed(seed)
    model = create_model("qana", "v1", **TINY)
    x = torch.rand(64, 3, 32, 32)
    model.train()
    with torch.no_grad():
        for _ in range(30):
            model(x)
        model.spike[1].bias.fill_(0.5)
    qmodel = prepare_qat(model.eval(), QATConfig.akida_v1())
    qmodel(x)  # track the activation ranges (training mode)
    return qmodel.eval(), x


def test_qat_layers_follow_the_v1_recipe():
    qmodel, _ = _qat_v1()
    separables = [m for m in qmodel.modules() if isinstance(m, QuantSeparableConvBN2d)]
    assert len(separables) == 9 and {m.weight_bits for m in separables} == {4}
    stem = qmodel.features[0][0]
    assert stem.weight_bits == 8
    acts = [m for m in qmodel.modules() if isinstance(m, FakeQuantReLU)]
    assert [a.bits for a in acts] == [4] * 9 + [1] and all(a.calibrated for a in acts)
    depthwise = separables[0].quantized_depthwise().detach()  # one scale for the whole depthwise kernel
    scale = depthwise.abs().max() / 7
    assert torch.equal((depthwise / scale).round(), (depthwise / scale).round().clamp(-7, 7))
    torch.testing.assert_close(depthwise / scale, (depthwise / scale).round(), atol=1e-4, rtol=0)


def test_spike_features_are_binary_and_the_float_export_keeps_them():
    qmodel, x = _qat_v1()
    spike_act = qmodel.spike[2]
    level = float(spike_act.step())
    with torch.no_grad():
        hidden = qmodel.features(x)
        features = qmodel.spike(hidden)
        assert set(torch.unique(features).tolist()) == {0.0, level}
        plain = convert_qat_to_float(qmodel)
        assert not any(isinstance(m, (QuantSeparableConvBN2d, FakeQuantReLU, nn.BatchNorm2d))
                       for m in plain.modules())
        assert isinstance(plain.spike[0], SeparableConv2d)
        exported = plain.spike(hidden)
        # the export is a step of width level / gain about level / 2: binary outside that band
        graded = (exported > 0) & (exported < level)
        assert graded.float().mean() < 0.02
        torch.testing.assert_close(exported[~graded], features[~graded], atol=1e-5, rtol=0)
        # the classifier is the QAT one, with its weights on the 4-bit grid
        torch.testing.assert_close(plain.head(features.flatten(1)), qmodel.head(features.flatten(1)))
    assert BINARY_EXPORT_GAIN >= 16
    assert BinarySpike.qat_bits == 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from qanac.calibration import write_ham10000_fixture
    from qanac.zoo.data import load_ham10000
    from qanac.zoo.train import TrainConfig, train

    root = tmp_path_factory.mktemp("qana-v1")
    data_dir = write_ham10000_fixture(root / "ham", images_per_class=16)
    data = load_ham10000(data_dir, image_size=32, seed=0)
    spec = resolve_spec("qana", "v1", **TINY)
    config = TrainConfig(epochs=4, qat_epochs=2, batch_size=16, lr=3e-3, qat_lr=1e-3, seed=0, num_threads=2,
                         qat=qat_config(spec))
    result = train(spec, data, config, root / "run")
    return result, data, root


@pytest.mark.slow
def test_trained_v1_compiles_for_akd1000_with_every_mac_on_the_device(trained):
    pytest.importorskip("akida")
    from qanac.zoo.bench import compile_and_evaluate

    result, data, root = trained
    akida = compile_and_evaluate(root / "run", data, root / "akida", device="AKD1000")
    assert akida["status"] == 0, akida
    assert akida["device_mac_share"] == 1.0 and akida["segments"] == 1, akida
    assert akida["hardware_sequences"] == 1 and akida["software_sequences"] == 0, akida["sequences"]
    manifest = json.loads((root / "akida" / "bundle" / "manifest.json").read_text())
    record = manifest["segments"][0]["backend"]
    assert manifest["device"] == "AKD1000" and record["ip_version"] == "v1"
    assert (record["weight_bits"], record["activation_bits"], record["input_weight_bits"]) == (4, 4, 8)
    report = json.loads((root / "akida" / "bundle" / "report.json").read_text())
    mapping = report["segments"][0]["backend"]["mapping"]
    types = [layer["type"] for layer in mapping["layers"] if layer["type"] != "Quantizer"]
    assert types == ["InputConvolutional"] + ["SeparableConvolutional"] * 9 + ["FullyConnected"]
    # the bundle's float reference is model.onnx (the QAT model in float); the compiled model classifies the
    # test split like it (the generated set is easy: this checks the recipe's plumbing, not the model)
    test = akida["test"]
    assert test["float_reference"]["top1"] == pytest.approx(result.metrics["test"]["top1"], abs=1e-4)
    assert test["compiled"]["top1"] >= result.metrics["qat"]["test"]["top1"] - 0.05, (test, result.metrics["qat"])
    proto = onnx.load(str(root / "run" / "model.onnx"))
    assert {node.op_type for node in proto.graph.node} - {"Constant", "Identity"} == V1_OPS
    assert np.load(root / "run" / "calib.npy").dtype == np.uint8
