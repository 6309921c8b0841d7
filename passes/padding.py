"""Explicit padding: ``auto_pad`` (SAME_UPPER, SAME_LOWER, VALID) becomes the ``pads`` it stands for, and
a zero Pad node before a Conv becomes part of the Conv's ``pads``.

Backends and quantizers read ``pads``; ``auto_pad`` is deprecated in ONNX and its meaning depends on the
input size, so it is resolved here from the inferred input shape.

Conv, pooling (SAME):   out = ceil(in / stride),
                        total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - in)
ConvTranspose (SAME):   out = in * stride,
                        total = stride * (in - 1) + output_padding + (kernel - 1) * dilation + 1 - out
SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the beginning; VALID is no padding.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from qanac.graph import CompilationModel, constant_value, nodes_of
from qanac.pipeline import PassContext
from qanac.registry import PassResult, register_pass
from qanac.passes._rewrite import known_rank, node_label, static_dims, static_shape

AUTO_PAD_OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool")
POOL_OPS = ("MaxPool", "AveragePool", "LpPool")


@register_pass("explicit-pads")
def explicit_pads(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Replace ``auto_pad`` SAME_UPPER/SAME_LOWER/VALID on Conv, ConvTranspose and pooling by ``pads``.

    Needs the static spatial input shape (infer-shapes). A node whose explicit padding would not give
    the same output size (pooling with ``ceil_mode`` where the two formulas differ, or a ConvTranspose
    with ``output_shape``) is left alone with the reason in the details; ``auto_pad`` NOTSET (or absent)
    is left alone. Invariant: a rewritten node has no ``auto_pad`` and the same output shape.
    """

    result = PassResult()
    skipped: dict[str, str] = {}
    for node in nodes_of(model.graph, AUTO_PAD_OPS):
        mode = _auto_pad(node)
        if mode == "NOTSET":
            continue
        pads_or_reason = _explicit_pads(node, mode)
        if isinstance(pads_or_reason, str):
            skipped[node_label(node)] = pads_or_reason
            continue
        node.attrs.pop("auto_pad", None)
        node.attrs["pads"] = pads_or_reason
        result.count(f"explicit-pads-{mode.lower().replace('_', '-')}")
    if skipped:
        result.details["skipped"] = skipped
    return result


def _auto_pad(node: gs.Node) -> str:
    value = node.attrs.get("auto_pad", "NOTSET")
    return value.decode() if isinstance(value, bytes) else str(value)


def _kernel_shape(node: gs.Node, spatial: int) -> tuple[int, ...] | None:
    if "kernel_shape" in node.attrs:
        return tuple(int(k) for k in node.attrs["kernel_shape"])
    if node.op in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
        shape = static_shape(node.inputs[1])
        return None if shape is None else shape[2:]
    return None


def _explicit_pads(node: gs.Node, mode: str) -> list[int] | str:
    x = node.inputs[0]
    if x.shape is None or len(x.shape) < 3:
        return "input rank unknown (run infer-shapes)"
    spatial = len(x.shape) - 2
    sizes = static_dims(x, range(2, 2 + spatial))
    if sizes is None:
        return "spatial input dimensions unknown (run infer-shapes)"
    kernel = _kernel_shape(node, spatial)
    if kernel is None or len(kernel) != spatial:
        return "kernel shape unknown"
    strides = [int(s) for s in node.attrs.get("strides", [1] * spatial)]
    dilations = [int(d) for d in node.attrs.get("dilations", [1] * spatial)]
    if node.op == "ConvTranspose" and "output_shape" in node.attrs:
        return "ConvTranspose with output_shape computes its own padding"

    begins, ends, outs = [], [], []
    for i in range(spatial):
        extent = extent_of(kernel[i], dilations[i])
        if mode == "VALID":
            total = 0
        elif node.op == "ConvTranspose":
            output_padding = int(node.attrs.get("output_padding", [0] * spatial)[i])
            total = strides[i] * (sizes[i] - 1) + output_padding + extent - sizes[i] * strides[i]
            if total < 0:
                return f"negative padding {total} on axis {i + 2}"
        else:
            out = math.ceil(sizes[i] / strides[i])
            total = max(0, (out - 1) * strides[i] + extent - sizes[i])
        small, large = total // 2, total - total // 2
        begin, end = (small, large) if mode == "SAME_UPPER" or mode == "VALID" else (large, small)
        begins.append(begin)
        ends.append(end)
        outs.append(_output_size(node, mode, sizes[i], extent, strides[i], i))

    for i in range(spatial):
        explicit = _explicit_output_size(node, sizes[i], begins[i], ends[i], extent_of(kernel[i], dilations[i]), strides[i], i)
        if explicit != outs[i]:
            return f"explicit pads give output size {explicit} on axis {i + 2}, auto_pad {mode} gives {outs[i]}"
    inferred = static_dims(node.outputs[0], range(2, 2 + spatial))
    if inferred is not None and list(inferred) != outs:
        return f"inferred output size {list(inferred)} differs from the auto_pad {mode} size {outs}"
    return begins + ends


def _output_size(node: gs.Node, mode: str, size: int, extent: int, stride: int, axis: int) -> int:
    """The output size ONNX specifies for ``auto_pad`` ``mode``."""

    if node.op == "ConvTranspose":
        if mode == "VALID":
            output_padding = int(node.attrs.get("output_padding", [0] * (axis + 1))[axis])
            return stride * (size - 1) + output_padding + extent
        return size * stride
    ceil_mode = node.op in POOL_OPS and int(node.attrs.get("ceil_mode", 0)) == 1
    if mode == "VALID":
        if ceil_mode:
            return math.ceil((size - extent + 1) / stride)
        return (size - extent) // stride + 1
    return math.ceil(size / stride)


def extent_of(kernel: int, dilation: int) -> int:
    return (kernel - 1) * dilation + 1


def _explicit_output_size(node: gs.Node, size: int, begin: int, end: int, extent: int, stride: int, axis: int) -> int:
    """The output size with explicit ``pads`` ``begin`` and ``end`` on this axis."""

    if node.op == "ConvTranspose":
        output_padding = int(node.attrs.get("output_padding", [0] * (axis + 1))[axis])
        return stride * (size - 1) + output_padding + extent - begin - end
    span = size + begin + end - extent
    if node.op in POOL_OPS and int(node.attrs.get("ceil_mode", 0)) == 1:
        out = math.ceil(span / stride) + 1
        if (out - 1) * stride >= size + begin:
            out -= 1  # a window that would start in the end padding is dropped
        return out
    return span // stride + 1


@register_pass("fuse-pad-into-conv")
def fuse_pad_into_conv(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Fold a constant zero Pad of the spatial axes into the ``pads`` of the Convs that read it.

    Keras' ZeroPadding2D and PyTorch's ZeroPad2d / F.pad export a Pad node before a Conv without
    padding; the Conv pads with zeros itself, so the sum of both paddings is the same convolution. Taken:
    Pad in "constant" mode with a constant value of 0 (or none), constant non-negative pads on the
    spatial axes only (none on batch or channels), every reader a Conv with explicit padding (run
    explicit-pads first) that reads it as its data input. The Pad disappears once no reader is left.
    Left with the reason: other modes (reflect, edge, wrap), non-zero values, negative pads (crops),
    padded batch or channel axes, non-constant pads or axes, and Pads read by anything but a Conv.
    Invariant: every rewritten Conv's output is unchanged.
    """

    result = PassResult()
    skipped: dict[str, str] = {}
    for pad in nodes_of(model.graph, ["Pad"]):
        spatial_or_reason = _spatial_zero_pads(pad)
        if isinstance(spatial_or_reason, str):
            skipped[node_label(pad)] = spatial_or_reason
            continue
        padded = pad.outputs[0]
        readers = list(padded.outputs)
        if not readers or any(r.op != "Conv" or r.inputs[0] is not padded or _auto_pad(r) != "NOTSET" for r in readers):
            skipped[node_label(pad)] = "read by something other than the data input of a Conv with explicit pads"
            continue
        if any(o is padded for o in model.graph.outputs):
            skipped[node_label(pad)] = "its output is a graph output"
            continue
        begin, end = spatial_or_reason
        for conv in readers:
            rank = len(begin)
            pads = [int(p) for p in conv.attrs.get("pads", [0] * (2 * rank))]
            conv.attrs["pads"] = [pads[i] + begin[i] for i in range(rank)] + [pads[rank + i] + end[i] for i in range(rank)]
            conv.inputs[0] = pad.inputs[0]
            model.record(conv, "fuse-pad-into-conv")
            result.count("fuse-pad-into-conv")
        pad.outputs.clear()
        pad.inputs.clear()
    if skipped:
        result.details["skipped"] = skipped
    if result.counts:
        model.graph.cleanup()
    return result


def _spatial_zero_pads(pad: gs.Node) -> tuple[list[int], list[int]] | str:
    """(begin, end) pads of the spatial axes of a zero constant Pad, or why it is not one."""

    mode = pad.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return f"mode '{mode}' (only zero padding is what a Conv does)"
    if len(pad.inputs) < 2:
        return "no pads input (opset < 11; run upgrade-opset)"
    pads = constant_value(pad.inputs[1])
    if pads is None:
        return "its pads are computed at run time"
    if len(pad.inputs) > 2 and pad.inputs[2].name:
        value = constant_value(pad.inputs[2])
        if value is None or np.any(value != 0):
            return "it pads with a value other than 0"
    rank = known_rank(pad.inputs[0]) or pads.size // 2
    axes = list(range(rank))
    if len(pad.inputs) > 3 and pad.inputs[3].name:
        given = constant_value(pad.inputs[3])
        if given is None:
            return "its axes are computed at run time"
        axes = [int(a) % rank for a in given.reshape(-1)]
    pads = [int(p) for p in pads.reshape(-1)]
    full_begin, full_end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        full_begin[axis], full_end[axis] = pads[i], pads[len(axes) + i]
    if rank < 3 or any(full_begin[:2]) or any(full_end[:2]):
        return "it pads the batch or channel axis"
    if any(p < 0 for p in full_begin + full_end):
        return "negative pads (a crop)"
    return full_begin[2:], full_end[2:]
