"""The pass registry: what a pass is, how it is registered, and where third-party passes come from.

A pass is a function ``fn(model: CompilationModel, ctx: PassContext) -> PassResult``: most are made of
rewrite rules and registered with ``qanac.rewrite.register_rules`` (its ``fn`` runs the rules); a pass that
transforms the whole graph at once is a function registered with ``@register_pass``. Either way it
declares the targets it serves and whether it is ``exact`` (outputs preserved up to float rounding, checked
by ``--verify-each``) or approximate (runs only on the user's opt-in and is always reported with its
measured deviation).

Sources of passes, in load order:
    built-in     the modules of ``qanac.passes``, then each registered target's pass package
                 (``Target.passes``, e.g. ``qanac.passes.akida``)
    entry point  installed distributions declaring the group ``qanac.passes`` (``name = "pkg.module"``);
                 importing the module registers its passes
    --plugin     a Python file given on the command line
A second pass with an existing name is an error that names both origins.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from qanac.diagnostics import Diagnostic, QanacError, UsageError

ENTRY_POINT_GROUP = "qanac.passes"
ALL_TARGETS = frozenset({"*"})


@dataclasses.dataclass
class PassResult:
    """What a pass did: ``changed`` and counts per rewrite (``{"fold-bn-into-conv": 3}``).

    ``details`` go into the report; ``details["skipped"]`` maps each node the pass left to the reason
    ({node name: reason}; rule passes fill it from their ``NoMatch``es), which lint reads through
    ``PipelineReport.skipped()``. ``diagnostics`` carry anything worth telling the user.
    """

    changed: bool = False
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    diagnostics: list[Diagnostic] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def count(self, rewrite: str, n: int = 1) -> None:
        self.counts[rewrite] = self.counts.get(rewrite, 0) + n
        self.changed = True


@dataclasses.dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[..., PassResult]
    targets: frozenset[str]
    exact: bool
    origin: str
    doc: str
    options: tuple[str, ...] = ()  # the keys `--pass-option NAME.KEY=VALUE` may set (read with ctx.option)

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def serves(self, target: str) -> bool:
        return "*" in self.targets or target in self.targets

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "targets": sorted(self.targets),
            "exact": self.exact,
            "origin": self.origin,
            "doc": inspect.cleandoc(self.doc),
            "options": list(self.options),
        }


class PassRegistrationError(QanacError):
    """Two passes with one name, or a pass without a docstring (exit 2)."""


_REGISTRY: dict[str, PassInfo] = {}
_loaded_plugins: set[str] = set()
_builtins_loaded = False
_entry_points_loaded = False


def register_pass(
    name: str, *, targets: Iterable[str] = ALL_TARGETS, exact: bool = True, options: Iterable[str] = ()
) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    """Register ``fn`` as the pass ``name``. The docstring is the pass's documentation and is required;
    ``options`` are the keys the pass reads with ``ctx.option`` (any other key is refused on the command line)."""

    def decorate(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        doc = inspect.getdoc(fn) or ""
        origin = _origin_of(fn)
        if not doc:
            raise PassRegistrationError(f"pass '{name}' from {origin} has no docstring; document what it does")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.fn is not fn:
            raise PassRegistrationError(
                f"pass name clash: '{name}' is registered by {existing.origin} and again by {origin}",
                hint="rename one of the passes",
            )
        _REGISTRY[name] = PassInfo(
            name=name, fn=fn, targets=frozenset(targets), exact=exact, origin=origin, doc=doc,
            options=tuple(options),
        )
        return fn

    return decorate


def _origin_of(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", "?")
    file = getattr(sys.modules.get(module), "__file__", None)
    if module.startswith("qanac.passes"):
        return f"built-in ({module})"
    return f"{module} ({file})" if file else module


def load_builtin_passes() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    import qanac.passes
    from qanac.targets import all_targets

    qanac.passes.load_all()
    for target in all_targets().values():
        target.load_passes()
    _builtins_loaded = True


def load_entry_point_passes() -> list[str]:
    """Import every module named by an entry point in the ``qanac.passes`` group; returns their names."""

    global _entry_points_loaded
    if _entry_points_loaded:
        return []
    _entry_points_loaded = True
    loaded = []
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except QanacError:
            raise
        except Exception as exc:  # a broken plugin must not break the compiler silently
            raise UsageError(
                f"cannot load pass plugin '{entry.name}' ({entry.value}) from entry point group "
                f"{ENTRY_POINT_GROUP}: {type(exc).__name__}: {exc}"
            ) from exc
        loaded.append(entry.name)
    return loaded


def load_plugin_file(path: str | Path) -> None:
    """Import a Python file so that its ``@register_pass`` functions join the registry."""

    path = Path(path).resolve()
    if str(path) in _loaded_plugins:
        return
    if not path.is_file() or path.suffix != ".py":
        raise UsageError(f"plugin not found or not a .py file: {path}", hint="give --plugin a Python file")
    module_name = f"qanac_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except QanacError:
        raise
    except Exception as exc:
        del sys.modules[module_name]
        raise UsageError(f"cannot load plugin {path}: {type(exc).__name__}: {exc}") from exc
    _loaded_plugins.add(str(path))


def load_passes(plugins: Iterable[str | Path] = ()) -> None:
    """Fill the registry: built-ins, entry points, then plugin files."""

    load_builtin_passes()
    load_entry_point_passes()
    for plugin in plugins:
        load_plugin_file(plugin)


def get_pass(name: str) -> PassInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UsageError(f"unknown pass '{name}'", hint=f"known passes: {known}") from None


def all_passes() -> list[PassInfo]:
    return sorted(_REGISTRY.values(), key=lambda p: p.name)


def unregister_pass(name: str) -> None:
    """Remove a pass (for tests and for plugin reloading)."""

    _REGISTRY.pop(name, None)
