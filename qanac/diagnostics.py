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

    def format(self) -> str:
        where = ""
        if self.nodes:
            where = " [" + ", ".join(self.nodes)
            if self.sources and any(self.sources):
                where += " <- " + ", ".join(s for s in self.sources if s)
            where += "]"
        text = f"{self.level.value}: {self.code}{where}: {self.message}"
        if self.rule:
            text += f"\n    rule: {self.rule}"
        if self.hint:
            text += f"\n    fix:  {self.hint}"
        return text


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
