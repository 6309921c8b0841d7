"""Benchmark: which standard CNNs reach Akida through qanac, and what plain MetaTF does with the same ONNX.

Each of a fixed set of architectures built in code (torchvision / timm definitions, never pretrained
weights; the QANA paper net from qanac.zoo) gets random weights, BatchNorm statistics and a ridge-fitted
classifier on scikit-learn's digits (8x8 images bilinearly upsampled to SIZE x SIZE, repeated to 3
channels; input in [0, 1]; optionally --steps Adam steps first), so that its predictions have real
margins; it is exported to ONNX (opset 17, eval mode, dynamo=False), and then

  (a) compiled by qanac for Akida (``compile_model``, default device SixNodesIPv2, host partitioning on):
      exit status, segments, share of MACs on the device hardware, top-1 agreement of the whole bundle
      with the float reference on the held-out images (``verify_bundle``), compile seconds;
  (b) given to plain MetaTF: ``quantizeml.models.quantize`` (uint8 input) then ``cnn2snn.convert``:
      whether it raised, whether it silently truncated (Akida output shape != float output shape, with
      the quantizeml/cnn2snn warnings and the node where conversion stopped), and, when it converts,
      the share of MACs in Hardware sequences on SixNodesIPv2 (``model.map(device, hw_only=False)``).

Data (seeded, the same for every model, disjoint sets): 64 calibration images, 128 held-out images, the
other 1605 for the weights (256 of them for BatchNorm statistics and the readout). Every model runs in its
own subprocess, so one crash or hang does not stop the table.

    python bench/akida_coverage.py [--models resnet18,qana] [--size 64] [--out coverage.json]
                                   [--steps 0] [--timeout 1800] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

NUM_CLASSES = 10
CALIB_SAMPLES = 64
HELDOUT_SAMPLES = 128
FIT_SAMPLES = 256
SEED = 0
_TRUNCATION_MARKERS = ("not quantized", "Conversion stops")


# ---------------------------------------------------------------------------------------------- models


def _resnet18(size: int):
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=NUM_CLASSES)


def _mobilenet_v2(size: int):
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None, num_classes=NUM_CLASSES, width_mult=0.5)


def _mobilenet_v3_small(size: int):
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES, width_mult=0.5)


def _ghostnet(size: int):
    import timm

    return timm.create_model("ghostnet_050", pretrained=False, num_classes=NUM_CLASSES)


def _efficientnet_b0(size: int):
    from torchvision.models import efficientnet_b0

    return efficientnet_b0(weights=None, num_classes=NUM_CLASSES)


def _squeezenet1_1(size: int):
    from torchvision.models import squeezenet1_1

    return squeezenet1_1(weights=None, num_classes=NUM_CLASSES)


def _qana(size: int):
    from qanac.zoo.qana import qana

    return qana("paper", num_classes=NUM_CLASSES, input_size=size)


# name -> (factory, what it is)
MODELS: dict[str, tuple[Callable[[int], Any], str]] = {
    "resnet18": (_resnet18, "torchvision resnet18, full width"),
    "mobilenet_v2": (_mobilenet_v2, "torchvision mobilenet_v2, width_mult 0.5"),
    "mobilenet_v3_small": (_mobilenet_v3_small, "torchvision mobilenet_v3_small, width_mult 0.5"),
    "ghostnet": (_ghostnet, "timm ghostnet_050 (width 0.5)"),
    "efficientnet_b0": (_efficientnet_b0, "torchvision efficientnet_b0 (no width option)"),
    "squeezenet1_1": (_squeezenet1_1, "torchvision squeezenet1_1"),
    "qana": (_qana, "qanac.zoo QANA paper variant (Ghost, sigmoid spatial gate, SE, 2x2 avgpool)"),
}
# extra rows: a model of MODELS compiled with opt-in approximations (--approx)
APPROXIMATED: dict[str, tuple[str, tuple[str, ...]]] = {
    "qana+attention-freeze": ("qana", ("attention-freeze",)),
}


# ------------------------------------------------------------------------------------------------ data


def make_data(size: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """sklearn digits upsampled to size x size, 3 channels, uint8 NCHW; seeded train/calib/held-out split."""

    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    large = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    images = np.repeat((large.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), 3, axis=1)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    held, calib, train = np.split(order, [HELDOUT_SAMPLES, HELDOUT_SAMPLES + CALIB_SAMPLES])
    return {
        "train_x": images[train], "train_y": labels[train],
        "calib_x": images[calib],
        "test_x": images[held], "test_y": labels[held],
    }


def set_weights(model, data: dict[str, np.ndarray], steps: int, seed: int = SEED) -> dict[str, Any]:
    """Give a randomly initialised model predictions with real margins, cheaply (2 cores).

    1. optionally ``steps`` Adam steps (batch 32) on the training images;
    2. BatchNorm statistics recomputed on 256 training images (cumulative average), so that eval-mode
       activations are well scaled;
    3. the classifier (the last Linear, or SqueezeNet's final 1x1 conv) refitted in closed form by ridge
       regression of one-hot targets on its input features over the same 256 images: a random-feature
       classifier of the digits.
    """

    import torch

    torch.manual_seed(seed)
    x = torch.from_numpy(data["train_x"].astype(np.float32) / 255.0)
    y = torch.from_numpy(data["train_y"])
    started = time.perf_counter()
    if steps:
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(seed)
        batches: list = []
        while len(batches) < steps:
            batches.extend(b for b in torch.randperm(len(x), generator=generator).split(32) if len(b) == 32)
        for batch in batches[:steps]:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    fit_x, fit_y = x[:FIT_SAMPLES], y[:FIT_SAMPLES]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for batch in fit_x.split(64):
            model(batch)
    model.eval()
    classifier = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    features: list = []
    handle = classifier.register_forward_hook(lambda m, inputs, out: features.append(inputs[0].detach()))
    with torch.no_grad():
        for batch in fit_x.split(64):
            model(batch)
    handle.remove()
    f = torch.cat(features)
    if f.ndim == 4:  # a 1x1 conv classifier (SqueezeNet): fit on the spatially averaged features
        f = f.mean(dim=(2, 3))
    f = torch.cat([f, torch.ones(len(f), 1)], dim=1).double()
    targets = torch.nn.functional.one_hot(fit_y, NUM_CLASSES).double() * 4.0
    gram = f.T @ f
    ridge = 1e-2 * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64)
    solution = torch.linalg.solve(gram + ridge, f.T @ targets)  # (features + 1, classes)
    with torch.no_grad():
        weight = solution[:-1].T.float()
        classifier.weight.copy_(weight.reshape(classifier.weight.shape))
        if classifier.bias is not None:
            classifier.bias.copy_(solution[-1].float())
    with torch.no_grad():
        test = torch.from_numpy(data["test_x"].astype(np.float32) / 255.0)
        predictions = model(test).argmax(1).numpy()
    return {"steps": steps, "bn_layers": len(norms), "readout": type(classifier).__name__,
            "seconds": time.perf_counter() - started,
            "float_test_accuracy": float((predictions == data["test_y"]).mean()),
            "float_distinct_predictions": int(len(np.unique(predictions)))}


def export(model, size: int, path: Path) -> None:
    import torch

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, size, size), str(path), input_names=["input"],
                          output_names=["logits"], opset_version=17, do_constant_folding=True, dynamo=False)


def count_params_macs(model, size: int) -> dict[str, int]:
    import torch

    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        if isinstance(module, torch.nn.Conv2d):
            macs += output.numel() * module.in_channels // module.groups * int(np.prod(module.kernel_size))
        elif isinstance(module, torch.nn.Linear):
            macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return {"params": sum(p.numel() for p in model.parameters()), "macs": macs}


# ----------------------------------------------------------------------------------------------- qanac


def run_qanac(onnx_path: Path, calib: Path, heldout: Path, out: Path,
              approximations: tuple[str, ...] = ()) -> dict[str, Any]:
    from qanac.bundle import Bundle
    from qanac.compare import Thresholds
    from qanac.compiler import CompileRequest, compile_model
    from qanac.diagnostics import QanacError
    from qanac.verify import load_bundle_data, verify_bundle

    result: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            compiled = compile_model(CompileRequest(source=str(onnx_path), target="akida", calibration=str(calib),
                                                    output=out, force=True,
                                                    approximations=frozenset(approximations)))
    except QanacError as exc:
        result.update(status=exc.exit_code, error=_first_line(exc.message),
                      diagnostics=[f"{d.code} {d.nodes[:1]} {_first_line(d.message)}"
                                   for d in getattr(exc, "diagnostics", [])][:10])
        result["compile_seconds"] = time.perf_counter() - started
        return result
    except Exception as exc:  # a crash inside qanac: a bug, recorded as such
        result.update(status="crash", error=f"{type(exc).__name__}: {_first_line(str(exc))}",
                      traceback=traceback.format_exc(limit=-6))
        result["compile_seconds"] = time.perf_counter() - started
        return result
    result["compile_seconds"] = time.perf_counter() - started
    result["status"] = 0
    manifest, report = compiled.manifest, compiled.report
    segments = manifest.get("segments") or [{"kind": "device"}]
    result["segments"] = len(segments)
    result["rewrites"] = {entry["pass"]: entry["counts"] for entry in manifest.get("passes_applied", [])
                          if entry["pass"] in REWRITE_PASSES}
    result["approximation_change"] = {entry["pass"]: entry["max_abs_change"] for entry in
                                      manifest.get("passes_applied", []) if not entry.get("exact", True)}
    result["segment_kinds"] = [s.get("kind") for s in segments]
    partition = report.get("partition") or {}
    if "backend" in report:
        result["device_mac_share"] = report["backend"]["mapping"]["hardware_mac_share"]
    else:
        result["device_mac_share"] = partition.get("device_mac_share")
    result["partition"] = partition
    result["partition_diagnostics"] = [f"{d['code']} {_first_line(d['message'])}" for d in report.get("diagnostics", [])
                                       if str(d.get("code", "")).startswith("PART")][:20]
    result["warnings"] = sorted({d["code"] for d in report.get("diagnostics", []) if d.get("level") == "warning"})
    try:
        bundle = Bundle.open(out)
        data = load_bundle_data(bundle, heldout)
        verdict = verify_bundle(bundle, data, Thresholds())
        compiled_cmp = verdict.comparisons["compiled"][0]
        result["agreement"] = compiled_cmp.top1_agreement
        result["sqnr_db"] = compiled_cmp.sqnr_db
        if "quantized" in verdict.comparisons:
            result["quantized_agreement"] = verdict.comparisons["quantized"][0].top1_agreement
        result["label_accuracy"] = verdict.label_accuracy
        result["verify_passed"] = verdict.passed
    except QanacError as exc:
        result["verify_error"] = f"exit {exc.exit_code}: {_first_line(exc.message)}"
    except Exception as exc:
        result["verify_error"] = f"crash {type(exc).__name__}: {_first_line(str(exc))}"
        result["verify_traceback"] = traceback.format_exc(limit=-6)
    return result


# the rewrites the table reports (canonicalization bookkeeping such as infer-shapes is left out)
REWRITE_PASSES = (
    "fold-batchnorm-into-conv", "batchnorm-to-affine", "fuse-pad-into-conv", "attention-freeze", "scale-to-depthwise",
    "dilated-conv-to-dense", "grouped-conv-to-dense", "even-kernel-to-odd", "strided-conv-to-stride1",
    "average-pool-to-depthwise", "split-padded-maxpool", "stage-global-average-pool", "bound-relu",
)


# ---------------------------------------------------------------------------------------- plain MetaTF


def run_plain_metatf(onnx_path: Path, samples: np.ndarray) -> dict[str, Any]:
    """What a MetaTF user gets: quantize (uint8 input) + convert, with the warnings they would see."""

    import akida
    import cnn2snn
    import onnx
    from quantizeml.models import QuantizationParams, quantize

    model = onnx.load(str(onnx_path))
    float_shape = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim[1:]]
    result: dict[str, Any] = {"float_output_shape": float_shape}
    started = time.perf_counter()
    caught: list[str] = []
    stage = "quantize"
    try:
        with warnings.catch_warnings(record=True) as records, contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            try:
                quantized = quantize(copy.deepcopy(model), qparams=QuantizationParams(input_dtype="uint8"),
                                     samples=samples, num_samples=len(samples))
                stage = "convert"
                converted = cnn2snn.convert(quantized)
            finally:
                caught = [str(r.message) for r in records]
    except Exception as exc:
        result.update(outcome="raised", stage=stage, error=f"{type(exc).__name__}: {_first_line(str(exc))}",
                      seconds=time.perf_counter() - started)
        result["warnings"] = [_first_line(w) for w in caught if any(m in w for m in _TRUNCATION_MARKERS)]
        return result
    result["seconds"] = time.perf_counter() - started
    relevant = [w for w in caught if any(m in w for m in _TRUNCATION_MARKERS)]
    result["warnings"] = [_first_line(w)[:400] for w in relevant]
    stops = [m.group(1) for w in relevant for m in [re.search(r"Conversion stops\s+at node\s+(\S+)", w)] if m]
    result["stopped_at"] = stops[0].strip("'\".,") if stops else None
    akida_shape = [int(d) for d in converted.output_shape]
    result["akida_output_shape"] = akida_shape
    truncated = int(np.prod(akida_shape)) != int(np.prod(float_shape)) or bool(relevant)
    result["outcome"] = "truncated" if truncated else "converted"
    try:
        converted.map(akida.SixNodesIPv2(), hw_only=False)
        total = int(converted.macs)
        hardware = sum(int(layer.macs) for seq in converted.sequences if "Hardware" in str(seq.backend)
                       for p in seq.passes for layer in p.layers)
        result["macs"] = total
        result["hardware_mac_share"] = hardware / total if total else 1.0
        result["sequences"] = [str(seq.backend).split(".")[-1] for seq in converted.sequences]
    except Exception as exc:
        result["map_error"] = f"{type(exc).__name__}: {_first_line(str(exc))}"
    return result


# ------------------------------------------------------------------------------------------ one model


def run_one(name: str, size: int, steps: int, workdir: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(SEED)
    base, approximations = APPROXIMATED.get(name, (name, ()))
    factory, description = MODELS[base]
    if approximations:
        description += f", with --approx {','.join(approximations)}"
    record: dict[str, Any] = {"model": name, "description": description, "size": size}
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    data = make_data(size)
    calib = folder / "calib.npy"
    heldout = folder / "heldout.npz"
    np.save(calib, data["calib_x"])
    np.savez(heldout, input=data["test_x"], labels=data["test_y"])

    model = factory(size)
    record.update(count_params_macs(model, size))
    record["weights"] = set_weights(model, data, steps)
    onnx_path = folder / f"{name}.onnx"
    export(model, size, onnx_path)

    # warm-up imports, so that compile seconds do not include TensorFlow's import
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import akida  # noqa: F401
        import cnn2snn  # noqa: F401
        import quantizeml.models  # noqa: F401

    record["qanac"] = run_qanac(onnx_path, calib, heldout, folder / "bundle", approximations)
    samples = (data["calib_x"].astype(np.float32) / np.float32(255.0))
    try:
        record["metatf"] = run_plain_metatf(onnx_path, samples)
    except Exception as exc:  # the bench itself failed, not MetaTF
        record["metatf"] = {"outcome": "bench-error", "error": f"{type(exc).__name__}: {_first_line(str(exc))}"}
    return record


def _first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------------------------------------- table


def qanac_cell(q: dict[str, Any]) -> list[str]:
    status = q.get("status", "?")
    if status == 0:
        agreement = q.get("agreement")
        agreement_text = "n/a" if agreement is None else f"{agreement:.3f}"
        if "verify_error" in q:
            agreement_text = "verify err"
        share = q.get("device_mac_share")
        return ["ok (0)", str(q.get("segments", "?")), "?" if share is None else f"{share:.1%}", agreement_text,
                f"{q.get('compile_seconds', 0):.1f}"]
    label = f"exit {status}" if status != "crash" else "CRASH"
    return [label, "-", "-", "-", f"{q.get('compile_seconds', 0):.1f}"]


def metatf_cell(m: dict[str, Any]) -> str:
    outcome = m.get("outcome", "?")
    if outcome == "raised":
        return f"raised in {m.get('stage')}: {m.get('error', '')[:70]}"
    share = m.get("hardware_mac_share")
    share_text = "" if share is None else f", {share:.1%} MACs on HW"
    if outcome == "truncated":
        where = m.get("stopped_at") or "?"
        return (f"SILENTLY TRUNCATED at {where}: output {m.get('akida_output_shape')} vs float "
                f"{m.get('float_output_shape')}{share_text}")
    if outcome == "converted":
        return f"converted{share_text}"
    return f"{outcome}: {m.get('error', '')[:70]}"


def format_table(records: list[dict[str, Any]]) -> str:
    header = ["model", "qanac", "segs", "device MACs", "agree", "compile s", "plain MetaTF (quantize+convert)"]
    rows = []
    for r in records:
        if "qanac" not in r:
            rows.append([r["model"], "BENCH FAIL", "-", "-", "-", "-", r.get("error", "")[:90]])
            continue
        rows.append([r["model"], *qanac_cell(r["qanac"]), metatf_cell(r.get("metatf", {}))])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + str(row[-1]))
    lines.insert(1, "-" * len(lines[0]))
    notes = []
    for r in records:
        q = r.get("qanac", {})
        fired = ", ".join(f"{name} {sum(counts.values())}" for name, counts in q.get("rewrites", {}).items()
                          if sum(counts.values()))
        if fired:
            notes.append(f"{r['model']}: rewrites: {fired}")
        if q.get("status") not in (0, None):
            notes.append(f"{r['model']}: qanac {('exit ' + str(q['status'])) if q['status'] != 'crash' else 'CRASH'}: "
                         f"{q.get('error', '')}")
            for d in q.get("diagnostics", [])[:3]:
                notes.append(f"    {d}")
        if q.get("verify_error"):
            notes.append(f"{r['model']}: qanac verify: {q['verify_error']}")
    return "\n".join(lines + ([""] + notes if notes else []))


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = [*MODELS, *APPROXIMATED]
    parser.add_argument("--models", default=",".join(choices), help=f"comma-separated, from: {', '.join(choices)}")
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--steps", type=int, default=0, help="Adam steps (batch 32) on digits before the readout fit")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--workdir", type=Path, default=None, help="ONNX files and bundles (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per model")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one model, print JSON
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qanac-bench-coverage-"))
    if args.one:
        record = run_one(args.one, args.size, args.steps, workdir)
        (workdir / args.one / "record.json").write_text(json.dumps(record, indent=2, default=str))
        return 0

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(choices)}")
    started = time.perf_counter()
    records = []
    for name in names:
        t0 = time.perf_counter()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        record_path = workdir / name / "record.json"
        record_path.unlink(missing_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--size", str(args.size),
                   "--steps", str(args.steps), "--workdir", str(workdir)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            failure = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
            if proc.returncode != 0:
                (workdir / name).mkdir(parents=True, exist_ok=True)
                (workdir / name / "stderr.txt").write_text(proc.stderr)
        except subprocess.TimeoutExpired:
            failure = f"timed out after {args.timeout:.0f} s"
        if failure is None and record_path.exists():
            record = json.loads(record_path.read_text())
        else:
            record = {"model": name, "error": f"bench subprocess failed: {failure}"}
        record["wall_seconds"] = time.perf_counter() - t0
        records.append(record)
        print(f"[{name}] done in {record['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    trained = f" after {args.steps} Adam steps" if args.steps else ""
    print(f"Akida coverage, input 3x{args.size}x{args.size}, digits ({CALIB_SAMPLES} calibration, "
          f"{HELDOUT_SAMPLES} held-out images), random weights + BN statistics + ridge readout{trained}, "
          f"device SixNodesIPv2")
    print(format_table(records))
    print(f"\ntotal {total:.0f} s; work files in {workdir}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"size": args.size, "steps": args.steps, "calibration": CALIB_SAMPLES,
                                        "heldout": HELDOUT_SAMPLES, "total_seconds": total, "models": records},
                                       indent=2, default=str))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
