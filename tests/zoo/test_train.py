import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qanac.calibration import write_ham10000_fixture
from qanac.diagnostics import UsageError
from qanac.zoo.data import load_ham10000
from qanac.zoo.qat import QATConfig, prepare_qat
from qanac.zoo.registry import ModelSpec, build_model, resolve_spec
from qanac.zoo.train import TrainConfig, load_run, train

TINY = dict(width_mult=0.25, input_size=32)


@pytest.fixture(scope="module")
def ham(tmp_path_factory):
    root = write_ham10000_fixture(tmp_path_factory.mktemp("ham"), images_per_class=6)
    return load_ham10000(root, image_size=32, fractions=(0.5, 0.25, 0.25), seed=0)


@pytest.mark.parametrize("variant", ["native", "paper"])
def test_fixture_end_to_end(ham, tmp_path, variant):
    events = []
    config = TrainConfig(epochs=1, qat_epochs=1, batch_size=8)
    result = train(resolve_spec("qana", variant, **TINY), ham, config, tmp_path, callback=events.append)

    kinds = [e.event for e in events]
    assert kinds[0] == "phase_start" and "batch" in kinds and "epoch_end" in kinds and kinds[-1] == "done"
    assert {e.phase for e in events} == {"float", "qat"}
    for name in ("config.json", "metrics.json", "float.pt", "qat.pt", "model.onnx", "float.onnx", "calib.npy"):
        assert (tmp_path / name).is_file(), name
    calib = np.load(tmp_path / "calib.npy")  # training images only, never augmented
    assert calib.dtype == np.uint8 and len(calib) == len(ham.train)
    assert {image.tobytes() for image in calib} <= {image.tobytes() for image in ham.train.images}

    # ONNX Runtime on the exported model equals PyTorch
    images, _ = ham.test.arrays()
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = result.model(torch.from_numpy(images)).numpy()
    got = np.concatenate([session.run(None, {"input": x[None]})[0] for x in images])
    np.testing.assert_allclose(got, reference, atol=1e-4)
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 32, 32]

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["onnx_check"]["max_abs_diff"] < 1e-4
    assert {"val", "test"} <= set(metrics["float"]) and {"val", "test"} <= set(metrics["qat"])
    assert metrics["history"][0]["phase"] == "float" and metrics["history"][-1]["phase"] == "qat"

    assert metrics["exported"] == "qat" and metrics["test"]["num_samples"] == len(ham.test)
    loaded, _ = load_run(tmp_path)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(torch.from_numpy(images)).numpy(), reference, atol=1e-5)

    # the checkpoint rebuilds from config.json
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["class_names"] == list(ham.class_names)
    assert stored["preprocessing"]["scale"] == pytest.approx(1 / 255)
    model = build_model(ModelSpec.from_dict(stored["model"]))
    model.load_state_dict(torch.load(tmp_path / "float.pt"))
    qmodel = prepare_qat(model, QATConfig(**stored["train"]["qat"]))
    qmodel.load_state_dict(torch.load(tmp_path / "qat.pt"))
    qmodel.eval()
    with torch.no_grad():
        np.testing.assert_allclose(qmodel(torch.from_numpy(images)).numpy(),
                                   result.qat_model(torch.from_numpy(images)).numpy(), atol=1e-5)


def test_test_split_never_drives_training(ham, monkeypatch):
    """Early stopping, the schedule and the best epoch see only validation metrics; test comes after."""

    import qanac.zoo.train as train_module

    seen = []
    original = train_module.evaluate

    def spy(model, dataset, class_names):
        seen.append("test" if dataset is ham.test else "val" if dataset is ham.val else "other")
        return original(model, dataset, class_names)

    monkeypatch.setattr(train_module, "evaluate", spy)
    train(resolve_spec("qana", "native", **TINY), ham, TrainConfig(epochs=2, qat_epochs=1, batch_size=16),
          callback=lambda p: seen.append(p.event) if p.event == "phase_end" else None)
    last_phase_end = len(seen) - 1 - seen[::-1].index("phase_end")
    assert "test" not in seen[:seen.index("phase_end")]
    assert "test" not in seen[seen.index("phase_end") + 1 : last_phase_end]
    assert seen[:2] == ["val", "val"] and "other" not in seen


def test_input_size_mismatch_is_a_usage_error(ham):
    with pytest.raises(UsageError, match="input"):
        train(resolve_spec("qana", "native", width_mult=0.25, input_size=64), ham, TrainConfig(epochs=1))


def test_bad_config():
    with pytest.raises(UsageError):
        TrainConfig(schedule="step")
    with pytest.raises(UsageError):
        TrainConfig(monitor="loss")
