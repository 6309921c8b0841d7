"""What a model is made of: inputs, outputs, op histogram, parameter count and MACs per node.

MACs are per sample (batch 1) and counted for the ops that dominate CNN compute: Conv, ConvTranspose,
Gemm, MatMul. Shapes come from ONNX shape inference on a copy of the model.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference


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
        inferred = shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {v.name: _static(_shape_of(v)) for v in values if v.type.tensor_type.HasField("shape")}


def macs_by_node(model: onnx.ModelProto) -> dict[str, int]:
    shapes = infer_shapes(model)
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
