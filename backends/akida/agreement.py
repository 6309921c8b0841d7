"""Akida model vs quantizeml's quantized ONNX: they must agree, and where they do not, Akida is right.

Both are integer pipelines with the same scales, and for every layer type but one they agree bit for bit.
The exception: a Conv with a fused GlobalAveragePool over a large map. Akida saturates the 32-bit post-op
product before the shift, so with large sums the outputs are clipped and top-1 agreement can collapse,
while the quantized ONNX (which does not saturate) still tracks the float model. Verifying only against
the quantized ONNX would pass a broken deployment, so ``compare_akida_to_quantized`` runs both on the
same inputs and flags any disagreement, and ``fused_gap_layers`` names the suspects.

Thresholds are explicit (``qanac.compare.Thresholds``): the two should be identical, so the defaults are
strict: top-1 agreement >= 0.99 and SQNR >= 30 dB, with the quantized ONNX as the reference signal.

The pair compared is the two integer pipelines on the same integers. A float input is quantized twice, by
Akida's Quantizer layer and by the quantized ONNX's InputQuantizer, and the two round ``x * scale`` a
float ulp apart: a product within an ulp of a half (186.49999 on MobileNetV2) becomes 187 in one and 186
in the other, and one such input value in 200,000 can move a random-weight network's output by several
dB. So the Akida layers after the Quantizer run on the quantized ONNX's own integer input
(``integer_input``), and the Quantizer is held to that rounding: its outputs may differ by at most 1
(``INPUT_ROUNDING``), and by more only when its scale or zero point departs.

When they disagree, ``divergent_layers`` finds where: every Akida layer's integer output (from a sub-model
of the layer and its ancestors) against the tensor of the quantized node of the same name. A layer whose
inputs match but whose output does not is where the two part; ``float_nodes_of`` names the float model's
nodes that layer stands for (a fused block: Conv, ReLU, GlobalAveragePool), so the compiler can run them on
the host. The backend never writes a model that disagrees: ``disagreement_error`` is what it raises.

Diagnostic codes:
    AKV301 (warning) the Akida model disagrees with the quantized ONNX at its output (with the fused
           global-pooling layers, the usual cause, as suspects)
    AKV302 (error) the layer where the Akida model departs from the quantized ONNX, by its float nodes
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx

from qanac.compare import OutputComparison, Thresholds, compare_outputs, failures
from qanac.diagnostics import Diagnostic, Level, VerificationError

from .convert import akida_to_float_layout
from .runners import AkidaSoftwareRunner, QuantizedOnnxRunner, quantized_session

STRICT = Thresholds(min_top1_agreement=0.99, min_sqnr_db=30.0)
INPUT_ROUNDING = 1  # the largest difference of the two input quantizers that is rounding, in integer units


@dataclasses.dataclass
class Agreement:
    """The comparison of Akida (actual) against the quantized ONNX (reference) on ``samples`` inputs."""

    samples: int
    comparison: OutputComparison
    exact_share: float  # share of output values that are identical
    thresholds: Thresholds
    problems: list[str]
    suspects: list[dict[str, Any]]
    differing_samples: list[int] = dataclasses.field(default_factory=list)  # whose outputs are not identical
    input_rounding: dict[str, Any] | None = None  # the input quantizers' differences (``IntegerInput``)

    @property
    def flagged(self) -> bool:
        return bool(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "flagged": self.flagged,
            "exact_share": self.exact_share,
            "comparison": self.comparison.to_dict(),
            "thresholds": self.thresholds.to_dict(),
            "problems": self.problems,
            "suspects": self.suspects,
            "differing_samples": len(self.differing_samples),
            "input_rounding": self.input_rounding,
        }

    def diagnostics(self) -> list[Diagnostic]:
        if not self.flagged:
            return []
        names = [s["layer"] for s in self.suspects]
        hint = (
            "the suspects are Convs with a fused GlobalAveragePool over a large map: Akida saturates the "
            "post-op product there; pool in stages (a stride-2 Conv or MaxPool first) so the GAP covers "
            "<= 144 pixels"
            if names
            else "report it with the bundle: the Akida model and the quantized ONNX should be bit-exact"
        )
        return [
            Diagnostic(
                Level.WARNING,
                "AKV301",
                "the Akida model disagrees with quantizeml's quantized ONNX: " + "; ".join(self.problems),
                nodes=names,
                rule="akida-matches-quantized",
                hint=hint,
            )
        ]


def compare_akida_to_quantized(
    akida_runner: AkidaSoftwareRunner,
    quantized: onnx.ModelProto | QuantizedOnnxRunner,
    inputs: dict[str, np.ndarray],
    thresholds: Thresholds = STRICT,
) -> Agreement:
    """Run both models on ``inputs`` and compare Akida (actual) to the quantized ONNX (reference).

    When the Akida model starts with a Quantizer, its other layers run on the quantized ONNX's integer
    input and the Quantizer is compared with it on its own (a problem past ``INPUT_ROUNDING``)."""

    quantized_runner = quantized if isinstance(quantized, QuantizedOnnxRunner) else QuantizedOnnxRunner(quantized)
    reference = quantized_runner.run(inputs)[0]
    model = quantized if isinstance(quantized, onnx.ModelProto) else None
    data = inputs[akida_runner.input_name]
    start = integer_input(akida_runner.model, model, data) if model is not None else None
    if start is None:
        actual = akida_runner.run(inputs)[0]
    else:
        actual = akida_to_float_layout(_predict(start.rest, start.integers, akida_runner.batch_size),
                                       akida_runner.float_output_shape)
    name = akida_runner.output_names[0]
    comparison = compare_outputs([name], [reference], [actual])[0]
    same = reference.reshape(actual.shape) == actual
    exact = float(np.mean(same)) if actual.size else 1.0
    problems = failures([comparison], thresholds)
    if start is not None and start.max_difference > INPUT_ROUNDING:
        problems.append(f"Akida's input Quantizer '{start.layer}' departs from the quantized ONNX's by up to "
                        f"{start.max_difference:g} (more than rounding)")
    return Agreement(
        samples=len(actual),
        comparison=comparison,
        exact_share=exact,
        thresholds=thresholds,
        problems=problems,
        suspects=fused_gap_layers(akida_runner.model),
        differing_samples=[int(i) for i in np.flatnonzero(~same.reshape(len(same), -1).all(axis=1))]
        if actual.size else [],
        input_rounding=None if start is None else start.to_dict(),
    )


@dataclasses.dataclass
class IntegerInput:
    """The quantized ONNX's integer input to the Akida layers after the Quantizer ``layer``, and how far
    Akida's own Quantizer departs from it on the same float inputs."""

    layer: str
    integers: np.ndarray  # (N, H, W, C) or (N, features), the Quantizer's output dtype
    rest: Any  # the Akida model without its Quantizer
    differing_values: int
    max_difference: float

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "differing_values": self.differing_values, "values": int(self.integers.size),
                "max_difference": self.max_difference}


def integer_input(akida_model: Any, quantized: onnx.ModelProto, inputs: np.ndarray) -> IntegerInput | None:
    """``IntegerInput`` for ``inputs`` (float, model layout) when the Akida model's first layer is a
    Quantizer with a quantized node of its name feeding one layer; else None (the model takes integers)."""

    import akida

    layers = list(akida_model.layers)
    first = layers[0] if layers else None
    if first is None or first.parameters.layer_type != akida.LayerType.Quantizer or len(layers) < 2:
        return None
    node = next((n for n in quantized.graph.node if n.name == first.name), None)
    readers = [layer for layer in layers if first.name in {i.name for i in layer.inbounds}]
    if node is None or len(readers) != 1:
        return None
    data = np.ascontiguousarray(inputs, dtype=np.float32)
    integers = _node_outputs(quantized, [node.output[0]], inputs)[0]
    if integers.ndim == 4:
        integers = integers.transpose(0, 2, 3, 1)
    own = akida.Model(layers=[first]).forward(data)
    difference = np.abs(own.astype(np.int64) - integers.reshape(own.shape).astype(np.int64))
    return IntegerInput(layer=first.name, integers=np.ascontiguousarray(integers.reshape(own.shape)),
                        rest=akida.Model(layers=layers[1:]), differing_values=int(np.count_nonzero(difference)),
                        max_difference=float(difference.max()) if difference.size else 0.0)


def _predict(model: Any, integers: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([model.predict(integers[start:start + batch_size])
                           for start in range(0, len(integers), batch_size)])


def fused_gap_layers(model: Any, min_pixels: int = 1) -> list[dict[str, Any]]:
    """Layers of an Akida model that fuse a global average pooling, largest input map first.

    A layer pools globally when its pool type is Average and its output map is 1x1 (akida returns
    ``parameters.pool_type`` as a plain int, hence the int comparison).
    """

    import akida

    found = []
    for layer in model.layers:
        parameters = layer.parameters
        try:
            pool_type = parameters.pool_type
        except (AttributeError, ValueError):
            continue
        height, width = int(layer.input_dims[0]), int(layer.input_dims[1])
        if int(pool_type) == int(akida.PoolType.Average) and list(layer.output_dims[:2]) == [1, 1]:
            if height * width >= min_pixels:
                found.append({"layer": layer.name, "input_map": [height, width], "pixels": height * width})
    return sorted(found, key=lambda entry: -entry["pixels"])


@dataclasses.dataclass
class LayerDivergence:
    """An Akida layer whose inputs match the quantized ONNX but whose output does not, on ``samples`` inputs."""

    layer: str
    samples: int
    exact_share: float  # share of the layer's output values identical to the quantized node's
    max_abs_difference: float  # in the layer's own integer units
    input_map: list[int]  # the layer's input (height, width)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (f"layer '{self.layer}' (input map {self.input_map[0]}x{self.input_map[1]}): "
                f"{self.exact_share:.1%} of its outputs identical, largest difference {self.max_abs_difference:g}")


def divergent_layers(akida_model: Any, quantized: onnx.ModelProto, inputs: np.ndarray) -> list[LayerDivergence]:
    """The layers where the Akida model departs from the quantized ONNX on ``inputs`` (float, model layout).

    Each layer with a quantized node of its name is run as a sub-model of itself and its ancestors and its
    output compared with that node's output tensor: both are the same integers when the two agree. A layer
    differs on its own when it differs and none of its inputs does; layers downstream of a difference are
    not judged, layers without a quantized node of their name are looked through. Layers in model order.
    After an input Quantizer (``integer_input``) the layers run on the quantized ONNX's integer input; the
    Quantizer differs when it departs by more than ``INPUT_ROUNDING``.
    """

    import akida

    nodes = {n.name: n for n in quantized.graph.node}
    layers = list(akida_model.layers)
    data = np.ascontiguousarray(inputs, dtype=np.float32)
    found = []
    start = integer_input(akida_model, quantized, data)
    if start is not None:
        if start.max_difference > INPUT_ROUNDING:
            return [LayerDivergence(layer=start.layer, samples=len(data),
                                    exact_share=1.0 - start.differing_values / max(start.integers.size, 1),
                                    max_abs_difference=start.max_difference,
                                    input_map=[int(d) for d in layers[0].input_dims[:2]])]
        layers, data = layers[1:], start.integers
    compared = [layer.name for layer in layers if layer.name in nodes]
    reference = dict(zip(compared, _node_outputs(quantized, [nodes[name].output[0] for name in compared],
                                                 inputs), strict=True))
    known = {layer.name for layer in layers}
    ancestors: dict[str, set[str]] = {}
    tainted: set[str] = set()  # layers whose output differs, or is computed from one that does
    for layer in layers:
        inbound = [i.name for i in layer.inbounds if i.name in known]
        ancestors[layer.name] = set(inbound).union(*(ancestors[name] for name in inbound))
        if tainted & set(inbound):
            tainted.add(layer.name)
            continue
        if layer.name not in reference:
            continue
        keep = ancestors[layer.name] | {layer.name}
        actual = akida.Model(layers=[x for x in layers if x.name in keep]).forward(data)
        expected = reference[layer.name]
        if expected.ndim == 4:
            expected = expected.transpose(0, 2, 3, 1)
        if expected.size != actual.size:
            continue
        expected = expected.reshape(actual.shape)
        if np.array_equal(expected, actual):
            continue
        tainted.add(layer.name)
        difference = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
        found.append(LayerDivergence(layer=layer.name, samples=len(data), exact_share=float(np.mean(difference == 0)),
                                     max_abs_difference=float(difference.max()),
                                     input_map=[int(d) for d in layer.input_dims[:2]]))
    return found


def _node_outputs(model: onnx.ModelProto, names: list[str], inputs: np.ndarray) -> list[np.ndarray]:
    """The values of tensors ``names`` of the quantized ONNX on ``inputs`` (its only input, given in the
    input's own dtype: float, or the integers of an integer model input)."""

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    session = quantized_session(probe)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    return session.run(names, {session.get_inputs()[0].name: np.ascontiguousarray(inputs, dtype=dtype)})


def float_nodes_of(layer: str, quantized: onnx.ModelProto, model: onnx.ModelProto) -> list[str]:
    """The nodes of the float ``model`` that the quantized node ``layer`` stands for, in model order: those
    computing its output tensor from its activation inputs (a fused block such as Conv, ReLU and
    GlobalAveragePool) back to the tensors of other layers (and no further than the float nodes other
    quantized nodes are named after), else the node of the same name, else none."""

    node = next((n for n in quantized.graph.node if n.name == layer), None)
    if node is None:
        return []
    produced = {out for n in quantized.graph.node for out in n.output}
    graph_inputs = {i.name for i in quantized.graph.input}
    stops = {name for name in node.input if name in produced or name in graph_inputs}
    producer = {out: n for n in model.graph.node for out in n.output}
    block: set[str] = set()
    pending = [node.output[0]]
    while pending:
        tensor = pending.pop()
        source = producer.get(tensor)
        if tensor in stops or source is None or source.name in block:
            continue
        block.add(source.name)
        pending.extend(source.input)
    others = {n.name for n in quantized.graph.node} - {layer}
    if not block or block & others:  # the walk went past the block: its input tensors were renamed
        block = {layer} if any(n.name == layer for n in model.graph.node) else set()
    return [n.name for n in model.graph.node if n.name in block]


def disagreement_error(agreement: Agreement, divergences: list[LayerDivergence],
                       nodes: dict[str, list[str]], diagnostics: list[Diagnostic]) -> VerificationError:
    """The error for an Akida model that disagrees with its quantized ONNX: the output numbers, the layer
    where they part (``nodes``: each divergent layer's float nodes) and what to do; ``diagnostics`` (the
    emit's own) come first."""

    output = "; ".join(agreement.problems)
    if divergences:
        where = "; ".join(d.describe() for d in divergences)
        message = (f"the Akida model disagrees with quantizeml's quantized ONNX ({output}); it departs at "
                   f"{where}")
    else:
        message = (f"the Akida model disagrees with quantizeml's quantized ONNX ({output}); no single layer "
                   f"differs on its own")
    located = [
        Diagnostic(Level.ERROR, "AKV302", f"the Akida model departs from the quantized ONNX here: {d.describe()}",
                   nodes=nodes.get(d.layer, []), rule="akida-matches-quantized",
                   hint="without --no-partition these nodes run on the host")
        for d in divergences
    ]
    return VerificationError(
        message,
        diagnostics=[*diagnostics, *agreement.diagnostics(), *located],
        hint="a Conv fused with a GlobalAveragePool over a large map saturates Akida's accumulator: keep the "
             "stage-global-average-pool pass enabled, or pool in stages (<= 144 pixels per global pool)"
        if any(d.layer in {s["layer"] for s in agreement.suspects} for d in divergences)
        else "report it with the model: the Akida model and the quantized ONNX should be bit-exact",
    )
