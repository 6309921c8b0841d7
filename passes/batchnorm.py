"""Removing inference-mode BatchNormalization: folded into the preceding Conv/ConvTranspose/Gemm weights
(also through a MaxPool, when every scale is >= 0), or, where there is nothing to fold into, turned into
a per-channel Mul and Add. A per-channel Mul (and Add) that an exporter wrote for a BatchNormalization
folds the same way.

With ``s = scale / sqrt(var + epsilon)`` a BatchNormalization computes ``y = s * (x - mean) + B``
per channel (axis 1). After a layer ``x = W * a + b`` whose output channels are indexed by one axis of
``W`` this is the same layer with ``W' = W * s`` (along that axis) and ``b' = s * (b - mean) + B``.
Folding is done in float64 and cast back to the weights' dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qanac.graph import constant_value, is_graph_output, single_consumer
from qanac.passes._rewrite import known_rank, static_dims
from qanac.rewrite import NoMatch, Rewriter, Rule, node_label, register_rules

FOLD_RULE = "fold-batchnorm-into-conv"
AFFINE_RULE = "batchnorm-to-affine"
FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def _inference_parameters(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | NoMatch:
    """``(s, shift)`` with ``y = s * x + shift`` per channel, or why the node is not an inference BN."""

    if int(bn.attrs.get("training_mode", 0)) != 0:
        return NoMatch("training_mode=1 (uses batch statistics)")
    if any(not out.is_empty() for out in bn.outputs[1:]):
        return NoMatch("has running-statistics outputs (training mode before opset 14)")
    if int(bn.attrs.get("spatial", 1)) != 1:
        return NoMatch("spatial=0 (per-element statistics, opset < 9)")
    params = [constant_value(t) for t in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return NoMatch("scale, bias, mean or variance is not a constant")
    scale, bias, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    if not (len(scale) == len(bias) == len(mean) == len(var)):
        return NoMatch("parameters of different lengths")
    s = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return s, bias - s * mean


def _fold_target(graph: gs.Graph, x: gs.Tensor) -> tuple[gs.Node, gs.Node | None] | NoMatch:
    """The Conv/ConvTranspose/Gemm that a per-channel map of ``x`` (a BatchNormalization, a Mul) folds
    into, and the MaxPool between them (None when the layer writes ``x``), or why there is none."""

    pool = x.inputs[0] if len(x.inputs) == 1 and x.inputs[0].op == "MaxPool" else None
    if pool is not None:
        if len(x.outputs) != 1 or is_graph_output(graph, x):
            return NoMatch(f"output of MaxPool '{node_label(pool)}' has other consumers")
        if len(pool.outputs) > 1 and not pool.outputs[1].is_empty():
            return NoMatch(f"MaxPool '{node_label(pool)}' has an indices output")
        x = pool.inputs[0]
        if len(x.inputs) != 1 or x.inputs[0].op not in ("Conv", "ConvTranspose"):
            return NoMatch(f"input is MaxPool '{node_label(pool)}', which does not read a Conv or ConvTranspose")
    elif len(x.inputs) != 1 or x.inputs[0].op not in FOLDABLE_PRODUCERS:
        return NoMatch("input is not produced by Conv, ConvTranspose or Gemm")
    layer = x.inputs[0]
    if len(x.outputs) != 1 or is_graph_output(graph, x):
        return NoMatch(f"output of {layer.op} '{node_label(layer)}' has other consumers")
    if len(layer.inputs) < 2 or constant_value(layer.inputs[1]) is None:
        return NoMatch(f"weights of {layer.op} '{node_label(layer)}' are not constant")
    if len(layer.inputs) > 2 and not layer.inputs[2].is_empty() and constant_value(layer.inputs[2]) is None:
        return NoMatch(f"bias of {layer.op} '{node_label(layer)}' is not constant")
    if layer.op == "Gemm":
        rank = known_rank(x)
        if rank is not None and rank != 2:
            return NoMatch("Gemm output is not 2-D")
    return layer, pool


def _fold_plan(graph: gs.Graph, x: gs.Tensor, s: np.ndarray) -> tuple | NoMatch:
    """(layer, MaxPool or None, its weights, the folded weights) for the per-channel scale ``s`` applied
    to ``x``, or why it cannot fold. Through a MaxPool only when every scale is >= 0:
    max(s * a, s * b) = s * max(a, b) for s >= 0 (and an added shift commutes with any maximum)."""

    target = _fold_target(graph, x)
    if isinstance(target, NoMatch):
        return target
    layer, pool = target
    if pool is not None and np.any(s < 0):
        k = int(np.flatnonzero(s < 0)[0])
        return NoMatch(f"negative scale {s[k]:.4g} on channel {k}: MaxPool '{node_label(pool)}' between it and "
                       f"{layer.op} '{node_label(layer)}' does not commute with it")
    weights = constant_value(layer.inputs[1])
    folded = _folded_weights(layer, weights, s)
    if isinstance(folded, NoMatch):
        return folded
    return layer, pool, weights, folded


def _fold(rw: Rewriter, node: gs.Node, plan: tuple, s: np.ndarray, shift: np.ndarray, y: gs.Tensor) -> None:
    """Fold ``y = s * input + shift`` (per channel) into the plan's layer; the layer (or the MaxPool after
    it) then writes ``y``, and ``node`` goes."""

    layer, pool, weights, folded = plan
    has_bias = len(layer.inputs) > 2 and not layer.inputs[2].is_empty()
    bias = constant_value(layer.inputs[2]).astype(np.float64) if has_bias else np.zeros(1)
    if layer.op == "Gemm":
        bias = float(layer.attrs.get("beta", 1.0)) * bias if has_bias else np.zeros(len(s))
        new_bias = s * bias + shift  # broadcasts a scalar, [N] or [M, N] bias over the N columns
        layer.attrs["alpha"] = 1.0
        layer.attrs["beta"] = 1.0
    else:
        new_bias = s * np.broadcast_to(bias.reshape(-1), s.shape) + shift

    rw.rename(layer)
    dtype = weights.dtype
    layer.inputs[1] = rw.constant(f"{layer.name}/weight", folded.astype(dtype))
    bias_tensor = rw.constant(f"{layer.name}/bias", new_bias.astype(dtype))
    if len(layer.inputs) > 2:
        layer.inputs[2] = bias_tensor
    else:
        layer.inputs.append(bias_tensor)
    rw.remove(node)
    if pool is not None:
        rw.record(pool)
        pool.outputs[0] = y
    else:
        layer.outputs[0] = y


def _folded_weights(layer: gs.Node, weights: np.ndarray, s: np.ndarray) -> np.ndarray | NoMatch:
    w = weights.astype(np.float64)
    channels = len(s)
    if layer.op == "Conv":
        if w.shape[0] != channels:
            return NoMatch(f"{channels} BN channels but {w.shape[0]} Conv filters")
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if layer.op == "ConvTranspose":
        group = int(layer.attrs.get("group", 1))
        per_group = w.shape[1]
        if per_group * group != channels:
            return NoMatch(f"{channels} BN channels but {per_group * group} ConvTranspose outputs")
        # W is [C_in, C_out / group, k...]; input channel i belongs to group i // (C_in / group)
        in_per_group = w.shape[0] // group
        factors = s.reshape(group, 1, per_group).repeat(in_per_group, axis=1).reshape(w.shape[0], per_group)
        return w * factors.reshape(factors.shape + (1,) * (w.ndim - 2))
    trans_b = int(layer.attrs.get("transB", 0))
    alpha = float(layer.attrs.get("alpha", 1.0))
    outputs = w.shape[0] if trans_b else w.shape[1]
    if w.ndim != 2 or outputs != channels:
        return NoMatch(f"{channels} BN channels but Gemm has {outputs} outputs")
    return alpha * (w * s.reshape(-1, 1) if trans_b else w * s.reshape(1, -1))


class _InferenceBatchNormRule(Rule):
    """A rule on inference-mode BatchNormalizations: a BN in training mode or with parameters that are not
    constants is left with the reason before ``check_inference`` sees it."""

    ops = ("BatchNormalization",)

    def check(self, rw: Rewriter, bn: gs.Node) -> NoMatch | tuple:
        params = _inference_parameters(bn)
        return params if isinstance(params, NoMatch) else self.check_inference(rw, bn, params)

    def check_inference(self, rw: Rewriter, bn: gs.Node, params: tuple[np.ndarray, np.ndarray]) -> NoMatch | tuple:
        raise NotImplementedError


def _forward_plan(graph: gs.Graph, bn: gs.Node, s: np.ndarray, shift: np.ndarray) -> list | NoMatch:
    """For a BatchNormalization read only by Convs: per Conv, its weights and bias with the BN folded in
    (the BN applies to the Conv's input channels), or why the BN cannot fold forward.

    conv(s * x + shift) = conv'(x) with W'[o, c] = W[o, c] * s[c'] and b'[o] = b[o] + sum W[o, c] *
    shift[c'] (c' the input channel tap c of output o reads), but only where the Conv reads no padding
    or the BN maps 0 to 0: the Conv pads the normalised input with zeros, which is -shift / s of the
    raw input, not 0.
    """

    y = bn.outputs[0]
    readers = y.outputs
    if not readers or is_graph_output(graph, y) or any(r.op != "Conv" or r.inputs[0] is not y for r in readers):
        return NoMatch("its output is not read by Convs only")
    plans = []
    for conv in readers:
        weights = constant_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
        has_bias = len(conv.inputs) > 2 and not conv.inputs[2].is_empty()
        bias = constant_value(conv.inputs[2]) if has_bias else None
        if weights is None or (has_bias and bias is None):
            return NoMatch(f"weights or bias of Conv '{node_label(conv)}' are not constant")
        group = int(conv.attrs.get("group", 1))
        if weights.shape[1] * group != len(s) or weights.shape[0] % group:
            return NoMatch(f"{len(s)} BN channels but Conv '{node_label(conv)}' reads {weights.shape[1] * group}")
        auto_pad = conv.attrs.get("auto_pad", "NOTSET")
        if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
            return NoMatch(f"Conv '{node_label(conv)}' has auto_pad (run explicit-pads)")
        nonzero = np.flatnonzero(shift != 0)
        if any(int(p) for p in conv.attrs.get("pads", [])) and len(nonzero):
            k = int(nonzero[0])
            return NoMatch(
                f"Conv '{node_label(conv)}' pads its input with zeros, and this BatchNorm maps 0 to "
                f"{shift[k]:.4g} on channel {k}: folded, the padding would have to be {-shift[k] / s[k]:.4g} "
                "of the raw input, which a Conv cannot pad with"
                if s[k] != 0 else
                f"Conv '{node_label(conv)}' pads its input with zeros, and this BatchNorm maps every value to "
                f"{shift[k]:.4g} on channel {k}"
            )
        w = weights.astype(np.float64)
        per_group = w.shape[1]
        outs = w.shape[0] // group
        # input channel read by weights[o, c]: group (o // outs) * per_group + c
        channel = (np.arange(w.shape[0]) // outs)[:, None] * per_group + np.arange(per_group)[None, :]
        scale = s[channel].reshape(w.shape[:2] + (1,) * (w.ndim - 2))
        offset = shift[channel].reshape(w.shape[:2] + (1,) * (w.ndim - 2))
        new_bias = (bias.astype(np.float64) if has_bias else np.zeros(w.shape[0])) + (w * offset).reshape(
            w.shape[0], -1).sum(axis=1)
        plans.append((conv, (w * scale).astype(weights.dtype), new_bias.astype(weights.dtype)))
    return plans


class FoldBatchNormIntoConv(_InferenceBatchNormRule):
    """Fold an inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it, or else
    into the Convs after it."""

    name = FOLD_RULE

    def check_inference(self, rw: Rewriter, bn: gs.Node, params: tuple[np.ndarray, np.ndarray]) -> NoMatch | tuple:
        plan = _fold_plan(rw.graph, bn.inputs[0], params[0])
        if not isinstance(plan, NoMatch):
            return plan, params
        forward = _forward_plan(rw.graph, bn, *params)
        if isinstance(forward, NoMatch):
            return plan if forward.reason == "its output is not read by Convs only" else forward
        return None, forward

    def rewrite(self, rw: Rewriter, bn: gs.Node, found: tuple) -> None:
        plan, other = found
        if plan is None:
            x = bn.inputs[0]
            for conv, weights, bias in other:
                rw.rename(conv)
                conv.inputs[1] = rw.constant(f"{conv.name}/weight", weights)
                if len(conv.inputs) > 2:
                    conv.inputs[2] = rw.constant(f"{conv.name}/bias", bias)
                else:
                    conv.inputs.append(rw.constant(f"{conv.name}/bias", bias))
                conv.inputs[0] = x
            rw.remove(bn)
            rw.count("fold-batchnorm-into-next-conv", len(other))
            return
        s, shift = other
        layer, pool = plan[:2]
        _fold(rw, bn, plan, s, shift, bn.outputs[0])
        rw.count("fold-batchnorm-through-maxpool" if pool is not None else f"fold-batchnorm-into-{layer.op.lower()}")


def _channel_vector(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``value`` as one number per channel (axis 1 of a rank-``rank`` tensor) when broadcasting it over
    that tensor varies it along axis 1 only and does not change the tensor's shape; None otherwise."""

    if value.dtype.kind != "f" or value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,)).copy()


def _constant_operand(node: gs.Node, data: gs.Tensor) -> np.ndarray | None:
    """The constant operand of a two-input ``node`` one of whose inputs is ``data``."""

    if len(node.inputs) != 2:
        return None
    other = node.inputs[1] if node.inputs[0] is data else node.inputs[0]
    return None if other is data else constant_value(other)


class FoldScaleIntoConv(Rule):
    """Fold a per-channel Mul by a constant (and the per-channel Add of a constant after it) into the
    Conv or ConvTranspose before it, directly or through a MaxPool (a BatchNormalization an exporter
    wrote as Mul and Add)."""

    name = "fold-scale-into-conv"
    ops = ("Mul",)

    def match(self, rw: Rewriter, mul: gs.Node) -> bool:
        x = mul.inputs[0] if constant_value(mul.inputs[0]) is None else mul.inputs[1]
        producer = x.inputs[0] if len(x.inputs) == 1 else None
        if producer is not None and producer.op == "MaxPool":
            producer = producer.inputs[0].inputs[0] if len(producer.inputs[0].inputs) == 1 else None
        return (producer is not None and producer.op in ("Conv", "ConvTranspose")
                and _constant_operand(mul, x) is not None)

    def check(self, rw: Rewriter, mul: gs.Node) -> NoMatch | tuple:
        x = mul.inputs[0] if constant_value(mul.inputs[0]) is None else mul.inputs[1]
        rank, channels = known_rank(x), static_dims(x, [1]) if known_rank(x) else None
        if rank is None or rank < 3 or channels is None:
            return NoMatch("input shape unknown (run infer-shapes)")
        s = _channel_vector(_constant_operand(mul, x), rank, channels[0])
        if s is None:
            return NoMatch("the scale is not one constant per channel")
        plan = _fold_plan(rw.graph, x, s)
        if isinstance(plan, NoMatch):
            return plan
        y, shift = mul.outputs[0], np.zeros_like(s)
        add = single_consumer(y) if not is_graph_output(rw.graph, y) else None
        offset = _constant_operand(add, y) if add is not None and add.op == "Add" else None
        offset = _channel_vector(offset, rank, channels[0]) if offset is not None else None
        if offset is not None:
            shift, y = offset, add.outputs[0]
        return plan, s, shift, y, add if offset is not None else None

    def rewrite(self, rw: Rewriter, mul: gs.Node, found: tuple) -> None:
        plan, s, shift, y, add = found
        if add is not None:
            rw.remove(add)
        _fold(rw, mul, plan, s, shift, y)
        rw.count("fold-scale-through-maxpool" if plan[1] is not None else "fold-scale-into-conv")


class BatchNormToAffine(_InferenceBatchNormRule):
    """Turn an inference-mode BatchNormalization that cannot be folded into a layer into Mul and Add.

    ``y = x * s + shift`` with per-channel constants of shape [C, 1, ..., 1] (rank of x minus one, so
    [C, 1, 1] for 4-D inputs, [C] for 2-D). BNs that fold-batchnorm-into-conv can fold, and training-mode
    BNs, are left alone with the reason. The new nodes are ``<bn>::batchnorm-to-affine:0`` (Mul) and ``:1``
    (Add); the Add writes the BN's output tensor. Invariant: no foldable-elsewhere or training BN is
    touched; every other BatchNormalization with constant parameters and known input rank is gone.
    """

    name = AFFINE_RULE

    def check_inference(self, rw: Rewriter, bn: gs.Node, params: tuple[np.ndarray, np.ndarray]) -> NoMatch | tuple:
        if not isinstance(_fold_plan(rw.graph, bn.inputs[0], params[0]), NoMatch) or not isinstance(
                _forward_plan(rw.graph, bn, *params), NoMatch):
            return NoMatch(f"left to {FOLD_RULE}")
        x, y = bn.inputs[0], bn.outputs[0]
        rank = known_rank(x) if known_rank(x) is not None else known_rank(y)
        if rank is None or rank < 2:
            return NoMatch("input rank unknown (run infer-shapes)")
        return params, rank

    def rewrite(self, rw: Rewriter, bn: gs.Node, found: tuple) -> None:
        (s, shift), rank = found
        x, y = bn.inputs[0], bn.outputs[0]
        dtype = x.dtype if x.dtype is not None else constant_value(bn.inputs[1]).dtype
        channel_shape = (len(s),) + (1,) * (rank - 2)
        mul_name, add_name = rw.name(bn, 0), rw.name(bn, 1)
        scaled = rw.variable(f"{mul_name}/out", y)
        mul = gs.Node(
            "Mul",
            name=mul_name,
            inputs=[x, rw.constant(f"{mul_name}/scale", s.reshape(channel_shape).astype(dtype))],
            outputs=[scaled],
        )
        rw.remove(bn)
        add = gs.Node(
            "Add",
            name=add_name,
            inputs=[scaled, rw.constant(f"{add_name}/shift", shift.reshape(channel_shape).astype(dtype))],
            outputs=[y],
        )
        rw.graph.nodes.extend([mul, add])


register_rules(
    FOLD_RULE,
    FoldBatchNormIntoConv(),
    FoldScaleIntoConv(),
    doc="""Fold inference-mode BatchNormalizations into the layer before them (else the Convs after them), and
    per-channel Mul/Add pairs into the layer before them.

    Rewrites:
        fold-batchnorm-into-conv|convtranspose|gemm
                                          a BatchNormalization reading a Conv, ConvTranspose or Gemm
        fold-batchnorm-through-maxpool    a BatchNormalization reading a MaxPool of a Conv or
                                          ConvTranspose (Keras' Conv -> MaxPool -> BatchNorm blocks)
                                          when every BN scale is >= 0: a max pooling commutes with a
                                          per-channel affine map of non-negative scale
        fold-batchnorm-into-next-conv     a BatchNormalization that cannot fold into a layer before it
                                          (the model's input normalisation, say), read only by Convs:
                                          folded into their weights and biases, when they read no
                                          padding or the BN maps 0 to 0 on every channel (a Conv pads
                                          the normalised input with zeros, which is not a zero of the
                                          raw input); else left, with the channel and the padding value
                                          it would take
        fold-scale-into-conv, fold-scale-through-maxpool
                                          a Mul by one constant per channel (and the Add of one constant
                                          per channel after it, when there is one): a BatchNormalization
                                          an exporter wrote as Mul and Add, in the same two places
    Applies when the layer's output (and the MaxPool's) feeds only the next node, and the weights (and
    bias) and parameters are constants; any group count, Gemm with transB 0 or 1, with or without bias
    (Gemm's alpha/beta are folded in too). The layer, or the MaxPool after it, takes over the output
    tensor; the layer is renamed ``<layer>::fold-batchnorm-into-conv``; new weights never overwrite shared
    initializers. Left with the reason: training-mode BNs, non-constant parameters or weights, a layer or
    pooling output read elsewhere, channel counts that do not agree, and a negative scale through a MaxPool
    (the reason names the channel). Invariant: outputs are unchanged up to float rounding.
    """,
)
register_rules(AFFINE_RULE, BatchNormToAffine())
