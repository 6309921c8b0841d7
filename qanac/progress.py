"""Progress of long steps, for whoever displays it (the CLI prints it on stderr).

Code doing a step that may take seconds announces it as it starts with ``report(step, message)``: the
compile driver's stages, a backend's quantization, conversion and mapping. A display installs a listener
for the duration of a block with ``listening(callback)``; the listener is a context variable, so it reaches
the code the block calls and nothing else. Without a listener ``report`` does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator


@dataclasses.dataclass(frozen=True)
class Step:
    """A step as it starts: ``step`` names its kind (``import``, ``quantize``, ``map`` ...), ``message`` says
    what is being done, for people."""

    step: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        return self.message


_listener: contextvars.ContextVar[Callable[[Step], None] | None] = contextvars.ContextVar(
    "qanac_progress_listener", default=None)


def report(step: str, message: str) -> None:
    """Tell the listener, if any, that ``step`` starts."""

    listener = _listener.get()
    if listener is not None:
        listener(Step(step, message))


@contextlib.contextmanager
def listening(callback: Callable[[Step], None]) -> Iterator[None]:
    """Send the steps reported inside the block to ``callback``."""

    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)
