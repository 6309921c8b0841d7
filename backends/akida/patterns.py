"""What Akida accepts through MetaTF's ONNX path: the installed quantizeml's own table, plus qanac's additions.

The single source of Akida acceptance for the lint rules (``rules.py``), the legalization passes and the
backend (``convert.py``).

Read from the installed quantizeml on first use (``vendor()``); importing quantizeml imports TensorFlow, so
this module imports it only then:

- ``patterns``: the op chains quantizeml fuses into one Akida layer, in its matching order
  (``register_patterns.PATTERNS_MAP``). The token ``activation`` is quantizeml's LUT activation node, which
  its sanitizer makes of every op in ``lut_activations`` (``replace_activations``).
- ``input_patterns``: the chains its InputQuantizer absorbs at the model input (``INPUT_QUANTIZER_PATTERNS``).
- ``known_ops``: every op type quantizeml builds anything from.
- ``sanitize``: the sanitizer ``quantize()`` runs before it matches patterns; ``sanitized`` applies it the way
  ``quantize()`` does, and lint judges its output. ``sanitizer_growth`` predicts from the shapes what it adds
  (identity convolutions), and ``sanitized`` refuses a model it would grow by more than
  ``SANITIZER_GROWTH_BUDGET_BYTES``.

Matching (``match_block``, ``cover``) is quantizeml's ``search_block_from_node`` on an onnx-graphsurgeon
graph: patterns are tried in order, and a chain continues only through a single consumer and never past a
graph output. ``cover`` matches from every node in topological order rather than only from nodes whose
inputs are quantized, so a node no pattern covers does not hide the nodes after it (partitioning gives
those a segment of their own).

qanac's own additions (``QANAC``): what was measured about mapping on the device (akida 2.19.3, cnn2snn
2.19.3, quantizeml 1.2.5; tests/akida/test_lint_reality.py compiles an example of each), the role of each
token that follows a layer's main op, what the sanitizer folds in front of the first layer, and why a node
that quantizeml leaves unquantized has no Akida layer (``refusal``). tests/akida/test_patterns.py checks
the derived table against a pinned snapshot and every op qanac's table names against ``known_ops``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import warnings
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qanac import memory
from qanac.graph import initializer_names
from qanac.lint import topological_order
from qanac.model_summary import shape_skeleton
from qanac.progress import report as report_progress

BRAINCHIP_DOMAIN = "com.brainchip"


@dataclasses.dataclass(frozen=True)
class VendorTable:
    """What the installed quantizeml fuses, absorbs at the input and rewrites into LUT activations."""

    version: str
    patterns: tuple[tuple[str, ...], ...]
    input_patterns: tuple[tuple[str, ...], ...]
    activation_token: str
    lut_activations: frozenset[str]

    @functools.cached_property
    def known_ops(self) -> frozenset[str]:
        tokens = {t for p in self.patterns + self.input_patterns for t in p}
        return frozenset(tokens | self.lut_activations)

    @functools.cached_property
    def prelude_tokens(self) -> frozenset[str]:
        """Tokens that only ever lead into another op of a pattern (Flatten before Gemm, BRNPad before Conv)."""

        leading = {p[0] for p in self.patterns if len(p) > 1}
        elsewhere = {t for p in self.patterns for t in p[1:]} | {p[0] for p in self.patterns if len(p) == 1}
        return frozenset(leading - elsewhere)

    def token(self, op: str, domain: str | None = None) -> str:
        """The pattern token of a node: its op type, or ``activation`` for a LUT activation."""

        if op in self.lut_activations or (op == self.activation_token and domain == BRAINCHIP_DOMAIN):
            return self.activation_token
        return op


@functools.cache
def vendor() -> VendorTable:
    """The installed quantizeml's pattern table (imports quantizeml, and TensorFlow with it, once)."""

    from qanac.backends.akida.tensorflow_import import import_tensorflow_quietly

    import_tensorflow_quietly()
    from quantizeml.onnx_support.layers.subgraph_ops import activation
    from quantizeml.onnx_support.quantization import register_patterns
    from quantizeml.onnx_support.quantization.transforms.replace_activations import ONNX_SUPPORTED_ACTIVATIONS

    return VendorTable(
        version=importlib.metadata.version("quantizeml"),
        patterns=tuple(tuple(p.pattern) for p in register_patterns.PATTERNS_MAP),
        input_patterns=tuple(tuple(p.pattern) for p in register_patterns.INPUT_QUANTIZER_PATTERNS),
        activation_token=activation.name,
        lut_activations=frozenset(ONNX_SUPPORTED_ACTIVATIONS),
    )


class SanitizerTooCostly(Exception):
    """The sanitizer would add more to the model than the budget ``sanitized`` was given."""

    def __init__(self, growth: SanitizerGrowth, budget: int):
        super().__init__(f"quantizeml's sanitizer would add {growth.describe()}, over the "
                         f"{budget / 2**20:.0f} MB budget")
        self.growth = growth
        self.budget = budget


# The most the sanitizer may add to a model (``SanitizerGrowth.identity_bytes``). quantizeml's sanitize
# copies, re-checks and re-infers the whole model after each of its ~50 transforms, so its time and memory
# grow with the model it makes: DenseNet-121 at 64x64 (32 MB) gains 680 MB of identity kernels, and
# sanitizing it took about 8 minutes and 11 GB. A model's own weights are what they are; this growth is
# what partitioning can avoid (``convert.check_sanitizer_cost``).
SANITIZER_GROWTH_BUDGET_BYTES = 128 * 2**20


def sanitized(model: onnx.ModelProto, budget: int | None = SANITIZER_GROWTH_BUDGET_BYTES) -> onnx.ModelProto:
    """``model`` (never mutated) as quantizeml's ``quantize()`` sees it after sanitizing: unnamed nodes named
    by their first output, a single input's batch made dynamic, then ``sanitize``. Raises what the sanitizer
    raises (a non-float input, say).

    When the sanitizer would add more than ``budget`` bytes (``sanitizer_growth``; None: no limit), raises
    ``SanitizerTooCostly`` without sanitizing, and reports it as a ``lint`` progress step: lint
    (``rules.vendor_view``) then judges the model as it is, which keeps on the host what only the
    sanitizer's rewrites (its identity convolutions, say) would have put on the device."""

    vendor()
    if budget is not None:
        growth = sanitizer_growth(model)
        if growth.identity_bytes > budget:
            exc = SanitizerTooCostly(growth, budget)
            report_progress("lint", f"judging the model as it is, not as quantizeml's sanitizer makes it: {exc}")
            raise exc
    return sanitized_with_warnings(model)[0]


_last_sanitized: tuple[bytes, onnx.ModelProto, tuple[str, ...]] | None = None  # digest, result, warnings


def sanitized_with_warnings(
    model: onnx.ModelProto, input_shape: tuple[int, ...] | None = None
) -> tuple[onnx.ModelProto, list[str]]:
    """``sanitized`` without a budget, for ``input_shape`` (C, H, W; None: the model's own static shape),
    with the messages of the warnings the sanitizer raised.

    The last result is kept, keyed by the digest of the model and the shape: lint sanitizes the model it
    judges, and a compile whose device segment is that whole model quantizes exactly it, so its
    ``quantize`` reuses lint's sanitize (a minute and a model copy per transform on a ResNet-50) instead
    of running it again. Each call returns its own copy."""

    global _last_sanitized
    vendor()
    shape = tuple(input_shape) if input_shape is not None else _static_input_shape(model)
    key = hashlib.sha256(model.SerializeToString(deterministic=True) + repr(shape).encode()).digest()
    if _last_sanitized is None or _last_sanitized[0] != key:
        _last_sanitized = None  # the previous result is freed before the next sanitize, not after
        with memory.collecting_discarded_copies():
            result, messages = _sanitize(model, shape)
        _last_sanitized = (key, result, tuple(messages))
    copy = onnx.ModelProto()
    copy.CopyFrom(_last_sanitized[1])
    return copy, list(_last_sanitized[2])


def forget_sanitized() -> None:
    """Drop the kept sanitize result (``sanitized_with_warnings``), so that the next call sanitizes."""

    global _last_sanitized
    _last_sanitized = None


def _static_input_shape(model: onnx.ModelProto) -> tuple[int, ...] | None:
    """The single input's shape after the batch, when every dimension of it is a fixed positive size."""

    initializers = initializer_names(model)
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        return None
    dims = inputs[0].type.tensor_type.shape.dim[1:]
    if dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
        return tuple(d.dim_value for d in dims)
    return None


def _sanitize(model: onnx.ModelProto, shape: tuple[int, ...] | None) -> tuple[onnx.ModelProto, list[str]]:
    from quantizeml.onnx_support.graph_tools import generate_node_names
    from quantizeml.onnx_support.quantization.model import ONNXModel
    from quantizeml.onnx_support.quantization.shape import set_model_shape
    from quantizeml.onnx_support.quantization.transforms import sanitize

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    generate_node_names(copy)
    with warnings.catch_warnings(record=True) as records, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        onnx_model = ONNXModel(copy)
        if shape is not None:
            onnx_model = set_model_shape(onnx_model, input_shape=list(shape))
        result = sanitize(onnx_model).model
    return result, [str(record.message) for record in records if from_vendor(record)]


VENDOR_PACKAGES = ("quantizeml", "cnn2snn", "akida")


def from_vendor(record: warnings.WarningMessage) -> bool:
    """Whether a recorded warning was raised by MetaTF's own code (quantizeml, cnn2snn, akida)."""

    return any(package in record.filename for package in VENDOR_PACKAGES)


@dataclasses.dataclass(frozen=True)
class SanitizerGrowth:
    """What quantizeml's sanitizer adds to a model before quantizing it: the identity convolutions of
    ``insert_identity_convs`` (a C x C x 1 x 1 float kernel each), and the model's size with them."""

    identity_convs: int
    identity_bytes: int
    model_bytes: int  # the serialized model plus the identity kernels: the size the sanitizer copies
    by_node: dict[str, int]  # node -> the kernel bytes added because of it (the nodes that add any)

    def describe(self) -> str:
        return (f"{self.identity_convs} identity convolutions ({self.identity_bytes / 2**20:.0f} MB of kernels; "
                f"{self.model_bytes / 2**20:.0f} MB in all)")

    def largest_within(self, budget: int) -> list[str]:
        """The nodes adding the most, largest first, without which the sanitizer adds at most ``budget``."""

        chosen, excess = [], self.identity_bytes - budget
        for name, added in sorted(self.by_node.items(), key=lambda item: -item[1]):
            if excess <= 0:
                break
            chosen.append(name)
            excess -= added
        return chosen


def sanitizer_growth(model: onnx.ModelProto) -> SanitizerGrowth:
    """An upper bound on what ``sanitize`` adds to ``model``, from its shapes alone (no sanitizing).

    ``split_concat_and_sum_nodes`` makes a Concat of k inputs k - 1 two-input Concats (a Sum of k, k - 1
    Adds), and ``insert_identity_convs`` may put an identity Conv after each two-input Concat or Add (counted
    for that node) and, for a tensor read m > 2 times, m - 2 identity Convs to leave it two readers (counted
    for its third and later readers); each reads a 4-D float tensor of C <= ``MAX_NUM_CHANNELS`` channels
    and holds a C x C kernel. Counted wherever a rule may fire, so the sanitizer adds at most this much
    (tensors whose channel count is unknown are not counted). An unnamed node is named by its first output,
    as the sanitizer names it.
    """

    vendor()
    from quantizeml.onnx_support.quantization.transforms.insert_identity_convs import MAX_NUM_CHANNELS

    inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model))
    channels: dict[str, int] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        kind = info.type.tensor_type
        if kind.elem_type == onnx.TensorProto.FLOAT and len(kind.shape.dim) == 4:
            channels[info.name] = kind.shape.dim[1].dim_value  # 0 when unknown
    constants = {i.name for i in model.graph.initializer}
    widths: list[tuple[str, int]] = []  # (node, channels) of each identity Conv the sanitizer may insert
    reads: dict[str, int] = {}
    for node in model.graph.node:
        name = node.name or (node.output[0] if node.output else "")
        computed = [t for t in node.input if t and t not in constants]
        for tensor in computed:
            reads[tensor] = reads.get(tensor, 0) + 1
            if reads[tensor] > 2:
                widths.append((name, channels.get(tensor, 0)))
        if node.op_type == "Concat" and len(computed) >= 2:
            width = channels.get(computed[0], 0)
            for tensor in computed[1:]:
                width += channels.get(tensor, 0)
                widths.append((name, width))
        elif node.op_type in ("Add", "Sum") and len(computed) >= 2:
            widths.extend([(name, channels.get(node.output[0], 0))] * (len(computed) - 1))
    by_node: dict[str, int] = {}
    kept = [(name, w) for name, w in widths if 0 < w <= MAX_NUM_CHANNELS]
    for name, w in kept:
        by_node[name] = by_node.get(name, 0) + 4 * w * w
    identity_bytes = sum(by_node.values())
    return SanitizerGrowth(len(kept), identity_bytes, model.ByteSize() + identity_bytes, by_node)


# --- matching --------------------------------------------------------------------------------------------


def _children(node: gs.Node) -> list[gs.Node]:
    return [c for out in node.outputs for c in out.outputs]


def match_block(node: gs.Node, graph_outputs: set[str], patterns: tuple[tuple[str, ...], ...] | None = None,
                ) -> tuple[gs.Node, ...] | None:
    """The nodes quantizeml fuses into one layer starting at ``node`` (``search_block_from_node``), or None."""

    table = vendor()
    for pattern in table.patterns if patterns is None else patterns:
        block = [node]
        for _ in range(len(pattern) - 1):
            last = block[-1]
            if any(t.name in graph_outputs for t in last.outputs[:1]):
                break
            children = _children(last)
            if len(children) != 1:
                break
            block.append(children[0])
        if tuple(table.token(n.op, n.domain) for n in block) == pattern:
            return tuple(block)
    return None


def cover(graph: gs.Graph, order: list[gs.Node] | None = None) -> dict[str, tuple[gs.Node, ...]]:
    """Node name -> the quantizeml block it belongs to; a node no pattern covers is absent.

    The nodes at the model input that the InputQuantizer absorbs form the first block.
    """

    outputs = {t.name for t in graph.outputs}
    blocks: dict[str, tuple[gs.Node, ...]] = {}
    if len(graph.inputs) == 1 and len(graph.inputs[0].outputs) == 1:
        prefix = match_block(graph.inputs[0].outputs[0], outputs, vendor().input_patterns)
        for node in prefix or ():
            blocks[node.name] = prefix
    for node in order if order is not None else topological_order(graph):
        if node.name in blocks:
            continue
        block = match_block(node, outputs)
        for member in block or ():
            blocks.setdefault(member.name, block)
    return blocks


def main_node(block: tuple[gs.Node, ...]) -> gs.Node:
    """The node a block's Akida layer is named after: its first node past any prelude (Flatten, BRNPad)."""

    table = vendor()
    return next((n for n in block if table.token(n.op, n.domain) not in table.prelude_tokens), block[0])


def fused_chain(node: gs.Node, graph: gs.Graph) -> list[gs.Node]:
    """The nodes quantizeml fuses after ``node`` into the layer it starts (MaxPool, activation, GAP after a
    Conv), empty when no pattern starts there."""

    block = match_block(node, {t.name for t in graph.outputs})
    return list(block[1:]) if block else []


def _is_folded_at_input(node: gs.Node) -> bool:
    if node.op in QANAC.folded_at_input:
        return True
    constant = [isinstance(t, gs.Constant) or (t.inputs and t.inputs[0].op == "Constant") for t in node.inputs]
    return node.op in QANAC.constant_folded_at_input and len(node.inputs) == 2 and any(constant)


def input_layer(graph: gs.Graph) -> gs.Node | None:
    """The model's first Akida layer: past what the InputQuantizer absorbs and what the sanitizer folds into
    the first layer, and past a pattern's prelude (the Gemm of Flatten -> Gemm). None when the input feeds
    several nodes (quantizeml takes only an input with one consumer) or nothing computes."""

    if len(graph.inputs) != 1:
        return None
    table = vendor()
    absorbed = {t for p in table.input_patterns for t in p} | table.prelude_tokens
    tensor = graph.inputs[0]
    for _ in range(len(graph.nodes)):
        if len(tensor.outputs) != 1:
            return None
        node = tensor.outputs[0]
        if not (table.token(node.op, node.domain) in absorbed or _is_folded_at_input(node)) or not node.outputs:
            return node
        tensor = node.outputs[0]
    return None


# --- qanac's own additions ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why quantizeml leaves a node unquantized: the lint rule that predicts it, the reason, the way out.

    ``when`` names a condition on the node (``refusal`` evaluates it); None applies always. ``layer``
    marks a refusal of a node a pattern does match (quantizeml matches it, then cannot build the layer).
    """

    code: str
    reason: str
    hint: str
    when: str | None = None
    layer: bool = False


@dataclasses.dataclass(frozen=True)
class QanacTable:
    """qanac's own knowledge of Akida, beside the vendor's table: one declarative record."""

    # Device limits (akida 2.19.3, IP v2), measured with map() on SixNodesIPv2.
    max_gap_pixels: int  # "When using Global Average Pooling, input dimensions width * height cannot exceed 144."
    stride2_kernels: frozenset[int]  # "Stride 2 is only supported with kernel size 1 or 3." (after the input layer)
    # Largest input-channel count measured to fit one CNP, per square kernel size (8-bit weights): 3x3x640
    # maps and 3x3x704 does not; 5x5x192 / 5x5x224; 7x7x64 / 7x7x96. Kernel sizes not measured are not checked.
    max_cnp_input_channels: dict[int, int]
    depthwise_kernels: frozenset[int]  # "Kernel size must be 3, 5 or 7." (depthwise layers in hardware)
    max_dense_inputs: int  # "Input dimensions are too large to fit in a FNP. The maximum value is 2048."
    max_input_conv_filters: int  # "The filters number should be set between 1 and 512." (input layer)
    # cnn2snn's SameUpper padding (padding.py, _check_same_upper_padding_constraints): stride 2 only.
    same_upper_kernels: frozenset[int]
    same_upper_input_kernels: frozenset[int]
    same_upper_stride: int
    # The role of each token that follows a layer's main op in a vendor pattern.
    fused_roles: dict[str, str]
    # Raw ONNX ops the sanitizer turns into a fused activation: Relu and Clip, the LUT activations, and PRelu
    # (a slope shared by all channels becomes LeakyRelu).
    activations: frozenset[str]
    # Ops in front of the first layer that the sanitizer removes: Identity (optimizer), Reshape, Squeeze
    # and Unsqueeze (made Flatten, a prelude, by convert_squeeze_reshape_to_flatten) ...
    folded_at_input: frozenset[str]
    # ... and Sub, Div, Mul, Add by a constant (reorder_ops and align_rescaling fold them into the layer).
    constant_folded_at_input: frozenset[str]
    refusals: dict[str, tuple[Refusal, ...]]
    default_refusal: Refusal


_ACTIVATION_ONLY_FUSED = Refusal(
    "AKD101", "an activation exists on Akida only fused into the Conv/Gemm that feeds it",
    "place the activation directly after a Conv or Gemm")

QANAC = QanacTable(
    max_gap_pixels=144,
    stride2_kernels=frozenset({1, 3}),
    max_cnp_input_channels={3: 640, 5: 192, 7: 64},
    depthwise_kernels=frozenset({3, 5, 7}),
    max_dense_inputs=2048,
    max_input_conv_filters=512,
    same_upper_kernels=frozenset({3}),
    same_upper_input_kernels=frozenset({3, 5, 7}),
    same_upper_stride=2,
    fused_roles={"MaxPool": "pooling", "Relu": "activation", "Clip": "activation", "activation": "activation",
                 "GlobalAveragePool": "global pooling"},
    activations=frozenset({"Relu", "Clip", "Gelu", "Swish", "HardSwish", "LeakyRelu", "PRelu"}),
    folded_at_input=frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze"}),
    constant_folded_at_input=frozenset({"Sub", "Div", "Mul", "Add"}),
    refusals={
        "Sigmoid": (Refusal(
            "AKD102", "a bare Sigmoid has no Akida layer (Sigmoid is accepted only inside x * Sigmoid(x), i.e. "
            "SiLU, directly after a Conv)",
            "replace the gate by a bounded ReLU/Clip(0, 1)-style activation, or run it on the host"),),
        "HardSigmoid": (Refusal(
            "AKD102", "a bare HardSigmoid has no Akida layer (accepted only inside x * HardSigmoid(x), i.e. "
            "HardSwish, directly after a Conv)", "replace it by Clip(0, max) or run it on the host"),),
        "Tanh": (Refusal("AKD102", "Tanh has no Akida layer", "replace it by a ReLU/Clip activation"),),
        "Mul": (
            Refusal("AKD103", "a Mul of two activation tensors (an attention gate such as squeeze-excitation or "
                    "ECA) has no Akida layer; only a Mul by a constant folds into a neighbouring Conv/Gemm",
                    "remove the attention branch, or run it on the host", when="two_tensors"),
            Refusal("AKD101", "a Mul by a constant that could not be folded into a neighbouring Conv/Gemm", ""),
        ),
        "Div": (
            Refusal("AKD103", "a Div of two activation tensors has no Akida layer",
                    "remove the division, or run it on the host", when="two_tensors"),
            Refusal("AKD101", "a Div by a constant that could not be folded into a neighbouring Conv/Gemm", ""),
        ),
        "Clip": (
            Refusal("AKD104", "Clip is supported only as a ReLU-like activation (min = 0) directly after a Conv "
                    "or Gemm", "use Clip(0, max) or ReLU", when="min_not_zero", layer=True),
            Refusal("AKD101", "Clip is supported only as a ReLU-like activation (min = 0) directly after a Conv "
                    "or Gemm", "use Clip(0, max) or ReLU"),
        ),
        "PRelu": (Refusal(
            "AKD101", "PReLU is supported only with one slope shared by all channels, directly after a Conv",
            "use a single shared slope, LeakyRelu, or ReLU"),),
        "Conv": (
            Refusal("AKD106", "dilated convolutions have no Akida layer",
                    "use dilation 1 (a larger kernel or a stride)", when="dilated", layer=True),
            Refusal("AKD105", "grouped convolutions other than depthwise (group == in == out channels) have no "
                    "Akida layer", "use group 1 or a depthwise Conv", when="grouped", layer=True),
        ),
        "Softmax": (Refusal(
            "AKD114", "Softmax has no Akida layer",
            "strip the trailing Softmax (argmax is unchanged) and apply it on the host"),),
        "LogSoftmax": (Refusal("AKD114", "LogSoftmax has no Akida layer", "strip it and apply it on the host"),),
        "AveragePool": (Refusal(
            "AKD112", "only global average pooling exists on Akida (a window over the whole map, fused after a "
            "Conv); a windowed AveragePool has no Akida layer",
            "replace it by a stride-2 Conv or a MaxPool fused after the preceding Conv, or make it global"),),
        "GlobalAveragePool": (Refusal(
            "AKD113", "global average pooling exists on Akida only fused into the Conv [+ activation] that feeds "
            "it, and that Conv's output must have no other consumer",
            "put the GlobalAveragePool directly after a Conv/ReLU whose output feeds nothing else"),),
        "MaxPool": (Refusal(
            "AKD116", "max pooling exists on Akida only fused after a Conv (Conv, MaxPool, activation)",
            "place the MaxPool directly after a Conv whose output feeds nothing else"),),
        "BatchNormalization": (
            Refusal("AKD110", "the model starts with BatchNormalization",
                    "write input normalisation as Sub/Div, or fold it into the first Conv", when="input_layer"),
            Refusal("AKD101", "a BatchNormalization that could not be folded into a neighbouring Conv/Gemm has "
                    "no Akida layer",
                    "place it right after a Conv or Gemm so it folds, or write input normalisation as Sub/Div"),
        ),
        "Relu": (_ACTIVATION_ONLY_FUSED,),
        "activation": (_ACTIVATION_ONLY_FUSED,),
        "Resize": (Refusal(
            "AKD101", "only nearest-neighbour x2 upsampling has an Akida layer (DepthwiseConv2DTranspose)",
            "use Resize(mode='nearest', scale 2)"),),
        "Reshape": (Refusal("AKD101", "a Reshape has no Akida equivalent at this position",
                            "remove it or place it before a Gemm"),),
        "Flatten": (Refusal("AKD101", "a Flatten has an Akida equivalent only before a Gemm",
                            "follow the Flatten by a Gemm"),),
        "Transpose": (Refusal("AKD101", "a Transpose inside the graph has no Akida equivalent",
                              "remove the layout change"),),
        "Cast": (Refusal("AKD101", "a Cast has an Akida equivalent only at the model input",
                         "cast the input once, before the first layer"),),
    },
    default_refusal=Refusal("AKD101", "op {op} has no Akida equivalent",
                            "replace the op in the model, or keep it on the host"),
)


@dataclasses.dataclass(frozen=True)
class NodeFacts:
    """What ``refusal`` needs to know about a node, from a graphsurgeon node or an ONNX NodeProto."""

    op: str
    domain: str
    attrs: dict[str, Any]
    inputs: tuple[np.ndarray | None, ...]  # constant input values; None for a computed (or absent) input
    input_names: tuple[str, ...]
    is_input_layer: bool = False

    @classmethod
    def of(cls, node: gs.Node, is_input_layer: bool = False) -> "NodeFacts":
        from qanac.graph import constant_value

        return cls(node.op, node.domain or "", dict(node.attrs),
                   tuple(constant_value(t) if t.name else None for t in node.inputs),
                   tuple(t.name for t in node.inputs), is_input_layer)

    @classmethod
    def of_proto(cls, node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> "NodeFacts":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return cls(node.op_type, node.domain, attrs, tuple(constants.get(i) if i else None for i in node.input),
                   tuple(node.input))

    def computed_inputs(self) -> int:
        return sum(1 for name, value in zip(self.input_names, self.inputs, strict=True) if name and value is None)


def _condition(facts: NodeFacts, when: str) -> bool:
    if when == "two_tensors":
        return facts.computed_inputs() >= 2
    if when == "min_not_zero":
        low = facts.inputs[1] if len(facts.inputs) > 1 else None
        return low is None or float(np.asarray(low).min()) != 0.0
    if when == "dilated":
        return any(int(d) != 1 for d in facts.attrs.get("dilations", [1, 1]))
    if when == "grouped":
        group = int(facts.attrs.get("group", 1))
        weights = facts.inputs[1] if len(facts.inputs) > 1 else None
        depthwise = weights is not None and weights.ndim == 4 and weights.shape[0] == group and weights.shape[1] == 1
        return group > 1 and not depthwise
    if when == "input_layer":
        return facts.is_input_layer
    raise ValueError(f"unknown refusal condition '{when}'")


def refusal(facts: NodeFacts, *, matched: bool = False) -> Refusal | None:
    """Why quantizeml leaves this node unquantized. ``matched``: a pattern covers the node, so only a refusal
    of its layer (dilation, groups, Clip's minimum) applies; otherwise the node stays unquantized anyway."""

    key = vendor().token(facts.op, facts.domain)
    for entry in QANAC.refusals.get(key, ()):
        if (entry.layer or not matched) and (entry.when is None or _condition(facts, entry.when)):
            return entry
    if matched or has_akida_layer(facts.op, facts.domain):
        return None
    default = QANAC.default_refusal
    return dataclasses.replace(default, reason=default.reason.format(op=facts.op))


def is_intrinsic(entry: Refusal, op: str, domain: str | None = None) -> bool:
    """Whether the refusal holds wherever the node stands: its op has no Akida layer at all, or quantizeml
    cannot build its layer."""

    return entry.layer or not has_akida_layer(op, domain)


def has_akida_layer(op: str, domain: str | None = None) -> bool:
    """Whether quantizeml builds any layer from this op type, in some pattern or at the input."""

    table = vendor()
    return table.token(op, domain) in table.known_ops
