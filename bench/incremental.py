"""Incremental learning on Akida bundles (`qanac learn`) against full retraining and naive fine-tuning.

    python bench/incremental.py [--datasets digits,ham10000] [--shots 1,5,10,20] [--devices SixNodesIPv2,AKD1000]
                                [--epochs 10] [--ham10000 DIR | --ham-noise 1.0] [--out FILE.json] [--workdir DIR]

Per data set, a small sequential CNN (the v1-shaped digits CNN: Conv/ReLU6/MaxPool, depthwise + pointwise/
ReLU6/MaxPool, Conv/ReLU6, Linear) is trained on the *base* classes of the training split only. Three classes
are *new*: their training images form the pool the k shots per class are drawn from (seeded); the held-out
split is never used for training or learning, and every number is measured on it.

- ``qanac learn``: the base model compiled ``--learnable`` (labelled calibration: base-class training images)
  per device; old-class accuracy of that bundle before learning, then old and new after learning k shots.
- full retraining (upper bound): the same CNN trained from scratch on every training image of all classes,
  float (ONNX Runtime is not involved: PyTorch evaluates it).
- naive fine-tuning (forgetting): the float base model with its classifier extended by the new classes,
  every weight fine-tuned on the k shots per new class only (Adam, ``FINETUNE_STEPS`` steps).

Data sets: scikit-learn's digits (16x16, 7 base classes 0-6, new 7-9; the library's 70/30 split of
``tests/akida/v1_models.py``), and the generated HAM10000 layout (``qanac.calibration.write_ham10000_fixture``,
class-dependent colour and stripes, read at 16x16, with Gaussian pixel noise ``--ham-noise`` so that the task is
not trivial; lesion-grouped split; base classes akiec, bcc, bkl, df, new mel, nv, vasc), or a real HAM10000
folder (``--ham10000 DIR``). Prints one table; ``--out`` writes every number as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 16
FINETUNE_STEPS = 30
HAM_IMAGES_PER_CLASS = 200


def digits_data(seed: int = 0) -> dict[str, np.ndarray | int | list[str]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.kron(digits.images / 16.0, np.ones((2, 2)))[:, None].astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.3, random_state=seed,
                                                        stratify=digits.target)
    return {"x_train": x_train, "y_train": y_train.astype(np.int64), "x_test": x_test,
            "y_test": y_test.astype(np.int64), "base": 7, "names": [str(i) for i in range(10)]}


def ham_data(workdir: Path, seed: int = 0, root: Path | None = None, noise: float = 0.0
             ) -> dict[str, np.ndarray | int | list[str]]:
    """A HAM10000 folder (``root``), or the generated layout with Gaussian pixel noise of ``noise`` (in [0, 1]
    units) added: the generated classes differ by colour and stripe angle, which alone any model separates."""

    from qanac.calibration import HAM10000_CLASSES, read_ham10000, write_ham10000_fixture

    if root is None:
        root = write_ham10000_fixture(workdir / "ham10000", images_per_class=HAM_IMAGES_PER_CLASS, seed=seed)
    ham = read_ham10000(root, (SIZE, SIZE), cache=False)
    train, val, test = ham.split(seed=seed)
    train = np.concatenate([train, val])
    images = ham.images.astype(np.float32) / 255.0
    if noise > 0:
        images = np.clip(images + np.random.default_rng(seed).normal(0.0, noise, images.shape), 0.0, 1.0)
        images = images.astype(np.float32)
    return {"x_train": images[train], "y_train": ham.labels[train], "x_test": images[test],
            "y_test": ham.labels[test], "base": 4, "names": list(HAM10000_CLASSES)}


def make_net(channels: int, classes: int):
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU6(), nn.MaxPool2d(2),
                nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1), nn.ReLU6(), nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU6(),
            )
            self.classifier = nn.Linear(32 * (SIZE // 4) ** 2, classes)

        def forward(self, images):
            return self.classifier(self.features((images - 0.5) / 0.5).flatten(1))

    return Net()


def train(net, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, lr: float = 3e-3):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    data, labels = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(data), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(data[batch]), labels[batch]).backward()
            optimizer.step()
    net.eval()
    return net


def finetune(base_net, classes: int, x: np.ndarray, y: np.ndarray, seed: int):
    """The base net with its classifier extended to ``classes`` outputs, every weight trained on (x, y)."""

    import copy

    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = copy.deepcopy(base_net)
    old = net.classifier
    net.classifier = nn.Linear(old.in_features, classes)
    with torch.no_grad():
        net.classifier.weight[: old.out_features] = old.weight
        net.classifier.bias[: old.out_features] = old.bias
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    data, labels = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    for _ in range(FINETUNE_STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(data), labels).backward()
        optimizer.step()
    net.eval()
    return net


def predict(net, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(x)).argmax(1).numpy()


def export(net, x: np.ndarray, path: Path) -> None:
    import torch

    buffer = io.BytesIO()
    torch.onnx.export(net, torch.zeros(1, *x.shape[1:]), buffer, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    onnx.save(onnx.load_from_string(buffer.getvalue()), str(path))


def split_accuracy(predicted: np.ndarray, labels: np.ndarray, base: int) -> tuple[float, float]:
    old = labels < base
    return float((predicted[old] == labels[old]).mean()), float((predicted[~old] == labels[~old]).mean())


def bundle_predictions(bundle_path: Path, data: Path) -> np.ndarray:
    from qanac.bundle import Bundle
    from qanac.verify import load_bundle_data, run_bundle

    bundle = Bundle.open(bundle_path)
    return run_bundle(bundle, load_bundle_data(bundle, data))[0].argmax(1)


def shots(y: np.ndarray, classes: list[int], k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False) for c in classes])


def run_dataset(name: str, data: dict, args: argparse.Namespace, workdir: Path) -> list[dict]:
    from click.testing import CliRunner

    from qanac.backends.akida.learning import learn_bundle
    from qanac.cli import cli

    x_train, y_train, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    base, classes = int(data["base"]), int(y_train.max()) + 1
    new = list(range(base, classes))
    in_base = y_train < base
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "heldout.npz", input=x_test, labels=y_test)
    np.savez(folder / "calib.npz", input=x_train[in_base][:512], labels=y_train[in_base][:512])
    rows = []

    started = time.perf_counter()
    base_net = train(make_net(x_train.shape[1], base), x_train[in_base], y_train[in_base], args.epochs, args.seed)
    export(base_net, x_train, folder / "base.onnx")
    full = train(make_net(x_train.shape[1], classes), x_train, y_train, args.epochs, args.seed)
    full_old, full_new = split_accuracy(predict(full, x_test), y_test, base)
    float_old, _ = split_accuracy(predict(base_net, x_test), y_test, base)
    print(f"[{name}] trained base and full models in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    bundles = {}
    for device in args.devices:
        out = folder / f"learnable-{device}"
        result = CliRunner().invoke(cli, ["compile", str(folder / "base.onnx"), "--target", "akida", "--device",
                                          device, "--calib", str(folder / "calib.npz"), "--learnable", "-o", str(out),
                                          "--force"])
        if result.exit_code != 0:
            raise SystemExit(f"compile for {device} failed:\n{result.output}")
        bundles[device] = (out, split_accuracy(bundle_predictions(out, folder / "heldout.npz"), y_test, base)[0])
        print(f"[{name}] compiled --learnable for {device}", file=sys.stderr)

    for k in args.shots:
        picked = shots(y_train, new, k, args.seed + k)
        np.savez(folder / f"shots-{k}.npz", input=x_train[picked], labels=y_train[picked])
        tuned = finetune(base_net, classes, x_train[picked], y_train[picked], args.seed)
        tuned_old, tuned_new = split_accuracy(predict(tuned, x_test), y_test, base)
        row = {"dataset": name, "k": k, "base_classes": base, "new_classes": len(new), "float_base_old": float_old,
               "full_retraining": {"old": full_old, "new": full_new},
               "naive_finetuning": {"old_before": float_old, "old_after": tuned_old, "new": tuned_new}}
        for device, (bundle, old_before) in bundles.items():
            learned = folder / f"learned-{device}-{k}"
            shutil.rmtree(learned, ignore_errors=True)
            learn_bundle(bundle, folder / f"shots-{k}.npz", learned)
            old_after, new_acc = split_accuracy(bundle_predictions(learned, folder / "heldout.npz"), y_test, base)
            row[f"qanac_learn_{device}"] = {"old_before": old_before, "old_after": old_after, "new": new_acc}
        rows.append(row)
        print(f"[{name}] k={k} done", file=sys.stderr)
    return rows


def format_table(rows: list[dict], devices: list[str]) -> str:
    header = ["data", "k"]
    for device in devices:
        header += [f"{device} old before", "old after", "new"]
    header += ["fine-tune old before", "old after", "new", "full retrain old", "new"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["dataset"], str(row["k"])]
        for device in devices:
            r = row[f"qanac_learn_{device}"]
            cells += [f"{100 * r['old_before']:.1f}", f"{100 * r['old_after']:.1f}", f"{100 * r['new']:.1f}"]
        t, f = row["naive_finetuning"], row["full_retraining"]
        cells += [f"{100 * t['old_before']:.1f}", f"{100 * t['old_after']:.1f}", f"{100 * t['new']:.1f}",
                  f"{100 * f['old']:.1f}", f"{100 * f['new']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,ham10000")
    parser.add_argument("--shots", default="1,5,10,20")
    parser.add_argument("--devices", default="SixNodesIPv2,AKD1000")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ham10000", type=Path, help="a HAM10000 folder (default: the generated layout)")
    parser.add_argument("--ham-noise", type=float, default=1.0,
                        help="pixel noise added to the generated HAM10000 layout (not to a --ham10000 folder)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    args.shots = [int(k) for k in args.shots.split(",")]
    args.devices = args.devices.split(",")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qanac-incremental-"))

    import torch

    torch.set_num_threads(1)
    rows = []
    for name in args.datasets.split(","):
        data = digits_data(args.seed) if name == "digits" else ham_data(
            workdir, args.seed, args.ham10000, 0.0 if args.ham10000 else args.ham_noise)
        rows += run_dataset(name, data, args, workdir)
    print("accuracy on held-out images (%); old = base classes, new = learned classes")
    print(format_table(rows, args.devices))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
