"""Tiny float ONNX models for the Akida backend tests, written with onnx.helper (no download, no torch).

Every model is already canonical (BatchNormalization folded into Conv biases), has one input
``input`` of shape (N, 3, H, W) and one output, opset 17, IR version 10 (what onnxruntime reads).
Weights are seeded He-normal so the numbers are reproducible.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from qanac.calibration import CalibrationData, Preprocessing


class GraphBuilder:
    def __init__(self, seed: int = 0):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)

    def weight(self, name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        std = scale if scale is not None else (2.0 / fan_in) ** 0.5
        self.initializers.append(nh.from_array(self.rng.normal(0.0, std, size=shape).astype(np.float32), name))
        return name

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(nh.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             pads: list[int] | None = None) -> str:
        w = self.weight(f"{name}_w", (cout, cin // group, k, k))
        b = self.weight(f"{name}_b", (cout,), scale=0.1)
        pads = [k // 2] * 4 if pads is None else pads
        self.nodes.append(oh.make_node("Conv", [x, w, b], [name], name=name, kernel_shape=[k, k],
                                       strides=[stride, stride], pads=pads, group=group))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(oh.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def relu(self, x: str, name: str) -> str:
        return self.op("Relu", [x], name)

    def classifier(self, x: str, channels: int, classes: int = 10, prefix: str = "head") -> str:
        gap = self.op("GlobalAveragePool", [x], f"{prefix}_gap")
        flat = self.op("Flatten", [gap], f"{prefix}_flatten")
        w = self.weight(f"{prefix}_fc_w", (classes, channels))
        b = self.weight(f"{prefix}_fc_b", (classes,), scale=0.1)
        return self.op("Gemm", [flat, w, b], "logits", transB=1)

    def model(self, output: str, input_shape: tuple[int, ...], output_shape: list) -> onnx.ModelProto:
        graph = oh.make_graph(
            self.nodes,
            "tiny",
            [oh.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])],
            [oh.make_tensor_value_info(output, TensorProto.FLOAT, ["N", *output_shape])],
            self.initializers,
        )
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
        onnx.checker.check_model(model, full_check=True)
        return model


def tiny_cnn(size: int = 16) -> onnx.ModelProto:
    """Conv(s2)/ReLU, depthwise + pointwise with a residual Add, two branches Concat, Conv/ReLU/GAP, Gemm."""

    g = GraphBuilder()
    x = g.relu(g.conv("input", "stem", 3, 8, stride=2), "stem_relu")
    y = g.relu(g.conv(x, "dw", 8, 8, group=8), "dw_relu")
    y = g.relu(g.conv(y, "pw", 8, 8, k=1), "pw_relu")
    x = g.op("Add", [x, y], "residual_add")
    a = g.relu(g.conv(x, "branch_a", 8, 8), "branch_a_relu")
    b = g.relu(g.conv(x, "branch_b", 8, 8, k=1), "branch_b_relu")
    x = g.op("Concat", [a, b], "concat", axis=1)
    x = g.relu(g.conv(x, "features", 16, 16), "features_relu")
    return g.model(g.classifier(x, 16), (3, size, size), [10])


def conv_gap_classifier(size: int, channels: int = 16) -> onnx.ModelProto:
    """Conv/ReLU, then Conv/ReLU fused with a GlobalAveragePool over the whole size x size map, Gemm."""

    g = GraphBuilder()
    x = g.relu(g.conv("input", "stem", 3, channels), "stem_relu")
    x = g.relu(g.conv(x, "features", channels, channels), "features_relu")
    return g.model(g.classifier(x, channels), (3, size, size), [10])


def conv_map_output(size: int = 8) -> onnx.ModelProto:
    """Two Convs ending on a feature map: the output stays (N, C, H, W)."""

    g = GraphBuilder()
    x = g.relu(g.conv("input", "stem", 3, 8), "stem_relu")
    x = g.relu(g.conv(x, "features", 8, 4), "features_relu")
    return g.model(x, (3, size, size), [4, size, size])


def squeeze_excitation() -> onnx.ModelProto:
    """Conv/ReLU, then an SE gate: GAP, Conv/ReLU, Conv/Sigmoid, Mul with the feature map."""

    g = GraphBuilder()
    x = g.relu(g.conv("input", "stem", 3, 8), "stem_relu")
    s = g.op("GlobalAveragePool", [x], "se_squeeze")
    s = g.relu(g.conv(s, "se_reduce", 8, 4, k=1), "se_relu")
    s = g.op("Sigmoid", [g.conv(s, "se_expand", 4, 8, k=1)], "se_sigmoid")
    x = g.op("Mul", [x, s], "se_mul")
    x = g.relu(g.conv(x, "features", 8, 8), "features_relu")
    return g.model(g.classifier(x, 8), (3, 16, 16), [10])


def sigmoid_gate() -> onnx.ModelProto:
    """A bare Sigmoid after the second Conv."""

    g = GraphBuilder()
    x = g.relu(g.conv("input", "stem", 3, 8), "stem_relu")
    x = g.op("Sigmoid", [g.conv(x, "gate_conv", 8, 8)], "gate_sigmoid")
    x = g.relu(g.conv(x, "features", 8, 8), "features_relu")
    return g.model(g.classifier(x, 8), (3, 16, 16), [10])


def windowed_average_pool() -> onnx.ModelProto:
    """A 2x2 AveragePool (not global) between two Convs."""

    g = GraphBuilder()
    x = g.relu(g.conv("input", "stem", 3, 8), "stem_relu")
    x = g.op("AveragePool", [x], "avg_pool", kernel_shape=[2, 2], strides=[2, 2])
    x = g.relu(g.conv(x, "features", 8, 8), "features_relu")
    return g.model(g.classifier(x, 8), (3, 16, 16), [10])


def first_batchnorm() -> onnx.ModelProto:
    """An input BatchNormalization before the first Conv."""

    g = GraphBuilder()
    inputs = ["input", g.constant("bn_scale", [2.0, 2.0, 2.0]), g.constant("bn_bias", [0.1, 0.1, 0.1]),
              g.constant("bn_mean", [0.5, 0.5, 0.5]), g.constant("bn_var", [1.0, 1.0, 1.0])]
    x = g.op("BatchNormalization", inputs, "input_bn")
    x = g.relu(g.conv(x, "stem", 3, 8), "stem_relu")
    x = g.relu(g.conv(x, "features", 8, 8), "features_relu")
    return g.model(g.classifier(x, 8), (3, 16, 16), [10])


def single_conv_gap() -> onnx.ModelProto:
    """One Conv/ReLU fused with a GlobalAveragePool: the input layer would have to pool."""

    g = GraphBuilder()
    x = g.relu(g.conv("input", "stem", 3, 8), "stem_relu")
    gap = g.op("GlobalAveragePool", [x], "gap")
    return g.model(gap, (3, 16, 16), [8, 1, 1])


def first_gemm() -> onnx.ModelProto:
    """Flatten then Gemm as the first layer."""

    g = GraphBuilder()
    flat = g.op("Flatten", ["input"], "flatten")
    w = g.weight("fc_w", (10, 48))
    b = g.weight("fc_b", (10,), scale=0.1)
    return g.model(g.op("Gemm", [flat, w, b], "logits", transB=1), (3, 4, 4), [10])


def stride2_kernel5() -> onnx.ModelProto:
    """A stride-2 5x5 Conv without padding after the input layer (Akida allows stride 2 only for k 1 or 3)."""

    g = GraphBuilder()
    x = g.relu(g.conv("input", "stem", 3, 8), "stem_relu")
    x = g.relu(g.conv(x, "strided", 8, 8, k=5, stride=2, pads=[0, 0, 0, 0]), "strided_relu")
    return g.model(g.classifier(x, 8), (3, 16, 16), [10])


def image_calibration(model: onnx.ModelProto, count: int = 32, seed: int = 1) -> CalibrationData:
    """Random uint8 'images' in the model's input shape, preprocessed to [0, 1] as qanac.calibration does."""

    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    raw = np.random.default_rng(seed).integers(0, 256, size=(count, *dims), dtype=np.uint8)
    preprocessing = Preprocessing()
    return CalibrationData(
        arrays={"input": preprocessing.apply(raw)},
        source="test",
        preprocessing=preprocessing,
        random=True,
        raw={"input": raw},
    )


def smooth_images(model: onnx.ModelProto, count: int = 64, seed: int = 2) -> CalibrationData:
    """Low-frequency images (gradients and blobs) whose class scores differ from image to image."""

    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    channels, height, width = dims
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    images = []
    for _ in range(count):
        planes = []
        for _ in range(channels):
            a, b, c, d = rng.uniform(-1, 1, size=4)
            plane = 0.5 + 0.5 * np.sin(3 * a * xx + 3 * b * yy + 2 * c) * np.cos(2 * d * xx * yy)
            planes.append(plane)
        images.append(np.stack(planes))
    raw = np.clip(np.stack(images) * 255.0, 0, 255).astype(np.uint8)
    preprocessing = Preprocessing()
    return CalibrationData(
        arrays={"input": preprocessing.apply(raw)}, source="test", preprocessing=preprocessing, raw={"input": raw}
    )
