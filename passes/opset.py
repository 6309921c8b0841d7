"""Bringing a model's default-domain opset into the window the rest of qanac is built and tested for.

The window is opset 13 to 21:
    13  the first opset where Softmax/LogSoftmax normalise over one axis, Dropout takes ``training_mode``
        as an input and QuantizeLinear has a per-channel ``axis`` (what the onnxruntime target emits);
    21  the opset MetaTF's quantizeml builds its ONNX graphs at (``quantizeml.onnx_support.layers.
        base_layer.ONNX_OPSET``; it version-converts every model it quantizes to 21, and ONNX Runtime 1.23
        runs up to 23).
Models below the window are converted to ``UPGRADE_TARGET`` (17, which every exporter and runtime in the
stack supports); models above it are converted down to 21.
"""

from __future__ import annotations

import re

import onnx
import onnx.defs
import onnx.helper
import onnx.version_converter
import onnx_graphsurgeon as gs

from qanac.diagnostics import UsageError
from qanac.graph import CompilationModel
from qanac.pipeline import PassContext
from qanac.registry import PassResult, register_pass

MIN_OPSET = 13
MAX_OPSET = 21
UPGRADE_TARGET = 17

# how onnx.version_converter names the operator it has no adapter for
_CONVERTER_OP_PATTERNS = (
    re.compile(r"No Adapter (?:From|To) Version \$\d+ for (\w+)"),
    re.compile(r"No Previous Version of (\w+) exists"),
)


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def conversion_target(version: int) -> int | None:
    """The opset a model at ``version`` is converted to, or None when it is inside the window."""

    if version < MIN_OPSET:
        return UPGRADE_TARGET
    if version > MAX_OPSET:
        return MAX_OPSET
    return None


@register_pass("upgrade-opset")
def upgrade_opset(model: CompilationModel, ctx: PassContext) -> PassResult:
    """Convert the default-domain opset into the window 13..21 with ``onnx.version_converter``.

    Below 13 the model is upgraded to opset 17; above 21 it is converted down to 21; inside the window
    it is left exactly as it is. The IR version is raised to the new opset's when upgrading, and set to
    it when converting down (ONNX Runtime 1.23 reads IR <= 11). Invariant: the default-domain opset is
    within 13..21 and the model computes the same function. A conversion the converter cannot do is a
    UsageError naming the operator and its nodes.
    """

    result = PassResult()
    proto = model.to_onnx()
    version = default_opset(proto)
    target = conversion_target(version)
    if target is None:
        return result
    # graphsurgeon never lists initializers as inputs, which is valid from IR 4 on (see
    # remove-initializer-inputs); the converter needs the export to say so
    proto.ir_version = max(proto.ir_version, 4)
    functions = list(proto.functions)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises bare RuntimeError/IndexError from C++
        raise _conversion_error(model.graph, version, target, exc) from exc
    if functions and not converted.functions:  # the converter drops model-local functions
        converted.functions.extend(functions)
    ir_for_target = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)], ignore_unknown=True)
    # upgrading never lowers the IR version; converting down uses the IR of the target opset's release
    converted.ir_version = max(proto.ir_version, ir_for_target) if target > version else ir_for_target
    graph = gs.import_onnx(converted)
    model.replace_graph(graph)
    model.ir_version = converted.ir_version
    result.count("convert-opset")
    result.details["opset"] = {"from": version, "to": target}
    return result


def _conversion_error(graph: gs.Graph, version: int, target: int, exc: Exception) -> UsageError:
    text = str(exc).strip()
    message = text.splitlines()[-1] if text else type(exc).__name__
    ops = [m.group(1) for pattern in _CONVERTER_OP_PATTERNS for m in [pattern.search(text)] if m]
    if not ops:
        ops = _ops_missing_at(graph, target)
    hint = f"re-export the model with an opset between {MIN_OPSET} and {MAX_OPSET}"
    if not ops:
        return UsageError(f"cannot convert the model from opset {version} to {target}: {message}", hint=hint)
    nodes = [n.name or n.outputs[0].name for n in graph.nodes if n.op in ops]
    where = f" (nodes: {', '.join(nodes[:5])}{', ...' if len(nodes) > 5 else ''})" if nodes else ""
    return UsageError(
        f"cannot convert the model from opset {version} to {target}: onnx.version_converter cannot convert "
        f"operator {', '.join(repr(op) for op in ops)}{where}: {message}",
        hint=hint,
    )


def _ops_missing_at(graph: gs.Graph, target: int) -> list[str]:
    """Default-domain operators of ``graph`` that have no schema at opset ``target`` (removed or
    experimental operators)."""

    missing = []
    for op in sorted({n.op for n in graph.nodes if (n.domain or "") in ("", "ai.onnx")}):
        try:
            onnx.defs.get_schema(op, target, "")
        except onnx.defs.SchemaError:
            missing.append(op)
    return missing
