"""Data-free calibration measured: each synthetic method of ``qanac.calibration.synthetic_data`` against real
calibration data, on models whose real data is at hand.

For each model and target the model is compiled once per calibration (real samples, then every synthetic
method with several seeds; the same number of samples each), and each bundle is verified on held-out real
data: top-1 agreement and SQNR of the compiled model against the float model. Models:

    digits      the demo's digits CNN (qanac.zoo.demo: Conv/BatchNorm/ReLU6, trained a few seconds on
                scikit-learn's 8x8 digits upsampled to 24x24; BatchNorm kept in the ONNX file); held out: the
                397 test digits; real calibration: training digits
    resnet18, mobilenet_v2   torchvision architectures with random weights whose BatchNorm statistics are set
                from data (one pass in training mode with a cumulative average over 512 random 64x64 crops
                of scikit-learn's sample photograph china.jpg), ImageNet mean/std preprocessing; held out:
                128 crops of flower.jpg; real calibration: other crops of china.jpg

    python -m tests.core.synthetic_calibration [--targets onnxruntime,akida] [--models digits,resnet18,...]

prints a Markdown table (docs/getting-started.md holds its result).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from qanac.calibration import SYNTHETIC_METHODS, SYNTHETIC_SAMPLES, Preprocessing, load_data, synthetic_data
from qanac.graph import input_specs, load_onnx

IMAGENET = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CROP = 64


def photo_crops(name: str, count: int, seed: int) -> np.ndarray:
    """``count`` random CROP x CROP crops (uint8 NCHW, random horizontal flips) of a scikit-learn sample photo."""

    from sklearn.datasets import load_sample_image

    photo = load_sample_image(name)
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        top = rng.integers(0, photo.shape[0] - CROP)
        left = rng.integers(0, photo.shape[1] - CROP)
        crop = photo[top : top + CROP, left : left + CROP]
        crops.append((crop[:, ::-1] if rng.random() < 0.5 else crop).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(crops))


def torchvision_model(name: str, out: Path) -> dict[str, Path]:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the whole pass
    stats = torch.from_numpy(IMAGENET.apply(photo_crops("china.jpg", 512, seed=1)))
    model.train()
    with torch.no_grad():
        for start in range(0, len(stats), 64):
            model(stats[start : start + 64])
    model.eval()
    paths = {"model": out / f"{name}.onnx", "calib": out / f"{name}_calib.npy", "test": out / f"{name}_test.npy"}
    torch.onnx.export(model, (torch.zeros(1, 3, CROP, CROP),), str(paths["model"]), input_names=["image"],
                      output_names=["logits"], opset_version=17, dynamo=False, do_constant_folding=False)
    np.save(paths["calib"], photo_crops("china.jpg", SYNTHETIC_SAMPLES, seed=2))
    np.save(paths["test"], photo_crops("flower.jpg", 128, seed=3))
    return paths


def digits_model(out: Path) -> dict[str, Path]:
    from qanac.zoo.demo import prepare

    paths = {"model": out / "digits_cnn.onnx", "calib": out / "calib.npy", "test": out / "test.npz"}
    return paths if all(p.is_file() for p in paths.values()) else prepare(out)


def measure(paths: dict[str, Path], preprocessing: Preprocessing, target: str, out: Path,
            seeds: int) -> dict[str, list[tuple[float, float]]]:
    """(top-1 agreement, SQNR in dB) of the compiled model on the held-out data, per calibration: the first
    SYNTHETIC_SAMPLES real samples, and each synthetic method with ``seeds`` seeds (SYNTHETIC_SAMPLES each)."""

    from qanac.bundle import Bundle
    from qanac.compare import Thresholds
    from qanac.compiler import CompileRequest, compile_model
    from qanac.verify import load_bundle_data, verify_bundle

    model = load_onnx(paths["model"])
    real = out / f"{paths['model'].stem}_real.npy"
    np.save(real, load_data(paths["calib"], input_specs(model), preprocessing, limit=SYNTHETIC_SAMPLES).raw["image"])
    calibrations = [("real", real)]
    for method in SYNTHETIC_METHODS:
        for seed in range(seeds):
            data = synthetic_data(input_specs(model), preprocessing, seed=seed, model=model, method=method)
            calibrations.append((data.source, out / f"{paths['model'].stem}_{method}_{seed}.npy"))
            np.save(calibrations[-1][1], next(iter(data.raw.values())))
    results: dict[str, list[tuple[float, float]]] = {}
    for name, calib in calibrations:
        bundle_dir = out / f"{paths['model'].stem}-{target}-{calib.stem}"
        compile_model(CompileRequest(source=str(paths["model"]), target=target, output=bundle_dir,
                                     calibration=str(calib), preprocessing=preprocessing, force=True))
        bundle = Bundle.open(bundle_dir)
        result = verify_bundle(bundle, load_bundle_data(bundle, str(paths["test"])), Thresholds(0.0, -1e9))
        compared = result.comparisons["compiled"][0]
        results.setdefault(name, []).append((compared.top1_agreement, compared.sqnr_db))
    return results


def _spread(values: list[float], digits: int) -> str:
    text = f"{np.mean(values):.{digits}f}"
    return text if len(values) == 1 else f"{text} ({min(values):.{digits}f} to {max(values):.{digits}f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="onnxruntime")
    parser.add_argument("--models", default="digits,resnet18,mobilenet_v2")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per synthetic method.")
    parser.add_argument("--work", type=Path, help="Folder for models and bundles (kept; the digits CNN is reused).")
    args = parser.parse_args(argv)
    print(f"{SYNTHETIC_SAMPLES} calibration samples each; synthetic: mean over {args.seeds} seeds (min to max)\n")
    print("| model | target | calibration | top-1 agreement | SQNR (dB) |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.work or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for model_name in args.models.split(","):
            if model_name == "digits":
                paths, preprocessing = digits_model(out / "digits"), Preprocessing()
            else:
                paths, preprocessing = torchvision_model(model_name, out), IMAGENET
            for target in args.targets.split(","):
                for name, runs in measure(paths, preprocessing, target, out, args.seeds).items():
                    print(f"| {model_name} | {target} | {name} | {_spread([a for a, _ in runs], 3)} | "
                          f"{_spread([q for _, q in runs], 1)} |", flush=True)


if __name__ == "__main__":
    main()
