"""Per-channel scaling by constants, written as layers Akida runs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qanac.backends.akida.rules import ACTIVATIONS, DEPTHWISE_KERNELS
from qanac.graph import constant_value
from qanac.rewrite import NoMatch, Rewriter, Rule, register_rules


def _channel_scale(node: gs.Node) -> tuple[gs.Tensor, np.ndarray] | None:
    """(x, s) for x * s with s a scalar or per-channel [C, 1, 1] constant on a 4-D NCHW tensor."""

    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    for x, c in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        value = constant_value(c)
        shape = x.shape
        if value is None or constant_value(x) is not None or shape is None or len(shape) != 4:
            continue
        channels = shape[1]
        if not isinstance(channels, int):
            continue
        if value.size == 1:
            return x, np.full(channels, float(value.reshape(-1)[0]), np.float32)
        if value.size == channels and value.reshape(-1).shape[0] == channels and value.ndim in (1, 3, 4):
            if value.ndim == 1 or value.shape[-2:] == (1, 1):
                return x, value.reshape(-1).astype(np.float32)
    return None


class ScaleToDepthwise(Rule):
    """Rewrite x * s (s constant, scalar or per channel, x a 4-D NCHW map) after an activation as a 3x3
    depthwise Conv whose only non-zero tap is the centre, s[c], with pads 1: the same values, in a layer
    Akida maps.

    quantizeml folds a constant Mul into a neighbouring Conv where it can, so only a Mul it cannot fold
    is rewritten: one reading an activation's output (nothing to fold back into) and not read only by
    Convs (nothing to fold forward into); the others are left with the reason. A 1x1 depthwise conv would
    run in software on Akida (kernel sizes 3, 5, 7 only), hence the 3x3 form. Invariant: outputs unchanged.
    """

    name = "scale-to-depthwise"
    ops = ("Mul",)

    def match(self, rw: Rewriter, mul: gs.Node) -> bool:
        return _channel_scale(mul) is not None

    def check(self, rw: Rewriter, mul: gs.Node) -> NoMatch | tuple[gs.Tensor, np.ndarray]:
        x, scale = _channel_scale(mul)
        producer = x.inputs[0] if x.inputs else None
        readers = mul.outputs[0].outputs
        if producer is None or producer.op not in ACTIVATIONS or (readers and all(r.op == "Conv" for r in readers)):
            return NoMatch("foldable by quantizeml")
        return x, scale

    def rewrite(self, rw: Rewriter, mul: gs.Node, found: tuple[gs.Tensor, np.ndarray]) -> None:
        x, scale = found
        kernel = min(DEPTHWISE_KERNELS)
        weights = np.zeros((scale.size, 1, kernel, kernel), np.float32)
        weights[:, 0, kernel // 2, kernel // 2] = scale
        name = rw.name(mul)
        conv = gs.Node(
            "Conv", name, attrs={"group": int(scale.size), "kernel_shape": [kernel, kernel],
                                 "pads": [kernel // 2] * 4, "strides": [1, 1]},
            inputs=[x, rw.constant(name + "/weight", weights)], outputs=[mul.outputs[0]],
        )
        rw.remove(mul)
        rw.graph.nodes.append(conv)


register_rules("scale-to-depthwise", ScaleToDepthwise(), targets=["akida"])
