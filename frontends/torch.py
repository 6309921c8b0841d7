"""The PyTorch frontend: a module factory, a TorchScript file or a torch.export program, to ONNX.

Sources:
    pkg.module:factory     a callable returning an ``nn.Module``; ``pkg.module`` is imported with the
                           current directory on ``sys.path`` (``path/to/file.py:factory`` works too);
                           ``weights`` optionally names a state_dict file loaded into the result
    model.pt / model.ts    a TorchScript archive (``torch.jit.save``)
    model.pt2              a ``torch.export`` program (``torch.export.save``)

Every source needs the input shape (NCHW): none of them records it in a form the exporter can use.

Export uses the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) at opset ``OPSET``
in eval mode, with the batch dimension dynamic. docs/from-pytorch.md gives the measurements behind that
choice: in the pinned stack the dynamo exporter cannot run at all (it needs a newer onnx-ir than the one
MetaTF's quantizeml pins), and where it runs it is 5 to 40 times slower on CNNs and emits ReduceMean and
Reshape where this one emits GlobalAveragePool and Flatten. The export is checked against the module's
own output (``qanac.frontends.finish``) at the traced batch and at one more; a model that only works at
the traced batch is re-exported with that batch fixed, and the import says so. A torch.export program is
re-exported at the ``--input-shape`` batch (the TorchScript tracer cannot follow its symbolic sizes), so
its batch is always fixed.

Source names: the exporter names nodes after the module scopes they come from
(``/features/features.3/conv/conv.0/Conv``); ``module_paths`` resolves those against the module tree to
``features.3.conv.0``.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from qanac.diagnostics import UsageError
from qanac.frontends.finish import check_export, first_line, set_source_names
from qanac.native_output import native_output_discarded

OPSET = 17
PROGRAM = "torch.export program"
SUFFIXES = {".pt", ".ts", ".pt2"}
_FACTORY = re.compile(r"^(?P<module>[^:]+):(?P<attr>[A-Za-z_][\w.]*)$")

Shapes = dict[str, tuple[int, ...]] | tuple[int, ...] | None


def is_factory(source: str) -> bool:
    """``pkg.module:factory`` or ``file.py:factory`` (and not an existing file)."""

    return bool(_FACTORY.match(source)) and not Path(source).exists()


def load(source: str, shapes: Shapes, weights: str | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """Export ``source`` to ONNX with its source names; returns the model and notes for the user."""

    torch = _import_torch()
    module, kind, hint_shape = load_module(source, weights)
    if shapes is None:
        example = f"--input-shape {','.join(map(str, hint_shape))}" if hint_shape else "--input-shape 1,3,224,224"
        raise UsageError(
            f"a PyTorch {kind} does not say what input it takes; give the input shape",
            hint=f"e.g. {example} (NCHW; the batch dimension stays dynamic)",
        )
    named = _named_shapes(shapes)
    notes: list[str] = []
    samples = _samples(torch, named, batch=None)
    batch = next(iter(named.values()))[0]
    if kind == PROGRAM:
        module = _program_module(torch, module, samples)
    expected = _run(torch, module, samples)
    output_names = ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
    if kind == PROGRAM:
        model = _export(torch, module, samples, list(named), output_names, dynamic_batch=False)
        check_export(model, _feeds(named, samples), expected, "PyTorch")
        notes.append(
            f"the batch dimension is fixed at {batch}: a torch.export program is exported at the batch "
            "of --input-shape (a module factory or TorchScript file keeps it dynamic)"
        )
    else:
        model = _export(torch, module, samples, list(named), output_names, dynamic_batch=True)
        check_export(model, _feeds(named, samples), expected, "PyTorch")
        try:
            larger = _samples(torch, named, batch=batch + 1)
            check_export(model, _feeds(named, larger), _run(torch, module, larger), "PyTorch")
        except UsageError as exc:
            model = _export(torch, module, samples, list(named), output_names, dynamic_batch=False)
            check_export(model, _feeds(named, samples), expected, "PyTorch")
            notes.append(
                f"the batch dimension is fixed at {batch}: the model does not run at another batch size "
                f"({exc.message})"
            )
    set_source_names(model, module_paths([n.name for n in model.graph.node], _module_names(module)))
    return model, notes


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise UsageError("PyTorch is not installed", hint="pip install 'qanac[torch]'") from exc
    return torch


def load_module(source: str, weights: str | None = None) -> tuple[Any, str, tuple[int, ...] | None]:
    """The module to export, what kind of source it was, and an input shape known from the source."""

    torch = _import_torch()
    path = Path(source)
    if is_factory(source):
        module = _call_factory(source)
        if weights is not None:
            load_weights(module, weights)
        return module.eval(), "module factory", None
    if weights is not None:
        raise UsageError(
            "--weights applies to a module factory (pkg.module:factory) only",
            hint="TorchScript and torch.export files carry their weights",
        )
    if not path.exists():
        raise UsageError(f"model not found: {source}")
    if path.suffix == ".pt2":
        return _load_exported_program(torch, path)
    return _load_torchscript(torch, path), "TorchScript model", None


def _call_factory(source: str) -> Any:
    torch = _import_torch()
    match = _FACTORY.match(source)
    assert match is not None
    module_ref, attr = match.group("module"), match.group("attr")
    namespace = _import_factory_module(module_ref)
    factory: Any = namespace
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"'{module_ref}' has no attribute '{attr}'", hint="give pkg.module:callable")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"'{source}' is a {type(factory).__name__}, not a callable returning an nn.Module")
    try:
        module = factory()
    except Exception as exc:
        raise UsageError(f"the factory '{source}' raised {first_line(exc)}") from exc
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"the factory '{source}' returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _import_factory_module(module_ref: str) -> Any:
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_file():
            raise UsageError(f"cannot import '{module_ref}': no such file")
        spec = importlib.util.spec_from_file_location(f"qanac_factory_{path.stem}", path.resolve())
        assert spec is not None and spec.loader is not None
        namespace = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = namespace
        _exec_user_code(module_ref, lambda: spec.loader.exec_module(namespace))
        return namespace
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_ref)
    except ModuleNotFoundError as exc:
        if exc.name and (module_ref == exc.name or module_ref.startswith(exc.name + ".")):
            raise UsageError(
                f"cannot import '{module_ref}': no module named '{exc.name}' in the current directory "
                "or on the Python path",
                hint="run from the directory that holds the package, or set PYTHONPATH",
            ) from exc
        raise UsageError(f"importing '{module_ref}' failed: {first_line(exc)}") from exc
    except Exception as exc:
        raise UsageError(f"importing '{module_ref}' failed: {first_line(exc)}") from exc


def _exec_user_code(what: str, run: Callable[[], None]) -> None:
    try:
        run()
    except Exception as exc:
        raise UsageError(f"importing '{what}' failed: {first_line(exc)}") from exc


def load_weights(module: Any, weights: str) -> None:
    """Load a state_dict file (optionally wrapped as ``{"state_dict": ...}``) into ``module``, strictly."""

    torch = _import_torch()
    path = Path(weights)
    if not path.is_file():
        raise UsageError(f"weights file not found: {weights}")
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(
            f"{weights} is not a loadable state_dict: {first_line(exc)}",
            hint="save the weights with torch.save(model.state_dict(), path)",
        ) from exc
    state = _unwrap_state_dict(loaded)
    if state is None:
        raise UsageError(f"{weights} holds a {type(loaded).__name__}, not a state_dict (name -> tensor)")
    own = module.state_dict()
    if all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in own):
        state = {k[len("module.") :]: v for k, v in state.items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            problems.append(
                f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
            )
        if mismatched:
            k = mismatched[0]
            problems.append(
                f"{len(mismatched)} with another shape (e.g. {k}: model {tuple(own[k].shape)}, "
                f"file {tuple(state[k].shape)})"
            )
        raise UsageError(
            f"the weights in {weights} do not fit the module: " + "; ".join(problems),
            hint="check that the factory builds the architecture the weights were saved from",
        )
    module.load_state_dict(state, strict=True)


def _unwrap_state_dict(loaded: Any) -> dict[str, Any] | None:
    torch = _import_torch()

    def is_state(obj: Any) -> bool:
        return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())

    if is_state(loaded):
        return dict(loaded)
    if isinstance(loaded, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if is_state(loaded.get(key)):
                return dict(loaded[key])
    return None


def _load_torchscript(torch: Any, path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            loaded = None
        if _unwrap_state_dict(loaded) is not None:
            raise UsageError(
                f"{path} holds a state_dict (weights only), not a TorchScript model",
                hint=f"give the module factory and the weights: pkg.module:factory --weights {path}",
            ) from exc
        raise UsageError(
            f"{path} is not a TorchScript model: {first_line(exc)}",
            hint="save the model with torch.jit.save(torch.jit.trace(model, x), path)",
        ) from exc


def _load_exported_program(torch: Any, path: Path) -> tuple[Any, str, tuple[int, ...] | None]:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise UsageError(
            f"{path} is not a loadable torch.export program: {first_line(exc)}",
            hint="save it with torch.export.save(torch.export.export(model, (x,)), path)",
        ) from exc
    shape = None
    try:
        placeholder = next(iter(program.example_inputs[0]))
        shape = tuple(int(d) for d in placeholder.shape)
    except Exception:  # example inputs are optional in a .pt2 and may hold symbolic sizes
        shape = None
    return program, PROGRAM, shape


def _program_module(torch: Any, program: Any, samples: list[Any]) -> Any:
    """The program as a module the TorchScript exporter can trace: re-exported at the samples' shapes
    (the tracer cannot follow symbolic sizes) and unflattened, which keeps the module paths."""

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            static = torch.export.export(program.module(), tuple(samples))
            return torch.export.unflatten(static)
    except Exception as exc:
        shapes = ", ".join(str(tuple(s.shape)) for s in samples)
        raise UsageError(f"the torch.export program does not run at input shape {shapes}: {first_line(exc)}") from exc


def _named_shapes(shapes: dict[str, tuple[int, ...]] | tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    named = {"input": shapes} if isinstance(shapes, tuple) else dict(shapes)
    for name, shape in named.items():
        if not shape or any(d <= 0 for d in shape):
            raise UsageError(f"input shape {shape} for '{name}' must have positive dimensions, batch first")
    return named


def _samples(torch: Any, named: dict[str, tuple[int, ...]], batch: int | None) -> list[Any]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn((batch or shape[0], *shape[1:]), generator=generator, dtype=torch.float32)
        for shape in named.values()
    ]


def _feeds(named: dict[str, tuple[int, ...]], samples: list[Any]) -> dict[str, np.ndarray]:
    return {name: sample.numpy() for name, sample in zip(named, samples, strict=True)}


def _run(torch: Any, module: Any, samples: list[Any]) -> list[np.ndarray]:
    try:
        with torch.no_grad():
            result = module(*samples)
    except Exception as exc:
        shapes = ", ".join(str(tuple(s.shape)) for s in samples)
        raise UsageError(f"the PyTorch model fails on input of shape {shapes}: {first_line(exc)}") from exc
    outputs = _flatten_outputs(torch, result)
    if outputs is None:
        raise UsageError(
            f"the PyTorch model returns a {type(result).__name__}; qanac needs a tensor or a tuple of tensors"
        )
    return [o.detach().cpu().numpy() for o in outputs]


def _flatten_outputs(torch: Any, result: Any) -> list[Any] | None:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        flat = []
        for item in result:
            inner = _flatten_outputs(torch, item)
            if inner is None:
                return None
            flat.extend(inner)
        return flat
    return None


def _export(
    torch: Any, module: Any, samples: list[Any], input_names: list[str], output_names: list[str], dynamic_batch: bool
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]} if dynamic_batch else None
    try:
        with warnings.catch_warnings(), native_output_discarded(1):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(samples),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
            )
    except Exception as exc:
        raise UsageError(
            f"PyTorch could not export the model to ONNX: {first_line(exc)}",
            hint="export it yourself with torch.onnx.export and pass the .onnx file",
        ) from exc
    return onnx.load_from_string(buffer.getvalue())


def _module_names(module: Any) -> set[str]:
    try:
        return {name for name, _ in module.named_modules() if name}
    except Exception:  # a module whose named_modules() fails still exports; it just has no source names
        return set()


def module_paths(node_names: list[str], modules: set[str]) -> dict[str, str]:
    """``{onnx node name: module path}`` for the nodes the TorchScript exporter named after a scope.

    A node name is ``/scope/.../scope/OpName``. The exporter writes a scope as the module's path
    relative to an ancestor (``features.3`` under ``features``, ``conv.0`` under ``features.3.conv``,
    or just ``3`` for a traced TorchScript module), so each scope is resolved against ``modules`` (the
    module's ``named_modules()`` paths) by trying its dotted suffixes under the path resolved so far.
    Nodes outside any submodule (``/Flatten``) and unnamed nodes get no entry.
    """

    resolved: dict[str, str] = {}
    for node in node_names:
        if not node.startswith("/"):
            continue
        path = ""
        for scope in node.strip("/").split("/")[:-1]:
            parts = scope.split(".")
            for k in range(len(parts)):
                candidate = ".".join(p for p in (path, *parts[k:]) if p)
                if candidate in modules:
                    path = candidate
                    break
            else:
                break
        if path:
            resolved[node] = path
    return resolved
