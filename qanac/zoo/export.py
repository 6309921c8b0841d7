"""ONNX export of zoo models, in the form `qanac compile` takes best.

Models are exported with the TorchScript exporter (``dynamo=False``) at opset 17, one input ``input``
(float32 NCHW in [0, 1]) and one output ``logits``, with a fixed batch of 1 by default: every shape in
the graph is then static, which the Akida path (quantizeml) and shape-limit lint rules need, and
quantizeml rewrites the batch dimension itself. ``dynamic_batch=True`` names the batch ``N`` instead,
for ONNX Runtime evaluation in batches.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Sequence

import onnx
import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17


def export_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    path: str | Path | None = None,
    dynamic_batch: bool = False,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """Export ``model`` (in eval mode, on the CPU) for inputs of shape ``(C, H, W)``; write ``path`` if given."""

    was_training = model.training
    model.eval()
    dummy = torch.zeros(1, *input_shape)
    buffer = io.BytesIO()
    dynamic_axes = {INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                model,
                dummy,
                buffer,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    if path is not None:
        onnx.save(proto, str(path))
    return proto
