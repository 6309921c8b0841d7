"""Shape inference: every tensor gets a dtype and a static shape (the batch dimension may stay dynamic).

qanac's rewrites compute padding, broadcast shapes and channel counts from tensor shapes, and its
targets have fixed-size inputs, so a dimension other than the batch that stays unknown is a user-facing
error naming the tensor, with the way out (``--input-shape``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.shape_inference
import onnx_graphsurgeon as gs

from qanac.diagnostics import Diagnostic, Level, UsageError
from qanac.execution import make_session
from qanac.graph import CompilationModel
from qanac.passes.constants import foldable_nodes
from qanac.pipeline import PassContext
from qanac.registry import PassResult, register_pass
from qanac.rewrite import node_label

INPUT_SHAPE_HINT = "fix it with --input-shape NAME:1,3,64,64 (or 1,3,64,64 for a single input)"


@register_pass("infer-shapes")
def infer_shapes(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Run ONNX shape inference (strict, with data propagation) and record what it learns on the graph.

    Only knowledge is added: a tensor's dtype or shape is updated when inference knows more than the
    graph did, and the pass reports a change only then, so it converges. Value-info that contradicts
    inference (stale, from an exporter) is replaced, with a warning; when strict inference fails even
    without it, shapes are inferred leniently, with a warning naming the failure. Shapes agree with ONNX
    Runtime: a ceil_mode pooling whose last window would start in the end padding is sized without it,
    as ONNX Runtime sizes it (ONNX inference keeps it). Dimensions ONNX inference loses to a symbolic
    batch are learned by inferring with the batch fixed to 2 and 3; what ONNX inference cannot compute
    at all (shape arithmetic it does not evaluate, such as PyTorch's chunk) is measured by running the
    model in ONNX Runtime at two batch sizes, except after data-dependent ops. Invariant: graph inputs
    have static shapes except the batch dimension, else UsageError; once no constant folding can teach
    more, every tensor has a static shape except its batch dimension, else UsageError naming the tensors.
    """

    result = PassResult()
    graph = model.graph
    _check_inputs(model)
    inferred, mode, failure, patched = _infer_like_onnxruntime(model.to_onnx())
    if mode != STRICT:
        message = {
            WITHOUT_VALUE_INFO: f"stale shape annotations were replaced by inferred shapes ({failure})",
            LENIENT: f"strict ONNX shape inference failed, shapes were inferred leniently ({failure})",
        }[mode]
        warning = Diagnostic(
            Level.WARNING,
            "SHP003",
            message,
            pass_name="infer-shapes",
            hint="check the shapes the model declares against what its nodes compute",
        )
        if warning not in ctx.diagnostics:  # said once, not once per sweep
            result.diagnostics.append(warning)
    overwrite = mode != STRICT

    learned = gs.import_onnx(inferred).tensors()
    for name, tensor in graph.tensors().items():
        new = learned.get(name)
        if not isinstance(tensor, gs.Variable) or not isinstance(new, gs.Variable):
            continue
        if _knows_more(new, tensor, overwrite):
            tensor.dtype = new.dtype if new.dtype is not None else tensor.dtype
            tensor.shape = new.shape if new.shape is not None else tensor.shape
            result.count("learn-shape")

    unresolved = [t for t in graph.tensors().values() if isinstance(t, gs.Variable) and _unresolved(t)]
    if unresolved and _has_dynamic_batch(graph):
        learned_from_probes = _resolve_with_batch_probes(patched, unresolved)
        if learned_from_probes:
            result.count("learn-shape", learned_from_probes)
            unresolved = [t for t in unresolved if _unresolved(t)]
    if unresolved:
        learned_from_runs = _resolve_with_onnxruntime(model.to_onnx(), unresolved)
        if learned_from_runs:
            result.count("learn-shape", learned_from_runs)
            unresolved = [t for t in unresolved if _unresolved(t)]
    if unresolved:
        if not foldable_nodes(graph):
            raise UsageError(
                f"{len(unresolved)} tensor(s) have no static shape: "
                + ", ".join(f"'{t.name}' {_describe(t)}" for t in unresolved[:5])
                + (", ..." if len(unresolved) > 5 else ""),
                diagnostics=[_unresolved_diagnostic(model, t) for t in unresolved],
                hint="qanac needs static shapes except the batch dimension; if they follow from a dynamic "
                "input, " + INPUT_SHAPE_HINT + "; data-dependent shapes (NonZero, dynamic Reshape) are "
                "not supported",
            )
        result.details["unresolved_shapes"] = [t.name for t in unresolved]
    return result


STRICT, WITHOUT_VALUE_INFO, LENIENT = "strict", "strict without value_info", "lenient"


def _infer(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str, str]:
    """Infer shapes strictly, then strictly without the model's intermediate value_info (stale exporter
    annotations), then leniently (ONNX's inference has gaps ONNX Runtime does not).

    Returns the inferred model, the mode that succeeded and the first strict failure.
    """

    def run(model: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=strict, data_prop=True)

    errors = (onnx.shape_inference.InferenceError, onnx.checker.ValidationError)
    try:
        return run(proto, True), STRICT, ""
    except errors as exc:
        failure = _first_line(exc)
    del proto.graph.value_info[:]
    try:
        return run(proto, True), WITHOUT_VALUE_INFO, failure
    except errors as exc:
        failure = _first_line(exc)
    try:
        return run(proto, False), LENIENT, failure
    except errors as exc:
        raise UsageError(f"ONNX shape inference failed: {_first_line(exc)}") from exc


# Poolings whose output size ONNX shape inference and ONNX Runtime compute differently with ceil_mode.
CEIL_MODE_POOLS = ("MaxPool", "AveragePool")


def pool_output_size(size: int, kernel: int, stride: int, begin: int, end: int, dilation: int, ceil_mode: bool,
                     drop_last: bool = True) -> int:
    """The output size of a pooling along one axis, as ONNX Runtime computes it.

    With ceil_mode a last window that would start in the end padding (at or after ``size + begin``) is
    dropped (``drop_last``), as ONNX Runtime (and PyTorch) do; ONNX shape inference keeps it.
    """

    span = size + begin + end - ((kernel - 1) * dilation + 1)
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if drop_last and (out - 1) * stride >= size + begin else out


def _attribute(node: onnx.NodeProto, name: str, default):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else onnx.helper.get_attribute_value(found)


def _ceil_mode_patches(proto: onnx.ModelProto, shapes: dict[str, list]) -> dict[int, list[int]]:
    """For every ceil_mode pooling of ``proto`` whose input size ``shapes`` knows and whose output size
    ONNX shape inference gets wrong (it keeps a last window ONNX Runtime drops): the pads of the
    ceil_mode=0 pooling with ONNX Runtime's output size (end pads (out - 1) * stride + extent - size -
    begin, at least 0), by node index."""

    patches = {}
    for index, node in enumerate(proto.graph.node):
        if node.op_type not in CEIL_MODE_POOLS or int(_attribute(node, "ceil_mode", 0)) != 1:
            continue
        auto_pad = _attribute(node, "auto_pad", b"NOTSET")
        if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
            continue
        dims = shapes.get(node.input[0])
        kernel = [int(k) for k in _attribute(node, "kernel_shape", [])]
        rank = len(kernel)
        if not dims or len(dims) != rank + 2 or not all(_is_static(d) for d in dims[2:]):
            continue
        strides = [int(v) for v in _attribute(node, "strides", [1] * rank)]
        dilations = [int(v) for v in _attribute(node, "dilations", [1] * rank)]
        pads = [int(v) for v in _attribute(node, "pads", [0] * (2 * rank))]
        sizes = dims[2:]
        outs = [pool_output_size(sizes[i], kernel[i], strides[i], pads[i], pads[rank + i], dilations[i], True)
                for i in range(rank)]
        kept = [pool_output_size(sizes[i], kernel[i], strides[i], pads[i], pads[rank + i], dilations[i], True,
                                 drop_last=False) for i in range(rank)]
        if outs != kept:
            patches[index] = pads[:rank] + [
                max(0, (outs[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - sizes[i] - pads[i])
                for i in range(rank)
            ]
    return patches


def _patched(proto: onnx.ModelProto, patches: dict[int, list[int]]) -> onnx.ModelProto:
    """A copy of ``proto`` with each patched pooling made ceil_mode=0 with the patch's pads."""

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for index, pads in patches.items():
        node = copy.graph.node[index]
        for attribute in [a for a in node.attribute if a.name in ("ceil_mode", "pads")]:
            node.attribute.remove(attribute)
        node.attribute.extend([onnx.helper.make_attribute("ceil_mode", 0), onnx.helper.make_attribute("pads", pads)])
    return copy


def _known_shapes(proto: onnx.ModelProto) -> dict[str, list]:
    shapes = {}
    for value in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    return shapes


def _infer_like_onnxruntime(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str, str, onnx.ModelProto]:
    """``_infer``, with every ceil_mode pooling sized as ONNX Runtime sizes it.

    ONNX shape inference keeps a last ceil_mode window that starts in the end padding; ONNX Runtime drops
    it (MaxPool 2x2/2, pads 1, ceil_mode on a 5-pixel axis: 4 against 3), and so would every shape after
    it. Inference runs on a copy with those poolings rewritten into the ceil_mode=0 poolings of ONNX
    Runtime's output size, sized from the previous inference's shapes, until the rewrites stop changing
    (each round corrects the poolings whose input size the round before got right). Returns ``_infer``'s
    result and the rewritten copy.
    """

    pools = sum(1 for n in proto.graph.node if n.op_type in CEIL_MODE_POOLS)
    patches = _ceil_mode_patches(proto, _known_shapes(proto)) if pools else {}
    for _ in range(pools + 2):
        patched = _patched(proto, patches) if patches else proto
        inferred, mode, failure = _infer(patched)
        if not pools:
            break
        again = _ceil_mode_patches(proto, _known_shapes(inferred))
        if again == patches:
            break
        patches = again
    return inferred, mode, failure, patched


# Two batch sizes that are not 1 (where broadcasting could hide a batch dependence).
PROBE_BATCHES = (2, 3)


def _has_dynamic_batch(graph: gs.Graph) -> bool:
    return any(t.shape and not _is_static(t.shape[0]) for t in graph.inputs)


def _resolve_with_batch_probes(proto: onnx.ModelProto, unresolved: list[gs.Variable]) -> int:
    """Learn the dimensions ONNX inference loses to a symbolic batch (``x.view(x.size(0), -1)``).

    Shapes are inferred twice more with the dynamic batch of every input fixed to 2 and to 3; a
    dimension after the first that both agree on does not depend on the batch and is adopted.
    Returns how many tensors became fully known.
    """

    probes = [_probe_shapes(proto, batch) for batch in PROBE_BATCHES]
    resolved = 0
    for tensor in unresolved:
        shapes = [probe.get(tensor.name) for probe in probes]
        if any(shape is None for shape in shapes) or len({len(shape) for shape in shapes}) != 1:
            continue
        first, second = shapes
        rest = first[1:]
        if rest != second[1:] or not all(_is_static(d) for d in rest):
            continue
        if first and first[0] == second[0] and _is_static(first[0]):
            batch = first[0]
        elif tensor.shape:
            batch = tensor.shape[0]
        else:
            batch = "batch"
        tensor.shape = [batch, *rest] if first else []
        resolved += 1
    return resolved


# Ops whose output sizes depend on the values they read (or that run subgraphs): shapes measured on one
# sample say nothing about another, so tensors computed from them are not measured.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "Unique", "Compress", "NonMaxSuppression", "Loop", "If", "Scan"})
# Samples per batch size, each with its own random values: a shape that differs between them is not static.
RUN_SEEDS = (0, 1)


def _resolve_with_onnxruntime(proto: onnx.ModelProto, unresolved: list[gs.Variable]) -> int:
    """Learn the shapes ONNX inference cannot compute by running the model in ONNX Runtime.

    ONNX's data propagation does not evaluate shape arithmetic such as Shape -> Gather -> Div -> Slice
    (PyTorch's ``chunk``, ``view(b, g, c // g, h, w)``), so every tensor after it stays unknown until
    fold-constants has folded it, one step per sweep. ONNX Runtime computes them: the model runs with
    the unresolved tensors as outputs, on random samples at batch sizes 2 and 3 when the batch is
    dynamic (twice, with other values, at the model's own batch when it is fixed). A tensor is learned
    when every run gives it the same dimensions after the first; its first dimension is static when
    every run agrees on it too, else the batch's. Tensors computed from a data-dependent op (NonZero,
    Unique, ...) are never learned this way. Returns how many tensors became fully known (0 when ONNX
    Runtime cannot run the model).
    """

    blocked = _computed_from(proto, DATA_DEPENDENT_OPS)
    wanted = [t for t in unresolved if t.dtype is not None and t.name not in blocked and not t.is_empty()]
    if not wanted:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(t.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), None)
        for t in wanted
    )
    dynamic = any(not _is_static(d) for d in _batch_dims(proto))
    batches = PROBE_BATCHES if dynamic else (None,)
    try:
        session = make_session(probe)
        runs = [session.run(None, _random_feed(proto, batch, seed)) for batch in batches for seed in RUN_SEEDS]
    except Exception:  # ONNX Runtime cannot run the model: the tensors stay for later sweeps
        return 0
    run_batches = [batch for batch in batches for _ in RUN_SEEDS]
    symbol = next((d for d in _batch_dims(proto, symbols=True) if isinstance(d, str) and d), None)
    resolved = 0
    for i, tensor in enumerate(wanted):
        shapes = [tuple(run[i].shape) for run in runs]
        if len({len(shape) for shape in shapes}) != 1 or len({shape[1:] for shape in shapes}) != 1:
            continue
        first = shapes[0]
        if not first:
            tensor.shape = []
        elif len({shape[0] for shape in shapes}) == 1:
            tensor.shape = list(first)
        else:
            if symbol is not None and all(s[0] == b for s, b in zip(shapes, run_batches, strict=True)):
                batch = symbol
            elif tensor.shape and not _is_static(tensor.shape[0]):
                batch = tensor.shape[0]
            else:
                batch = "batch"
            tensor.shape = [batch, *first[1:]]
        resolved += 1
    return resolved


def _computed_from(proto: onnx.ModelProto, ops: frozenset[str]) -> set[str]:
    """Names of the tensors that ``ops`` nodes write, and of every tensor computed from them."""

    reached: set[str] = set()
    for node in proto.graph.node:  # exported graphs are topologically sorted
        if node.op_type in ops or any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


def _batch_dims(proto: onnx.ModelProto, symbols: bool = False) -> list:
    """The first dimension of every real input: its size, else its name (``symbols``) or None."""

    inits = {i.name for i in proto.graph.initializer}
    dims = []
    for value in proto.graph.input:
        shape = value.type.tensor_type.shape.dim
        if value.name not in inits and len(shape):
            dim = shape[0]
            dims.append(dim.dim_value if dim.HasField("dim_value") else dim.dim_param if symbols else None)
    return dims


def _random_feed(proto: onnx.ModelProto, batch: int | None, seed: int) -> dict[str, np.ndarray]:
    """Random values for every real input, the dynamic batch set to ``batch``."""

    rng = np.random.default_rng(seed)
    inits = {i.name for i in proto.graph.initializer}
    feed = {}
    for value in proto.graph.input:
        if value.name in inits:
            continue
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype.kind == "f":
            feed[value.name] = rng.uniform(-1.0, 1.0, dims).astype(dtype)
        elif dtype.kind == "b":
            feed[value.name] = rng.integers(0, 2, dims).astype(dtype)
        else:
            feed[value.name] = rng.integers(0, 4, dims).astype(dtype)
    return feed


def _probe_shapes(proto: onnx.ModelProto, batch: int) -> dict[str, list]:
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.value_info[:]
    for value in probe.graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    for value in probe.graph.output:
        value.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return {}
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    return shapes


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _check_inputs(model: CompilationModel) -> None:
    problems = []
    for tensor in model.graph.inputs:
        if tensor.shape is None:
            problems.append((tensor, f"input '{tensor.name}' has no shape"))
            continue
        for i, dim in enumerate(tensor.shape):
            if i > 0 and not _is_static(dim):
                problems.append(
                    (tensor, f"input '{tensor.name}' has a dynamic dimension {i} ('{dim or '?'}')")
                )
                break
    if problems:
        raise UsageError(
            "; ".join(message for _, message in problems),
            diagnostics=[
                Diagnostic(Level.ERROR, "SHP001", message, nodes=[], pass_name="infer-shapes", hint=INPUT_SHAPE_HINT)
                for _, message in problems
            ],
            hint=INPUT_SHAPE_HINT,
        )


def _is_static(dim) -> bool:
    return isinstance(dim, int) and dim >= 0


def _information(tensor: gs.Variable) -> int:
    if tensor.shape is None:
        return -1
    return sum(1 for d in tensor.shape if _is_static(d))


def _knows_more(new: gs.Variable, old: gs.Variable, overwrite: bool) -> bool:
    if new.dtype is not None and old.dtype is None:
        return True
    if new.shape is None:
        return False
    if old.shape is None:
        return True
    if overwrite:
        return list(new.shape) != list(old.shape)
    return len(new.shape) == len(old.shape) and _information(new) > _information(old)


def _unresolved(tensor: gs.Variable) -> bool:
    if tensor.is_empty():
        return False
    if tensor.shape is None:
        return True
    return any(i > 0 and not _is_static(d) for i, d in enumerate(tensor.shape))


def _describe(tensor: gs.Variable) -> str:
    dims = None if tensor.shape is None else ", ".join(str(d) if d is not None else "?" for d in tensor.shape)
    shape = "unknown" if dims is None else f"[{dims}]"
    producer = f" from {tensor.inputs[0].op} node '{node_label(tensor.inputs[0])}'" if tensor.inputs else ""
    return f"(shape {shape}{producer})"


def _unresolved_diagnostic(model: CompilationModel, tensor: gs.Variable) -> Diagnostic:
    producer = tensor.inputs[0] if tensor.inputs else None
    return Diagnostic(
        Level.ERROR,
        "SHP002",
        f"tensor '{tensor.name}' has no static shape {_describe(tensor)}",
        nodes=[node_label(producer)] if producer is not None else [],
        sources=[model.source_of(producer.name)] if producer is not None else [],
        pass_name="infer-shapes",
        hint=INPUT_SHAPE_HINT,
    )
