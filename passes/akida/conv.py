"""Convolutions Akida refuses, rewritten as convolutions it accepts that compute the same values.

- dilated-conv-to-dense: a dilation d spreads a k-tap kernel over (k - 1) * d + 1 pixels; the dense kernel
  of that size with zeros between the taps is the same convolution.
- grouped-conv-to-dense: a convolution with g groups (not depthwise) is the ungrouped convolution whose
  weights are block-diagonal (output channels of group j read only the input channels of group j).
- even-kernel-to-odd: a k x k kernel (k even) is the (k+1) x (k+1) kernel with a zero row and column added
  at the start or the end, the padding grown by one on the other side.
- strided-conv-to-stride1: a stride-2 convolution whose kernel Akida takes only at stride 1 (5x5, 7x7 after
  the input layer) is the stride-1 convolution followed by a stride-2 depthwise 3x3 layer with a single
  tap of weight 1, which keeps every other pixel.

Each pass changes a node only when the result is in a form cnn2snn accepts (kernel sizes, padding forms;
see passes/akida/layers.py), and names the reason in its details when it leaves one.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qanac.backends.akida.padding import accepted_forms, form_pads, output_size
from qanac.backends.akida.rules import (
    ACTIVATIONS,
    DEPTHWISE_KERNELS,
    MAX_CNP_INPUT_CHANNELS,
    STRIDE2_KERNELS,
    is_depthwise,
)
from qanac.graph import constant_value, is_graph_output
from qanac.passes.akida.layers import (
    conv_attrs,
    conv_node,
    is_input_layer,
    shaped_like,
    spatial_size,
)
from qanac.rewrite import NoMatch, Rewriter, Rule, register_rules

DILATED_RULE = "dilated-conv-to-dense"
GROUPED_RULE = "grouped-conv-to-dense"
EVEN_RULE = "even-kernel-to-odd"
STRIDED_RULE = "strided-conv-to-stride1"
SELECT_KERNEL = min(k for k in STRIDE2_KERNELS if k in DEPTHWISE_KERNELS)  # 3: a depthwise stride-2 kernel


def _replace_weights(rw: Rewriter, conv: gs.Node, weights: np.ndarray) -> None:
    """Give ``conv`` the (dense, ungrouped or grown) ``weights`` and its derived name, and note when the
    result is too large for a CNP (it then converts but runs in software)."""

    rw.rename(conv)
    conv.inputs[1] = rw.constant(f"{conv.name}/weight", weights)
    conv.attrs["kernel_shape"] = [int(weights.shape[2]), int(weights.shape[3])]
    note = _cnp_note(conv, tuple(weights.shape[2:]), weights.shape[1] * int(conv.attrs.get("group", 1)))
    if note:
        rw.note("software", conv, note)


def _cnp_note(conv: gs.Node, kernel: tuple[int, int], in_channels: int) -> str | None:
    limit = MAX_CNP_INPUT_CHANNELS.get(kernel[0]) if kernel[0] == kernel[1] else None
    if limit is not None and in_channels > limit and not is_depthwise(conv):
        return f"{kernel[0]}x{kernel[1]} over {in_channels} input channels exceeds a CNP ({limit}): runs in software"
    return None


class DilatedConvToDense(Rule):
    """Write a dilated 2-D Conv as the dense Conv with zeros between the taps (exact).

    The dense kernel is (k - 1) * d + 1 per axis; pads and strides are unchanged (they are in input pixels
    already). Left alone, with the reason: dense kernels larger than 7x7, and depthwise ones other than
    3x3, 5x5 or 7x7 (see docs/pass-notes.md). An even dense kernel is left to even-kernel-to-odd. Convs
    with non-constant weights are not candidates. Invariant: no rewritten Conv has a dilation other than 1.
    """

    name = DILATED_RULE
    ops = ("Conv",)

    def match(self, rw: Rewriter, conv: gs.Node) -> bool:
        attrs = conv_attrs(conv)
        return attrs is not None and attrs[3] != (1, 1)

    def check(self, rw: Rewriter, conv: gs.Node) -> NoMatch | tuple[int, int]:
        kernel, _, _, dilations = conv_attrs(conv)
        dense = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True))
        odd = tuple(k + 1 - k % 2 for k in dense)
        largest = max(MAX_CNP_INPUT_CHANNELS)
        if is_depthwise(conv) and not (odd[0] == odd[1] and odd[0] in DEPTHWISE_KERNELS):
            return NoMatch(f"dense depthwise kernel {dense[0]}x{dense[1]} (hardware takes 3x3, 5x5, 7x7)")
        if max(odd) > largest:
            return NoMatch(f"dense kernel {dense[0]}x{dense[1]} is larger than {largest}x{largest}")
        return dense

    def rewrite(self, rw: Rewriter, conv: gs.Node, dense: tuple[int, int]) -> None:
        dilations = conv_attrs(conv)[3]
        weights = constant_value(conv.inputs[1])
        spread = np.zeros(weights.shape[:2] + dense, dtype=weights.dtype)
        spread[:, :, :: dilations[0], :: dilations[1]] = weights
        conv.attrs.pop("dilations", None)
        _replace_weights(rw, conv, spread)


class GroupedConvToDense(Rule):
    """Write a grouped (not depthwise) Conv as one ungrouped Conv with block-diagonal weights (exact).

    Output channel o of group j = o // (C_out / g) keeps its weights on the input channels of group j and
    gets zeros on all others. Akida has no channel slicing, so per-group convolutions would each read every
    input channel anyway: one block-diagonal Conv costs the same and adds no Concat. Depthwise Convs
    (groups == input channels == output channels) are not candidates; Convs with non-constant weights are
    left with the reason. A dense Conv over more input channels than a CNP holds converts and runs in
    software: it is rewritten and named in ``details["software"]``.
    """

    name = GROUPED_RULE
    ops = ("Conv",)

    def match(self, rw: Rewriter, conv: gs.Node) -> bool:
        return int(conv.attrs.get("group", 1)) != 1 and not is_depthwise(conv)

    def check(self, rw: Rewriter, conv: gs.Node) -> NoMatch | np.ndarray:
        weights = constant_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if weights is None or weights.ndim != 4:
            return NoMatch("weights are not a constant 4-D tensor")
        return weights

    def rewrite(self, rw: Rewriter, conv: gs.Node, weights: np.ndarray) -> None:
        group = int(conv.attrs.get("group", 1))
        out_channels, per_group = weights.shape[:2]
        outs = out_channels // group
        dense = np.zeros((out_channels, per_group * group, *weights.shape[2:]), dtype=weights.dtype)
        for j in range(group):
            dense[j * outs:(j + 1) * outs, j * per_group:(j + 1) * per_group] = weights[j * outs:(j + 1) * outs]
        conv.attrs["group"] = 1
        _replace_weights(rw, conv, dense)


class EvenKernelToOdd(Rule):
    """Grow an even Conv kernel by a zero row/column to the next odd size, with padding that keeps every
    output (exact).

    For each padding form cnn2snn accepts (valid, same, for stride 2 same_upper/symmetric) with begin pads
    B, the original taps go at offset o = B - begin (0: the zero is added at the end, 1: at the start); the
    form is taken when o is 0 or 1 on each even axis (0 on odd ones) and the output size is unchanged. Then
    every output reads the same input pixels with the same weights. When no form fits, the node is left
    with the reason (e.g. a 2x2 stride-1 Conv without padding shrinks the map by one pixel, which a
    3x3 kernel does only with one-sided padding, a form Akida refuses). Needs static input sizes.
    """

    name = EVEN_RULE
    ops = ("Conv",)

    def match(self, rw: Rewriter, conv: gs.Node) -> bool:
        attrs = conv_attrs(conv)
        return attrs is not None and not all(k % 2 for k in attrs[0])

    def check(self, rw: Rewriter, conv: gs.Node) -> NoMatch | tuple:
        kernel, strides, pads, dilations = conv_attrs(conv)
        size = spatial_size(conv.inputs[0])
        if dilations != (1, 1) or size is None:
            return NoMatch("dilated (left to dilated-conv-to-dense)" if size else "input size unknown")
        odd = tuple(k + 1 - k % 2 for k in kernel)
        first_layer = is_input_layer(rw.graph, conv)
        forms = {f: form_pads(size, odd, strides, f) for f in accepted_forms(odd, strides, first_layer)}
        for grown in forms.values():
            offsets = tuple(grown[i] - pads[i] for i in range(2))
            same_size = all(
                output_size(size[i], odd[i], strides[i], grown[i], grown[i + 2])
                == output_size(size[i], kernel[i], strides[i], pads[i], pads[i + 2])
                for i in range(2)
            )
            if same_size and all(0 <= offsets[i] <= odd[i] - kernel[i] for i in range(2)):
                return offsets, grown, odd
        return NoMatch(
            f"{kernel[0]}x{kernel[1]} stride {list(strides)} pads {pads} on a {size[0]}x{size[1]} map: the "
            f"{odd[0]}x{odd[1]} kernel computing the same needs one-sided pads, and Akida takes only {forms}"
        )

    def rewrite(self, rw: Rewriter, conv: gs.Node, found: tuple) -> None:
        (oh, ow), grown, odd = found
        kernel = conv_attrs(conv)[0]
        weights = constant_value(conv.inputs[1])
        padded = np.zeros(weights.shape[:2] + odd, dtype=weights.dtype)
        padded[:, :, oh:oh + kernel[0], ow:ow + kernel[1]] = weights
        conv.attrs["pads"] = grown
        _replace_weights(rw, conv, padded)


def _stride1_plan(
    size: tuple[int, int], kernel: tuple[int, int], pads: list[int]
) -> tuple[list[int], list[int], tuple[int, int]] | None:
    """(stride-1 pads, selection pads, selection tap) that reproduce a stride-2 conv, or None.

    The stride-1 conv with pads (b1, e1) gives y1[i] = y[(i - b1 + pb) / 2]; a stride-2 3x3 selection with
    pads (qb, qe) and its single tap at t keeps y1[2m - qb + t], which is y[m] when t = qb + b1 - pb.
    """

    outputs = [output_size(size[i], kernel[i], 2, pads[i], pads[i + 2]) for i in range(2)]
    select_forms = accepted_forms((SELECT_KERNEL,) * 2, (2, 2), False)
    plans = sorted(((f, g) for f in accepted_forms(kernel, (1, 1), False) for g in select_forms),
                   key=lambda plan: plan.count("valid"))  # valid padding maps to software: last
    for form, select_form in plans:
        p1 = form_pads(size, kernel, (1, 1), form)
        size1 = tuple(output_size(size[i], kernel[i], 1, p1[i], p1[i + 2]) for i in range(2))
        q = form_pads(size1, (SELECT_KERNEL,) * 2, (2, 2), select_form)
        taps, fits = [], True
        for i in range(2):
            tap = q[i] + p1[i] - pads[i]
            first, last = p1[i] - pads[i], 2 * (outputs[i] - 1) + p1[i] - pads[i]
            fits &= (0 <= tap < SELECT_KERNEL and first >= 0 and last < size1[i]
                     and output_size(size1[i], SELECT_KERNEL, 2, q[i], q[i + 2]) == outputs[i])
            taps.append(tap)
        if fits:
            return p1, q, (taps[0], taps[1])
    return None


class StridedConvToStride1(Rule):
    """Split a stride-2 Conv with a kernel Akida takes only at stride 1 (5x5, 7x7, after the input layer)
    into the stride-1 Conv and a depthwise 3x3 stride-2 selection with one tap of weight 1 (exact).

    The selection keeps every other pixel of the stride-1 map, the ones the stride-2 Conv computes; it
    goes after the Conv's activation (an elementwise activation commutes with it), so the Conv and its
    activation stay one Akida layer. The stride-1 Conv computes 4x the MACs of the original: Akida has no
    cheaper exact form (no space-to-depth). Left alone, with the reason: the input layer (Akida's input
    convolution takes these strides), even or dilated kernels (other passes first), a Conv fused with max
    pooling, unknown input sizes, and paddings no accepted stride-1 form reproduces. Depthwise Convs
    (quantizeml splits those itself) are not candidates.
    """

    name = STRIDED_RULE
    ops = ("Conv",)

    def match(self, rw: Rewriter, conv: gs.Node) -> bool:
        attrs = conv_attrs(conv)
        if attrs is None or is_depthwise(conv):
            return False
        kernel, strides = attrs[0], attrs[1]
        return strides == (2, 2) and not all(k in STRIDE2_KERNELS for k in kernel)

    def check(self, rw: Rewriter, conv: gs.Node) -> NoMatch | tuple:
        kernel, _, pads, dilations = conv_attrs(conv)
        size = spatial_size(conv.inputs[0])
        out = conv.outputs[0]
        if dilations != (1, 1) or any(k % 2 == 0 for k in kernel):
            return NoMatch("dilated or even kernel (left to dilated-conv-to-dense / even-kernel-to-odd)")
        if size is None or out.shape is None:
            return NoMatch("input size unknown")
        if is_input_layer(rw.graph, conv):
            return NoMatch("the input layer takes this stride")
        if any(r.op == "MaxPool" for r in out.outputs):
            return NoMatch("fused with max pooling (the CNP cannot pool and stride)")
        plan = _stride1_plan(size, kernel, pads)
        if plan is None:
            return NoMatch(f"no accepted stride-1 padding reproduces pads {pads} on a {size[0]}x{size[1]} map")
        return size, plan

    def rewrite(self, rw: Rewriter, conv: gs.Node, found: tuple) -> None:
        size, (p1, q, (th, tw)) = found
        kernel = conv_attrs(conv)[0]
        graph = rw.graph
        out = conv.outputs[0]
        readers = out.outputs
        size1 = tuple(output_size(size[i], kernel[i], 1, p1[i], p1[i + 2]) for i in range(2))
        channels = int(constant_value(conv.inputs[1]).shape[0])
        rw.rename(conv)
        fused = len(readers) == 1 and readers[0].op in ACTIVATIONS and not is_graph_output(graph, out)
        activation = readers[0] if fused else None
        last = activation if activation is not None else conv
        target = last.outputs[0]
        full = shaped_like(graph, f"{conv.name}/full", target, (channels, *size1))
        last.outputs[0] = full
        if activation is not None:
            out.shape = list(full.shape)
        conv.attrs["strides"] = [1, 1]
        conv.attrs["pads"] = p1
        taps = np.zeros((channels, 1, SELECT_KERNEL, SELECT_KERNEL), np.float32)
        taps[:, 0, th, tw] = 1.0
        conv_node(graph, rw.name(conv, 0), full, taps, target, strides=(2, 2), pads=q, group=channels)


register_rules(DILATED_RULE, DilatedConvToDense(), targets=["akida"])
register_rules(GROUPED_RULE, GroupedConvToDense(), targets=["akida"])
register_rules(EVEN_RULE, EvenKernelToOdd(), targets=["akida"])
register_rules(STRIDED_RULE, StridedConvToStride1(), targets=["akida"])
