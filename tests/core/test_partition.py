"""Partition planning: placement, cut into single-tensor segments, small segments and multi-tensor runs
go to the host; the identity input layer is exact."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qanac.backends.akida.input_layer import with_identity_input_layer
from qanac.execution import run_onnx
from qanac.partition import DEVICE, HOST, extract_segment, plan_segments


def chain(gate: bool = True) -> onnx.ModelProto:
    """conv1 -> relu -> [gate: sigmoid -> mul] -> conv2 -> relu2 ; 1x4x8x8, every node named."""

    rng = np.random.default_rng(0)
    w = {k: rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32) for k in ("w1", "w2")}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
    ]
    if gate:
        nodes += [helper.make_node("Sigmoid", ["r1"], ["s"], name="sigmoid"),
                  helper.make_node("Mul", ["r1", "s"], ["m"], name="mul")]
    nodes += [helper.make_node("Conv", ["m" if gate else "r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c2"], ["y"], name="relu2")]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_no_host_nodes_is_one_device_segment():
    plan = plan_segments(chain(gate=False), {})
    assert [(s.kind, s.inputs, s.outputs) for s in plan.segments] == [(DEVICE, ["x"], ["y"])]
    assert plan.transfers == 0 and plan.device_macs == plan.total_macs > 0


def test_host_nodes_split_the_chain_with_single_tensor_boundaries():
    model = chain()
    plan = plan_segments(model, {"sigmoid": "AKD102", "mul": "AKD103"})
    assert [s.kind for s in plan.segments] == [DEVICE, HOST, DEVICE]
    assert [s.nodes for s in plan.segments] == [["conv1", "relu1"], ["sigmoid", "mul"], ["conv2", "relu2"]]
    assert plan.segments[0].outputs == ["r1"] and plan.segments[1].inputs == ["r1"] and plan.segments[2].inputs == ["m"]
    assert plan.transfers == 2
    # running the three extracted segments in order reproduces the model
    x = np.random.default_rng(1).normal(size=(2, 4, 8, 8)).astype(np.float32)
    tensors = {"x": x}
    for segment in plan.segments:
        outputs = run_onnx(extract_segment(model, segment), {n: tensors[n] for n in segment.inputs})
        tensors.update(zip(segment.outputs, outputs, strict=True))
    np.testing.assert_allclose(tensors["y"], run_onnx(model, {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_small_device_segments_join_the_host():
    plan = plan_segments(chain(), {"sigmoid": "AKD102", "mul": "AKD103"}, min_device_share=0.6)
    kinds = [s.kind for s in plan.segments]
    assert kinds.count(DEVICE) <= 1 and any(d.code == "PART002" for d in plan.diagnostics)


def test_a_run_with_two_outputs_keeps_its_largest_single_tensor_part():
    # only the Mul on the host: conv1/relu1's output then feeds the sigmoid on the device and the mul on
    # the host, and the device run {conv1, relu1, sigmoid} would need two output tensors; {conv1, relu1}
    # has one input and one output and holds the run's MACs, so only the sigmoid moves
    plan = plan_segments(chain(), {"mul": "AKD103"})
    assert [(s.kind, s.nodes) for s in plan.segments] == [
        (DEVICE, ["conv1", "relu1"]), (HOST, ["sigmoid", "mul"]), (DEVICE, ["conv2", "relu2"])]
    part003 = [d for d in plan.diagnostics if d.code == "PART003"]
    assert len(part003) == 1 and part003[0].nodes == ["sigmoid"]
    assert "from 'conv1' to 'relu1' has one of each and stays on the device" in part003[0].message


def test_the_part_with_most_macs_is_kept():
    # no gate, but relu1's output r1 is also a graph output: {conv1 .. relu2} writes r1 and y; the
    # single-tensor parts are conv1..relu1 (x -> r1) and conv2..relu2 (r1 -> y), with equal MACs: the
    # first found of the largest is kept, the other runs on the host
    model = chain(gate=False)
    model.graph.output.append(helper.make_tensor_value_info("r1", onnx.TensorProto.FLOAT, ["N", 4, 8, 8]))
    plan = plan_segments(model, {})
    assert [s.kind for s in plan.segments].count(DEVICE) == 1
    device = next(s for s in plan.segments if s.kind == DEVICE)
    assert len(device.inputs) == 1 and len(device.outputs) == 1 and device.macs * 2 == plan.total_macs


def test_identity_input_layer_is_exact_and_only_when_needed():
    # a depthwise first layer reads any channel count: nothing to add
    depthwise_first = chain(gate=False)
    conv1 = depthwise_first.graph.node[0]
    conv1.attribute.append(helper.make_attribute("group", 4))
    weights = next(i for i in depthwise_first.graph.initializer if i.name == "w1")
    weights.CopyFrom(numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w1"))
    same, inserted = with_identity_input_layer(depthwise_first)
    assert not inserted and same is depthwise_first
    # a standard conv over 4 channels would become an image input layer (1 or 3 channels only)
    wide, inserted = with_identity_input_layer(chain(gate=False))
    assert inserted and wide.graph.node[0].name.endswith("::identity-input")
    data = {"x": np.random.default_rng(3).normal(size=(2, 4, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run_onnx(wide, data)[0], run_onnx(chain(gate=False), data)[0], rtol=1e-6, atol=1e-6)
    two_readers = chain(gate=True)  # x feeds conv1 only; make relu1's output the input of a segment
    plan = plan_segments(two_readers, {"conv1": "test", "relu1": "test"}, min_device_share=0.0)
    segment = next(s for s in plan.segments if s.kind == DEVICE)
    sub = extract_segment(two_readers, segment)
    fixed, inserted = with_identity_input_layer(sub)
    assert inserted and [n.op_type for n in fixed.graph.node][0] == "Conv"
    assert sum(segment.inputs[0] in n.input for n in fixed.graph.node) == 1
    data = {segment.inputs[0]: np.random.default_rng(2).normal(size=(2, 4, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run_onnx(fixed, data)[0], run_onnx(sub, data)[0], rtol=1e-6, atol=1e-6)
