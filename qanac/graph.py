"""The model as it moves through the compiler: an onnx-graphsurgeon graph plus what travels with it.

The graph is mutable and shared by every pass; it is serialized to a ModelProto only at the edges
(backends, dumps, ONNX Runtime checks). Information that onnx-graphsurgeon does not keep on nodes
(source names from the original framework, which pass created a node, the post-processing stripped
from the end of the graph) lives here, keyed by node name.

Derived node names: a pass that replaces node ``conv1`` names the new nodes ``conv1::<rule>`` (or
``conv1::<rule>:<i>``), so every node can be traced back to a node of the input model and its source.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from qanac.calibration import InputSpec
from qanac.diagnostics import UsageError

SOURCE_NAMES_KEY = "qanac.source_names"
POST_PROCESSING_KEY = "qanac.post_processing"


def derived_name(original: str, rule: str, index: int | None = None) -> str:
    """Name for a node a rewrite creates from ``original`` (see module docstring)."""

    base = original.split("::", 1)[0]
    return f"{base}::{rule}" if index is None else f"{base}::{rule}:{index}"


def original_name(name: str) -> str:
    return name.split("::", 1)[0]


def lookup_source(source_names: dict[str, str], node_name: str) -> str:
    """The original framework's name for a node, or for the node it was derived from ("" if unknown)."""

    return source_names.get(node_name) or source_names.get(original_name(node_name), "")


def source_names_of(model: onnx.ModelProto) -> dict[str, str]:
    """The node-name -> framework-name table a qanac model carries in its metadata."""

    value = next((p.value for p in model.metadata_props if p.key == SOURCE_NAMES_KEY), "{}")
    return json.loads(value)


@dataclasses.dataclass
class CompilationModel:
    """The graph being compiled and the side tables that onnx-graphsurgeon cannot hold."""

    graph: gs.Graph
    source_names: dict[str, str] = dataclasses.field(default_factory=dict)
    provenance: dict[str, str] = dataclasses.field(default_factory=dict)  # node name -> pass that made it
    post_processing: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    ir_version: int | None = None
    producer: str = ""
    # the ModelProto the graph was imported from, while the graph is known to be unchanged since: set by
    # from_onnx, dropped by replace_graph and by the pipeline after a pass changed the graph
    source: onnx.ModelProto | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def from_onnx(cls, model: onnx.ModelProto) -> "CompilationModel":
        metadata = {p.key: p.value for p in model.metadata_props}
        sources = json.loads(metadata.get(SOURCE_NAMES_KEY, "{}"))
        for node in model.graph.node:
            for prop in node.metadata_props:
                if prop.key in ("pkg.torch.onnx.name_scopes", "namespace") and node.name not in sources:
                    sources[node.name] = prop.value
        post = json.loads(metadata.get(POST_PROCESSING_KEY, "[]"))
        graph = gs.import_onnx(model)
        return cls(
            graph=graph,
            source_names=sources,
            post_processing=post,
            ir_version=model.ir_version,
            producer=model.producer_name,
            source=model,
        )

    def to_onnx(self, *, check: bool = False) -> onnx.ModelProto:
        model = gs.export_onnx(self.graph, do_type_check=False)
        model.producer_name = self.producer or "qanac"
        del model.metadata_props[:]
        if self.source_names:
            onnx.helper.set_model_props(
                model,
                {
                    SOURCE_NAMES_KEY: json.dumps(self.source_names, sort_keys=True),
                    **({POST_PROCESSING_KEY: json.dumps(self.post_processing)} if self.post_processing else {}),
                },
            )
        elif self.post_processing:
            onnx.helper.set_model_props(model, {POST_PROCESSING_KEY: json.dumps(self.post_processing)})
        if check:
            onnx.checker.check_model(model)
        return model

    def replace_graph(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.source = None

    def source_of(self, node_name: str) -> str:
        """The original framework's name for a node (or for the node it was derived from)."""

        return lookup_source(self.source_names, node_name)

    def record(self, node: gs.Node, rule: str) -> None:
        self.provenance[node.name] = rule

    def clone(self) -> "CompilationModel":
        return CompilationModel(
            graph=self.graph.copy(),
            source_names=dict(self.source_names),
            provenance=dict(self.provenance),
            post_processing=copy.deepcopy(self.post_processing),
            ir_version=self.ir_version,
            producer=self.producer,
            source=self.source,
        )


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file, turning every way it can be unreadable into a UsageError."""

    path = Path(path)
    if not path.exists():
        raise UsageError(f"model not found: {path}", hint="check the path of the .onnx file")
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not an ONNX file", hint="give the path of an .onnx file")
    if not path.is_file():  # a FIFO, socket or device: reading it may block forever
        raise UsageError(f"{path} is not a regular file (a FIFO, socket or device)",
                         hint="give the path of an .onnx file")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, OSError, RuntimeError, onnx.checker.ValidationError) as exc:  # external data
        raise UsageError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})",
                         hint="give a file written by onnx.save; its external data files must lie in its folder") \
            from exc
    if not model.graph.node and not model.graph.output:
        raise UsageError(f"{path} is not a readable ONNX model (empty or truncated graph)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"{path} is not a valid ONNX model: {first}") from exc
    return model


def save_onnx(model: onnx.ModelProto, path: str | Path) -> None:
    onnx.save(model, str(path))


def initializer_names(model: onnx.ModelProto) -> set[str]:
    return {init.name for init in model.graph.initializer}


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real (non-initializer) inputs with fixed shapes; a dynamic dim other than batch is an error."""

    inits = initializer_names(model)
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = []
        for i, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            elif i == 0:
                shape.append(1)
            else:
                raise UsageError(
                    f"input '{value.name}' has a dynamic dimension {i} ('{dim.dim_param or '?'}')",
                    hint="fix it with --input-shape NAME:1,3,64,64 (or 1,3,64,64 for a single input)",
                )
        elem = value.type.tensor_type.elem_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "float32"
        specs.append(InputSpec(name=value.name, shape=tuple(shape), dtype=dtype))
    return specs


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a tensor if it is a constant (initializer or Constant node output)."""

    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return value.values
    return None


def single_consumer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.outputs[0] if len(tensor.outputs) == 1 else None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def nodes_of(graph: gs.Graph, ops: Iterable[str]) -> list[gs.Node]:
    """A snapshot list of nodes with one of ``ops``, safe to iterate while editing the graph."""

    wanted = set(ops)
    return [node for node in graph.nodes if node.op in wanted]


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` instead (graph outputs are not touched).

    Edges move by identity (see ``_remove_identical``), never by node comparison.
    """

    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                _remove_identical(old.outputs, consumer)
                list.__setitem__(consumer.inputs, i, new)
                list.append(new.outputs, consumer)


def _remove_identical(items: list, obj: object) -> None:
    """Remove the first element of ``items`` that *is* ``obj``, bypassing any list subclass override.

    onnx-graphsurgeon's synchronized lists remove by ``==``, and node equality compares names, attributes,
    inputs and outputs; on a tensor read by many nodes (parameters shared between layers) that scan is
    what makes a long run of removals quadratic.
    """

    if not items:
        return
    if items[0] is obj:
        index = 0
    elif items[-1] is obj:
        index = len(items) - 1
    else:
        try:
            index = list(map(id, items)).index(id(obj))
        except ValueError:
            return
    list.__delitem__(items, index)


def disconnect(node: gs.Node) -> None:
    """Detach ``node`` from every tensor it reads or writes; the node keeps no inputs or outputs.

    The same as ``node.inputs.clear(); node.outputs.clear()`` with removal by identity: no node is
    compared, and removing the nodes that share a tensor in (or against) their order on it costs constant
    time per edge, however many nodes share it.
    """

    for tensor in node.inputs:
        _remove_identical(tensor.outputs, node)
    for tensor in node.outputs:
        _remove_identical(tensor.inputs, node)
    list.clear(node.inputs)
    list.clear(node.outputs)


class _TensorNames:
    """The tensor names taken in one graph, kept up to date as nodes are appended.

    Built with one walk over ``graph.tensors()``. Tensors on nodes appended to ``graph.nodes`` since the
    last look are added by scanning only those nodes; when ``graph.nodes`` was replaced or shrank the
    walk is redone. Every name handed out stays taken, attached to the graph or not. Tensors attached by
    hand to nodes that were already in the graph are seen after ``refresh_tensor_names`` (the pipeline
    calls it before every pass).
    """

    def __init__(self, graph: gs.Graph):
        self.taken: set[str] = set(graph.tensors().keys())
        self.next_suffix: dict[str, int] = {}
        self.nodes = graph.nodes
        self.scanned = len(graph.nodes)

    def catch_up(self, graph: gs.Graph) -> bool:
        """Take the names of tensors on newly appended nodes; False when a full rebuild is needed."""

        if graph.nodes is not self.nodes or len(graph.nodes) < self.scanned:
            return False
        for node in graph.nodes[self.scanned:]:
            self.taken.update(t.name for t in node.inputs)
            self.taken.update(t.name for t in node.outputs)
        self.scanned = len(graph.nodes)
        return True

    def fresh(self, base: str) -> str:
        name = base
        if name in self.taken:
            i = self.next_suffix.get(base, 1)
            while f"{base}_{i}" in self.taken:
                i += 1
            self.next_suffix[base] = i + 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


_NAMES_ATTR = "_qanac_tensor_names"


def fresh_tensor_name(graph: gs.Graph, base: str) -> str:
    """``base`` if no tensor of ``graph`` is called that, else ``base_1``, ``base_2``...

    The name is also distinct from every name this function returned before for ``graph``, attached or
    not. Amortized cost is constant per name (see ``_TensorNames`` for what keeps the index current).
    """

    names = vars(graph).get(_NAMES_ATTR)
    if names is None or not names.catch_up(graph):
        names = _TensorNames(graph)
        vars(graph)[_NAMES_ATTR] = names
    return names.fresh(base)


def refresh_tensor_names(graph: gs.Graph) -> None:
    """Forget the name index of ``graph``: the next fresh name walks the graph again."""

    vars(graph).pop(_NAMES_ATTR, None)


def bypass_node(graph: gs.Graph, node: gs.Node, keep_input: int = 0) -> bool:
    """Remove a single-output node by wiring its consumers to one of its inputs.

    When the node's output is a graph output, the producer of the kept input is made to write the
    graph output directly, so output names never change. That is impossible when the kept input is a
    graph input, a constant or used elsewhere; then the node stays and False is returned.
    """

    source = node.inputs[keep_input]
    result = node.outputs[0]
    if is_graph_output(graph, result):
        producer = source.inputs[0] if source.inputs else None
        if producer is None or len(source.outputs) != 1 or is_graph_output(graph, source):
            return False
        index = next(i for i, t in enumerate(producer.outputs) if t is source)
        producer.outputs[index] = result
    else:
        replace_uses(result, source)
    disconnect(node)
    return True
