"""Calibration and evaluation data: loading, shape checks and the preprocessing that maps raw images
to what the model takes.

Calibration decides quantization quality, so random data exists only behind an explicit request
(``--calib random``) and is recorded loudly in the manifest.

Accepted sources:
    X.npy            one array, NCHW, for a single-input model
    X.npz            one array per model input, named after it (a single-input model also takes a single
                     array of any name), optional ``labels``; any other array is refused
    DIR/             a folder of images (png/jpg/bmp), optionally in one sub-folder per class;
                     resized to the model's input size
    random           uniform random data in each input's range (explicit opt-in only)

Preprocessing: a raw uint8 image ``r`` in NCHW fed to a float input becomes ``(r * scale - mean[c]) / std[c]``.
The default (scale 1/255, mean 0, std 1) maps images to [0, 1]. Float arrays are used as they are. Every
input gets its own dtype (float16/32/64, integers, bool): integer inputs take integer data unchanged.

Every path into the model goes through :func:`prepare_array`, so calibration, `verify`, `run` and `eval` refuse
the same data the same way (exit 2): not real numbers, a wrong shape, no samples, NaN or infinity, integers out
of range, and more than ``MAX_DATA_BYTES`` for one input (checked from headers and shapes, before reading).

Labelled data in the HAM10000 layout (``HAM10000_metadata.csv`` with ``lesion_id``, ``image_id`` and ``dx``
columns, ``<image_id>.jpg`` in ``HAM10000_images_part_1/``, ``HAM10000_images_part_2/`` or beside the
metadata) is read by :func:`read_ham10000`. HAM10000 holds several images of one lesion, so its splits are
made by :func:`grouped_stratified_split` over ``lesion_id``: every lesion lands in exactly one split, each
class is divided in the requested proportions, and the same seed gives the same split, so `qanac eval`
scores exactly the test split that training held out.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import warnings
import zipfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qanac.cache import cache_file, load_arrays, save_arrays
from qanac.diagnostics import UnsupportedModelError, UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM10000_METADATA = "HAM10000_metadata.csv"
HAM10000_IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # train, validation, test
MAX_DATA_BYTES = 4 << 30  # one input's data for the samples requested, in memory


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw uint8 NCHW images map to the model input: ``(raw * scale - mean) / std`` per channel."""

    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"

    def check(self, channels: int | None = None) -> None:
        """Refuse settings that cannot map images: a non-finite scale, mean or std, a zero std, or (given the
        input's ``channels``) a per-channel mean or std with neither 1 nor ``channels`` values."""

        values = {"scale": (self.scale,), "mean": self.mean, "std": self.std}
        for name, numbers in values.items():
            if not numbers or not all(math.isfinite(v) for v in numbers):
                raise UsageError(f"preprocessing {name} {list(numbers)} is not a list of finite numbers",
                                 hint=f"give --{name} finite values")
        if any(v == 0 for v in self.std):
            raise UsageError(f"preprocessing std {list(self.std)} has a zero: (raw * scale - mean) / std divides by it",
                             hint="give --std non-zero values (the default is 1)")
        for name in ("mean", "std"):
            count = len(values[name])
            if channels is not None and count not in (1, channels):
                raise UsageError(f"preprocessing {name} has {count} values for an input of {channels} channels",
                                 hint=f"give --{name} one value, or one per channel ({channels})")

    def apply(self, raw: np.ndarray) -> np.ndarray:
        channels = raw.shape[1] if raw.ndim == 4 else 1
        self.check(channels)  # an input that is not NCHW has one channel: one mean and one std
        x = raw.astype(np.float32) * np.float32(self.scale)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        if x.ndim == 4:
            mean = np.broadcast_to(mean, (channels,)).reshape(1, channels, 1, 1)
            std = np.broadcast_to(std, (channels,)).reshape(1, channels, 1, 1)
        return ((x - mean) / std).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std), "layout": self.layout}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(
            scale=float(data.get("scale", 1.0 / 255.0)),
            mean=tuple(float(v) for v in data.get("mean", (0.0,))),
            std=tuple(float(v) for v in data.get("std", (1.0,))),
            layout=data.get("layout", "NCHW"),
        )


@dataclasses.dataclass
class CalibrationData:
    """Model-ready arrays by input name, each in its input's dtype, finite, plus where they came from.

    ``raw`` keeps the uint8 images that were preprocessed into float inputs (backends that quantize the
    input, such as Akida, want them); ``labels`` are present when the source carried them.
    """

    arrays: dict[str, np.ndarray]
    source: str
    preprocessing: Preprocessing
    random: bool = False
    raw: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self, batch_size: int):
        for start in range(0, self.num_samples, batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.arrays.items()}

    def take(self, n: int) -> "CalibrationData":
        return dataclasses.replace(
            self,
            arrays={k: v[:n] for k, v in self.arrays.items()},
            raw=None if self.raw is None else {k: v[:n] for k, v in self.raw.items()},
            labels=None if self.labels is None else self.labels[:n],
        )

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "num_samples": self.num_samples,
            "random": self.random,
            "preprocessing": self.preprocessing.to_dict(),
        }


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # fixed, batch first (batch may be any size at run time)
    dtype: str = "float32"


def load_data(
    source: str | Path,
    inputs: Sequence[InputSpec],
    preprocessing: Preprocessing | None = None,
    num_random: int = 32,
    seed: int = 0,
    limit: int | None = None,
    model: Any = None,
) -> CalibrationData:
    """Load data for ``inputs`` from ``source``: the first ``limit`` samples (all when None), checked and
    converted by :func:`prepare_array`, every size checked (:func:`check_size`) before anything is allocated.

    An ``.npz`` holds one array per input, named after it, plus optional ``labels`` (one class index per
    sample); a single-input model also takes an ``.npz`` holding one array of any name. Any other array is
    refused. ``synthetic`` or ``synthetic:METHOD`` synthesises data (:func:`synthetic_data`, given ``model``,
    the onnx.ModelProto the data is for)."""

    preprocessing = preprocessing or Preprocessing()
    preprocessing.check()
    for spec in inputs:
        if len(spec.shape) == 4 and input_dtype(spec).kind == "f":
            preprocessing.check(spec.shape[1])
    if str(source) == "random":
        return _random_data(inputs, preprocessing, num_random if limit is None else min(limit, num_random), seed)
    kind, colon, method = str(source).partition(":")
    if kind == SYNTHETIC:
        count = SYNTHETIC_SAMPLES if limit is None else min(limit, SYNTHETIC_SAMPLES)
        return synthetic_data(inputs, preprocessing, count, seed, model, method if colon else None)
    path = Path(source)
    if not path.exists():
        raise UsageError(f"data not found: {path}", hint="give a .npy/.npz file, an image folder, or 'random'")
    if not path.is_dir() and not path.is_file():
        raise UsageError(f"data {path} is not a regular file (a FIFO, socket or device)",
                         hint="give a .npy/.npz file or an image folder")
    labels = None
    if path.is_dir():
        if len(inputs) != 1:
            raise UsageError(f"an image folder can feed only a single-input model; this one has {len(inputs)}",
                             hint="give an .npz with one array per input, named after it")
        raw, labels = load_image_folder(path, inputs[0], limit)
        arrays = {inputs[0].name: raw}
    elif path.suffix == ".npy":
        if len(inputs) != 1:
            raise UsageError(f"{path} holds one array but the model has {len(inputs)} inputs",
                             hint="give an .npz with one array per input, named after it")
        arrays = {inputs[0].name: _read_npy(path, inputs[0], limit)}
    elif path.suffix == ".npz":
        arrays, labels = _read_npz(path, inputs, limit)
        labels = _check_labels(labels, len(arrays[inputs[0].name]), path)
    else:
        raise UsageError(f"unsupported data file {path}", hint="use .npy, .npz or a folder of images")

    model_ready: dict[str, np.ndarray] = {}
    raw_images: dict[str, np.ndarray] = {}
    for spec in inputs:
        model_ready[spec.name], raw = prepare_array(spec, arrays[spec.name], str(path), preprocessing)
        if raw is not None:
            raw_images[spec.name] = raw
    counts = {len(a) for a in model_ready.values()}
    if len(counts) > 1:
        sizes = ", ".join(f"'{k}' {len(v)}" for k, v in model_ready.items())
        raise UsageError(f"the arrays of {path} hold different numbers of samples ({sizes})",
                         hint="give every input the same number of samples")
    return CalibrationData(
        arrays=model_ready,
        source=str(path),
        preprocessing=preprocessing,
        raw=raw_images or None,
        labels=labels,
    )


def input_dtype(spec: InputSpec) -> np.dtype:
    """The NumPy dtype of input ``spec``: real numbers or booleans (anything else cannot be fed)."""

    try:
        dtype = np.dtype(spec.dtype)
    except TypeError:
        raise UsageError(f"input '{spec.name}' has an unknown dtype '{spec.dtype}'",
                         hint="the bundle's manifest is damaged; compile the model again") from None
    if dtype.kind not in "biuf":
        raise UnsupportedModelError(f"input '{spec.name}' takes {dtype}; qanac feeds inputs of real numbers or "
                                    "booleans only", hint="give the model a float or integer input")
    return dtype


def check_size(spec: InputSpec, samples: int, itemsize: int = 0) -> None:
    """Refuse, before anything is allocated, data for ``samples`` samples of ``spec`` above
    ``MAX_DATA_BYTES`` (counted in the larger of the input's element size, float32 for float inputs, and
    ``itemsize``: the data's own)."""

    dtype = input_dtype(spec)
    element = max(dtype.itemsize, 4 if dtype.kind == "f" else 1, itemsize)
    needed = samples * math.prod(spec.shape[1:]) * element
    if needed > MAX_DATA_BYTES:
        raise UsageError(
            f"input '{spec.name}' of shape {tuple(spec.shape)} needs {needed / 2**30:,.1f} GiB of data for "
            f"{samples} samples, above the limit of {MAX_DATA_BYTES / 2**30:g} GiB",
            hint="use fewer samples (compile: --num-calib N) or a smaller --input-shape",
        )


def prepare_array(
    spec: InputSpec, array: np.ndarray, source: str, preprocessing: Preprocessing
) -> tuple[np.ndarray, np.ndarray | None]:
    """``array`` as input ``spec`` takes it, and the raw uint8 data it was preprocessed from (or None).

    Float inputs (float16/32/64): uint8 data are raw images and go through ``preprocessing``; other real
    numbers are used as they are; both are cast to the input's dtype. Integer inputs take integer data within
    the dtype's range, boolean inputs boolean data, fed as they are (no preprocessing). Refused: data that are
    not real numbers (complex, strings, Python objects, records, dates), a shape other than
    ``(N, *spec.shape[1:])``, no samples, and any NaN or infinity (the message names the first sample holding
    one)."""

    dtype = input_dtype(spec)
    kind = array.dtype.kind
    if kind not in "biuf":
        what = {"c": "complex numbers", "U": "strings", "S": "byte strings", "O": "Python objects",
                "V": "records", "M": "dates", "m": "time spans"}.get(kind, str(array.dtype))
        raise UsageError(f"data for input '{spec.name}' from {source} holds {what} ({array.dtype})",
                         hint="give real numbers: float data, or uint8 images")
    check_shape(spec, array.shape, source)
    raw = None
    if dtype.kind == "f":
        if kind == "b":
            raise UsageError(f"data for input '{spec.name}' from {source} is boolean; the input takes {dtype}",
                             hint="give float data, or uint8 images")
        if array.dtype == np.uint8:
            raw = array
            array = preprocessing.apply(array)
        converted = array.astype(dtype, copy=False)
        _check_finite(spec, converted, array, source)
        return converted, raw
    if dtype.kind == "b":
        if kind != "b":
            raise UsageError(f"data for input '{spec.name}' from {source} is {array.dtype}; the input takes bool",
                             hint="give a boolean array")
        return array, None
    if kind not in "iu":
        raise UsageError(f"data for input '{spec.name}' from {source} is {array.dtype}; the input takes {dtype}",
                         hint=f"give integer data in {dtype}'s range (x.astype(np.{dtype}))")
    _check_range(spec, dtype, array, source)
    return array.astype(dtype, copy=False), None


def _check_finite(spec: InputSpec, converted: np.ndarray, original: np.ndarray, source: str) -> None:
    rows = converted.reshape(len(converted), -1)
    finite = np.isfinite(rows).all(axis=1)
    if finite.all():
        return
    index = int(np.argmin(finite))
    value = rows[index][~np.isfinite(rows[index])][0]
    what = str(value)
    if original.dtype.kind == "f" and np.isfinite(original.reshape(len(original), -1)[index]).all():
        what = f"values beyond the range of {converted.dtype}"
    raise UsageError(
        f"data for input '{spec.name}' from {source}: sample {index} holds {what} "
        f"({int((~finite).sum())} of {len(finite)} samples are not finite)",
        hint="data must be finite numbers: fix or drop those samples",
    )


def _check_range(spec: InputSpec, dtype: np.dtype, array: np.ndarray, source: str) -> None:
    info = np.iinfo(dtype)
    rows = array.reshape(len(array), -1)
    inside = ((rows >= info.min) & (rows <= info.max)).all(axis=1)
    if not inside.all():
        index = int(np.argmin(inside))
        raise UsageError(
            f"data for input '{spec.name}' from {source}: sample {index} holds values outside {dtype}'s range "
            f"[{info.min}, {info.max}]",
            hint=f"the input takes {dtype}: give data in that range",
        )


def _check_labels(labels: np.ndarray | None, samples: int, path: Path) -> np.ndarray | None:
    """An .npz's labels: one class index (an integer, 0 or more) per sample."""

    if labels is None:
        return None
    if labels.dtype.kind not in "iu" or labels.ndim != 1 or len(labels) != samples:
        raise UsageError(
            f"'labels' in {path} is {labels.dtype} of shape {labels.shape}; expected one integer class index "
            f"for each of the {samples} samples",
            hint="labels = np.array([class index per sample], dtype=np.int64)",
        )
    if samples and labels.min() < 0:
        raise UsageError(f"'labels' in {path} holds a negative class index ({labels.min()})",
                         hint="labels are class indices 0, 1, ...")
    return labels


def _random_data(inputs: Sequence[InputSpec], preprocessing: Preprocessing, n: int, seed: int) -> CalibrationData:
    """Random samples in each input's range: uint8 images through ``preprocessing`` for float inputs, the
    whole range of the dtype for integer inputs, both values for boolean ones."""

    for spec in inputs:
        check_size(spec, n)
    warnings.warn(
        "calibrating on RANDOM data: quantization ranges will not match real inputs; "
        "accuracy of the compiled model is unknown. Pass --calib with real samples.",
        stacklevel=2,
    )
    rng = np.random.default_rng(seed)
    arrays, raw = {}, {}
    for spec in inputs:
        arrays[spec.name], images = prepare_array(spec, _uniform(spec, n, rng), "random", preprocessing)
        if images is not None:
            raw[spec.name] = images
    return CalibrationData(arrays=arrays, source="random", preprocessing=preprocessing, random=True,
                           raw=raw or None)


SYNTHETIC = "synthetic"
SYNTHETIC_SAMPLES = 64
SYNTHETIC_METHODS = ("batchnorm", "uniform")


def synthetic_data(inputs: Sequence[InputSpec], preprocessing: Preprocessing, n: int = SYNTHETIC_SAMPLES,
                   seed: int = 0, model: Any = None, method: str | None = None) -> CalibrationData:
    """``n`` data-free calibration samples per input (seeded), ``source`` ``synthetic:<method>`` (methods
    joined by ``+`` when inputs differ), ``random`` True.

    Float image inputs (N, C, H, W) are synthesised as raw uint8 images and preprocessed like real ones:
    ``batchnorm`` fits images with a 1/f^alpha spectrum, per-channel mean and contrast so that the first
    convolution's outputs match the running mean and variance of the BatchNormalization after it (needs
    ``model``, an onnx.ModelProto, with input -> Conv -> BatchNormalization); ``uniform`` draws every pixel
    uniformly, as the vendor toolchains do without samples. Without a method: ``batchnorm`` where the model
    allows it, else ``uniform``. Other inputs (and images under a preprocessing scale of 0) take uniform data
    in their dtype's range."""

    for spec in inputs:
        check_size(spec, n)
    rng = np.random.default_rng(seed)
    arrays, raw, methods = {}, {}, []
    for spec in inputs:
        chosen = method or ("batchnorm" if _first_conv_batchnorm(model, spec.name) else "uniform")
        if chosen not in SYNTHETIC_METHODS:
            raise UsageError(f"unknown synthetic calibration method '{chosen}'",
                             hint=f"use one of {', '.join(SYNTHETIC_METHODS)}")
        image = len(spec.shape) == 4 and input_dtype(spec).kind == "f" and preprocessing.scale != 0
        if not image or chosen == "uniform":
            drawn = _uniform(spec, n, rng)
            chosen = "uniform"
        else:
            found = _first_conv_batchnorm(model, spec.name)
            if found is None:
                raise UsageError(f"synthetic calibration 'batchnorm' needs input '{spec.name}' to feed a Conv "
                                 "followed by BatchNormalization", hint="use --calib synthetic:uniform")
            drawn = _batchnorm_images(spec, n, rng, preprocessing, found)
        methods.append(chosen)
        arrays[spec.name], images = prepare_array(spec, drawn, SYNTHETIC, preprocessing)
        if images is not None:
            raw[spec.name] = images
    source = f"{SYNTHETIC}:{'+'.join(dict.fromkeys(methods))}"
    return CalibrationData(arrays=arrays, source=source, preprocessing=preprocessing, random=True, raw=raw or None)


def _uniform(spec: InputSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    dtype = input_dtype(spec)
    shape = (n, *spec.shape[1:])
    if dtype.kind == "f":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape, dtype=np.uint8).astype(bool)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def _power_law_noise(shape: Sequence[int], alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Fields of shape (N, C, H, W) with amplitude spectrum 1/f^alpha, zero mean and unit variance each."""

    height, width = shape[-2], shape[-1]
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fy**2 + fx**2)
    radius[0, 0] = 1.0
    spectrum = np.fft.rfft2(rng.standard_normal(shape)) / radius**alpha
    spectrum[..., 0, 0] = 0.0
    fields = np.fft.irfft2(spectrum, s=(height, width))
    fields -= fields.mean(axis=(-2, -1), keepdims=True)
    return fields / np.maximum(fields.std(axis=(-2, -1), keepdims=True), 1e-12)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class _ConvBatchNorm:
    weight: np.ndarray  # (C_out, C_in, kh, kw)
    bias: np.ndarray  # (C_out,)
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]
    mean: np.ndarray  # BatchNormalization running mean and variance, (C_out,)
    var: np.ndarray


def _first_conv_batchnorm(model: Any, input_name: str) -> _ConvBatchNorm | None:
    """The Conv reading graph input ``input_name`` (group 1, constant weights, explicit or no padding) and
    the BatchNormalization that alone reads its output, when ``model`` (an onnx.ModelProto) has them."""

    if model is None:
        return None
    from onnx import helper, numpy_helper

    constants = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[Any]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            readers[name].append(node)
    for conv in readers.get(input_name, []):
        if conv.op_type != "Conv" or conv.input[0] != input_name or conv.input[1] not in constants:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if attrs.get("group", 1) != 1 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        after = readers.get(conv.output[0], [])
        if len(after) != 1 or after[0].op_type != "BatchNormalization":
            continue
        bn = after[0]
        if not all(name in constants for name in bn.input[1:5]):
            continue
        weight = numpy_helper.to_array(constants[conv.input[1]]).astype(np.float64)
        if weight.ndim != 4:
            continue
        bias = (numpy_helper.to_array(constants[conv.input[2]]).astype(np.float64)
                if len(conv.input) > 2 and conv.input[2] in constants else np.zeros(len(weight)))
        mean, var = (numpy_helper.to_array(constants[name]).astype(np.float64) for name in bn.input[3:5])
        return _ConvBatchNorm(weight, bias, tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("pads", (0,) * 4)),
                              tuple(attrs.get("dilations", (1, 1))), mean, var)
    return None


def _conv_at(x: np.ndarray, layer: _ConvBatchNorm, where: tuple[np.ndarray, ...], per_channel: bool) -> np.ndarray:
    """The convolution's outputs, without bias, at positions ``where`` (sample, row and column indices of the
    output): (P, C_out), or with ``per_channel`` each input channel's contribution, (P, C_in, C_out)."""

    top, left, bottom, right = layer.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    outputs, channels, kh, kw = layer.weight.shape
    samples, rows, columns = where
    rows = rows[:, None] * layer.strides[0] + np.arange(kh) * layer.dilations[0]  # (P, kh)
    columns = columns[:, None] * layer.strides[1] + np.arange(kw) * layer.dilations[1]  # (P, kw)
    gathered = padded[samples[:, None, None], :, rows[:, :, None], columns[:, None, :]]  # (P, kh, kw, C_in)
    weight = layer.weight.transpose(2, 3, 1, 0)  # (kh, kw, C_in, C_out)
    if not per_channel:
        return gathered.reshape(len(samples), -1) @ weight.reshape(-1, outputs)
    gathered = np.ascontiguousarray(gathered.reshape(len(samples), kh * kw, channels).transpose(2, 0, 1))
    weight = np.ascontiguousarray(weight.reshape(kh * kw, channels, outputs).transpose(1, 0, 2))
    return np.matmul(gathered, weight).transpose(1, 0, 2)


def _output_size(size: int, kernel: int, stride: int, dilation: int, pads: int) -> int:
    return (size + pads - (kernel - 1) * dilation - 1) // stride + 1


def _least_squares(residuals: Any, start: np.ndarray, args: tuple, iterations: int = 50) -> tuple[np.ndarray, float]:
    """Levenberg-Marquardt: the parameters near ``start`` minimising the sum of squares of
    ``residuals(theta, *args)`` (Jacobian by forward differences), and that sum."""

    theta = np.array(start, np.float64)
    r = residuals(theta, *args)
    cost, damping = float(r @ r), 1e-3
    for _ in range(iterations):
        steps = 1e-6 * (1.0 + np.abs(theta))
        jacobian = np.stack([(residuals(theta + np.eye(len(theta))[i] * steps[i], *args) - r) / steps[i]
                             for i in range(len(theta))], axis=1)
        normal, gradient = jacobian.T @ jacobian, jacobian.T @ r
        while damping < 1e10:
            delta = np.linalg.solve(normal + damping * np.diag(np.diag(normal) + 1e-12), -gradient)
            trial = residuals(theta + delta, *args)
            if float(trial @ trial) < cost:
                break
            damping *= 4.0
        else:
            break
        improvement = cost - float(trial @ trial)
        theta, r, cost, damping = theta + delta, trial, float(trial @ trial), max(damping / 3.0, 1e-9)
        if improvement <= 1e-10 * (1.0 + cost):
            break
    return theta, cost


def _moment_residuals(theta: np.ndarray, bias: np.ndarray, first: np.ndarray, second: np.ndarray,
                      target_mean: np.ndarray, target_std: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Mean and standard deviation of each output channel, linear in features with first and second
    moments ``first`` (C_out, F) and ``second`` (C_out, F, F) under coefficients ``theta``, minus targets."""

    mu = first @ theta
    var = np.einsum("i,cij,j->c", theta, second, theta) - mu**2
    sd = np.sqrt(np.maximum(var, 0.0))
    return np.concatenate([(bias + mu - target_mean) / weight, (sd - target_std) / weight])


POSITIONS = 2048  # first-convolution outputs (sample, row, column) the fit of its statistics looks at
PROBE_ELEMENTS = 1 << 18  # input elements of the images those positions are drawn from (at least one image)


def _batchnorm_images(spec: InputSpec, n: int, rng: np.random.Generator, preprocessing: Preprocessing,
                      layer: _ConvBatchNorm) -> np.ndarray:
    """Raw uint8 images x_k = clip(a_k + s_k z_k) (z: 1/f^alpha fields, clipped to what raw images can
    hold) whose preprocessed values give the first convolution's outputs the mean and standard deviation its
    BatchNormalization recorded. a_k, s_k are fitted by least squares from the outputs' moments (linear in
    a and s) for alpha 0, 1 and 2; the best alpha's fit is then refined on clipped probe images."""

    channels = spec.shape[1]
    scale = np.float64(preprocessing.scale)
    mean = np.broadcast_to(np.asarray(preprocessing.mean, np.float64), (channels,))
    std = np.broadcast_to(np.asarray(preprocessing.std, np.float64), (channels,))
    lo, hi = (0.0 - mean) / std, (255.0 * scale - mean) / std  # the preprocessed range of raw uint8 images
    low, high = np.minimum(lo, hi), np.maximum(lo, hi)
    target_std = np.sqrt(np.maximum(layer.var, 0.0))
    weight = np.maximum(target_std, max(float(np.median(target_std)) * 1e-2, 1e-6))
    targets = (layer.mean, target_std, weight)
    probes = int(np.clip(PROBE_ELEMENTS // math.prod(spec.shape[1:]), 1, min(n, 8)))  # images the fit looks at
    height, width = (_output_size(spec.shape[2 + i], layer.weight.shape[2 + i], layer.strides[i],
                                  layer.dilations[i], layer.pads[i] + layer.pads[i + 2]) for i in range(2))
    count = min(POSITIONS, probes * height * width)  # output positions the fit looks at
    where = (rng.integers(0, probes, count), rng.integers(0, height, count), rng.integers(0, width, count))
    ones = _conv_at(np.ones((probes, *spec.shape[1:])), layer, where, True)  # (P, C_in, C_out): offsets' part
    start = np.concatenate([(low + high) / 2, (high - low) / 4])  # mid-grey, a quarter of the range as contrast
    best = None
    for alpha in (0.0, 1.0, 2.0):
        probe = _power_law_noise((probes, *spec.shape[1:]), alpha, rng)
        features = np.concatenate([ones, _conv_at(probe, layer, where, True)], axis=1)  # (P, 2 C_in, C_out)
        first = features.mean(axis=0).T  # (C_out, 2 C_in)
        second = np.einsum("pic,pjc->cij", features, features) / len(features)
        theta, cost = _least_squares(_moment_residuals, start, (layer.bias, first, second, *targets))
        if best is None or cost < best[0]:
            best = (cost, alpha, probe, theta)
    _, alpha, probe, theta = best
    theta[channels:] = np.abs(theta[channels:])
    theta, _ = _least_squares(_clipped_residuals, theta, (probe, where, layer, low, high, *targets), iterations=10)
    offset, contrast = theta[:channels, None, None], np.abs(theta[channels:, None, None])
    values = np.clip(offset + contrast * _power_law_noise((n, *spec.shape[1:]), alpha, rng), low[:, None, None],
                     high[:, None, None])
    return _to_uint8((values * std[:, None, None] + mean[:, None, None]) / scale)


def _clipped_residuals(theta: np.ndarray, fields: np.ndarray, where: tuple[np.ndarray, ...],
                       layer: _ConvBatchNorm, low: np.ndarray, high: np.ndarray, target_mean: np.ndarray,
                       target_std: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Mean and standard deviation of the convolution's output channels at ``where`` on clip(a + s fields),
    minus targets."""

    channels = fields.shape[1]
    x = np.clip(theta[:channels, None, None] + theta[channels:, None, None] * fields, low[:, None, None],
                high[:, None, None])
    y = _conv_at(x, layer, where, False) + layer.bias
    return np.concatenate([(y.mean(axis=0) - target_mean) / weight, (y.std(axis=0) - target_std) / weight])


def _array_header(handle: Any, label: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an .npy stream declares, read from its header alone; pickled objects refused."""

    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise UsageError(f"cannot read {label} as a NumPy array: {exc}",
                         hint="save it with np.save (.npy) or np.savez (.npz)") from None
    if dtype.hasobject:
        raise UsageError(f"{label} holds Python objects ({dtype}); qanac reads plain numeric arrays only",
                         hint="save real numbers: np.save(path, x.astype(np.float32))")
    return tuple(shape), dtype


def _read_npy(path: Path, spec: InputSpec, limit: int | None) -> np.ndarray:
    with open(path, "rb") as handle:
        shape, dtype = _array_header(handle, str(path))
    check_shape(spec, shape, str(path))
    check_size(spec, shape[0] if limit is None else min(limit, shape[0]), dtype.itemsize)
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        return np.array(mapped[:limit])
    except (ValueError, OSError, EOFError) as exc:
        raise UsageError(f"cannot read {path} as a NumPy array: {exc}",
                         hint="save it with np.save (.npy) or np.savez (.npz)") from exc


def _read_npz(
    path: Path, inputs: Sequence[InputSpec], limit: int | None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The arrays for ``inputs`` (first ``limit`` samples) and the labels of an .npz, every array's header
    checked before any array is read (see :func:`load_data` for the naming rule)."""

    hint = "save it with np.savez(path, input_name=x, labels=y)"
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path} is not a NumPy archive (.npz is a zip of .npy arrays)", hint=hint)
    try:
        with np.load(path, allow_pickle=False) as archive:
            headers = {}
            for key in archive.files:
                member = key if key in archive.zip.namelist() else f"{key}.npy"
                with archive.zip.open(member) as handle:
                    headers[key] = _array_header(handle, f"array '{key}' of {path}")
            names = _npz_names(path, inputs, sorted(set(headers) - {"labels"}))
            for spec in inputs:
                shape, dtype = headers[names[spec.name]]
                check_shape(spec, shape, f"array '{names[spec.name]}' of {path}")
                check_size(spec, shape[0], dtype.itemsize)
            samples = headers[names[inputs[0].name]][0][0]
            if "labels" in headers and headers["labels"][0] != (samples,):
                raise UsageError(f"'labels' in {path} has shape {headers['labels'][0]}; expected one class index "
                                 f"for each of the {samples} samples", hint="labels = np.array([class per sample])")
            arrays = {spec.name: archive[names[spec.name]][:limit] for spec in inputs}
            labels = archive["labels"][:limit] if "labels" in headers else None
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise UsageError(f"cannot read {path} as a NumPy archive: {exc}", hint=hint) from exc
    return arrays, labels


def _npz_names(path: Path, inputs: Sequence[InputSpec], stored: list[str]) -> dict[str, str]:
    """Which stored array feeds each input: the one named after it, or the only one of a single-input model."""

    wanted = [spec.name for spec in inputs]
    if len(inputs) == 1 and len(stored) == 1:
        return {wanted[0]: stored[0]}
    missing = [name for name in wanted if name not in stored]
    extra = [name for name in stored if name not in wanted]
    if missing or extra:
        problem = f"no array for input(s) {missing}" if missing else f"array(s) {extra} name no model input"
        raise UsageError(f"{path} has arrays {stored}: {problem}",
                         hint=f"name one array after each input ({', '.join(wanted)}), plus optional 'labels'")
    return {name: name for name in wanted}


def check_shape(spec: InputSpec, shape: Sequence[int], source: str) -> None:
    """Data of ``shape`` fits ``spec``: (N, *spec.shape[1:]) with N > 0."""

    shape = tuple(shape)
    expected = tuple(spec.shape[1:])
    if len(shape) != len(spec.shape) or shape[1:] != expected:
        hint = "give an array of shape (samples, *the input's shape without the batch)"
        if len(shape) == 4 and shape[1:] == (expected[1], expected[2], expected[0]):
            hint = "the data looks NHWC; transpose it to NCHW (x.transpose(0, 3, 1, 2))"
        raise UsageError(f"data from {source} has shape {shape} but input '{spec.name}' expects "
                         f"(N, {', '.join(map(str, expected))})", hint=hint)
    if shape[0] == 0:
        raise UsageError(f"data from {source} holds no samples", hint="give at least one sample")


def load_image_folder(
    path: Path, spec: InputSpec | Sequence[int], limit: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the first ``limit`` images below ``path`` as uint8 NCHW resized to the input ``spec`` (or a
    shape (N, C, H, W)).

    Images in sub-folders get integer labels from the sorted sub-folder names (-1 for images beside them).
    """

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {path}",
                         hint="give a folder of images (one sub-folder per class for labels), or an array file")
    classes = sorted({p.parent.relative_to(path).as_posix() for p in files} - {"."})
    labels = None
    if classes:
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index.get(p.parent.relative_to(path).as_posix(), -1) for p in files])
    return load_images(files, spec), labels


def load_images(files: Sequence[Path], spec: InputSpec | Sequence[int]) -> np.ndarray:
    """Read image files as uint8 NCHW resized to the input ``spec`` (or a shape (N, C, H, W)), refusing
    before decoding an input that is not a 4-D float or uint8 image input, data above ``MAX_DATA_BYTES``,
    and an image of more than PIL's ``MAX_IMAGE_PIXELS`` pixels."""

    from PIL import Image

    if not isinstance(spec, InputSpec):
        spec = InputSpec("image", tuple(spec), "uint8")
    dtype = input_dtype(spec)
    if len(spec.shape) != 4 or not (dtype.kind == "f" or dtype == np.uint8):
        raise UsageError(f"images feed a float or uint8 input of shape (N, C, H, W); input '{spec.name}' takes "
                         f"{dtype} of shape {tuple(spec.shape)}", hint="give a .npy or .npz array instead")
    channels, height, width = spec.shape[1], spec.shape[2], spec.shape[3]
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise UsageError(f"images need a 1- or 3-channel input; the model has {channels}",
                         hint="give a .npy or .npz array instead")
    check_size(spec, len(files))
    images = []
    for file in files:
        if not file.is_file():
            raise UsageError(f"image {file} is not a regular file", hint="give PNG, JPEG, BMP, GIF or TIFF files")
        try:
            with Image.open(file) as img:
                if img.width * img.height > (Image.MAX_IMAGE_PIXELS or math.inf):
                    raise UsageError(f"image {file} has {img.width} x {img.height} pixels, above the limit of "
                                     f"{Image.MAX_IMAGE_PIXELS:,}", hint="resize it before giving it to qanac")
                array = np.asarray(img.convert(mode).resize((width, height), Image.BILINEAR), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise UsageError(f"cannot read image {file}: {exc}", hint="give PNG, JPEG, BMP, GIF or TIFF files") \
                from exc
        images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    return np.stack(images)


def read_labels(path: str | Path) -> list[str]:
    """Class names from a text file, one per line (surrounding blanks and trailing empty lines dropped)."""

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"labels file {path} is not a regular file", hint="give a text file, one label per line")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read labels file {path}: {exc}", hint="give a UTF-8 text file, one label per line") \
            from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines or "" in lines:
        where = f"line {lines.index('') + 1} is empty" if lines else "it is empty"
        raise UsageError(f"labels file {path}: {where}", hint="give one class name per line")
    return lines


def check_label_count(labels: Sequence[str], output: str, shape: Sequence[int | str], source: str) -> None:
    """Refuse class names whose count differs from the classes of ``output`` (its elements per sample, when
    its shape is known)."""

    dims = list(shape)[1:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        return
    classes = math.prod(dims)
    if len(labels) != classes:
        raise UsageError(f"{source} names {len(labels)} classes but output '{output}' has {classes}",
                         hint=f"give {classes} labels, one per line, in class order")


@dataclasses.dataclass(frozen=True)
class Ham10000:
    """Every image of a HAM10000 directory, in metadata order.

    ``images`` are uint8 NCHW RGB, ``labels`` index :data:`HAM10000_CLASSES`, ``lesion_ids`` name the
    lesion each image shows.
    """

    root: Path
    images: np.ndarray
    labels: np.ndarray
    lesion_ids: tuple[str, ...]

    def split(
        self, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indices of train, validation and test, grouped by lesion and stratified by class."""

        return grouped_stratified_split(self.labels, self.lesion_ids, fractions, seed)


def is_ham10000(path: str | Path) -> bool:
    return (Path(path) / HAM10000_METADATA).is_file()


def read_ham10000_metadata(root: str | Path) -> list[dict[str, str]]:
    path = Path(root) / HAM10000_METADATA
    if not path.is_file():
        raise UsageError(f"{path} not found", hint=f"point at the folder holding {HAM10000_METADATA}")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"lesion_id", "image_id", "dx"} - set(rows[0] if rows else {})
    if missing:
        raise UsageError(f"{path} lacks the columns {sorted(missing)}",
                         hint="HAM10000_metadata.csv needs lesion_id, image_id and dx")
    return rows


def read_ham10000(root: str | Path, size: Sequence[int], cache: bool = True) -> Ham10000:
    """All images of the HAM10000 directory ``root``, resized to ``size`` (height, width).

    With ``cache`` the resized images are kept in qanac's cache folder (``qanac.cache``, never in ``root``),
    keyed by ``root``'s resolved path and the size, and reused while the metadata lists the same images in
    the same order.
    """

    root = Path(root)
    rows = read_ham10000_metadata(root)
    height, width = int(size[0]), int(size[1])
    unknown = sorted({r["dx"] for r in rows} - set(HAM10000_CLASSES))
    if unknown:
        raise UsageError(f"unknown diagnoses in {HAM10000_METADATA}: {unknown}",
                         hint=f"dx must be one of {', '.join(HAM10000_CLASSES)}")
    index = {name: i for i, name in enumerate(HAM10000_CLASSES)}
    labels = np.array([index[r["dx"]] for r in rows], dtype=np.int64)
    image_ids = [r["image_id"] for r in rows]

    cache_path = cache_file("ham10000", str(root.resolve()), f"{height}x{width}") if cache else None
    stored = load_arrays(cache_path)
    images = None
    if stored is not None and "images" in stored and stored.get("image_ids", np.array([])).tolist() == image_ids:
        images = stored["images"]
    if images is None:
        images = load_images([_find_ham10000_image(root, i) for i in image_ids], (1, 3, height, width))
        save_arrays(cache_path, images=images, image_ids=np.array(image_ids))
    return Ham10000(root, images, labels, tuple(r["lesion_id"] for r in rows))


def _find_ham10000_image(root: Path, image_id: str) -> Path:
    for folder in (*HAM10000_IMAGE_DIRS, "."):
        path = root / folder / f"{image_id}.jpg"
        if path.is_file():
            return path
    raise UsageError(f"image {image_id}.jpg not found in {', '.join(HAM10000_IMAGE_DIRS)} under {root}",
                     hint="every image the metadata lists must be there")


def grouped_stratified_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[object] | np.ndarray,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train, validation and test such that no group is in two splits.

    A group's class is the most frequent label among its items. Within each class the groups are
    shuffled (seeded) and each goes to the split furthest below its target share of that class's items,
    so every class is divided in ``fractions`` as closely as whole groups allow.
    """

    label_array = np.asarray(labels)
    group_array = np.asarray(groups, dtype=object)
    if len(label_array) != len(group_array):
        raise UsageError(f"{len(label_array)} labels but {len(group_array)} group ids")
    shares = np.asarray(fractions, dtype=np.float64)
    if shares.shape != (3,) or np.any(shares < 0) or not np.isclose(shares.sum(), 1.0):
        raise UsageError(f"split fractions must be three non-negative numbers summing to 1, got {list(shares)}")
    members: dict[object, list[int]] = defaultdict(list)
    for index, group in enumerate(group_array):
        members[group].append(index)
    by_class: dict[int, list[object]] = defaultdict(list)
    for group in sorted(members, key=str):
        votes: Counter[int] = Counter(label_array[members[group]].tolist())
        by_class[votes.most_common(1)[0][0]].append(group)

    rng = np.random.default_rng(seed)
    assignment: list[list[int]] = [[], [], []]
    for label in sorted(by_class):
        class_groups = by_class[label]
        order = rng.permutation(len(class_groups))
        total = sum(len(members[class_groups[i]]) for i in order)
        filled = np.zeros(3)
        for i in order:
            group = class_groups[i]
            deficit = shares * total - filled
            target = int(np.argmax(np.where(shares > 0, deficit, -np.inf)))
            assignment[target].extend(members[group])
            filled[target] += len(members[group])
    train, val, test = (np.sort(np.asarray(a, dtype=np.int64)) for a in assignment)
    return train, val, test


def write_ham10000_fixture(
    root: str | Path,
    images_per_class: int = 6,
    image_size: tuple[int, int] = (48, 36),
    images_per_lesion: int = 2,
    seed: int = 0,
) -> Path:
    """Write a tiny data set in the HAM10000 layout (metadata csv + JPEGs in two part folders).

    Images are random but class-dependent (each class has its own colour and stripe orientation), so a
    model can learn them; lesions hold up to ``images_per_lesion`` images (repeated ``lesion_id``s).
    ``image_size`` is (width, height) like the real 600x450 images.
    """

    from PIL import Image

    root = Path(root)
    for folder in HAM10000_IMAGE_DIRS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = image_size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rows = []
    image_number = 0
    lesion_number = 0
    for label, dx in enumerate(HAM10000_CLASSES):
        colour = np.array([(37 * label) % 200 + 40, (91 * label) % 200 + 40, (53 * label) % 200 + 40], np.float32)
        angle = np.pi * label / len(HAM10000_CLASSES)
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 3.0)
        for k in range(images_per_class):
            if k % images_per_lesion == 0:
                lesion_number += 1
            noise = rng.normal(0, 12, (height, width, 3))
            pixels = colour + 50 * stripes[..., None] + noise
            image_id = f"ISIC_{image_number:07d}"
            path = root / HAM10000_IMAGE_DIRS[image_number % 2] / f"{image_id}.jpg"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=95)
            rows.append({
                "lesion_id": f"HAM_{lesion_number:07d}", "image_id": image_id, "dx": dx, "dx_type": "histo",
                "age": str(30 + k), "sex": "male" if k % 2 else "female", "localization": "back",
            })
            image_number += 1
    with open(root / HAM10000_METADATA, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root
