"""What a model is made of: inputs, outputs, op histogram, parameter count and MACs per node.

MACs are per sample (batch 1) and counted for the ops that dominate CNN compute: Conv, ConvTranspose,
Gemm, MatMul. Shapes come from ONNX shape inference on a copy of the model. ``macs_by_node`` is the one
MAC count of qanac: `qanac inspect`, the compile report, the partition and the manifest all use it.

``source_macs_by_segment`` carries the source model's MACs (the imported model after canonicalization)
over to the segments of the legalized model, through the node names the rewrites derive from the
source's (``qanac.graph.derived_name``). ``format_share`` and ``format_macs`` are how shares and counts
are printed: a share below 1 never prints as 100.0 %.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from qanac.graph import original_name


@dataclasses.dataclass
class ModelSummary:
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int
    ops: dict[str, int]
    parameters: int
    macs: int
    macs_by_node: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        lines = [f"opset {self.opset}"]
        for kind, values in (("input", self.inputs), ("output", self.outputs)):
            for v in values:
                lines.append(f"{kind:6} {v['name']}: {v['dtype']}{v['shape']}")
        lines.append(f"parameters {self.parameters:,}")
        lines.append(f"MACs/sample {self.macs:,}")
        lines.append("ops:")
        width = max((len(op) for op in self.ops), default=0)
        for op, n in sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {op:<{width}}  {n}")
        return "\n".join(lines)


def _shape_of(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _dtype_of(value: onnx.ValueInfoProto) -> str:
    elem = value.type.tensor_type.elem_type
    return onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "?"


def _static(shape: list[int | str]) -> list[int]:
    """Shape with symbolic dims read as 1 (the batch)."""

    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


def node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]], weights: dict[str, np.ndarray]) -> int:
    """Multiply-accumulates of one node per sample; 0 for ops not counted or shapes not known."""

    def shape(name: str) -> list[int] | None:
        if name in weights:
            return list(weights[name].shape)
        return shapes.get(name)

    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
        w, y, x = shape(node.input[1]), shape(node.output[0]), shape(node.input[0])
        if w is None or y is None or x is None:
            return 0
        if node.op_type == "Conv":
            # each output element: Cin/group * prod(kernel) MACs
            return int(np.prod(_static(y)[1:]) * np.prod(w[1:]))
        # ConvTranspose: each input element scatters Cout/group * prod(kernel)
        return int(np.prod(_static(x)[1:]) * np.prod(w[1:]))
    if node.op_type in ("Gemm", "MatMul"):
        a, y = shape(node.input[0]), shape(node.output[0])
        if a is None or y is None:
            return 0
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[-2] if (node.op_type == "Gemm" and trans_a) else a[-1]
        return int(np.prod(_static(y)[1:]) * k) if len(y) > 1 else int(y[0] * k)
    return 0


def infer_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    try:
        inferred = shape_inference.infer_shapes(shape_skeleton(model), strict_mode=False)
    except Exception:
        inferred = model
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {v.name: _static(_shape_of(v)) for v in values if v.type.tensor_type.HasField("shape")}


def macs_by_node(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> dict[str, int]:
    """MACs per node name; ``shapes`` (``infer_shapes`` of ``model``) when the caller has them already."""

    shapes = infer_shapes(model) if shapes is None else shapes
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return {n.name or f"{n.op_type}_{i}": node_macs(n, shapes, weights) for i, n in enumerate(model.graph.node)}


def summarize(model: onnx.ModelProto) -> ModelSummary:
    inits = {init.name for init in model.graph.initializer}
    params = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    per_node = macs_by_node(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelSummary(
        inputs=[
            {"name": v.name, "shape": _shape_of(v), "dtype": _dtype_of(v)}
            for v in model.graph.input
            if v.name not in inits
        ],
        outputs=[{"name": v.name, "shape": _shape_of(v), "dtype": _dtype_of(v)} for v in model.graph.output],
        opset=opset,
        ops=dict(collections.Counter(n.op_type for n in model.graph.node)),
        parameters=params,
        macs=sum(per_node.values()),
        macs_by_node={k: v for k, v in per_node.items() if v},
    )


# Float initializers with more elements than this reach shape inference as typed inputs, without their data
SKELETON_MIN_ELEMENTS = 1024


def shape_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as shape inference needs it: its large float initializers (weights) become graph inputs of
    the same type and shape, so their data is neither copied nor serialised; integer and small initializers
    (shape operands such as a Reshape's target) keep their values. Shapes inferred are the same."""

    kept, typed = [], []
    for init in model.graph.initializer:
        if init.data_type in _FLOAT_TYPES and math.prod(init.dims) > SKELETON_MIN_ELEMENTS:
            typed.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            kept.append(init)
    if not typed:
        return model
    graph = onnx.helper.make_graph(model.graph.node, model.graph.name, [*model.graph.input, *typed],
                                   model.graph.output, kept, value_info=model.graph.value_info)
    skeleton = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    skeleton.functions.extend(model.functions)
    return skeleton


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def source_macs_by_segment(source: dict[str, int], legalized: dict[str, int], segments: list[list[str]]) -> list[int]:
    """The source model's MACs each segment computes, summing to the source's total.

    ``source`` and ``legalized`` are ``macs_by_node`` of the source and of the legalized model; ``segments``
    are the legalized model's node names by segment. A source node's MACs go to the legalized nodes that
    carry its name or a name derived from it, split by their MACs (by their count when none has MACs); the
    MACs of source nodes no legalized node derives from are split by the segments' legalized MACs of
    nodes with no source, or else by all legalized MACs. Rewrites that add MACs (a grouped conv made
    dense) therefore add none here.
    """

    source_by_base: dict[str, int] = collections.Counter()
    for name, macs in source.items():
        source_by_base[original_name(name)] += macs
    legalized_by_base: dict[str, int] = collections.Counter()
    nodes_by_base: dict[str, int] = collections.Counter()
    for name in (n for nodes in segments for n in nodes):
        legalized_by_base[original_name(name)] += legalized.get(name, 0)
        nodes_by_base[original_name(name)] += 1
    shares = [0.0] * len(segments)
    orphans = [0] * len(segments)  # legalized MACs of nodes with no source node
    for index, nodes in enumerate(segments):
        for name in nodes:
            b, macs = original_name(name), legalized.get(name, 0)
            if b not in source_by_base:
                orphans[index] += macs
            elif legalized_by_base[b]:
                shares[index] += source_by_base[b] * macs / legalized_by_base[b]
            else:
                shares[index] += source_by_base[b] / nodes_by_base[b]
    unplaced = sum(m for b, m in source_by_base.items() if b not in nodes_by_base)
    if unplaced:
        weights = next(w for w in (orphans, [sum(legalized.get(n, 0) for n in nodes) for nodes in segments],
                                   [len(nodes) for nodes in segments]) if sum(w))
        shares = [s + unplaced * w / sum(weights) for s, w in zip(shares, weights, strict=True)]
    counts = [math.floor(s) for s in shares]
    remainder = sum(source.values()) - sum(counts)  # rounding: to the segments with the largest fractions
    for index in sorted(range(len(counts)), key=lambda i: counts[i] - shares[i])[:max(remainder, 0)]:
        counts[index] += 1
    return counts


def format_share(share: float) -> str:
    """``share`` (0..1) as a percentage with one decimal, rounded down: only a share of 1 prints 100.0 %."""

    return f"{math.floor(share * 1000 + 1e-9) / 10:.1f} %"


def format_macs(macs: int) -> str:
    """A MAC count as people read it: 94.3 M, 1.2 G, 812 k, 37."""

    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(macs) >= scale:
            return f"{macs / scale:.1f} {unit}"
    return str(macs)
