"""bounded-relu-to-clip: every exporter's spelling of a bounded ReLU becomes one Clip(0, b) with constant
scalar min/max inputs (and an unbounded one a Relu); ONNX Runtime outputs equal to the original within the
``--verify-each`` tolerance (max abs error <= 1e-4 * (1 + max |reference|)); chains that are no bounded
ReLU are left with their reason."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import helper

from qanac.targets import CANONICALIZE
from qanac.testing import apply_pass, graph_model, ops, random_inputs, rewrite_and_compare, verify_pipeline

RULE = "bounded-relu-to-clip"
C = 4


def chain_model(links: list[tuple[str, list[str]]], extra: dict | None = None, outputs=("y",)) -> onnx.ModelProto:
    """x (N, 4, 6, 6) -> Conv -> the chain -> y; a link is (op, inputs), "$" standing for the previous output."""

    rng = np.random.default_rng(0)
    weights = {"w": rng.normal(0, 2.0, (C, C, 3, 3)), **(extra or {})}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    previous = "c"
    for i, (op, inputs) in enumerate(links):
        out = "y" if i == len(links) - 1 else f"t{i}"
        nodes.append(helper.make_node(op, [previous if name == "$" else name for name in inputs], [out],
                                      name=f"{op.lower()}{i}"))
        previous = out
    return graph_model(nodes, weights, ["N", C, 6, 6], outputs)


def full(value: float) -> np.ndarray:
    return np.full((1, 1, 1, 1), value)  # tf2onnx's broadcast constants


SPELLINGS = {
    "tf2onnx ReLU(max_value)": ([("Relu", ["$"]), ("Min", ["$", "b"]), ("Max", ["$", "zero"])],
                                {"b": full(4.5), "zero": full(0.0)}, 4.5),
    "tf2onnx ReLU(max_value) without Max": ([("Relu", ["$"]), ("Min", ["$", "b"])], {"b": full(4.5)}, 4.5),
    "Clip with [1, 1, 1, 1] bounds": ([("Clip", ["$", "zero", "six"])], {"zero": full(0.0), "six": full(6.0)}, 6.0),
    "Max(0) then Min(b)": ([("Max", ["$", "zero"]), ("Min", ["b", "$"])], {"zero": 0.0, "b": 3.0}, 3.0),
    "Min(b) then Max(0)": ([("Min", ["$", "b"]), ("Max", ["zero", "$"])], {"zero": 0.0, "b": 3.0}, 3.0),
    "Relu then Clip(max)": ([("Relu", ["$"]), ("Clip", ["$", "", "b"])], {"b": 2.0}, 2.0),
    "Clip(0, 6) then Min(4)": ([("Clip", ["$", "zero", "six"]), ("Min", ["$", "b"])],
                               {"zero": 0.0, "six": 6.0, "b": 4.0}, 4.0),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_bounded_relu_spellings_become_one_clip(spelling):
    links, extra, bound = SPELLINGS[spelling]
    compiled, counts, _ = rewrite_and_compare(chain_model(links, extra), RULE)
    assert counts == {RULE: 1}
    assert ops(compiled) == ["Conv", "Clip"]
    clip = compiled.graph.nodes[1]
    assert clip.name == f"{links[0][0].lower()}0::{RULE}" and clip.outputs[0].name == "y"
    low, high = (t.values for t in clip.inputs[1:])
    assert low.size == high.size == 1 and low.ndim <= 1 and low.dtype == high.dtype == np.float32
    assert float(low[0]) == 0.0 and float(high[0]) == bound


@pytest.mark.parametrize("links, extra", [
    ([("Max", ["$", "zero"])], {"zero": 0.0}),
    ([("Relu", ["$"]), ("Relu", ["$"])], {}),
    ([("Clip", ["$", "zero", ""])], {"zero": 0.0}),
])
def test_unbounded_chains_become_one_relu(links, extra):
    compiled, counts, _ = rewrite_and_compare(chain_model(links, extra), RULE)
    assert counts == {"clamp-chain-to-relu": 1}
    assert ops(compiled) == ["Conv", "Relu"]


@pytest.mark.parametrize("links, extra", [
    ([("Relu", ["$"])], {}),
    ([("Clip", ["$", "zero", "six"])], {"zero": 0.0, "six": 6.0}),
    ([("Clip", ["$", "zero", "six"])], {"zero": [0.0], "six": [6.0]}),
    ([("Min", ["$", "six"])], {"six": 6.0}),
])
def test_canonical_forms_and_lone_mins_are_not_candidates(links, extra):
    _, result = apply_pass(chain_model(links, extra), RULE)
    assert not result.changed and not result.details


@pytest.mark.parametrize("links, extra, where, reason", [
    ([("Clip", ["$", "lo", "hi"])], {"lo": -1.0, "hi": 1.0}, "clip0", "the lower bound is not 0"),
    ([("Max", ["$", "lo"]), ("Min", ["$", "hi"])], {"lo": -1.0, "hi": 1.0}, "max0", "the lower bound is not 0"),
    ([("Relu", ["$"]), ("Min", ["$", "hi"])], {"hi": -1.0}, "relu0", "leave a constant"),
])
def test_chains_that_are_no_bounded_relu_stay_with_the_reason(links, extra, where, reason):
    compiled, result = apply_pass(chain_model(links, extra), RULE)
    assert not result.changed and ops(compiled) == ["Conv", *[op for op, _ in links]]
    assert reason in result.details["skipped"][where]


def test_a_computed_bound_stays_with_the_reason():
    model = chain_model([("Relu", ["$"]), ("Abs", ["x"]), ("Min", ["t0", "t1"])])
    compiled, result = apply_pass(model, RULE)
    assert not result.changed
    assert result.details["skipped"] == {"min2": "the bound of Min 'min2' is computed at run time"}


def test_a_chain_read_in_the_middle_is_cut_there():
    # Relu's output is also a graph output: the Min after it is no bounded ReLU on its own
    model = chain_model([("Relu", ["$"]), ("Min", ["$", "b"])], {"b": 3.0}, outputs=("y", "t0"))
    compiled, result = apply_pass(model, RULE)
    assert not result.changed and ops(compiled) == ["Conv", "Relu", "Min"]


torch = pytest.importorskip("torch")


class TorchBounded(torch.nn.Module):
    """ReLU6, Hardtanh(0, 4.5) and relu(x).clamp(max=2) between convolutions, as a user writes them."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(C, C, 3, padding=1) for _ in range(3))
        self.relu6 = torch.nn.ReLU6()
        self.hardtanh = torch.nn.Hardtanh(0.0, 4.5)

    def forward(self, x):
        x = self.relu6(self.convs[0](x))
        x = self.hardtanh(self.convs[1](x))
        return torch.relu(self.convs[2](x)).clamp(max=2.0)


def test_torch_relu6_hardtanh_and_clamp_become_clips_through_canonicalize():
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(TorchBounded().eval(), torch.randn(1, C, 8, 8) * 4, buffer, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}}, opset_version=17, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    inputs = {"x": random_inputs(model)["x"] * 4}
    compiled, report = verify_pipeline(model, list(CANONICALIZE), inputs)
    assert ops(compiled) == ["Conv", "Clip", "Conv", "Clip", "Conv", "Clip"]
    bounds = [float(n.inputs[2].values.reshape(())) for n in compiled.graph.nodes if n.op == "Clip"]
    assert bounds == [6.0, 4.5, 2.0]
    assert all(float(n.inputs[1].values.reshape(())) == 0.0 for n in compiled.graph.nodes if n.op == "Clip")


# --- hard-sigmoid-and-swish -------------------------------------------------------------------------------

HARD = "hard-sigmoid-and-swish"


def hard_model(scale: tuple[str, float], gate_of: str = "c") -> onnx.ModelProto:
    """x -> Conv -> c; Add(gate_of, 3) -> Clip(0, 6) -> Mul or Div by ``scale`` -> Mul(c, that) -> y."""

    op, value = scale
    return chain_model(
        [("Add", [gate_of, "three"]), ("Clip", ["$", "zero", "six"]), (op, ["$", "k"]), ("Mul", ["c", "$"])],
        {"three": 3.0, "zero": 0.0, "six": 6.0, "k": value},
    )


@pytest.mark.parametrize("scale", [("Mul", 1 / 6), ("Div", 6.0)])
def test_keras_hard_swish_becomes_one_op(scale):
    model = hard_model(scale)
    compiled, report = verify_pipeline(model, ["infer-shapes", HARD], random_inputs(model, seed=1))
    assert report.totals()[HARD]["counts"] == {"hard-sigmoid": 1, "hard-swish": 1}
    assert ops(compiled) == ["Conv", "HardSwish"] and compiled.graph.nodes[1].outputs[0].name == "y"


def test_a_hard_sigmoid_gate_of_another_tensor_stays_a_hard_sigmoid():
    model = hard_model(("Mul", 1 / 6), gate_of="x")
    compiled, counts, _ = rewrite_and_compare(model, HARD)
    assert counts == {"hard-sigmoid": 1}
    assert ops(compiled) == ["Conv", "HardSigmoid", "Mul"]
    gate = compiled.graph.nodes[1]
    assert gate.attrs["alpha"] == pytest.approx(1 / 6) and gate.attrs["beta"] == pytest.approx(0.5)


def test_a_clip_scaled_by_something_else_stays_with_the_reason():
    compiled, result = apply_pass(hard_model(("Mul", 0.2)), HARD)
    assert not result.changed and ops(compiled) == ["Conv", "Add", "Clip", "Mul", "Mul"]
    assert result.details["skipped"] == {"add0": "Clip(0, 6) is not scaled by 1/6 after it"}


class TorchHandWrittenHardSwish(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        return x * torch.nn.functional.relu6(x + 3) / 6


def test_torch_hand_written_hard_swish_becomes_one_op():
    buffer = io.BytesIO()
    torch.manual_seed(0)
    torch.onnx.export(TorchHandWrittenHardSwish().eval(), torch.randn(1, C, 8, 8), buffer, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}}, opset_version=17, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    compiled, _ = verify_pipeline(model, list(CANONICALIZE), {"x": random_inputs(model)["x"] * 4})
    assert ops(compiled) == ["Conv", "HardSwish"]
