"""infer-shapes: learns shapes, converges, agrees with ONNX Runtime (ceil_mode pooling, shape arithmetic
ONNX inference does not evaluate), and refuses dynamic dimensions other than the batch."""

from __future__ import annotations

import onnx
import pytest

from qanac.diagnostics import UsageError
from qanac.targets import CANONICALIZE
from qanac.testing import apply_pass, assert_outputs_equal, parse, random_inputs, verify_pipeline

CONV_RELU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2,6,6] x) => (float[N,4,1,1] y)
<float[4,2,3,3] w = {%s}>
{
  c = Conv <strides = [2, 2]> (x, w)
  r = Relu(c)
  y = GlobalAveragePool(r)
}
""" % ", ".join(["0.1"] * 72)


def shape_of(compiled, name):
    return compiled.graph.tensors()[name].shape


def test_shapes_are_learned_once_then_nothing_changes():
    model = parse(CONV_RELU)
    compiled, result = apply_pass(model, "infer-shapes")
    assert result.counts == {"learn-shape": 2}  # c and r
    assert shape_of(compiled, "c") == ["N", 4, 2, 2]
    assert shape_of(compiled, "y") == ["N", 4, 1, 1]
    _, again = apply_pass(compiled, "infer-shapes")
    assert not again.changed and again.counts == {}


def test_dynamic_input_dimension_other_than_batch_is_a_usage_error():
    model = parse(CONV_RELU.replace("float[N,2,6,6] x", "float[N,2,H,6] x"))
    with pytest.raises(UsageError, match="input 'x' has a dynamic dimension 2 \\('H'\\)") as caught:
        apply_pass(model, "infer-shapes")
    assert "--input-shape" in caught.value.hint


def test_data_dependent_shape_is_a_usage_error_naming_the_tensor():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,8] x) => (int64[2, M] y) { [nz] y = NonZero(x) }
        """
    )
    with pytest.raises(UsageError, match="'y' \\(shape \\[2, .*\\] from NonZero node 'nz'\\)") as caught:
        apply_pass(model, "infer-shapes")
    assert caught.value.diagnostics[0].nodes == ["nz"]


def test_flatten_by_batch_size_is_resolved_by_probing_the_batch():
    # torch's x.view(x.size(0), -1): ONNX inference alone leaves the second dimension unknown
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,4,4] x) => (float[N,48] y) {
          s = Shape(x)
          zero = Constant <value = int64 {0}> ()
          n = Gather(s, zero)
          axes = Constant <value = int64[1] {0}> ()
          n1 = Unsqueeze(n, axes)
          minus_one = Constant <value = int64[1] {-1}> ()
          target = Concat <axis = 0> (n1, minus_one)
          f = Reshape(x, target)
          y = Relu(f)
        }
        """
    )
    compiled, result = apply_pass(model, "infer-shapes")
    assert shape_of(compiled, "f") == ["N", 48]
    assert shape_of(compiled, "y") == ["N", 48]
    assert result.changed and "unresolved_shapes" not in result.details


CHUNK = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4,6,6] x) => (float[N,?,?,?] y) {
  [shape] s = Shape(x)
  one = Constant <value = int64 {1}> ()
  two = Constant <value = int64 {2}> ()
  zero = Constant <value = int64[1] {0}> ()
  axis = Constant <value = int64[1] {1}> ()
  c = Gather <axis = 0> (s, one)
  half = Div(c, two)
  axes = Constant <value = int64[1] {0}> ()
  end = Unsqueeze(half, axes)
  [chunk] a = Slice(x, zero, end, axis)
  y = Relu(a)
}
"""


def test_shapes_behind_shape_arithmetic_are_learned_from_onnx_runtime_in_one_application():
    # PyTorch's x.chunk(2, 1): ONNX's data propagation does not evaluate the Div, so inference leaves the
    # Slice and everything after it unknown; ONNX Runtime measures them
    model = parse(CHUNK)
    compiled, result = apply_pass(model, "infer-shapes")
    assert shape_of(compiled, "a") == ["N", 2, 6, 6] and shape_of(compiled, "y") == ["N", 2, 6, 6]
    assert "unresolved_shapes" not in result.details
    _, again = apply_pass(compiled, "infer-shapes")
    assert not again.changed


def test_stale_value_info_is_replaced_with_a_warning():
    model = parse(CONV_RELU)
    stale = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, ["N", 4, 5, 5])
    model.graph.value_info.append(stale)
    compiled, result = apply_pass(model, "infer-shapes")
    assert shape_of(compiled, "c") == ["N", 4, 2, 2]
    assert [d.code for d in result.diagnostics] == ["SHP003"]
    assert_outputs_equal(parse(CONV_RELU), compiled, random_inputs(model))


def test_infer_shapes_in_the_pipeline_with_verify_each():
    model = parse(CONV_RELU)
    compiled, report = verify_pipeline(model, list(CANONICALIZE), random_inputs(model))
    assert report.totals()["infer-shapes"]["counts"] == {"learn-shape": 2}
    assert all(t.shape is not None for t in compiled.graph.tensors().values())


def test_ceil_mode_window_in_the_end_padding_is_dropped_as_onnx_runtime_drops_it():
    # ONNX's AveragePool inference keeps the ceil_mode window that starts in the end padding and infers
    # 2x2; ONNX Runtime (and the declared output) say 1x1: infer-shapes sizes it as ONNX Runtime does
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 19]>
        g (float[1,3,2,2] x) => (float[1,3,1,1] y) {
          y = AveragePool <ceil_mode = 1, count_include_pad = 1, kernel_shape = [3, 3], pads = [1, 1, 1, 1],
                           strides = [3, 3]> (x)
        }
        """
    )
    compiled, result = apply_pass(model, "infer-shapes")
    assert result.diagnostics == []
    assert shape_of(compiled, "y") == [1, 3, 1, 1]
    assert_outputs_equal(model, compiled, random_inputs(model))


def test_onnx_inference_failure_falls_back_to_lenient_inference_with_a_warning():
    # a declared output that contradicts what the node computes fails strict inference with and without
    # value_info; lenient inference goes on, with a warning
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,2,2] x) => (float[1,3,1,1] y, float[1,3,2,2] z) {
          y = GlobalAveragePool(x)
          r = Relu(x)
          z = Identity(r)
        }
        """
    )
    model.graph.output[1].type.tensor_type.shape.dim[3].dim_value = 5
    compiled, result = apply_pass(model, "infer-shapes")
    assert [d.code for d in result.diagnostics] == ["SHP003"]
    assert "inferred leniently" in result.diagnostics[0].message
    assert shape_of(compiled, "r") == [1, 3, 2, 2]


torch = pytest.importorskip("torch")


class CeilPools(torch.nn.Module):
    """MaxPool2d(2, 2, 1, ceil_mode) (a window starts in the end padding on odd sizes), MaxPool2d(3, 2,
    ceil_mode) and AvgPool2d(2, 2, 1, ceil_mode), each after a convolution."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(4 if i else 3, 4, 3, padding=1) for i in range(3))
        self.pools = torch.nn.ModuleList([torch.nn.MaxPool2d(2, 2, 1, ceil_mode=True),
                                          torch.nn.MaxPool2d(3, 2, ceil_mode=True),
                                          torch.nn.AvgPool2d(2, 2, 1, ceil_mode=True)])
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        for conv, pool in zip(self.convs, self.pools, strict=True):
            x = pool(torch.relu(conv(x)))
        return self.fc(x.mean([2, 3]))


@pytest.mark.parametrize("size", [15, 17])
def test_recorded_shapes_equal_onnx_runtime_after_ceil_mode_pooling(size):
    import io

    from qanac.execution import tensor_values

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(CeilPools().eval(), torch.zeros(1, 3, size, size), buffer, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}}, opset_version=17, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    compiled, result = apply_pass(model, "infer-shapes")
    assert result.diagnostics == []
    recorded = {name: t.shape for name, t in compiled.graph.tensors().items() if t.inputs}
    inputs = random_inputs(model, batch=2)
    measured = tensor_values(model, inputs, list(recorded))
    assert {name: list(v.shape[1:]) for name, v in measured.items()} == {
        name: list(shape[1:]) for name, shape in recorded.items()
    }
    first_pool = next(n for n in compiled.graph.nodes if n.op == "MaxPool")
    assert first_pool.outputs[0].shape[2:] == [(size + 1) // 2] * 2  # ONNX inference says (size + 3) // 2
    compiled, _ = verify_pipeline(model, list(CANONICALIZE), inputs)
    recorded = {name: t.shape for name, t in compiled.graph.tensors().items() if t.inputs}
    measured = tensor_values(compiled.to_onnx(), inputs, list(recorded))
    assert all(list(v.shape[1:]) == list(recorded[name][1:]) for name, v in measured.items())
