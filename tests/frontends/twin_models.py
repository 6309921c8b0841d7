"""The same small CNN twice, in PyTorch and in tf_keras, with the same weights (used by the frontend tests).

Conv(3->8, 3x3, stride 2) -> BN -> ReLU6 -> [depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN] + skip
-> GAP -> Dense(5). Weights are random (seeded), BN statistics non-trivial, so a layout or weight-order
mistake shows in the outputs.
"""

from __future__ import annotations

import numpy as np

CHANNELS = 8
CLASSES = 5
SIZE = 16


def _bn_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "gamma": rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32),
        "beta": rng.normal(0, 0.1, CHANNELS).astype(np.float32),
        "mean": rng.normal(0, 0.1, CHANNELS).astype(np.float32),
        "var": rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32),
    }


def twin_weights(seed: int = 0) -> dict[str, object]:
    """Weights in PyTorch layouts: conv [out, in/groups, kh, kw], dense [out, in]."""

    rng = np.random.default_rng(seed)
    return {
        "stem": rng.normal(0, 0.3, (CHANNELS, 3, 3, 3)).astype(np.float32),
        "stem_bn": _bn_params(rng),
        "dw": rng.normal(0, 0.3, (CHANNELS, 1, 3, 3)).astype(np.float32),
        "dw_bn": _bn_params(rng),
        "pw": rng.normal(0, 0.3, (CHANNELS, CHANNELS, 1, 1)).astype(np.float32),
        "pw_bn": _bn_params(rng),
        "fc_w": rng.normal(0, 0.3, (CLASSES, CHANNELS)).astype(np.float32),
        "fc_b": rng.normal(0, 0.1, CLASSES).astype(np.float32),
    }


def torch_twin(seed: int = 0):
    """The PyTorch model (importable as a factory: ``twin_models:torch_twin``)."""

    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dw = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, groups=CHANNELS, bias=False)
            self.dw_bn = nn.BatchNorm2d(CHANNELS, eps=1e-3)
            self.relu = nn.ReLU()
            self.pw = nn.Conv2d(CHANNELS, CHANNELS, 1, bias=False)
            self.pw_bn = nn.BatchNorm2d(CHANNELS, eps=1e-3)

        def forward(self, x):
            return x + self.pw_bn(self.pw(self.relu(self.dw_bn(self.dw(x)))))

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, CHANNELS, 3, stride=2, padding=1, bias=False)
            self.stem_bn = nn.BatchNorm2d(CHANNELS, eps=1e-3)
            self.stem_relu = nn.ReLU6()
            self.block = Block()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(CHANNELS, CLASSES)

        def forward(self, x):
            x = self.block(self.stem_relu(self.stem_bn(self.stem(x))))
            return self.fc(torch.flatten(self.pool(x), 1))

    model = Twin()
    w = twin_weights(seed)

    def set_bn(bn, p):
        bn.weight.data = torch.from_numpy(p["gamma"])
        bn.bias.data = torch.from_numpy(p["beta"])
        bn.running_mean.data = torch.from_numpy(p["mean"])
        bn.running_var.data = torch.from_numpy(p["var"])

    model.stem.weight.data = torch.from_numpy(w["stem"])
    set_bn(model.stem_bn, w["stem_bn"])
    model.block.dw.weight.data = torch.from_numpy(w["dw"])
    set_bn(model.block.dw_bn, w["dw_bn"])
    model.block.pw.weight.data = torch.from_numpy(w["pw"])
    set_bn(model.block.pw_bn, w["pw_bn"])
    model.fc.weight.data = torch.from_numpy(w["fc_w"])
    model.fc.bias.data = torch.from_numpy(w["fc_b"])
    return model.eval()


def keras_twin(seed: int = 0):
    """The tf_keras model, NHWC, 'same' padding matching PyTorch's padding=1 for stride 1; the stem pads
    explicitly because Keras 'same' with stride 2 pads asymmetrically."""

    import tf_keras as keras

    layers = keras.layers
    w = twin_weights(seed)
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = layers.ZeroPadding2D(1, name="stem_pad")(inp)
    x = layers.Conv2D(CHANNELS, 3, strides=2, use_bias=False, name="stem")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    y = layers.BatchNormalization(epsilon=1e-3, name="dw_bn")(y)
    y = layers.ReLU(name="relu")(y)
    y = layers.Conv2D(CHANNELS, 1, use_bias=False, name="pw")(y)
    y = layers.BatchNormalization(epsilon=1e-3, name="pw_bn")(y)
    x = layers.Add(name="add")([x, y])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    out = layers.Dense(CLASSES, name="fc")(x)
    model = keras.Model(inp, out, name="twin")

    def bn(p):
        return [p["gamma"], p["beta"], p["mean"], p["var"]]

    model.get_layer("stem").set_weights([w["stem"].transpose(2, 3, 1, 0)])
    model.get_layer("stem_bn").set_weights(bn(w["stem_bn"]))
    model.get_layer("dw").set_weights([w["dw"].transpose(2, 3, 0, 1)])
    model.get_layer("dw_bn").set_weights(bn(w["dw_bn"]))
    model.get_layer("pw").set_weights([w["pw"].transpose(2, 3, 1, 0)])
    model.get_layer("pw_bn").set_weights(bn(w["pw_bn"]))
    model.get_layer("fc").set_weights([w["fc_w"].T, w["fc_b"]])
    return model
