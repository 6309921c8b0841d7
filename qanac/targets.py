"""The target registry: what each target is called, which passes prepare a model for it, its lint rules,
and which backend emits it. The core reaches a target only through this registry.

A target is a declarative ``Target`` record. Targets arrive through the entry point group
``qanac.targets`` (``name = "package.module:TARGET"``); qanac's own (``akida``, ``onnxruntime``) are
declared that way in pyproject.toml, so a third-party target registers exactly like a built-in one.
Loading a target's record imports only its declaration module: the backend (and the vendor stack behind
it) is imported when the backend is used.

A target also brings its command-line surface: ``options`` (``TargetOption`` records the CLI attaches to
``compile``, ``lint`` and ``run``; their values reach the backend as ``backend_options`` or runner options)
and ``commands`` (click commands by name, e.g. the Akida ``devices`` command). Commands that belong to no
target (the model zoo) arrive through the entry point group ``qanac.commands``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
from typing import Any

from qanac.diagnostics import UsageError

ENTRY_POINT_GROUP = "qanac.targets"
COMMAND_GROUP = "qanac.commands"
# The commands a target option can attach to.
OPTION_COMMANDS = ("compile", "lint", "run")

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
    "reduce-mean-to-global-pool",
    "bounded-relu-to-clip",
    "hard-sigmoid-and-swish",
    "explicit-pads",
    "fuse-pad-into-conv",
    "fuse-pad-into-maxpool",
    "fold-batchnorm-into-conv",
    "batchnorm-to-affine",
    "strip-trailing-softmax",
)


def _load(reference: str) -> Any:
    module_name, _, attribute = reference.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


@dataclasses.dataclass(frozen=True)
class TargetOption:
    """A command-line option a target adds to some of ``OPTION_COMMANDS``.

    Its value lands under ``key`` in the options the command hands the target (``backend_options`` for
    ``compile``, the ``device`` given to the target's device check for ``lint``, runner options for
    ``run``), and only when the option is the chosen target's. ``type`` is ``str``, ``int`` or ``float``;
    ``choices`` restricts the value; ``is_flag`` makes it a boolean switch.
    """

    flag: str  # "--device"
    key: str
    help: str
    commands: tuple[str, ...]
    type: type = str
    choices: tuple[str, ...] = ()
    default: Any = None
    is_flag: bool = False

    def __post_init__(self) -> None:
        if not self.flag.startswith("--"):
            raise UsageError(f"target option '{self.flag}' must start with '--'")
        unknown = sorted(set(self.commands) - set(OPTION_COMMANDS))
        if unknown or not self.commands:
            raise UsageError(f"target option {self.flag} names commands {unknown or '()'}",
                             hint="options attach to " + ", ".join(OPTION_COMMANDS))

    def to_dict(self) -> dict[str, Any]:
        return {"flag": self.flag, "key": self.key, "help": self.help, "commands": list(self.commands),
                "type": self.type.__name__, "choices": list(self.choices), "default": self.default,
                "is_flag": self.is_flag}


@dataclasses.dataclass(frozen=True)
class Target:
    """A target as the core sees it. Every reference is a ``module:attribute`` string, imported on use.

    ``passes`` names the package holding the target's own passes (imported before its pipeline runs);
    ``rules`` the target's lint rule table; ``device_rules`` a ``function(device) -> rule table | None``
    giving the table for a device that needs another one (None: ``rules``); ``device_check`` a
    ``function(device) -> list[Diagnostic]`` applied to the ``device`` option; ``options`` its command-line
    options; ``commands`` maps a command name to the ``module:attribute`` of a click command that ``qanac``
    offers.
    """

    name: str
    description: str
    backend: str  # "module:Class"
    pipeline: tuple[str, ...]
    rules: str | None = None
    device_rules: str | None = None
    device_check: str | None = None
    passes: str | None = None
    default_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    options: tuple[TargetOption, ...] = ()
    commands: dict[str, str] = dataclasses.field(default_factory=dict)

    def load_backend(self):
        return _load(self.backend)()

    def load_passes(self) -> None:
        if self.passes is not None:
            importlib.import_module(self.passes)

    def load_rules(self) -> list[Any]:
        return list(_load(self.rules)) if self.rules else []

    def device_findings(self, device: str) -> list[Any]:
        return _load(self.device_check)(device) if self.device_check else []

    def options_for(self, command: str) -> tuple[TargetOption, ...]:
        return tuple(option for option in self.options if command in option.commands)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "pipeline": list(self.pipeline),
                "options": [option.to_dict() for option in self.options], "commands": sorted(self.commands)}


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


@functools.cache
def _entry_point_commands() -> tuple[tuple[str, str], ...]:
    return tuple((entry.name, entry.value) for entry in importlib.metadata.entry_points(group=COMMAND_GROUP))


def registered_commands() -> dict[str, str]:
    """Commands beyond the built-in ones, by name: ``module:attribute`` of a click command, from the
    targets' ``commands`` and the entry point group ``qanac.commands``. Nothing is imported here."""

    commands: dict[str, str] = {}
    sources: dict[str, str] = {}
    offered = [(name, reference, f"target {target.name}")
               for target in all_targets().values() for name, reference in target.commands.items()]
    offered += [(name, reference, f"entry point group {COMMAND_GROUP}") for name, reference in _entry_point_commands()]
    for name, reference, source in offered:
        if name in commands and commands[name] != reference:
            raise UsageError(f"command name clash: '{name}' comes from {sources[name]} and from {source}")
        commands[name], sources[name] = reference, source
    return dict(sorted(commands.items()))


def load_command(name: str, reference: str) -> Any:
    """The click command ``name`` that a ``module:attribute`` reference of ``registered_commands`` names."""

    try:
        return _load(reference)
    except Exception as exc:  # a broken plugin must not break the other commands silently
        raise UsageError(f"cannot load command '{name}' ({reference}): {type(exc).__name__}: {exc}") from exc
