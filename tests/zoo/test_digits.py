"""Real data: sklearn's bundled handwritten digits, upsampled to 32x32 RGB."""

import pytest

from qanac.zoo.data import load_digits_splits
from qanac.zoo.registry import resolve_spec
from qanac.zoo.train import TrainConfig, train


@pytest.mark.slow
def test_small_native_qana_learns_digits():
    data = load_digits_splits(32, seed=0)
    spec = resolve_spec("qana", "native", input_size=32, width_mult=0.5)
    config = TrainConfig(epochs=12, qat_epochs=2, lr=3e-3, qat_lr=3e-4, patience=5, seed=0)
    metrics = train(spec, data, config).metrics
    assert metrics["float"]["test"]["top1"] >= 0.90
    assert metrics["qat"]["test"]["top1"] >= 0.90
    assert metrics["test"]["top1"] >= 0.90
