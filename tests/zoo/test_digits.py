"""Real data, end to end: sklearn's bundled handwritten digits, upsampled to 32x32 RGB.

A small native QANA is trained (float, then 8-bit QAT), exported, compiled for Akida by qanac (calibrated
on the run's calib.npy: training images only), and the compiled bundle is run on the test split: the
float model reaches >= 90 % test accuracy and the compiled model loses at most 1 point of it.
"""

import pytest

pytest.importorskip("akida")

from qanac.zoo.bench import compile_and_evaluate  # noqa: E402
from qanac.zoo.data import load_digits_splits  # noqa: E402
from qanac.zoo.registry import resolve_spec  # noqa: E402
from qanac.zoo.train import TrainConfig, train  # noqa: E402


@pytest.mark.slow
def test_small_native_qana_learns_digits_and_keeps_its_accuracy_on_akida(tmp_path):
    data = load_digits_splits(32, seed=0)
    spec = resolve_spec("qana", "native", input_size=32, width_mult=0.5)
    # one thread: with another job on the second core, two torch threads run 10x slower than one
    config = TrainConfig(epochs=12, qat_epochs=2, lr=3e-3, qat_lr=3e-4, patience=5, seed=0, num_threads=1)
    metrics = train(spec, data, config, tmp_path / "run").metrics  # writes model.onnx and calib.npy
    float_top1 = metrics["float"]["test"]["top1"]
    assert float_top1 >= 0.90
    assert metrics["qat"]["test"]["top1"] >= 0.90

    akida = compile_and_evaluate(tmp_path / "run", data, tmp_path / "akida")
    assert akida["status"] == 0, akida
    assert akida["device_mac_share"] == 1.0 and akida["hardware_sequences"] == 1, akida["sequences"]
    test = akida["test"]
    assert test["float_reference"]["top1"] == pytest.approx(metrics["test"]["top1"], abs=1e-4)  # model.onnx
    compiled = test["compiled"]["top1"]
    assert compiled >= float_top1 - 0.01, (compiled, float_top1)
    assert compiled >= test["float_reference"]["top1"] - 0.01, (compiled, test["float_reference"])
