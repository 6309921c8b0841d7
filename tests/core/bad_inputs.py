"""Bad inputs for every command, one ``Case`` per kind of error.

A case builds the files it needs in a folder of its own (``Workspace``) and returns the command line. The
suite (test_bad_inputs.py) runs it and checks the exit code, the one-line error and its hint, that no
traceback was printed, that the folder holds exactly what it held before (nothing left at the output, no
staging directory), and, with ``Recorder`` (an audit hook), that nothing in the folder was opened beyond the
paths the command line names, nor written beyond the output and its hidden siblings (``.OUT.*``).

docs/cli.md's table of errors is ``markdown_table()``; ``python -m tests.core.bad_inputs`` prints it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import struct
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from PIL import Image

from qanac.testing import parse
from tests.conftest import conv_bn_relu_softmax

DOC_BEGIN = "<!-- errors:begin -->\n"
DOC_END = "<!-- errors:end -->"
CONV_WEIGHTS = ", ".join(["0.1"] * (4 * 3 * 3 * 3))


def typed_input_model(dtype: str) -> onnx.ModelProto:
    """Cast(x: dtype[N,3,8,8]) -> Conv: a model whose input is not float32."""

    return parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g ({dtype}[N,3,8,8] x) => (float[N,4,8,8] y) <float[4,3,3,3] w = {{{CONV_WEIGHTS}}}> {{
      c = Cast<to=1>(x)
      y = Conv<pads=[1,1,1,1]>(c, w)
    }}""")


def relu_model(shape: str) -> onnx.ModelProto:
    return parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{shape}] x) => (float[{shape}] y) {{
      y = Relu(x)
    }}""")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` grey pixels (the pixel data is empty)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@dataclasses.dataclass
class Workspace:
    """The folder a case works in, and builders of what it needs there."""

    root: Path
    compiled: Path  # an onnxruntime bundle of conv_bn_relu_softmax, copied by ``bundle``

    def path(self, name: str) -> Path:
        return self.root / name

    def save(self, model: onnx.ModelProto, name: str) -> Path:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
        return path

    def model(self, name: str = "small.onnx") -> Path:
        """conv_bn_relu_softmax: input x (N, 3, 8, 8) float32, output probs (N, 5)."""

        return self.save(conv_bn_relu_softmax(), name)

    def array(self, name: str, value: Any) -> Path:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".npz"):
            np.savez(path, **value)
        else:
            np.save(path, value, allow_pickle=value.dtype.hasobject)
        return path

    def calib(self, name: str = "calib.npy", change: Callable[[np.ndarray], np.ndarray] | None = None) -> Path:
        """16 float32 samples for conv_bn_relu_softmax (``change`` applied first)."""

        x = np.random.default_rng(1).uniform(0, 1, (16, 3, 8, 8)).astype(np.float32)
        return self.array(name, x if change is None else change(x))

    def text(self, name: str, content: str | bytes) -> Path:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def bundle(self, name: str = "bundle") -> Path:
        path = self.path(name)
        shutil.copytree(self.compiled, path)
        return path

    def tampered(self, change: Callable[[Path], None], name: str = "bundle") -> Path:
        """A copy of the bundle changed by ``change`` with every checksum of its manifest made to match again."""

        path = self.bundle(name)
        change(path)
        manifest = json.loads((path / "manifest.json").read_text())
        for entry in manifest["files"].values():
            entry["sha256"] = hashlib.sha256((path / entry["path"]).read_bytes()).hexdigest()
        (path / "manifest.json").write_text(json.dumps(manifest))
        return path

    def edited(self, change: Callable[[dict[str, Any]], None], name: str = "bundle") -> Path:
        """A copy of the bundle whose manifest JSON is changed in place by ``change``."""

        path = self.bundle(name)
        manifest = json.loads((path / "manifest.json").read_text())
        change(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
        return path

    def outside(self) -> Path:
        """A folder beside the bundle that no command line names, holding a copy of the compiled model."""

        path = self.path("outside")
        path.mkdir(exist_ok=True)
        shutil.copy(self.compiled / "model.qdq.onnx", path / "x.onnx")
        return path


@dataclasses.dataclass(frozen=True)
class Case:
    """One kind of bad input: ``build`` makes the files in a Workspace and returns the command line (without
    ``qanac``). ``leaves`` are paths (relative to the workspace) the command may create, change or read besides
    the named ones (a dump folder, Python's bytecode cache beside a plugin);
    ``cwd`` is the working directory (relative) to run in; ``interrupt`` is a signal sent to the command
    once its staging directory exists (the case then runs as a process of its own)."""

    id: str
    code: int
    what: str
    message: str
    build: Callable[[Workspace], list[Any]]
    leaves: tuple[str, ...] = ()
    cwd: str | None = None
    interrupt: int | None = None

    @property
    def command(self) -> str:
        return self.id.split("-", 1)[0]


def _compile(ws: Workspace, *extra: Any, model: Path | None = None, calib: Any = None, out: str = "out",
             target: str = "onnxruntime") -> list:
    """A compile of ``model`` (default: the small model) with ``calib`` (default: 16 good samples) into
    ``out`` (relative to the workspace; "." as it is)."""

    return ["compile", model or ws.model(), "--target", target, "--calib", calib if calib is not None else ws.calib(),
            "-o", out if out == "." else ws.path(out), *extra]


def _without_output(ws: Workspace, existing: dict[str, str]) -> list:
    """A compile with --force and without -o whose default output, small.onnxruntime beside the model,
    holds ``existing``."""

    _mkdir(ws, "small.onnxruntime", existing)
    return ["compile", ws.model(), "--target", "onnxruntime", "--calib", ws.calib(), "--force"]


def _external_outside(ws: Workspace) -> Path:
    """An ONNX file whose weights live in a file outside its folder (``../w.bin``)."""

    model = conv_bn_relu_softmax()
    folder = ws.path("model")
    folder.mkdir()
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    shutil.move(folder / "w.bin", ws.path("w.bin"))
    stored = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in stored.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    (folder / "m.onnx").write_bytes(stored.SerializeToString())
    return folder / "m.onnx"


def _reference_data_outside(ws: Workspace) -> Path:
    """A bundle whose reference.onnx (checksum matching) keeps a weight in ``outside/w.bin``, as an absolute
    path, with the right bytes there."""

    outside = ws.outside()

    def change(bundle: Path) -> None:
        model = onnx.load(str(bundle / "reference.onnx"))
        tensor = model.graph.initializer[0]
        (outside / "w.bin").write_bytes(tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes())
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", str(outside / "w.bin")
        (bundle / "reference.onnx").write_bytes(model.SerializeToString())

    return ws.tampered(change)


def _unloadable(ws: Workspace) -> Path:
    """A bundle whose compiled model is valid ONNX (checksum matching) that ONNX Runtime cannot load."""

    model = parse("""
    <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
    g (float[N,3,8,8] x) => (float[N,5] probs) {
      probs = com.example.Mystery(x)
    }""")
    return ws.tampered(lambda b: (b / "model.qdq.onnx").write_bytes(model.SerializeToString()))


def _set_compiled_path(path: str) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        manifest["files"]["compiled"]["path"] = path
        manifest["segments"][0]["files"]["compiled"] = path

    return change


def _huge_declared_input(manifest: dict[str, Any]) -> None:
    manifest["inputs"][0]["shape"] = ["N", 3, 100000, 100000]


def _labels_in_bundle(ws: Workspace) -> Path:
    """The class names, kept inside the bundle ``out`` (which --force could otherwise replace)."""

    return ws.text(f"{ws.bundle('out').name}/labels.txt", "a\nb\nc\nd\ne\n")


def _fifo(ws: Workspace, name: str) -> Path:
    path = ws.path(name)
    os.mkfifo(path)
    return path


def _broken_manifest(ws: Workspace) -> Path:
    path = ws.bundle()
    (path / "manifest.json").write_text("{")
    return path


def _fifo_bundle(ws: Workspace) -> Path:
    """A bundle whose compiled model is a FIFO (opening it for reading would block)."""

    path = ws.bundle()
    (path / "model.qdq.onnx").unlink()
    os.mkfifo(path / "model.qdq.onnx")
    return path


def _path_outside_bundle(ws: Workspace) -> Path:
    """A bundle whose manifest names the compiled model as ../outside/x.onnx, an identical copy."""

    ws.outside()
    return ws.edited(_set_compiled_path("../outside/x.onnx"))


def _broken_plugin(ws: Workspace) -> Path:
    return ws.text("broken_pass.py", '''
from qanac.registry import register_pass


@register_pass("bad-inputs-broken-pass")
def broken(model, ctx):
    """A pass with a bug: it raises."""
    raise RuntimeError("a bug in the pass")
''')


def _labelled(ws: Workspace, labels: np.ndarray, name: str = "labelled.npz") -> Path:
    x = np.random.default_rng(2).uniform(0, 1, (len(labels), 3, 8, 8)).astype(np.float32)
    return ws.array(name, {"x": x, "labels": labels})


def _symlinked_dir(ws: Workspace) -> Path:
    ws.path("real").mkdir()
    ws.path("link").symlink_to(ws.path("real"))
    return ws.path("link")


def _mkdir(ws: Workspace, name: str, files: dict[str, str] | None = None) -> Path:
    path = ws.path(name)
    path.mkdir(parents=True, exist_ok=True)
    for file, content in (files or {}).items():
        (path / file).write_text(content)
    return path


def _image_folder(ws: Workspace, count: int) -> Path:
    folder = _mkdir(ws, "images")
    for i in range(count):
        Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


CASES: list[Case] = [
    # compile: the source model
    Case("compile-source-missing", 2, "the source model does not exist", "model not found",
         lambda ws: _compile(ws, model=ws.path("missing.onnx"))),
    Case("compile-source-not-onnx", 2, "the source is not an ONNX file", "not a readable ONNX model",
         lambda ws: _compile(ws, model=ws.text("garbage.onnx", "this is not onnx"))),
    Case("compile-source-fifo", 2, "the source is a FIFO (reading it would block)", "is not a regular file",
         lambda ws: _compile(ws, model=_fifo(ws, "model.onnx"))),
    Case("compile-source-truncated", 2, "the ONNX file is cut short", "not a readable ONNX model",
         lambda ws: _compile(ws, model=ws.text("cut.onnx", ws.model().read_bytes()[:300]))),
    Case("compile-external-data-outside", 2, "the model's external data lies outside its folder",
         "points outside the directory", lambda ws: _compile(ws, model=_external_outside(ws))),
    Case("compile-no-outputs", 2, "the model has no outputs", "has no outputs",
         lambda ws: _compile(ws, model=ws.save(parse("""
         <ir_version: 8, opset_import: ["" : 17]>
         g (float[N,3,8,8] x) => () {
           a = Relu(x)
         }"""), "no_outputs.onnx"))),
    Case("compile-string-input", 3, "an input qanac cannot feed (strings)", "qanac feeds inputs of real numbers",
         lambda ws: _compile(ws, calib="random", model=ws.save(parse("""
         <ir_version: 8, opset_import: ["" : 17]>
         g (string[N,3] x) => (string[N,3] y) {
           y = Identity(x)
         }"""), "strings.onnx"))),
    Case("compile-unknown-target", 2, "an unknown target", "unknown target",
         lambda ws: _compile(ws, target="nope")),
    Case("compile-weights-for-onnx", 2, "--weights for a source that is not a PyTorch factory",
         "--weights applies to a PyTorch module factory",
         lambda ws: _compile(ws, "--weights", ws.text("w.pt", "weights"))),
    Case("compile-option-of-other-target", 2, "an option of another target (--device for onnxruntime)",
         "is an option of target akida", lambda ws: _compile(ws, "--device", "SixNodesIPv2")),
    # compile: --input-shape
    Case("compile-input-shape-unparseable", 2, "--input-shape that is not a shape", "cannot parse --input-shape",
         lambda ws: _compile(ws, "--input-shape", "1,three,8,8")),
    Case("compile-input-shape-not-positive", 2, "--input-shape with a dim below 1", "not positive",
         lambda ws: _compile(ws, "--input-shape", "1,3,0,8")),
    Case("compile-input-shape-contradicts", 2, "--input-shape contradicting a static dim", "is fixed at",
         lambda ws: _compile(ws, "--input-shape", "1,3,9,9")),
    Case("compile-input-shape-huge", 2, "--input-shape whose calibration data would exceed 4 GiB",
         "above the limit of 4 GiB", lambda ws: _compile(ws, "--input-shape", "1,3,100000,100000", calib="random",
                                                         model=ws.save(relu_model("N,3,H,W"), "dynamic.onnx"))),
    Case("compile-declared-shape-huge", 2, "a declared input shape whose calibration data would exceed 4 GiB",
         "above the limit of 4 GiB",
         lambda ws: _compile(ws, calib="random", model=ws.save(relu_model("1,3,100000,100000"), "huge.onnx"))),
    # compile: calibration data
    Case("compile-calib-missing", 2, "--calib names no file", "data not found",
         lambda ws: _compile(ws, calib=ws.path("missing.npy"))),
    Case("compile-calib-unknown-kind", 2, "--calib of an unknown kind (.txt)", "unsupported data file",
         lambda ws: _compile(ws, calib=ws.text("calib.txt", "1 2 3"))),
    Case("compile-calib-not-numpy", 2, "an .npy that is not a NumPy array", "cannot read",
         lambda ws: _compile(ws, calib=ws.text("bad.npy", "not numpy"))),
    Case("compile-calib-npz-not-zip", 2, "an .npz that is not a NumPy archive", "is not a NumPy archive",
         lambda ws: _compile(ws, calib=ws.text("bad.npz", "not a zip"))),
    Case("compile-calib-pickle", 2, "an array of Python objects (pickle)", "holds Python objects",
         lambda ws: _compile(ws, calib=ws.array("objects.npy", np.array([[1, "a"]], dtype=object)))),
    Case("compile-calib-strings", 2, "an array of strings", "holds strings",
         lambda ws: _compile(ws, calib=ws.array("strings.npy", np.full((4, 3, 8, 8), "a")))),
    Case("compile-calib-complex", 2, "an array of complex numbers", "holds complex numbers",
         lambda ws: _compile(ws, calib=ws.calib(change=lambda x: x.astype(np.complex64)))),
    Case("compile-calib-nan", 2, "a NaN in the data (the first bad sample named)", "sample 5 holds nan",
         lambda ws: _compile(ws, calib=ws.calib(change=lambda x: np.where(np.arange(16)[:, None, None, None] == 5,
                                                                          np.nan, x).astype(np.float32)))),
    Case("compile-calib-inf", 2, "an infinity in the data", "sample 3 holds inf",
         lambda ws: _compile(ws, calib=ws.calib(change=lambda x: np.where(np.arange(16)[:, None, None, None] == 3,
                                                                          np.inf, x).astype(np.float32)))),
    Case("compile-calib-all-nan", 2, "data that is NaN throughout", "16 of 16 samples are not finite",
         lambda ws: _compile(ws, calib=ws.calib(change=lambda x: np.full_like(x, np.nan)))),
    Case("compile-calib-beyond-dtype", 2, "float64 data beyond the float32 range of the input",
         "values beyond the range of float32",
         lambda ws: _compile(ws, calib=ws.calib(change=lambda x: x.astype(np.float64) * 1e300))),
    Case("compile-calib-wrong-shape", 2, "data of another shape than the input", "expects (N, 3, 8, 8)",
         lambda ws: _compile(ws, calib=ws.array("wrong.npy", np.zeros((2, 3, 9, 9), np.float32)))),
    Case("compile-calib-nhwc", 2, "NHWC data for an NCHW input (the hint says so)", "transpose it to NCHW",
         lambda ws: _compile(ws, calib=ws.array("nhwc.npy", np.zeros((2, 8, 8, 3), np.float32)))),
    Case("compile-calib-empty", 2, "data without samples", "holds no samples",
         lambda ws: _compile(ws, calib=ws.array("empty.npy", np.zeros((0, 3, 8, 8), np.float32)))),
    Case("compile-calib-npz-names", 2, "an .npz whose arrays are not named after the inputs",
         "no array for input(s) ['x']", lambda ws: _compile(ws, calib=ws.array("named.npz", {
             "a": np.zeros((2, 3, 8, 8), np.float32), "b": np.zeros((2, 3, 8, 8), np.float32)}))),
    Case("compile-calib-npz-labels", 2, "an .npz whose labels do not match its samples",
         "expected one class index", lambda ws: _compile(ws, calib=ws.array("labelled.npz", {
             "x": np.zeros((4, 3, 8, 8), np.float32), "labels": np.arange(3)}))),
    Case("compile-calib-fifo", 2, "--calib naming a FIFO (reading it would block)", "is not a regular file",
         lambda ws: _compile(ws, calib=_fifo(ws, "calib.npy"))),
    Case("compile-calib-image-folder-empty", 2, "an image folder without images", "no images",
         lambda ws: _compile(ws, calib=_mkdir(ws, "images", {"notes.txt": "none"}))),
    Case("compile-calib-float-for-uint8", 2, "float data for a uint8 input", "the input takes uint8",
         lambda ws: _compile(ws, model=ws.save(typed_input_model("uint8"), "uint8.onnx"))),
    Case("compile-calib-out-of-range", 2, "integers outside an int8 input's range", "outside int8's range",
         lambda ws: _compile(ws, model=ws.save(typed_input_model("int8"), "int8.onnx"),
                             calib=ws.array("int16.npy", np.full((2, 3, 8, 8), 300, np.int16)))),
    Case("compile-num-calib-zero", 2, "--num-calib 0", "Invalid value for '--num-calib'",
         lambda ws: _compile(ws, "--num-calib", "0")),
    # compile: preprocessing and labels
    Case("compile-std-zero", 2, "--std 0", "has a zero", lambda ws: _compile(ws, "--std", "0")),
    Case("compile-mean-channels", 2, "--mean with neither 1 nor one value per channel",
         "has 2 values for an input of 3 channels", lambda ws: _compile(ws, "--mean", "0.5,0.5")),
    Case("compile-labels-count", 2, "a labels file whose line count differs from the output's classes",
         "names 3 classes but output 'probs' has 5",
         lambda ws: _compile(ws, "--labels", ws.text("l.txt", "a\nb\nc\n"))),
    Case("compile-labels-not-text", 2, "a labels file that is not UTF-8 text", "cannot read labels file",
         lambda ws: _compile(ws, "--labels", ws.text("l.txt", b"\xff\xfe\x00bad"))),
    # compile: the output
    Case("compile-output-exists", 2, "an existing output without --force", "already exists",
         lambda ws: _compile(ws, out=_mkdir(ws, "out").name)),
    Case("compile-output-is-file", 2, "an output that is a file", "exists and is not a directory",
         lambda ws: _compile(ws, "--force", out=ws.text("out", "a file").name)),
    Case("compile-output-below-file", 2, "an output below a file (-o model.onnx/out)", "is a file, not a directory",
         lambda ws: _compile(ws, out="small.onnx/out")),
    Case("compile-output-unwritable", 2, "an output where nothing can be written (/proc)", "cannot write output",
         lambda ws: _compile(ws, out="/proc/qanac-out")),
    Case("compile-output-symlink", 2, "an output that is a symbolic link", "is a symbolic link",
         lambda ws: _compile(ws, "--force", out=_symlinked_dir(ws).name)),
    Case("compile-force-unrelated", 2, "--force on a folder of unrelated files", "is not a qanac bundle",
         lambda ws: _compile(ws, "--force", out=_mkdir(ws, "out", {"thesis.tex": "x"}).name)),
    Case("compile-default-output-unrelated", 2, "no -o, --force, and the default output beside the model "
         "(small.onnxruntime) holds unrelated files", "is not a qanac bundle",
         lambda ws: _without_output(ws, {"thesis.tex": "x"}), leaves=("small.onnxruntime",)),
    Case("compile-force-source-folder", 2, "--force on the folder holding the source model", "which this command reads",
         lambda ws: _compile(ws, "--force", model=ws.model("project/small.onnx"), out="project")),
    Case("compile-force-labels-folder", 2, "--force on a bundle holding the --labels file",
         "which this command reads", lambda ws: _compile(ws, "--force", "--labels", _labels_in_bundle(ws))),
    Case("compile-force-working-directory", 2, "--force on the working directory (-o .)", "the working directory",
         lambda ws: _compile(ws, "--force", out="."), cwd="."),
    Case("compile-force-bad-manifest", 2, "--force on a folder whose manifest.json is not qanac's",
         "not a valid qanac manifest", lambda ws: _compile(ws, "--force", out=_mkdir(
             ws, "out", {"manifest.json": '{"format_version": 2}'}).name)),
    Case("compile-dump-dir-is-file", 2, "--dump-dir naming a file", "--dump-dir", lambda ws: _compile(
        ws, "--dump-dir", ws.text("dumps", "a file"))),
    Case("compile-dump-dir-in-output", 2, "--dump-dir inside the output", "which this command reads or writes",
         lambda ws: _compile(ws, "--dump-dir", ws.path("out/dumps"))),
    # compile: passes
    Case("compile-unknown-pass", 2, "--disable-pass naming no pass", "unknown pass 'nope'",
         lambda ws: _compile(ws, "--disable-pass", "nope")),
    Case("compile-pass-option-syntax", 2, "--pass-option that is not PASS.KEY=VALUE", "cannot parse --pass-option",
         lambda ws: _compile(ws, "--pass-option", "nodot")),
    Case("compile-pass-option-unknown-pass", 2, "--pass-option naming no pass", "unknown pass 'nope'",
         lambda ws: _compile(ws, "--pass-option", "nope.key=1")),
    Case("compile-pass-option-idle-pass", 2, "--pass-option for a pass that does not run in this compile",
         "not in the onnxruntime pipeline", lambda ws: _compile(ws, "--pass-option", "bound-relu.percentile=99")),
    Case("compile-pass-option-unknown-key", 2, "--pass-option naming a key the pass does not declare",
         "pass 'fold-constants' has no option 'depth'",
         lambda ws: _compile(ws, "--pass-option", "fold-constants.depth=1")),
    Case("compile-plugin-missing", 2, "--plugin naming no Python file", "plugin not found",
         lambda ws: _compile(ws, "--plugin", ws.path("missing.py"))),
    Case("compile-broken-pass", 4, "a pass that raises: a bug, with a reproducer (not a user error)",
         "reproducer written to", lambda ws: _compile(ws, "--plugin", _broken_plugin(ws), "--pipeline",
                                                       "bad-inputs-broken-pass", "--dump-dir", ws.path("dumps")),
         leaves=("dumps", "__pycache__")),
    # compile: interrupted
    Case("compile-sigterm", 128 + signal.SIGTERM, "SIGTERM during a compile: the staging directory is removed",
         "interrupted (SIGTERM)", lambda ws: _compile(ws), interrupt=signal.SIGTERM),
    Case("compile-sigint", 128 + signal.SIGINT, "SIGINT (Ctrl-C) during a compile: the staging directory is removed",
         "interrupted (SIGINT)", lambda ws: _compile(ws), interrupt=signal.SIGINT),
    # lint
    Case("lint-source-missing", 2, "the source model does not exist", "model not found",
         lambda ws: ["lint", ws.path("missing.onnx"), "--target", "onnxruntime"]),
    Case("lint-source-fifo", 2, "a TorchScript source that is a FIFO (reading it would block)",
         "is not a regular file", lambda ws: ["lint", _fifo(ws, "model.pt"), "--target", "onnxruntime"]),
    Case("lint-unknown-target", 2, "an unknown target", "unknown target",
         lambda ws: ["lint", ws.model(), "--target", "nope"]),
    Case("lint-input-shape-contradicts", 2, "--input-shape contradicting a static dim", "is fixed at",
         lambda ws: ["lint", ws.model(), "--target", "onnxruntime", "--input-shape", "1,3,9,9"]),
    Case("lint-unsupported", 3, "nodes the target has no rule for (Tanh on akida)", "1 error(s)",
         lambda ws: ["lint", ws.save(parse(f"""
         <ir_version: 8, opset_import: ["" : 17]>
         g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[4,3,3,3] w = {{{CONV_WEIGHTS}}}> {{
           c = Conv<pads=[1,1,1,1]>(x, w)
           y = Tanh(c)
         }}"""), "tanh.onnx"), "--target", "akida"]),
    # verify
    Case("verify-not-a-bundle", 2, "a folder that is not a bundle", "is not a qanac bundle",
         lambda ws: ["verify", _mkdir(ws, "notes", {"a.txt": "x"}), "--data", ws.calib()]),
    Case("verify-manifest-not-json", 2, "a manifest that is not JSON", "is not valid JSON",
         lambda ws: ["verify", _broken_manifest(ws), "--data", ws.calib()]),
    Case("verify-path-outside", 2, "a manifest naming a file outside the bundle (checksum matching)",
         "leaves the bundle directory", lambda ws: ["verify", _path_outside_bundle(ws), "--data", ws.calib()]),
    Case("verify-fifo", 2, "a bundle file that is a FIFO", "not a regular file",
         lambda ws: ["verify", _fifo_bundle(ws), "--data", ws.calib()]),
    Case("verify-model-not-onnx", 2, "a bundle model that is not ONNX (checksum matching)",
         "is not a readable ONNX model",
         lambda ws: ["verify", ws.tampered(lambda b: (b / "model.qdq.onnx").write_bytes(b"garbage")),
                     "--data", ws.calib()]),
    Case("verify-model-unloadable", 2, "a bundle model ONNX Runtime cannot load (checksum matching)",
         "cannot be loaded by ONNX Runtime", lambda ws: ["verify", _unloadable(ws), "--data", ws.calib()]),
    Case("verify-external-data-outside", 2, "a bundle model whose external data lies outside the bundle",
         "keeps the data of tensor", lambda ws: ["verify", _reference_data_outside(ws), "--data", ws.calib()]),
    Case("verify-data-missing", 2, "--data names no file", "data not found",
         lambda ws: ["verify", ws.bundle(), "--data", ws.path("missing.npy")]),
    Case("verify-data-nan", 2, "a NaN in the data", "sample 2 holds nan",
         lambda ws: ["verify", ws.bundle(), "--data", ws.calib(change=lambda x: np.where(
             np.arange(16)[:, None, None, None] == 2, np.nan, x).astype(np.float32))]),
    Case("verify-data-wrong-shape", 2, "data of another shape than the input", "expects (N, 3, 8, 8)",
         lambda ws: ["verify", ws.bundle(), "--data", ws.array("wrong.npy", np.zeros((2, 3, 9, 9), np.float32))]),
    Case("verify-data-npz-extra", 2, "an .npz with an array that names no input", "name no model input",
         lambda ws: ["verify", ws.bundle(), "--data", ws.array("extra.npz", {
             "x": np.zeros((2, 3, 8, 8), np.float32), "y": np.zeros((2, 3, 8, 8), np.float32)})]),
    Case("verify-below-threshold", 1, "the compiled model disagrees beyond a threshold (not a user error)",
         "--min-sqnr", lambda ws: ["verify", ws.bundle(), "--data", ws.calib(), "--min-sqnr", "200"],
         leaves=("bundle/report.html", "bundle/.report.html.", "bundle/results.json", "bundle/.results.json.")),
    # run
    Case("run-image-missing", 2, "an image file that does not exist", "image not found",
         lambda ws: ["run", ws.bundle(), "--input", ws.path("missing.png")]),
    Case("run-image-not-an-image", 2, "a .png that is not an image", "cannot read image",
         lambda ws: ["run", ws.bundle(), "--input", ws.text("fake.png", "not an image")]),
    Case("run-image-fifo", 2, "an image that is a FIFO (reading it would block)", "is not a regular file",
         lambda ws: ["run", ws.bundle(), "--input", _fifo(ws, "camera.png")]),
    Case("run-image-too-large", 2, "an image of more pixels than the limit", "above the limit",
         lambda ws: ["run", ws.bundle(), "--input", ws.text("huge.png", png_header(9500, 9500))]),
    Case("run-declared-shape-huge", 2, "a bundle input so large that the images would exceed 4 GiB",
         "above the limit of 4 GiB", lambda ws: ["run", ws.edited(_huge_declared_input), "--input",
                                                 _image_folder(ws, 2)]),
    Case("run-data-complex", 2, "an array of complex numbers", "holds complex numbers",
         lambda ws: ["run", ws.bundle(), "--input", ws.calib(change=lambda x: x.astype(np.complex128))]),
    Case("run-output-dir-missing", 2, "-o in a folder that does not exist", "does not exist",
         lambda ws: ["run", ws.bundle(), "--input", ws.calib(), "-o", ws.path("missing/preds.npy")]),
    Case("run-output-is-directory", 2, "-o naming a folder", "is a directory",
         lambda ws: ["run", ws.bundle(), "--input", ws.calib(), "-o", _mkdir(ws, "preds.npy")]),
    Case("run-output-suffix", 2, "-o that is neither .npy nor .npz", "must end in .npy or .npz",
         lambda ws: ["run", ws.bundle(), "--input", ws.calib(), "-o", ws.path("preds.txt")]),
    Case("run-option-of-other-target", 2, "an option of another target (--hardware for onnxruntime)",
         "is an option of target akida",
         lambda ws: ["run", ws.bundle(), "--input", ws.calib(), "--hardware"]),
    # inspect
    Case("inspect-missing", 2, "the model does not exist", "model not found",
         lambda ws: ["inspect", ws.path("missing.onnx")]),
    Case("inspect-not-onnx", 2, "a file that is not ONNX", "not a readable ONNX model",
         lambda ws: ["inspect", ws.text("garbage.onnx", "this is not onnx")]),
    Case("inspect-fifo", 2, "a FIFO (reading it would block)", "is not a regular file",
         lambda ws: ["inspect", _fifo(ws, "model.onnx")]),
    Case("inspect-directory", 2, "a folder", "is a directory", lambda ws: ["inspect", _mkdir(ws, "models")]),
    Case("inspect-external-data-outside", 2, "external data outside the model's folder",
         "points outside the directory", lambda ws: ["inspect", _external_outside(ws)]),
    # eval
    Case("eval-not-a-bundle", 2, "a folder that is not a bundle", "is not a qanac bundle",
         lambda ws: ["eval", _mkdir(ws, "notes", {"a.txt": "x"}), "--data", _labelled(ws, np.arange(4) % 5)]),
    Case("eval-no-labels", 2, "data without labels", "has no labels",
         lambda ws: ["eval", ws.bundle(), "--data", ws.calib()]),
    Case("eval-labels-length", 2, "labels that do not match the samples", "expected one class index",
         lambda ws: ["eval", ws.bundle(), "--data", ws.array("labelled.npz", {
             "x": np.zeros((4, 3, 8, 8), np.float32), "labels": np.arange(5)})]),
    Case("eval-labels-beyond-classes", 2, "labels beyond the output's classes", "output 'probs' has 5 classes",
         lambda ws: ["eval", ws.bundle(), "--data", _labelled(ws, np.arange(8))]),
    Case("eval-output-is-file", 2, "-o naming a file", "is a file, not a directory",
         lambda ws: ["eval", ws.bundle(), "--data", _labelled(ws, np.arange(4)), "-o", ws.text("results", "x")]),
    # export
    Case("export-source-missing", 2, "the source does not exist", "model not found",
         lambda ws: ["export", ws.path("missing.onnx"), "-o", ws.path("out.onnx")]),
    Case("export-source-fifo", 2, "a Keras source that is a FIFO (reading it would block)", "is not a regular file",
         lambda ws: ["export", _fifo(ws, "model.keras"), "-o", ws.path("out.onnx")]),
    Case("export-output-exists", 2, "an existing output without --force", "already exists",
         lambda ws: ["export", ws.model(), "-o", ws.text("out.onnx", "old")]),
    Case("export-output-is-directory", 2, "-o naming a folder", "is a directory",
         lambda ws: ["export", ws.model(), "-o", _mkdir(ws, "out.onnx"), "--force"]),
    Case("export-output-dir-missing", 2, "-o in a folder that does not exist", "does not exist",
         lambda ws: ["export", ws.model(), "-o", ws.path("missing/out.onnx")]),
    Case("export-output-unwritable", 2, "-o where nothing can be written (/proc)", "cannot write output",
         lambda ws: ["export", ws.model(), "-o", "/proc/qanac.onnx"]),
    Case("export-shape-huge", 2, "a declared input shape whose check sample would exceed 4 GiB",
         "above the limit of 4 GiB",
         lambda ws: ["export", ws.save(relu_model("1,3,100000,100000"), "huge.onnx"), "-o", ws.path("out.onnx")]),
]


def markdown_table() -> str:
    """docs/cli.md's table of errors: one row per case."""

    rows = ["| case | command | exit | error |", "|---|---|---|---|"]
    rows += [f"| `{c.id}` | {c.command} | {c.code} | {c.what} |" for c in CASES]
    return "\n".join(rows) + "\n"


def documented_codes(text: str) -> dict[str, int]:
    """The case ids and exit codes of the table between the markers in docs/cli.md."""

    table = text.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0]
    codes = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        codes[cells[0].strip("`")] = int(cells[2])
    return codes


class Recorder:
    """An audit hook recording, while ``root`` is set, the paths below it that are opened (reads and writes
    apart) or changed (created, renamed, removed)."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    # event -> (how many leading arguments are paths, the positions of its directory descriptors)
    CHANGES = {"os.mkdir": (1, (2,)), "os.rename": (2, (2, 3)), "os.remove": (1, (1,)), "os.rmdir": (1, (1,)),
               "shutil.rmtree": (1, ()), "os.symlink": (2, (2,)), "os.link": (2, (2, 3)), "os.truncate": (1, ()),
               "os.chmod": (1, (2,)), "os.utime": (1, (3,))}

    def __init__(self) -> None:
        self.root: str | None = None
        self.read: set[str] = set()
        self.written: set[str] = set()
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.root is None:
            return
        if event == "open":
            paths, write = args[:1], isinstance(args[2], int) and bool(args[2] & self.WRITE_FLAGS)
            if isinstance(args[1], str) and any(m in args[1] for m in "wax+"):
                write = True
            if args[1] is None and not write and not os.path.isabs(os.fsdecode(args[0])):
                return  # os.open of a name relative to a directory descriptor (shutil.rmtree's walk)
        elif event in self.CHANGES:
            count, descriptors = self.CHANGES[event]
            if any(i < len(args) and args[i] not in (None, -1) for i in descriptors):
                return  # a name relative to a directory descriptor, inside a shutil.rmtree recorded already
            paths, write = args[:count], True
        else:
            return
        for path in paths:
            if not isinstance(path, (str, bytes, os.PathLike)):
                continue
            full = os.path.abspath(os.fsdecode(path))
            if full == self.root or full.startswith(self.root + os.sep):
                (self.written if write else self.read).add(full)

    def start(self, root: Path) -> None:
        self.read.clear()
        self.written.clear()
        self.root = os.path.abspath(root)

    def stop(self) -> None:
        self.root = None


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path below ``root`` with its kind and size (files) — what a failed command must leave as it was."""

    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            result[str(path.relative_to(root))] = (kind, info.st_size if kind == "file" else 0)
    return result


if __name__ == "__main__":
    print(markdown_table(), end="")
