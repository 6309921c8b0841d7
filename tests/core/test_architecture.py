"""The layout rules of docs/architecture.md, and the command-line surface targets register.

The core (``qanac/*.py``; the zoo is a client of the compiler, not part of it) reaches a target only through
the target registry: it imports no backend, no target's own passes, no vendor stack and not the zoo, and it
names no target. A target brings its options and commands with its ``Target`` record.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from qanac import targets
from qanac.backends.onnxruntime.backend import OnnxRuntimeBackend
from qanac.cli import cli
from qanac.targets import CANONICALIZE, Target, TargetOption

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "qanac"
# What runs a model for one target: the vendor toolchains and the frameworks they sit on.
VENDOR_STACK = ("akida", "cnn2snn", "quantizeml", "tensorflow", "tf_keras", "keras", "tf2onnx", "torch",
                "torchvision", "onnxruntime.quantization")
TARGET_PASS_PACKAGES = tuple(
    f"qanac.passes.{p.name}" for p in sorted((REPO / "passes").iterdir()) if (p / "__init__.py").is_file()
)
FORBIDDEN = ("qanac.backends", "qanac.zoo", *TARGET_PASS_PACKAGES, *VENDOR_STACK)


def core_modules() -> list[Path]:
    return sorted(p for p in CORE.rglob("*.py") if "zoo" not in p.relative_to(CORE).parts)


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def imported_modules(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) for every import anywhere in a core module, relative ones resolved inside ``qanac``,
    ``from X import Y`` counted as both X and X.Y, and ``import_module("literal")`` / ``__import__`` calls."""

    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(["qanac", *([base] if base else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def import_offenders() -> dict[tuple[str, str], list[str]]:
    """(core file, top-level package) -> the imports that break the layout, as ``line: module``."""

    offenders: dict[tuple[str, str], list[str]] = {}
    for path in core_modules():
        for line, module in imported_modules(ast.parse(path.read_text(), str(path))):
            if _forbidden(module):
                package = module.split(".")[0] if not module.startswith("qanac.") else ".".join(module.split(".")[:2])
                offenders.setdefault((str(path.relative_to(REPO)), package), []).append(f"{line}: {module}")
    return offenders


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def target_names_in_core() -> dict[tuple[str, str], list[str]]:
    """(core file, target) -> the strings in its code (docstrings aside) that name a registered target, as
    ``line: string``. A target named like one of the core's own dependencies (onnxruntime runs host segments)
    cannot be told apart and is not looked for."""

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [n for n in targets.all_targets() if n not in dependencies]
    offenders: dict[tuple[str, str], list[str]] = {}
    for path in core_modules():
        tree = ast.parse(path.read_text(), str(path))
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for name in names:
                    if name in node.value.lower():
                        place = f"{node.lineno}: {node.value!r}"
                        offenders.setdefault((str(path.relative_to(REPO)), name), []).append(place)
    return offenders


def _listing(offenders: dict[tuple[str, str], list[str]]) -> str:
    return "\n".join(f"{path} ({name}) at {', '.join(places)}" for (path, name), places in offenders.items())


def test_the_import_check_sees_every_form_of_import():
    tree = ast.parse(
        "import qanac.backends.akida.backend\n"
        "from qanac.passes import akida\n"
        "def f():\n"
        "    from .zoo import cli\n"
        "    import tensorflow as tf\n"
        "    importlib.import_module('quantizeml.models')\n"
        "from qanac.passes import batchnorm\n"
        "import onnxruntime\n"
    )
    modules = [m for _, m in imported_modules(tree) if _forbidden(m)]
    assert modules == ["qanac.backends.akida.backend", "qanac.passes.akida", "qanac.zoo", "qanac.zoo.cli",
                       "tensorflow", "quantizeml.models"]
    assert "qanac.passes.akida" in TARGET_PASS_PACKAGES


def test_core_imports_no_target_zoo_or_vendor_stack():
    offenders = import_offenders()
    assert not offenders, "the core reaches targets only through qanac.targets:\n" + _listing(offenders)


def test_core_names_no_target():
    offenders = target_names_in_core()
    assert not offenders, "the core names no target (its name belongs in its own package):\n" + _listing(offenders)


@pytest.mark.parametrize("args", [["--help"], ["compile", "--help"], ["run", "--help"], ["devices", "--help"],
                                  ["targets", "--json"]])
def test_help_imports_no_backend_or_vendor_stack(args):
    code = (
        "import sys\n"
        "from qanac.cli import cli\n"
        f"cli.main({args!r}, prog_name='qanac', standalone_mode=False)\n"
        "heavy = sorted(m for m in sys.modules if m.endswith('.backend') and m.startswith('qanac.backends')\n"
        f"               or m.split('.')[0] in {list(VENDOR_STACK)!r} or m == 'onnxruntime.quantization')\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr


class RecordingBackend(OnnxRuntimeBackend):
    """The onnxruntime backend, writing the options it is given (by emit, by load_runner) as JSON to the file
    its ``trace`` option names."""

    name = "fake"

    def emit(self, model, calibration, options, out_dir):
        Path(options["trace"]).write_text(json.dumps(options))
        return super().emit(model, calibration, options, out_dir)

    def load_runner(self, segment_dir, segment, options):
        Path(options["trace"]).write_text(json.dumps(options))
        return super().load_runner(segment_dir, segment, options)


@click.command("fake-hello")
def hello() -> None:
    """Say hello from the fake target."""

    click.echo("hello from fake")


CALIBRATE = TargetOption("--calibrate-method", key="calibrate_method", commands=("compile",),
                         choices=("minmax", "entropy", "percentile"), default="minmax", help="as onnxruntime")
FAKE = Target(
    name="fake",
    description="a test target",
    backend=f"{__name__}:RecordingBackend",
    pipeline=CANONICALIZE,
    options=(
        TargetOption("--fake-level", key="level", commands=("compile", "lint"), type=int, help="a level"),
        TargetOption("--fake-trace", key="trace", commands=("compile", "run"),
                     help="file the backend writes its options to"),
        CALIBRATE,
    ),
    commands={"fake-hello": f"{__name__}:hello"},
)


@pytest.fixture
def registry(monkeypatch):
    """The target registry as installed; what a test registers is gone afterwards."""

    monkeypatch.setattr(targets, "_TARGETS", dict(targets.all_targets()))
    return targets


def invoke(*args: Any):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_a_registered_target_is_listed_with_its_options_and_commands(registry):
    registry.register_target(FAKE)
    result = invoke("targets", "--json")
    assert result.exit_code == 0, result.output
    listed = {t["name"]: t for t in json.loads(result.output)}
    assert {"akida", "onnxruntime", "fake"} <= set(listed)
    assert [o["flag"] for o in listed["fake"]["options"]] == ["--fake-level", "--fake-trace", "--calibrate-method"]
    assert listed["fake"]["commands"] == ["fake-hello"] and listed["akida"]["commands"] == ["devices", "learn"]
    assert listed["fake"]["pipeline"] == list(CANONICALIZE)

    help_text = invoke("--help").output
    assert "fake-hello" in help_text and "devices" in help_text and "zoo" in help_text
    assert invoke("fake-hello").output == "hello from fake\n"
    compile_help = " ".join(invoke("compile", "--help").output.split())
    assert "--fake-level INTEGER fake target: a level" in compile_help
    assert "fake target: as onnxruntime; onnxruntime target: how activation ranges are calibrated" in compile_help
    run_help = invoke("run", "--help").output
    assert "--fake-trace" in run_help and "--fake-level" not in run_help and "--hardware" in run_help


def test_target_options_reach_the_chosen_target_only(registry, tmp_path, small_model_path, small_calib_path):
    registry.register_target(FAKE)
    out, trace = tmp_path / "bundle", tmp_path / "trace.json"
    result = invoke("compile", small_model_path, "--target", "fake", "--calib", small_calib_path, "-o", out,
                    "--fake-level", "3", "--calibrate-method", "entropy", "--fake-trace", trace)
    assert result.exit_code == 0, result.output
    assert json.loads(trace.read_text()) == {"level": 3, "trace": str(trace), "calibrate_method": "entropy"}

    result = invoke("run", out, "--input", small_calib_path, "--fake-trace", trace)
    assert result.exit_code == 0, result.output
    assert json.loads(trace.read_text()) == {"trace": str(trace)}

    for args in (["compile", small_model_path, "--target", "onnxruntime", "--calib", small_calib_path, "-o",
                  tmp_path / "other", "--fake-level", "3"],
                 ["compile", small_model_path, "--target", "fake", "--calib", small_calib_path, "-o",
                  tmp_path / "other", "--device", "AKD1000"],
                 ["run", out, "--input", small_calib_path, "--hardware"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "is an option of target" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "other").exists()


def test_onnxruntime_gets_its_calibration_method(tmp_path, small_model_path, small_calib_path):
    out = tmp_path / "bundle"
    result = invoke("compile", small_model_path, "--target", "onnxruntime", "--calib", small_calib_path, "-o", out,
                    "--calibrate-method", "percentile")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["backend"]["quantization"]["calibrate_method"] == "percentile"


@pytest.mark.parametrize("target, args, message", [
    (Target("bad", "clashing flag", FAKE.backend, CANONICALIZE,
            options=(TargetOption("--device", key="device", commands=("compile",), is_flag=True, help="x"),)),
     ["compile", "--help"], "target option --device of target bad differs from target akida's"),
    (Target("bad", "clashing option", FAKE.backend, CANONICALIZE,
            options=(TargetOption("--json", key="json", commands=("run",), is_flag=True, help="x"),)),
     ["run", "--help"], "target option --json clashes with an option of `qanac run`"),
    (Target("bad", "clashing command", FAKE.backend, CANONICALIZE, commands={"compile": f"{__name__}:hello"}),
     ["--help"], "registered command compile clashes with a built-in qanac command"),
    (Target("bad", "broken command", FAKE.backend, CANONICALIZE, commands={"broken": "no_such_module:cmd"}),
     ["broken"], "cannot load command 'broken' (no_such_module:cmd): ModuleNotFoundError"),
])
def test_a_broken_registration_is_a_one_line_usage_error(registry, target, args, message):
    registry.register_target(target)
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_running_an_onnxruntime_bundle_imports_only_what_running_needs(small_model_path, small_calib_path, tmp_path):
    from qanac.compiler import CompileRequest, compile_model

    bundle = tmp_path / "bundle"
    compile_model(CompileRequest(source=str(small_model_path), target="onnxruntime", output=bundle,
                                 calibration=str(small_calib_path)))
    code = (
        "import sys\n"
        "from qanac.cli import cli\n"
        f"cli.main(['run', {str(bundle)!r}, '--input', {str(small_calib_path)!r}], prog_name='qanac',"
        " standalone_mode=False)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'akida', 'quantizeml')\n"
        "               or m == 'onnxruntime.quantization')\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr
