"""The commands in docs/from-pytorch.md and docs/from-keras.md, run as written in a scratch directory.

Python blocks whose first line is ``# name.py`` are written to that file; every line of an ``sh`` block is
a command, run through the ``qanac`` CLI as a user would.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
GUIDES = ["from-pytorch.md", "from-keras.md"]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)

pytestmark = pytest.mark.slow


def documented(guide: str) -> tuple[dict[str, str], list[list[str]]]:
    """The files (name -> source) and the commands (argv lists) of a guide, in order."""

    files, commands = {}, []
    for language, body in BLOCK.findall((DOCS / guide).read_text()):
        first = body.splitlines()[0] if body.strip() else ""
        if language == "python" and re.fullmatch(r"# [\w.]+\.py", first):
            files[first[2:]] = body
        elif language == "sh":
            commands.extend(shlex.split(line) for line in body.splitlines() if line.strip())
    return files, commands


def run_cli(argv: list[str], cwd: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qanac.cli", *argv], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"qanac {' '.join(argv)}\n{proc.stdout}\n{proc.stderr}"


def run_guide(guide: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    files, commands = documented(guide)
    assert commands, f"{guide} documents no commands"
    for name, source in files.items():
        (folder / name).write_text(source)
    monkeypatch.chdir(folder)
    written = []
    for argv in commands:
        if argv[0] == "python":
            proc = subprocess.run([sys.executable, *argv[1:]], cwd=folder, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr
        elif argv[:2] == ["qanac", "export"]:
            run_cli(argv[1:], folder)
            written.append(folder / argv[argv.index("-o") + 1])
        elif argv[0] == "qanac":
            run_cli(argv[1:], folder)
            written.append(folder / argv[argv.index("-o") + 1] / "manifest.json")
        else:
            raise AssertionError(f"{guide}: unexpected command {argv}")
    return written


def check_outputs(written: list[Path]) -> None:
    for path in written:
        assert path.exists(), path
        if path.suffix == ".onnx":
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
            assert "Transpose" not in [n.op_type for n in model.graph.node]
            dims = model.graph.input[0].type.tensor_type.shape.dim
            assert [d.dim_value for d in dims[1:]] == [3, 32, 32]


@pytest.mark.parametrize("guide", GUIDES)
def test_documented_commands(guide, tmp_path, monkeypatch):
    check_outputs(run_guide(guide, tmp_path, monkeypatch))
