"""`qanac eval`: a bundle's classification quality, float reference and compiled model side by side.

Labelled data comes from an ``.npz`` with ``labels``, an image folder with one sub-folder per class, or
a HAM10000 directory (its lesion-grouped test split, made the way `qanac zoo train` made it). Reported
for both models: top-1, macro-F1, balanced accuracy, per-class precision/recall/F1 and the confusion
matrix; classes whose recall drops by more than a threshold after compilation are flagged (rare
classes suffer first). Writes eval.json and confusion.png.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qanac.bundle import Bundle, write_json
from qanac.calibration import HAM10000_CLASSES, CalibrationData, is_ham10000, prepare_array, read_ham10000
from qanac.diagnostics import UsageError
from qanac.metrics import classification_metrics, plot_confusion_matrices, recall_drops
from qanac.verify import bundle_inputs, bundle_preprocessing, load_bundle_data, run_bundle, run_reference


@dataclasses.dataclass
class LabelledData:
    data: CalibrationData
    labels: np.ndarray
    class_names: list[str]
    source: str


def load_labelled(bundle: Bundle, source: str | Path, seed: int = 0) -> LabelledData:
    path = Path(source)
    if is_ham10000(path):
        spec = bundle_inputs(bundle)[0]
        if len(spec.shape) != 4:
            raise UsageError(f"HAM10000 images feed an (N, C, H, W) input; input '{spec.name}' has shape "
                             f"{spec.shape}", hint="give an .npz with 'labels' instead")
        ham = read_ham10000(path, spec.shape[2:])
        _, _, test = ham.split(seed=seed)
        if len(test) == 0:
            raise UsageError(f"the test split of {path} is empty", hint="use a larger HAM10000 directory")
        preprocessing = bundle_preprocessing(bundle)
        source = f"{path} (test split)"
        array, raw = prepare_array(spec, ham.images[test], source, preprocessing)
        data = CalibrationData(arrays={spec.name: array}, source=source, preprocessing=preprocessing,
                               raw=None if raw is None else {spec.name: raw})
        return LabelledData(data, ham.labels[test], list(HAM10000_CLASSES), data.source)
    data = load_bundle_data(bundle, path)
    if data.labels is None or (data.labels < 0).any():
        raise UsageError(
            f"{path} has no labels for every sample",
            hint="give an .npz with a 'labels' array, an image folder with one sub-folder per class, or a "
                 "HAM10000 directory",
        )
    names = bundle.labels
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir() if p.is_dir())
    count = int(data.labels.max()) + 1
    names = list(names or [str(i) for i in range(count)])
    if len(names) < count:
        raise UsageError(f"labels go up to {count - 1} but only {len(names)} class names are known",
                         hint="give labels 0 .. (number of classes - 1)")
    output = bundle.manifest.outputs[0]
    classes = output.shape[-1] if output.shape else None
    if isinstance(classes, int) and classes > 0 and count > classes:
        raise UsageError(f"labels go up to {count - 1} but output '{output.name}' has {classes} classes",
                         hint=f"give labels 0 .. {classes - 1}")
    return LabelledData(data, data.labels.astype(np.int64), names, str(path))


def evaluate_bundle(
    bundle: Bundle,
    labelled: LabelledData,
    out_dir: Path,
    recall_drop: float = 0.05,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    def predictions(outputs: list[np.ndarray]) -> np.ndarray:
        return outputs[0].reshape(len(outputs[0]), -1).argmax(axis=1)

    count = len(labelled.class_names)
    reference = classification_metrics(labelled.labels, predictions(run_reference(bundle, labelled.data, progress)),
                                       count, labelled.class_names)
    compiled_outputs = run_bundle(bundle, labelled.data, progress=progress)
    compiled = classification_metrics(labelled.labels, predictions(compiled_outputs), count, labelled.class_names)
    drops = recall_drops(reference, compiled, recall_drop)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_confusion_matrices(reference["confusion_matrix"], compiled["confusion_matrix"], labelled.class_names,
                                   out_dir / "confusion.png", titles=("float reference", f"compiled ({bundle.target})"))
    result = {
        "bundle": str(bundle.path),
        "data": labelled.source,
        "samples": int(len(labelled.labels)),
        "float": reference,
        "compiled": compiled,
        "recall_drop_threshold": recall_drop,
        "recall_drops": drops,
        "plot": str(plot),
    }
    write_json(out_dir / "eval.json", result)
    return result


def format_evaluation(result: dict[str, Any]) -> str:
    ref, comp = result["float"], result["compiled"]
    lines = [f"{result['samples']} labelled samples from {result['data']}",
             f"{'':<20} {'float':>8} {'compiled':>9}"]
    for key in ("top1", "macro_f1", "balanced_accuracy"):
        lines.append(f"{key:<20} {ref[key]:>8.4f} {comp[key]:>9.4f}")
    lines.append(f"{'class':<20} {'recall float':>12} {'compiled':>9} {'F1 float':>9} {'compiled':>9}")
    for name in ref["class_names"]:
        r, c = ref["per_class"][name], comp["per_class"][name]
        lines.append(f"{name:<20} {r['recall']:>12.4f} {c['recall']:>9.4f} {r['f1']:>9.4f} {c['f1']:>9.4f}")
    for drop in result["recall_drops"]:
        lines.append(f"FLAG: recall of class '{drop['class']}' drops by {drop['drop']:.3f} after compilation")
    lines.append(f"confusion matrices: {result['plot']}")
    return "\n".join(lines)
