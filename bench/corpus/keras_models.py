"""Keras models of the corpus: BrainChip's model zoo (akida_models 1.14.2) and tf_keras.applications.

Every model is built in code with random weights (never downloaded), gets BatchNorm statistics from data
(:func:`set_statistics_from_data`) and is saved as an ``.h5`` file by tf_keras, as the vendor ships its
zoo. The vendor builders declare a uint8 image input (convtiny_dvs: int8 events); the
tf_keras.applications models take float32.

akida_models is imported only inside the builders: importing the package also imports its dataset
utilities (tensorflow_datasets, trimesh), which come with ``pip install akida-models`` (docs/install.md).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def set_statistics_from_data(model, samples: np.ndarray, batch_size: int = 32) -> dict[str, int]:
    """Make a randomly initialised model's activations well scaled on ``samples``, at every depth.

    Layers are visited in the model's topological order, each with every earlier one already set:

    - every BatchNormalization gets the mean and variance of what it receives as its moving statistics,
      so its outputs have zero mean and unit variance per channel (gamma 1, beta 0): neither dead nor
      exploding;
    - the readout (the last layer with a kernel and a bias) is standardised: its kernel and bias are
      rescaled so that each output unit has zero mean and unit variance over ``samples`` (measured
      before its activation, such as a softmax). Random
      features share a large common component; without this one class wins for every input and top-1
      agreement says nothing.

    Returns how many layers of each kind were set.
    """

    import tf_keras as keras

    layers = _flat_layers(model)
    kernels = [layer for layer in layers if getattr(layer, "kernel", None) is not None
               and getattr(layer, "bias", None) is not None]
    readout = kernels[-1] if kernels else None
    counts = {"batchnorm": 0, "readout": 0}
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            activations = _probe(model, layer.input, samples, batch_size)
            axes = tuple(range(activations.ndim - 1))
            layer.moving_mean.assign(activations.mean(axis=axes).astype(np.float32))
            layer.moving_variance.assign(activations.var(axis=axes).astype(np.float32))
            counts["batchnorm"] += 1
        elif layer is readout:
            activation = getattr(layer, "activation", None)
            layer.activation = keras.activations.linear  # standardise the logits, before any softmax
            try:
                outputs = _probe(model, layer.output, samples, batch_size)
            finally:
                layer.activation = activation
            axes = tuple(range(outputs.ndim - 1))
            mean, std = outputs.mean(axis=axes), outputs.std(axis=axes)
            std = np.where(std > 0, std, 1.0).astype(np.float32)
            layer.kernel.assign(layer.kernel.numpy() / std)
            layer.bias.assign((layer.bias.numpy() - mean) / std)
            counts["readout"] += 1
    return counts


def _probe(model, tensor, samples: np.ndarray, batch_size: int) -> np.ndarray:
    import tf_keras as keras

    return keras.Model(model.inputs, tensor).predict(samples, batch_size=batch_size, verbose=0)


def _flat_layers(model) -> list:
    import tf_keras as keras

    layers: list = []
    for layer in model.layers:
        layers.extend(_flat_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return layers


def input_spec(model) -> tuple[tuple[int, ...], str]:
    """(shape without batch, channels last; numpy dtype name) of the model's single input."""

    tensor = model.inputs[0]
    return tuple(int(d) for d in tensor.shape[1:]), tensor.dtype.name


# ------------------------------------------------------------------------------------ vendor model zoo
# name -> (builder, keyword arguments, what it is). Input sizes are the smallest the builder takes
# (akidanet/mobilenet: 32 is the minimum; 64 keeps a real stride pyramid), width where it has one.


def _vendor(builder: str) -> Callable[..., Any]:
    def build(**kwargs):
        import akida_models

        return getattr(akida_models, builder)(**kwargs)

    return build


VENDOR_MODELS: dict[str, tuple[Callable[..., Any], dict[str, Any], str]] = {
    "akidanet_imagenet": (_vendor("akidanet_imagenet"),
                          {"input_shape": (64, 64, 3), "alpha": 0.5, "classes": 10},
                          "AkidaNet, alpha 0.5, 64x64x3, 10 classes"),
    "mobilenet_imagenet": (_vendor("mobilenet_imagenet"),
                           {"input_shape": (64, 64, 3), "alpha": 0.5, "classes": 10},
                           "MobileNet v1, alpha 0.5, 64x64x3, 10 classes"),
    "ds_cnn_kws": (_vendor("ds_cnn_kws"), {"input_shape": (49, 10, 1), "classes": 33},
                   "DS-CNN keyword spotting, 49x10x1 MFCC, 33 classes (the builder's defaults)"),
    "vgg_utk_face": (_vendor("vgg_utk_face"), {"input_shape": (32, 32, 3)},
                     "VGG age regression, 32x32x3 (the builder's default)"),
    "gxnor_mnist": (_vendor("gxnor_mnist"), {}, "GXNOR MNIST, 28x28x1 (fixed by the builder)"),
    "convtiny_dvs": (_vendor("convtiny_dvs"), {"input_shape": (64, 64, 10), "classes": 10},
                     "ConvTiny DVS gesture, 64x64x10 int8 events (the builder's default)"),
    "yolo_base": (_vendor("yolo_base"), {"input_shape": (96, 96, 3), "classes": 2, "alpha": 0.5},
                  "YOLOv2 on AkidaNet alpha 0.5, 96x96x3, 2 classes, 5 boxes"),
}


# --------------------------------------------------------------------------------- tf_keras.applications


def _application(name: str) -> Callable[..., Any]:
    def build(**kwargs):
        import tf_keras as keras

        return getattr(keras.applications, name)(weights=None, **kwargs)

    return build


KERAS_APPLICATIONS: dict[str, tuple[Callable[..., Any], dict[str, Any], str]] = {
    "keras_mobilenet_v2": (_application("MobileNetV2"),
                           {"input_shape": (96, 96, 3), "alpha": 0.35, "classes": 10},
                           "tf_keras.applications.MobileNetV2, alpha 0.35, 96x96x3"),
    "keras_mobilenet_v3_small": (_application("MobileNetV3Small"),
                                 {"input_shape": (96, 96, 3), "alpha": 0.75, "classes": 10},
                                 "tf_keras.applications.MobileNetV3Small, alpha 0.75, 96x96x3 (hard-swish, SE)"),
    "keras_resnet50": (_application("ResNet50"), {"input_shape": (64, 64, 3), "classes": 10},
                       "tf_keras.applications.ResNet50, 64x64x3 (ZeroPadding2D + MaxPool stem)"),
}


def build_keras(name: str, seed: int) -> Any:
    """The tf_keras model ``name`` (from VENDOR_MODELS or KERAS_APPLICATIONS), random weights, seeded."""

    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    builder, kwargs, _ = {**VENDOR_MODELS, **KERAS_APPLICATIONS}[name]
    return builder(**kwargs)
