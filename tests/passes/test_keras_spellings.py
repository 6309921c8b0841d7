"""Keras models through qanac's Keras frontend (tf2onnx) and the canonical pipeline: the zoo's
Conv -> MaxPool -> BatchNorm -> ReLU(6) block, ReLU(max_value), ZeroPadding2D + MaxPooling2D, and
MobileNetV3-Small's layout Transposes and hard-swish. Outputs equal the imported model within the ``--verify-each``
tolerance (max abs error <= 1e-4 * (1 + max |reference|))."""

from __future__ import annotations

import numpy as np
import pytest

tf_keras = pytest.importorskip("tf_keras")
pytest.importorskip("tf2onnx")

from qanac.frontends import import_model  # noqa: E402
from qanac.targets import CANONICALIZE  # noqa: E402
from qanac.testing import assert_outputs_equal, ops, random_inputs, verify_pipeline  # noqa: E402

layers = tf_keras.layers


def zoo_block() -> tf_keras.Model:
    """BrainChip's zoo spelling: Conv -> MaxPool -> BatchNorm -> ReLU(6); a ReLU(max_value=4.5);
    ZeroPadding2D(1) + MaxPooling2D(3, 2); then the head."""

    x = inputs = tf_keras.Input((17, 17, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
    x = layers.MaxPool2D(2)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    x = layers.Conv2D(8, 3, padding="same")(x)
    x = layers.ReLU(max_value=4.5)(x)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.MaxPool2D(3, 2)(x)
    x = layers.Conv2D(8, 3, padding="same")(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = tf_keras.Model(inputs, layers.Dense(4)(x))
    rng = np.random.default_rng(0)
    norm = next(layer for layer in model.layers if isinstance(layer, layers.BatchNormalization))
    norm.set_weights([rng.uniform(0.5, 1.5, 8), rng.normal(size=8), rng.normal(size=8), rng.uniform(0.5, 2.0, 8)])
    return model


def test_zoo_block_spellings_become_canonical(tmp_path):
    zoo_block().save(tmp_path / "zoo.h5")
    imported = import_model(str(tmp_path / "zoo.h5")).model
    assert {"BatchNormalization", "Min", "Max", "Pad"} <= set(ops(imported))
    compiled, report = verify_pipeline(imported, list(CANONICALIZE), random_inputs(imported))
    assert ops(compiled) == ["Conv", "MaxPool", "Clip", "Conv", "Clip", "MaxPool", "Conv", "GlobalAveragePool",
                             "Flatten", "Gemm"]
    counts = {name: totals["counts"] for name, totals in report.totals().items()}
    assert counts["fold-batchnorm-into-conv"] == {"fold-batchnorm-through-maxpool": 1}
    assert counts["bounded-relu-to-clip"] == {"bounded-relu-to-clip": 1}
    assert counts["fuse-pad-into-maxpool"] == {"fuse-pad-into-maxpool": 1}
    clips = [float(n.inputs[2].values.reshape(())) for n in compiled.graph.nodes if n.op == "Clip"]
    assert clips == [6.0, 4.5]
    pooled = [n for n in compiled.graph.nodes if n.op == "MaxPool"][1]
    assert list(pooled.attrs["pads"]) == [1, 1, 1, 1] and list(pooled.attrs["kernel_shape"]) == [3, 3]
    assert_outputs_equal(imported, compiled, random_inputs(imported, seed=3))


@pytest.mark.slow
def test_keras_mobilenet_v3_keeps_no_layout_transpose(tmp_path):
    keras_model = tf_keras.applications.MobileNetV3Small(weights=None, input_shape=(64, 64, 3), include_top=True,
                                                         classes=10)
    keras_model.save(tmp_path / "mobilenet_v3.keras")
    imported = import_model(str(tmp_path / "mobilenet_v3.keras")).model
    assert ops(imported).count("Transpose") > 80
    compiled, report = verify_pipeline(imported, list(CANONICALIZE), random_inputs(imported, batch=2))
    assert ops(compiled).count("Transpose") == 0
    assert ops(compiled).count("GlobalAveragePool") == 10  # 9 squeeze-and-excitation blocks and the head
    # Keras' relu6(x + 3) / 6 spellings, as PyTorch's MobileNetV3 exports them
    assert ops(compiled).count("HardSwish") == 19 and ops(compiled).count("HardSigmoid") == 9
    assert_outputs_equal(imported, compiled, random_inputs(imported, batch=3, seed=4))
