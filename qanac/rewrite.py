"""Passes as rewrite rules: each rule is ``match -> check -> rewrite``, and one loop runs them.

A rule names the operator types it looks at (``Rule.ops``) and answers three questions about a node:

    match(rw, node)           a cheap structural test; False means "not a candidate" and records nothing
    check(rw, node)           a query that never edits the graph: a ``NoMatch`` (the reason, and the nodes it
                              is about) or whatever the rewrite needs (any value, None included)
    rewrite(rw, node, found)  the edit; it may still return a ``NoMatch``, but only before it changed anything

``register_rules`` makes a list of rules a registered pass (a ``PassInfo`` whose ``fn(model, ctx)`` returns
a ``PassResult``, like any other pass), and the loop it runs owns what every pass would otherwise repeat:

    iteration    a snapshot of the graph's nodes of the rules' op types, taken before the first rewrite, in
                 graph order; each node is tried by every rule in turn while it is still connected and of the
                 rule's op type, so a rule may rewrite a node another rule rewrote just before, rewrites may
                 add, rename and disconnect nodes freely, and nodes created by the pass wait for the next sweep
    counts       ``rw.count(key, n)``; a rewrite that counts nothing counts once under the rule's name
    skip reasons every NoMatch is recorded in ``PassResult.details["skipped"]`` as {node name: reason}, under
                 the nodes it names (the candidate when it names none), the first reason per node kept; lint
                 reads them through ``PipelineReport.skipped()`` to say why a pass left a node
    provenance   nodes a rewrite appends to ``graph.nodes`` are tagged with the pass's name in
                 ``model.provenance``; ``rw.rename(node)`` gives an existing node the derived name
                 ``<original>::<pass>`` (``qanac.graph.derived_name``) and tags it
    cleanup      ``rw.remove(node)`` disconnects a replaced node; the pipeline's cleanup after a pass that
                 changed the model drops it

Invariant: ``check`` and ``match`` never edit the graph, so a candidate that does not fire leaves the model
exactly as it was, with its reason recorded.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qanac.graph import CompilationModel, derived_name, disconnect, fresh_tensor_name
from qanac.pipeline import PassContext
from qanac.registry import ALL_TARGETS, PassInfo, PassRegistrationError, PassResult, get_pass, register_pass

SKIPPED = "skipped"


class NoMatch:
    """Why a candidate was not rewritten, and the nodes the reason is about (the candidate when none)."""

    __slots__ = ("reason", "nodes")

    def __init__(self, reason: str, *nodes: gs.Node):
        self.reason = reason
        self.nodes = nodes

    def __repr__(self) -> str:
        return f"NoMatch({self.reason!r}, nodes={[node_label(n) for n in self.nodes]})"


def new_constant(graph: gs.Graph, base: str, values: np.ndarray) -> gs.Constant:
    """A new constant named ``base`` (made unique in ``graph``)."""

    return gs.Constant(fresh_tensor_name(graph, base), np.ascontiguousarray(values))


def new_variable(graph: gs.Graph, base: str, like: gs.Tensor) -> gs.Variable:
    """A new intermediate tensor with the dtype and shape of ``like``, named ``base`` (made unique)."""

    return gs.Variable(fresh_tensor_name(graph, base), dtype=like.dtype, shape=like.shape)


def node_label(node: gs.Node) -> str:
    """The name to report a node by: its name, or its first output's name when it has none."""

    if node.name:
        return node.name
    return node.outputs[0].name if node.outputs else f"<unnamed {node.op}>"


class Rule:
    """One rewrite: the op types it looks at, and ``match``/``check``/``rewrite`` (see the module docstring).

    ``name`` is what a rewrite counts under when it does not name its counts. ``prepare`` runs once per pass
    application, before any rewrite, with this rule's candidates (only when there are some); what it
    returns is ``rw.prepared`` while this rule's methods run (for rules that measure the model first).
    """

    name: ClassVar[str]
    ops: ClassVar[tuple[str, ...]]

    def prepare(self, rw: Rewriter, candidates: list[gs.Node]) -> Any:
        return None

    def match(self, rw: Rewriter, node: gs.Node) -> bool:
        return True

    def check(self, rw: Rewriter, node: gs.Node) -> Any:
        raise NotImplementedError

    def rewrite(self, rw: Rewriter, node: gs.Node, found: Any) -> NoMatch | None:
        raise NotImplementedError


class Rewriter:
    """One application of a rule pass: what rules read (``model``, ``graph``, ``ctx``, ``prepared``) and the
    edits that keep names, provenance and counts (``count``, ``rename``, ``remove``, ``constant``, ...)."""

    def __init__(self, model: CompilationModel, ctx: PassContext, pass_name: str):
        self.model = model
        self.ctx = ctx
        self.pass_name = pass_name
        self.result = PassResult()
        self.prepared: Any = None
        self._counted = 0

    @property
    def graph(self) -> gs.Graph:
        return self.model.graph

    def count(self, key: str, n: int = 1) -> None:
        self.result.count(key, n)
        self._counted += n

    def name(self, node: gs.Node, index: int | None = None) -> str:
        """The derived name ``<original>::<pass>[:index]`` for a node made from ``node``."""

        return derived_name(node_label(node), self.pass_name, index)

    def record(self, node: gs.Node) -> gs.Node:
        """Tag ``node`` (changed in place) with the pass in ``model.provenance``."""

        self.model.record(node, self.pass_name)
        return node

    def rename(self, node: gs.Node, index: int | None = None) -> gs.Node:
        """Give ``node`` its derived name and tag it with the pass in ``model.provenance``."""

        node.name = self.name(node, index)
        return self.record(node)

    def remove(self, node: gs.Node) -> None:
        """Disconnect ``node`` from every tensor; the cleanup after the pass drops it."""

        disconnect(node)

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        return new_constant(self.graph, base, values)

    def variable(self, base: str, like: gs.Tensor) -> gs.Variable:
        return new_variable(self.graph, base, like)

    def note(self, key: str, node: gs.Node, value: Any) -> None:
        """Record ``value`` for ``node`` under ``details[key]`` (what a rewrite wants the report to say)."""

        self.result.details.setdefault(key, {})[node_label(node)] = value

    def _skip(self, no_match: NoMatch, candidate: gs.Node) -> None:
        skipped = self.result.details.setdefault(SKIPPED, {})
        for node in no_match.nodes or (candidate,):
            skipped.setdefault(node_label(node), no_match.reason)

    def _apply(self, rule: Rule, node: gs.Node, found: Any) -> None:
        nodes, known = self.graph.nodes, len(self.graph.nodes)
        counted = self._counted
        outcome = rule.rewrite(self, node, found)
        if isinstance(outcome, NoMatch):
            self._skip(outcome, node)
            return
        if self._counted == counted:
            self.count(rule.name)
        if self.graph.nodes is nodes:
            for new in nodes[known:]:
                self.record(new)


def apply_rules(model: CompilationModel, ctx: PassContext, pass_name: str, rules: Sequence[Rule]) -> PassResult:
    """Run ``rules`` once over ``model`` as the pass ``pass_name`` (see the module docstring)."""

    rw = Rewriter(model, ctx, pass_name)
    wanted = {op for rule in rules for op in rule.ops}
    candidates = [node for node in model.graph.nodes if node.op in wanted]
    prepared = {}
    for rule in rules:
        own = [node for node in candidates if node.op in rule.ops]
        prepared[id(rule)] = rule.prepare(rw, own) if own else None
    for node in candidates:
        for rule in rules:
            if not node.outputs or node.op not in rule.ops:
                continue
            rw.prepared = prepared[id(rule)]
            if not rule.match(rw, node):
                continue
            found = rule.check(rw, node)
            if isinstance(found, NoMatch):
                rw._skip(found, node)
            else:
                rw._apply(rule, node, found)
    rw.prepared = None
    return rw.result


class RulePass:
    """A registered pass's ``fn`` made of rules: ``fn(model, ctx) -> PassResult`` runs ``apply_rules``."""

    def __init__(self, name: str, rules: Sequence[Rule], doc: str, module: str):
        self.name = name
        self.rules = tuple(rules)
        self.__doc__ = doc
        self.__module__ = module

    def __call__(self, model: CompilationModel, ctx: PassContext) -> PassResult:
        return apply_rules(model, ctx, self.name, self.rules)


def register_rules(
    name: str,
    *rules: Rule,
    doc: str | None = None,
    targets: Iterable[str] = ALL_TARGETS,
    exact: bool = True,
    options: Iterable[str] = (),
) -> PassInfo:
    """Register the pass ``name`` that runs ``rules`` (in this order on each node).

    ``doc`` is the pass's documentation; a single-rule pass may leave it out and use the rule class's
    docstring. The pass's origin is the module that defines the first rule.
    """

    if not rules:
        raise PassRegistrationError(f"pass '{name}' has no rules")
    text = doc if doc is not None else (type(rules[0]).__doc__ if len(rules) == 1 else None)
    fn = RulePass(name, rules, text or "", type(rules[0]).__module__)
    register_pass(name, targets=targets, exact=exact, options=options)(fn)
    return get_pass(name)
