"""Running ONNX models with ONNX Runtime, and the host-side post-processing recorded in a bundle.

Every numerical check in qanac (``--verify-each``, ``qanac verify``, the onnxruntime target) runs
models through ``run_onnx`` so that threading, batching and output order are the same everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort

from qanac.diagnostics import UsageError

DEFAULT_BATCH = 32


def make_session(model: onnx.ModelProto | str, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_session(
    session: ort.InferenceSession,
    inputs: dict[str, np.ndarray],
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Run ``session`` over ``inputs`` in batches; a model with a fixed batch of 1 is fed sample by sample."""

    fixed_batch = _fixed_batch(session)
    if fixed_batch is not None:
        batch_size = fixed_batch
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise UsageError(f"no data for model input(s) {missing}; data has {sorted(inputs)}")
    total = len(inputs[names[0]])
    chunks: list[list[np.ndarray]] = []
    for start in range(0, total, batch_size):
        feed = {n: np.ascontiguousarray(inputs[n][start : start + batch_size]) for n in names}
        if fixed_batch is not None and len(feed[names[0]]) != fixed_batch:
            break
        chunks.append(session.run(None, feed))
        if progress is not None:
            progress(len(feed[names[0]]))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(session.get_outputs()))]


def _fixed_batch(session: ort.InferenceSession) -> int | None:
    dim = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    return dim if isinstance(dim, int) and dim > 0 else None


def run_onnx(model: onnx.ModelProto, inputs: dict[str, np.ndarray], batch_size: int = DEFAULT_BATCH) -> list[np.ndarray]:
    return run_session(make_session(model), inputs, batch_size)


def tensor_values(model: onnx.ModelProto, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The values of inner tensors ``names`` when the model runs on ``inputs`` (graph inputs pass through)."""

    graph_inputs = {i.name for i in model.graph.input}
    values = {n: inputs[n] for n in names if n in graph_inputs}
    wanted = [n for n in names if n not in graph_inputs]
    if wanted:
        probe = onnx.shape_inference.infer_shapes(model)
        typed = {v.name: v for v in [*probe.graph.value_info, *probe.graph.output]}
        del probe.graph.output[:]
        probe.graph.output.extend(typed[name] for name in wanted)
        values.update(zip(wanted, run_onnx(probe, inputs)))
    return values


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


_POST_OPS: dict[str, Callable[..., np.ndarray]] = {"Softmax": softmax, "LogSoftmax": log_softmax}


def apply_post_processing(outputs: list[np.ndarray], names: list[str], steps: Iterable[dict[str, Any]]) -> list[np.ndarray]:
    """Apply the host-side steps a bundle records (e.g. a Softmax stripped from the graph's end)."""

    result = list(outputs)
    for step in steps:
        index = names.index(step["output"])
        result[index] = _POST_OPS[step["op"]](result[index], axis=step.get("axis", -1)).astype(np.float32)
    return result


class OnnxRuntimeRunner:
    """Runs an ONNX file with ONNX Runtime on the CPU (used for QDQ models and host segments)."""

    def __init__(self, path: Path, threads: int = 0):
        self.session = make_session(str(path), threads)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray], progress=None) -> list[np.ndarray]:
        return run_session(self.session, inputs, progress=progress)
