"""What Akida IP v1 (AKD1000, AKD1500) accepts: a lint rule table in qanac.lint's ``Rule`` format.

Derived from cnn2snn 2.19.3's v1 block-converter registry (``cnn2snn.quantizeml.block_converter``:
``_V1_PATTERN_CONVERTERS`` and ``_V1_INPUT_PATTERN_CONVERTERS``, filled by ``register_conversion_patterns``;
``block_converters_generator.generate_block_converters`` picks them when CNN2SNN_TARGET_AKIDA_VERSION is v1).
``V1_PATTERNS`` below is that registry written as Keras layer types; tests/akida/test_v1_rules.py checks it
against the installed cnn2snn. The v1 layers:

    input:  Conv2D [MaxPool2D] ReLU                       -> InputConvolutional (1 or 3-channel uint8 image)
    others: Conv2D [MaxPool2D | GlobalAveragePooling2D] [ReLU]   -> Convolutional
            SeparableConv2D [MaxPool2D | GlobalAveragePooling2D] [ReLU] -> SeparableConvolutional
            [Reshape] [Flatten] Dense [ReLU]              -> FullyConnected

and the checks their converters and cnn2snn's model checks make: one inbound layer per layer
(``_check_layer_inbounds``: sequential models only); a layer's output quantizer may only be a ReLU's
(``blocks._search_block_v1``: every layer but the last ends in a ReLU); ReLUs bounded
(``activations.v1_relu_checks``); a MaxPool padded like its convolution
(``padding.check_conv_and_max_pool_compatibility``); global pooling over at most 256 pixels
(``pooling.gap_params_checks``); no dilation; weights of 1, 2 or 4 bits (the input convolution 4 or 8) and
activations of at most 4 bits (quantization options: ``WEIGHT_BITS`` / ``ACTIVATION_BITS`` below).

The rules judge the float ONNX graph the v1 backend lowers (``lowering``), so they speak of ONNX nodes and
account for what the lowering does: Sub/Div/Mul/Add by constants on the input become the input Rescaling, a
depthwise Conv read only by a 1x1 Conv becomes a SeparableConv2D, an identity 1x1 Conv is dropped, a ReLU
before a MaxPool is moved after it (quantizeml's sanitizer; exact), and a bounded ReLU before a
GlobalAveragePool gets an identity 1x1 convolution to pool in. Every rule is an ERROR: the backend refuses
the model (or the node goes to the host).
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from qanac.backends.akida.devices import AUTO, V1_IP_VERSION, device_spec
from qanac.diagnostics import Diagnostic, Level
from qanac.graph import constant_value
from qanac.lint import LintContext, Rule, RuleSet

from .lowering import AFFINE_OPS, PASS_THROUGH_OPS, is_identity_conv, keras_padding, pointwise_reader, same_pads

# cnn2snn's v1 registry, as Keras layer type names (quantizeml's Quantized* layers of these).
V1_PATTERNS: tuple[tuple[str, ...], ...] = (
    ("Dense",), ("Dense", "ReLU"), ("Flatten", "Dense"), ("Flatten", "Dense", "ReLU"),
    ("Reshape", "Dense"), ("Reshape", "Dense", "ReLU"), ("Reshape", "Flatten", "Dense"),
    ("Reshape", "Flatten", "Dense", "ReLU"),
    ("Conv2D",), ("Conv2D", "ReLU"), ("Conv2D", "MaxPool2D", "ReLU"), ("Conv2D", "GlobalAveragePooling2D", "ReLU"),
    ("Conv2D", "GlobalAveragePooling2D"),
    ("SeparableConv2D",), ("SeparableConv2D", "ReLU"), ("SeparableConv2D", "GlobalAveragePooling2D", "ReLU"),
    ("SeparableConv2D", "GlobalAveragePooling2D"), ("SeparableConv2D", "MaxPool2D", "ReLU"),
    ("Dequantizer",),
)
V1_INPUT_PATTERNS: tuple[tuple[str, ...], ...] = (
    ("InputQuantizer",), ("Conv2D", "ReLU"), ("Conv2D", "MaxPool2D", "ReLU"),
)
MAX_GAP_PIXELS = 256  # "Unsupported spatial size product (...). We only accepts values smaller than 256."
IMAGE_CHANNELS = (1, 3)  # the InputConvolutional reads a 1- or 3-channel uint8 image
# Bit widths (quantization options, not node properties; ``convert.check_bit_widths`` enforces them).
WEIGHT_BITS = (1, 2, 4)  # Convolutional, SeparableConvolutional, FullyConnected ("1, 2 or 4 bits")
INPUT_WEIGHT_BITS = (4, 8)  # InputConvolutional ("can only handle weights with 4 or 8 bits")
ACTIVATION_BITS = (1, 2, 3, 4)

PASSIVE_OPS = (*PASS_THROUGH_OPS, "Flatten", "Reshape")  # ops that move data between layers without computing
ACTIVATION_OPS = ("Relu", "Clip")
POOL_OPS = ("MaxPool", "GlobalAveragePool")
LAYER_OPS = ("Conv", "Gemm", "MatMul")
JOIN_OPS = ("Add", "Sub", "Mul", "Div", "Sum", "Concat", "Max", "Min", "Mean")
V1_OPS = {*LAYER_OPS, *ACTIVATION_OPS, *POOL_OPS, *AFFINE_OPS, *PASS_THROUGH_OPS, "Flatten", "Reshape", "Constant"}


# --- graph facts -------------------------------------------------------------------------------------------


def _weights(node: gs.Node):
    return constant_value(node.inputs[1]) if len(node.inputs) > 1 else None


def is_depthwise(node: gs.Node) -> bool:
    weights = _weights(node)
    group = int(node.attrs.get("group", 1))
    return node.op == "Conv" and weights is not None and weights.ndim == 4 and group > 1 and \
        weights.shape[1] == 1 and weights.shape[0] % group == 0


def _is_constant_affine(node: gs.Node, ctx: LintContext) -> bool:
    return node.op in AFFINE_OPS and len(ctx.tensor_inputs(node)) == 1 and len(node.inputs) == 2


def input_chain(ctx: LintContext) -> list[gs.Node]:
    """The input normalisation (constant Sub/Div/Mul/Add) and passive ops between the input and the first layer."""

    chain = []
    if len(ctx.graph.inputs) != 1:
        return chain
    tensor = ctx.graph.inputs[0]
    while len(tensor.outputs) == 1:
        node = tensor.outputs[0]
        if node.op not in PASSIVE_OPS and not _is_constant_affine(node, ctx):
            break
        chain.append(node)
        tensor = node.outputs[0]
    return chain


def first_layer(ctx: LintContext) -> gs.Node | None:
    chain = input_chain(ctx)
    tensor = chain[-1].outputs[0] if chain else (ctx.graph.inputs[0] if len(ctx.graph.inputs) == 1 else None)
    return tensor.outputs[0] if tensor is not None and len(tensor.outputs) == 1 else None


def _single_reader(tensor: gs.Tensor, ctx: LintContext) -> gs.Node | None:
    if len(tensor.outputs) != 1 or any(out is tensor for out in ctx.graph.outputs):
        return None
    return tensor.outputs[0]


def layer_head(node: gs.Node, ctx: LintContext) -> gs.Node:
    """The node whose output the v1 layer's pooling and activation read: a depthwise Conv fused into a
    SeparableConv2D hands over to its 1x1 Conv."""

    if is_depthwise(node):
        pointwise = pointwise_reader(node.outputs[0], ctx.graph)
        if pointwise is not None:
            return pointwise
    return node


def layer_chain(node: gs.Node, ctx: LintContext) -> list[gs.Node]:
    """What follows a layer's main op inside its v1 layer: at most one pooling and one activation, in any order
    (a ReLU before a MaxPool is moved after it; before a GlobalAveragePool it gets an identity conv)."""

    chain: list[gs.Node] = []
    tensor = layer_head(node, ctx).outputs[0]
    while (reader := _single_reader(tensor, ctx)) is not None:
        if reader.op in POOL_OPS and not any(n.op in POOL_OPS for n in chain):
            chain.append(reader)
        elif reader.op in ACTIVATION_OPS and not any(n.op in ACTIVATION_OPS for n in chain):
            chain.append(reader)
        else:
            break
        tensor = reader.outputs[0]
    return chain


def _next_layers(tensor: gs.Tensor, ctx: LintContext) -> list[gs.Node]:
    readers = list(tensor.outputs)
    found = []
    while readers:
        reader = readers.pop()
        if reader.op in PASSIVE_OPS or is_identity_conv(reader):
            readers.extend(reader.outputs[0].outputs)
        else:
            found.append(reader)
    return found


def _pooled_layer(pool: gs.Node, ctx: LintContext) -> gs.Node | None:
    """The Conv (or separable pair's depthwise Conv) whose v1 layer ``pool`` belongs to, or None."""

    tensor = pool.inputs[0]
    producer = ctx.producer(tensor)
    if producer is not None and producer.op in ACTIVATION_OPS and _single_reader(tensor, ctx) is pool:
        tensor = producer.inputs[0]
        producer = ctx.producer(tensor)
    if producer is None or producer.op != "Conv" or _single_reader(tensor, ctx) is None:
        return None
    if not is_depthwise(producer):
        before = ctx.producer(producer.inputs[0])
        if before is not None and is_depthwise(before) and layer_head(before, ctx) is producer:
            return before
    return producer


def _padding_of(node: gs.Node, ctx: LintContext) -> str | None:
    """The Keras padding of a Conv or MaxPool node, None when it has none (or the size is unknown)."""

    if node.op == "Conv":
        weights = _weights(node)
        if weights is None or weights.ndim != 4:
            return None
        kernel = (int(weights.shape[2]), int(weights.shape[3]))
    else:
        kernel = tuple(int(k) for k in node.attrs.get("kernel_shape", [1, 1]))
    strides = tuple(int(s) for s in node.attrs.get("strides", [1, 1]))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    return keras_padding(auto_pad, [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])],
                         ctx.spatial(node.inputs[0]), kernel, strides)


# --- node checks: each returns a message when the node breaks the rule -----------------------------------


def unsupported_op(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op in V1_OPS or node.op in JOIN_OPS:
        return None
    return f"op {node.op} has no Akida IP v1 layer"


def not_sequential(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op not in JOIN_OPS:
        return None
    computed = ctx.tensor_inputs(node)
    if len(computed) < 2:
        return None
    return f"{node.op} of {len(computed)} computed tensors (a skip connection, branch or gate)"


def constant_arithmetic(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op not in AFFINE_OPS or len(ctx.tensor_inputs(node)) != 1 or node in input_chain(ctx):
        return None
    return f"{node.op} by a constant after the input normalisation"


def unbounded_relu(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op == "Relu":
        return "an unbounded ReLU"
    if node.op == "Clip" and _clip_bounds(node)[0] == 0.0 and _clip_bounds(node)[1] is None:
        return "Clip(0) without a maximum (an unbounded ReLU)"
    return None


def clip_min_nonzero(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "Clip":
        return None
    low = _clip_bounds(node)[0]
    if low != 0.0:
        return f"Clip with min {'none' if low is None else f'{low:g}'}"
    return None


def _clip_bounds(node: gs.Node) -> tuple[float | None, float | None]:
    def bound(index: int, attr: str) -> float | None:
        if attr in node.attrs:
            return float(node.attrs[attr])
        if len(node.inputs) > index and node.inputs[index].name:
            value = constant_value(node.inputs[index])
            return None if value is None else float(value)
        return None

    return bound(1, "min"), bound(2, "max")


def standalone_depthwise(node: gs.Node, ctx: LintContext) -> str | None:
    if not is_depthwise(node) or layer_head(node, ctx) is not node:
        return None
    return "a depthwise convolution not read only by a 1x1 convolution (no SeparableConv2D to fuse into)"


def grouped_conv(node: gs.Node, ctx: LintContext) -> str | None:
    group = int(node.attrs.get("group", 1))
    if node.op == "Conv" and group > 1 and not is_depthwise(node):
        return f"a convolution with {group} groups"
    return None


def dilated(node: gs.Node, ctx: LintContext) -> str | None:
    dilations = [int(d) for d in node.attrs.get("dilations", [1, 1])]
    if node.op in ("Conv", "MaxPool") and any(d != 1 for d in dilations):
        return f"dilation {dilations}"
    return None


def padding(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op not in ("Conv", "MaxPool") or grouped_conv(node, ctx) or dilated(node, ctx):
        return None
    size = ctx.spatial(node.inputs[0])
    if _padding_of(node, ctx) is not None or size is None:
        return None
    weights = _weights(node)
    kernel = tuple(int(k) for k in (weights.shape[2:] if node.op == "Conv" else node.attrs["kernel_shape"]))
    strides = tuple(int(s) for s in node.attrs.get("strides", [1, 1]))
    return (f"pads {list(node.attrs.get('pads', []))} for a {kernel[0]}x{kernel[1]} window at stride {strides[0]} on "
            f"a {size[0]}x{size[1]} map (Keras pads nothing or {same_pads(size, kernel, strides)})")


def maxpool_outside_layer(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "MaxPool":
        return None
    layer = _pooled_layer(node, ctx)
    if layer is None:
        return "max pooling that does not follow a convolution (with at most its ReLU between)"
    if not any(n.op in ACTIVATION_OPS for n in layer_chain(layer, ctx)):
        return f"max pooling in the layer of '{layer.name}', which has no ReLU (v1 pools only as Conv > MaxPool > ReLU)"
    return None


def maxpool_padding_mismatch(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "MaxPool" or padding(node, ctx) is not None:
        return None
    layer = _pooled_layer(node, ctx)
    if layer is None:
        return None
    conv_padding = _padding_of(layer, ctx)
    pool_padding = _padding_of(node, ctx)
    size = ctx.spatial(node.inputs[0])
    kernel = tuple(int(k) for k in node.attrs["kernel_shape"])
    strides = tuple(int(s) for s in node.attrs.get("strides", [1, 1]))
    if size is not None and same_pads(size, kernel, strides) == [0, 0, 0, 0] and not any(node.attrs.get("pads", [])):
        return None  # 'valid' and 'same' are the same pooling here: the lowering takes the convolution's
    if conv_padding is None or pool_padding is None or conv_padding == pool_padding:
        return None
    return f"max pooling padded '{pool_padding}' after '{layer.name}' padded '{conv_padding}'"


def _pointwise_half(node: gs.Node, ctx: LintContext) -> bool:
    """``node`` is the 1x1 Conv of a depthwise + pointwise pair (one SeparableConv2D, judged at its depthwise)."""

    if node.op != "Conv" or is_depthwise(node):
        return False
    before = ctx.producer(node.inputs[0])
    return before is not None and is_depthwise(before) and layer_head(before, ctx) is node


def layer_without_activation(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op not in LAYER_OPS or _pointwise_half(node, ctx) or is_identity_conv(node):
        return None
    chain = layer_chain(node, ctx)
    if any(n.op in ACTIVATION_OPS for n in chain):
        return None
    end = chain[-1] if chain else layer_head(node, ctx)
    following = _next_layers(end.outputs[0], ctx)
    if not following:
        return None
    names = ", ".join(f"{f.op} '{f.name}'" for f in following[:3])
    return f"a layer without a ReLU read by {names} (only the last layer may end without one)"


def input_layer_form(node: gs.Node, ctx: LintContext) -> str | None:
    if node is not first_layer(ctx):
        return None
    shape = node.inputs[0].shape
    channels = shape[1] if shape is not None and len(shape) == 4 else None
    if node.op != "Conv" or is_depthwise(node) or channels not in IMAGE_CHANNELS:
        what = f"{'depthwise ' if is_depthwise(node) else ''}{node.op}"
        return (f"the first layer is a {what} over a {len(shape or ())}-D input"
                + (f" of {channels} channels" if channels is not None else "")
                + " (Akida v1 starts with a Conv over a 1- or 3-channel image)")
    chain = [n.op for n in layer_chain(node, ctx)]
    if "GlobalAveragePool" in chain:
        return "the input convolution is followed by global average pooling"
    if not any(op in ACTIVATION_OPS for op in chain):
        return "the input convolution has no ReLU"
    return None


def _bounded(tensor: gs.Tensor, ctx: LintContext) -> bool:
    """``tensor`` is a bounded ReLU's output, possibly max pooled or copied: the lowering pools it in an identity
    convolution of its own (exact, since the mean of values in [0, b] is in [0, b])."""

    producer = ctx.producer(tensor)
    while producer is not None and (producer.op in ("MaxPool", *PASSIVE_OPS) or is_identity_conv(producer)):
        producer = ctx.producer(producer.inputs[0])
    if producer is None or producer.op not in ACTIVATION_OPS:
        return False
    low, high = (0.0, None) if producer.op == "Relu" else _clip_bounds(producer)
    return low == 0.0 and high is not None


def global_pool(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "GlobalAveragePool":
        return None
    size = ctx.spatial(node.inputs[0])
    if size is not None and size[0] * size[1] > MAX_GAP_PIXELS:
        return (f"global average pooling over {size[0]}x{size[1]} = {size[0] * size[1]} pixels "
                f"(at most {MAX_GAP_PIXELS})")
    tensor = node.inputs[0]
    producer = ctx.producer(tensor)
    if _bounded(tensor, ctx) or (producer is not None and producer.op == "Conv" and _single_reader(tensor, ctx)):
        return None
    what = "the model input" if producer is None else f"{producer.op} '{producer.name}'"
    return (f"global average pooling of {what} (it must follow a convolution that feeds nothing else, or a "
            "bounded ReLU)")


AKIDA_V1_RULES = RuleSet(rules=(
    Rule("AK1101", "unsupported op", Level.ERROR, unsupported_op,
         "the v1 lowering has no Keras layer for it; the compile refuses the node",
         "replace the op, or keep it on the host"),
    Rule("AK1102", "not sequential", Level.ERROR, not_sequential,
         "cnn2snn raises 'Layer ... must have only one inbound layer' (v1 models are sequential)",
         "keep skip connections, branches and gates on the host (partitioning does), or compile for an IP v2 device"),
    Rule("AK1103", "constant arithmetic inside the graph", Level.ERROR, constant_arithmetic,
         "the v1 lowering refuses it: only the input normalisation becomes a layer (Rescaling)",
         "fold the scale or offset into the neighbouring convolution"),
    Rule("AK1104", "unbounded ReLU", Level.ERROR, unbounded_relu,
         "cnn2snn raises 'in AkidaVersion.v1, unbounded QuantizedReLU is not supported.'",
         "use ReLU6 or Clip(0, b) in the model, or compile with --approx bound-relu (bounds each ReLU at a "
         "high percentile of its calibration output and reports the deviation)"),
    Rule("AK1105", "clip with min != 0", Level.ERROR, clip_min_nonzero,
         "the v1 lowering refuses it: Akida's activations are ReLUs",
         "use Clip(0, b); shift a symmetric activation into the next layer's bias"),
    Rule("AK1106", "standalone depthwise convolution", Level.ERROR, standalone_depthwise,
         "cnn2snn has no v1 converter for DepthwiseConv2D ('Invalid block found during conversion')",
         "follow the depthwise convolution directly by a 1x1 convolution (a SeparableConv2D), nothing between"),
    Rule("AK1107", "grouped convolution", Level.ERROR, grouped_conv,
         "the v1 lowering refuses it (no Keras or Akida v1 form)",
         "split it into one convolution per group, or use a depthwise-separable pair"),
    Rule("AK1108", "dilation", Level.ERROR, dilated,
         "cnn2snn rejects dilated layers (_check_layers_dilation)",
         "write the dilated kernel as a dense kernel with zeros between the taps"),
    Rule("AK1109", "padding", Level.ERROR, padding,
         "the v1 lowering refuses it: Keras pads nothing ('valid') or as TensorFlow 'same' (extra at the end)",
         "pad by k // 2 at stride 1 (PyTorch padding=k//2), pad only the end at stride 2, or do not pad"),
    Rule("AK1110", "max pooling outside a layer", Level.ERROR, maxpool_outside_layer,
         "cnn2snn raises 'Invalid block found during conversion' (v1 pools only as Conv > MaxPool > ReLU)",
         "pool right after a convolution that has a bounded ReLU"),
    Rule("AK1111", "max pooling padding", Level.ERROR, maxpool_padding_mismatch,
         "cnn2snn raises 'Pooling layer ... must have the same padding as ...'",
         "pad the pooling like its convolution ('same' after 'same')"),
    Rule("AK1112", "layer without activation", Level.ERROR, layer_without_activation,
         "cnn2snn raises 'Model incompatible with akida v1 version. The layer ... is not valid.'",
         "end every layer but the last with a bounded ReLU"),
    Rule("AK1113", "input layer", Level.ERROR, input_layer_form,
         "cnn2snn builds a v1 model only from an InputConvolutional (Conv [MaxPool] ReLU over a 1- or 3-channel "
         "uint8 image); any other first layer fails ('InputData sign incompatible with previous layer', or the "
         "block is not a v1 pattern)",
         "start the model with a Conv over the image followed by a bounded ReLU; a model part that starts inside "
         "the network (after a host segment) cannot run on v1"),
    Rule("AK1114", "global average pooling", Level.ERROR, global_pool,
         "cnn2snn raises 'Unsupported spatial size product' (over 256 pixels) or finds no v1 pattern for it",
         "pool right after a convolution (and its ReLU) over at most 16x16 pixels; downsample first"),
))


def rules_for_device(device: str) -> RuleSet | None:
    """``AKIDA_V1_RULES`` for an IP v1 device (AKD1000, AKD1500): lint and partitioning judge a model for it
    by what the v1 path builds; None (the IP v2 table) for any other device and for ``auto``."""

    if device == AUTO:
        return None
    return AKIDA_V1_RULES if device_spec(device).ip_version == V1_IP_VERSION else None


def v1_findings(model: onnx.ModelProto) -> list[Diagnostic]:
    """Every finding of ``AKIDA_V1_RULES`` on ``model`` (shapes inferred first), in graph order, as
    ``qanac.lint.lint_model`` reports them."""

    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    ctx = LintContext(graph)
    return [
        Diagnostic(rule.level, rule.code, f"{ctx.label(node)}: {message}", nodes=[node.name],
                   rule=f"{rule.title}: {rule.consequence}", hint=rule.fix)
        for node in ctx.order for rule in AKIDA_V1_RULES
        if (message := rule.check(node, ctx)) is not None
    ]
