"""The Akida IP v1 segment writer: a float ONNX model in, an AKD1000/AKD1500 model (.fbz) and its mapping out.

``emit_v1`` is what the Akida backend's ``emit`` calls for an IP v1 device. In order:

1. the v1 lint rules (``rules.AKIDA_V1_RULES``) on the graph: any finding refuses the segment before
   TensorFlow is touched, naming the nodes (the compiler then moves the first one to the host);
2. ``convert.compile_v1``: lowering to tf_keras, quantizeml at W/A bits and cnn2snn, both under v1;
3. mapping on the virtual device (``mapping.map_on_device``: sequences, NPs, MACs, the hardware share);
4. the Akida model (unmapped copy, software backend) against the quantized Keras model on calibration
   samples: top-1 agreement and SQNR, a warning (AK1310) below ``STRICT``.

Files (roles as on v2, so ``qanac verify`` compares float vs quantized vs Akida the same way):

    model.fbz     the Akida IP v1 model (role ``compiled``)
    quantized.h5  quantizeml's quantized tf_keras model (role ``quantized``)

Options read: ``weight_bits`` (1, 2 or 4; default 4), ``activation_bits`` (1 to 4; default 4),
``num_samples`` (calibration samples, default all up to 1024), ``agreement_samples`` (default 32; 0 skips),
``learnable`` (the feature layer quantized to 1 bit and the classifier replaced by an edge-learning layer
primed with the labelled calibration samples, ``learning.prime_v1``; step 4 is skipped, as the learning layer
is not the quantized model's classifier). The manifest's segment record is ``V1SegmentRecord``: ``ip_version``
is "v1", the bit widths are recorded, and ``learning`` describes a learnable model's learning layer.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qanac.backend import EmitResult
from qanac.backends.akida.learning import LearningRecord, prime_v1
from qanac.backends.akida.mapping import annotate_sources, format_mapping_report, map_on_device, mapping_diagnostics
from qanac.calibration import CalibrationData
from qanac.compare import Thresholds, compare_outputs, failures
from qanac.diagnostics import Diagnostic, Level, UnsupportedModelError
from qanac.graph import source_names_of
from qanac.manifest import COMPILED, Record, SegmentRecord

from .convert import V1Conversion, compile_v1
from .rules import v1_findings
from .runners import AkidaV1HardwareRunner, AkidaV1SoftwareRunner, QuantizedKerasRunner

IP_VERSION = "v1"
COMPILED_FILE = "model.fbz"
QUANTIZED_FILE = "quantized.h5"
QUANTIZED = "quantized"
DEFAULT_AGREEMENT_SAMPLES = 32
# The Akida model and the quantized Keras model compute the same integer pipeline up to rounding at the
# activation levels (docs/akida-v1.md: 100 % top-1 and 45 dB at 4/4 bits on the digits CNN, 84 % at 2/2).
STRICT = Thresholds(min_top1_agreement=0.99, min_sqnr_db=20.0)


@dataclasses.dataclass
class V1SegmentRecord(Record):
    """The Akida v1 fields of a device segment's manifest record (``SegmentRecord.backend``)."""

    ip_version: str  # "v1"
    input_name: str  # the float model's input and output tensor names
    output_name: str
    input_shape: list[int]  # float input shape without the batch (NCHW)
    output_shape: list[int]  # float output shape without the batch (the runners return this layout)
    akida_output_shape: list[int]
    weight_bits: int
    activation_bits: int
    input_weight_bits: int
    num_samples: int  # calibration samples quantizeml used
    device: dict[str, Any]  # the device the model was mapped on (``devices.describe_device``)
    rewrites: list[dict[str, Any]]  # where the Keras model is not one layer per ONNX node (``lowering``)
    output_scale: float | None = None  # one output level in float when the model ends with a ReLU
    learning: LearningRecord | None = None  # a learnable model's learning layer and what it learned


def check_v1_rules(model: onnx.ModelProto) -> None:
    """Every error of the v1 rule table, raised at once (nodes named) before any quantization."""

    errors = [d for d in v1_findings(model) if d.level == Level.ERROR]
    if errors:
        raise UnsupportedModelError(
            f"{len(errors)} finding(s) of the Akida v1 rules; first: {errors[0].message}",
            diagnostics=errors, hint=errors[0].hint)


def emit_v1(model: onnx.ModelProto, calibration: CalibrationData, options: dict[str, Any], out_dir: Path,
            device_name: str) -> EmitResult:
    started = time.perf_counter()
    check_v1_rules(model)
    learnable = bool(options.get("learnable"))
    conversion = compile_v1(model, calibration, weight_bits=options.get("weight_bits"),
                            activation_bits=options.get("activation_bits"), num_samples=options.get("num_samples"),
                            spike_features=learnable)
    seconds = dict(conversion.seconds)
    akida_model, learning, learning_report = conversion.akida_model, None, None
    macs = keras_layer_macs(conversion.lowered.keras_model)
    if learnable:
        t_learn = time.perf_counter()
        akida_model, learning, learning_report = prime_v1(akida_model, model, calibration,
                                                          conversion.lowered.input_name)
        last = akida_model.layers[-1]
        macs[last.name] = int(np.prod(learning.feature_shape)) * int(last.parameters.units)
        seconds["prime"] = time.perf_counter() - t_learn

    t_map = time.perf_counter()
    mapping = map_on_device(akida_model, device_name)
    count_macs(mapping, macs)
    annotate_sources(mapping, source_names_of(model))
    seconds["map"] = time.perf_counter() - t_map

    out_dir = Path(out_dir)
    akida_model.save(str(out_dir / COMPILED_FILE))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
        conversion.quantized.save(str(out_dir / QUANTIZED_FILE))

    diagnostics = [*conversion.diagnostics, *mapping_diagnostics(mapping)]
    report: dict[str, Any] = {"conversion": conversion.describe(), "mapping": mapping}
    if learning_report is not None:
        report["learning"] = learning_report
    agreement_samples = int(options.get("agreement_samples", DEFAULT_AGREEMENT_SAMPLES))
    if agreement_samples > 0 and not learnable:  # a learning layer is not the quantized model's classifier
        t_check = time.perf_counter()
        samples = calibration.arrays[conversion.lowered.input_name][:agreement_samples]
        report["agreement"], found = compare_akida_to_keras(conversion, samples)
        diagnostics.extend(found)
        seconds["agreement"] = time.perf_counter() - t_check
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = seconds

    described = {k: v for k, v in conversion.describe().items() if k in _RECORD_FIELDS}
    described["akida_output_shape"] = [int(d) for d in akida_model.output_shape]
    record = V1SegmentRecord(ip_version=IP_VERSION, device=mapping["device"], learning=learning, **described)
    return EmitResult(
        files={COMPILED: COMPILED_FILE, QUANTIZED: QUANTIZED_FILE},
        device=device_name,
        record=record.to_dict(),
        hardware_mac_share=mapping["hardware_mac_share"],
        report=report,
        diagnostics=diagnostics,
        summary=format_mapping_report(mapping),
    )


def keras_layer_macs(keras_model: Any) -> dict[str, int]:
    """Multiply-accumulates per sample of each Keras layer with weights (convolutions at their own output size,
    before any pooling layer after them), by layer name: the Akida v1 layer built from it has that name."""

    import tf_keras

    layers = tf_keras.layers
    macs = {}
    for layer in keras_model.layers:
        out = layer.output_shape
        if isinstance(layer, layers.SeparableConv2D):
            kh, kw, cin, multiplier = layer.depthwise_kernel.shape
            macs[layer.name] = out[1] * out[2] * cin * multiplier * (kh * kw + layer.filters)
        elif isinstance(layer, layers.DepthwiseConv2D):
            kh, kw, cin, multiplier = layer.depthwise_kernel.shape
            macs[layer.name] = out[1] * out[2] * cin * multiplier * kh * kw
        elif isinstance(layer, layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            macs[layer.name] = out[1] * out[2] * kh * kw * cin * cout
        elif isinstance(layer, layers.Dense):
            macs[layer.name] = int(layer.kernel.shape[0] * layer.kernel.shape[1])
    return {name: int(value) for name, value in macs.items()}


def count_macs(mapping: dict[str, Any], macs: dict[str, int]) -> None:
    """Fill the MACs of ``map_on_device``'s report from ``macs``: akida reports 0 MACs for every IP v1 layer."""

    for entry in mapping["layers"]:
        entry["macs"] = macs.get(entry["name"], entry["macs"])
    total = sum(entry["macs"] for entry in mapping["layers"])
    hardware = sum(entry["macs"] for entry in mapping["layers"] if entry["backend"] == "Hardware")
    mapping.update(total_macs=total, hardware_macs=hardware, hardware_mac_share=hardware / total if total else 1.0)


_RECORD_FIELDS = {f.name for f in dataclasses.fields(V1SegmentRecord)} - {"ip_version", "device", "learning"}


def compare_akida_to_keras(conversion: V1Conversion, samples: np.ndarray) -> tuple[dict[str, Any], list[Diagnostic]]:
    """The Akida model (actual) against the quantized Keras model (reference) on ``samples``."""

    lowered = conversion.lowered
    inputs = {lowered.input_name: samples}
    akida = AkidaV1SoftwareRunner(conversion.akida_model, lowered.input_name, lowered.output_name,
                                  lowered.output_shape, output_scale=conversion.output_scale)
    keras = QuantizedKerasRunner(conversion.quantized, lowered.input_name, lowered.output_name, lowered.output_shape)
    comparison = compare_outputs([lowered.output_name], keras.run(inputs), akida.run(inputs))[0]
    problems = failures([comparison], STRICT)
    result = {"samples": len(samples), "flagged": bool(problems), "comparison": comparison.to_dict(),
              "thresholds": STRICT.to_dict(), "problems": problems}
    diagnostics = [Diagnostic(Level.WARNING, "AK1310", "the Akida v1 model disagrees with the quantized Keras model: "
                              + "; ".join(problems), rule="akida-v1-matches-quantized",
                              hint="report it with the bundle: both run the same integer pipeline")] if problems else []
    return result, diagnostics


def load_v1_runner(segment_dir: Path, segment: SegmentRecord, options: dict[str, Any]) -> AkidaV1SoftwareRunner:
    """The segment's Akida v1 model on akida's software backend, or on a board when ``options['hardware']``."""

    record = segment.backend_record(V1SegmentRecord)
    args = (str(Path(segment_dir) / segment.file(COMPILED)), record.input_name, record.output_name,
            tuple(record.output_shape), record.output_scale)
    neurons = record.learning.neurons_per_class or 1 if record.learning is not None else 1
    if options.get("hardware"):
        return AkidaV1HardwareRunner(*args, device_index=int(options.get("device_index", 0)),
                                     neurons_per_class=neurons)
    return AkidaV1SoftwareRunner(*args, neurons_per_class=neurons)


def load_v1_quantized(segment_dir: Path, segment: SegmentRecord) -> QuantizedKerasRunner:
    """The segment's quantized Keras model (the ``quantized`` variant)."""

    record = segment.backend_record(V1SegmentRecord)
    return QuantizedKerasRunner(Path(segment_dir) / segment.file(QUANTIZED), record.input_name, record.output_name,
                                tuple(record.output_shape))
