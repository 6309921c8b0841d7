"""Reproducible zoo measurements: train on (cluttered) sklearn digits, optionally compile for Akida v2.

    python -m qanac.zoo.bench --variant native --width-mult 0.5 --size 32 --epochs 15 --qat-epochs 3 \\
        --akida --out /tmp/bench-native

prints one JSON object: sizes (parameters, MACs), float and QAT accuracy on validation and test, seconds
per epoch, and with ``--akida`` the Akida conversion check plus the agreement of the Akida model's
predictions with the exported float model on the test split (Akida's software backend, no hardware).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np


def akida_agreement(train_result, data, samples: int = 64) -> dict[str, Any]:
    """Convert the exported model for Akida v2 and compare its predictions with the float export."""

    import akida

    from qanac.zoo.akida_check import check_akida_v2
    from qanac.zoo.export import export_onnx
    from qanac.zoo.metrics import classification_metrics

    calib, _ = data.train.arrays()
    check = check_akida_v2(export_onnx(train_result.model, data.input_shape), calib[:samples])
    result: dict[str, Any] = {"check": check.to_dict()}
    if not check.ok:
        return result
    images, labels = data.test.arrays()
    runner = akida.Model(layers=check.model.layers)
    raw = np.round(images * 255).astype(np.uint8)
    logits = runner.predict(raw).reshape(len(raw), -1)
    import torch

    with torch.no_grad():
        reference = train_result.model(torch.from_numpy(raw.astype(np.float32) / 255)).numpy()
    akida_pred = logits.argmax(1)
    result.update({
        "test": classification_metrics(labels, akida_pred, data.num_classes, data.class_names),
        "argmax_agreement_with_float_export": float(np.mean(akida_pred == reference.argmax(1))),
    })
    for key in ("test",):
        result[key] = {k: result[key][k] for k in ("top1", "macro_f1", "balanced_accuracy")}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="native", choices=["paper", "native"])
    parser.add_argument("--attention", default=None, help="native only: context, additive or none")
    parser.add_argument("--dataset", default="digits", choices=["digits", "cluttered"])
    parser.add_argument("--primary-kernel", type=int, default=None, help="native only: 1 or 3")
    parser.add_argument("--width-mult", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--qat-lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--qat-bits", type=int, default=8, help="4 = Akida v1 setting (8-bit first layer)")
    parser.add_argument("--akida", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from qanac.zoo.data import load_cluttered_digits_splits, load_digits_splits
    from qanac.zoo.qat import QATConfig
    from qanac.zoo.registry import resolve_spec
    from qanac.zoo.train import TrainConfig, train

    if args.dataset == "digits":
        data = load_digits_splits(args.size, seed=args.seed)
    else:
        data = load_cluttered_digits_splits(args.size, seed=args.seed)
    options: dict[str, Any] = {"width_mult": args.width_mult}
    if args.attention:
        options["attention"] = args.attention
    if args.primary_kernel:
        options["primary_kernel"] = args.primary_kernel
    spec = resolve_spec("qana", args.variant, input_size=args.size, **options)
    qat = QATConfig() if args.qat_bits == 8 else QATConfig.akida_v1(weight_bits=args.qat_bits,
                                                                    activation_bits=args.qat_bits)
    config = TrainConfig(epochs=args.epochs, qat_epochs=args.qat_epochs, lr=args.lr, qat_lr=args.qat_lr,
                         batch_size=args.batch_size, seed=args.seed, qat=qat, patience=max(4, args.epochs // 3))
    started = time.perf_counter()
    result = train(spec, data, config, args.out)
    metrics = result.metrics

    def short(block: dict[str, Any]) -> dict[str, float]:
        return {k: round(block[k], 4) for k in ("top1", "macro_f1", "balanced_accuracy")}

    report: dict[str, Any] = {
        "spec": metrics["model"],
        "parameters": metrics["parameters"],
        "macs": metrics["macs"],
        "float": {"val": short(metrics["float"]["val"]), "test": short(metrics["float"]["test"]),
                  "best_epoch": metrics["float"]["best_epoch"], "epochs_run": metrics["float"]["epochs_run"],
                  "seconds_per_epoch": round(metrics["float"]["seconds_per_epoch"], 2)},
        "seconds_total": round(time.perf_counter() - started, 1),
        "load_average": os.getloadavg(),
    }
    if "qat" in metrics:
        report["qat"] = {"val": short(metrics["qat"]["val"]), "test": short(metrics["qat"]["test"]),
                         "exported_test": short(metrics["test"]),
                         "seconds_per_epoch": round(metrics["qat"]["seconds_per_epoch"], 2)}
    if args.akida:
        report["akida"] = akida_agreement(result, data)
        report["akida"]["check"].pop("warnings", None)
        for seq in report["akida"]["check"]["sequences"]:
            seq["layers"] = len(seq["layers"])
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
