"""Pooling Akida refuses or runs in software, rewritten as fixed-weight layers it maps, with the same values.

- average-pool-to-depthwise: a windowed AveragePool is a depthwise convolution whose kernel holds 1/(kh*kw)
  on the pooling window's taps and 0 elsewhere.
- split-padded-maxpool: PyTorch's MaxPool2d(3, 2, 1) starts its windows one pixel before the map, which
  Akida cannot do (its pooling pads only at the end), and Akida pools at most 2x2 in hardware. On a
  non-negative map the same maximum is a 2x2 stride-1 max pooling, a one-pixel shift, and a 2x2 stride-2
  max pooling, all in forms Akida accepts.
- stage-global-average-pool: a global average pooling Akida cannot fuse where it is (over more than
  MAX_GAP_PIXELS pixels, after a strided, depthwise or input convolution, or after max pooling) gets
  depthwise stages that shrink the map while keeping its sum, and a 1x1 identity convolution to fuse into.

The inserted layers' weights are exact in float (0, 1, 1/n) and quantize without error; the rewrites add
requantization steps only.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from qanac.backends.akida.padding import accepted_forms, form_pads, output_size, pads_form
from qanac.backends.akida.rules import (
    ACTIVATIONS,
    DEPTHWISE_KERNELS,
    MAX_GAP_PIXELS,
    STRIDE2_KERNELS,
    fused_chain,
    is_depthwise,
    maxpool_last_in_sequence,
)
from qanac.diagnostics import Level
from qanac.graph import CompilationModel, constant_value, is_graph_output, replace_uses
from qanac.lint import LintContext, lint_model
from qanac.passes.akida.layers import (
    channels,
    conv_attrs,
    conv_node,
    identity_pointwise_weights,
    is_input_layer,
    is_non_negative,
    producer,
    shaped_like,
    spatial_size,
)
from qanac.rewrite import NoMatch, Rewriter, Rule, node_label, register_rules
from qanac.targets import get_target

AVERAGE_RULE = "average-pool-to-depthwise"
MAXPOOL_RULE = "split-padded-maxpool"
GAP_RULE = "stage-global-average-pool"
FEED_RULE = "identity-conv-after-maxpool"
# Layers after which a global pooling can be fused once an identity convolution is put between.
GAP_SOURCES = ("Conv", "ConvTranspose", "Add", "Concat", "MaxPool")
SHARED_REASON = (
    "the pooled map is also read elsewhere: an Akida model has one output, and a pooled branch rejoins the "
    "map only through a gate (squeeze-and-excitation), which runs on the host; see --approx attention-freeze"
)
HALVING_KERNEL = min(k for k in STRIDE2_KERNELS if k in DEPTHWISE_KERNELS)  # 3


def _ints(node: gs.Node, name: str, default: list[int]) -> list[int]:
    return [int(v) for v in node.attrs.get(name, default)]


def _pool_output_size(size: int, kernel: int, stride: int, begin: int, end: int, ceil_mode: bool) -> int:
    span = size + begin + end - kernel
    if not ceil_mode:
        return span // stride + 1
    out = math.ceil(span / stride) + 1
    return out - 1 if (out - 1) * stride >= size + begin else out


def _average_plan(pool: gs.Node, size: tuple[int, int]) -> tuple[int, list[int], tuple[int, int]] | NoMatch:
    """(kernel K, conv pads, tap offsets) of the depthwise conv equal to ``pool``, or why there is none."""

    kernel = _ints(pool, "kernel_shape", [])
    strides = _ints(pool, "strides", [1, 1])
    pads = _ints(pool, "pads", [0, 0, 0, 0])
    ceil_mode = bool(pool.attrs.get("ceil_mode", 0))
    include_pad = bool(pool.attrs.get("count_include_pad", 0))
    if pool.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return NoMatch("auto_pad (run explicit-pads)")
    if len(kernel) != 2 or any(d != 1 for d in _ints(pool, "dilations", [1, 1])):
        return NoMatch("not a 2-D undilated pooling")
    if strides[0] != strides[1] or strides[0] not in (1, 2):
        return NoMatch(f"strides {strides} (Akida convolutions take equal strides of 1 or 2)")
    outputs = [_pool_output_size(size[i], kernel[i], strides[i], pads[i], pads[i + 2], ceil_mode) for i in range(2)]
    for i in range(2):
        starts = [m * strides[i] - pads[i] for m in range(outputs[i])]
        if starts[-1] + kernel[i] > size[i] + pads[i + 2]:
            return NoMatch("a ceil_mode window runs past the padding (ONNX divides it by fewer pixels)")
        if not include_pad and (starts[0] < 0 or starts[-1] + kernel[i] > size[i]):
            return NoMatch("count_include_pad=0 with windows over the padding: the divisor changes at the borders")
    stride = (strides[0], strides[1])
    sizes = [K for K in sorted(DEPTHWISE_KERNELS) if K >= max(kernel) and (stride != (2, 2) or K in STRIDE2_KERNELS)]
    plans = sorted(((K, form) for K in sizes for form in accepted_forms((K, K), stride, False)),
                   key=lambda plan: (plan[1] == "valid", plan[0]))  # valid padding maps to software: last
    for K, form in plans:
        q = form_pads(size, (K, K), stride, form)
        offsets = (q[0] - pads[0], q[1] - pads[1])
        if all(0 <= offsets[i] <= K - kernel[i] and output_size(size[i], K, strides[i], q[i], q[i + 2]) == outputs[i]
               for i in range(2)):
            return K, q, offsets
    return NoMatch(f"no depthwise kernel of {sorted(DEPTHWISE_KERNELS)} with accepted pads gives the same windows")


class AveragePoolToDepthwise(Rule):
    """Replace a windowed 2-D AveragePool by the depthwise Conv that computes it (exact).

    The Conv's K x K kernel (K the smallest of 3, 5, 7 that holds the window; 3 at stride 2) has 1/(kh*kw)
    on the window's taps and 0 elsewhere; its padding is a form cnn2snn accepts, chosen so that every
    output window covers the same pixels (e.g. 2x2/2 on an even map: a 3x3/2 Conv with the 2x2 top-left
    taps, pads at the end). Zero padding is what count_include_pad=1 averages over; with
    count_include_pad=0 the pass applies only when no window touches the padding. ceil_mode is supported
    when no window runs past the padding. When every reader of the pooling is a 1x1 stride-1 Conv, the
    pooling is folded into them instead: each becomes the K x K Conv with the pooling's stride, padding
    and window, weights w / (kh * kw) on the window's taps (a residual block's two 1x1 projections in
    QANA), unless the pooled map comes from a node lint reports as an error (or one reading such a node:
    a residual Add of an attention gate, say), which runs on the host, where the fold would only cost
    MACs; why folding is worth K*K times the 1x1 Conv's MACs is in docs/pass-notes.md. Whole-map poolings
    without padding are not candidates (quantizeml makes them global). Left with the reason: strides other
    than 1 or 2, unknown input sizes, and windows no accepted padding reproduces.
    """

    name = AVERAGE_RULE
    ops = ("AveragePool",)

    def prepare(self, rw: Rewriter, candidates: list[gs.Node]) -> dict[str, set[str]]:
        return {}  # the host-bound nodes, found by lint when a fold is first possible

    def match(self, rw: Rewriter, pool: gs.Node) -> bool:
        size = spatial_size(pool.inputs[0])
        return size is None or _ints(pool, "kernel_shape", []) != list(size) or any(_ints(pool, "pads", [0, 0, 0, 0]))

    def check(self, rw: Rewriter, pool: gs.Node) -> NoMatch | tuple:
        x = pool.inputs[0]
        size, count = spatial_size(x), channels(x)
        if size is None or count is None:
            return NoMatch("input shape unknown (run infer-shapes)")
        plan = _average_plan(pool, size)
        if isinstance(plan, NoMatch):
            return plan
        readers = _pointwise_readers(pool.outputs[0], rw.graph)
        if readers and "host_bound" not in rw.prepared:
            rw.prepared["host_bound"] = _host_bound_nodes(rw.model)
        if readers and _feeds_from(x, rw.prepared["host_bound"]):
            readers = []
        return plan, count, readers

    def rewrite(self, rw: Rewriter, pool: gs.Node, found: tuple) -> None:
        (K, pads, (dh, dw)), count, readers = found
        x, out = pool.inputs[0], pool.outputs[0]
        kh, kw = _ints(pool, "kernel_shape", [])
        stride = _ints(pool, "strides", [1, 1])
        rw.remove(pool)
        if readers:
            for conv in readers:  # 1x1 conv of the average = K x K strided conv with the window masked in
                pointwise = constant_value(conv.inputs[1]).astype(np.float32)
                weights = np.zeros((*pointwise.shape[:2], K, K), np.float32)
                weights[:, :, dh:dh + kh, dw:dw + kw] = pointwise / (kh * kw)
                rw.rename(conv)
                conv.inputs[0] = x
                conv.inputs[1] = rw.constant(f"{conv.name}/weight", weights)
                conv.attrs.update(kernel_shape=[K, K], strides=list(stride), pads=list(pads))
            rw.count("fold-average-pool-into-pointwise-conv", len(readers))
            return
        weights = np.zeros((count, 1, K, K), np.float32)
        weights[:, 0, dh:dh + kh, dw:dw + kw] = 1.0 / (kh * kw)
        conv_node(rw.graph, rw.name(pool), x, weights, out, strides=(stride[0], stride[1]), pads=pads, group=count)


def _host_bound_nodes(model: CompilationModel) -> set[str]:
    """Nodes the akida lint rules report as errors: partitioning runs them on the host."""

    return {d.nodes[0] for d in lint_model(model, get_target("akida")) if d.level == Level.ERROR and d.nodes}


def _feeds_from(tensor: gs.Tensor, nodes: set[str]) -> bool:
    """Whether ``tensor``'s producer, or a producer of one of its inputs, is in ``nodes``."""

    node = producer(tensor)
    if node is None:
        return False
    return node.name in nodes or any((p := producer(t)) is not None and p.name in nodes for t in node.inputs)


def _pointwise_readers(tensor: gs.Tensor, graph: gs.Graph) -> list[gs.Node]:
    """The readers of ``tensor`` when every one is a 1x1, stride-1, unpadded, ungrouped Conv with constant
    weights reading it as its data input (else [])."""

    readers = list(tensor.outputs)
    if not readers or is_graph_output(graph, tensor):
        return []
    for conv in readers:
        attrs = conv_attrs(conv) if conv.op == "Conv" and conv.inputs[0] is tensor else None
        if attrs is None or attrs[0] != (1, 1) or attrs[1] != (1, 1) or any(attrs[2]) or any(d != 1 for d in attrs[3]):
            return []
        if int(conv.attrs.get("group", 1)) != 1:
            return []
    return readers


def _pool_host(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The Conv a max pooling of ``tensor`` can fuse into: one whose output reaches ``tensor`` through one
    activation, each read only once, with stride 1 and Akida's "same" padding (else None)."""

    act = producer(tensor)
    if act is None or act.op not in ACTIVATIONS or len(tensor.outputs) != 1:
        return None
    conv = producer(act.inputs[0])
    if conv is None or conv.op != "Conv" or len(act.inputs[0].outputs) != 1:
        return None
    attrs, size = conv_attrs(conv), spatial_size(conv.inputs[0])
    if attrs is None or size is None or attrs[1] != (1, 1):
        return None
    return conv if pads_form(size, attrs[0], attrs[1], attrs[2], is_input_layer(graph, conv)) == "same" else None


class SplitPaddedMaxPool(Rule):
    """Rewrite MaxPool 3x3, stride 2, pads 1 (PyTorch's MaxPool2d(3, 2, 1)) on a non-negative map y as
    MaxPool 2x2/1 (pads at the end), a one-pixel shift, MaxPool 2x2/2 and a Relu (exact).

    Output m of the original takes the maximum of y[2m-1], y[2m], y[2m+1] (per axis; y[-1] and y[n] are
    padding). u = MaxPool 2x2/1 gives u[i] = max(y[i], y[i+1]); the shift is a 3x3 Conv with the identity
    on its top-left tap and pads 1, so v[j] = u[j-1] with v[0] = 0; MaxPool 2x2/2 gives max(v[2m],
    v[2m+1]) = max(u[2m-1], u[2m]) = the original maximum. The zero the shift brings in is never above a
    real value because y >= 0 (the pool reads a Relu or a Clip with min >= 0), and every window holds a
    real value; the Relus the rewrite adds close Akida's Conv-MaxPool-activation pattern and are exact on
    values >= 0. Every piece is in a form Akida maps: 2x2 pools (hardware pools at most 2x2) with "same"
    pads, each fused after a stride-1 Conv padded in the "same" form. When the Conv before the pool is not
    such a Conv (strided, like ResNet's stem, or padded otherwise), a 1x1 identity Conv is put in front to
    host the first pool. The shift is an ordinary Conv, not a depthwise one (docs/pass-notes.md says why).

    MaxPools without begin pads are not candidates. Left with the reason: inputs that may be negative,
    other kernel/stride/padding combinations, unknown sizes.
    """

    name = MAXPOOL_RULE
    ops = ("MaxPool",)

    def match(self, rw: Rewriter, pool: gs.Node) -> bool:
        return any(_ints(pool, "pads", [0, 0, 0, 0])[:2])

    def check(self, rw: Rewriter, pool: gs.Node) -> NoMatch | tuple:
        shape_ok = (
            _ints(pool, "kernel_shape", []) == [3, 3] and _ints(pool, "strides", [1, 1]) == [2, 2]
            and _ints(pool, "pads", []) == [1, 1, 1, 1] and not pool.attrs.get("ceil_mode", 0)
            and _ints(pool, "dilations", [1, 1]) == [1, 1] and (len(pool.outputs) == 1 or pool.outputs[1].is_empty())
        )
        x = pool.inputs[0]
        size, count = spatial_size(x), channels(x)
        if not shape_ok:
            return NoMatch("only MaxPool 3x3, stride 2, pads 1 (no ceil_mode, dilation or indices) is rewritten")
        if size is None or count is None:
            return NoMatch("input shape unknown (run infer-shapes)")
        if not is_non_negative(x):
            return NoMatch("its input may be negative (a Relu or Clip(min >= 0) must produce it): "
                           "the shift's zero would count")
        return size, count

    def rewrite(self, rw: Rewriter, pool: gs.Node, found: tuple) -> None:
        (height, width), count = found
        graph = rw.graph
        x, out = pool.inputs[0], pool.outputs[0]
        hosted = _pool_host(x, graph) is not None
        rw.remove(pool)
        names = [rw.name(pool, i) for i in range(6)]
        source = x
        if not hosted:
            source = shaped_like(graph, f"{names[0]}/out", x, (count, height, width))
            conv_node(graph, names[0], x, identity_pointwise_weights(count), source)
        pairs = shaped_like(graph, f"{names[1]}/out", x, (count, height, width))
        graph.nodes.append(gs.Node("MaxPool", names[1], attrs={"kernel_shape": [2, 2], "strides": [1, 1],
                                                               "pads": [0, 0, 1, 1]}, inputs=[source], outputs=[pairs]))
        if not hosted:
            activated = shaped_like(graph, f"{names[2]}/out", x, (count, height, width))
            graph.nodes.append(gs.Node("Relu", names[2], inputs=[pairs], outputs=[activated]))
            pairs = activated
        shift_weights = np.zeros((count, count, 3, 3), np.float32)
        shift_weights[np.arange(count), np.arange(count), 0, 0] = 1.0
        shifted = shaped_like(graph, f"{names[3]}/out", x, (count, height, width))
        conv_node(graph, names[3], pairs, shift_weights, shifted, pads=[1, 1, 1, 1])
        pooled = shaped_like(graph, f"{names[4]}/out", x, (count, math.ceil(height / 2), math.ceil(width / 2)))
        graph.nodes.append(gs.Node("MaxPool", names[4], attrs={"kernel_shape": [2, 2], "strides": [2, 2],
                                                               "pads": [0, 0, height % 2, width % 2]},
                                   inputs=[shifted], outputs=[pooled]))
        graph.nodes.append(gs.Node("Relu", names[5], inputs=[pooled], outputs=[out]))
        rw.count(MAXPOOL_RULE if hosted else f"{MAXPOOL_RULE}-with-identity-host")


def _gap_source(tensor: gs.Tensor, graph: gs.Graph) -> tuple[gs.Node | None, bool]:
    """The layer a global pooling of ``tensor`` would fuse into (past activations), and whether any tensor
    on the way is read by something else."""

    shared = len(tensor.outputs) > 1 or is_graph_output(graph, tensor)
    node = producer(tensor)
    while node is not None and node.op in ACTIVATIONS:
        tensor = node.inputs[0]
        shared = shared or len(tensor.outputs) > 1 or is_graph_output(graph, tensor)
        node = producer(tensor)
    return node, shared


def _why_unfusable(gap: gs.Node, source: gs.Node, size: tuple[int, int], graph: gs.Graph) -> str | None:
    """Why Akida cannot fuse ``gap`` where it is, or None when it can."""

    if size[0] * size[1] > MAX_GAP_PIXELS:
        return f"{size[0]}x{size[1]} pixels (at most {MAX_GAP_PIXELS})"
    if source.op in ("Add", "Concat"):
        return None  # quantizeml inserts an identity convolution after a skip connection itself
    if source.op != "Conv":
        return f"after {source.op}, not a convolution"
    attrs = conv_attrs(source)
    if attrs is None or int(source.attrs.get("group", 1)) != 1 or is_depthwise(source):
        return "after a depthwise convolution (Akida refuses the dense layer that follows)"
    if attrs[1] != (1, 1):
        return "after a strided convolution (the CNP cannot pool and stride)"
    if is_input_layer(graph, source):
        return "after the input convolution (it cannot pool globally)"
    return None


class StageGlobalAveragePool(Rule):
    """Give a GlobalAveragePool Akida cannot fuse where it is a layer it can fuse into (exact).

    While the map has more than MAX_GAP_PIXELS pixels, a depthwise 3x3 stride-2 stage sums each 2x2 block
    (the windows tile the map; "same" pads add zeros on odd sizes) times c = (H'W') / (HW): the mean of the
    smaller map equals the mean of the larger. Then a 1x1 identity Conv (ordinary, stride 1, not the input
    layer, read only by the pooling) takes the pooling. Rewritten: poolings over too many pixels, after a
    strided, depthwise or input Conv, after max pooling or a ConvTranspose. Besides mapping, the stages
    keep Akida exact: a Conv fused with a pooling over a large map saturates its 32-bit accumulator
    (qanac.backends.akida.agreement). Left with the reason: poolings of the model input, of ops Akida
    does not run (the pooling stays with them), of a Conv whose padding convert() rejects anyway, of a
    map something else reads too (in practice a squeeze-and-excitation gate, which runs on the host: an
    Akida model has one output, and the pooled branch rejoins the map only through the gate), and
    unknown sizes. A pooling Akida fuses where it is is not a candidate.
    """

    name = GAP_RULE
    ops = ("GlobalAveragePool",)

    def match(self, rw: Rewriter, gap: gs.Node) -> bool:
        return _gap_problem(gap, rw.graph) is not None

    def check(self, rw: Rewriter, gap: gs.Node) -> NoMatch | tuple:
        return _gap_problem(gap, rw.graph)

    def rewrite(self, rw: Rewriter, gap: gs.Node, found: tuple) -> None:
        problem, (height, width), count = found
        graph = rw.graph
        x = tensor = gap.inputs[0]
        stage = 0
        while height * width > MAX_GAP_PIXELS:
            q = form_pads((height, width), (HALVING_KERNEL,) * 2, (2, 2), "same")
            smaller = (math.ceil(height / 2), math.ceil(width / 2))
            weights = np.zeros((count, 1, HALVING_KERNEL, HALVING_KERNEL), np.float32)
            weights[:, 0, q[0]:q[0] + 2, q[1]:q[1] + 2] = smaller[0] * smaller[1] / (height * width)
            name = rw.name(gap, stage)
            halved = shaped_like(graph, f"{name}/out", x, (count, *smaller))
            conv_node(graph, name, tensor, weights, halved, strides=(2, 2), pads=q, group=count)
            tensor, (height, width), stage = halved, smaller, stage + 1
            rw.count("halve-before-global-pool")
        name = rw.name(gap, stage)
        fused = shaped_like(graph, f"{name}/out", x, (count, height, width))
        conv_node(graph, name, tensor, identity_pointwise_weights(count), fused)
        gap.inputs[0] = fused
        rw.count("identity-conv-before-global-pool")
        rw.note("staged", gap, f"{problem}: {stage} halving stage(s)")


def _gap_problem(gap: gs.Node, graph: gs.Graph) -> NoMatch | tuple | None:
    """(why Akida cannot fuse ``gap`` where it is, input size, channels); None when it can; a NoMatch when
    staging cannot help or the shapes are unknown."""

    x = gap.inputs[0]
    size, count = spatial_size(x), channels(x)
    if size is None or count is None:
        return NoMatch("input shape unknown (run infer-shapes)")
    source, shared = _gap_source(x, graph)
    if source is None:
        return NoMatch("pools the model input")
    if source.op not in GAP_SOURCES:
        return NoMatch(f"reads {source.op} '{node_label(source)}', which Akida does not run")
    if shared:
        return NoMatch(SHARED_REASON)
    problem = _why_unfusable(gap, source, size, graph)
    if problem is None:
        return None
    attrs = conv_attrs(source) if source.op == "Conv" else None
    source_size = spatial_size(source.inputs[0]) if attrs else None
    if attrs and source_size and pads_form(source_size, attrs[0], attrs[1], attrs[2],
                                           is_input_layer(graph, source)) is None:
        return NoMatch(
            f"'{node_label(source)}' has pads {attrs[2]} that convert() rejects for a {attrs[0][0]}x{attrs[0][1]} "
            f"stride-{attrs[1][0]} kernel on a {source_size[0]}x{source_size[1]} map; staging would not help"
        )
    return problem, size, count


class IdentityConvAfterMaxPool(Rule):
    """Let a Conv with max pooling feed a convolution, as Akida requires, by putting a 1x1 identity Conv
    after its layer when anything else reads it (exact).

    akida's map() puts a layer with max pooling in software when it is the last of its sequence ("A layer
    with max pooling cannot be the last layer of a sequence."): when its output goes to a residual Add, a
    Flatten and dense layer, or the model output (lint AKD204). The identity Conv (weights the identity
    matrix, no bias, no activation) is read in their place; its C*C MACs per pixel are the price. ResNet's
    stem (Conv, ReLU, MaxPool(3, 2, 1), split by split-padded-maxpool, feeding the first residual block)
    is the common case.
    """

    name = FEED_RULE
    ops = ("Conv",)

    def prepare(self, rw: Rewriter, candidates: list[gs.Node]) -> LintContext:
        return LintContext(rw.graph)

    def match(self, rw: Rewriter, conv: gs.Node) -> bool:
        return maxpool_last_in_sequence(conv, rw.prepared) is not None

    def check(self, rw: Rewriter, conv: gs.Node) -> NoMatch | gs.Node:
        last = fused_chain(conv, rw.graph)[-1]
        out = last.outputs[0]
        if channels(out) is None or spatial_size(out) is None:
            return NoMatch("output shape unknown (run infer-shapes)")
        return last

    def rewrite(self, rw: Rewriter, conv: gs.Node, last: gs.Node) -> None:
        graph = rw.graph
        out = last.outputs[0]
        count = channels(out)
        name = rw.name(last)
        fed = shaped_like(graph, f"{name}/out", out, (count, *spatial_size(out)))
        replace_uses(out, fed)
        conv_node(graph, name, out, identity_pointwise_weights(count), fed)
        outputs = graph.outputs
        if any(t is out for t in outputs):
            graph.outputs = [fed if t is out else t for t in outputs]
            fed.name, out.name = out.name, f"{out.name}::{FEED_RULE}"


register_rules(AVERAGE_RULE, AveragePoolToDepthwise(), targets=["akida"])
register_rules(MAXPOOL_RULE, SplitPaddedMaxPool(), targets=["akida"])
register_rules(GAP_RULE, StageGlobalAveragePool(), targets=["akida"])
register_rules(FEED_RULE, IdentityConvAfterMaxPool(), targets=["akida"])
