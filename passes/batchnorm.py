"""Removing inference-mode BatchNormalization: folded into the preceding Conv/ConvTranspose/Gemm weights,
or, where there is nothing to fold into, turned into a per-channel Mul and Add.

With ``s = scale / sqrt(var + epsilon)`` a BatchNormalization computes ``y = s * (x - mean) + B``
per channel (axis 1). After a layer ``x = W * a + b`` whose output channels are indexed by one axis of
``W`` this is the same layer with ``W' = W * s`` (along that axis) and ``b' = s * (b - mean) + B``.
Folding is done in float64 and cast back to the weights' dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qanac.graph import constant_value, is_graph_output
from qanac.passes._rewrite import known_rank
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


def _fold_target(graph: gs.Graph, bn: gs.Node) -> gs.Node | NoMatch:
    """The Conv/ConvTranspose/Gemm that ``bn`` folds into, or why there is none."""

    x = bn.inputs[0]
    if len(x.inputs) != 1 or x.inputs[0].op not in FOLDABLE_PRODUCERS:
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
    return layer


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


class FoldBatchNormIntoConv(_InferenceBatchNormRule):
    """Fold an inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it.

    Applies when the layer's output feeds only the BatchNormalization, its weights (and bias) and the
    BN parameters are constants; any group count, Gemm with transB 0 or 1, with or without bias (Gemm's
    alpha/beta are folded in too). The layer takes over the BN's output tensor and is renamed
    ``<layer>::fold-batchnorm-into-conv``; new weights never overwrite shared initializers. Left with the
    reason: training-mode BNs, non-constant parameters or weights, a layer output read elsewhere, channel
    counts that do not agree. Invariant: no BatchNormalization that this rule can fold remains; outputs
    are unchanged up to float rounding.
    """

    name = FOLD_RULE

    def check_inference(self, rw: Rewriter, bn: gs.Node, params: tuple[np.ndarray, np.ndarray]) -> NoMatch | tuple:
        layer = _fold_target(rw.graph, bn)
        if isinstance(layer, NoMatch):
            return layer
        weights = constant_value(layer.inputs[1])
        folded = _folded_weights(layer, weights, params[0])
        if isinstance(folded, NoMatch):
            return folded
        return layer, params, weights, folded

    def rewrite(self, rw: Rewriter, bn: gs.Node, found: tuple) -> None:
        layer, (s, shift), weights, folded = found
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
        y = bn.outputs[0]
        rw.remove(bn)
        layer.outputs[0] = y
        rw.count(f"fold-batchnorm-into-{layer.op.lower()}")


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
        if not isinstance(_fold_target(rw.graph, bn), NoMatch):
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


register_rules(FOLD_RULE, FoldBatchNormIntoConv())
register_rules(AFFINE_RULE, BatchNormToAffine())
