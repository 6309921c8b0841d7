"""Models and data for the Akida v1 tests: graphs written with onnx.helper, and a CNN trained on sklearn digits.

Nothing is downloaded: the digits are scikit-learn's bundled 8x8 images (1797, 10 classes), upscaled 2x to
16x16 by pixel repetition, scaled to [0, 1], split stratified 70/30 with a fixed seed.
"""

from __future__ import annotations

import io

import numpy as np
import onnx

from tests.akida.akida_models import GraphBuilder

DIGITS_SIZE = 16


def relu6(g: GraphBuilder, x: str, name: str) -> str:
    if not any(i.name == "zero" for i in g.initializers):
        g.constant("zero", np.array(0.0))
        g.constant("six", np.array(6.0))
    return g.op("Clip", [x, "zero", "six"], name)


def sequential_cnn(size: int = 16, channels: int = 3, seed: int = 0) -> onnx.ModelProto:
    """Per-channel Sub/Div normalisation, Conv/ReLU6/MaxPool, depthwise + pointwise/ReLU6/MaxPool,
    Conv/ReLU6/GlobalAveragePool, Flatten, Gemm: every op the v1 lowering takes, in v1's shapes."""

    g = GraphBuilder(seed)
    mean = g.constant("mean", np.linspace(0.3, 0.5, channels).reshape(1, channels, 1, 1))
    std = g.constant("std", np.linspace(0.2, 0.3, channels).reshape(1, channels, 1, 1))
    x = g.op("Div", [g.op("Sub", ["input", mean], "norm_sub"), std], "norm_div")
    x = g.op("MaxPool", [relu6(g, g.conv(x, "conv1", channels, 8), "relu1")], "pool1", kernel_shape=[2, 2],
             strides=[2, 2])
    x = g.conv(x, "dw", 8, 8, group=8)
    x = g.op("MaxPool", [relu6(g, g.conv(x, "pw", 8, 16, k=1), "relu2")], "pool2", kernel_shape=[2, 2],
             strides=[2, 2])
    x = relu6(g, g.conv(x, "conv3", 16, 16), "relu3")
    return g.model(g.classifier(x, 16), (channels, size, size), [10])


def flatten_cnn(size: int = 12, seed: int = 1) -> onnx.ModelProto:
    """A strided 'same' Conv (pads only at the end), Conv/ReLU6, Flatten of a 3x3 map into a Gemm (the
    Gemm's rows must follow Keras' H, W, C order), a hidden Gemm/ReLU6 and an output Gemm."""

    g = GraphBuilder(seed)
    x = relu6(g, g.conv("input", "conv1", 1, 8, stride=2, pads=[0, 0, 1, 1]), "relu1")
    x = relu6(g, g.conv(x, "conv2", 8, 8, stride=2, pads=[0, 0, 1, 1]), "relu2")
    x = g.op("Flatten", [x], "flatten")
    w1, b1 = g.weight("fc1_w", (16, 8 * 9)), g.weight("fc1_b", (16,), scale=0.1)
    x = relu6(g, g.op("Gemm", [x, w1, b1], "fc1", transB=1), "relu_fc1")
    w2, b2 = g.weight("fc2_w", (16, 5)), g.weight("fc2_b", (5,), scale=0.1)
    return g.model(g.op("Gemm", [x, w2, b2], "logits"), (1, size, size), [5])


def residual_cnn(size: int = 16, seed: int = 2) -> onnx.ModelProto:
    """A ReLU6 CNN with two residual Adds."""

    g = GraphBuilder(seed)
    x = relu6(g, g.conv("input", "stem", 3, 8), "stem_relu")
    for block in ("block1", "block2"):
        y = relu6(g, g.conv(x, f"{block}_conv", 8, 8), f"{block}_relu")
        x = g.op("Add", [x, y], f"{block}_add")
    x = relu6(g, g.conv(x, "head_conv", 8, 8, stride=2, pads=[0, 0, 1, 1]), "head_relu")
    return g.model(g.classifier(x, 8), (3, size, size), [10])


def random_images(shape: tuple[int, ...], count: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=(count, *shape)).astype(np.float32)


# -- sklearn digits ------------------------------------------------------------------------------------------


def digits_splits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, held-out x, held-out y); x is float32 (N, 1, 16, 16) in [0, 1]."""

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.kron(digits.images / 16.0, np.ones((2, 2)))[:, None].astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.3, random_state=seed,
                                                        stratify=digits.target)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def train_digits_cnn(x: np.ndarray, y: np.ndarray, epochs: int = 15, seed: int = 0, classes: int = 10
                     ) -> onnx.ModelProto:
    """A sequential v1-shaped CNN (input normalisation, Conv/ReLU6/MaxPool, depthwise + pointwise/ReLU6/MaxPool,
    Conv/ReLU6, Flatten, Linear to ``classes`` logits) trained on ``x``, exported to ONNX (opset 17, input 'input',
    output 'logits')."""

    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU6(), nn.MaxPool2d(2),
                nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1), nn.ReLU6(), nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU6(),
            )
            self.classifier = nn.Linear(32 * 4 * 4, classes)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(self.features((images - 0.5) / 0.5), 1))

    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    data, labels = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(data), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(data[batch]), labels[batch]).backward()
            optimizer.step()
    net.eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, torch.zeros(1, *x.shape[1:]), buffer, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def identity_after_pool_cnn(size: int = 8, seed: int = 3) -> onnx.ModelProto:
    """Conv/ReLU6/MaxPool, then the 1x1 identity Conv the IP v2 legalization puts after a pooled layer that
    feeds a dense layer (identity-conv-after-maxpool), Flatten, Gemm."""

    g = GraphBuilder(seed)
    x = g.op("MaxPool", [relu6(g, g.conv("input", "conv1", 1, 8), "relu1")], "pool1", kernel_shape=[2, 2],
             strides=[2, 2])
    identity = g.constant("identity_w", np.eye(8).reshape(8, 8, 1, 1))
    x = g.op("Conv", [x, identity], "pool1::identity-conv-after-maxpool", kernel_shape=[1, 1], pads=[0, 0, 0, 0])
    x = g.op("Flatten", [x], "flatten")
    w, b = g.weight("fc_w", (10, 8 * (size // 2) ** 2)), g.weight("fc_b", (10,), scale=0.1)
    return g.model(g.op("Gemm", [x, w, b], "logits", transB=1), (1, size, size), [10])
