"""The Keras frontend: tf_keras .keras/.h5/SavedModel, Keras 3, NCHW inputs, layer names, errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

tf_keras = pytest.importorskip("tf_keras")
pytest.importorskip("tf2onnx")

from qanac.diagnostics import UsageError  # noqa: E402
from qanac.execution import run_onnx  # noqa: E402
from qanac.frontends import export_canonical, import_model  # noqa: E402
from qanac.graph import SOURCE_NAMES_KEY  # noqa: E402
from tests.frontends.twin_models import SIZE, keras_twin  # noqa: E402


def source_names(model) -> dict[str, str]:
    return json.loads({p.key: p.value for p in model.metadata_props}.get(SOURCE_NAMES_KEY, "{}"))


def nchw_sample(batch: int = 3, size: int = SIZE, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def assert_matches_keras(model, keras_model, x: np.ndarray) -> None:
    expected = np.asarray(keras_model(x.transpose(0, 2, 3, 1), training=False))
    (actual,) = run_onnx(model, {model.graph.input[0].name: x})
    np.testing.assert_allclose(actual, expected, atol=1e-4 * (1 + np.abs(expected).max()), rtol=0)


@pytest.fixture(scope="module")
def twin_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keras")
    model = keras_twin()
    files = {"keras": folder / "twin.keras", "h5": folder / "twin.h5", "saved_model": folder / "twin_saved_model"}
    model.save(files["keras"])
    model.save(files["h5"])
    model.save(files["saved_model"], save_format="tf")
    return files


@pytest.mark.parametrize("kind", ["keras", "h5", "saved_model"])
def test_tf_keras_files_import_as_nchw_with_layer_names(twin_files, kind):
    imported = import_model(str(twin_files[kind]))
    assert imported.framework == "keras"
    assert imported.original_layout == {"image": "NHWC"}
    assert any("NCHW" in note for note in imported.notes)
    dims = imported.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE] and not dims[0].dim_value
    names = source_names(imported.model)
    convs = [n.name for n in imported.model.graph.node if n.op_type == "Conv"]
    assert [names[c] for c in convs] == ["stem", "dw", "pw"]
    assert {"add", "pool", "fc"} <= set(names.values())
    assert_matches_keras(imported.model, keras_twin(), nchw_sample())


def test_keras_image_model_with_flatten_is_nchw_end_to_end_after_canonicalize(tmp_path):
    layers = tf_keras.layers
    inp = tf_keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    out = layers.Dense(3, name="fc")(x)
    model = tf_keras.Model(inp, out)
    model.save(tmp_path / "flat.keras")
    imported = import_model(str(tmp_path / "flat.keras"))
    assert "Transpose" in [n.op_type for n in imported.model.graph.node]
    result = export_canonical(str(tmp_path / "flat.keras"), tmp_path / "flat.onnx")
    import onnx

    canonical = onnx.load(str(tmp_path / "flat.onnx"))
    assert [n.op_type for n in canonical.graph.node] == ["Conv", "Relu", "MaxPool", "Flatten", "Gemm"]
    assert result.report.totals()["remove-layout-transposes"]["counts"] == {"absorb-transpose-into-dense": 1}
    assert_matches_keras(canonical, model, nchw_sample(size=8))


def test_unknown_spatial_size_comes_from_an_nchw_input_shape(tmp_path):
    layers = tf_keras.layers
    inp = tf_keras.Input((None, None, 3), name="image")
    out = layers.GlobalAveragePooling2D(name="gap")(layers.Conv2D(4, 3, name="conv")(inp))
    model = tf_keras.Model(inp, out)
    model.save(tmp_path / "any_size.keras")
    with pytest.raises(UsageError, match="unknown dimensions"):
        import_model(str(tmp_path / "any_size.keras"))
    imported = import_model(str(tmp_path / "any_size.keras"), "1,3,12,10")
    dims = imported.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 12, 10]
    with pytest.raises(UsageError, match=r"fixed at \('N', 3, '\?', '\?'\) but --input-shape gives \(1, 4, 12, 10\)"):
        import_model(str(tmp_path / "any_size.keras"), "1,4,12,10")


def keras3_model():
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3"):
        pytest.skip("Keras 3 is not installed")
    layers = keras.layers
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, layers.Dense(3, name="fc")(x))


def test_keras3_file_imports_with_layer_names(tmp_path):
    model = keras3_model()
    model.save(tmp_path / "k3.keras")
    imported = import_model(str(tmp_path / "k3.keras"))
    names = source_names(imported.model)
    assert {"gap", "fc"} <= set(names.values())
    # tf2onnx names the Conv it fuses with the BatchNormalization after the BN op
    assert [names[n.name] for n in imported.model.graph.node if n.op_type == "Conv"] in (["conv"], ["bn"])
    assert_matches_keras(imported.model, model, nchw_sample())


def test_keras3_export_without_keras_metadata_imports_without_names(tmp_path):
    model = keras3_model()
    model.export(str(tmp_path / "served"), format="tf_saved_model", verbose=False)
    imported = import_model(str(tmp_path / "served"))
    assert any("no layer names" in note for note in imported.notes)
    assert_matches_keras(imported.model, model, nchw_sample())


def test_keras3_on_another_backend_says_what_to_do(tmp_path, monkeypatch):
    keras = pytest.importorskip("keras")
    model = keras3_model()
    model.save(tmp_path / "k3.keras")
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(UsageError, match="'jax' backend") as caught:
        import_model(str(tmp_path / "k3.keras"))
    assert "KERAS_BACKEND=tensorflow" in caught.value.hint and "tf_keras" in caught.value.hint


def test_keras1_file_is_refused(tmp_path):
    path = tmp_path / "old.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "1.2.2"}))
    with pytest.raises(UsageError, match="saved by Keras 1.2.2") as caught:
        import_model(str(path))
    assert "tf_keras" in caught.value.hint


def test_h5_without_a_keras_model_is_refused(tmp_path):
    import h5py

    with h5py.File(tmp_path / "data.h5", "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(UsageError, match="no Keras model in it"):
        import_model(str(tmp_path / "data.h5"))


def test_directory_that_is_not_a_saved_model_is_refused(tmp_path):
    with pytest.raises(UsageError, match="not a SavedModel"):
        import_model(str(tmp_path))


def _tf2onnx_graphs_per_optimizer(monkeypatch, path: Path) -> list[int]:
    """Import ``path``, counting the tf2onnx graphs alive each time tf2onnx's optimizer starts one of its
    optimizers (it deep-copies the graph for each and drops the copy)."""

    import gc

    import tf2onnx.graph
    import tf2onnx.optimizer

    counts: list[int] = []
    optimizers = tf2onnx.optimizer._get_optimizers

    def counting(factory):
        def make():
            counts.append(sum(type(o) is tf2onnx.graph.Graph for o in gc.get_objects()))
            return factory()
        return make

    monkeypatch.setattr(tf2onnx.optimizer, "_get_optimizers",
                        lambda: {name: counting(factory) for name, factory in optimizers().items()})
    gc.collect()
    import_model(str(path))
    return counts


@pytest.fixture(scope="module")
def deep_chain(tmp_path_factory) -> Path:
    """A 40-block Conv-BatchNorm-ReLU chain as .h5: each tf2onnx copy of it holds thousands of objects, as a
    real network's does."""

    layers = tf_keras.layers
    x = inp = tf_keras.Input((16, 16, 3), name="image")
    for i in range(40):
        x = layers.Conv2D(8, 3, padding="same", name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
    out = layers.Dense(10, name="fc")(layers.GlobalAveragePooling2D(name="pool")(x))
    path = tmp_path_factory.mktemp("chain") / "chain.h5"
    tf_keras.Model(inp, out).save(path)
    return path


def test_tf2onnx_graph_copies_are_collected_while_it_optimizes(deep_chain, monkeypatch):
    counts = _tf2onnx_graphs_per_optimizer(monkeypatch, deep_chain)
    assert len(counts) > 20  # every optimizer, over at least two rounds
    # at every optimizer, the copies dropped since the last collection, not one per optimizer so far
    assert max(counts) <= len(counts) // 4, str(counts)


def test_uncollected_tf2onnx_copies_are_what_the_test_detects(deep_chain, monkeypatch):
    import contextlib

    from qanac import memory

    monkeypatch.setattr(memory, "collecting_discarded_copies", contextlib.nullcontext)
    counts = _tf2onnx_graphs_per_optimizer(monkeypatch, deep_chain)
    assert counts[-1] > len(counts) // 2, str(counts)
