"""Learning on a compiled Akida bundle: new classes, or more samples of known ones, from a few labelled samples,
without retraining the feature extractor and with every sample passing only through the device model.

A learnable bundle is compiled with ``--learnable`` from labelled calibration data (an .npz with ``labels``);
``qanac learn BUNDLE --data NEW -o OUT`` writes a new bundle that knows the new classes (docs/learning.md).

- **IP v1** (AKD1000, AKD1500): akida's native edge learning. ``--learnable`` quantizes the ReLU that feeds
  the classifier to 1-bit outputs (``v1.convert.spike_layer``) and replaces the classifier with a
  ``FullyConnected(activation=False, weights_bits=1)`` of ``NEURONS_PER_CLASS`` neurons per class, compiled with
  ``AkidaUnsupervised`` (``num_weights``: the mean number of 1-bit features that fire on the calibration data)
  and primed with the labelled calibration samples (``prime_v1``). ``learn`` calls ``add_classes`` for the
  new classes and ``fit`` on the samples (``LEARN_PASSES`` passes); the layers before it do not change.
- **IP v2**: the device's last layer is not trainable ("The last layer of the model is not trainable"), but
  its variables can be written. ``--learnable`` records, from the labelled calibration samples, the statistics
  of the features the device computes (the Akida model without its Dense1D and Dequantizer): per-class
  means and counts and the pooled within-class scatter (``STATISTICS_FILE``). ``learn`` adds the new
  samples' features to them and computes a linear discriminant head for every class (class means under a
  shared covariance shrunk by ``SHRINKAGE``: ``w_k = S^-1 m_k``, ``b_k = -m_k . w_k / 2``), quantizes it to
  the Dense1D's int8 weights, int8 bias with its shift, and one Dequantizer scale per class, and writes it
  with ``set_variable`` into a last layer with one unit per class.

The learned bundle is a normal bundle (the files its manifest names, report.json with one entry per learning
step, and report.html rendered afresh; not the verify and eval results of the bundle it learned from): its
labels are extended, its output has one value per class, and the
segment's ``learning`` record (``LearningRecord``) lists every class with the number of samples it was learned
from and every learning step. Its float reference (``reference.onnx``) is the float model up to the
classifier's input followed by the learned head in float (v1: the 1-bit threshold, the binary weights and
the maximum over each class's neurons; v2: the discriminant head on the float features), so ``qanac verify``
compares the device with the same function in float. The quantized variant is left out: it describes the
model before learning. Learning on a board (``hardware``) maps the model on ``akida.devices()[index]``
first; no board was available to test it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qanac import bundle as bundle_io
from qanac.calibration import CalibrationData
from qanac.diagnostics import UsageError
from qanac.manifest import COMPILED, REFERENCE_ROLE, Record

V1_METHOD = "akida-unsupervised"
V2_METHOD = "discriminant-head"
NEURONS_PER_CLASS = 10
LEARNING_COMPETITION = 0.1
LEARN_PASSES = 3  # passes over the samples at each ``learn`` (priming makes one over the calibration data)
SHRINKAGE = 0.1  # covariance shrinkage towards its mean variance (v2)
STATISTICS_FILE = "learning.npz"
STATISTICS = "learning"  # file role of the v2 statistics
QUANTIZED = "quantized"
LEARNED = "learned/"  # prefix of the node names of a learned head in the float reference


@dataclasses.dataclass
class LearnedClass(Record):
    label: str
    samples: int  # labelled samples the class was learned from (calibration and every learning step)


@dataclasses.dataclass
class LearningStep(Record):
    data: str  # where the samples came from
    samples: int
    added: list[str]  # classes this step added
    refined: list[str]  # known classes it learned more samples of


@dataclasses.dataclass
class LearningRecord(Record):
    """How a learnable device segment learns, what it has learned, and from how many samples."""

    method: Literal["akida-unsupervised", "discriminant-head"]
    feature_shape: list[int]  # the device features the learned head reads, (H, W, C)
    classes: list[LearnedClass]  # in output order
    steps: list[LearningStep]  # the priming at compile time first
    num_weights: int | None = None  # v1: AkidaUnsupervised's connections per neuron
    neurons_per_class: int | None = None  # v1
    learning_competition: float | None = None  # v1
    spike_threshold: float | None = None  # v1: the float feature value from which a 1-bit feature fires
    shrinkage: float | None = None  # v2

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.classes]


# -- labelled samples ---------------------------------------------------------------------------------------


def class_indices(labels: np.ndarray | None, known: int, source: str) -> np.ndarray:
    """``labels`` as class indices for a learnable compile over ``known`` classes: every class present."""

    if labels is None or len(labels) == 0 or (labels < 0).any():
        raise UsageError(f"--learnable needs a class label for every calibration sample; {source} has none",
                         hint="give --calib an .npz with the input array and 'labels' (one class index each)")
    missing = sorted(set(range(known)) - set(labels.tolist()))
    if labels.max() >= known or missing:
        raise UsageError(f"the calibration labels of {source} must cover classes 0 .. {known - 1} of the model's "
                         f"{known} outputs (missing {missing}, largest label {int(labels.max())})",
                         hint="a learnable bundle starts from the classes the model was trained on")
    return labels.astype(np.int64)


def new_class_names(names: list[str], labels: np.ndarray, folder_names: list[str] | None) -> tuple[np.ndarray,
                                                                                                     list[str]]:
    """Map learning labels onto the bundle's classes ``names``: (class index per sample, names of new classes).

    From an image folder (``folder_names``: its sorted sub-folders, which the labels index) a sub-folder
    named like a known class refines it and any other adds a class. From an .npz, an index below
    ``len(names)`` refines that class and the indices from ``len(names)`` on add classes, without gaps."""

    if folder_names is not None:
        added = [n for n in folder_names if n not in names]
        index = {n: (names.index(n) if n in names else len(names) + added.index(n)) for n in folder_names}
        return np.array([index[folder_names[i]] for i in labels], dtype=np.int64), added
    count = len(names)
    new = sorted({int(i) for i in labels if i >= count})
    if new and new != list(range(count, new[-1] + 1)):
        raise UsageError(f"new classes must be numbered {count}, {count + 1}, ... without gaps; the labels hold "
                         f"{new}", hint=f"the bundle has {count} classes (0 .. {count - 1})")
    return labels.astype(np.int64), [str(i) for i in new]


# -- statistics and the discriminant head (v2) ---------------------------------------------------------------


@dataclasses.dataclass
class FeatureStatistics:
    """Per-class means and counts and the pooled within-class scatter of device features (float64)."""

    means: np.ndarray  # (classes, D)
    counts: np.ndarray  # (classes,)
    scatter: np.ndarray  # (D, D): sum over samples of (x - m_class)(x - m_class)^T
    feature_scale: np.ndarray  # (C,): float feature value of one device level, per channel

    @classmethod
    def empty(cls, dimension: int, feature_scale: np.ndarray) -> "FeatureStatistics":
        return cls(np.zeros((0, dimension)), np.zeros(0, np.int64), np.zeros((dimension, dimension)),
                   np.asarray(feature_scale, np.float64))

    def add(self, features: np.ndarray, classes: np.ndarray) -> None:
        """Merge samples into the statistics (Chan's parallel update); classes past the end are appended."""

        for k in np.unique(classes):
            x = features[classes == k].astype(np.float64)
            mean, n = x.mean(0), len(x)
            centred = x - mean
            self.scatter += centred.T @ centred
            if k >= len(self.counts):
                self.means = np.vstack([self.means, mean[None]])
                self.counts = np.append(self.counts, n)
                continue
            m, old = self.means[k], int(self.counts[k])
            delta = mean - m
            self.scatter += np.outer(delta, delta) * old * n / (old + n)
            self.means[k] = m + delta * n / (old + n)
            self.counts[k] = old + n

    def head(self, shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
        """The linear discriminant head (weights (D, classes), bias (classes,)) on device feature levels."""

        dimension = self.scatter.shape[0]
        covariance = self.scatter / max(int(self.counts.sum()) - len(self.counts), 1)
        average = float(np.trace(covariance)) / dimension or 1.0
        covariance = (1 - shrinkage) * covariance + shrinkage * average * np.eye(dimension)
        weights = np.linalg.solve(covariance, self.means.T)
        return weights, -0.5 * np.einsum("kd,dk->k", self.means, weights)

    def save(self, path: Path) -> None:
        np.savez(path, means=self.means, counts=self.counts, scatter=self.scatter, feature_scale=self.feature_scale)

    @classmethod
    def load(cls, path: Path) -> "FeatureStatistics":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["means"], data["counts"], data["scatter"], data["feature_scale"])


def quantize_head(weights: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
    """A float head on device feature levels as Dense1D variables (int8 weights (D, K), int8 bias with
    ``bias_shift``, unit output scales) and one Dequantizer scale per class: output = scale * (x.W + b << s)."""

    scale = np.abs(weights).max(0) / 127.0
    scale[scale == 0] = 1.0
    q_weights = np.clip(np.round(weights / scale), -127, 127).astype(np.int8)
    accumulator_bias = bias / scale
    shift = np.maximum(np.ceil(np.log2(np.maximum(np.abs(accumulator_bias), 1e-12) / 127.0)), 0).astype(np.uint8)
    q_bias = np.clip(np.round(accumulator_bias / 2.0 ** shift), -127, 127).astype(np.int8)
    return {"weights": q_weights, "bias": q_bias, "bias_shift": shift, "scales": scale.astype(np.float32)}


# -- the device models ---------------------------------------------------------------------------------------


def v2_feature_model(akida_model: Any) -> Any:
    """The Akida IP v2 model without its last Dense1D and Dequantizer: what computes the features."""

    import akida

    kinds = [layer.parameters.layer_type for layer in akida_model.layers[-2:]]
    if kinds != [akida.LayerType.Dense1D, akida.LayerType.Dequantizer]:
        raise UsageError("a learnable Akida IP v2 model ends with a dense classifier (Dense1D, then its "
                         f"Dequantizer); this one ends with {[str(k).rsplit('.', 1)[-1] for k in kinds]}",
                         hint="end the model with [Flatten] > Linear, or compile without --learnable")
    return akida.Model(layers=akida_model.layers[:-2])


def device_features(feature_model: Any, inputs: np.ndarray, nhwc: bool) -> np.ndarray:
    """The device feature levels of ``inputs`` (NCHW float), flattened in the device's (H, W, C) order."""

    from .v1.lowering import to_nhwc

    data = np.ascontiguousarray(to_nhwc(inputs) if nhwc else inputs, dtype=np.float32)
    chunks = [feature_model.forward(data[i : i + 256]) for i in range(0, len(data), 256)]
    return np.concatenate(chunks).reshape(len(data), -1).astype(np.float64)


def with_head(akida_model: Any, head: dict[str, np.ndarray]) -> Any:
    """A copy of the IP v2 ``akida_model`` whose last Dense1D has one unit per class of ``head``."""

    import akida

    dense = akida_model.layers[-2]
    params = dense.parameters
    units = head["weights"].shape[1]
    model = akida.Model(layers=akida_model.layers[:-2])
    model.add(akida.Dense1D(units=units, output_bits=params.output_bits, buffer_bits=params.buffer_bits,
                            post_op_buffer_bits=params.post_op_buffer_bits, activation=params.activation,
                            weights_bits=params.weights_bits, name=dense.name))
    model.add(akida.Dequantizer(name=akida_model.layers[-1].name))
    new_dense, dequantizer = model.layers[-2], model.layers[-1]
    new_dense.set_variable("weights", head["weights"])
    new_dense.set_variable("bias", head["bias"])
    new_dense.set_variable("bias_shift", head["bias_shift"])
    new_dense.set_variable("input_shift", dense.get_variable("input_shift"))
    new_dense.set_variable("output_scales", np.ones(units, np.uint8))
    new_dense.set_variable("output_shift", np.zeros(units, np.int8))
    dequantizer.set_variable("scales", head["scales"])
    return model


def feature_scale(float_features: np.ndarray, levels: np.ndarray, channels: int) -> np.ndarray:
    """Per channel, the float value of one device level (least squares over samples and positions); both
    arrays are (N, H*W*C) in (H, W, C) order."""

    f = float_features.reshape(-1, channels)
    q = levels.reshape(-1, channels)
    denominator = (q * q).sum(0)
    scale = (f * q).sum(0) / np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, scale, 1.0)


# -- compile --learnable --------------------------------------------------------------------------------------


def prime_v2(akida_model: Any, model: onnx.ModelProto, calibration: CalibrationData, input_name: str,
             out_dir: Path) -> tuple[dict[str, str], LearningRecord, dict[str, Any]]:
    """``--learnable`` on IP v2: the feature statistics of the labelled calibration samples, written to
    ``out_dir``; returns (files by role, the learning record, a report)."""

    classes = int(akida_model.output_shape[-1])
    labels = class_indices(calibration.labels, classes, calibration.source)
    inputs = calibration.arrays[input_name]
    features = v2_feature_model(akida_model)
    levels = device_features(features, inputs, nhwc=False)
    shape = [int(d) for d in features.output_shape]
    float_features = float_classifier_input(model, {input_name: inputs})
    stats = FeatureStatistics.empty(levels.shape[1], feature_scale(float_features, levels, shape[-1]))
    stats.add(levels, labels)
    stats.save(Path(out_dir) / STATISTICS_FILE)
    record = LearningRecord(
        method=V2_METHOD, feature_shape=shape,
        classes=[LearnedClass(str(k), int(n)) for k, n in enumerate(stats.counts)],
        steps=[LearningStep(calibration.source, len(labels), [str(k) for k in range(classes)], [])],
        shrinkage=SHRINKAGE)
    weights, bias = stats.head()
    report = {"samples": len(labels), "features": shape,
              "discriminant_accuracy_on_calibration": float(((levels @ weights + bias).argmax(1) == labels).mean())}
    return {STATISTICS: STATISTICS_FILE}, record, report


def prime_v1(akida_model: Any, model: onnx.ModelProto, calibration: CalibrationData, input_name: str
             ) -> tuple[Any, LearningRecord, dict[str, Any]]:
    """``--learnable`` on IP v1: ``akida_model`` (its last layer reading 1-bit features) with that layer
    replaced by an AkidaUnsupervised learning layer primed with the labelled calibration samples; returns
    (model, learning record, report). The float value from which a feature fires (for the float reference
    of a learned bundle) is the one that best matches the device's 1-bit features on the calibration data."""

    import akida

    from .v1.lowering import to_nhwc

    classes = int(akida_model.output_shape[-1])
    labels = class_indices(calibration.labels, classes, calibration.source)
    data = to_nhwc(calibration.arrays[input_name]).astype(np.float32)
    features = akida.Model(layers=akida_model.layers[:-1])
    spikes = features.forward(data).reshape(len(data), -1)
    num_weights = max(1, int(round(float((spikes > 0).sum(1).mean()))))
    threshold, spike_agreement = spike_threshold(float_classifier_input(model, {input_name: calibration.arrays[
        input_name]}), spikes > 0)
    last = akida_model.layers[-1]
    model = akida.Model(layers=akida_model.layers[:-1])
    model.add(akida.FullyConnected(units=classes * NEURONS_PER_CLASS, name=last.name, weights_bits=1,
                                   activation=False))
    model.compile(akida.AkidaUnsupervised(num_weights=num_weights, num_classes=classes,
                                          learning_competition=LEARNING_COMPETITION))
    model.fit(data, labels.astype(np.int32))
    predicted = model.predict_classes(data, num_classes=classes)
    record = LearningRecord(
        method=V1_METHOD, feature_shape=[int(d) for d in features.output_shape],
        classes=[LearnedClass(str(k), int((labels == k).sum())) for k in range(classes)],
        steps=[LearningStep(calibration.source, len(labels), [str(k) for k in range(classes)], [])],
        num_weights=num_weights, neurons_per_class=NEURONS_PER_CLASS, learning_competition=LEARNING_COMPETITION,
        spike_threshold=threshold)
    report = {"samples": len(labels), "features": record.feature_shape, "num_weights": num_weights,
              "mean_active_features": float((spikes > 0).sum(1).mean()),
              "spike_threshold": threshold, "float_spike_agreement": spike_agreement,
              "primed_accuracy_on_calibration": float((predicted == labels).mean())}
    return model, record, report


def spike_threshold(float_features: np.ndarray, fires: np.ndarray, steps: int = 256) -> tuple[float, float]:
    """The float feature value ``t`` for which ``float_features >= t`` best matches the device's 1-bit
    features ``fires`` (both (N, D)), and the share of features on which they then agree."""

    candidates = np.linspace(0.0, float(float_features.max()), steps)[1:] if float_features.max() > 0 else [0.0]
    agreement = [float(((float_features >= t) == fires).mean()) for t in candidates]
    best = int(np.argmax(agreement))
    return float(candidates[best]), agreement[best]


# -- the float reference ----------------------------------------------------------------------------------------


def _classifier(model: onnx.ModelProto) -> tuple[onnx.NodeProto, str, bool]:
    """The Gemm that computes the model's output, the tensor whose values the learned head reads (the map
    before a Flatten, or the Gemm's input), and whether that tensor is an NCHW map."""

    output = model.graph.output[0].name
    producers = {o: n for n in model.graph.node for o in n.output}
    gemm = producers.get(output)
    if gemm is None or gemm.op_type != "Gemm":
        raise UsageError(f"output '{output}' of the float model is not computed by a Gemm (dense classifier)",
                         hint="learning replaces the classifier: end the model with [Flatten] > Linear")
    source = gemm.input[0]
    flatten = producers.get(source)
    if flatten is not None and flatten.op_type == "Flatten":
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {v.name: v.type.tensor_type.shape for v in [*inferred.graph.value_info, *inferred.graph.input]}
        shape = shapes.get(flatten.input[0])
        if shape is not None and len(shape.dim) == 4:
            return gemm, flatten.input[0], True
    return gemm, source, False


def float_classifier_input(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The float values the classifier reads, flattened in (H, W, C) order, as the device features are."""

    from qanac.execution import tensor_values

    _, tensor, nchw = _classifier(model)
    values = tensor_values(model, inputs, [tensor])[tensor]
    if nchw:
        values = values.transpose(0, 2, 3, 1)
    return values.reshape(len(values), -1).astype(np.float64)


def reference_with_head(model: onnx.ModelProto, weights: np.ndarray, bias: np.ndarray,
                        spike_threshold: float | None = None, neurons_per_class: int = 1) -> onnx.ModelProto:
    """``model`` with its classifier replaced by a learned head on the same features: (H, W, C)-ordered
    features (1-bit when ``spike_threshold`` is given) times ``weights`` (D, units) plus ``bias``, then the
    maximum over each class's ``neurons_per_class`` units."""

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    output = graph.output[0].name
    learned = [node for node in graph.node if node.name.startswith(LEARNED)]
    if learned:  # a head written by an earlier learning step: replace it, keeping the features it read
        tensor, nchw = learned[0].input[0], learned[0].name == f"{LEARNED}nhwc"
        position = list(graph.node).index(learned[0])
        for node in learned:
            graph.node.remove(node)
    else:
        gemm, tensor, nchw = _classifier(model)
        position = list(graph.node).index(gemm)
        graph.node.remove(gemm)
    nodes: list[onnx.NodeProto] = []
    names = {"w": "learned/weights", "b": "learned/bias"}
    current = tensor
    if nchw:
        nodes.append(helper.make_node("Transpose", [current], ["learned/nhwc"], "learned/nhwc", perm=[0, 2, 3, 1]))
        current = "learned/nhwc"
    nodes.append(helper.make_node("Flatten", [current], ["learned/features"], "learned/flatten", axis=1))
    current = "learned/features"
    initializers = [numpy_helper.from_array(weights.astype(np.float32), names["w"]),
                    numpy_helper.from_array(bias.astype(np.float32), names["b"])]
    if spike_threshold is not None:
        initializers.append(numpy_helper.from_array(np.array(spike_threshold, np.float32), "learned/threshold"))
        nodes.append(helper.make_node("Less", [current, "learned/threshold"], ["learned/below"], "learned/below"))
        nodes.append(helper.make_node("Not", ["learned/below"], ["learned/fires"], "learned/fires"))
        nodes.append(helper.make_node("Cast", ["learned/fires"], ["learned/spikes"], "learned/spikes",
                                      to=onnx.TensorProto.FLOAT))
        current = "learned/spikes"
    head_out = output if neurons_per_class == 1 else "learned/potentials"
    nodes.append(helper.make_node("Gemm", [current, names["w"], names["b"]], [head_out], "learned/gemm"))
    if neurons_per_class > 1:
        classes = weights.shape[1] // neurons_per_class
        initializers.append(numpy_helper.from_array(np.array([-1, classes, neurons_per_class], np.int64),
                                                    "learned/groups"))
        nodes.append(helper.make_node("Reshape", [head_out, "learned/groups"], ["learned/grouped"], "learned/group"))
        if _opset(model) >= 18:
            initializers.append(numpy_helper.from_array(np.array([2], np.int64), "learned/axes"))
            nodes.append(helper.make_node("ReduceMax", ["learned/grouped", "learned/axes"], [output], "learned/max",
                                          keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceMax", ["learned/grouped"], [output], "learned/max", axes=[2],
                                          keepdims=0))
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    _drop_unused_initializers(graph, drop_prefix=LEARNED)
    graph.initializer.extend(initializers)
    shape = graph.output[0].type.tensor_type.shape
    shape.dim[-1].ClearField("dim_param")
    shape.dim[-1].dim_value = weights.shape[1] // neurons_per_class
    onnx.checker.check_model(model)
    return model


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _drop_unused_initializers(graph: onnx.GraphProto, drop_prefix: str) -> None:
    """Remove the initializers no node reads, and those named with ``drop_prefix``."""

    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used and not init.name.startswith(drop_prefix)]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# -- qanac learn -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LearnResult:
    output: Path
    ip_version: str
    classes: list[LearnedClass]
    step: LearningStep
    report: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "ip_version": self.ip_version,
                "classes": [c.to_dict() for c in self.classes], "step": self.step.to_dict(), "report": self.report}


def learn_bundle(path: Path, data_source: Path, out: Path, force: bool = False, hardware: bool = False,
                 device_index: int = 0, passes: int = LEARN_PASSES) -> LearnResult:
    """``qanac learn``: the bundle at ``path`` after learning the labelled samples of ``data_source``, written
    to ``out`` (atomically, as a compile writes a bundle)."""

    from qanac.bundle import Bundle
    from qanac.report_html import write_report
    from qanac.verify import load_bundle_data

    bundle = Bundle.open(path)
    manifest = bundle.manifest
    segment = _learnable_segment(bundle)
    record = LearningRecord.from_dict(segment.backend["learning"], f"segments[{segment.name}].backend.learning")
    data = load_bundle_data(bundle, data_source)
    if data.labels is None or len(data.labels) == 0 or (data.labels < 0).any():
        raise UsageError(f"{data_source} has no class label for every sample",
                         hint="give an .npz with the input array and 'labels', or an image folder with one "
                              "sub-folder per class")
    folders = sorted(p.name for p in Path(data_source).iterdir() if p.is_dir()) if Path(data_source).is_dir() \
        else None
    names = list(manifest.labels or record.labels)
    classes, added = new_class_names(names, data.labels, folders)
    inputs = data.arrays[segment.inputs[0]]
    refined = sorted({names[k] for k in classes.tolist() if k < len(names)}, key=names.index)
    step = LearningStep(str(data_source), len(classes), added, refined)

    ip_version = segment.backend.get("ip_version")
    reference = onnx.load(str(bundle.file(REFERENCE_ROLE)))
    with bundle_io.staged_directory(out, force, [path, data_source]) as stage:
        for name in [*(entry.path for entry in manifest.files.values()), bundle_io.REPORT]:
            if (bundle.path / name).is_file():
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(bundle.path / name, stage / name)
        segment_dir = stage / segment.dir
        compiled = segment_dir / segment.file(COMPILED)
        if ip_version == "v1":
            report, head, akida_shape = _learn_v1(compiled, record, inputs, classes, len(added), hardware,
                                                  device_index, passes)
            weights, bias = head
            new_reference = reference_with_head(reference, weights, bias, record.spike_threshold,
                                                record.neurons_per_class or 1)
        else:
            statistics = segment_dir / segment.file(STATISTICS)
            report, (weights, bias), akida_shape = _learn_v2(compiled, statistics, inputs, classes, hardware,
                                                             device_index)
            scale = np.tile(FeatureStatistics.load(statistics).feature_scale, weights.shape[0] //
                            len(FeatureStatistics.load(statistics).feature_scale))
            new_reference = reference_with_head(reference, weights / scale[:, None], bias)
        onnx.save(new_reference, str(stage / manifest.files[REFERENCE_ROLE].path))
        _write_manifest(stage, bundle, segment, record, names + added, classes, step, akida_shape)
        _append_report(stage, step, report)
        write_report(stage)
    counts = LearningRecord.from_dict(
        json.loads((out / bundle_io.MANIFEST).read_text())["segments"][0]["backend"]["learning"]).classes
    return LearnResult(out, str(ip_version), counts, step, report)


def _learnable_segment(bundle: Any) -> Any:
    segments = bundle.manifest.segments
    if len(segments) != 1 or segments[0].kind != "device" or bundle.manifest.target != "akida":
        raise UsageError(f"{bundle.path} is not one Akida device segment: learning needs the whole model, "
                         "classifier included, on the device", hint="compile a model that maps whole")
    if not segments[0].backend.get("learning"):
        raise UsageError(f"{bundle.path} was not compiled to learn",
                         hint="compile with --learnable and labelled calibration data (--calib X.npz with 'labels')")
    return segments[0]


def _learn_v1(compiled: Path, record: LearningRecord, inputs: np.ndarray, classes: np.ndarray, added: int,
              hardware: bool, device_index: int, passes: int) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray],
                                                                       list[int]]:
    import akida

    from .v1.lowering import to_nhwc

    model = akida.Model(str(compiled))
    if added:
        model.add_classes(added)
    if hardware:
        _map_on_board(model, device_index)
    data = to_nhwc(inputs).astype(np.float32)
    rng = np.random.default_rng(0)
    for _ in range(passes):
        order = rng.permutation(len(data))
        model.fit(np.ascontiguousarray(data[order]), classes[order].astype(np.int32))
    if hardware:
        model = akida.Model(layers=model.layers)
    model.save(str(compiled))
    weights = v1_head_weights(model.layers[-1].get_variable("weights"), record.feature_shape)
    units = weights.shape[1]
    report = {"method": V1_METHOD, "passes": passes, "units": units, "classes_added": added}
    return report, (weights, np.zeros(units)), [int(d) for d in model.output_shape]


def _learn_v2(compiled: Path, statistics: Path, inputs: np.ndarray, classes: np.ndarray, hardware: bool,
              device_index: int) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray], list[int]]:
    import akida

    model = akida.Model(str(compiled))
    features = v2_feature_model(model)
    if hardware:
        _map_on_board(features, device_index)
    levels = device_features(features, inputs, nhwc=False)
    stats = FeatureStatistics.load(statistics)
    stats.add(levels, classes)
    stats.save(statistics)
    weights, bias = stats.head()
    head = quantize_head(weights, bias)
    learned = with_head(model, head)
    learned.save(str(compiled))
    exact = levels @ weights + bias
    quantized = (levels @ head["weights"].astype(np.float64)
                 + head["bias"].astype(np.float64) * 2.0 ** head["bias_shift"]) * head["scales"]
    report = {"method": V2_METHOD, "units": int(weights.shape[1]),
              "head_quantization_relative_error": float(np.abs(exact - quantized).max() / np.abs(exact).max()),
              "head_top1_agreement_on_samples": float((exact.argmax(1) == quantized.argmax(1)).mean())}
    return report, (weights, bias), [int(d) for d in learned.output_shape]


def v1_head_weights(weights: np.ndarray, feature_shape: list[int]) -> np.ndarray:
    """A v1 FullyConnected's weights (1, 1, H*W*C, units) as (H*W*C, units) rows in (H, W, C) order: the layer
    reads its (H, W, C) input in (C, W, H) order (measured: its potentials equal the features in that order
    times the weights, exactly)."""

    height, width, channels = feature_shape
    units = weights.shape[-1]
    ordered = weights.reshape(channels, width, height, units).transpose(2, 1, 0, 3)
    return ordered.reshape(-1, units).astype(np.float64)


def _map_on_board(model: Any, device_index: int) -> None:
    """Map ``model`` on the attached board ``device_index`` (its learning and inference then run there).
    Untested: no Akida hardware on the build machines."""

    from .devices import hardware_device

    model.map(hardware_device(device_index), hw_only=False)


def _write_manifest(stage: Path, bundle: Any, segment: Any, record: LearningRecord, labels: list[str],
                    classes: np.ndarray, step: LearningStep, akida_shape: list[int]) -> None:
    manifest = bundle.manifest
    counts = [c.samples for c in record.classes] + [0] * (len(labels) - len(record.classes))
    for k in classes.tolist():
        counts[k] += 1
    learning = dataclasses.replace(record, classes=[LearnedClass(n, c) for n, c in zip(labels, counts, strict=True)],
                                   steps=[*record.steps, step])
    backend = dict(segment.backend, learning=learning.to_dict(), output_shape=[len(labels)],
                   akida_output_shape=akida_shape)
    files = {role: name for role, name in segment.files.items() if role != QUANTIZED}
    new_segment = dataclasses.replace(segment, files=files, variants=[], backend=backend)
    prefix = "" if segment.dir == "." else segment.dir.rstrip("/") + "/"
    entries = {}
    for role, entry in manifest.files.items():
        if entry.path == prefix + segment.files.get(QUANTIZED, "\0"):
            (stage / entry.path).unlink()
            continue
        entries[role] = dataclasses.replace(entry, sha256=bundle_io.sha256_of(stage / entry.path))
    output = manifest.outputs[0]
    outputs = [dataclasses.replace(output, shape=[*output.shape[:-1], len(labels)]), *manifest.outputs[1:]]
    new_manifest = dataclasses.replace(manifest, labels=labels, outputs=outputs, segments=[new_segment],
                                       files=entries)
    new_manifest.check()
    bundle_io.write_json(stage / bundle_io.MANIFEST, new_manifest.to_dict())


def _append_report(stage: Path, step: LearningStep, report: dict[str, Any]) -> None:
    path = stage / bundle_io.REPORT
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("learning", []).append({"step": step.to_dict(), **report})
    bundle_io.write_json(path, data)
