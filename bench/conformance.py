"""Benchmark: the conformance corpus through qanac's CLI, next to MetaTF's own Keras path.

For every model of ``bench.corpus.CORPUS`` (BrainChip's akida_models zoo saved as shipped, torchvision and
timm architectures of every family exported to ONNX, tf_keras.applications models; random weights with
statistics set from data), each step in its own subprocess:

1. build: the model file, ``calib.npy`` (64 samples, NCHW, the input's dtype) and ``heldout.npz``
   (128 other samples);
2. vendor (Keras models only): MetaTF's Keras path, ``quantizeml.models.quantize(keras_model,
   qparams=QuantizationParams(input_dtype=<the model's integer input dtype, else the default>),
   samples=calib)`` -> ``cnn2snn.convert`` -> ``model.map(akida.SixNodesIPv2(), hw_only=False)``: the
   share of MACs in hardware sequences, the number of hardware sequences, and (integer-input models) the
   Akida model's top-1 agreement and SQNR against the float Keras model on the held-out samples
   (software inference);
3. qanac, exactly as a user runs it: ``qanac compile MODEL --target akida --calib calib.npy -o OUT
   --json`` then ``qanac verify OUT --data heldout.npz --json``: exit code, segments, device MAC share,
   agreement and SQNR against float (and of the quantized model), compile seconds, peak RSS.

Each subprocess has the per-step ``--timeout`` and ``--max-rss-mb`` (the benchmark kills a child whose
resident memory passes it, before the kernel's OOM killer picks a process of someone else on a shared
machine) and PYTHONFAULTHANDLER set (a segfault names its Python frame); its peak memory is sampled
from /proc every 0.2 s (the child's own high-water mark and the resident total of its session). A crash
(exit 4 or a signal), any other exit, a timeout and the memory limit are rows of the table, never a
failure of the benchmark.

    python bench/conformance.py [--only NAME[,NAME]] [--slice ci] [--timeout 600] [--max-rss-mb 8192]
                                [--json-out PATH] [--workdir DIR] [--markdown]
    python bench/conformance.py --from-json PATH [PATH ...] [--markdown]   # the table of earlier runs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.corpus import CORPUS, SLICES, build  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
DEFAULT_TIMEOUT = 600.0
DEFAULT_MAX_RSS_MB = 8192.0
_TRUNCATION_MARKERS = ("not quantized", "Conversion stops")


# ------------------------------------------------------------------------------------------ processes


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one subprocess may use before the benchmark kills it: wall seconds and resident MB."""

    seconds: float = DEFAULT_TIMEOUT
    rss_mb: float = DEFAULT_MAX_RSS_MB


@dataclasses.dataclass
class Measured:
    """How one subprocess ended: exit code (None when the benchmark stopped it, ``stopped`` saying why:
    "timeout" or "memory"), wall seconds, peak RSS in MB."""

    returncode: int | None
    seconds: float
    peak_mb: float
    stdout: str
    stderr: str
    stopped: str | None = None


def run_measured(command: list[str], limits: Limits, log: Path) -> Measured:
    """Run ``command`` in its own session; kill the session when it passes ``limits``.

    stdout and stderr go to ``log``.stdout / ``log``.stderr (and are returned). The child's memory is
    read from /proc every 0.2 s: the limit applies to the resident memory of its whole session, and the
    peak reported is the largest of the child's own high-water mark (``VmHWM``) and that session total.
    ``ru_maxrss`` from ``os.wait4`` is not used: Linux carries the high-water mark of the address space
    a process had before ``execve`` into it, so a child forked from a large harness reports the harness.
    """

    out_path, err_path = log.with_suffix(".stdout"), log.with_suffix(".stderr")
    started = time.perf_counter()
    stopped = None
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=REPO, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        peak_mb = 0.0
        while True:
            pid, status, _ = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            resident = _session_resident_mb(process.pid)
            peak_mb = max(peak_mb, resident, _status_mb(process.pid, "VmHWM"))
            if time.perf_counter() - started > limits.seconds:
                stopped = "timeout"
            elif resident > limits.rss_mb:
                stopped = "memory"
            if stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                _, status, _ = os.wait4(process.pid, 0)
                break
            time.sleep(0.2)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped above: Popen must not wait for it again
    return Measured(returncode=None if stopped else process.returncode, seconds=seconds,
                    peak_mb=peak_mb, stdout=out_path.read_text(), stderr=err_path.read_text(),
                    stopped=stopped)


def _status_mb(pid: int, field: str) -> float:
    """One memory field (``VmRSS``, ``VmHWM``) of a running process in MB (0 when it is gone)."""

    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def _session_resident_mb(session: int) -> float:
    """Resident memory of every process in the session ``session`` leads, in MB."""

    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session:  # field 6 of stat: session id
            total += _status_mb(int(entry.name), "VmRSS")
    return total


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _stop_text(measured: Measured, limits: Limits) -> str:
    if measured.stopped == "timeout":
        return f"no result after {limits.seconds:.0f} s"
    return f"stopped at {limits.rss_mb:.0f} MB resident after {measured.seconds:.0f} s"


def _crash_text(measured: Measured) -> str:
    """What a process that printed no JSON error said: the signal that killed it and the innermost
    Python frame of the faulthandler dump, or its last line of output."""

    text = _last_line(measured.stderr) or _last_line(measured.stdout)
    if measured.returncode is not None and measured.returncode < 0:
        frames = [line.strip() for line in measured.stderr.splitlines() if line.strip().startswith("File ")]
        where = f" in {frames[0]}" if frames else ""
        return f"killed by {signal.Signals(-measured.returncode).name}{where}"
    return text


def _json_from(text: str) -> Any:
    """The JSON document a ``--json`` command printed (the text from its first ``{``)."""

    start = text.find("{")
    return json.loads(text[start:]) if start >= 0 else None


# ------------------------------------------------------------------------------------------ qanac rows


def run_qanac(folder: Path, model_file: str, limits: Limits) -> dict[str, Any]:
    """``qanac compile`` then ``qanac verify`` in subprocesses, as a user runs them."""

    qanac = str(Path(sys.executable).with_name("qanac"))
    bundle = folder / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    compile_cmd = [qanac, "compile", str(folder / model_file), "--target", "akida", "--calib",
                   str(folder / "calib.npy"), "-o", str(bundle), "--json"]
    compiled = run_measured(compile_cmd, limits, folder / "compile")
    result: dict[str, Any] = {"command": " ".join(compile_cmd), "compile_seconds": compiled.seconds,
                              "peak_mb": compiled.peak_mb}
    if compiled.stopped:
        result.update(exit=compiled.stopped, error=_stop_text(compiled, limits))
        return result
    result["exit"] = compiled.returncode
    try:
        document = _json_from(compiled.stdout)
    except json.JSONDecodeError:
        document = None
    if compiled.returncode != 0 or not document or "report" not in document:
        message = (document or {}).get("message") if isinstance(document, dict) else None
        result["error"] = message or _crash_text(compiled)
        return result
    result.update(_bundle_facts(document["manifest"], document["report"]))

    verify_cmd = [qanac, "verify", str(bundle), "--data", str(folder / "heldout.npz"), "--json"]
    verified = run_measured(verify_cmd, limits, folder / "verify")
    result["verify_seconds"] = verified.seconds
    if verified.stopped:
        result.update(verify_exit=verified.stopped, verify_error=_stop_text(verified, limits))
        return result
    result["verify_exit"] = verified.returncode
    try:
        verdict = _json_from(verified.stdout)
    except json.JSONDecodeError:
        verdict = None
    if not verdict or "comparisons" not in verdict:
        result["verify_error"] = ((verdict or {}).get("message") if isinstance(verdict, dict) else None) \
            or _crash_text(verified)
        return result
    compiled_cmp = verdict["comparisons"]["compiled"][0]
    result["agreement"] = compiled_cmp["top1_agreement"]
    result["sqnr_db"] = compiled_cmp["sqnr_db"]
    quantized = verdict["comparisons"].get("quantized")
    if quantized:
        result["quantized_agreement"] = quantized[0]["top1_agreement"]
        result["quantized_sqnr_db"] = quantized[0]["sqnr_db"]
    result["verify_failures"] = verdict.get("failures", [])
    return result


def _bundle_facts(manifest: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """Segments, device MAC share, hardware sequences and host MACs from a compile's JSON."""

    segments = report.get("segments") or manifest.get("segments") or []
    partition = report.get("partition") or {}
    share = partition.get("device_mac_share")
    if share is None and "backend" in report:
        share = report["backend"]["mapping"]["hardware_mac_share"]
    hardware_sequences = 0
    software_sequences = 0
    for segment in segments:
        mapping = (segment.get("backend") or {}).get("mapping") or {}
        for sequence in mapping.get("sequences", []):
            if sequence.get("backend") == "Hardware":
                hardware_sequences += 1
            else:
                software_sequences += 1
    kinds = [segment.get("kind") for segment in segments]
    return {
        "segments": len(segments),
        "device_segments": kinds.count("device"),
        "host_segments": kinds.count("host"),
        "host_macs": sum(int(s.get("macs") or 0) for s in segments if s.get("kind") == "host"),
        "total_macs": partition.get("total_macs"),
        "device_mac_share": share,
        "hardware_sequences": hardware_sequences,
        "software_sequences": software_sequences,
        "warnings": sorted({d["code"] for d in report.get("diagnostics", []) if d.get("level") == "warning"}),
        "passes_fired": {entry["pass"]: sum(entry["counts"].values())
                         for entry in manifest.get("passes_applied", [])
                         if sum((entry.get("counts") or {}).values())},
    }


# ------------------------------------------------------------------------------------- vendor (MetaTF)


def run_vendor(folder: Path) -> dict[str, Any]:
    """MetaTF's Keras path on ``folder/model.h5`` (in this process): quantize -> convert -> map."""

    import akida
    import cnn2snn
    import tf_keras as keras
    from quantizeml.models import QuantizationParams, quantize

    from qanac.compare import sqnr_db, top1_agreement

    model = keras.models.load_model(folder / "model.h5", compile=False)
    input_dtype = np.dtype(model.inputs[0].dtype.name)
    calib = _nhwc(np.load(folder / "calib.npy"))
    with np.load(folder / "heldout.npz") as archive:
        heldout = _nhwc(archive["input"])
    qparams = QuantizationParams(input_dtype=input_dtype) if np.issubdtype(input_dtype, np.integer) \
        else QuantizationParams()
    result: dict[str, Any] = {"input_dtype": str(qparams.input_dtype)}
    stage = "quantize"
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as records, contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            quantized = quantize(model, qparams=qparams, samples=calib, num_samples=len(calib), batch_size=32)
            stage = "convert"
            converted = cnn2snn.convert(quantized)
            stage = "predict"
            float_out = model.predict(heldout, batch_size=32, verbose=0)
            if np.issubdtype(input_dtype, np.integer):  # a float input's scaling into the device is the user's
                akida_out = converted.predict(heldout.astype(input_dtype))
                result["akida_output_shape"] = [int(d) for d in akida_out.shape[1:]]
                if akida_out.size == float_out.size:
                    akida_out = akida_out.reshape(float_out.shape)
                    if _ends_in_softmax(model):  # MetaTF leaves a final softmax to the host
                        akida_out = _softmax(akida_out)
                    result["agreement"] = top1_agreement(float_out, akida_out)
                    result["sqnr_db"] = sqnr_db(float_out, akida_out)
            stage = "map"
            converted.map(akida.SixNodesIPv2(), hw_only=False)
    except Exception as exc:  # what MetaTF does with the model is a result of the benchmark
        result.update(outcome="raised", stage=stage, error=f"{type(exc).__name__}: {_head(str(exc))}")
        result["seconds"] = time.perf_counter() - started
        return result
    result["seconds"] = time.perf_counter() - started
    result["truncation_warnings"] = sorted({_first_line(str(r.message))[:200] for r in records
                                            if any(m in str(r.message) for m in _TRUNCATION_MARKERS)})
    float_size = int(np.prod(model.outputs[0].shape[1:]))
    akida_size = int(np.prod(converted.output_shape))
    # a conversion that stops only before a final softmax keeps the model's output size: not truncated
    result["outcome"] = "converted" if akida_size == float_size else "truncated"
    total = int(converted.macs)
    hardware = sum(int(layer.macs) for seq in converted.sequences if "Hardware" in str(seq.backend)
                   for p in seq.passes for layer in p.layers)
    backends = [str(seq.backend).split(".")[-1] for seq in converted.sequences]
    result.update(total_macs=total, hardware_mac_share=hardware / total if total else 1.0,
                  hardware_sequences=backends.count("Hardware"), software_sequences=backends.count("Software"))
    return result


def _nhwc(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1)) if array.ndim == 4 else array


def _ends_in_softmax(model) -> bool:
    activation = getattr(model.layers[-1], "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


def _head(text: str, lines: int = 3, chars: int = 300) -> str:
    """The first non-empty lines of an error message, joined (MetaTF puts the reason on line 2)."""

    kept = [line.strip() for line in str(text).splitlines() if line.strip()][:lines]
    return " ".join(kept)[:chars]


# ----------------------------------------------------------------------------------------- one model


def run_model(name: str, workdir: Path, limits: Limits) -> dict[str, Any]:
    """Every step for ``name`` (each a subprocess); always returns a row."""

    entry = CORPUS[name]
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"model": name, "family": entry.family, "source": entry.source,
                           "description": entry.description}
    script = str(Path(__file__).resolve())
    built = run_measured([sys.executable, script, "--step", "build", name, "--workdir", str(workdir)],
                         limits, folder / "build")
    if built.returncode != 0:
        row["error"] = "build " + (_stop_text(built, limits) if built.stopped else f"failed: {_crash_text(built)}")
        return row
    row["build"] = json.loads((folder / "build.json").read_text())
    if entry.is_keras:
        vendor = run_measured([sys.executable, script, "--step", "vendor", name, "--workdir", str(workdir)],
                              limits, folder / "vendor")
        if vendor.returncode == 0:
            row["vendor"] = json.loads((folder / "vendor.json").read_text())
        else:
            row["vendor"] = {"outcome": vendor.stopped or "crashed",
                             "error": _stop_text(vendor, limits) if vendor.stopped else _crash_text(vendor)}
        row["vendor"]["peak_mb"] = vendor.peak_mb
    row["qanac"] = {"code": code_version(), **run_qanac(folder, row["build"]["model_file"], limits)}
    return row


# ---------------------------------------------------------------------------------------------- table

COLUMNS = ["model", "family", "source", "qanac exit", "segs (device)", "device share", "agree", "SQNR dB", "s",
           "peak MB", "|", "vendor share", "vendor HW seqs", "vendor agree"]


def table_row(row: dict[str, Any]) -> list[str]:
    q = row.get("qanac", {})
    v = row.get("vendor")
    cells = [row["model"], row["family"], row["source"]]
    if "qanac" not in row:
        cells += ["BENCH: " + row.get("error", "?")[:40], "-", "-", "-", "-", "-", "-"]
    else:
        segments = "-" if q.get("segments") is None else f"{q['segments']} ({q.get('device_segments')})"
        cells += [str(q.get("exit")), segments, _fmt(q.get("device_mac_share"), "{:.1%}"),
                  _fmt(q.get("agreement"), "{:.3f}"), _fmt(q.get("sqnr_db"), "{:.1f}"),
                  _fmt(q.get("compile_seconds"), "{:.0f}"), _fmt(q.get("peak_mb"), "{:.0f}")]
    cells.append("|")
    if v is None:
        cells += ["-", "-", "-"]
    elif v.get("outcome") in ("converted", "truncated"):
        share = _fmt(v.get("hardware_mac_share"), "{:.1%}")
        cells += [share + (" (truncated)" if v["outcome"] == "truncated" else ""),
                  _fmt(v.get("hardware_sequences"), "{}"), _fmt(v.get("agreement"), "{:.3f}")]
    else:
        cells += [f"{v.get('outcome')} in {v.get('stage', '?')}", "-", "-"]
    return cells


def _fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The table (aligned text, or Markdown) and one note per failure below it."""

    body = [COLUMNS, *[table_row(r) for r in rows]]
    if markdown:
        lines = ["| " + " | ".join(cell for cell in line if cell != "|") + " |" for line in body]
        lines.insert(1, "|" + " --- |" * (len(COLUMNS) - 1))
    else:
        widths = [max(len(line[i]) for line in body) for i in range(len(COLUMNS))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in body]
        lines.insert(1, "-" * max(len(line) for line in lines))
    notes = []
    for r in rows:
        q, v = r.get("qanac", {}), r.get("vendor") or {}
        if q.get("error"):
            notes.append(f"{r['model']}: qanac exit {q.get('exit')}: {q['error'][:300]}")
        if q.get("verify_exit") not in (None, 0):
            why = q.get("verify_error") or "; ".join(q.get("verify_failures", []))[:300]
            notes.append(f"{r['model']}: qanac verify exit {q['verify_exit']}: {why}")
        if v.get("error"):
            notes.append(f"{r['model']}: vendor {v.get('outcome')} in {v.get('stage', '?')}: {v['error'][:300]}")
        if r.get("error"):
            notes.append(f"{r['model']}: {r['error'][:300]}")
    if markdown:
        notes = [f"- {note}" for note in notes]
    return "\n".join(lines + ([""] + notes if notes else []))


# ----------------------------------------------------------------------------------------------- main


def select(only: str | None, slice_name: str | None) -> list[str]:
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
    elif slice_name:
        names = list(SLICES[slice_name])
    else:
        names = list(CORPUS)
    unknown = [n for n in names if n not in CORPUS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(CORPUS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated model names, from: {', '.join(CORPUS)}")
    parser.add_argument("--slice", choices=sorted(SLICES), help="a named subset (ci: the CI-sized slice)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per step and model")
    parser.add_argument("--max-rss-mb", type=float, default=DEFAULT_MAX_RSS_MB,
                        help="resident MB per step and model; the step is killed past it")
    parser.add_argument("--json-out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--workdir", type=Path, help="models, data and bundles (default: a new temp dir)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="print the table of earlier --json-out files (their rows in order); run nothing")
    parser.add_argument("--step", nargs=2, metavar=("STEP", "NAME"), help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(path.read_text())["rows"]]
        print(format_table(rows, markdown=args.markdown))
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qanac-conformance-"))
    if args.step:
        step, name = args.step
        folder = workdir / name
        if step == "build":
            build(name, folder)
        else:
            (folder / "vendor.json").write_text(json.dumps(run_vendor(folder), indent=2, default=str))
        return 0

    names = select(args.only, args.slice)
    rows = []
    started = time.perf_counter()
    for name in names:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        row = run_model(name, workdir, Limits(args.timeout, args.max_rss_mb))
        rows.append(row)
        q = row.get("qanac", {})
        print(f"[{name}] qanac exit {q.get('exit', '-')} in {q.get('compile_seconds', 0):.0f} s", file=sys.stderr,
              flush=True)
        if args.json_out:  # after every row, so that an interrupted run keeps what it measured
            _write_json(args.json_out, args, time.perf_counter() - started, rows)
    total = time.perf_counter() - started
    print("Conformance corpus, device SixNodesIPv2 (qanac: CLI compile + verify on 128 held-out samples; "
          "vendor: MetaTF Keras path quantize -> convert -> map)")
    print(format_table(rows, markdown=args.markdown))
    print(f"\ntotal {total:.0f} s; work files in {workdir}")
    if args.json_out:
        _write_json(args.json_out, args, total, rows)
        print(f"results: {args.json_out}")
    return 0


def _write_json(path: Path, args: argparse.Namespace, seconds: float, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"timeout": args.timeout, "max_rss_mb": args.max_rss_mb, "total_seconds": seconds,
                "code": code_version(), "rows": rows}
    path.write_text(json.dumps(document, indent=2, default=str))


def code_version() -> dict[str, Any]:
    """The commit of the qanac that was measured and the compiler's files changed on top of it (git, when
    present): a row is only comparable with rows of the same code."""

    def git(*args: str) -> str:
        completed = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
        return completed.stdout.rstrip() if completed.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
               if line[3:].startswith(("qanac/", "passes/", "backends/", "frontends/"))]
    return {"commit": git("rev-parse", "HEAD") or None, "changed_files": changed}


if __name__ == "__main__":
    sys.exit(main())
