"""A ShuffleNetV2 block (chunk, then Reshape -> Transpose -> Reshape between convolutions, as torchvision's
channel_shuffle exports it with a dynamic batch) through the canonical + Akida pipeline: it converges in
two sweeps, the shape computations are gone, every Conv has a valid group after every pass, and outputs
equal the original within the ``--verify-each`` tolerance (max abs error <= 1e-4 * (1 + max |reference|))."""

from __future__ import annotations

import io

import onnx
import pytest

from qanac.graph import CompilationModel
from qanac.pipeline import PassContext, PipelineOptions, run_pipeline
from qanac.registry import load_passes
from qanac.targets import get_target
from qanac.testing import assert_outputs_equal, ops, random_inputs, verify_pipeline

torch = pytest.importorskip("torch")
nn = torch.nn

SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Concat", "Div", "Mul", "Cast"}


def channel_shuffle(x, groups: int):
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, -1, height, width)


class Unit(nn.Module):
    """ShuffleNetV2's stride-1 unit: half the channels pass, the other half goes through 1x1, depthwise
    3x3 and 1x1 convolutions, then the halves are concatenated and shuffled."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
        )

    def forward(self, x):
        kept, worked = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((kept, self.branch(worked)), 1), 2)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.units = nn.Sequential(*[Unit(16) for _ in range(10)])
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.head(self.units(self.stem(x))).mean([2, 3]))


@pytest.fixture(scope="module")
def shufflenet() -> onnx.ModelProto:
    torch.manual_seed(0)
    net = ShuffleNet().eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    buffer = io.BytesIO()
    torch.onnx.export(net, torch.randn(1, 3, 32, 32), buffer, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=17, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def akida_pipeline() -> list[str]:
    load_passes()
    target = get_target("akida")
    target.load_passes()
    return list(target.pipeline)


def check_conv_groups(model: CompilationModel) -> list[str]:
    """The Convs whose group is not a positive divisor of their input and output channel counts."""

    bad = []
    for node in model.graph.nodes:
        if node.op != "Conv":
            continue
        group = int(node.attrs.get("group", 1))
        weights = node.inputs[1].shape
        channels = node.inputs[0].shape[1] if node.inputs[0].shape else None
        if group < 1 or weights[0] % group or (isinstance(channels, int) and channels != weights[1] * group):
            bad.append(f"{node.name}: group {group}, weights {weights}, input channels {channels}")
    return bad


@pytest.mark.parametrize("disabled", [frozenset(), frozenset({"fold-constants"})])
def test_channel_shuffle_converges_with_valid_groups_after_every_pass(shufflenet, disabled):
    load_passes()
    compiled = CompilationModel.from_onnx(shufflenet)
    invalid: dict[str, list[str]] = {}

    def check(record):
        bad = check_conv_groups(compiled)
        if bad:
            invalid.setdefault(record.name, bad)

    report = run_pipeline(compiled, akida_pipeline(), PassContext("akida"), PipelineOptions(disabled=disabled),
                          on_pass=check)
    assert invalid == {}
    assert report.iterations <= 2
    assert all(isinstance(d, int) for t in compiled.graph.tensors().values() if t.shape for d in t.shape[1:])
    if not disabled:
        assert not SHAPE_OPS & set(ops(compiled)) - {"Concat"}
        assert ops(compiled).count("Concat") == 10  # the units' own; no shape is concatenated any more
        reshapes = [n for n in compiled.graph.nodes if n.op == "Reshape"]
        assert reshapes and all(n.inputs[1].values[0] == -1 for n in reshapes)


def test_channel_shuffle_outputs_are_unchanged(shufflenet):
    inputs = random_inputs(shufflenet, batch=3)
    compiled, report = verify_pipeline(shufflenet, akida_pipeline(), inputs)
    assert report.iterations <= 2
    assert_outputs_equal(shufflenet, compiled, random_inputs(shufflenet, batch=2, seed=5))
