"""Benchmark: `qanac compile --target akida` against calling quantizeml + cnn2snn directly, same model.

The direct path is what a MetaTF user writes: quantize(model, samples) then convert(). qanac adds the
pipeline, lint, mapping, the Akida-vs-quantized check and the bundle. Both run once in this process
after a warm-up (the first quantize pays TensorFlow's import), on the demo digits CNN.

    python bench/akida_compile_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

from qanac.compiler import CompileRequest, compile_model
from qanac.zoo.demo import prepare


def direct(model: onnx.ModelProto, samples: np.ndarray):
    import cnn2snn
    from quantizeml.models import QuantizationParams, quantize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize(copy.deepcopy(model), qparams=QuantizationParams(input_dtype="uint8"), samples=samples,
                             num_samples=len(samples))
        return cnn2snn.convert(quantized)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="qanac-bench-akida-"))
    paths = prepare(out)
    model = onnx.load(str(paths["model"]))
    samples = (np.load(paths["calib"]) / np.float32(255.0)).astype(np.float32)
    direct(model, samples[:8])  # warm-up: TensorFlow and quantizeml imports

    times = {"direct quantize+convert": [], "qanac compile": []}
    for i in range(args.repeats):
        started = time.perf_counter()
        direct(model, samples)
        times["direct quantize+convert"].append(time.perf_counter() - started)
        started = time.perf_counter()
        compile_model(CompileRequest(source=str(paths["model"]), target="akida", output=out / f"bundle{i}",
                                     calibration=str(paths["calib"]), force=True))
        times["qanac compile"].append(time.perf_counter() - started)
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, value in medians.items():
        print(f"{name:<26} {value:6.2f} s (median of {args.repeats})")
    print(f"ratio qanac/direct: {medians['qanac compile'] / medians['direct quantize+convert']:.2f}")


if __name__ == "__main__":
    main()
