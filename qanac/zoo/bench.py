"""Reproducible zoo measurements: train on (cluttered) sklearn digits, optionally compile for Akida.

    python -m qanac.zoo.bench --variant native --width-mult 0.5 --size 32 --epochs 15 --qat-epochs 3 \\
        --akida --out /tmp/bench-native
    python -m qanac.zoo.bench --variant v1 --width-mult 0.5 --size 32 --epochs 15 --qat-epochs 3 \\
        --akida --out /tmp/bench-v1

prints one JSON object: sizes (parameters, MACs), float and QAT accuracy on validation and test, seconds
per epoch, and with ``--akida`` what ``qanac compile --target akida`` makes of the exported model (for
``--device``: the variant's, AKD1000 for ``v1``, else the default IP v2 device) and how
the compiled bundle classifies the test split (``qanac eval``: the bundle's float reference and the
compiled model side by side; Akida's software backend, no hardware). The compiler is calibrated on
training images only. ``--approx attention-freeze`` compiles a second time with that approximation.

With ``--out RUN`` the run directory keeps what the commands need to be repeated by hand::

    RUN/model.onnx                      the exported model (QAT model when --qat-epochs > 0)
    RUN/calib.npy                       uint8 training images the compiler calibrates on
    RUN/akida/test.npz                  the test split (``input`` uint8 NCHW, ``labels``)
    RUN/akida/bundle, RUN/akida/eval    the compiled bundle and its evaluation (eval.json, confusion.png)
    RUN/akida-approx/...                the same with the approximations
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SUMMARY_KEYS = ("top1", "macro_f1", "balanced_accuracy")


def short(block: dict[str, Any]) -> dict[str, float]:
    return {k: round(block[k], 4) for k in SUMMARY_KEYS}


def akida_deployment(manifest: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """Where a compiled Akida bundle runs: segments, device MAC share, and the device's sequences.

    ``device_mac_share`` is the share of the model's MACs in Hardware sequences of the device segments
    (``manifest["partition"]``); ``sequences`` lists every device segment's sequences from its mapping
    report in run order, with their backend (Hardware or Software, akida's software fallback).
    """

    partition = manifest["partition"]
    sequences = [
        {"segment": segment["name"], "backend": sequence["backend"], "passes": sequence["passes"],
         "layers": len(sequence["layers"])}
        for segment in report["segments"] if segment["kind"] == "device"
        for sequence in segment["backend"]["mapping"]["sequences"]
    ]
    return {
        "segments": partition["segments"],
        "device_segments": partition["device_segments"],
        "transfers": partition["transfers"],
        "device_mac_share": partition["device_mac_share"],
        "hardware_sequences": sum(s["backend"] == "Hardware" for s in sequences),
        "software_sequences": sum(s["backend"] != "Hardware" for s in sequences),
        "sequences": sequences,
        "approximations": manifest.get("approximations", []),
    }


def write_test_split(data, path: Path) -> Path:
    """The test split as ``.npz`` for ``qanac eval``: uint8 images under the model's input name, ``labels``."""

    from qanac.zoo.export import INPUT_NAME

    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{INPUT_NAME: data.test.images, "labels": data.test.labels})
    return path


def compile_and_evaluate(
    run: Path, data, work: Path, approximations: frozenset[str] = frozenset(), device: str | None = None
) -> dict[str, Any]:
    """``qanac compile --target akida [--device DEVICE]`` of a training run's model.onnx, calibrated on its
    calib.npy (training images), then ``qanac eval`` of the bundle on the test split of ``data``.

    A model the compiler refuses gives ``{"status": exit code, "error": message}`` instead of metrics.
    """

    from qanac.bundle import Bundle
    from qanac.compiler import CompileRequest, compile_model
    from qanac.diagnostics import QanacError
    from qanac.evaluate import evaluate_bundle, load_labelled

    test = write_test_split(data, work / "test.npz")
    request = CompileRequest(source=str(run / "model.onnx"), target="akida", output=work / "bundle",
                             calibration=str(run / "calib.npy"), force=True,
                             approximations=frozenset(approximations), labels=list(data.class_names),
                             backend_options={"device": device} if device else {})
    started = time.perf_counter()
    try:
        compiled = compile_model(request)
    except QanacError as exc:
        return {"status": exc.exit_code, "error": exc.message, "approximations": sorted(approximations)}
    seconds = time.perf_counter() - started
    bundle = Bundle.open(work / "bundle")
    evaluation = evaluate_bundle(bundle, load_labelled(bundle, test), work / "eval")
    return {
        "status": 0,
        "compile_seconds": round(seconds, 1),
        **akida_deployment(compiled.manifest, compiled.report),
        "test": {"float_reference": short(evaluation["float"]), "compiled": short(evaluation["compiled"])},
        "recall_drops": evaluation["recall_drops"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="native", choices=["paper", "native", "v1"])
    parser.add_argument("--attention", default=None, help="native only: context, additive or none")
    parser.add_argument("--dataset", default="digits", choices=["digits", "cluttered"])
    parser.add_argument("--primary-kernel", type=int, default=None, help="native only: 1 or 3")
    parser.add_argument("--downsample", default=None, help="native only: pool (default) or stride")
    parser.add_argument("--spike-bound", type=float, default=None, help="upper clip of the spike generator")
    parser.add_argument("--width-mult", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--qat-lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--qat-bits", type=int, default=None,
                        help="8 = Akida v2, 4 = Akida v1 recipe (8-bit first layer); default: the variant's recipe")
    parser.add_argument("--device", default=None, help="with --akida: the Akida device (default: AKD1000 for v1)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 when another job holds a core: two threads then run 10x slower)")
    parser.add_argument("--akida", action="store_true", help="compile for Akida and evaluate the bundle")
    parser.add_argument("--approx", action="append", default=[],
                        help="with --akida: also compile with this approximation (repeatable), e.g. attention-freeze")
    parser.add_argument("--out", default=None, help="run directory to keep (default: a temporary one)")
    args = parser.parse_args(argv)

    from qanac.zoo.data import load_cluttered_digits_splits, load_digits_splits
    from qanac.zoo.qat import QATConfig
    from qanac.zoo.registry import qat_config, resolve_spec
    from qanac.zoo.train import TrainConfig, train

    if args.dataset == "digits":
        data = load_digits_splits(args.size, seed=args.seed)
    else:
        data = load_cluttered_digits_splits(args.size, seed=args.seed)
    options: dict[str, Any] = {"width_mult": args.width_mult}
    if args.attention:
        options["attention"] = args.attention
    if args.spike_bound:
        options["spike_bound"] = args.spike_bound
    if args.primary_kernel:
        options["primary_kernel"] = args.primary_kernel
    if args.downsample:
        options["downsample"] = args.downsample
    spec = resolve_spec("qana", args.variant, input_size=args.size, **options)
    if args.qat_bits is None:
        qat = qat_config(spec)
    elif args.qat_bits == 8:
        qat = QATConfig.akida_v2()
    else:
        qat = QATConfig.akida_v1(weight_bits=args.qat_bits, activation_bits=args.qat_bits)
    device = args.device or ("AKD1000" if args.variant == "v1" else None)
    config = TrainConfig(epochs=args.epochs, qat_epochs=args.qat_epochs, lr=args.lr, qat_lr=args.qat_lr,
                         batch_size=args.batch_size, seed=args.seed, qat=qat, patience=max(4, args.epochs // 3),
                         num_threads=args.threads)
    scratch = tempfile.TemporaryDirectory(prefix="qana-bench-") if args.out is None else None
    out = Path(args.out) if args.out is not None else Path(scratch.name)
    started = time.perf_counter()
    result = train(spec, data, config, out)
    metrics = result.metrics

    report: dict[str, Any] = {
        "spec": metrics["model"],
        "parameters": metrics["parameters"],
        "macs": metrics["macs"],
        "float": {"val": short(metrics["float"]["val"]), "test": short(metrics["float"]["test"]),
                  "best_epoch": metrics["float"]["best_epoch"], "epochs_run": metrics["float"]["epochs_run"],
                  "seconds_per_epoch": round(metrics["float"]["seconds_per_epoch"], 2)},
        "seconds_train": round(time.perf_counter() - started, 1),
        "threads": args.threads,
        "load_average": os.getloadavg(),
    }
    if "qat" in metrics:
        report["qat"] = {"val": short(metrics["qat"]["val"]), "test": short(metrics["qat"]["test"]),
                         "exported_test": short(metrics["test"]),
                         "seconds_per_epoch": round(metrics["qat"]["seconds_per_epoch"], 2)}
    if args.akida:
        report["akida"] = compile_and_evaluate(out, data, out / "akida", device=device)
        if args.approx:
            report["akida_approx"] = compile_and_evaluate(out, data, out / "akida-approx", frozenset(args.approx),
                                                          device=device)
    if scratch is not None:
        scratch.cleanup()
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
