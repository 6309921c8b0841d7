"""Classification metrics from label arrays, a float-vs-compiled confusion plot, and recall-drop flags,
shared by `qanac eval` and the zoo's training.

All functions take integer class indices (``y_true``, ``y_pred``) as numpy arrays. Definitions follow
scikit-learn: precision, recall and F1 are 0 where undefined (no predictions / no samples of a class);
macro-F1 averages over all ``num_classes`` classes; balanced accuracy is the mean recall over the
classes present in ``y_true``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qanac.diagnostics import UsageError


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class ``i`` predicted as ``j``."""

    y_true, y_pred = _check_labels(y_true, y_pred, num_classes)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy, macro-F1, balanced accuracy, per-class precision/recall/F1/support, confusion."""

    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else int(max(np.max(y_true), np.max(y_pred))) + 1
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise UsageError(f"{len(names)} class names for {num_classes} classes")
    cm = confusion_matrix(y_true, y_pred, num_classes)
    true_positive = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = np.divide(true_positive, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros(num_classes), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(num_classes), where=denominator > 0)
    total = cm.sum()
    return {
        "num_samples": int(total),
        "top1": float(true_positive.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()),
        "balanced_accuracy": float(recall[support > 0].mean()) if np.any(support > 0) else 0.0,
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": cm.tolist(),
        "class_names": names,
    }


def recall_drops(
    reference: dict[str, Any],
    candidate: dict[str, Any],
    threshold: float = 0.05,
) -> list[dict[str, Any]]:
    """Classes whose recall in ``candidate`` is lower than in ``reference`` by more than ``threshold``.

    Both arguments are results of :func:`classification_metrics` on the same data (e.g. float model vs
    compiled model). Classes without samples are skipped. Sorted by the size of the drop.
    """

    flagged = []
    for name, ref in reference["per_class"].items():
        cand = candidate["per_class"].get(name)
        if cand is None or ref["support"] == 0:
            continue
        drop = ref["recall"] - cand["recall"]
        if drop > threshold:
            flagged.append({
                "class": name,
                "reference_recall": ref["recall"],
                "candidate_recall": cand["recall"],
                "drop": drop,
                "support": ref["support"],
            })
    return sorted(flagged, key=lambda item: -item["drop"])


def plot_confusion_matrices(
    reference: np.ndarray | Sequence[Sequence[int]],
    candidate: np.ndarray | Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | Path,
    titles: tuple[str, str] = ("float", "compiled"),
    normalize: bool = True,
) -> Path:
    """Write a PNG with two confusion matrices side by side (rows: true class; normalised per row).

    matplotlib is imported here, not at module level, so that computing metrics never loads it.
    """

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrices = [np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)]
    for matrix in matrices:
        if matrix.shape != (len(class_names), len(class_names)):
            raise UsageError(f"confusion matrix of shape {matrix.shape} for {len(class_names)} classes")
    size = max(4.0, 0.6 * len(class_names) + 2.0)
    figure, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), constrained_layout=True)
    for axis, matrix, title in zip(axes, matrices, titles, strict=True):
        counts = matrix
        if normalize:
            rows = matrix.sum(axis=1, keepdims=True)
            matrix = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
        image = axis.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                text = f"{matrix[i, j]:.2f}\n({int(counts[i, j])})" if normalize else f"{int(counts[i, j])}"
                colour = "white" if matrix[i, j] > (0.5 if normalize else matrix.max() / 2) else "black"
                axis.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
        axis.set_title(title)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
        axis.set_yticks(range(len(class_names)), class_names)
    figure.colorbar(image, ax=list(axes), shrink=0.8)
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _check_labels(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise UsageError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    for name, array in (("true labels", y_true), ("predictions", y_pred)):
        if array.size and (array.min() < 0 or array.max() >= num_classes):
            raise UsageError(f"{name} must lie in [0, {num_classes}), got [{array.min()}, {array.max()}]")
    return y_true, y_pred
