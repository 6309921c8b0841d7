"""``make demo``: build the bundled example model, compile it, verify it, print the report.

The example is a small CNN (Conv/BatchNorm/ReLU6, a depthwise-separable block, global average pooling,
a linear head and a trailing Softmax) trained for a few seconds on scikit-learn's bundled handwritten
digits (real 8x8 images, upsampled to 24x24). Every layer of it maps onto Akida hardware: the global
pooling sees a 6x6 map after a stride-1 convolution. Nothing is downloaded.

    python -m qanac.zoo.demo OUT_DIR [--target akida|onnxruntime]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

IMAGE_SIZE = 24
SEED = 0


def digits_uint8(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 NCHW images of ``size`` x ``size`` (1 channel) and their labels."""

    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # 0..16 -> 0..1
    repeat = size // 8
    up = np.kron(images, np.ones((repeat, repeat), np.float32))
    return np.round(up * 255).astype(np.uint8)[:, None], digits.target.astype(np.int64)


def build_example_cnn(num_classes: int = 10, channels: int = 1):
    import torch.nn as nn

    def conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        ]

    return nn.Sequential(
        *conv_bn(channels, 8),
        *conv_bn(8, 16, stride=2),
        *conv_bn(16, 16, groups=16),
        *conv_bn(16, 32, kernel=1),
        *conv_bn(32, 32, stride=2),
        *conv_bn(32, 32, kernel=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(32, num_classes),
        nn.Softmax(dim=1),
    )


def train_example(images: np.ndarray, labels: np.ndarray, epochs: int = 6):
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    model = build_example_cnn()
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    y = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    features = model[:-1]  # train on logits; the Softmax stays in the exported graph
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(features(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def export_example(model, path: Path) -> None:
    import torch

    sample = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    torch.onnx.export(
        model, (sample,), str(path), input_names=["image"], output_names=["probabilities"],
        dynamic_axes={"image": {0: "N"}, "probabilities": {0: "N"}}, opset_version=17, dynamo=False,
        do_constant_folding=False,  # leave BatchNorm and Identity in: qanac's passes fold them, and say so
    )


def prepare(out: Path) -> dict[str, Path]:
    """Train and export the example model; split the digits into calibration and held-out test data."""

    out.mkdir(parents=True, exist_ok=True)
    images, labels = digits_uint8()
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(images))
    train, test = order[:1400], order[1400:]
    model = train_example(images[train], labels[train])
    paths = {
        "model": out / "digits_cnn.onnx",
        "calib": out / "calib.npy",
        "test": out / "test.npz",
        "labels": out / "labels.txt",
    }
    export_example(model, paths["model"])
    np.save(paths["calib"], images[train[:256]])
    np.savez(paths["test"], image=images[test], labels=labels[test])
    paths["labels"].write_text("\n".join(str(d) for d in range(10)) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--target", default="akida")
    args = parser.parse_args(argv)

    from qanac.cli import cli

    print(f"== preparing the example model in {args.out} (digits CNN, trained a few seconds)")
    paths = prepare(args.out)
    bundle = args.out / f"bundle-{args.target}"
    steps = [
        ["inspect", str(paths["model"])],
        ["compile", str(paths["model"]), "--target", args.target, "--calib", str(paths["calib"]),
         "--labels", str(paths["labels"]), "-o", str(bundle), "--force", "--time-passes"],
        ["verify", str(bundle), "--data", str(paths["test"])],
    ]
    for step in steps:
        print(f"\n== qanac {' '.join(step)}")
        try:
            cli.main(step, prog_name="qanac", standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                return int(exc.code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
