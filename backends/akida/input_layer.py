"""A device segment's first layer, as quantizeml takes it.

quantizeml takes only models whose input feeds exactly one node, and turns a standard Conv reading the
input into an image InputConv2D, for 1 or 3 channels only. ``with_identity_input_layer`` gives any other
segment a first layer Akida maps.
"""

from __future__ import annotations

import numpy as np
import onnx

from qanac.diagnostics import InternalError

IMAGE_CHANNELS = (1, 3)  # what an Akida InputConv2D reads


def with_identity_input_layer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Give a device segment a first layer quantizeml accepts, when it has none.

    quantizeml takes only models whose input feeds exactly one node, and turns a standard Conv reading
    the input into an image InputConv2D, for 1 or 3 channels only (a segment starting at SqueezeNet's
    64-channel squeeze conv fails with "Invalid input range"). In both cases an identity layer is put in
    front: a 3x3 depthwise Conv whose only non-zero tap is a centre 1. Exact in float, 9*C MACs per pixel,
    and a first layer Akida maps for any channel count.
    """

    name = model.graph.input[0].name
    readers = [n for n in model.graph.node if name in n.input]
    inferred = onnx.shape_inference.infer_shapes(model)
    channels = inferred.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    wide_conv_first = (len(readers) == 1 and readers[0].op_type == "Conv" and channels not in IMAGE_CHANNELS
                       and not any(a.name == "group" and a.i > 1 for a in readers[0].attribute))
    if len(readers) < 2 and not wide_conv_first:
        return model, False
    if channels < 1:  # a depthwise identity of group 0 would be an invalid Conv
        raise InternalError(f"device segment input '{name}' has no known channel count",
                            hint="its shape was lost before partitioning: report this with the model")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    identity = f"{name}::identity-input"
    weights = np.zeros((channels, 1, 3, 3), np.float32)
    weights[:, 0, 1, 1] = 1.0
    out.graph.initializer.append(onnx.numpy_helper.from_array(weights, identity + "/weight"))
    for node in out.graph.node:
        for i, value in enumerate(node.input):
            if value == name:
                node.input[i] = identity
    out.graph.node.insert(0, onnx.helper.make_node(
        "Conv", [name, identity + "/weight"], [identity], name=identity, group=channels, pads=[1, 1, 1, 1]
    ))
    return out, True
