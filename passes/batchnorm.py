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

from qanac.graph import CompilationModel, constant_value, disconnect, is_graph_output, nodes_of
from qanac.pipeline import PassContext
from qanac.registry import PassResult, register_pass
from qanac.passes._rewrite import derived_node_name, known_rank, new_constant, new_variable, node_label

FOLD_RULE = "fold-batchnorm-into-conv"
AFFINE_RULE = "batchnorm-to-affine"
FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def _inference_parameters(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """``(s, shift)`` with ``y = s * x + shift`` per channel, or why the node is not an inference BN."""

    if int(bn.attrs.get("training_mode", 0)) != 0:
        return "training_mode=1 (uses batch statistics)"
    if any(not out.is_empty() for out in bn.outputs[1:]):
        return "has running-statistics outputs (training mode before opset 14)"
    if int(bn.attrs.get("spatial", 1)) != 1:
        return "spatial=0 (per-element statistics, opset < 9)"
    params = [constant_value(t) for t in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return "scale, bias, mean or variance is not a constant"
    scale, bias, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    if not (len(scale) == len(bias) == len(mean) == len(var)):
        return "parameters of different lengths"
    s = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return s, bias - s * mean


def _fold_target(model: CompilationModel, bn: gs.Node) -> gs.Node | str:
    """The Conv/ConvTranspose/Gemm that ``bn`` folds into, or why there is none."""

    x = bn.inputs[0]
    if len(x.inputs) != 1 or x.inputs[0].op not in FOLDABLE_PRODUCERS:
        return "input is not produced by Conv, ConvTranspose or Gemm"
    layer = x.inputs[0]
    if len(x.outputs) != 1 or is_graph_output(model.graph, x):
        return f"output of {layer.op} '{node_label(layer)}' has other consumers"
    if len(layer.inputs) < 2 or constant_value(layer.inputs[1]) is None:
        return f"weights of {layer.op} '{node_label(layer)}' are not constant"
    if len(layer.inputs) > 2 and not layer.inputs[2].is_empty() and constant_value(layer.inputs[2]) is None:
        return f"bias of {layer.op} '{node_label(layer)}' is not constant"
    if layer.op == "Gemm":
        rank = known_rank(x)
        if rank is not None and rank != 2:
            return "Gemm output is not 2-D"
    return layer


def _folded_weights(layer: gs.Node, weights: np.ndarray, s: np.ndarray) -> np.ndarray | str:
    w = weights.astype(np.float64)
    channels = len(s)
    if layer.op == "Conv":
        if w.shape[0] != channels:
            return f"{channels} BN channels but {w.shape[0]} Conv filters"
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if layer.op == "ConvTranspose":
        group = int(layer.attrs.get("group", 1))
        per_group = w.shape[1]
        if per_group * group != channels:
            return f"{channels} BN channels but {per_group * group} ConvTranspose outputs"
        # W is [C_in, C_out / group, k...]; input channel i belongs to group i // (C_in / group)
        in_per_group = w.shape[0] // group
        factors = s.reshape(group, 1, per_group).repeat(in_per_group, axis=1).reshape(w.shape[0], per_group)
        return w * factors.reshape(factors.shape + (1,) * (w.ndim - 2))
    trans_b = int(layer.attrs.get("transB", 0))
    alpha = float(layer.attrs.get("alpha", 1.0))
    outputs = w.shape[0] if trans_b else w.shape[1]
    if w.ndim != 2 or outputs != channels:
        return f"{channels} BN channels but Gemm has {outputs} outputs"
    return alpha * (w * s.reshape(-1, 1) if trans_b else w * s.reshape(1, -1))


@register_pass(FOLD_RULE)
def fold_batchnorm_into_conv(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Fold an inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it.

    Applies when the layer's output feeds only the BatchNormalization, its weights (and bias) and the
    BN parameters are constants; any group count, Gemm with transB 0 or 1, with or without bias (Gemm's
    alpha/beta are folded in too). The layer takes over the BN's output tensor and is renamed
    ``<layer>::fold-batchnorm-into-conv``; new weights never overwrite shared initializers. Invariant:
    no BatchNormalization that this rule can fold remains; outputs are unchanged up to float rounding.
    """

    result = PassResult()
    skipped: dict[str, str] = {}
    graph = model.graph
    for bn in nodes_of(graph, ["BatchNormalization"]):
        params = _inference_parameters(bn)
        layer = _fold_target(model, bn) if not isinstance(params, str) else params
        if isinstance(layer, str):
            skipped[node_label(bn)] = layer
            continue
        s, shift = params
        weights = constant_value(layer.inputs[1])
        folded = _folded_weights(layer, weights, s)
        if isinstance(folded, str):
            skipped[node_label(bn)] = folded
            continue
        has_bias = len(layer.inputs) > 2 and not layer.inputs[2].is_empty()
        bias = constant_value(layer.inputs[2]).astype(np.float64) if has_bias else np.zeros(1)
        if layer.op == "Gemm":
            bias = float(layer.attrs.get("beta", 1.0)) * bias if has_bias else np.zeros(len(s))
            new_bias = s * bias + shift  # broadcasts a scalar, [N] or [M, N] bias over the N columns
            layer.attrs["alpha"] = 1.0
            layer.attrs["beta"] = 1.0
        else:
            new_bias = s * np.broadcast_to(bias.reshape(-1), s.shape) + shift

        name = derived_node_name(layer, FOLD_RULE)
        dtype = weights.dtype
        layer.inputs[1] = new_constant(graph, f"{name}/weight", folded.astype(dtype))
        bias_tensor = new_constant(graph, f"{name}/bias", new_bias.astype(dtype))
        if len(layer.inputs) > 2:
            layer.inputs[2] = bias_tensor
        else:
            layer.inputs.append(bias_tensor)
        y = bn.outputs[0]
        disconnect(bn)
        layer.outputs[0] = y
        layer.name = name
        model.record(layer, FOLD_RULE)
        result.count(f"fold-batchnorm-into-{layer.op.lower()}")
    if skipped:
        result.details["skipped"] = skipped
    return result


@register_pass(AFFINE_RULE)
def batchnorm_to_affine(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Turn an inference-mode BatchNormalization that cannot be folded into a layer into Mul and Add.

    ``y = x * s + shift`` with per-channel constants of shape [C, 1, ..., 1] (rank of x minus one, so
    [C, 1, 1] for 4-D inputs, [C] for 2-D). BNs that fold-batchnorm-into-conv can fold, and training-mode
    BNs, are left alone. The new nodes are ``<bn>::batchnorm-to-affine:0`` (Mul) and ``:1`` (Add); the Add
    writes the BN's output tensor. Invariant: no foldable-elsewhere or training BN is touched; every other
    BatchNormalization with constant parameters and known input rank is gone.
    """

    result = PassResult()
    skipped: dict[str, str] = {}
    graph = model.graph
    for bn in nodes_of(graph, ["BatchNormalization"]):
        params = _inference_parameters(bn)
        if isinstance(params, str):
            skipped[node_label(bn)] = params
            continue
        if not isinstance(_fold_target(model, bn), str):
            skipped[node_label(bn)] = f"left to {FOLD_RULE}"
            continue
        x, y = bn.inputs[0], bn.outputs[0]
        rank = known_rank(x) if known_rank(x) is not None else known_rank(y)
        if rank is None or rank < 2:
            skipped[node_label(bn)] = "input rank unknown (run infer-shapes)"
            continue
        s, shift = params
        dtype = x.dtype if x.dtype is not None else constant_value(bn.inputs[1]).dtype
        channel_shape = (len(s),) + (1,) * (rank - 2)
        mul_name = derived_node_name(bn, AFFINE_RULE, 0)
        add_name = derived_node_name(bn, AFFINE_RULE, 1)
        scaled = new_variable(graph, f"{mul_name}/out", y)
        mul = gs.Node(
            "Mul",
            name=mul_name,
            inputs=[x, new_constant(graph, f"{mul_name}/scale", s.reshape(channel_shape).astype(dtype))],
            outputs=[scaled],
        )
        disconnect(bn)
        add = gs.Node(
            "Add",
            name=add_name,
            inputs=[scaled, new_constant(graph, f"{add_name}/shift", shift.reshape(channel_shape).astype(dtype))],
            outputs=[y],
        )
        graph.nodes.extend([mul, add])
        model.record(mul, AFFINE_RULE)
        model.record(add, AFFINE_RULE)
        result.count(AFFINE_RULE)
    if skipped:
        result.details["skipped"] = skipped
    return result
