"""The Keras frontend: ``.keras``, ``.h5`` and SavedModel directories, to ONNX through tf2onnx.

Which Keras loads a file is read from the file: ``metadata.json`` in a ``.keras`` archive, the
``keras_version`` attribute of an ``.h5`` file, ``keras_metadata.pb`` in a SavedModel directory.
    Keras 2 (tf_keras)     supported: loaded with ``tf_keras`` and converted with ``tf2onnx.from_keras``
    Keras 3                supported with the TensorFlow backend (``tf2onnx.from_keras`` on the loaded
                           model); other backends, and models tf2onnx cannot convert, are a UsageError
                           that says how to get a supported file
    SavedModel without     its ``serving_default`` signature is converted (``tf2onnx.from_function``);
    Keras metadata         there are no layer names then
Keras 1 files are refused.

Layout: Keras image models are NHWC; qanac models take NCHW. Every rank-4 input is converted as NCHW
(tf2onnx ``inputs_as_nchw``: a Transpose to NHWC is put after the input and tf2onnx's optimizer pushes it
through the graph); the ``remove-layout-transposes`` pass removes what is left inside the graph. The
imported model's 4-D inputs are therefore NCHW, ``--input-shape`` is given in NCHW, and the import says so.

Source names: tf2onnx names nodes after TensorFlow ops (``model/stem_conv/Conv2D``); ``layer_names``
maps each to the Keras layer it belongs to (``stem_conv``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qanac import memory
from qanac.diagnostics import UsageError
from qanac.frontends.finish import check_export, first_line, set_source_names
from qanac.native_output import import_quietly

OPSET = 17
SUFFIXES = {".keras", ".h5", ".hdf5"}
RESAVE_HINT = (
    "re-save the model with tf_keras (pip install tf_keras; import tf_keras as keras; "
    "keras.models.load_model(...).save('model.keras')), or export it to ONNX yourself "
    "(python -m tf2onnx.convert) and pass the .onnx file"
)
_KERAS3_SUFFIX = re.compile(r"_\d+$")

Shapes = dict[str, tuple[int, ...]] | tuple[int, ...] | None


def is_saved_model(path: Path) -> bool:
    return path.is_dir() and (path / "saved_model.pb").is_file()


def load(path: Path, shapes: Shapes) -> tuple[onnx.ModelProto, list[str]]:
    """Convert the Keras model at ``path``; returns the ONNX model (NCHW image inputs) and notes."""

    if not path.exists():
        raise UsageError(f"model not found: {path}")
    version = keras_version(path)
    if version is not None and version.split(".")[0] not in ("2", "3"):
        raise UsageError(f"{path} was saved by Keras {version}; qanac reads Keras 2 (tf_keras) and 3", hint=RESAVE_HINT)
    _quiet_tensorflow()
    tf = _import("tensorflow", "TensorFlow")
    notes: list[str] = []
    if version is None:
        function, spec = _load_signature(tf, path)
        keras_model, layers = None, set()
        notes.append(f"{path} is a SavedModel without Keras metadata: no layer names for its nodes")
    else:
        keras_model = _load_keras_model(path, version)
        spec = _input_specs(tf, keras_model)
        function, layers = None, _all_layer_names(keras_model)
    spec = _apply_shapes(tf, spec, shapes)
    nchw = [s.name for s in spec if s.shape.rank == 4]
    model = _convert(keras_model, function, spec, nchw, version)
    if nchw:
        notes.append(
            "the model input(s) " + ", ".join(nchw) + " are NCHW (Keras takes NHWC): feed "
            "qanac run / verify / calibration data as N,C,H,W"
        )
    feeds_nhwc = _samples(spec)
    expected = _run_reference(keras_model, function, feeds_nhwc)
    feeds = {name: (x.transpose(0, 3, 1, 2) if name in nchw else x) for name, x in feeds_nhwc.items()}
    onnx_inputs = _onnx_input_names(model)
    if set(onnx_inputs) != set(feeds):
        feeds = dict(zip(onnx_inputs, feeds.values(), strict=True))
    check_export(model, feeds, expected, f"Keras {version or 'SavedModel'}")
    set_source_names(model, layer_names([n.name for n in model.graph.node], layers))
    return model, notes


def keras_version(path: Path) -> str | None:
    """The Keras version that saved ``path`` ("2.19.0", "3.15.1"), or None for a plain SavedModel."""

    if path.is_dir():
        if not is_saved_model(path):
            raise UsageError(f"{path} is a directory but not a SavedModel (no saved_model.pb)")
        return "2" if (path / "keras_metadata.pb").is_file() else None
    if path.suffix == ".keras":
        try:
            with zipfile.ZipFile(path) as archive:
                metadata = json.loads(archive.read("metadata.json"))
        except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
            raise UsageError(f"{path} is not a readable .keras archive ({first_line(exc)})") from exc
        return str(metadata.get("keras_version", "3"))
    h5py = _import("h5py", "h5py")
    try:
        with h5py.File(path, "r") as handle:
            value = handle.attrs.get("keras_version")
    except OSError as exc:
        raise UsageError(f"{path} is not a readable HDF5 file ({first_line(exc)})") from exc
    if value is None:
        raise UsageError(f"{path} has no Keras model in it (no keras_version attribute)", hint=RESAVE_HINT)
    return value.decode() if isinstance(value, bytes) else str(value)


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("tensorflow", "tf2onnx", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _import(module: str, what: str) -> Any:
    try:
        import_quietly("tensorflow")  # _quiet_tensorflow set its log level first
        return __import__(module)
    except ImportError as exc:
        raise UsageError(f"{what} is not installed", hint="pip install 'qanac[keras]'") from exc


def _load_keras_model(path: Path, version: str) -> Any:
    if version.startswith("2"):
        keras = _import("tf_keras", "tf_keras (Keras 2)")
    else:
        keras = _import_keras3(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return keras.models.load_model(str(path), compile=False)
    except Exception as exc:
        raise UsageError(f"Keras {version} cannot load {path}: {first_line(exc)}", hint=RESAVE_HINT) from exc


def _import_keras3(path: Path) -> Any:
    try:
        import keras
    except ImportError as exc:
        raise UsageError(f"{path} was saved by Keras 3, which is not installed", hint=RESAVE_HINT) from exc
    if not keras.__version__.startswith("3"):
        raise UsageError(f"{path} was saved by Keras 3 but Keras {keras.__version__} is installed", hint=RESAVE_HINT)
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise UsageError(
            f"Keras 3 runs on the '{backend}' backend; tf2onnx converts TensorFlow graphs only",
            hint="set KERAS_BACKEND=tensorflow, or " + RESAVE_HINT,
        )
    return keras


def _load_signature(tf: Any, path: Path) -> tuple[Any, list[Any]]:
    try:
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures["serving_default"]
    except Exception as exc:
        raise UsageError(f"TensorFlow cannot load the SavedModel {path}: {first_line(exc)}") from exc
    _, specs = signature.structured_input_signature
    ordered = [tf.TensorSpec(spec.shape, spec.dtype, name=name) for name, spec in specs.items()]

    @tf.function
    def serve(*args: Any) -> Any:
        return signature(**{spec.name: arg for spec, arg in zip(ordered, args, strict=True)})

    serve.loaded = loaded  # the signature's variables live as long as the object that loaded them
    return serve, ordered


def _input_specs(tf: Any, keras_model: Any) -> list[Any]:
    specs = []
    for i, tensor in enumerate(keras_model.inputs):
        name = getattr(tensor, "name", None) or f"input_{i}"
        name = name.split(":")[0]
        specs.append(tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype, name=name))
    return specs


def _apply_shapes(tf: Any, specs: list[Any], shapes: Shapes) -> list[Any]:
    """Fill unknown dimensions from ``--input-shape`` (NCHW for rank-4 inputs); the batch stays dynamic."""

    if shapes is None:
        given: dict[str, tuple[int, ...]] = {}
    elif isinstance(shapes, tuple):
        if len(specs) != 1:
            raise UsageError(
                f"the model has {len(specs)} inputs; name them: --input-shape 'x:1,3,64,64;y:1,10'"
            )
        given = {specs[0].name: shapes}
    else:
        unknown = set(shapes) - {s.name for s in specs}
        if unknown:
            raise UsageError(
                f"--input-shape names {sorted(unknown)}, not inputs of the model ({', '.join(s.name for s in specs)})"
            )
        given = dict(shapes)
    result = []
    for spec in specs:
        dims = list(spec.shape.as_list())
        if spec.name in given:
            shape = given[spec.name]
            if len(shape) != len(dims):
                raise UsageError(f"input '{spec.name}' has rank {len(dims)} but --input-shape gives {len(shape)} dims")
            wanted = [shape[0], *shape[2:], shape[1]] if len(shape) == 4 else list(shape)
            for have, want in zip(dims[1:], wanted[1:], strict=True):
                if have is not None and have != want:
                    layout = " (NCHW)" if len(shape) == 4 else ""
                    raise UsageError(
                        f"input '{spec.name}' is fixed at {_nchw(dims)} but --input-shape gives {shape}{layout}"
                    )
            dims = [None, *wanted[1:]]
        if any(d is None for d in dims[1:]):
            raise UsageError(
                f"input '{spec.name}' has unknown dimensions {_nchw(dims)}",
                hint="give them with --input-shape 1,3,224,224 (NCHW for image inputs)",
            )
        result.append(tf.TensorSpec([None, *dims[1:]], spec.dtype, name=spec.name))
    return result


def _nchw(dims: list[Any]) -> tuple[Any, ...]:
    """An NHWC shape written as NCHW, as the user gives it (other ranks unchanged)."""

    shown = ["N" if d is None and i == 0 else ("?" if d is None else d) for i, d in enumerate(dims)]
    return tuple([shown[0], shown[3], shown[1], shown[2]] if len(shown) == 4 else shown)


def _convert(
    keras_model: Any, function: Any, specs: list[Any], nchw: list[str], version: str | None
) -> onnx.ModelProto:
    tf2onnx = _import("tf2onnx", "tf2onnx")
    try:
        # tf2onnx's optimizer deep-copies the graph for each of its optimizers and drops the copy
        with warnings.catch_warnings(), memory.collecting_discarded_copies():
            warnings.simplefilter("ignore")
            if keras_model is not None:
                model, _ = tf2onnx.convert.from_keras(
                    keras_model, input_signature=tuple(specs), opset=OPSET, inputs_as_nchw=nchw or None
                )
            else:
                model, _ = tf2onnx.convert.from_function(
                    function, input_signature=tuple(specs), opset=OPSET, inputs_as_nchw=nchw or None
                )
    except Exception as exc:
        own_export = "export the model to ONNX yourself and pass the .onnx file"
        hint = RESAVE_HINT if version and version.startswith("3") else own_export
        raise UsageError(f"tf2onnx could not convert the model: {first_line(exc)}", hint=hint) from exc
    return model


def _samples(specs: list[Any]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        spec.name: rng.standard_normal((2, *spec.shape.as_list()[1:])).astype(spec.dtype.as_numpy_dtype)
        for spec in specs
    }


def _run_reference(keras_model: Any, function: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    arrays = list(feeds.values())
    try:
        if keras_model is not None:
            result = keras_model(arrays if len(arrays) > 1 else arrays[0], training=False)
        else:
            result = function(*arrays)
    except Exception as exc:
        raise UsageError(f"the Keras model fails on its own sample input: {first_line(exc)}") from exc
    if isinstance(result, dict):
        result = [result[k] for k in sorted(result)]
    if not isinstance(result, (list, tuple)):
        result = [result]
    return [np.asarray(r) for r in result]


def _onnx_input_names(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _all_layer_names(keras_model: Any) -> set[str]:
    names = set()
    stack = list(getattr(keras_model, "layers", []))
    while stack:
        layer = stack.pop()
        names.add(layer.name)
        stack.extend(getattr(layer, "layers", []))
    return names


def layer_names(node_names: list[str], layers: set[str]) -> dict[str, str]:
    """``{onnx node name: Keras layer name}``: the node name's scopes that are layers, joined by ``/``.

    tf2onnx keeps TensorFlow's op names (``model/stem_conv/Conv2D``; Keras 3 adds ``_1`` to each scope:
    ``functional_1/stem_conv_1/convolution``). A nested model's layer reads ``inner/conv``. Nodes whose
    scopes name no layer (tf2onnx's own ``Transpose__12``) get no entry.
    """

    resolved = {}
    for node in node_names:
        found = []
        for scope in node.split("/")[:-1]:
            if scope in layers:
                found.append(scope)
            elif _KERAS3_SUFFIX.sub("", scope) in layers:
                found.append(_KERAS3_SUFFIX.sub("", scope))
        if found:
            resolved[node] = "/".join(found)
    return resolved
