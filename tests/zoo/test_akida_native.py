"""Both QANA variants through `qanac compile --target akida` (compile_model, host partitioning on).

- native: one device segment, every MAC in one Hardware sequence of SixNodesIPv2; after QAT the compiled
  bundle agrees with its float reference.
- paper: its multiply-by-tensor gates and sigmoids run on the host between device segments; with the
  opt-in attention-freeze approximation it compiles to one device segment with a larger device MAC share.
"""

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("akida")
pytest.importorskip("cnn2snn")

from qanac.bundle import Bundle  # noqa: E402
from qanac.calibration import load_data  # noqa: E402
from qanac.compiler import CompileRequest, compile_model  # noqa: E402
from qanac.verify import bundle_inputs, run_bundle, run_reference  # noqa: E402
from qanac.zoo.bench import akida_deployment  # noqa: E402
from qanac.zoo.export import export_onnx  # noqa: E402
from qanac.zoo.qana import qana  # noqa: E402
from qanac.zoo.qat import convert_qat_to_float, prepare_qat  # noqa: E402

pytestmark = pytest.mark.slow
SIZE = 32


def _images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3, SIZE, SIZE), dtype=np.uint8)


def _with_statistics(model, raw):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(raw.astype(np.float32) / 255))
    return model.eval()


def _compile(model, raw, tmp_path, approximations=frozenset()):
    tmp_path.mkdir(exist_ok=True)
    source, calib = tmp_path / "model.onnx", tmp_path / "calib.npy"
    export_onnx(model, (3, SIZE, SIZE), source)
    np.save(calib, raw)
    result = compile_model(CompileRequest(source=str(source), target="akida", output=tmp_path / "bundle",
                                          calibration=str(calib), approximations=frozenset(approximations)))
    return result, akida_deployment(result.manifest, result.report)


@pytest.mark.parametrize("attention, downsample", [("context", "pool"), ("none", "pool"), ("context", "stride")])
def test_native_variant_maps_in_one_hardware_sequence(attention, downsample, tmp_path):
    raw = _images(16, 0)
    model = _with_statistics(qana("native", attention=attention, downsample=downsample, width_mult=0.25,
                                  input_size=SIZE), raw)
    result, deployment = _compile(model, raw, tmp_path)
    assert deployment["segments"] == 1 and deployment["transfers"] == 0
    assert deployment["device_mac_share"] == 1.0, result.report["backend_summary"]
    assert deployment["hardware_sequences"] == 1 and deployment["software_sequences"] == 0, deployment["sequences"]
    assert result.manifest["outputs"][0]["shape"][1:] == [7]


def test_qat_export_of_native_variant_compiles_and_agrees_with_float(tmp_path):
    raw = _images(32, 1)
    model = _with_statistics(qana("native", width_mult=0.25, input_size=SIZE), raw)
    qmodel = prepare_qat(model)
    qmodel.train()
    with torch.no_grad():
        qmodel(torch.from_numpy(raw.astype(np.float32) / 255))  # initialise the tracked output ranges
    _, deployment = _compile(convert_qat_to_float(qmodel), raw, tmp_path)
    assert deployment["device_mac_share"] == 1.0 and deployment["hardware_sequences"] == 1

    bundle = Bundle.open(tmp_path / "bundle")
    data = load_data(tmp_path / "calib.npy", bundle_inputs(bundle))
    compiled, reference = run_bundle(bundle, data)[0], run_reference(bundle, data)[0]
    assert compiled.shape == reference.shape == (32, 7)
    correlation = np.corrcoef(compiled.ravel(), reference.ravel())[0, 1]
    assert correlation > 0.9, correlation


def test_paper_variant_runs_partly_on_the_host_and_maps_more_with_attention_freeze(tmp_path):
    raw = _images(16, 2)
    model = _with_statistics(qana("paper", width_mult=0.25, input_size=SIZE), raw)

    # Partitioning alone: the sigmoid gates and tensor products run on the host, between device segments.
    result, plain = _compile(model, raw, tmp_path / "plain")
    assert plain["segments"] > plain["device_segments"] >= 1, plain
    assert 0.0 < plain["device_mac_share"] < 1.0
    host = {n for d in result.report["diagnostics"] if d["code"] == "PART001" for n in d["nodes"]}
    assert any(n.endswith("/Mul") for n in host) and any(n.endswith("/Sigmoid") for n in host)

    # attention-freeze (opt-in, approximate: gates frozen to their calibration mean): one device segment.
    result, frozen = _compile(model, raw, tmp_path / "frozen", {"attention-freeze"})
    assert result.manifest["approximations"] == ["attention-freeze"]
    assert frozen["segments"] == frozen["device_segments"] == 1 and frozen["transfers"] == 0
    assert frozen["device_mac_share"] > plain["device_mac_share"]
