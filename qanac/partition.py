"""Host partitioning: what a device cannot run is not dropped, it runs on the host.

The legalized graph is split into segments, each either for the device (compiled by the target's
backend) or for the host (kept as float ONNX and run by ONNX Runtime). Segments run in a fixed order and
pass tensors by name, so the bundle's outputs are the model's outputs in meaning and shape by
construction.

Planning (``plan_segments``):
1. Nodes that lint reports as errors are placed on the host; everything else on the device.
2. Nodes are visited in topological order and cut into maximal runs of one placement.
3. A device run below ``min_device_share`` of the model's MACs (e.g. the 1x1 convs inside an SE gate)
   costs two transfers for next to no compute: it joins the host.
4. A device run with other than one input and one output tensor cannot be one device model: its
   contiguous part (in topological order) with one input and one output tensor and the most MACs stays
   on the device, the rest joins the host, with the reason.
Neighbouring host runs are merged after each step. ``compile_model`` then compiles each device segment;
the nodes a refusal names (UnsupportedModelError: the backend cannot compile them; VerificationError: the
compiled segment disagrees with its own quantized model there) move to the host with the backend's reason,
and planning repeats. Every move is reported as a diagnostic (code PART001/PART002/PART003/PART004), one
per reason listing every node it moves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.utils

from qanac.diagnostics import Diagnostic, Level
from qanac.graph import initializer_names
from qanac.manifest import DEVICE, HOST
from qanac.model_summary import macs_by_node

DEFAULT_MIN_DEVICE_SHARE = 0.01
FULL_SEARCH_NODES = 120  # longer runs: only their prefixes and suffixes are tried as single-tensor parts


@dataclasses.dataclass
class Segment:
    """A run of nodes (names, in topological order) with its boundary tensors."""

    kind: str
    nodes: list[str]
    inputs: list[str] = dataclasses.field(default_factory=list)
    outputs: list[str] = dataclasses.field(default_factory=list)
    macs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"num_nodes": len(self.nodes)}


@dataclasses.dataclass
class PartitionPlan:
    segments: list[Segment]
    total_macs: int
    diagnostics: list[Diagnostic]
    macs_by_node: dict[str, int] = dataclasses.field(default_factory=dict)  # the planned model's

    @property
    def transfers(self) -> int:
        """Host <-> device hand-overs while running the bundle once."""

        return sum(1 for a, b in zip(self.segments, self.segments[1:], strict=False) if a.kind != b.kind)

    @property
    def device_macs(self) -> int:
        return sum(s.macs for s in self.segments if s.kind == DEVICE)


def _runs(order: list[onnx.NodeProto], placement: dict[str, str]) -> list[list[onnx.NodeProto]]:
    runs: list[list[onnx.NodeProto]] = []
    for node in order:
        if runs and placement[runs[-1][0].name] == placement[node.name]:
            runs[-1].append(node)
        else:
            runs.append([node])
    return runs


@dataclasses.dataclass
class _Tensors:
    """A model's tensors as boundaries ask about them, indexed once: its constants, the nodes reading each
    tensor, its outputs."""

    constants: set[str]
    readers: dict[str, set[str]]
    graph_outputs: set[str]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Tensors:
        readers: dict[str, set[str]] = {}
        for node in model.graph.node:
            for name in node.input:
                readers.setdefault(name, set()).add(node.name)
        return cls(initializer_names(model), readers, {o.name for o in model.graph.output})

    def boundaries(self, nodes: list[onnx.NodeProto]) -> tuple[list[str], list[str]]:
        """Tensors a run reads from outside (not constants) and tensors it writes that are used outside."""

        inside = {n.name for n in nodes}
        produced = {out for n in nodes for out in n.output}
        inputs: list[str] = []
        for n in nodes:
            for name in n.input:
                if name and name not in produced and name not in self.constants and name not in inputs:
                    inputs.append(name)
        outputs = [name for n in nodes for name in n.output
                   if name in self.graph_outputs or not self.readers.get(name, set()) <= inside]
        return inputs, outputs


def _largest_single_tensor_part(tensors: _Tensors, run: list[onnx.NodeProto],
                                macs: dict[str, int]) -> tuple[int, int] | None:
    """(first, last) index of the contiguous part of ``run`` with one input and one output tensor and the
    most MACs (at least one), or None."""

    n = len(run)
    cumulative = np.concatenate([[0], np.cumsum([macs.get(node.name, 0) for node in run])])
    if n <= FULL_SEARCH_NODES:
        candidates = [(i, j) for i in range(n) for j in range(i, n)]
    else:
        candidates = [(0, j) for j in range(n)] + [(i, n - 1) for i in range(1, n)]
    candidates = [c for c in candidates if c != (0, n - 1) and cumulative[c[1] + 1] > cumulative[c[0]]]
    candidates.sort(key=lambda c: (-(cumulative[c[1] + 1] - cumulative[c[0]]), c[0] - c[1]))  # longer on ties
    for first, last in candidates:
        inputs, outputs = tensors.boundaries(run[first:last + 1])
        if len(inputs) == 1 and len(outputs) == 1:
            return first, last
    return None


def plan_segments(
    model: onnx.ModelProto,
    host_nodes: dict[str, str],
    min_device_share: float = DEFAULT_MIN_DEVICE_SHARE,
    macs: dict[str, int] | None = None,
) -> PartitionPlan:
    """Place ``host_nodes`` (name -> reason) on the host and cut the graph into segments.

    ``model`` must be topologically sorted with unique node names (qanac's pipeline guarantees both).
    ``macs`` is ``macs_by_node(model)`` when the caller plans the same model more than once.
    """

    order = list(model.graph.node)
    placement = {n.name: (HOST if n.name in host_nodes else DEVICE) for n in order}
    macs = macs_by_node(model) if macs is None else macs
    tensors = _Tensors.of(model)
    total = sum(macs.values())
    by_reason: dict[str, list[str]] = {}
    for name, reason in host_nodes.items():
        by_reason.setdefault(reason, []).append(name)
    diagnostics = [
        Diagnostic(Level.INFO, "PART001", f"on the host: {reason} ("
                   + (f"node '{names[0]}')" if len(names) == 1 else f"{len(names)} nodes from '{names[0]}')"),
                   nodes=names, rule="partition")
        for reason, names in by_reason.items()
    ]

    changed = True
    while changed:
        changed = False
        for run in _runs(order, placement):
            if placement[run[0].name] != DEVICE:
                continue
            run_macs = sum(macs.get(n.name, 0) for n in run)
            inputs, outputs = tensors.boundaries(run)
            reason = None
            if total and run_macs < min_device_share * total and len(run) < len(order):
                reason = (f"a device segment of {run_macs:,} MACs ({run_macs / total:.2%} of the model) is not "
                          f"worth its transfers (--min-device-share {min_device_share})")
                code = "PART002"
            elif len(inputs) != 1 or len(outputs) != 1:
                kept = _largest_single_tensor_part(tensors, run, macs)
                reason = (f"a device segment needs one input and one output tensor; these nodes would need "
                          f"inputs {inputs} and outputs {outputs}")
                if kept is not None:
                    reason += (f"; the part from '{run[kept[0]].name}' to '{run[kept[1]].name}' has one of each "
                               f"and stays on the device")
                    run = run[:kept[0]] + run[kept[1] + 1:]
                code = "PART003"
            if reason is not None:
                for n in run:
                    placement[n.name] = HOST
                names = [n.name for n in run]
                diagnostics.append(Diagnostic(Level.INFO, code, f"on the host: {reason} ({len(run)} node(s) "
                                              f"from '{names[0]}' to '{names[-1]}')", nodes=names,
                                              rule="partition"))
                changed = True
                break

    segments = []
    for run in _runs(order, placement):
        inputs, outputs = tensors.boundaries(run)
        segments.append(Segment(placement[run[0].name], [n.name for n in run], inputs, outputs,
                                sum(macs.get(n.name, 0) for n in run)))
    return PartitionPlan(segments, total, diagnostics, macs)


def extract_segment(model: onnx.ModelProto, segment: Segment, shapes_inferred: bool = False) -> onnx.ModelProto:
    """The segment as a standalone ONNX model (its boundary tensors become graph inputs and outputs).
    ``shapes_inferred``: ``model`` already carries its inferred shapes (value_info), so they are not
    inferred again."""

    inferred = model if shapes_inferred else onnx.shape_inference.infer_shapes(model)
    extracted = onnx.utils.Extractor(inferred).extract_model(segment.inputs, segment.outputs)
    kept = {n.name for n in extracted.graph.node}
    if kept != set(segment.nodes):
        missing = sorted(set(segment.nodes) - kept)[:3]
        extra = sorted(kept - set(segment.nodes))[:3]
        raise ValueError(f"segment extraction mismatch: missing {missing}, extra {extra}")
    del extracted.metadata_props[:]
    extracted.metadata_props.extend(model.metadata_props)
    return extracted
