"""Benchmark: the onnxruntime target's int8 QDQ model against the float reference, on the demo model.

Prints agreement with float and images/s at batch 1 and 32 for both, with the speed ratio, in one run.

    python bench/ort_qdq_speed.py [--out build/bench-ort] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from qanac.bundle import Bundle
from qanac.compare import Thresholds
from qanac.compiler import CompileRequest, compile_model
from qanac.execution import make_session
from qanac.verify import load_bundle_data, verify_bundle
from qanac.zoo.demo import prepare


def images_per_second(session, name: str, data: np.ndarray, batch: int, seconds: float) -> float:
    feed = {name: data[:batch]}
    session.run(None, feed)  # warm up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feed)
        runs += 1
    return runs * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="qanac-bench-ort-")))
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    paths = prepare(args.out)
    bundle_dir = args.out / "bundle-onnxruntime"
    compile_model(CompileRequest(source=str(paths["model"]), target="onnxruntime", output=bundle_dir,
                                 calibration=str(paths["calib"]), force=True))
    bundle = Bundle.open(bundle_dir)
    data = load_bundle_data(bundle, paths["test"])
    verdict = verify_bundle(bundle, data, Thresholds())
    x = data.arrays[bundle.input_names[0]]
    results = {"agreement": verdict.comparisons["compiled"][0].top1_agreement,
               "sqnr_db": verdict.comparisons["compiled"][0].sqnr_db,
               "accuracy": verdict.label_accuracy, "images_per_second": {}}
    print(f"demo digits CNN, {data.num_samples} held-out images: top-1 agreement "
          f"{results['agreement']:.4f}, SQNR {results['sqnr_db']:.1f} dB, accuracy {verdict.label_accuracy}")
    print(f"{'batch':>5}  {'float img/s':>12}  {'QDQ img/s':>12}  {'QDQ/float':>9}")
    for batch in (1, 32):
        speeds = {}
        for role in ("reference", "compiled"):
            session = make_session(str(bundle.file(role)))
            speeds[role] = images_per_second(session, bundle.input_names[0], x, batch, args.seconds)
        results["images_per_second"][batch] = speeds
        print(f"{batch:>5}  {speeds['reference']:>12.0f}  {speeds['compiled']:>12.0f}  "
              f"{speeds['compiled'] / speeds['reference']:>9.2f}")
    (args.out / "ort_qdq_speed.json").write_text(json.dumps(results, indent=2))
    print(f"results: {args.out / 'ort_qdq_speed.json'}")


if __name__ == "__main__":
    main()
