"""Bad inputs across compile, lint, verify, run, inspect, eval and export (the cases are in bad_inputs.py).

Each documented kind of error exits with its documented code, prints one error line and a hint (a lint
finding's fix), no traceback, leaves the folder it ran in exactly as it was, opens nothing in that folder
beyond the paths its command line names, and writes nothing there beyond the output's own place. The table
of errors in docs/cli.md is the list of cases. Also here: what must keep working next to the refusals
(inputs of every real dtype, --force on what qanac wrote, the clean-up of killed compiles).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qanac import bundle as bundle_io
from qanac.calibration import InputSpec, load_data
from qanac.cli import cli
from qanac.compiler import CompileRequest, compile_model
from qanac.diagnostics import UsageError
from qanac.execution import bundle_session, make_session
from qanac.registry import all_passes, unregister_pass
from tests.conftest import conv_bn_relu_softmax
from tests.core.bad_inputs import (
    CASES,
    DOC_BEGIN,
    DOC_END,
    Case,
    Recorder,
    Workspace,
    documented_codes,
    markdown_table,
    snapshot,
    typed_input_model,
)

REPO = Path(__file__).resolve().parents[2]
CLI_DOC = REPO / "docs" / "cli.md"
RECORDER = Recorder()
BY_ID = {case.id: case for case in CASES}
DOCUMENTED = documented_codes(CLI_DOC.read_text())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    """An onnxruntime bundle of conv_bn_relu_softmax (input x: N x 3 x 8 x 8, output probs: N x 5)."""

    root = tmp_path_factory.mktemp("compiled")
    onnx.save(conv_bn_relu_softmax(), str(root / "small.onnx"))
    np.save(root / "calib.npy", np.random.default_rng(1).uniform(0, 1, (16, 3, 8, 8)).astype(np.float32))
    compile_model(CompileRequest(source=str(root / "small.onnx"), target="onnxruntime", output=root / "bundle",
                                 calibration=str(root / "calib.npy")))
    return root / "bundle"


def test_the_documented_table_is_the_list_of_cases():
    text = CLI_DOC.read_text()
    documented = text.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0]
    assert documented == markdown_table(), "docs/cli.md's table of errors is stale: python -m tests.core.bad_inputs"
    assert len(BY_ID) == len(CASES) >= 40
    assert {case.command for case in CASES} >= {"compile", "lint", "verify", "run", "inspect", "eval", "export"}


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args[:-1]):
        if arg in names:
            return args[i + 1]
    return None


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


def _run_interrupted(args: list[str], cwd: Path, signum: int) -> tuple[int, str]:
    """Run qanac as a process of its own and send it ``signum`` once its staging directory exists."""

    process = subprocess.Popen([sys.executable, "-m", "qanac.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(cwd.glob(".out.staging-*/.qanac-staging")) and process.poll() is None:
        assert time.monotonic() < deadline, "no staging directory appeared"
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[0]
    process.send_signal(signum)
    sent = time.monotonic()
    output, _ = process.communicate(timeout=300)
    if signum != signal.SIGKILL:  # the cleanups run, and the process ends without the interpreter's teardown
        assert time.monotonic() - sent < 10, output
    return process.returncode, output


def _run(case: Case, args: list[str], root: Path) -> tuple[int, str]:
    """Run the case in this process with the recorder on; check what it opened and wrote below ``root``."""

    cwd = os.getcwd()
    named = {os.path.abspath(os.path.join(cwd, a)) for a in args}
    named = {n for n in named if _under(n, str(root))}
    output = _option(args, "-o", "--output")
    scratch = []
    if output is not None:
        out = os.path.abspath(os.path.join(cwd, output))
        scratch = [out, os.path.join(os.path.dirname(out), "." + os.path.basename(out) + ".")]
    allowed_writes = [*scratch, *(str(root / leave) for leave in case.leaves)]
    passes = {p.name for p in all_passes()}
    RECORDER.start(root)
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        RECORDER.stop()
        for name in {p.name for p in all_passes()} - passes:
            unregister_pass(name)
    read = sorted(p for p in RECORDER.read if not any(_under(p, n) for n in named)
                  and not any(p.startswith(a) for a in allowed_writes))
    written = sorted(p for p in RECORDER.written if not any(p.startswith(a) for a in allowed_writes))
    assert read == [], f"opened beyond the named paths: {read}"
    assert written == [], f"written beyond the output: {written}"
    return result.exit_code, result.output


@pytest.mark.parametrize("case_id, code", list(DOCUMENTED.items()), ids=list(DOCUMENTED))
def test_each_documented_error_exits_with_its_code_and_leaves_nothing(case_id, code, compiled, tmp_path,
                                                                      monkeypatch):
    case = BY_ID[case_id]
    assert case.code == code
    workspace = Workspace(tmp_path / "ws", compiled)
    workspace.root.mkdir()
    args = [str(a) for a in case.build(workspace)]
    cwd = workspace.root / (case.cwd or ".")
    before = snapshot(workspace.root)
    if case.interrupt is not None:
        exit_code, output = _run_interrupted(args, cwd, case.interrupt)
    else:
        monkeypatch.chdir(cwd)
        exit_code, output = _run(case, args, workspace.root)
    assert exit_code == code, output
    assert case.message in output, output
    assert "Traceback" not in output
    if code in (2, 3):
        lines = output.splitlines()
        assert any(line.startswith(("error:", "Error:")) for line in lines) or "error(s)" in output, output
        assert any(line.startswith(("hint:", "Try '", "    fix:")) for line in lines), f"no hint:\n{output}"
    def kept(state: dict[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:  # what the case may not touch
        return {k: v for k, v in state.items() if not any(k == leave or k.startswith(leave + os.sep)
                                                          for leave in case.leaves)}

    assert kept(snapshot(workspace.root)) == kept(before)


def test_the_recorder_sees_what_a_command_opens_and_writes(compiled, tmp_path, monkeypatch):
    """The checks above are not vacuous: a compile that succeeds is recorded reading its source and writing
    its output through the staging directory, and a path outside the named ones is reported."""

    workspace = Workspace(tmp_path, compiled)
    model, calib = workspace.model(), workspace.calib()
    monkeypatch.chdir(tmp_path)
    RECORDER.start(tmp_path)
    try:
        result = CliRunner().invoke(cli, ["compile", str(model), "-t", "onnxruntime", "--calib", str(calib),
                                          "-o", str(tmp_path / "out"), "--labels", str(workspace.text(
                                              "labels.txt", "a\nb\nc\nd\ne\n"))])
    finally:
        RECORDER.stop()
    assert result.exit_code == 0, result.output
    assert {str(model), str(calib)} <= RECORDER.read
    assert str(tmp_path / "out") in RECORDER.written
    assert any(Path(p).name.startswith(".out.staging-") for p in RECORDER.written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "labels.txt", "out", "small.onnx"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["labels"] == ["a", "b", "c", "d", "e"]


def test_bundle_models_are_loaded_without_following_their_external_data(compiled, tmp_path):
    """ONNX Runtime given the path of a model resolves external data itself and reads a file outside the
    bundle; bundle_session refuses the model first and hands ONNX Runtime only bytes."""

    workspace = Workspace(tmp_path, compiled)
    from tests.core.bad_inputs import _reference_data_outside

    crafted = _reference_data_outside(workspace)
    x = {"x": np.ones((2, 3, 8, 8), np.float32)}
    outside = make_session(str(crafted / "reference.onnx")).run(None, x)[0]
    np.testing.assert_allclose(outside, bundle_session(compiled / "reference.onnx").run(None, x)[0], rtol=1e-6)
    with pytest.raises(UsageError, match="keeps the data of tensor .* in another file"):
        bundle_session(crafted / "reference.onnx")


@pytest.mark.parametrize("dtype, low, high", [("uint8", 0, 255), ("int8", -128, 127), ("float16", 0.0, 1.0),
                                              ("float64", 0.0, 1.0)])
def test_inputs_are_fed_in_their_own_dtype(tmp_path, dtype, low, high):
    spec = [InputSpec("x", (1, 3, 8, 8), dtype)]
    data = load_data("random", spec, num_random=64)
    array = data.arrays["x"]
    assert array.dtype == np.dtype(dtype) and array.shape == (64, 3, 8, 8)
    if np.dtype(dtype).kind == "f":  # uint8 images through the default preprocessing: [0, 1]
        assert low <= array.min() < array.max() <= high
    else:  # the whole range of the dtype
        assert (array.min(), array.max()) == (low, high)
    np.save(tmp_path / "own.npy", array[:4])
    loaded = load_data(tmp_path / "own.npy", spec).arrays["x"]
    assert loaded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(loaded, array[:4])


def test_uint8_images_go_through_preprocessing_only_for_float_inputs(tmp_path):
    raw = np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8)
    np.save(tmp_path / "raw.npy", raw)
    as_float = load_data(tmp_path / "raw.npy", [InputSpec("x", (1, 3, 8, 8), "float16")])
    np.testing.assert_allclose(as_float.arrays["x"], (raw / 255).astype(np.float16))
    assert as_float.raw is not None and np.array_equal(as_float.raw["x"], raw)
    as_uint8 = load_data(tmp_path / "raw.npy", [InputSpec("x", (1, 3, 8, 8), "uint8")])
    assert np.array_equal(as_uint8.arrays["x"], raw) and as_uint8.raw is None


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_a_model_with_a_non_float32_input_compiles_on_random_data_and_verifies(tmp_path, dtype):
    model = tmp_path / "m.onnx"
    onnx.save(typed_input_model(dtype), str(model))
    result = CliRunner().invoke(cli, ["compile", str(model), "-t", "onnxruntime", "--calib", "random",
                                      "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    data = np.random.default_rng(0).integers(0, 256, (8, 3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "data.npy", data)  # uint8: fed as is to a uint8 input, preprocessed for a float16 one
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "b"), "--data", str(tmp_path / "data.npy"),
                                      "--min-agreement", "0.5"])
    assert result.exit_code == 0, result.output


def test_force_replaces_an_empty_directory_a_bundle_or_a_partial_output(compiled, tmp_path):
    """What --force may replace: the outputs qanac writes, and an empty directory; each replaced whole."""

    empty = tmp_path / "empty"
    empty.mkdir()
    bundle = Workspace(tmp_path, compiled).bundle()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model.onnx").write_bytes(b"onnx")
    (partial / "pipeline.json").write_text(json.dumps({"stopped_after": "infer-shapes"}))
    for out in (empty, bundle, partial):
        with bundle_io.staged_directory(out, force=True) as stage:
            (stage / "new.txt").write_text("new")
        assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "empty", "partial"]


def test_a_failed_compile_removes_the_parent_folders_it_created(tmp_path, small_model_path):
    out = tmp_path / "a" / "b" / "out"
    result = CliRunner().invoke(cli, ["compile", str(small_model_path), "-t", "onnxruntime", "--calib",
                                      str(tmp_path / "missing.npy"), "-o", str(out)])
    assert result.exit_code == 2 and "data not found" in result.output
    assert not (tmp_path / "a").exists()


def test_staging_directories_of_killed_compiles_are_removed_by_the_next_compile(tmp_path, small_model_path,
                                                                                small_calib_path):
    """SIGKILL leaves the staging directory; the next compile to the same output removes it and says so. A
    directory without qanac's marker, and one whose compile still runs, are left alone and named."""

    args = ["compile", str(small_model_path), "-t", "onnxruntime", "--calib", str(small_calib_path), "-o", "out"]
    code, _ = _run_interrupted(args, tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    (killed,) = tmp_path.glob(".out.staging-*")
    assert (killed / bundle_io.STAGING_MARKER).is_file()
    foreign = tmp_path / ".out.staging-mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not qanac's")
    running = tmp_path / ".out.staging-running"
    running.mkdir()
    (running / bundle_io.STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    elsewhere = tmp_path / ".other.staging-x"  # another output's
    elsewhere.mkdir()
    (elsewhere / bundle_io.STAGING_MARKER).write_text(json.dumps({"pid": 1 << 30, "host": socket.gethostname()}))

    result = CliRunner().invoke(cli, ["compile", str(small_model_path), "-t", "onnxruntime", "--calib",
                                      str(tmp_path / "missing.npy"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert f"note: removed {killed}, left by an interrupted compile" in result.output
    assert f"left {foreign} alone" in result.output and f"left {running} alone" in result.output
    assert not killed.exists() and (foreign / "keep.txt").exists() and running.exists() and elsewhere.exists()
    assert not (tmp_path / "out").exists()


IN_PASS = '''
import ctypes
import time
from pathlib import Path

from qanac.registry import register_pass


@register_pass("bad-inputs-{name}")
def run(model, ctx):
    """{doc}"""
    Path("started").touch()
{body}
'''
STUCK_IN_NATIVE_CODE = IN_PASS.format(name="stuck", doc="Native code that never returns, whatever signal arrives "
                                      "(a mutex locked twice), with the GIL released.", body='''
    mutex = ctypes.create_string_buffer(64)
    ctypes.CDLL(None).pthread_mutex_lock(mutex)
    ctypes.CDLL(None).pthread_mutex_lock(mutex)
''')
SLOW_CLEANUP = IN_PASS.format(name="slow-cleanup", doc="A pass whose clean-up after an interruption takes minutes.",
                              body='''
    try:
        time.sleep(300)
    finally:
        time.sleep(300)
''')


def _interrupt_a_pass(tmp_path: Path, model: Path, calib: Path, plugin: str, signals: int) -> tuple[int, str, float]:
    """Compile with the plugin's pass as the pipeline; once the pass runs, send SIGTERM ``signals`` times (0.5 s
    apart). Returns the exit code, the output and the seconds from the first signal to the exit."""

    name = plugin.split('"bad-inputs-', 1)[1].split('"', 1)[0]
    (tmp_path / "in_pass.py").write_text(plugin)
    process = subprocess.Popen([sys.executable, "-m", "qanac.cli", "compile", str(model), "-t", "onnxruntime",
                                "--calib", str(calib), "-o", "out", "--plugin", "in_pass.py", "--pipeline",
                                f"bad-inputs-{name}"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "started").exists():
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the pass did not start"
            time.sleep(0.05)
        assert list(tmp_path.glob(".out.staging-*"))
        time.sleep(2)  # from the pass's first line into its body (the native call, the sleep)
        first = time.monotonic()
        for i in range(signals):
            if i:
                time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        return process.returncode, output, time.monotonic() - first
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def test_sigterm_ends_a_compile_stuck_in_native_code_and_removes_its_staging(tmp_path, small_model_path,
                                                                              small_calib_path):
    """The main thread never returns to Python, so its SIGTERM handler cannot run: the signal watcher ends
    the process after FORCE_EXIT_GRACE seconds, with the staging directory removed."""

    from qanac.cli_support import FORCE_EXIT_GRACE

    code, output, seconds = _interrupt_a_pass(tmp_path, small_model_path, small_calib_path,
                                              STUCK_IN_NATIVE_CODE, signals=1)
    assert code == 128 + signal.SIGTERM, output
    assert "error: interrupted (SIGTERM), exiting at once" in output and "Traceback" not in output, output
    assert FORCE_EXIT_GRACE - 0.5 <= seconds < 10, (seconds, output)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_second_sigterm_ends_a_slow_cleanup_at_once(tmp_path, small_model_path, small_calib_path):
    """The first SIGTERM starts the cleanups (here one that would take minutes); the second ends the process
    at once, staging directory removed, well before the watcher's grace period."""

    from qanac.cli_support import FORCE_EXIT_GRACE

    code, output, seconds = _interrupt_a_pass(tmp_path, small_model_path, small_calib_path, SLOW_CLEANUP,
                                              signals=2)
    assert code == 128 + signal.SIGTERM, output
    assert "exiting at once" in output and "Traceback" not in output, output
    assert seconds < FORCE_EXIT_GRACE, (seconds, output)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_eval_of_a_ham10000_folder_writes_nothing_into_it(tmp_path, monkeypatch):
    """The resized images are cached in qanac's cache folder: the data folder stays as it was, and a second
    eval reads the cache instead of the images."""

    from onnx import numpy_helper

    from qanac.calibration import write_ham10000_fixture

    monkeypatch.setenv("QANAC_CACHE_DIR", str(tmp_path / "cache"))
    data = write_ham10000_fixture(tmp_path / "ham", images_per_class=12)
    before = snapshot(data)
    model = conv_bn_relu_softmax()  # with 7 classes, HAM10000's
    rng = np.random.default_rng(3)
    for init in model.graph.initializer:
        if init.name in ("fc_w", "fc_b"):
            shape = (7, 8) if init.name == "fc_w" else (7,)
            init.CopyFrom(numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), init.name))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7
    onnx.save(model, str(tmp_path / "ham7.onnx"))
    bundle = tmp_path / "bundle"
    compile_model(CompileRequest(source=str(tmp_path / "ham7.onnx"), target="onnxruntime", output=bundle,
                                 calibration="random"))
    for run in range(2):
        RECORDER.start(data)
        try:
            result = CliRunner().invoke(cli, ["eval", str(bundle), "--data", str(data), "-o", str(tmp_path / "e")])
        finally:
            RECORDER.stop()
        assert result.exit_code == 0, result.output
        assert RECORDER.written == set()
        assert any(p.endswith(".jpg") for p in RECORDER.read) == (run == 0)
    assert snapshot(data) == before
    assert len(list((tmp_path / "cache" / "ham10000").glob("*.npz"))) == 1
