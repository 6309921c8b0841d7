"""What Akida IP v2 accepts through MetaTF's ONNX path: one table for lint and legalization.

Measured with quantizeml 1.2.5 / cnn2snn 2.19.3 / akida 2.19.3 (tests/akida/test_lint_reality.py compiles
an example of every rule and checks the prediction). Two kinds of rule:

- ERROR: quantizeml leaves the node unquantized and cnn2snn silently cuts the model before it, or one of
  them raises. qanac's Akida backend refuses such a model (exit 3) rather than emit a truncated one.
- WARNING: the model converts, but the layer is mapped to a Software sequence (it runs on the host CPU,
  not on the neural processors).

Accepted layer shapes (quantizeml's PATTERNS_MAP): [input Sub/Div/Mul/Add with constants] Conv [MaxPool]
[Relu | Clip(min=0) | LUT activation] [GlobalAveragePool]; the same for depthwise Conv; [Flatten] Gemm
[Relu | Clip]; Add; Concat; ConvTranspose; Resize (nearest, x2). LUT activations: Gelu, LeakyRelu, PRelu,
HardSwish, Swish (x * Sigmoid(x)), x * HardSigmoid(x).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qanac.backends.akida.padding import accepted_forms, form_pads, pads_form
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError
from qanac.graph import constant_value
from qanac.lint import PASSIVE_OPS, LintContext, Rule

# Device limits (akida 2.19.3, IP v2).
MAX_GAP_PIXELS = 144  # "When using Global Average Pooling, input dimensions width * height cannot exceed 144."
STRIDE2_KERNELS = {1, 3}  # "Stride 2 is only supported with kernel size 1 or 3." (convs after the input layer)
# Largest input-channel count measured to fit one CNP, per square kernel size (SixNodesIPv2, 8-bit weights):
# 3x3x640 maps and 3x3x704 does not; 5x5x192 / 5x5x224; 7x7x64 / 7x7x96. Not a plain product of the
# kernel size, so the table is what was measured; a count between the fitting and failing one is warned
# about conservatively. Kernel sizes not measured are not checked.
MAX_CNP_INPUT_CHANNELS = {3: 640, 5: 192, 7: 64}
DEPTHWISE_KERNELS = {3, 5, 7}  # "Kernel size must be 3, 5 or 7." (depthwise layers in hardware)
MAX_DENSE_INPUTS = 2048  # "Input dimensions are too large to fit in a FNP. The maximum value is 2048."
MAX_INPUT_CONV_FILTERS = 512  # "The filters number should be set between 1 and 512." (input layer)

ACTIVATIONS = {"Relu", "Clip", "Gelu", "LeakyRelu", "PRelu", "HardSwish"}
ACCEPTED_OPS = {
    "Conv", "ConvTranspose", "MaxPool", "GlobalAveragePool", "Gemm", "MatMul", "Add", "Concat", "Resize",
    "Sigmoid", "HardSigmoid", "Mul", "Sub", "Div", "AveragePool", "ReduceMean", "Min", "Max",
    "BatchNormalization", "Softmax", "LogSoftmax", "Tanh",
} | ACTIVATIONS | PASSIVE_OPS
AFFINE_OPS = {"Sub", "Div", "Mul", "Add"}


def _attr(node: gs.Node, name: str, default):
    return node.attrs.get(name, default)


def _weights_shape(node: gs.Node) -> tuple[int, ...] | None:
    value = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if value is None else tuple(value.shape)


def is_depthwise(node: gs.Node) -> bool:
    shape = _weights_shape(node)
    group = int(_attr(node, "group", 1))
    return shape is not None and group > 1 and shape[1] == 1 and shape[0] == group


def _single_consumer(node: gs.Node) -> gs.Node | None:
    users = [c for out in node.outputs for c in out.outputs]
    return users[0] if len(users) == 1 else None


def fused_chain(conv: gs.Node) -> list[gs.Node]:
    """The nodes quantizeml fuses into a conv layer: [MaxPool] [activation] [GlobalAveragePool]."""

    chain = []
    node = _single_consumer(conv)
    for allowed in (("MaxPool",), tuple(ACTIVATIONS), ("GlobalAveragePool",)):
        if node is not None and node.op in allowed:
            chain.append(node)
            node = _single_consumer(node)
    return chain


def _is_constant_affine(node: gs.Node, ctx: LintContext) -> bool:
    return node.op in AFFINE_OPS and any(ctx.is_constant(t) for t in node.inputs)


def input_layer(ctx: LintContext) -> gs.Node | None:
    """The first computing node, past passive ops and the constant input normalisation quantizeml folds."""

    if len(ctx.graph.inputs) != 1:
        return None
    tensor = ctx.graph.inputs[0]
    while len(tensor.outputs) == 1:
        node = tensor.outputs[0]
        if node.op in PASSIVE_OPS or _is_constant_affine(node, ctx):
            tensor = node.outputs[0]
            continue
        return node
    return None


def _is_swish_gate(node: gs.Node, ctx: LintContext) -> bool:
    """x * Sigmoid(x) or x * HardSigmoid(x): quantizeml turns it into a LUT activation."""

    if node.op != "Mul" or len(node.inputs) != 2:
        return False
    for gate, other in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        producer = ctx.producer(gate)
        if producer is not None and producer.op in ("Sigmoid", "HardSigmoid") and producer.inputs[0] is other:
            return True
    return False


# --- node checks: each returns a message when the node breaks the rule -----------------------------------


def unsupported_op(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op in ACCEPTED_OPS and node.domain in (None, "", "ai.onnx"):
        return None
    return f"op {node.op} has no Akida equivalent"


def sigmoid_or_tanh(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op == "Tanh":
        return "Tanh has no Akida equivalent"
    if node.op in ("Sigmoid", "HardSigmoid"):
        users = ctx.consumers(node)
        if users and all(_is_swish_gate(u, ctx) for u in users):
            return None
        return f"a bare {node.op} (only x * {node.op}(x), a swish, is supported)"
    return None


def tensor_multiply(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op not in ("Mul", "Div") or len(ctx.tensor_inputs(node)) < 2 or _is_swish_gate(node, ctx):
        return None
    return f"{node.op} of two computed tensors (an attention gate such as SE or ECA)"


def clip_min_nonzero(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "Clip":
        return None
    low = constant_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
    if low is None or float(low) != 0.0:
        shown = "none" if low is None else f"{float(low):g}"
        return f"Clip with min {shown}; Akida only has bounded ReLUs (min 0)"
    return None


def grouped_conv(node: gs.Node, ctx: LintContext) -> str | None:
    group = int(_attr(node, "group", 1))
    if node.op == "Conv" and group > 1 and not is_depthwise(node):
        return f"grouped convolution with {group} groups (only depthwise, groups == channels, is supported)"
    return None


def dilated_conv(node: gs.Node, ctx: LintContext) -> str | None:
    dilations = list(_attr(node, "dilations", [1, 1]))
    if node.op == "Conv" and any(d != 1 for d in dilations):
        return f"dilation {dilations}"
    return None


def conv_stride_kernel(node: gs.Node, ctx: LintContext) -> str | None:
    # depthwise convs take stride 2 with 5x5 kernels too (measured: quantizeml splits them, all on hardware)
    if node.op != "Conv" or node is input_layer(ctx) or is_depthwise(node):
        return None
    strides = list(_attr(node, "strides", [1, 1]))
    shape = _weights_shape(node)
    if shape is None:
        return None
    kernel = shape[2:]
    if any(s > 2 for s in strides):
        return f"stride {strides} (at most 2)"
    if any(s == 2 for s in strides) and any(k not in STRIDE2_KERNELS for k in kernel):
        return f"stride 2 with a {kernel[0]}x{kernel[1]} kernel (stride 2 needs a 1x1 or 3x3 kernel after the input layer)"
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
    if is_depthwise(node) and strides != (1, 1) and any(k not in STRIDE2_KERNELS for k in kernel):
        return None  # quantizeml rewrites these itself (measured: 5x5 stride 2, pads 2 maps to hardware)
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
    if node.op != "MaxPool":
        return None
    source = node.inputs[0]
    producer = ctx.producer(source)
    if producer is not None and producer.op in ACTIVATIONS and len(source.outputs) == 1:
        source = producer.inputs[0]
        producer = ctx.producer(source)
    if producer is not None and producer.op == "Conv" and len(source.outputs) == 1:
        return None
    what = "the model input" if producer is None else f"{producer.op} '{producer.name}'"
    if producer is not None and producer.op == "Conv":
        what += ", whose output is also read elsewhere"
    return f"max pooling of {what} (it must follow a convolution, with at most its activation between)"


def input_batchnorm(node: gs.Node, ctx: LintContext) -> str | None:
    # A first dense or depthwise layer is fine: qanac's Akida backend then quantizes the input as int8.
    if node is input_layer(ctx) and node.op == "BatchNormalization":
        return "the model starts with BatchNormalization"
    return None


def input_conv_with_gap(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op == "Conv" and node is input_layer(ctx):
        if any(n.op == "GlobalAveragePool" for n in fused_chain(node)):
            return "the input convolution is directly followed by global average pooling"
    return None


def average_pool(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "AveragePool":
        return None
    size = ctx.spatial(node.inputs[0])
    kernel = tuple(_attr(node, "kernel_shape", []))
    if size is not None and kernel == size and not any(_attr(node, "pads", [0, 0, 0, 0])):
        return None  # covers the whole map: quantizeml turns it into GlobalAveragePool
    return f"AveragePool {list(kernel)} over a {size[0] if size else '?'}x{size[1] if size else '?'} map (only global pooling is supported)"


def unfused_gap(node: gs.Node, ctx: LintContext) -> str | None:
    """GAP fuses into the conv before it (through its activation) only if nothing else reads that output;
    after Add or Concat quantizeml inserts an identity conv to fuse it into."""

    if node.op != "GlobalAveragePool":
        return None
    tensor = node.inputs[0]
    producer = ctx.producer(tensor)
    shared = len(tensor.outputs) > 1
    while producer is not None and producer.op in ACTIVATIONS:
        tensor = producer.inputs[0]
        shared = shared or len(tensor.outputs) > 1
        producer = ctx.producer(tensor)
    if producer is None:
        return "global average pooling of the model input"
    if producer.op in ("Add", "Concat"):
        return None
    if producer.op == "Conv" and not shared:
        return None
    if producer.op == "Conv":
        return f"global average pooling of '{producer.name}', whose output is also used elsewhere (it cannot be fused)"
    return f"global average pooling after {producer.op} '{producer.name}' (it must follow a convolution)"


def softmax_inside(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op in ("Softmax", "LogSoftmax"):
        return f"{node.op} inside the graph (a trailing one is moved to the host by strip-trailing-softmax)"
    return None


def gap_too_large(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "GlobalAveragePool":
        return None
    size = ctx.spatial(node.inputs[0])
    if size is not None and size[0] * size[1] > MAX_GAP_PIXELS:
        return f"global average pooling over {size[0]}x{size[1]} = {size[0] * size[1]} pixels (at most {MAX_GAP_PIXELS})"
    return None


def gap_after_strided_conv(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "Conv" or not any(s > 1 for s in _attr(node, "strides", [1, 1])):
        return None
    if any(n.op == "GlobalAveragePool" for n in fused_chain(node)):
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


def maxpool_last_in_sequence(node: gs.Node, ctx: LintContext) -> str | None:
    if node.op != "Conv":
        return None
    chain = fused_chain(node)
    if not chain or chain[0].op != "MaxPool":
        return None
    last = chain[-1]
    following = ctx.consumers(last)
    while len(following) == 1 and following[0].op in PASSIVE_OPS:
        following = ctx.consumers(following[0])
    if following and all(f.op in ("Conv", "ConvTranspose") for f in following):
        return None
    names = ", ".join(f"{f.op} '{f.name}'" for f in following) or "the model output"
    return f"a convolution with max pooling followed by {names} (it must feed a convolution)"


AKIDA_RULES: list[Rule] = [
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
         "map() puts the layer in a Software sequence: 'A layer with max pooling cannot be the last layer of a sequence'",
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
]


def device_findings(device: str) -> list[Diagnostic]:
    """A model-level finding when the device cannot take an Akida IP v2 model at all."""

    from qanac.backends.akida.devices import check_ip_version, device_spec

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
