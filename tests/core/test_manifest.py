"""The typed manifest: round trip, schema violations named by field, the previous format still read, and
crafted bundles that `qanac verify` and `qanac run` refuse with exit 2 before opening anything outside."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qanac.bundle import MANIFEST, Bundle
from qanac.calibration import CalibrationData, Preprocessing
from qanac.cli import cli
from qanac.compiler import CompileRequest, compile_model
from qanac.diagnostics import UsageError
from qanac.manifest import FORMAT_VERSION, Manifest, ManifestError, PassApplied, SegmentRecord
from qanac.verify import run_bundle
from tests.conftest import conv_bn_relu_softmax

# Paths a crafted manifest pointed qanac at and qanac opened (the audit hook records while ``WATCHED`` is set).
WATCHED: list[Path] = []
OPENED: list[str] = []


def _record_opens(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and WATCHED and isinstance(args[0], (str, bytes, os.PathLike)):
        real = os.path.realpath(os.fsdecode(args[0]))
        if any(real.startswith(str(w)) for w in WATCHED):
            OPENED.append(real)


sys.addaudithook(_record_opens)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, Path]:
    """An onnxruntime bundle of the small conv net, and 16 calibration samples."""

    root = tmp_path_factory.mktemp("compiled")
    onnx.save(conv_bn_relu_softmax(), str(root / "small.onnx"))
    np.save(root / "calib.npy", np.random.default_rng(1).uniform(0, 1, (16, 3, 8, 8)).astype(np.float32))
    compile_model(CompileRequest(source=str(root / "small.onnx"), target="onnxruntime", output=root / "bundle",
                                 calibration=str(root / "calib.npy")))
    return root / "bundle", root / "calib.npy"


@pytest.fixture
def crafted(compiled, tmp_path) -> tuple[Path, Path, Path]:
    """A copy of the compiled bundle to tamper with, the data, and a folder outside the bundle holding a copy
    of its compiled model (same checksum)."""

    bundle, data = compiled
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(bundle / "model.qdq.onnx", outside / "x.onnx")
    return copy, data, outside


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Apply ``change`` to the manifest's JSON: it edits the document in place, or returns its replacement."""

    data = json.loads((bundle / MANIFEST).read_text())
    replaced = change(data)
    (bundle / MANIFEST).write_text(json.dumps(data if replaced is None else replaced))


def drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    """A change deleting the field at ``keys`` (a path into the manifest's JSON)."""

    def change(data: dict[str, Any]) -> None:
        for key in keys[:-1]:
            data = data[key]
        del data[keys[-1]]

    return change


def set_compiled_path(path: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["files"]["compiled"]["path"] = path
        data["segments"][0]["files"]["compiled"] = path

    return change


def test_manifest_round_trips_through_json_with_its_types(compiled):
    bundle, _ = compiled
    manifest = Bundle.open(bundle).manifest
    assert manifest.format_version == FORMAT_VERSION == 3
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert isinstance(manifest.segments[0], SegmentRecord) and manifest.segments[0].files == {
        "compiled": "model.qdq.onnx"}
    assert isinstance(manifest.inputs[0].preprocessing, Preprocessing)
    assert manifest.segments[0].device == manifest.device == "cpu" and manifest.segments[0].backend == {}
    # a measured change that was infinite is written as the string "inf" and read back as a float
    applied = PassApplied(name="p", counts={"r": 1}, seconds=0.5, exact=False, max_abs_change=float("inf"),
                          details={})
    from qanac.bundle import json_text

    assert PassApplied.from_dict(json.loads(json_text(applied))) == applied


@pytest.mark.parametrize("change, field, problem", [
    (drop("files"), "files", "is missing"),
    (lambda d: [d], "(top level)", "must be a JSON object, not an array"),
    (lambda d: d.update(inputs="x"), "inputs", "must be an array, not a string"),
    (lambda d: d.update(extra=1), "extra", "is not a field of this format"),
    (lambda d: d["segments"][0].update(macs=True), "segments[0].macs", "must be an integer, not a boolean"),
    (lambda d: d["segments"][0].update(kind="fpga"), "segments[0].kind", "allowed: 'device', 'host'"),
    (lambda d: d["inputs"][0]["preprocessing"].update(mean="0"), "inputs[0].preprocessing.mean", "must be an array"),
    (lambda d: d["post_processing"][0].update(op="Exp"), "post_processing[0].op", "allowed"),
    (lambda d: d["post_processing"][0].update(output="nope"), "post_processing[0].output", "not an output"),
    (lambda d: d["post_processing"][0].update(axis=2), "post_processing[0].axis", "outside the output's 2 axes"),
    (drop("files", "reference"), "files.reference", "is missing"),
    (drop("files", "compiled"), "segments[0].files.compiled", "which 'files' does not checksum"),
    (lambda d: d["segments"][0].update(inputs=["t"]), "segments[0].inputs", "neither a model input"),
    (lambda d: d["segments"][0].update(outputs=[]), "outputs[0].name", "which no segment produces"),
    (lambda d: d["segments"][0].update(target="host"), "segments[0].target", "not the bundle's"),
    (lambda d: d["segments"][0].update(dir="../b"), "segments[0].dir", "leaves the bundle directory"),
    (lambda d: d["files"]["compiled"].update(path="."), "files.compiled.path", "names the bundle directory"),
    (lambda d: d.update(format_version="2"), "format_version", "is missing or not an integer"),
])
def test_schema_violations_name_the_field(compiled, change, field, problem):
    data = json.loads((compiled[0] / MANIFEST).read_text())
    replaced = change(data)
    with pytest.raises(ManifestError, match=problem) as caught:
        Manifest.from_dict(data if replaced is None else replaced)
    assert caught.value.field == field.replace("(top level)", "") and f"'{field}'" in caught.value.message
    assert caught.value.exit_code == 2


def test_an_unknown_format_version_is_refused_with_the_way_out(compiled):
    data = json.loads((compiled[0] / MANIFEST).read_text())
    with pytest.raises(UsageError, match="format 4; this qanac reads formats 1, 2, 3") as caught:
        Manifest.from_dict({**data, "format_version": 4})
    assert caught.value.hint == "update qanac"


def to_format_2(data: dict[str, Any]) -> dict[str, Any]:
    """A format-3 manifest as format 2 wrote it: no per-segment source and hardware MACs, and the
    partition's ``device_macs`` the MACs of its device segments."""

    segments = [{k: v for k, v in s.items() if k not in ("source_macs", "hardware_macs")} for s in data["segments"]]
    partition = {k: v for k, v in data["partition"].items()
                 if k not in ("device_segment_macs", "legalized_macs", "mac_growth")}
    partition["device_macs"] = data["partition"]["device_segment_macs"]
    return {**data, "format_version": 2, "segments": segments, "partition": partition}


def as_read_from_format_2(manifest: Manifest) -> Manifest:
    """What reading ``manifest`` written as format 2 gives: no per-segment source or hardware MACs."""

    segments = [dataclasses.replace(s, source_macs=None, hardware_macs=None) for s in manifest.segments]
    return dataclasses.replace(manifest, segments=segments)


def to_format_1(data: dict[str, Any]) -> dict[str, Any]:
    """A format-3 manifest as qanac before format 2 wrote it: a device segment's device and backend fields
    merged into the segment (the fields under the target's name), the first device segment's also at the
    top level; host segments without ``variants``."""

    data = to_format_2(data)
    v1 = {**data, "format_version": 1}
    v1["segments"] = []
    for segment in data["segments"]:
        segment = dict(segment)
        device, backend = segment.pop("device"), segment.pop("backend")
        if segment["kind"] == "device":
            merged = {"device": device, **({segment["target"]: backend} if backend else {})}
            segment.update(merged)
            if not any(s["kind"] == "device" for s in v1["segments"]):
                v1.update(merged)
        else:
            segment.pop("variants")
        v1["segments"].append(segment)
    return v1


def test_format_1_bundles_are_read_and_run_unchanged(compiled, tmp_path):
    bundle, data_path = compiled
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    edit_manifest(old, to_format_1)
    v1 = json.loads((old / MANIFEST).read_text())
    assert v1["format_version"] == 1 and v1["segments"][0]["device"] == "cpu" and "backend" not in v1["segments"][0]
    opened = Bundle.open(old)
    assert opened.manifest == as_read_from_format_2(Bundle.open(bundle).manifest)
    data = CalibrationData(arrays={"x": np.load(data_path)}, source="test", preprocessing=Preprocessing())
    np.testing.assert_array_equal(run_bundle(opened, data)[0], run_bundle(Bundle.open(bundle), data)[0])


def test_format_2_bundles_are_read_with_device_macs_on_the_hardware(compiled, tmp_path):
    """Format 2's device_macs were the device segments' MACs (a bundle with 88.4 % on the hardware said
    device_macs == total_macs); format 3's are the hardware's, as device_mac_share states."""

    bundle, _ = compiled
    old = tmp_path / "v2"
    shutil.copytree(bundle, old)

    def gxnor_like(data: dict[str, Any]) -> dict[str, Any]:
        v2 = to_format_2(data)
        v2["partition"].update(total_macs=1000, device_macs=1000, device_mac_share=0.884)
        return v2

    edit_manifest(old, gxnor_like)
    partition = Bundle.open(old).manifest.partition
    assert partition.device_macs == 884 and partition.device_segment_macs == partition.total_macs == 1000
    assert partition.legalized_macs == 1000 and partition.mac_growth == {}
    assert partition.device_macs / partition.total_macs == partition.device_mac_share


def test_format_1_backend_fields_move_into_the_backend_record():
    segment = {"name": "seg0", "kind": "device", "dir": ".", "target": "t", "inputs": ["x"], "outputs": ["y"],
               "macs": 1, "nodes": 1, "files": {"compiled": "m"}, "variants": ["q"], "device": "D",
               "ip_version": "v2", "t": {"input_name": "x", "device": {"name": "D"}}}
    from qanac.manifest import _upgrade_from_v1

    upgraded = _upgrade_from_v1({"format_version": 1, "device": "D", "ip_version": "v2", "segments": [segment]})
    assert upgraded == {"format_version": FORMAT_VERSION, "device": "D", "segments": [{
        **{k: segment[k] for k in ("name", "kind", "dir", "target", "inputs", "outputs", "macs", "nodes", "files",
                                   "variants")},
        "device": "D", "backend": {"ip_version": "v2", "input_name": "x", "device": {"name": "D"}}}]}


def invoke_watched(outside: Path, *args: Any):
    """The CLI, recording every file opened under ``outside``; a blocking open fails the test after 60 s."""

    def timeout(signum, frame):
        raise TimeoutError("qanac blocked")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    WATCHED.append(outside.resolve())
    OPENED.clear()
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        WATCHED.clear()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def make_fifo(bundle: Path, outside: Path) -> None:
    (bundle / "model.qdq.onnx").unlink()
    os.mkfifo(bundle / "model.qdq.onnx")


def link_out(bundle: Path, outside: Path) -> None:
    (bundle / "model.qdq.onnx").unlink()
    (bundle / "model.qdq.onnx").symlink_to(outside / "x.onnx")


def link_to_device(bundle: Path, outside: Path) -> None:
    (bundle / "model.qdq.onnx").unlink()
    (bundle / "model.qdq.onnx").symlink_to("/dev/zero")


@pytest.mark.parametrize("tamper, field, problem", [
    (lambda b, o: edit_manifest(b, set_compiled_path("../outside/x.onnx")), "files.compiled.path",
     "leaves the bundle directory"),
    (lambda b, o: edit_manifest(b, set_compiled_path(str(o / "x.onnx"))), "files.compiled.path",
     "is an absolute path"),
    (link_out, "files.compiled.path", "leads through a symbolic link"),
    (link_to_device, "files.compiled.path", "leads through a symbolic link"),
    (make_fifo, "files.compiled.path", "which is not a regular file"),
    (lambda b, o: edit_manifest(b, drop("files")), "files", "is missing"),
    (lambda b, o: edit_manifest(b, lambda d: [d]), "(top level)", "must be a JSON object"),
    (lambda b, o: edit_manifest(b, drop("inputs")), "inputs", "is missing"),
])
@pytest.mark.parametrize("command", ["verify", "run"])
def test_crafted_bundles_exit_2_naming_the_field_and_open_nothing_outside(crafted, tamper, field, problem, command):
    bundle, data, outside = crafted
    tamper(bundle, outside)
    result = invoke_watched(outside, command, bundle, "--data" if command == "verify" else "--input", data)
    assert result.exit_code == 2, result.output
    assert f"bundle manifest field '{field}'" in result.output and problem in result.output
    assert "Traceback" not in result.output
    assert OPENED == []


def test_the_untampered_copy_verifies(crafted):
    bundle, data, outside = crafted
    result = invoke_watched(outside, "verify", bundle, "--data", data)
    assert result.exit_code == 0, result.output
    assert OPENED == []


def test_the_open_recorder_sees_what_qanac_opens(crafted):
    """The check above is not vacuous: watching the bundle itself records its files being read."""

    bundle, data, _ = crafted
    result = invoke_watched(bundle, "verify", bundle, "--data", data)
    assert result.exit_code == 0, result.output
    assert str((bundle / MANIFEST).resolve()) in OPENED and str((bundle / "model.qdq.onnx").resolve()) in OPENED
