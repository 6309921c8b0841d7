"""Training of zoo models: float phase, optional QAT phase, checkpoint, ONNX export, metrics.json.

Protocol (the opposite of the QANA code's flaws): the validation split alone drives the learning-rate
schedule (``plateau``; ``cosine`` follows the epoch count), early stopping and the choice of the best
epoch; the test split is evaluated once, after training, and only reported. The loss is cross-entropy
with class weights from the training split (see :mod:`qanac.zoo.data`).

With ``qat_epochs > 0`` the best float model is prepared for quantization-aware training
(:mod:`qanac.zoo.qat`) and trained on, with its own early stopping; the exported ONNX is then the
QAT model converted back to plain float (BN folded, weights on the quantization grid).

Output directory::

    config.json     model spec (rebuild with registry.build_model), data description and split,
                    preprocessing, class names, training and QAT settings, file names
    float.pt        state_dict of the best float model
    qat.pt          state_dict of the best QAT model (rebuild: prepare_qat(build_model(spec), qat))
    model.onnx      the model to compile: fixed batch 1, input "input" (N,C,H,W float in [0,1]),
                    output "logits"
    float.onnx      the float model, when QAT ran (model.onnx is then the QAT model)
    calib.npy       up to 1024 training images (uint8 NCHW, never augmented, seeded choice) for
                    ``qanac compile --calib``: the compiler calibrates on training data only
    metrics.json    "val"/"test": metrics of the exported model (model.onnx); "float"/"qat": per
                    phase (best epoch, validation and test); "exported": which phase model.onnx holds;
                    per-epoch history, sizes, timings, and the ONNX Runtime vs PyTorch check of model.onnx

:func:`load_run` rebuilds the PyTorch model that model.onnx was exported from.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from qanac.diagnostics import UsageError
from qanac.metrics import classification_metrics
from qanac.zoo.data import DataSplits, ImageDataset, class_weights
from qanac.zoo.export import INPUT_NAME, export_onnx
from qanac.zoo.profile import count_macs, count_parameters
from qanac.zoo.qat import QATConfig, convert_qat_to_float, prepare_qat
from qanac.zoo.registry import ModelSpec, build_model

SCHEDULES = ("cosine", "plateau")
CALIBRATION_IMAGES = 1024  # what the Akida backend calibrates on at most
MONITORS = ("balanced_accuracy", "macro_f1", "top1")


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    patience: int = 8
    monitor: str = "balanced_accuracy"
    class_weight_power: float = 1.0
    qat_epochs: int = 0
    qat_lr: float = 1e-4
    qat: QATConfig = dataclasses.field(default_factory=QATConfig)
    seed: int = 0
    num_threads: int | None = 2
    export_dynamic_batch: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}", hint=f"one of {', '.join(SCHEDULES)}")
        if self.monitor not in MONITORS:
            raise UsageError(f"unknown monitor {self.monitor!r}", hint=f"one of {', '.join(MONITORS)}")
        if self.epochs < 1 or self.qat_epochs < 0 or self.batch_size < 1 or self.patience < 1:
            raise UsageError("epochs, batch_size and patience must be positive and qat_epochs >= 0")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["qat"] = self.qat.to_dict()
        return data


@dataclasses.dataclass
class Progress:
    """One progress event: ``phase_start``, ``batch``, ``epoch_end``, ``phase_end`` or ``done``.

    ``epoch`` counts from 1; ``batch``/``batches`` are set for ``batch`` events; ``loss`` is the running
    mean training loss of the epoch; ``metrics`` are the validation metrics at ``epoch_end``.
    """

    event: str
    phase: str
    epoch: int = 0
    epochs: int = 0
    batch: int = 0
    batches: int = 0
    loss: float | None = None
    metrics: dict[str, float] | None = None
    improved: bool = False
    message: str = ""


ProgressCallback = Callable[[Progress], None]


@dataclasses.dataclass
class TrainResult:
    model: nn.Module
    float_model: nn.Module
    qat_model: nn.Module | None
    metrics: dict[str, Any]
    out_dir: Path | None


def predict(model: nn.Module, dataset: ImageDataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, classes) of ``model`` on the un-augmented images of ``dataset``, and the labels."""

    images, labels = dataset.arrays()
    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            outputs.append(model(torch.from_numpy(images[start : start + batch_size])).numpy())
    model.train(was_training)
    return np.concatenate(outputs), labels


def evaluate(model: nn.Module, dataset: ImageDataset, class_names) -> dict[str, Any]:
    logits, labels = predict(model, dataset)
    return classification_metrics(labels, logits.argmax(axis=1), len(class_names), class_names)


def train(
    spec: ModelSpec,
    data: DataSplits,
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    callback: ProgressCallback | None = None,
) -> TrainResult:
    """Train the model described by ``spec`` on ``data`` and write the outputs to ``out_dir``."""

    config = config or TrainConfig()
    callback = callback or (lambda progress: None)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    spec = dataclasses.replace(spec, kwargs={**spec.kwargs, "num_classes": data.num_classes})
    model = build_model(spec)
    expected = tuple(getattr(model, "input_shape", data.input_shape))
    if expected != data.input_shape:
        raise UsageError(
            f"the model takes inputs of shape {expected} but the data has {data.input_shape}",
            hint="set the model's input_size to the data's image size",
        )
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    weights = class_weights(data.train.labels, data.num_classes, config.class_weight_power)
    criterion = nn.CrossEntropyLoss(weight=weights if config.class_weight_power else None)
    history: list[dict[str, Any]] = []
    started = time.perf_counter()

    float_model, float_summary = _run_phase(
        "float", model, data, criterion, config.epochs, config.lr, config, history, callback
    )
    metrics: dict[str, Any] = {
        "model": spec.to_dict(),
        "parameters": count_parameters(float_model),
        "macs": count_macs(float_model, data.input_shape),
        "float": {**float_summary, "val": evaluate(float_model, data.val, data.class_names)},
    }
    qat_model = None
    final = float_model
    if config.qat_epochs:
        prepared = prepare_qat(float_model, config.qat)
        qat_model, qat_summary = _run_phase(
            "qat", prepared, data, criterion, config.qat_epochs, config.qat_lr, config, history, callback
        )
        final = convert_qat_to_float(qat_model)
        metrics["qat"] = {
            **qat_summary,
            "config": config.qat.to_dict(),
            "val": evaluate(qat_model, data.val, data.class_names),
        }
    # Training is over: the test split is looked at only from here on.
    metrics["float"]["test"] = evaluate(float_model, data.test, data.class_names)
    if qat_model is not None:
        metrics["qat"]["test"] = evaluate(qat_model, data.test, data.class_names)
    final.eval()
    metrics["exported"] = "qat" if qat_model is not None else "float"
    metrics["val"] = evaluate(final, data.val, data.class_names)
    metrics["test"] = evaluate(final, data.test, data.class_names)
    metrics["history"] = history
    metrics["seconds"] = time.perf_counter() - started

    if out is not None:
        _write_outputs(out, spec, data, config, float_model, qat_model, final, metrics)
    callback(Progress("done", "qat" if qat_model is not None else "float", message=str(out or "")))
    return TrainResult(model=final, float_model=float_model, qat_model=qat_model, metrics=metrics, out_dir=out)


def _run_phase(
    phase: str,
    model: nn.Module,
    data: DataSplits,
    criterion: nn.Module,
    epochs: int,
    lr: float,
    config: TrainConfig,
    history: list[dict[str, Any]],
    callback: ProgressCallback,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` for up to ``epochs``; return it with the weights of its best validation epoch."""

    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=generator, drop_last=False)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=config.weight_decay
    )
    if config.schedule == "cosine":
        scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.5, patience=max(1, config.patience // 3)
        )
    best_score = -math.inf
    best_state = copy.deepcopy(model.state_dict())
    best_epoch = 0
    stale = 0
    seconds = []
    callback(Progress("phase_start", phase, epochs=epochs, batches=len(loader)))
    for epoch in range(1, epochs + 1):
        tick = time.perf_counter()
        model.train()
        total, count = 0.0, 0
        for batch, (images, labels) in enumerate(loader, start=1):
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(images), labels)
            if not torch.isfinite(loss):
                raise UsageError(f"the training loss became {loss.item()} in {phase} epoch {epoch}",
                                 hint="lower the learning rate")
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            count += len(labels)
            callback(Progress("batch", phase, epoch, epochs, batch, len(loader), loss=total / count))
        train_seconds = time.perf_counter() - tick
        seconds.append(train_seconds)
        val = evaluate(model, data.val, data.class_names)
        score = val[config.monitor]
        improved = score > best_score
        if improved:
            best_score, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        lr_now = optimizer.param_groups[0]["lr"]
        if config.schedule == "cosine":
            scheduler.step()
        else:
            scheduler.step(score)
        summary = {k: val[k] for k in ("top1", "macro_f1", "balanced_accuracy")}
        history.append({
            "phase": phase, "epoch": epoch, "train_loss": total / max(count, 1), "lr": lr_now,
            "train_seconds": train_seconds, "val": summary,
        })
        callback(Progress("epoch_end", phase, epoch, epochs, loss=total / max(count, 1), metrics=summary,
                          improved=improved))
        if stale >= config.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    callback(Progress("phase_end", phase, best_epoch, epochs, message=f"best epoch {best_epoch}"))
    return model, {
        "best_epoch": best_epoch,
        "epochs_run": len(seconds),
        "monitor": config.monitor,
        "best_val_score": best_score,
        "seconds_per_epoch": float(np.mean(seconds)) if seconds else 0.0,
    }


def _write_outputs(
    out: Path,
    spec: ModelSpec,
    data: DataSplits,
    config: TrainConfig,
    float_model: nn.Module,
    qat_model: nn.Module | None,
    final: nn.Module,
    metrics: dict[str, Any],
) -> None:
    files = {"float_state": "float.pt", "onnx": "model.onnx"}
    torch.save(float_model.state_dict(), out / "float.pt")
    if qat_model is not None:
        torch.save(qat_model.state_dict(), out / "qat.pt")
        files["qat_state"] = "qat.pt"
        files["float_onnx"] = "float.onnx"
        export_onnx(float_model, data.input_shape, out / "float.onnx", dynamic_batch=config.export_dynamic_batch)
    export_onnx(final, data.input_shape, out / "model.onnx", dynamic_batch=config.export_dynamic_batch)
    metrics["onnx_check"] = check_onnx_matches(final, out / "model.onnx", data.test)
    np.save(out / "calib.npy", calibration_images(data.train, seed=config.seed))
    files["calibration"] = "calib.npy"
    files["metrics"] = "metrics.json"
    batch = "N" if config.export_dynamic_batch else 1
    description = {
        "model": spec.to_dict(),
        "input": {"name": INPUT_NAME, "shape": [batch, *data.input_shape], "dtype": "float32"},
        "class_names": list(data.class_names),
        "preprocessing": data.preprocessing.to_dict(),
        "data": data.describe(),
        "train": config.to_dict(),
        "qat": qat_model is not None,
        "files": files,
        "versions": {"torch": torch.__version__},
    }
    (out / "config.json").write_text(json.dumps(description, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def calibration_images(dataset: ImageDataset, count: int = CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
    """Up to ``count`` of the dataset's uint8 images (never augmented), chosen with ``seed``, in order."""

    chosen = np.random.default_rng(seed).permutation(len(dataset.images))[:count]
    return dataset.images[np.sort(chosen)]


def check_onnx_matches(model: nn.Module, onnx_path: Path, dataset: ImageDataset, samples: int = 8) -> dict[str, Any]:
    """Run the first ``samples`` images through ONNX Runtime and PyTorch; report the largest difference."""

    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images, _ = dataset.arrays()
    images = images[:samples]
    model.eval()
    with torch.no_grad():
        reference = model(torch.from_numpy(images)).numpy()
    got = np.concatenate([session.run(None, {INPUT_NAME: image[None]})[0] for image in images])
    return {"samples": len(images), "max_abs_diff": float(np.max(np.abs(got - reference))) if len(images) else 0.0}


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model a training run exported (QAT model converted to float when QAT ran), and its config."""

    run = Path(run_dir)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{run} is not a training run directory (no config.json)")
    config = json.loads(config_path.read_text())
    model = build_model(ModelSpec.from_dict(config["model"]))
    files = config.get("files", {})
    model.load_state_dict(torch.load(run / files.get("float_state", "float.pt"), map_location="cpu"))
    if "qat_state" in files:
        qmodel = prepare_qat(model, QATConfig(**config["train"]["qat"]))
        qmodel.load_state_dict(torch.load(run / files["qat_state"], map_location="cpu"))
        model = convert_qat_to_float(qmodel)
    return model.eval(), config
