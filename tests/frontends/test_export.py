"""export_canonical (``qanac export``) and the cross-framework promise: one network, one canonical graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tf_keras")
pytest.importorskip("tf2onnx")

from qanac.diagnostics import UsageError  # noqa: E402
from qanac.execution import run_onnx  # noqa: E402
from qanac.frontends import export_canonical  # noqa: E402
from qanac.registry import all_passes, load_passes  # noqa: E402
from qanac.targets import CANONICALIZE  # noqa: E402
from tests.frontends.twin_models import SIZE, keras_twin, torch_twin  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TWIN_FACTORY = "tests.frontends.twin_models:torch_twin"


def test_every_canonicalize_pass_is_registered():
    load_passes()
    registered = {p.name for p in all_passes()}
    assert [name for name in CANONICALIZE if name not in registered] == []


@pytest.mark.parametrize("keras_file", ["twin.keras", "twin.h5"])
def test_same_network_from_pytorch_and_keras_gives_the_same_canonical_graph(tmp_path, monkeypatch, keras_file):
    monkeypatch.chdir(REPO)
    keras_twin().save(tmp_path / keras_file)
    from_torch = export_canonical(TWIN_FACTORY, tmp_path / "torch.onnx", input_shape=f"1,3,{SIZE},{SIZE}")
    from_keras = export_canonical(str(tmp_path / keras_file), tmp_path / "keras.onnx")
    torch_model = onnx.load(str(from_torch.path))
    keras_model = onnx.load(str(from_keras.path))

    sequence = [n.op_type for n in torch_model.graph.node]
    assert sequence == ["Conv", "Clip", "Conv", "Relu", "Conv", "Add", "GlobalAveragePool", "Flatten", "Gemm"]
    assert [n.op_type for n in keras_model.graph.node] == sequence

    x = np.random.default_rng(3).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        reference = torch_twin()(torch.from_numpy(x)).numpy()
    tolerance = 1e-4 * (1 + np.abs(reference).max())
    for model in (torch_model, keras_model):
        (out,) = run_onnx(model, {model.graph.input[0].name: x})
        np.testing.assert_allclose(out, reference, atol=tolerance, rtol=0)
    assert from_keras.imported.original_layout == {"image": "NHWC"}
    assert from_torch.max_abs_change <= tolerance and from_keras.max_abs_change <= tolerance


def test_canonical_model_keeps_source_names(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    result = export_canonical(TWIN_FACTORY, tmp_path / "twin.onnx", input_shape=f"1,3,{SIZE},{SIZE}")
    from qanac.graph import CompilationModel

    model = CompilationModel.from_onnx(onnx.load(str(result.path)))
    convs = [n.name for n in model.graph.nodes if n.op == "Conv"]
    assert [model.source_of(c) for c in convs] == ["stem", "block.dw", "block.pw"]


def test_export_writes_nothing_when_the_import_fails(tmp_path):
    target = tmp_path / "model.onnx"
    with pytest.raises(UsageError, match="cannot import"):
        export_canonical("no_such_package.models:net", target, input_shape="1,3,8,8")
    assert list(tmp_path.iterdir()) == []


def test_export_replaces_an_existing_file_whole(tmp_path, small_model_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")
    export_canonical(str(small_model_path), target)
    onnx.checker.check_model(onnx.load(str(target)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", small_model_path.name])


def test_export_to_a_directory_is_refused(tmp_path, small_model_path):
    with pytest.raises(UsageError, match="is a directory"):
        export_canonical(str(small_model_path), tmp_path)
