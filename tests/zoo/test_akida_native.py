"""The native variant converts completely with quantizeml + cnn2snn and maps on Akida IP v2 hardware."""

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("akida")
pytest.importorskip("cnn2snn")

from qanac.zoo.akida_check import check_akida_v2  # noqa: E402
from qanac.zoo.export import export_onnx  # noqa: E402
from qanac.zoo.qana import qana  # noqa: E402
from qanac.zoo.qat import convert_qat_to_float, prepare_qat  # noqa: E402


def _with_statistics(model, images):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["context", "none"])
def test_native_variant_maps_in_one_hardware_sequence(attention):
    rng = np.random.default_rng(0)
    images = rng.random((16, 3, 32, 32), dtype=np.float32)
    model = _with_statistics(qana("native", attention=attention, width_mult=0.25, input_size=32), images)
    check = check_akida_v2(export_onnx(model, (3, 32, 32)), images)
    assert check.warnings == []
    assert check.fully_on_hardware, check.sequences
    assert check.akida_output_shape == (1, 1, 7)
    assert check.ok


@pytest.mark.slow
def test_qat_export_of_native_variant_maps_and_agrees_with_float():
    rng = np.random.default_rng(1)
    images = rng.random((32, 3, 32, 32), dtype=np.float32)
    model = _with_statistics(qana("native", width_mult=0.25, input_size=32), images)
    qmodel = prepare_qat(model)
    qmodel.train()
    with torch.no_grad():
        qmodel(torch.from_numpy(images))  # initialise the tracked output ranges
    plain = convert_qat_to_float(qmodel)
    check = check_akida_v2(export_onnx(plain, (3, 32, 32)), images)
    assert check.ok, check.to_dict()
    import akida

    runner = akida.Model(layers=check.model.layers)  # a mapped model needs a device to run
    uint8 = np.round(images * 255).astype(np.uint8)
    logits = runner.predict(uint8).reshape(len(images), -1)
    with torch.no_grad():
        reference = plain(torch.from_numpy(np.round(images * 255) / 255)).numpy()
    assert logits.shape == reference.shape
    correlation = np.corrcoef(logits.ravel(), reference.ravel())[0, 1]
    assert correlation > 0.9, correlation


@pytest.mark.slow
def test_paper_variant_does_not_convert():
    """The paper's first block feeds the image to two convs; quantizeml refuses that outright."""

    rng = np.random.default_rng(0)
    images = rng.random((8, 3, 32, 32), dtype=np.float32)
    model = _with_statistics(qana("paper", width_mult=0.25, input_size=32), images)
    with pytest.raises(RuntimeError, match="exactly one consumer"):
        check_akida_v2(export_onnx(model, (3, 32, 32)), images)
