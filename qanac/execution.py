"""Running ONNX models with ONNX Runtime, and the host-side post-processing recorded in a bundle.

Every numerical check in qanac (``--verify-each``, ``qanac verify``, the onnxruntime target) runs
models through ``run_onnx`` so that threading, batching and output order are the same everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from qanac.diagnostics import UsageError

DEFAULT_BATCH = 32


def _session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def make_session(model: onnx.ModelProto | str, threads: int = 0) -> ort.InferenceSession:
    """A CPU session for a model qanac made (a failure is qanac's bug), or for a file by path."""

    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, _session_options(threads), providers=["CPUExecutionProvider"])


_ORT_ERRORS = tuple(v for v in vars(ort_state).values() if isinstance(v, type) and issubclass(v, Exception))


_DAMAGED = "the bundle is damaged or was not written by qanac; compile the model again"


def bundle_model_bytes(path: Path) -> bytes:
    """The bytes of an ONNX file of a bundle, to hand to ONNX Runtime instead of its path (given a path,
    ONNX Runtime opens the files its external data names, wherever they are). The file is read without
    following links or blocking, within the bundle's size limit (``qanac.bundle.read_bundle_file``), and
    refused (exit 2) unless it parses as ONNX with every tensor inline (qanac never writes external data)."""

    from qanac.bundle import MAX_FILE_BYTES, read_bundle_file

    data = b"".join(read_bundle_file(path, path.name, MAX_FILE_BYTES))
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"bundle file {path} is not a readable ONNX model ({exc})", hint=_DAMAGED) from None
    external = next((t.name for t in _all_tensors(model) if _is_external(t)), None)
    if external is not None:
        raise UsageError(f"bundle file {path} keeps the data of tensor '{external}' in another file; a bundle "
                         "model holds its tensors inline", hint=_DAMAGED)
    return data


def bundle_session(path: Path, threads: int = 0, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A CPU session for an ONNX file of a bundle, made from ``bundle_model_bytes`` so that ONNX Runtime opens
    no other file; a model ONNX Runtime cannot load is refused (exit 2), not an internal error."""

    data = bundle_model_bytes(path)
    try:
        return ort.InferenceSession(data, options or _session_options(threads), providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"bundle file {path} cannot be loaded by ONNX Runtime: {first}", hint=_DAMAGED) from None


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a model holds: initializers, sparse initializers and node attributes, in every graph,
    subgraph and function."""

    def in_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("sparse_tensor"):
                    yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
                for sparse in attribute.sparse_tensors:
                    yield from (sparse.values, sparse.indices)
                if attribute.HasField("g"):
                    yield from in_graph(attribute.g)
                for graph in attribute.graphs:
                    yield from in_graph(graph)

    def in_graph(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from in_nodes(graph.node)

    yield from in_graph(model.graph)
    for function in model.functions:
        yield from in_nodes(function.node)


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
        raise UsageError(f"no data for model input(s) {missing}; data has {sorted(inputs)}",
                         hint="give one array per model input, named after it")
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


def run_onnx(
    model: onnx.ModelProto, inputs: dict[str, np.ndarray], batch_size: int = DEFAULT_BATCH
) -> list[np.ndarray]:
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
        values.update(zip(wanted, run_onnx(probe, inputs), strict=True))
    return values


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


_POST_OPS: dict[str, Callable[..., np.ndarray]] = {"Softmax": softmax, "LogSoftmax": log_softmax}


def apply_post_processing(
    outputs: list[np.ndarray], names: list[str], steps: Iterable[dict[str, Any]]
) -> list[np.ndarray]:
    """Apply the host-side steps a bundle records (e.g. a Softmax stripped from the graph's end)."""

    result = list(outputs)
    for step in steps:
        index = names.index(step["output"])
        result[index] = _POST_OPS[step["op"]](result[index], axis=step.get("axis", -1)).astype(np.float32)
    return result


class OnnxRuntimeRunner:
    """Runs an ONNX file of a bundle with ONNX Runtime on the CPU (QDQ models and host segments), loaded by
    ``bundle_session``."""

    def __init__(self, path: Path, threads: int = 0):
        self.session = bundle_session(path, threads)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray], progress=None) -> list[np.ndarray]:
        return run_session(self.session, inputs, progress=progress)
