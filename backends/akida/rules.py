"""The Akida lint rules: which node breaks what, judged on the model as quantizeml will see it.

Every rule reads ``patterns.py``: the installed quantizeml's own table (which op chains it fuses into one
layer, which ops it knows, the first layer) and qanac's table beside it (measured mapping limits, why a node
has no Akida layer). The rules judge the model after quantizeml's sanitizer (``AKIDA_RULES.view``), the
graph ``quantize()`` matches its patterns on: tf2onnx's Relu -> Min -> Max is the Clip quantizeml sees,
PyTorch's Conv -> Relu -> MaxPool its Conv -> MaxPool -> Relu, x * Sigmoid(x) its LUT activation. A node no
pattern covers is refused with the code qanac's table gives its op; the other rules are what quantizeml's
layer builders, cnn2snn and akida's map() refuse, as measured (quantizeml 1.2.5 / cnn2snn 2.19.3 / akida
2.19.3; tests/akida/test_lint_reality.py compiles an example of every rule and checks the prediction).

- ERROR: quantizeml leaves the node unquantized and cnn2snn silently cuts the model before it, or one of
  them raises. qanac's Akida backend refuses such a model (exit 3) rather than emit a truncated one.
- WARNING: the model converts, but the layer is mapped to a Software sequence (it runs on the host CPU,
  not on the neural processors).

The device-fit rules (AKM202-AKM204) read ``device_fit.py`` instead: the CNPs each layer needs, from its
shape, against the CNPs of the device lint is given (the default device when none is).

The legalization passes ask the same questions of the graph they rewrite (``fused_chain``,
``maxpool_last_in_sequence``, ``input_layer``).
"""

from __future__ import annotations

import dataclasses

import onnx
import onnx_graphsurgeon as gs

from qanac.backends.akida import device_fit, patterns
from qanac.backends.akida.input_layer import with_identity_input_layer
from qanac.backends.akida.padding import accepted_forms, form_pads, pads_form
from qanac.backends.akida.patterns import QANAC, NodeFacts, Refusal
from qanac.backends.akida.patterns import fused_chain as fused_chain  # the passes read it here
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError
from qanac.graph import constant_value
from qanac.lint import LintContext, Rule, RuleSet

# qanac's table under the names the legalization passes read.
MAX_GAP_PIXELS = QANAC.max_gap_pixels
STRIDE2_KERNELS = QANAC.stride2_kernels
MAX_CNP_INPUT_CHANNELS = QANAC.max_cnp_input_channels
DEPTHWISE_KERNELS = QANAC.depthwise_kernels
MAX_DENSE_INPUTS = QANAC.max_dense_inputs
MAX_INPUT_CONV_FILTERS = QANAC.max_input_conv_filters
ACTIVATIONS = QANAC.activations


def _attr(node: gs.Node, name: str, default):
    return node.attrs.get(name, default)


def _weights_shape(node: gs.Node) -> tuple[int, ...] | None:
    value = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if value is None else tuple(value.shape)


def is_depthwise(node: gs.Node) -> bool:
    shape = _weights_shape(node)
    group = int(_attr(node, "group", 1))
    return shape is not None and group > 1 and shape[1] == 1 and shape[0] == group


def input_layer(ctx: LintContext) -> gs.Node | None:
    """The model's first Akida layer (``patterns.input_layer``), once per lint run."""

    return ctx.memo("akida.input_layer", lambda: patterns.input_layer(ctx.graph))


def block_of(node: gs.Node, ctx: LintContext) -> tuple[gs.Node, ...] | None:
    """The quantizeml block (one Akida layer) ``node`` belongs to, or None when no pattern covers it."""

    return ctx.memo("akida.cover", lambda: patterns.cover(ctx.graph, ctx.order)).get(node.name)


def _refused(node: gs.Node, ctx: LintContext, code: str) -> Refusal | None:
    """qanac's table's refusal of ``node`` when it is for rule ``code``."""

    def compute() -> Refusal | None:
        facts = NodeFacts.of(node, node is input_layer(ctx))
        return patterns.refusal(facts, matched=block_of(node, ctx) is not None)

    entry = ctx.memo(f"akida.refusal:{id(node)}", compute)
    return entry if entry is not None and entry.code == code else None


def _unfused_context(node: gs.Node, ctx: LintContext) -> str:
    """Why quantizeml did not fuse ``node`` into the layer before it."""

    source = node.inputs[0]
    producer = ctx.producer(source)
    if producer is None:
        return "it reads the model input"
    block = block_of(producer, ctx)
    if block is None:
        return f"it reads {ctx.label(producer)}, which no Akida layer covers either"
    if len(source.outputs) > 1:
        return f"it reads {ctx.label(producer)}, whose output is also read elsewhere"
    tokens = [patterns.vendor().token(n.op, n.domain) for n in block] + [node.op]
    return f"quantizeml has no pattern {' -> '.join(tokens)}"


# --- node checks: each returns a message when the node breaks the rule -----------------------------------


def unsupported_op(node: gs.Node, ctx: LintContext) -> str | None:
    entry = _refused(node, ctx, "AKD101")
    return None if entry is None else entry.reason


def sigmoid_or_tanh(node: gs.Node, ctx: LintContext) -> str | None:
    entry = _refused(node, ctx, "AKD102")
    return None if entry is None else entry.reason


def tensor_multiply(node: gs.Node, ctx: LintContext) -> str | None:
    entry = _refused(node, ctx, "AKD103")
    return None if entry is None else entry.reason


def clip_min_nonzero(node: gs.Node, ctx: LintContext) -> str | None:
    if _refused(node, ctx, "AKD104") is None:
        return None
    low = constant_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
    shown = "none" if low is None else f"{float(low):g}"
    return f"Clip with min {shown}; Akida only has bounded ReLUs (min 0)"


def grouped_conv(node: gs.Node, ctx: LintContext) -> str | None:
    if _refused(node, ctx, "AKD105") is None:
        return None
    group = int(_attr(node, "group", 1))
    return f"grouped convolution with {group} groups (only depthwise, groups == channels, is supported)"


def dilated_conv(node: gs.Node, ctx: LintContext) -> str | None:
    if _refused(node, ctx, "AKD106") is None:
        return None
    return f"dilation {list(_attr(node, 'dilations', [1, 1]))}"


def conv_stride_kernel(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "Conv" or node is input_layer(ctx):
        return None
    strides = list(_attr(node, "strides", [1, 1]))
    shape = _weights_shape(node)
    if shape is None:
        return None
    kernel = shape[2:]
    if any(s > 2 for s in strides):
        return f"stride {strides} (at most 2)"
    if any(s == 2 for s in strides) and any(k not in STRIDE2_KERNELS for k in kernel):
        return (f"stride 2 with a {kernel[0]}x{kernel[1]} kernel (stride 2 needs a 1x1 or 3x3 kernel after the "
                "input layer)")
    return None


def even_kernel(node: gs.Node, ctx: LintContext) -> str | None:
    shape = _weights_shape(node)
    if node.op == "Conv" and shape is not None and any(k % 2 == 0 for k in shape[2:]):
        return f"even kernel {shape[2]}x{shape[3]}"
    return None


def _padding_case(node: gs.Node, ctx: LintContext):
    """(form or None, kernel, strides, pads, size, is input layer) of a Conv whose padding no other rule
    already condemns (even, dilated or over-strided kernels have their own), or None."""

    shape = _weights_shape(node)
    size = ctx.spatial(node.inputs[0]) if node.op == "Conv" else None
    if shape is None or size is None or len(shape) != 4:
        return None
    kernel = (int(shape[2]), int(shape[3]))
    if any(k % 2 == 0 for k in kernel) or any(d != 1 for d in _attr(node, "dilations", [1, 1])):
        return None
    if conv_stride_kernel(node, ctx) is not None:
        return None
    strides = tuple(int(s) for s in _attr(node, "strides", [1, 1]))
    pads = [int(p) for p in _attr(node, "pads", [0, 0, 0, 0])]
    first = node is input_layer(ctx)
    return pads_form(size, kernel, strides, pads, first), kernel, strides, pads, size, first


def conv_padding(node: gs.Node, ctx: LintContext) -> str | None:
    case = _padding_case(node, ctx)
    if case is None or case[0] is not None:
        return None
    _, kernel, strides, pads, size, first = case
    accepted = "; ".join(f"{form} {form_pads(size, kernel, strides, form)}"
                         for form in accepted_forms(kernel, strides, first))
    return (f"pads {pads} for a {kernel[0]}x{kernel[1]} kernel at stride {strides[0]} on a {size[0]}x{size[1]} "
            f"map (convert() accepts: {accepted})")


def conv_without_padding(node: gs.Node, ctx: LintContext) -> str | None:
    case = _padding_case(node, ctx)
    if case is None or case[0] != "valid" or case[5]:
        return None
    return f"a {case[1][0]}x{case[1][1]} convolution without padding (after the input layer)"


def maxpool_pads(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "MaxPool":
        return None
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    if any(pads[:2]):
        return f"MaxPool pads {pads} start before the map (only pads at the end, as SAME_UPPER, are supported)"
    return None


def maxpool_not_after_conv(node: gs.Node, ctx: LintContext) -> str | None:
    entry = _refused(node, ctx, "AKD116")
    return None if entry is None else f"{entry.reason}; {_unfused_context(node, ctx)}"


def input_batchnorm(node: gs.Node, ctx: LintContext) -> str | None:
    # A first dense or depthwise layer is fine: qanac's Akida backend then quantizes the input as int8.
    entry = _refused(node, ctx, "AKD110")
    return None if entry is None else entry.reason


def _fuses_gap(node: gs.Node, ctx: LintContext) -> bool:
    block = block_of(node, ctx)
    return block is not None and block[0] is node and any(n.op == "GlobalAveragePool" for n in block)


def input_conv_with_gap(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op == "Conv" and node is input_layer(ctx) and _fuses_gap(node, ctx):
        return "the input convolution is directly followed by global average pooling"
    return None


def average_pool(node: gs.Node, ctx: LintContext) -> str | None:
    if _refused(node, ctx, "AKD112") is None:
        return None
    size = ctx.spatial(node.inputs[0])
    kernel = list(_attr(node, "kernel_shape", []))
    shown = f"{size[0]}x{size[1]}" if size else "?x?"
    return f"AveragePool {kernel} over a {shown} map (only global pooling is supported)"


def unfused_gap(node: gs.Node, ctx: LintContext) -> str | None:
    entry = _refused(node, ctx, "AKD113")
    return None if entry is None else f"{entry.reason}; {_unfused_context(node, ctx)}"


def softmax_inside(node: gs.Node, ctx: LintContext) -> str | None:
    if _refused(node, ctx, "AKD114") is None:
        return None
    return f"{node.op} inside the graph (a trailing one is moved to the host by strip-trailing-softmax)"


def gap_too_large(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "GlobalAveragePool":
        return None
    size = ctx.spatial(node.inputs[0])
    if size is not None and size[0] * size[1] > MAX_GAP_PIXELS:
        pixels = size[0] * size[1]
        return f"global average pooling over {size[0]}x{size[1]} = {pixels} pixels (at most {MAX_GAP_PIXELS})"
    return None


def gap_after_strided_conv(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "Conv" or not any(s > 1 for s in _attr(node, "strides", [1, 1])):
        return None
    if _fuses_gap(node, ctx):
        return "a strided convolution fused with global average pooling"
    return None


def filter_too_big(node: gs.Node, ctx: LintContext) -> str | None:
    shape = _weights_shape(node)
    if node.op != "Conv" or shape is None or is_depthwise(node) or node is input_layer(ctx):
        return None
    limit = MAX_CNP_INPUT_CHANNELS.get(shape[2]) if shape[2] == shape[3] else None
    if limit is not None and shape[1] > limit:
        return f"a {shape[2]}x{shape[3]} filter over {shape[1]} input channels (at most {limit} fit a CNP)"
    return None


def input_conv_filters(node: gs.Node, ctx: LintContext) -> str | None:
    shape = _weights_shape(node)
    if node.op == "Conv" and node is input_layer(ctx) and shape is not None and shape[0] > MAX_INPUT_CONV_FILTERS:
        return f"the input convolution has {shape[0]} filters (at most {MAX_INPUT_CONV_FILTERS})"
    return None


def depthwise_kernel(node: gs.Node, ctx: LintContext) -> str | None:
    shape = _weights_shape(node)
    if node.op == "Conv" and is_depthwise(node) and shape is not None and (
        shape[2] != shape[3] or shape[2] not in DEPTHWISE_KERNELS
    ):
        return f"a depthwise {shape[2]}x{shape[3]} kernel (hardware takes 3x3, 5x5 or 7x7)"
    return None


def dense_too_wide(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op not in ("Gemm", "MatMul"):
        return None
    weights = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weights is None or weights.ndim != 2:
        return None
    trans_b = int(_attr(node, "transB", 0)) if node.op == "Gemm" else 0
    features = weights.shape[1] if trans_b else weights.shape[0]
    if features > MAX_DENSE_INPUTS:
        return f"a dense layer over {features} inputs (at most {MAX_DENSE_INPUTS} fit a FNP)"
    return None


def _fit_device(ctx: LintContext) -> str | None:
    """The device whose NPs the layers must fit: the device option, else the default device; None for
    ``auto`` (akida sizes that device to the model) and for IP v1 devices (another path maps those)."""

    from qanac.backends.akida.devices import AUTO, DEFAULT_DEVICE, MODEL_IP_VERSION, device_spec

    name = ctx.device or DEFAULT_DEVICE
    return None if name == AUTO or device_spec(name).ip_version != MODEL_IP_VERSION else name


def cnp_need(node: gs.Node, ctx: LintContext) -> device_fit.Need | None:
    """The CNPs the Akida layer that ``node`` heads needs (``device_fit``), or None when ``node`` heads no
    layer on CNPs: the input convolution (it runs on the HRC), dense layers (one FNP), a layer whose shape
    is unknown or whose kernel is not square."""

    if node.op != "Conv":
        return None
    block = block_of(node, ctx)
    shape = _weights_shape(node)
    size = ctx.spatial(node.inputs[0])
    if block is None or block[0] is not node or shape is None or size is None or len(shape) != 4:
        return None
    if shape[2] != shape[3]:
        return None
    if is_depthwise(node):
        return device_fit.depthwise_need(size[0], size[1], shape[0])
    if int(_attr(node, "group", 1)) != 1 or (node is input_layer(ctx) and shape[1] in (1, 3)):
        return None
    return device_fit.conv_need(size[0], size[1], shape[1], shape[0], shape[2])


def too_large_for_device(node: gs.Node, ctx: LintContext) -> str | None:
    device = _fit_device(ctx)
    need = cnp_need(node, ctx) if device is not None else None
    if need is None or need.filters_per_np == 0:  # a filter too big for any CNP is AKD203's
        return None
    available = device_fit.device_units(device)[0]
    if need.count <= available:
        return None
    ways = [f"{name} ({device_fit.device_units(name)[0]} CNP1)" for name in device_fit.devices_with(need.count)]
    if need.tiles <= available:
        narrower = need.filters_per_np * (available // need.tiles)
        ways.append(f"at most {narrower} {'channels' if is_depthwise(node) else 'filters'} on {device}")
    return (f"needs about {need.count} CNP1 ({need.how}) but {device} has {available}"
            + (f"; fits: {', '.join(ways)}" if ways else "; no IP v2 device has that many"))


@dataclasses.dataclass
class Region:
    """A residual region: its layers (named by the first node of their quantizeml block) and, per layer
    that joins branches, the layer the branches part from."""

    layers: set[str]
    forks: dict[str, str]


def residual_regions(ctx: LintContext) -> list[Region]:
    """The model's residual regions: for every layer that joins two branches (Add, Concat), the layers from
    the one both branches start at to the join, plus the layers that read the join. Regions that share a
    layer are one region. akida cannot cut a skip connection between two sequences, so a region maps as a
    whole or not at all."""

    def compute() -> list[Region]:
        preds = _layer_preds(ctx)
        index = {name: i for i, name in enumerate(preds)}
        ancestors: dict[str, set[str]] = {}
        succs: dict[str, set[str]] = {name: set() for name in preds}
        for name, layer_preds in preds.items():
            ancestors[name] = set().union(*({p} | ancestors.get(p, set()) for p in layer_preds))
            for p in layer_preds:
                succs.setdefault(p, set()).add(name)
        regions: list[Region] = []
        for merge, layer_preds in preds.items():
            if len(layer_preds) < 2:
                continue
            common = set.intersection(*({p} | ancestors.get(p, set()) for p in layer_preds))
            if not common:
                continue
            fork = max(common, key=lambda n: index.get(n, -1))
            inside = {n for n in ancestors[merge] if n == fork or fork in ancestors.get(n, set())}
            region = Region(inside | {merge} | succs[merge], {merge: fork})
            for other in [r for r in regions if r.layers & region.layers]:
                regions.remove(other)
                region.layers |= other.layers
                region.forks |= other.forks
            regions.append(region)
        return regions

    return ctx.memo("akida.residual_regions", compute)


def _layer_preds(ctx: LintContext) -> dict[str, list[str]]:
    """Layer -> the layers whose output it reads (through nodes no quantizeml block covers), in graph order."""

    def compute() -> dict[str, list[str]]:
        producer: dict[str, str] = {}
        preds: dict[str, list[str]] = {}
        for node in ctx.order:
            block = block_of(node, ctx)
            sources = [producer[t.name] for t in ctx.tensor_inputs(node) if t.name in producer]
            if block is None:
                for tensor in node.outputs:
                    if sources:
                        producer[tensor.name] = sources[0]
                continue
            head = block[0].name
            layer_preds = preds.setdefault(head, [])
            layer_preds.extend(p for p in sources if p != head and p not in layer_preds)
            for tensor in node.outputs:
                producer[tensor.name] = head
        return preds

    return ctx.memo("akida.layer_preds", compute)


def _too_large(ctx: LintContext) -> dict[str, str]:
    """Layer name -> AKM202's message, for the layers too large for the device."""

    def compute() -> dict[str, str]:
        found = {}
        for node in ctx.order:
            message = too_large_for_device(node, ctx)
            if message is not None:
                found[node.name] = message
        return found

    return ctx.memo("akida.too_large", compute)


def _region_failure(region: Region, ctx: LintContext) -> str | None:
    """Why ``region`` cannot map on the device, or None when it can: one of its layers is too large
    (AKM202), or two consecutive layers of a branch need more CNPs together than the device has (measured:
    akida keeps the two in one pass inside a region; a join takes no CNP and links the layers of the
    branches it joins, not the one they part from, with the layer after it)."""

    device = _fit_device(ctx)
    if device is None:
        return None
    too_large = sorted(n for n in region.layers if n in _too_large(ctx))
    if too_large:
        named = ", ".join(f"'{ctx.names.get(n, n)}'" for n in too_large[:3])
        more = f" and {len(too_large) - 3} more" if len(too_large) > 3 else ""
        return f"{named}{more} {'is' if len(too_large) == 1 else 'are'} too large for the device (AKM202)"
    nodes = {n.name: n for n in ctx.order}
    preds = _layer_preds(ctx)
    available = device_fit.device_units(device)[0]

    def need(name: str) -> int:
        found = cnp_need(nodes[name], ctx) if name in nodes else None
        return 0 if found is None else found.count

    def feeding(name: str, join: bool = False) -> list[str]:
        """The layers feeding ``name``; through a join, those of the branches it joins."""

        found = []
        for p in preds.get(name, []):
            if not (join and p == region.forks[name]):
                found.extend(feeding(p, True) if p in region.forks else [p])
        return found

    order = {name: i for i, name in enumerate(preds)}
    for name in sorted(region.layers - set(region.forks), key=lambda n: order.get(n, -1)):
        for p in feeding(name):
            if p in region.layers and need(p) + need(name) > available:
                return (f"'{ctx.names.get(p, p)}' and '{ctx.names.get(name, name)}' need {need(p)} + {need(name)} "
                        f"CNP1 together and {device} has {available}")
    return None


def in_fallen_region(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or block_of(node, ctx) is None:
        return None
    if node.name in _too_large(ctx):
        return None
    for region in residual_regions(ctx):
        if node.name not in region.layers:
            continue
        failure = ctx.memo(f"akida.region_failure:{min(region.layers)}",
                           lambda region=region: _region_failure(region, ctx))
        if failure is not None:
            return (f"in a residual region of {len(region.layers)} layers where {failure}: akida cannot cut the "
                    "region's skip connections, so the whole region runs in software")
    return None


def gap_split(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "Conv" or not _fuses_gap(node, ctx):
        return None
    need = cnp_need(node, ctx)
    size = ctx.spatial(node.inputs[0])
    if need is None or need.tiles == 1:
        return None
    channels = _weights_shape(node)[1]
    return (f"global average pooling fused into a convolution whose {size[0]}x{size[1]}x{channels} input is "
            f"{size[0] * size[1] * channels} bytes (a CNP holds {device_fit.INPUT_BYTES})")


def maxpool_last_in_sequence(node: gs.Node, ctx: LintContext) -> str | None:
    """A Conv whose layer fuses max pooling and feeds anything but convolutions (or the model output)."""

    if node.op != "Conv":
        return None
    block = block_of(node, ctx)
    if block is None or block[0] is not node or not any(n.op == "MaxPool" for n in block):
        return None
    following = ctx.consumers(block[-1])
    if following and all(f.op in ("Conv", "ConvTranspose") for f in following):
        return None
    names = ", ".join(ctx.label(f) for f in following) or "the model output"
    return f"a convolution with max pooling followed by {names} (it must feed a convolution)"


def vendor_view(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model as quantizeml sees a device segment of it: with the first layer the backend gives every
    segment (``with_identity_input_layer``: an input read by several nodes is refused by the sanitizer
    otherwise), after quantizeml's sanitizer. None when the sanitizer refuses it (a non-float input, say):
    lint then judges the model as it is, and the backend reports quantizeml's own error."""

    try:
        return patterns.sanitized(with_identity_input_layer(model)[0])
    except Exception:  # the sanitizer's refusals have no common type
        return None


AKIDA_RULES = RuleSet(view=vendor_view, rules=(
    Rule("AKD101", "unsupported op", Level.ERROR, unsupported_op,
         "quantize() leaves it unquantized and convert() silently truncates the model before it",
         "replace the op in the model, or keep it on the host"),
    Rule("AKD102", "bare sigmoid or tanh", Level.ERROR, sigmoid_or_tanh,
         "quantize() leaves it unquantized and convert() silently truncates the model before it",
         "use a bounded ReLU (ReLU6 or Clip(0, b)) or a swish x*sigmoid(x); gates belong on the host"),
    Rule("AKD103", "multiply of two tensors", Level.ERROR, tensor_multiply,
         "quantize() leaves it unquantized and convert() silently truncates the model before it",
         "replace the gate by a per-channel scale the next conv absorbs, or keep the gate on the host"),
    Rule("AKD104", "clip with min != 0", Level.ERROR, clip_min_nonzero,
         "quantize() leaves the layer unquantized and convert() silently truncates the model before it",
         "use ReLU or Clip(0, b); shift a symmetric activation into the next layer's bias"),
    Rule("AKD105", "grouped convolution", Level.ERROR, grouped_conv,
         "quantize() leaves it unquantized and convert() silently truncates the model before it",
         "split it into one convolution per group followed by Concat",
         fixed_by="grouped-conv-to-dense"),
    Rule("AKD106", "dilated convolution", Level.ERROR, dilated_conv,
         "quantize() leaves it unquantized and convert() silently truncates the model before it",
         "write the dilated kernel as a dense kernel with zeros between the taps",
         fixed_by="dilated-conv-to-dense"),
    Rule("AKD107", "stride and kernel", Level.ERROR, conv_stride_kernel,
         "convert() raises ValueError",
         "use a 3x3 or 1x1 kernel for stride-2 convolutions after the input layer, or stride 1 then pooling",
         fixed_by="strided-conv-to-stride1"),
    Rule("AKD108", "even kernel", Level.ERROR, even_kernel,
         "convert() raises 'Kernel size must be odd.'",
         "use an odd kernel (pad an even kernel with a zero row and column)",
         fixed_by="even-kernel-to-odd"),
    Rule("AKD109", "max pooling padding", Level.ERROR, maxpool_pads,
         "convert() raises 'Expect pads [0, 0, 1, 1]'",
         "pool without padding, or with SAME_UPPER padding (pads only at the bottom and right); "
         "MaxPool(3, 2, 1) on a non-negative map is rewritten exactly",
         fixed_by="split-padded-maxpool"),
    Rule("AKD110", "batch normalization as the first layer", Level.ERROR, input_batchnorm,
         "quantize() raises 'No quantizable pattern found.'",
         "write input normalisation as a per-channel Mul/Add or Sub/Div by constants",
         fixed_by="batchnorm-to-affine"),
    Rule("AKD111", "input convolution with global pooling", Level.ERROR, input_conv_with_gap,
         "quantize() raises 'No quantizable pattern found.' (InputConv2D can't perform a Global Average Pooling)",
         "add a convolution between the input convolution and the global pooling"),
    Rule("AKD112", "non-global average pooling", Level.ERROR, average_pool,
         "quantize() leaves it unquantized and convert() silently truncates the model before it",
         "use a stride-2 convolution or max pooling instead",
         fixed_by="average-pool-to-depthwise"),
    Rule("AKD113", "global pooling not after a convolution", Level.ERROR, unfused_gap,
         "quantize() leaves it unquantized and convert() silently truncates the model before it",
         "pool directly after a convolution (and its activation) that feeds nothing else, not after max pooling",
         fixed_by="stage-global-average-pool"),
    Rule("AKD114", "softmax inside the graph", Level.ERROR, softmax_inside,
         "quantize() leaves it unquantized and convert() silently truncates the model before it",
         "move the softmax to the end of the model (qanac then runs it on the host)"),
    Rule("AKD116", "max pooling not after a convolution", Level.ERROR, maxpool_not_after_conv,
         "quantize() leaves it unquantized and convert() silently truncates the model before it",
         "pool right after a convolution (and its activation): pool each branch before a Concat, or "
         "downsample with a stride-2 convolution"),
    Rule("AKD115", "convolution padding", Level.ERROR, conv_padding,
         "convert() raises 'Expect pads to be one of ...'",
         "pad by k // 2 on each side (PyTorch padding=k//2, Keras padding='same'), or for stride 2 only at "
         "the end; a separate zero Pad before the convolution is folded into it by fuse-pad-into-conv"),
    Rule("AKD201", "global pooling too large", Level.WARNING, gap_too_large,
         "map() puts the layer in a Software sequence (host CPU)",
         "downsample further before the global pooling (at most 12x12 maps)",
         fixed_by="stage-global-average-pool"),
    Rule("AKD202", "global pooling after a strided convolution", Level.WARNING, gap_after_strided_conv,
         "map() puts the layer in a Software sequence: 'The CNP cannot support both pooling and stride.'",
         "add a stride-1 convolution before the global pooling",
         fixed_by="stage-global-average-pool"),
    Rule("AKD203", "filter too big for a CNP", Level.WARNING, filter_too_big,
         "map() puts the layer in a Software sequence: 'Filter size is too big to fit in a CNP'",
         "reduce the input channels of this convolution or use a depthwise-separable pair"),
    Rule("AKD204", "max pooling at the end of a sequence", Level.WARNING, maxpool_last_in_sequence,
         "map() puts the layer in a Software sequence: 'A layer with max pooling cannot be the last layer of a "
         "sequence'",
         "follow the pooled convolution with another convolution",
         fixed_by="identity-conv-after-maxpool"),
    Rule("AKD206", "dense layer too wide", Level.WARNING, dense_too_wide,
         "map() puts the layer in a Software sequence: 'Input dimensions are too large to fit in a FNP.'",
         "pool or convolve down to at most 2048 features before the dense layer"),
    Rule("AKD207", "depthwise kernel size", Level.WARNING, depthwise_kernel,
         "map() puts the layer in a Software sequence: 'Kernel size must be 3, 5 or 7.'",
         "use a 3x3 depthwise kernel (a 1x1 one is a 3x3 with only the centre tap)"),
    Rule("AKD208", "convolution without padding", Level.WARNING, conv_without_padding,
         "map() puts the layer in a Software sequence: 'Only padding 'Same' and 'SameUpper' are supported.'",
         "pad the convolution by k // 2 (PyTorch padding=k//2, Keras padding='same'); only the input layer "
         "maps without padding"),
    Rule("AKD205", "too many filters in the input layer", Level.WARNING, input_conv_filters,
         "map() puts the layer in a Software sequence: 'The filters number should be set between 1 and 512.'",
         "use at most 512 filters in the first convolution"),
    Rule("AKM202", "layer too large for the device", Level.WARNING, too_large_for_device,
         "map() puts the layer in a Software sequence: 'Not enough hardware components of type CNP1 available'",
         "map on a larger device (`--device auto` picks the smallest that holds the model), or narrow the layer "
         "(fewer filters or input channels) or shrink its input map"),
    Rule("AKM203", "global pooling over a split map", Level.WARNING, gap_split,
         "map() puts the layer in a Software sequence: 'When using Global Average Pooling, spatial split is "
         "impossible.'",
         "reduce the channels or the map before the global pooling so its input fits 64 KiB"),
    Rule("AKM204", "residual region too large for the device", Level.WARNING, in_fallen_region,
         "map() puts the whole region (fork to merge, and the layers that read the merge) in a Software sequence",
         "make the layers it names fit (narrower layers), or map on a larger device (`--device auto`)"),
))


def device_findings(device: str) -> list[Diagnostic]:
    """A model-level finding when the device cannot take an Akida IP v2 model at all."""

    from qanac.backends.akida.devices import AUTO, check_ip_version, device_spec

    if device != AUTO:
        device_spec(device)  # an unknown name is a usage error (exit 2), not a finding
    try:
        check_ip_version(device)
    except UnsupportedModelError as exc:
        return [
            Diagnostic(
                Level.ERROR, "AKD301", exc.message, rule="device IP version: the ONNX path produces IP v2 models",
                hint=exc.hint or "choose an IP v2 device (SixNodesIPv2, ...)",
            )
        ]
    return []
