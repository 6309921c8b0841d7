"""Explicit padding: ``auto_pad`` (SAME_UPPER, SAME_LOWER, VALID) becomes the ``pads`` it stands for, a
zero Pad node before a Conv becomes part of the Conv's ``pads``, and a Pad before a MaxPool part of the
MaxPool's where the padded values never win a maximum.

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

from qanac.graph import constant_value, is_graph_output
from qanac.passes._rewrite import is_non_negative, known_rank, static_dims, static_shape
from qanac.rewrite import NoMatch, Rewriter, Rule, node_label, register_rules

AUTO_PAD_OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool")
POOL_OPS = ("MaxPool", "AveragePool", "LpPool")


class ExplicitPads(Rule):
    """Replace ``auto_pad`` SAME_UPPER/SAME_LOWER/VALID on Conv, ConvTranspose and pooling by ``pads``.

    Needs the static spatial input shape (infer-shapes). A node whose explicit padding would not give
    the same output size (pooling with ``ceil_mode`` where the two formulas differ, or a ConvTranspose
    with ``output_shape``) is left alone with the reason; ``auto_pad`` NOTSET (or absent) is not a
    candidate. Invariant: a rewritten node has no ``auto_pad`` and the same output shape.
    """

    name = "explicit-pads"
    ops = AUTO_PAD_OPS

    def match(self, rw: Rewriter, node: gs.Node) -> bool:
        return _auto_pad(node) != "NOTSET"

    def check(self, rw: Rewriter, node: gs.Node) -> NoMatch | list[int]:
        return _explicit_pads(node, _auto_pad(node))

    def rewrite(self, rw: Rewriter, node: gs.Node, pads: list[int]) -> None:
        mode = _auto_pad(node)
        node.attrs.pop("auto_pad", None)
        node.attrs["pads"] = pads
        rw.count(f"explicit-pads-{mode.lower().replace('_', '-')}")


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


def _explicit_pads(node: gs.Node, mode: str) -> list[int] | NoMatch:
    x = node.inputs[0]
    if x.shape is None or len(x.shape) < 3:
        return NoMatch("input rank unknown (run infer-shapes)")
    spatial = len(x.shape) - 2
    sizes = static_dims(x, range(2, 2 + spatial))
    if sizes is None:
        return NoMatch("spatial input dimensions unknown (run infer-shapes)")
    kernel = _kernel_shape(node, spatial)
    if kernel is None or len(kernel) != spatial:
        return NoMatch("kernel shape unknown")
    strides = [int(s) for s in node.attrs.get("strides", [1] * spatial)]
    dilations = [int(d) for d in node.attrs.get("dilations", [1] * spatial)]
    if node.op == "ConvTranspose" and "output_shape" in node.attrs:
        return NoMatch("ConvTranspose with output_shape computes its own padding")

    begins, ends, outs = [], [], []
    for i in range(spatial):
        extent = extent_of(kernel[i], dilations[i])
        if mode == "VALID":
            total = 0
        elif node.op == "ConvTranspose":
            output_padding = int(node.attrs.get("output_padding", [0] * spatial)[i])
            total = strides[i] * (sizes[i] - 1) + output_padding + extent - sizes[i] * strides[i]
            if total < 0:
                return NoMatch(f"negative padding {total} on axis {i + 2}")
        else:
            out = math.ceil(sizes[i] / strides[i])
            total = max(0, (out - 1) * strides[i] + extent - sizes[i])
        small, large = total // 2, total - total // 2
        begin, end = (small, large) if mode == "SAME_UPPER" or mode == "VALID" else (large, small)
        begins.append(begin)
        ends.append(end)
        outs.append(_output_size(node, mode, sizes[i], extent, strides[i], i))

    for i in range(spatial):
        extent = extent_of(kernel[i], dilations[i])
        explicit = _explicit_output_size(node, sizes[i], begins[i], ends[i], extent, strides[i], i)
        if explicit != outs[i]:
            return NoMatch(
                f"explicit pads give output size {explicit} on axis {i + 2}, auto_pad {mode} gives {outs[i]}"
            )
    inferred = static_dims(node.outputs[0], range(2, 2 + spatial))
    if inferred is not None and list(inferred) != outs:
        return NoMatch(f"inferred output size {list(inferred)} differs from the auto_pad {mode} size {outs}")
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


class FusePadIntoConv(Rule):
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

    name = "fuse-pad-into-conv"
    ops = ("Pad",)

    def check(self, rw: Rewriter, pad: gs.Node) -> NoMatch | tuple[list[int], list[int]]:
        spatial = _spatial_zero_pads(pad)
        if isinstance(spatial, NoMatch):
            return spatial
        padded = pad.outputs[0]
        readers = padded.outputs
        if not readers or any(r.op != "Conv" or r.inputs[0] is not padded or _auto_pad(r) != "NOTSET" for r in readers):
            return NoMatch("read by something other than the data input of a Conv with explicit pads")
        if is_graph_output(rw.graph, padded):
            return NoMatch("its output is a graph output")
        return spatial

    def rewrite(self, rw: Rewriter, pad: gs.Node, spatial: tuple[list[int], list[int]]) -> None:
        begin, end = spatial
        rank = len(begin)
        readers = list(pad.outputs[0].outputs)
        for conv in readers:
            pads = [int(p) for p in conv.attrs.get("pads", [0] * (2 * rank))]
            conv.attrs["pads"] = ([pads[i] + begin[i] for i in range(rank)]
                                  + [pads[rank + i] + end[i] for i in range(rank)])
            conv.inputs[0] = pad.inputs[0]
            rw.record(conv)
        rw.remove(pad)
        rw.count(self.name, len(readers))


def _pad_value(pad: gs.Node) -> float | None:
    """The constant a constant-mode Pad pads with (0 when it has no value input), or None if computed."""

    if len(pad.inputs) > 2 and pad.inputs[2].name:
        value = constant_value(pad.inputs[2])
        return None if value is None or value.size != 1 else float(value.reshape(()))
    return 0.0


def _spatial_pads(pad: gs.Node, what: str) -> tuple[list[int], list[int]] | NoMatch:
    """(begin, end) pads of the spatial axes of a constant-mode Pad with constant non-negative pads, or
    why it is not one (``what`` says which padding the node's own is: "zero", "ignored")."""

    mode = pad.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return NoMatch(f"mode '{mode}' (only {what} padding is what the reader does)")
    if len(pad.inputs) < 2:
        return NoMatch("no pads input (opset < 11; run upgrade-opset)")
    pads = constant_value(pad.inputs[1])
    if pads is None:
        return NoMatch("its pads are computed at run time")
    rank = known_rank(pad.inputs[0]) or pads.size // 2
    axes = list(range(rank))
    if len(pad.inputs) > 3 and pad.inputs[3].name:
        given = constant_value(pad.inputs[3])
        if given is None:
            return NoMatch("its axes are computed at run time")
        axes = [int(a) % rank for a in given.reshape(-1)]
    pads = [int(p) for p in pads.reshape(-1)]
    full_begin, full_end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        full_begin[axis], full_end[axis] = pads[i], pads[len(axes) + i]
    if rank < 3 or any(full_begin[:2]) or any(full_end[:2]):
        return NoMatch("it pads the batch or channel axis")
    if any(p < 0 for p in full_begin + full_end):
        return NoMatch("negative pads (a crop)")
    return full_begin[2:], full_end[2:]


def _spatial_zero_pads(pad: gs.Node) -> tuple[list[int], list[int]] | NoMatch:
    """(begin, end) pads of the spatial axes of a zero constant Pad, or why it is not one."""

    spatial = _spatial_pads(pad, "zero")
    if isinstance(spatial, NoMatch):
        return spatial
    if _pad_value(pad) != 0.0:
        return NoMatch("it pads with a value other than 0")
    return spatial


# At or below this a pad value acts as minus infinity for max pooling of float32 data.
LOWEST_FLOAT32 = float(np.finfo(np.float32).min)


class FusePadIntoMaxPool(Rule):
    """Fold a constant Pad of the spatial axes into the ``pads`` of the MaxPools that read it, where the
    padded values never win a maximum (exact).

    Keras' ZeroPadding2D before MaxPooling2D (tf2onnx: Pad -> MaxPool) pads with zeros; a MaxPool's own
    padding takes no part in the maximum. Both are the same on a map that is non-negative by construction
    (a Relu, a Clip with minimum >= 0, or a pooling or reshaping of one), and for a Pad with -inf (or the
    lowest float32) on any map, as long as every pooling window still covers a real pixel. Then the Pad
    goes and a MaxPool(3, 2) after ZeroPadding2D(1) is MaxPool(3, 2, pads 1), PyTorch's spelling, which
    split-padded-maxpool rewrites for Akida. Taken: constant mode, constant non-negative pads on the
    spatial axes only, every reader a MaxPool with explicit pads (run explicit-pads first) and no indices
    output that reads it as its data input, the same output size after the fold (ceil_mode included).
    Left with the reason: a zero Pad of a map that may be negative, other pad values or modes, padded
    batch or channel axes, crops, windows that would cover only padding, other readers.
    """

    name = "fuse-pad-into-maxpool"
    ops = ("Pad",)

    def match(self, rw: Rewriter, pad: gs.Node) -> bool:
        return any(r.op == "MaxPool" for r in pad.outputs[0].outputs)

    def check(self, rw: Rewriter, pad: gs.Node) -> NoMatch | tuple[list[int], list[int]]:
        spatial = _spatial_pads(pad, "constant")
        if isinstance(spatial, NoMatch):
            return spatial
        value = _pad_value(pad)
        if value is None:
            return NoMatch("its pad value is computed at run time")
        if value > LOWEST_FLOAT32 and not (value == 0.0 and is_non_negative(pad.inputs[0])):
            return NoMatch(f"pads with {value:g} a map that may be negative (a Relu or Clip(min >= 0) must "
                           "produce it): the padding would count in the maximum")
        padded = pad.outputs[0]
        if is_graph_output(rw.graph, padded):
            return NoMatch("its output is a graph output")
        readers = padded.outputs
        if any(r.op != "MaxPool" or r.inputs[0] is not padded or _auto_pad(r) != "NOTSET"
               or (len(r.outputs) > 1 and not r.outputs[1].is_empty()) for r in readers):
            return NoMatch("read by something other than the data input of a MaxPool with explicit pads and "
                           "no indices output")
        size = static_dims(pad.inputs[0], range(2, 2 + len(spatial[0])))
        if size is None:
            return NoMatch("spatial input dimensions unknown (run infer-shapes)")
        for pool in readers:
            problem = _why_not_fused(pool, size, spatial)
            if problem is not None:
                return NoMatch(f"MaxPool '{node_label(pool)}': {problem}")
        return spatial

    def rewrite(self, rw: Rewriter, pad: gs.Node, spatial: tuple[list[int], list[int]]) -> None:
        begin, end = spatial
        readers = list(pad.outputs[0].outputs)
        for pool in readers:
            pool.attrs["pads"] = _fused_pads(pool, begin, end)
            pool.inputs[0] = pad.inputs[0]
            rw.record(pool)
        rw.remove(pad)
        rw.count(self.name, len(readers))


def _fused_pads(pool: gs.Node, begin: list[int], end: list[int]) -> list[int]:
    rank = len(begin)
    pads = [int(p) for p in pool.attrs.get("pads", [0] * (2 * rank))]
    return [pads[i] + begin[i] for i in range(rank)] + [pads[rank + i] + end[i] for i in range(rank)]


def _why_not_fused(pool: gs.Node, size: tuple[int, ...], spatial: tuple[list[int], list[int]]) -> str | None:
    """Why ``pool`` cannot take the Pad's padding as its own (None when it can)."""

    begin, end = spatial
    rank = len(begin)
    kernel = [int(k) for k in pool.attrs.get("kernel_shape", [])]
    if len(kernel) != rank:
        return "kernel shape unknown"
    strides = [int(v) for v in pool.attrs.get("strides", [1] * rank)]
    dilations = [int(v) for v in pool.attrs.get("dilations", [1] * rank)]
    fused = _fused_pads(pool, begin, end)
    own = [int(p) for p in pool.attrs.get("pads", [0] * (2 * rank))]
    for i in range(rank):
        extent = extent_of(kernel[i], dilations[i])
        padded = size[i] + begin[i] + end[i]
        before = _explicit_output_size(pool, padded, own[i], own[rank + i], extent, strides[i], i)
        after = _explicit_output_size(pool, size[i], fused[i], fused[rank + i], extent, strides[i], i)
        if before != after:
            return f"output size {after} after the fold, {before} before (ceil_mode)"
        for m in range(after):
            taps = range(m * strides[i] - fused[i], m * strides[i] - fused[i] + extent, dilations[i])
            if not any(0 <= t < size[i] for t in taps):
                return f"window {m} on axis {i + 2} would cover only padding"
    return None


register_rules("explicit-pads", ExplicitPads())
register_rules("fuse-pad-into-conv", FusePadIntoConv())
register_rules("fuse-pad-into-maxpool", FusePadIntoMaxPool())
