"""The target registry: what each target is called, which passes prepare a model for it, its lint rules,
and which backend emits it. The core reaches a target only through this registry.

A target is a declarative ``Target`` record. Targets arrive through the entry point group
``qanac.targets`` (``name = "package.module:TARGET"``); qanac's own (``akida``, ``onnxruntime``) are
declared that way in pyproject.toml, so a third-party target registers exactly like a built-in one.
Loading a target's record imports only its declaration module: the backend (and the vendor stack behind
it) is imported when the backend is used.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from typing import Any

from qanac.diagnostics import UsageError

ENTRY_POINT_GROUP = "qanac.targets"

# Exact, target-independent normalisation of any imported model (docs/passes.md).
CANONICALIZE: tuple[str, ...] = (
    "remove-initializer-inputs",
    "upgrade-opset",
    "sum-to-add",
    "remove-dropout-identity",
    "infer-shapes",
    "fold-constants",
    "remove-layout-transposes",
    "flatten-dense-to-gemm",
    "explicit-pads",
    "fuse-pad-into-conv",
    "fold-batchnorm-into-conv",
    "batchnorm-to-affine",
    "strip-trailing-softmax",
)


def _load(reference: str) -> Any:
    module_name, _, attribute = reference.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


@dataclasses.dataclass(frozen=True)
class Target:
    """A target as the core sees it. Every reference is a ``module:attribute`` string, imported on use.

    ``passes`` names the package holding the target's own passes (imported before its pipeline runs);
    ``rules`` the target's lint rule table; ``device_check`` a ``function(device) -> list[Diagnostic]``
    for ``--device``.
    """

    name: str
    description: str
    backend: str  # "module:Class"
    pipeline: tuple[str, ...]
    rules: str | None = None
    device_check: str | None = None
    passes: str | None = None
    default_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def load_backend(self):
        return _load(self.backend)()

    def load_passes(self) -> None:
        if self.passes is not None:
            importlib.import_module(self.passes)

    def load_rules(self) -> list[Any]:
        return list(_load(self.rules)) if self.rules else []

    def device_findings(self, device: str) -> list[Any]:
        return _load(self.device_check)(device) if self.device_check else []


_TARGETS: dict[str, Target] = {}
_entry_points_loaded = False


def register_target(target: Target) -> None:
    """Add a target; a second target with the same name is an error."""

    existing = _TARGETS.get(target.name)
    if existing is not None and existing != target:
        raise UsageError(f"target name clash: '{target.name}' is registered twice")
    _TARGETS[target.name] = target


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = entry.load()
        except Exception as exc:  # a broken plugin must not break the compiler silently
            raise UsageError(
                f"cannot load target '{entry.name}' ({entry.value}) from entry point group "
                f"{ENTRY_POINT_GROUP}: {type(exc).__name__}: {exc}"
            ) from exc
        register_target(target)


def all_targets() -> dict[str, Target]:
    _load_entry_points()
    return dict(sorted(_TARGETS.items()))


def get_target(name: str) -> Target:
    targets = all_targets()
    try:
        return targets[name]
    except KeyError:
        raise UsageError(f"unknown target '{name}'", hint="targets: " + ", ".join(targets)) from None
