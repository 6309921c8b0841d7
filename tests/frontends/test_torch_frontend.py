"""The PyTorch frontend: factories, weights, TorchScript and torch.export files, source names, errors."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qanac.diagnostics import UsageError  # noqa: E402
from qanac.execution import run_onnx  # noqa: E402
from qanac.frontends import import_model  # noqa: E402
from qanac.frontends.torch import module_paths  # noqa: E402
from qanac.graph import SOURCE_NAMES_KEY, CompilationModel  # noqa: E402

NETS = '''
import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, channels // 2, 1)
        self.expand = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(self.pool(x)))))


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU6(),
        )
        self.se = SqueezeExcite(channels)

    def forward(self, x):
        return x + self.se(self.conv(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(), Block(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def net():
    torch.manual_seed(0)
    model = Net()
    for bn in [model.features[1], model.features[3].conv[1]]:
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return model


def broken():
    raise ValueError("width must be positive\\nsecond line of the message")


def not_a_module():
    return 42


class BatchOfOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(x.reshape(1, -1))


def batch_of_one():
    return BatchOfOne()


class Fourier(nn.Module):
    def forward(self, x):
        return torch.view_as_real(torch.fft.fft(x)).sum(-1)


def fourier():
    return Fourier()
'''


@pytest.fixture
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A factory module in the current directory, under a name no other test uses; returns its name."""

    name = f"qanac_test_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def reference_module(nets: str):
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = __import__(nets)
    finally:
        sys.path.pop(0)
    return module


def source_names(model) -> dict[str, str]:
    return json.loads({p.key: p.value for p in model.metadata_props}[SOURCE_NAMES_KEY])


def outputs_match(model, torch_module, shape=(3, 3, 16, 16)) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch_module.eval()(x).numpy()
    (actual,) = run_onnx(model, {"input": x.numpy()})
    np.testing.assert_allclose(actual, expected, atol=1e-4 * (1 + np.abs(expected).max()), rtol=0)


def test_factory_exports_with_dynamic_batch_and_module_paths(nets):
    imported = import_model(f"{nets}:net", "1,3,16,16")
    assert imported.framework == "torch" and imported.notes == []
    dims = imported.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    names = source_names(imported.model)
    assert set(names.values()) >= {"features.0", "features.3.conv.0", "features.3.se.reduce", "features.3", "fc"}
    convs = [n.name for n in imported.model.graph.node if n.op_type == "Conv"]
    assert names[convs[0]] == "features.0"
    outputs_match(imported.model, reference_module(nets).net())
    compiled = CompilationModel.from_onnx(imported.model)
    assert compiled.source_of(convs[1]) == "features.3.conv.0"


def test_factory_weights_are_loaded(nets, tmp_path):
    trained = reference_module(nets).net()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "weights.pt")
    imported = import_model(f"{nets}:net", "1,3,16,16", weights=str(tmp_path / "weights.pt"))
    outputs_match(imported.model, trained)


def test_factory_from_a_python_file(nets):
    imported = import_model(f"{nets}.py:net", "1,3,16,16")
    assert "fc" in source_names(imported.model).values()


def test_weights_that_do_not_fit_are_a_usage_error(nets, tmp_path):
    state = reference_module(nets).net().state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UsageError, match="1 missing .*fc.bias.*1 unexpected .*extra.weight"):
        import_model(f"{nets}:net", "1,3,16,16", weights=str(tmp_path / "bad.pt"))


def test_torchscript_file(nets, tmp_path):
    module = reference_module(nets).net().eval()
    torch.jit.save(torch.jit.trace(module, torch.randn(1, 3, 16, 16)), tmp_path / "net.pt")
    imported = import_model(str(tmp_path / "net.pt"), "1,3,16,16")
    assert {"features.0", "features.3.se.expand", "fc"} <= set(source_names(imported.model).values())
    outputs_match(imported.model, module)


def test_exported_program_with_dynamic_batch_is_exported_at_the_given_batch(nets, tmp_path):
    module = reference_module(nets).net().eval()
    program = torch.export.export(
        module, (torch.randn(2, 3, 16, 16),), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}
    )
    torch.export.save(program, tmp_path / "net.pt2")
    imported = import_model(str(tmp_path / "net.pt2"), "2,3,16,16")
    assert "fixed at 2" in imported.notes[0]
    assert "features.3.conv.0" in source_names(imported.model).values()
    outputs_match(imported.model, module, shape=(2, 3, 16, 16))


def test_exported_program_at_another_shape_is_a_usage_error(nets, tmp_path):
    module = reference_module(nets).net().eval()
    torch.export.save(torch.export.export(module, (torch.randn(1, 3, 16, 16),)), tmp_path / "net.pt2")
    with pytest.raises(UsageError, match=r"does not run at input shape \(1, 3, 8, 8\)"):
        import_model(str(tmp_path / "net.pt2"), "1,3,8,8")


def test_exported_program_with_static_batch_is_fixed_and_said(nets, tmp_path):
    module = reference_module(nets).net().eval()
    torch.export.save(torch.export.export(module, (torch.randn(1, 3, 16, 16),)), tmp_path / "net.pt2")
    imported = import_model(str(tmp_path / "net.pt2"), "1,3,16,16")
    assert imported.notes and "fixed at 1" in imported.notes[0]
    assert imported.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    outputs_match(imported.model, module, shape=(1, 3, 16, 16))


def test_model_that_only_runs_at_one_batch_gets_a_fixed_batch(nets):
    imported = import_model(f"{nets}:batch_of_one", "1,3,4,4")
    assert "fixed at 1" in imported.notes[0]


def test_module_paths_resolve_both_scope_styles():
    modules = {"features", "features.3", "features.3.conv", "features.3.conv.0", "fc"}
    names = module_paths(
        [
            "/features/features.3/conv/conv.0/Conv",  # nn.Module export
            "/features/3/conv/0/Relu",  # traced TorchScript export
            "/fc/Gemm",
            "/Flatten",
            "Identity_3",
        ],
        modules,
    )
    assert names == {
        "/features/features.3/conv/conv.0/Conv": "features.3.conv.0",
        "/features/3/conv/0/Relu": "features.3.conv.0",
        "/fc/Gemm": "fc",
    }


@pytest.mark.parametrize(
    ("source", "shape", "message"),
    [
        ("no_such_package.models:net", "1,3,8,8",
         "cannot import 'no_such_package.models': no module named 'no_such_package'"),
        ("{nets}:missing", "1,3,8,8", "has no attribute 'missing'"),
        ("{nets}:broken", "1,3,8,8", r"the factory '.*:broken' raised ValueError: width must be positive$"),
        ("{nets}:not_a_module", "1,3,8,8", "returned a int, not a torch.nn.Module"),
        ("{nets}:net", None, "does not say what input it takes"),
        ("{nets}:net", "1,5,16,16", "fails on input of shape"),
        ("{nets}:fourier", "1,3,8,8", "PyTorch could not export the model to ONNX: UnsupportedOperatorError: .*fft"),
    ],
)
def test_usage_errors(nets, source, shape, message):
    with pytest.raises(UsageError, match=message) as caught:
        import_model(source.format(nets=nets), shape)
    assert "\n" not in caught.value.message


def test_missing_input_shape_for_an_exported_program_names_its_shape(nets, tmp_path):
    module = reference_module(nets).net().eval()
    torch.export.save(torch.export.export(module, (torch.randn(1, 3, 16, 16),)), tmp_path / "net.pt2")
    with pytest.raises(UsageError) as caught:
        import_model(str(tmp_path / "net.pt2"))
    assert caught.value.hint.startswith("e.g. --input-shape 1,3,16,16")


def test_state_dict_given_as_a_model_says_what_to_do(nets, tmp_path):
    torch.save(reference_module(nets).net().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(UsageError, match="holds a state_dict") as caught:
        import_model(str(tmp_path / "weights.pt"), "1,3,16,16")
    assert "--weights" in caught.value.hint


def test_weights_without_a_factory_are_refused(tmp_path, small_model_path):
    with pytest.raises(UsageError, match="--weights applies to a PyTorch module factory"):
        import_model(str(small_model_path), weights=str(tmp_path / "w.pt"))


def test_export_failure_prints_nothing_but_the_error(nets, capfd):
    with pytest.raises(UsageError):
        import_model(f"{nets}:fourier", "1,3,8,8")
    captured = capfd.readouterr()
    assert "Torch IR graph" not in captured.out + captured.err


def test_missing_torchscript_file(tmp_path):
    with pytest.raises(UsageError, match="model not found"):
        import_model(str(tmp_path / "missing.pt"), "1,3,8,8")
