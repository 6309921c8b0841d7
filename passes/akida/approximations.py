"""Approximations a user opts into (``--approx NAME``): each trades exactness for device coverage, and the
pipeline always measures and reports the change of the model's outputs on the calibration data."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qanac.diagnostics import UsageError
from qanac.execution import tensor_values
from qanac.graph import constant_value, replace_uses
from qanac.rewrite import NoMatch, Rewriter, Rule, register_rules

GATE_OPS = ("Sigmoid", "HardSigmoid")


def _gate_of(mul: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | None:
    """(features, gate) when ``mul`` multiplies a tensor by a sigmoid computed from other data."""

    if len(mul.inputs) != 2 or any(constant_value(t) is not None for t in mul.inputs):
        return None
    for gate, features in ((mul.inputs[1], mul.inputs[0]), (mul.inputs[0], mul.inputs[1])):
        producer = gate.inputs[0] if gate.inputs else None
        if producer is not None and producer.op in GATE_OPS and producer.inputs[0] is not features:
            return features, gate
    return None


# Ops a per-channel scale passes through unchanged (each output channel is linear in its input channel).
CHANNEL_LINEAR = ("GlobalAveragePool", "AveragePool", "MaxPool", "Flatten")


def _scaled_reader(tensor: gs.Tensor) -> tuple[gs.Node, gs.Tensor] | None:
    """The Conv or Gemm that reads ``tensor``, through per-channel linear ops with a single reader each;
    returns it and the tensor it reads. (MaxPool commutes with a positive scale, which a sigmoid gives.)"""

    while len(tensor.outputs) == 1 and tensor.outputs[0].op in CHANNEL_LINEAR:
        tensor = tensor.outputs[0].outputs[0]
    readers = tensor.outputs
    if len(readers) == 1 and readers[0].op in ("Conv", "Gemm") and readers[0].inputs[0] is tensor:
        return readers[0], tensor
    return None


def _fold_into_consumers(rw: Rewriter, mul: gs.Node, features: gs.Tensor, scale: np.ndarray) -> bool:
    """Scale the input channels of the Conv(s) or Gemm reading the gated tensor (exact given the frozen gate)."""

    output = mul.outputs[0]
    direct = list(output.outputs)
    if len(direct) > 1 and all(c.op == "Conv" and c.inputs[0] is output for c in direct):
        targets = [(c, output) for c in direct]
    else:
        found = _scaled_reader(output)
        if found is None:
            return False
        targets = [found]
    updates = []
    for layer, read in targets:
        weights = constant_value(layer.inputs[1])
        if weights is None:
            return False
        weights = weights.astype(np.float32)
        if layer.op == "Gemm":
            if read.shape is None or int(np.prod(read.shape[1:])) != scale.size or layer.attrs.get("transA", 0):
                return False
            axis = 1 if layer.attrs.get("transB", 0) else 0
            scaled = weights * (scale.reshape(1, -1) if axis == 1 else scale.reshape(-1, 1))
        elif int(layer.attrs.get("group", 1)) == 1:
            scaled = weights * scale.reshape(1, -1, 1, 1)
        elif weights.shape[1] == 1 and int(layer.attrs["group"]) == weights.shape[0] == scale.size:
            scaled = weights * scale.reshape(-1, 1, 1, 1)
        else:
            return False
        updates.append((layer, scaled))
    for layer, scaled in updates:
        layer.inputs[1] = rw.constant(rw.name(layer) + "/weight", scaled)
    replace_uses(output, features)
    return True


def _fold_into_producer(rw: Rewriter, mul: gs.Node, scale: np.ndarray) -> bool:
    """x * s with x = Relu(Conv(..)) and s > 0 becomes Relu(Conv'(..)) with the conv's output channels scaled."""

    features, constant = mul.inputs
    relu = features.inputs[0] if features.inputs else None
    if relu is None or relu.op != "Relu" or len(features.outputs) != 1 or (scale <= 0).any():
        return False
    conv_out = relu.inputs[0]
    conv = conv_out.inputs[0] if conv_out.inputs else None
    if conv is None or conv.op != "Conv" or len(conv_out.outputs) != 1 or constant_value(conv.inputs[1]) is None:
        return False
    name = rw.name(conv)
    weights = constant_value(conv.inputs[1]).astype(np.float32)
    conv.inputs[1] = rw.constant(name + "/weight", (weights * scale.reshape(-1, 1, 1, 1)).astype(np.float32))
    bias = constant_value(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(weights.shape[0], np.float32)
    scaled_bias = rw.constant(name + "/bias", (bias * scale).astype(np.float32))
    if len(conv.inputs) > 2:
        conv.inputs[2] = scaled_bias
    else:
        conv.inputs.append(scaled_bias)
    output = mul.outputs[0]
    relu.outputs[0] = output
    rw.remove(mul)
    return True


class AttentionFreeze(Rule):
    """Replace attention gates x * sigmoid(g(x)) by x times the gate's per-channel mean on calibration data.

    Squeeze-and-excitation, ECA and spatial channel gates multiply a feature map by a sigmoid computed from
    it, which Akida cannot run. Frozen to its calibration mean (one scale per channel, averaged over
    samples and positions), the gate becomes a constant. It is folded into the input channels of the
    Conv(s) or Gemm that read the gated map (also through global/average/max pooling and Flatten, which
    commute with a positive per-channel scale); else into the output channels of the Conv -> Relu that
    produced it; else it stays a Mul by a constant (scale-to-depthwise then makes it a layer Akida runs). The
    gate's branch then has no consumer and disappears, so the block maps to the device. Without calibration
    data nothing is a candidate. Approximate: the pipeline reports the measured output change, and
    ``--max-deviation`` bounds it. Per gate, the scale's range goes into ``details["gates"]``.
    """

    name = "attention-freeze"
    ops = ("Mul",)

    def prepare(self, rw: Rewriter, candidates: list[gs.Node]) -> dict[int, tuple[gs.Tensor, np.ndarray]] | None:
        gates = [(mul, *found) for mul in candidates if (found := _gate_of(mul)) is not None]
        if not gates or rw.ctx.calibration is None:
            return None
        values = tensor_values(rw.model.to_onnx(), rw.ctx.calibration.arrays, [gate.name for _, _, gate in gates])
        return {id(mul): (features, values[gate.name]) for mul, features, gate in gates}

    def match(self, rw: Rewriter, mul: gs.Node) -> bool:
        return rw.prepared is not None and id(mul) in rw.prepared

    def check(self, rw: Rewriter, mul: gs.Node) -> tuple[gs.Tensor, np.ndarray, np.ndarray]:
        features, observed = rw.prepared[id(mul)]
        axes = tuple(i for i in range(observed.ndim) if i != 1)
        return features, observed, observed.mean(axis=axes).astype(np.float32)

    def rewrite(self, rw: Rewriter, mul: gs.Node, found: tuple[gs.Tensor, np.ndarray, np.ndarray]) -> None:
        features, observed, scale = found
        rw.note("gates", mul, {
            "channels": int(scale.size),
            "scale_min": float(scale.min()),
            "scale_max": float(scale.max()),
            "gate_std_over_data": float(observed.std(axis=0).mean()),
        })
        if _fold_into_consumers(rw, mul, features, scale):
            rw.remove(mul)
            rw.count("freeze-gate-into-next-conv")
            return
        mul.inputs[0], mul.inputs[1] = features, rw.constant(
            rw.name(mul) + "/scale", scale.reshape(-1, *([1] * (observed.ndim - 2)))
        )
        rw.graph.cleanup()  # the gate's branch is dead now; the features may have a single reader left
        if _fold_into_producer(rw, mul, scale):
            rw.count("freeze-gate-into-previous-conv")
        else:
            rw.record(mul)
            rw.count("freeze-gate-to-scale")


BOUND_RELU = "bound-relu"
BOUND_PERCENTILE = 99.99
BOUND_SAMPLES = 256


class BoundRelu(Rule):
    """Replace each unbounded Relu by Clip(0, b), b the ``percentile`` of its output on calibration data.

    The QANA recipe bounds every intermediate activation so that an 8-bit (Akida v2) or 4-bit (v1)
    activation scale spends its levels on the values that occur instead of on rare outliers. Options
    (``--pass-option bound-relu.NAME=VALUE``): ``percentile`` (default 99.99, over all values of the
    layer's output on the first ``samples`` calibration samples, default 256). A layer whose output is
    zero on all of them keeps its Relu, with the reason (a bound of 0 would cut it off for good). Per
    layer, ``details["bounds"]`` records the bound, the observed maximum and the share of values clipped;
    the pipeline measures the change of the model's outputs, and ``--max-deviation`` bounds it. Relu6 /
    Clip(0, b) are left as they are; without calibration data nothing is a candidate.
    """

    name = "relu-to-clip"
    ops = ("Relu",)

    def prepare(self, rw: Rewriter, candidates: list[gs.Node]) -> dict[str, np.ndarray] | None:
        if rw.ctx.calibration is None:
            return None
        percentile = float(rw.ctx.option(BOUND_RELU, "percentile", BOUND_PERCENTILE))
        samples = int(rw.ctx.option(BOUND_RELU, "samples", BOUND_SAMPLES))
        if not 0.0 < percentile <= 100.0 or samples < 1:
            raise UsageError(
                f"bound-relu: percentile must be in (0, 100] and samples >= 1, got {percentile}, {samples}"
            )
        arrays = rw.ctx.calibration.take(samples).arrays
        values = tensor_values(rw.model.to_onnx(), arrays, [relu.outputs[0].name for relu in candidates])
        return {"percentile": percentile, "values": values}

    def match(self, rw: Rewriter, relu: gs.Node) -> bool:
        return rw.prepared is not None

    def check(self, rw: Rewriter, relu: gs.Node) -> NoMatch | tuple[np.ndarray, float]:
        observed = rw.prepared["values"][relu.outputs[0].name]
        bound = float(np.percentile(observed, rw.prepared["percentile"]))
        if bound <= 0.0:
            return NoMatch("zero on every calibration sample")
        return observed, bound

    def rewrite(self, rw: Rewriter, relu: gs.Node, found: tuple[np.ndarray, float]) -> None:
        observed, bound = found
        relu.op = "Clip"
        relu.attrs.clear()
        relu.inputs.extend([
            rw.constant(rw.name(relu) + "/min", np.array(0.0, np.float32)),
            rw.constant(rw.name(relu) + "/max", np.array(bound, np.float32)),
        ])
        rw.record(relu)
        rw.note("bounds", relu, {
            "bound": bound,
            "observed_max": float(observed.max()),
            "clipped_share": float((observed > bound).mean()),
        })


register_rules("attention-freeze", AttentionFreeze(), targets=["akida"], exact=False)
register_rules(BOUND_RELU, BoundRelu(), targets=["akida"], exact=False, options=("percentile", "samples"))
