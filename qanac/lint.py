"""Lint: every rule a target states, checked against every node, all findings at once.

A target's rules are a table of ``Rule`` (see backends/akida/rules.py): a stable code, what breaks, what the
vendor toolchain does about it, and the way out (a qanac pass that fixes it, or a model change). Each
rule's ``check`` looks at one node with the help of ``LintContext`` and returns a message when the node
breaks the rule. Legalization passes read the same table, so lint and the compiler cannot disagree
about what a device accepts.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import onnx_graphsurgeon as gs

from qanac.diagnostics import Diagnostic, Level
from qanac.graph import CompilationModel, constant_value
from qanac.targets import Target


@dataclasses.dataclass
class LintContext:
    """The graph plus the facts rules ask about repeatedly (computed once per lint run)."""

    graph: gs.Graph
    device: str | None = None

    def __post_init__(self) -> None:
        self.graph.toposort()
        self.compute_nodes = [n for n in self.graph.nodes if n.op not in PASSIVE_OPS]

    def producer(self, tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    def consumers(self, node: gs.Node) -> list[gs.Node]:
        return [c for out in node.outputs for c in out.outputs]

    def is_constant(self, tensor: gs.Tensor) -> bool:
        return constant_value(tensor) is not None

    def tensor_inputs(self, node: gs.Node) -> list[gs.Tensor]:
        """Inputs that are computed at run time (not weights or constants)."""

        return [t for t in node.inputs if t.name and not self.is_constant(t)]

    def first_compute_node(self) -> gs.Node | None:
        return self.compute_nodes[0] if self.compute_nodes else None

    def spatial(self, tensor: gs.Tensor) -> tuple[int, int] | None:
        shape = tensor.shape
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
            return None
        return int(shape[2]), int(shape[3])


# Ops that move or reshape data without computing; rules about "the first layer" skip them.
PASSIVE_OPS = {"Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose", "Cast", "Constant"}


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


def _resolve(reference: str):
    module_name, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def load_rules(target: Target) -> list[Rule]:
    return [] if target.rules is None else list(_resolve(target.rules))


def lint_model(model: CompilationModel, target: Target, device: str | None = None,
               skipped: dict[str, dict[str, str]] | None = None) -> list[Diagnostic]:
    """Check every node against every rule of ``target``; findings in graph order, errors first per node.

    ``skipped`` maps a pass name to {node: why the pass left it} (``PipelineReport.skipped``): a finding
    whose rule that pass fixes says why it did not fire there.
    """

    rules = load_rules(target)
    ctx = LintContext(model.graph, device)
    findings: list[Diagnostic] = []
    if device is not None and target.device_check is not None:
        findings.extend(_resolve(target.device_check)(device))
    for node in list(model.graph.nodes):
        for rule in rules:
            message = rule.check(node, ctx)
            if message is None:
                continue
            hint = rule.fix
            if rule.fixed_by:
                reason = (skipped or {}).get(rule.fixed_by, {}).get(node.name)
                hint += (f" (pass '{rule.fixed_by}' left this node: {reason})" if reason
                         else f" (pass '{rule.fixed_by}')")
            findings.append(
                Diagnostic(
                    level=rule.level,
                    code=rule.code,
                    message=f"{node.op} '{node.name}': {message}",
                    nodes=[node.name],
                    sources=[model.source_of(node.name)],
                    rule=f"{rule.title}: {rule.consequence}",
                    hint=hint,
                )
            )
    return findings
