"""Lint: every rule a target states, checked against every node, all findings at once.

A target's rules are a ``RuleSet`` of ``Rule`` (see backends/akida/rules.py): a stable code, what breaks,
what the vendor toolchain does about it, and the way out (a qanac pass that fixes it, or a model change).
Each rule's ``check`` looks at one node with the help of ``LintContext`` and returns a message when the
node breaks the rule. Legalization passes read the same table, so lint and the compiler cannot disagree
about what a device accepts.

A rule set may name a ``view``: the model as the vendor toolchain will see it (for Akida, after
quantizeml's sanitizer). The rules then judge the view, and each finding names the node of the model the
view node stands for (``view_names``). Queries never mutate the graph they look at.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import importlib
from typing import Any, Callable, Iterator

import onnx
import onnx_graphsurgeon as gs

from qanac.diagnostics import Diagnostic, Level
from qanac.graph import CompilationModel, constant_value
from qanac.targets import Target


def topological_order(graph: gs.Graph) -> list[gs.Node]:
    """The graph's nodes in a topological order, keeping the graph's order where it already is one (a graph
    with a cycle keeps its order). Never mutates the graph."""

    nodes = list(graph.nodes)
    index = {id(n): i for i, n in enumerate(nodes)}
    waiting = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        producers = {index[id(t.inputs[0])] for t in node.inputs if t.inputs and id(t.inputs[0]) in index}
        waiting[i] = len(producers)
        for p in producers:
            users[p].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for user in users[i]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    return order if len(order) == len(nodes) else nodes


@dataclasses.dataclass
class LintContext:
    """The graph plus the facts rules ask about repeatedly (computed once per lint run, never by mutating
    the graph). When the graph is a view, ``names`` maps a view node's name to the model node it stands for
    (where they differ) and ``model_ops`` gives each model node's op type, for labels."""

    graph: gs.Graph
    device: str | None = None
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    model_ops: dict[str, str] = dataclasses.field(default_factory=dict)
    _memo: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """A fact a target's rules derive from the whole graph, computed on first use in this run."""

        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def order(self) -> list[gs.Node]:
        return self.memo("order", lambda: topological_order(self.graph))

    def model_name(self, node: gs.Node) -> str:
        return self.names.get(node.name, node.name)

    def label(self, node: gs.Node) -> str:
        name = self.model_name(node)
        return f"{self.model_ops.get(name, node.op)} '{name}'"

    def producer(self, tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    def consumers(self, node: gs.Node) -> list[gs.Node]:
        return [c for out in node.outputs for c in out.outputs]

    def is_constant(self, tensor: gs.Tensor) -> bool:
        return constant_value(tensor) is not None

    def tensor_inputs(self, node: gs.Node) -> list[gs.Tensor]:
        """Inputs that are computed at run time (not weights or constants)."""

        return [t for t in node.inputs if t.name and not self.is_constant(t)]

    def spatial(self, tensor: gs.Tensor) -> tuple[int, int] | None:
        shape = tensor.shape
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
            return None
        return int(shape[2]), int(shape[3])


@dataclasses.dataclass(frozen=True)
class Rule:
    code: str
    title: str
    level: Level  # ERROR: conversion fails or truncates; WARNING: runs, but not on the device hardware
    check: Callable[[gs.Node, LintContext], str | None]
    consequence: str  # what the vendor toolchain does when the rule is broken
    fix: str  # the way out
    fixed_by: str | None = None  # the qanac pass that rewrites this case, when there is one

    def to_dict(self) -> dict[str, str | None]:
        return {
            "code": self.code,
            "title": self.title,
            "level": self.level.value,
            "consequence": self.consequence,
            "fix": self.fix,
            "fixed_by": self.fixed_by,
        }


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """A target's rules, iterable in report order, and optionally the ``view`` they judge: a function from
    the model to the model as the vendor toolchain will see it (None when the toolchain would refuse it
    outright; the rules then judge the model as it is)."""

    rules: tuple[Rule, ...]
    view: Callable[[onnx.ModelProto], onnx.ModelProto | None] | None = None

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)


def _resolve(reference: str):
    module_name, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def load_rules(target: Target) -> list[Rule]:
    return [] if target.rules is None else list(_resolve(target.rules))


def view_names(model: gs.Graph, view: gs.Graph, reach: int = 32) -> dict[str, str]:
    """View node name -> name of the model node it stands for, for view nodes whose name no model node has.

    A view node that writes a model tensor (directly or through other new nodes) replaced the model nodes
    that led to it: it stands for the nearest of them with its op type, else for the tensor's producer (a
    Clip that replaced Relu -> Min -> Max stands for the Max). A node the view inserted (it writes no
    tensor of a replaced node) stands for the model node whose output it reads. Each search stops after
    ``reach`` nodes; a node with no counterpart keeps its own name.
    """

    known = {n.name for n in model.nodes}
    kept = {n.name for n in view.nodes} & known
    tensors = model.tensors()
    names: dict[str, str] = {}
    for node in view.nodes:
        if node.name in known:
            continue
        read: list[str] = []  # model nodes (or producers of model tensors) the node reads, nearest first
        stack, steps = list(node.inputs), 0
        while stack and steps < reach:
            tensor, steps = stack.pop(0), steps + 1
            producer = tensor.inputs[0] if tensor.inputs else None
            if isinstance(tensor, gs.Constant) or (producer is None and tensor.name not in tensors):
                continue
            model_tensor = tensors.get(tensor.name)
            if model_tensor is not None:
                read.extend(p.name for p in model_tensor.inputs)
            elif producer.name in known:
                read.append(producer.name)
            else:
                stack.extend(producer.inputs)
        written, stack, steps = None, list(node.outputs), 0
        while stack and written is None and steps < reach:
            tensor, steps = stack.pop(0), steps + 1
            model_tensor = tensors.get(tensor.name)
            if model_tensor is not None and model_tensor.inputs:
                written = model_tensor.inputs[0]
            else:
                stack.extend(t for c in tensor.outputs if c.name not in known for t in c.outputs)
        if written is not None and written.name not in kept:
            names[node.name] = _replaced(written, node.op, kept, reach).name
        elif written is not None or read:
            names[node.name] = written.name if written is not None else read[0]
    return names


def _replaced(start: gs.Node, op: str, kept: set[str], reach: int) -> gs.Node:
    """The model node with op type ``op`` nearest before ``start`` among the nodes the view replaced
    (those it does not keep), else ``start``."""

    queue, visited = collections.deque([start]), {id(start)}
    while queue and len(visited) <= reach:
        node = queue.popleft()
        if node.op == op:
            return node
        for tensor in node.inputs:
            producer = tensor.inputs[0] if tensor.inputs else None
            if producer is not None and id(producer) not in visited and producer.name not in kept:
                visited.add(id(producer))
                queue.append(producer)
    return start


def _lint_context(model: CompilationModel, ruleset: Any, device: str | None) -> LintContext:
    view = getattr(ruleset, "view", None)
    seen = view(model.to_onnx()) if view is not None else None
    if seen is None:
        return LintContext(model.graph, device)
    graph = gs.import_onnx(seen)
    return LintContext(graph, device, names=view_names(model.graph, graph),
                       model_ops={n.name: n.op for n in model.graph.nodes})


def lint_model(model: CompilationModel, target: Target, device: str | None = None,
               skipped: dict[str, dict[str, str]] | None = None) -> list[Diagnostic]:
    """Check every node against every rule of ``target``; findings in graph order, errors first per node,
    one per rule and model node.

    ``skipped`` maps a pass name to {node: why the pass left it} (``PipelineReport.skipped``): a finding
    whose rule that pass fixes says why it did not fire there.
    """

    ruleset = _resolve(target.rules) if target.rules is not None else ()
    if device is not None and target.device_rules is not None:
        for_device = _resolve(target.device_rules)(device)
        ruleset = ruleset if for_device is None else for_device
    rules = list(ruleset)
    ctx = _lint_context(model, ruleset, device)
    findings: list[Diagnostic] = []
    if device is not None and target.device_check is not None:
        findings.extend(_resolve(target.device_check)(device))
    reported: set[tuple[str, str]] = set()
    for node in ctx.order:
        if not node.outputs:  # disconnected by a rewrite still running (Rewriter.remove): it computes nothing
            continue
        name = ctx.model_name(node)
        for rule in rules:
            message = rule.check(node, ctx)
            if message is None or (rule.code, name) in reported:
                continue
            reported.add((rule.code, name))
            hint = rule.fix
            if rule.fixed_by:
                reason = (skipped or {}).get(rule.fixed_by, {}).get(name)
                hint += (f" (pass '{rule.fixed_by}' left this node: {reason})" if reason
                         else f" (pass '{rule.fixed_by}')")
            findings.append(
                Diagnostic(
                    level=rule.level,
                    code=rule.code,
                    message=f"{ctx.label(node)}: {message}",
                    nodes=[name],
                    sources=[model.source_of(name)],
                    rule=f"{rule.title}: {rule.consequence}",
                    hint=hint,
                )
            )
    return findings
