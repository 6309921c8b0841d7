"""Diagnostics and user-facing errors.

One diagnostic type serves lint, passes and backends. Errors that a user can cause derive from
``QanacError`` and carry the documented exit code; the CLI prints them without a traceback unless
``--debug`` is given.

Exit codes (docs/cli.md):
    0  success
    1  verification failed (a compiled model disagrees with its float reference beyond the thresholds,
       or an approximation exceeded ``--max-deviation``)
    2  bad usage or unreadable input (file missing or not ONNX, bad shapes, unknown names)
    3  the model is not supported by the target (lint errors, unconvertible nodes)
    4  internal error: a pass or backend broke an invariant (a bug in qanac or in a plugin)
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any, Iterable

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_UNSUPPORTED = 3
EXIT_INTERNAL = 4


class Level(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


_SEVERITY = (Level.ERROR, Level.WARNING, Level.INFO)
SHOWN_NODES = 5  # nodes a human line names before "+N more"
SHOWN_KINDS = 3  # differing messages a grouped code shows before "+N other messages"
_NAMES_AND_NUMBERS = re.compile(r"\([^()]*\)|'[^']*'|\d[\d,.]*")


@dataclasses.dataclass
class Diagnostic:
    """One finding about one or more nodes.

    ``code`` is stable and documented (e.g. ``AKD001``); ``nodes`` are ONNX node names; ``sources`` are
    the names those nodes had in the original framework (module path or Keras layer name) when known;
    ``hint`` says the way out (a pass to run, or a model change).
    """

    level: Level
    code: str
    message: str
    nodes: list[str] = dataclasses.field(default_factory=list)
    sources: list[str] = dataclasses.field(default_factory=list)
    rule: str = ""
    hint: str = ""
    pass_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["level"] = self.level.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnostic:
        """The finding ``to_dict`` wrote (report.json keeps every finding so)."""

        return cls(**{**data, "level": Level(data["level"])})

    def located(self, limit: int = SHOWN_NODES) -> list[str]:
        """The first ``limit`` nodes, each with its source-framework name when known (``node <- source``)."""

        paired = len(self.sources) == len(self.nodes)
        return [f"{node} <- {self.sources[i]}" if paired and self.sources[i] else node
                for i, node in enumerate(self.nodes[:limit])]

    def format(self, limit: int = SHOWN_NODES) -> str:
        """The finding for people: level, code, its first ``limit`` nodes, message, rule and fix."""

        where = ""
        if self.nodes:
            more = len(self.nodes) - limit
            where = " [" + ", ".join(self.located(limit)) + (f", +{more} more" if more > 0 else "")
            if len(self.sources) != len(self.nodes) and any(self.sources):  # not one source per node
                where += " <- " + ", ".join(s for s in self.sources if s)
            where += "]"
        text = f"{self.level.value}: {self.code}{where}: {self.message}"
        if self.rule:
            text += f"\n    rule: {self.rule}"
        if self.hint:
            text += f"\n    fix:  {self.hint}"
        return text


def group_by_code(diagnostics: Iterable[Diagnostic]) -> list[list[Diagnostic]]:
    """The findings by code, codes in order of their first finding, findings in their order."""

    groups: dict[str, list[Diagnostic]] = {}
    for d in diagnostics:
        groups.setdefault(d.code, []).append(d)
    return list(groups.values())


def format_grouped(diagnostics: Iterable[Diagnostic], limit: int = SHOWN_NODES) -> list[str]:
    """Human lines for ``diagnostics``, one group per code: a code found once is that finding
    (``Diagnostic.format``); a code found several times is one line with the count and the first message,
    an ``also:`` line for each other kind of message in the group (messages that differ in more than the
    quoted names, numbers and parenthesised details they carry, such as the reasons of PART001; the first
    ``SHOWN_KINDS``), a line with the first ``limit`` nodes (with their source-framework names) and how many
    more, and one line of advice (the first hint, else the rule). `--json` output keeps every finding instead."""

    lines: list[str] = []
    for group in group_by_code(diagnostics):
        first = group[0]
        if len(group) == 1:
            lines += first.format(limit).splitlines()
            continue
        level = min((d.level for d in group), key=_SEVERITY.index)
        located = [entry for d in group for entry in d.located(len(d.nodes))]
        nodes = sum(len(d.nodes) for d in group)
        lines.append(f"{level.value}: {first.code} x{len(group)}, the first: {first.message}")
        kinds: dict[str, str] = {}
        for d in group:
            kinds.setdefault(_NAMES_AND_NUMBERS.sub("", d.message), d.message)
        others = list(kinds.values())[1:]
        lines += [f"    also: {message}" for message in others[:SHOWN_KINDS]]
        if len(others) > SHOWN_KINDS:
            lines.append(f"    also: +{len(others) - SHOWN_KINDS} other messages")
        if located:
            more = nodes - limit
            lines.append("    nodes: " + ", ".join(located[:limit]) + (f", +{more} more" if more > 0 else ""))
        advice = next((d.hint for d in group if d.hint), "") or first.rule
        if advice:
            lines.append(f"    fix:  {advice}")
    return lines


class QanacError(Exception):
    """An error the user can act on; never shown with a traceback unless --debug."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, diagnostics: Iterable[Diagnostic] = (), hint: str = ""):
        super().__init__(message)
        self.message = message
        self.diagnostics = list(diagnostics)
        self.hint = hint

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "exit_code": self.exit_code,
            "message": self.message,
            "hint": self.hint,
            "diagnostics": [d.to_dict() for d in self.diagnostics],
        }


class UsageError(QanacError):
    """Bad arguments or unreadable input (exit 2)."""

    exit_code = EXIT_USAGE


class UnsupportedModelError(QanacError):
    """The model cannot be compiled for the target as it is (exit 3)."""

    exit_code = EXIT_UNSUPPORTED


class VerificationError(QanacError):
    """A numerical check failed (exit 1)."""

    exit_code = EXIT_VERIFY_FAILED


class InternalError(QanacError):
    """A pass or backend broke an invariant: a bug, reported with a reproducer where possible (exit 4)."""

    exit_code = EXIT_INTERNAL
