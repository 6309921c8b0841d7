"""fold-constants: folds through ONNX Runtime, counts what it folded, never skips silently."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qanac.diagnostics import UnsupportedModelError
from qanac.targets import CANONICALIZE
from qanac.testing import apply_pass, assert_outputs_equal, ops, parse, random_inputs, verify_pipeline

SCALED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y)
<float[4] w = {1.0, 2.0, 3.0, 4.0}>
{
  [half] h = Constant <value = float {0.5}> ()
  [scale] s = Mul(w, h)
  [offset] o = Sqrt(s)
  [apply] m = Mul(x, s)
  [shift] y = Add(m, o)
}
"""


def test_constant_subgraph_becomes_initializers():
    model = parse(SCALED)
    compiled, result = apply_pass(model, "fold-constants")
    assert result.counts == {"constant-node-to-initializer": 1, "fold-node": 2}
    assert ops(compiled) == ["Mul", "Add"]
    assert all(isinstance(n.inputs[1], gs.Constant) for n in compiled.graph.nodes)
    assert_outputs_equal(model, compiled, random_inputs(model))
    _, again = apply_pass(compiled, "fold-constants")
    assert not again.changed


FLATTEN_BY_BATCH = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,4,4] x) => (float[N,48] y{outputs}) {{
      zero = Constant <value = int64[1] {{0}}> ()
      one = Constant <value = int64[1] {{1}}> ()
      four = Constant <value = int64[1] {{4}}> ()
      [shape] s = Shape(x)
      [batch] n = Gather <axis = 0> (s, zero)
      [rest] chw = Slice(s, one, four)
      [size] c = ReduceProd <keepdims = 1> (chw)
      [target] t = Concat <axis = 0> (n, c)
      [flatten] y = Reshape(x, t)
    }}
    """


def test_shape_queries_over_static_dimensions_fold_and_the_batch_stays_dynamic():
    # the computed target is also a graph output, so its computation stays
    model = parse(FLATTEN_BY_BATCH.format(outputs=", int64[2] t"))
    compiled, result = apply_pass(model, "fold-constants")
    # Shape->Slice over the static C, H, W folds (leaving its two Constant nodes unused), and so does
    # the ReduceProd of it; the batch cannot; the Reshape gets the constant target [-1, 48]
    assert result.counts == {
        "fold-reshape-shape": 1,
        "fold-shape-query": 1,
        "remove-unused-node": 2,
        "constant-node-to-initializer": 1,
        "fold-node": 1,
    }
    assert sorted(ops(compiled)) == ["Concat", "Gather", "Reshape", "Shape"]
    assert_outputs_equal(model, compiled, random_inputs(model))


def test_a_reshape_target_computed_from_the_batch_becomes_a_constant():
    # PyTorch's x.view(x.size(0), -1) with a dynamic batch: the whole shape computation goes
    model = parse(FLATTEN_BY_BATCH.format(outputs=""))
    compiled, result = apply_pass(model, "fold-constants")
    assert result.counts == {"fold-reshape-shape": 1, "remove-unused-node": 8}
    assert ops(compiled) == ["Reshape"]
    assert compiled.graph.nodes[0].inputs[1].values.tolist() == [-1, 48]
    assert_outputs_equal(model, compiled, random_inputs(model, batch=3))


def test_a_reshape_whose_output_is_not_static_after_the_batch_keeps_its_target():
    text = FLATTEN_BY_BATCH.format(outputs="").replace("float[N,48] y", "float[N,?] y")
    compiled, result = apply_pass(parse(text), "fold-constants")
    assert "fold-reshape-shape" not in result.counts and "Shape" in ops(compiled)


def test_constant_graph_output_keeps_its_constant_node():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2] x) => (float[N,2] y, float[2] bias) {
          [b] b = Constant <value = float[2] {1.0, 2.0}> ()
          [double] bias = Add(b, b)
          y = Add(x, bias)
        }
        """
    )
    compiled, result = apply_pass(model, "fold-constants")
    # Constant 'b' is lowered, the Add folded, and the graph output 'bias' gets a Constant node
    assert result.counts == {"constant-node-to-initializer": 1, "fold-node": 1}
    assert ops(compiled) == ["Constant", "Add"]
    assert compiled.graph.nodes[0].name == "double::fold-constants"
    assert_outputs_equal(model, compiled, random_inputs(model))
    _, again = apply_pass(compiled, "fold-constants")
    assert not again.changed


def test_random_and_quantization_nodes_are_never_folded():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y, float[4] noise) {
          w = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
          scale = Constant <value = float {0.1}> ()
          zp = Constant <value = uint8 {0}> ()
          q = QuantizeLinear(w, scale, zp)
          dq = DequantizeLinear(q, scale, zp)
          noise = RandomNormalLike(w)
          y = Mul(x, dq)
        }
        """
    )
    compiled, result = apply_pass(model, "fold-constants")
    assert result.counts == {"constant-node-to-initializer": 3}
    assert sorted(ops(compiled)) == ["DequantizeLinear", "Mul", "QuantizeLinear", "RandomNormalLike"]


def test_a_constant_node_onnx_runtime_cannot_evaluate_is_named():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y) {
          w = Constant <value = float[6] {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}> ()
          shape = Constant <value = int64[1] {4}> ()
          [bad_reshape] r = Reshape(w, shape)
          y = Mul(x, r)
        }
        """
    )
    with pytest.raises(UnsupportedModelError, match="at node 'bad_reshape' \\(Reshape\\)") as caught:
        apply_pass(model, "fold-constants")
    assert caught.value.diagnostics[0].nodes == ["bad_reshape"]


def test_nothing_to_fold_is_no_change():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y) { y = Relu(x) }
        """
    )
    _, result = apply_pass(model, "fold-constants")
    assert not result.changed


def test_folding_in_the_pipeline_with_verify_each():
    model = parse(SCALED)
    compiled, report = verify_pipeline(model, list(CANONICALIZE), random_inputs(model))
    assert report.totals()["fold-constants"]["counts"] == {"constant-node-to-initializer": 1, "fold-node": 2}
    assert ops(compiled) == ["Mul", "Add"]


def test_a_fold_graphsurgeon_skips_silently_is_an_error(monkeypatch):
    monkeypatch.setattr(gs.Graph, "fold_constants", lambda self, **kwargs: self)
    with pytest.raises(UnsupportedModelError, match="3 constant node\\(s\\) were not folded") as caught:
        apply_pass(parse(SCALED), "fold-constants")
    assert sorted(d.nodes[0] for d in caught.value.diagnostics) == ["half", "offset", "scale"]


def test_a_torch_view_before_the_classifier_leaves_no_shape_computation():
    # the model's only dynamic-shape computation (x.view(x.size(0), -1)) feeds the classifier's Reshape;
    # after canonicalization no tensor but the float activations is left to cross a segment boundary
    torch = pytest.importorskip("torch")
    import io

    import onnx

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 6 * 6, 5)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            return self.fc(x.view(x.size(0), -1))

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(Net().eval(), torch.zeros(1, 3, 6, 6), buffer, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=17, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    assert {"Shape", "Gather", "Concat"} <= set(ops(model))
    compiled, report = verify_pipeline(model, list(CANONICALIZE), random_inputs(model, batch=3))
    assert ops(compiled) == ["Conv", "Relu", "Flatten", "Gemm"]
    assert report.totals()["fold-constants"]["counts"]["fold-reshape-shape"] == 1
    variables = [t for t in compiled.graph.tensors().values() if isinstance(t, gs.Variable)]
    assert all(t.dtype == np.float32 for t in variables)
    assert_outputs_equal(model, compiled, random_inputs(model, batch=2, seed=4))
