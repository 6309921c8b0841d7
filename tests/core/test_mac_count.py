"""One MAC count, the user's: inspect, the compile report and the manifest agree; rewrites that add MACs are
reported per pass and add nothing to the shares; a share below 1 never prints as 100.0 %; compile warns
when less than 90 % of the source's MACs run on the device hardware, and only then."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from qanac import compiler, model_summary, registry
from qanac.backend import EmitResult
from qanac.cli import cli
from qanac.compiler import GROWTH_WARNING_SHARE, CompileRequest
from qanac.graph import derived_name
from qanac.model_summary import format_macs, format_share, macs_by_node, source_macs_by_segment, summarize
from qanac.partition import DEVICE, HOST, plan_segments
from qanac.registry import PassResult, register_pass
from qanac.report import format_compile_result, format_mac_growth, format_segments
from qanac.targets import CANONICALIZE


def regnet_like(width: int = 64, group_width: int = 16, size: int = 32) -> onnx.ModelProto:
    """A RegNet-X style block: stem 3x3/2, 1x1 expand, 3x3 grouped conv (groups of ``group_width``
    channels), 1x1 project, GAP, Gemm; ReLUs after the convs; random weights, 1x3xSIZExSIZE."""

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def conv(name: str, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> str:
        w = rng.normal(0, (2.0 / (cin // group * k * k)) ** 0.5, (cout, cin // group, k, k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        nodes.append(helper.make_node("Conv", [x, f"{name}_w"], [name], name=name, kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4, group=group))
        nodes.append(helper.make_node("Relu", [name], [f"{name}_r"], name=f"{name}_relu"))
        return f"{name}_r"

    x = conv("stem", "x", 3, 32, 3, stride=2)
    x = conv("expand", x, 32, width, 1)
    x = conv("grouped", x, width, width, 3, group=width // group_width)
    x = conv("project", x, width, width, 1)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.2, (10, width)).astype(np.float32), "fc_w"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "regnet_like",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_inspect_the_compile_report_and_the_manifest_count_the_same_macs(small_model_path, small_calib_path,
                                                                          tmp_path):
    runner = CliRunner()
    inspected = runner.invoke(cli, ["inspect", str(small_model_path), "--json"])
    assert inspected.exit_code == 0, inspected.output
    macs = json.loads(inspected.output)["macs"]
    compiled = runner.invoke(cli, ["compile", str(small_model_path), "--target", "onnxruntime", "-o",
                                   str(tmp_path / "bundle"), "--calib", str(small_calib_path), "--json"])
    assert compiled.exit_code == 0, compiled.output
    result = json.loads(compiled.output)
    partition = result["manifest"]["partition"]
    assert macs > 0 and result["report"]["model"]["macs"] == partition["total_macs"] == macs
    assert sum(s["source_macs"] for s in result["manifest"]["segments"]) == macs
    assert partition["device_macs"] == macs and partition["device_mac_share"] == 1.0  # all on the "device"


def test_grouped_conv_growth_is_reported_per_pass_and_not_counted_as_the_users(tmp_path):
    model = regnet_like()
    path = tmp_path / "regnet.onnx"
    onnx.save(model, str(path))
    source = summarize(model).macs
    grouped = macs_by_node(model)["grouped"]  # 16x16 outputs x 64 channels x (16 inputs x 3x3)
    assert grouped == 16 * 16 * 64 * 16 * 9

    prepared = compiler.prepare_model(CompileRequest(source=str(path), target="akida", output=tmp_path / "out"))
    account = prepared.macs
    assert account.total == source  # the user's count is the source's, as inspect counts it
    assert account.growth["grouped-conv-to-dense"] == 3 * grouped  # 4 groups made one dense conv: 4x
    assert account.legalized == source + sum(account.growth.values())
    assert account.legalized == sum(macs_by_node(prepared.model.to_onnx()).values())
    warnings = [d for d in prepared.context.diagnostics if d.code == "MAC001"]
    assert [d.pass_name for d in warnings] == ["grouped-conv-to-dense"]  # +170 %; the others stay below 25 %
    assert all(added <= GROWTH_WARNING_SHARE * source for name, added in account.growth.items()
               if name != "grouped-conv-to-dense")
    lines = format_mac_growth({"mac_growth": account.growth, "legalized_macs": account.legalized})
    assert f"grouped-conv-to-dense: +{format_macs(3 * grouped)} MACs" in "\n".join(lines)

    # the dense conv on the host: its segment holds the grouped conv's source MACs, not the dense conv's
    legalized = prepared.model.to_onnx()
    dense = next(n.name for n in legalized.graph.node if n.name.startswith("grouped::"))
    plan = plan_segments(legalized, {dense: "test"}, min_device_share=0.0)
    per_segment = source_macs_by_segment(account.source, plan.macs_by_node, [s.nodes for s in plan.segments])
    host = [m for m, s in zip(per_segment, plan.segments, strict=True) if s.kind == HOST]
    assert host == [grouped] and sum(per_segment) == source
    assert plan.segments[[s.kind for s in plan.segments].index(HOST)].macs == 4 * grouped


def test_source_macs_follow_derived_names_and_sum_to_the_source():
    source = {"a": 100, "b": 50, "gone": 30, "relu": 0}
    legalized = {"a::split:0": 150, "a::split:1": 50, "b": 50, "new::pad": 10, "relu": 0}
    segments = [["a::split:0", "relu"], ["a::split:1", "new::pad"], ["b"]]
    # a's 100 split 3:1; b stays; "gone" has no heir: its 30 go where the MACs without a source are (new::pad)
    assert source_macs_by_segment(source, legalized, segments) == [75, 25 + 30, 50]


@pytest.mark.parametrize("share, text", [(1.0, "100.0 %"), (0.9996, "99.9 %"), (0.99999, "99.9 %"),
                                         (0.8849, "88.4 %"), (0.0, "0.0 %")])
def test_a_share_below_one_never_prints_as_100_percent(share, text):
    assert format_share(share) == text


def test_a_split_model_summary_does_not_round_up_to_the_whole_model(small_model_path, small_calib_path, tmp_path):
    request = CompileRequest(source=str(small_model_path), target="onnxruntime", output=tmp_path / "bundle",
                             calibration=str(small_calib_path), min_device_share=0.0)
    prepared = compiler.prepare_model(request)
    linted = compiler.lint_prepared(request, prepared)
    stage = tmp_path / "stage"
    stage.mkdir()
    emitted = compiler.emit_segments(linted.model, {"fc": "TEST001 on the host"}, prepared.calibration,
                                     prepared.target.load_backend(), request, stage)
    partition = compiler.partition_record(emitted, prepared.macs)
    assert 0.99 < partition.device_mac_share < 1.0  # the Gemm's 40 of 13,864 MACs run on the host
    assert partition.device_macs / partition.total_macs == partition.device_mac_share
    text = format_segments("onnxruntime", emitted, partition)
    assert "99.7 % of the model's MACs on the device hardware" in text and "100.0 %" not in text


def compile_with_host_nodes(small_model_path, small_calib_path, tmp_path, host_nodes):
    """Compile the small model for onnxruntime with the nodes of ``host_nodes`` (op type -> reason) on the
    host; the assembled bundle and the compile output."""

    request = CompileRequest(source=str(small_model_path), target="onnxruntime", output=tmp_path / "bundle",
                             calibration=str(small_calib_path), min_device_share=0.0)
    prepared = compiler.prepare_model(request)
    linted = compiler.lint_prepared(request, prepared)
    stage = tmp_path / "stage"
    stage.mkdir()
    backend = prepared.target.load_backend()
    by_op = {n.op_type: n.name for n in linted.model.graph.node}
    host_nodes = {by_op[op]: reason for op, reason in host_nodes.items()}
    emitted = compiler.emit_segments(linted.model, host_nodes, prepared.calibration, backend, request, stage)
    assembled = compiler.assemble_bundle(request, prepared, linted, emitted, backend, {"total": 1.0}, stage)
    assembled.write(stage)
    result = compiler.CompileResult(stage, assembled.manifest.to_dict(), assembled.report, prepared.pipeline,
                                    {"total": 1.0}, bundle_manifest=assembled.manifest)
    return assembled, format_compile_result(result)


def test_compile_warns_when_less_than_90_percent_run_on_the_device(small_model_path, small_calib_path, tmp_path):
    assembled, text = compile_with_host_nodes(small_model_path, small_calib_path, tmp_path,
                                              {"Conv": "TEST001 the conv stays off the device"})
    partition = assembled.manifest.partition
    assert partition.device_mac_share < 0.01 and [s.kind for s in assembled.manifest.segments][0] == HOST
    warning = assembled.report["device_share_warning"]
    assert warning.startswith("only 0.2 % of the model's 13.9 k MACs run on the onnxruntime device hardware")
    assert "PART001 on the host: TEST001 the conv stays off the device" in warning
    assert text.splitlines()[-1] == f"WARNING     {warning}"  # the last line of the compile output


def test_no_device_share_warning_when_the_model_runs_on_the_device(small_model_path, small_calib_path, tmp_path):
    assembled, text = compile_with_host_nodes(small_model_path, small_calib_path, tmp_path, {})
    assert [s.kind for s in assembled.manifest.segments] == [DEVICE]
    assert assembled.manifest.partition.device_mac_share == 1.0
    assert assembled.report["device_share_warning"] is None and "WARNING" not in text
    assert "on device   100.0 % of the model's 13.9 k MACs run on the device hardware" in text


@pytest.fixture
def widening_pass():
    """Pass ``test-widen-kernel``: each 3x3 Conv (pads 1) becomes the same Conv with a zero-bordered 5x5
    kernel (pads 2), exact and 25/9 of its MACs, as a legalization growing the model would."""

    registry.load_builtin_passes()
    before = dict(registry._REGISTRY)

    @register_pass("test-widen-kernel")
    def widen(model, ctx) -> PassResult:
        """Zero-border every 3x3 Conv kernel to 5x5 (test only)."""

        result = PassResult()
        for node in model.graph.nodes:
            if node.op == "Conv" and tuple(node.inputs[1].values.shape[2:]) == (3, 3):
                weights = np.pad(node.inputs[1].values, ((0, 0), (0, 0), (1, 1), (1, 1)))
                node.name = derived_name(node.name, "test-widen-kernel")
                node.inputs[1] = gs.Constant(f"{node.name}/weight", weights)
                node.attrs.update(kernel_shape=[5, 5], pads=[2, 2, 2, 2])
                result.count("widen")
        return result

    yield "test-widen-kernel"
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


class WideKernelsInSoftware:
    """A backend that runs every 5x5 Conv in its software fallback (its hardware share is the rest)."""

    variants = ()

    def emit(self, model: onnx.ModelProto, data, options, folder) -> EmitResult:
        macs = macs_by_node(model)
        wide = sum(macs[n.name] for n in model.graph.node if n.op_type == "Conv"
                   and onnx.numpy_helper.to_array(next(i for i in model.graph.initializer
                                                       if i.name == n.input[1])).shape[2:] == (5, 5))
        (folder / "model.bin").write_bytes(b"compiled")
        total = sum(macs.values())
        return EmitResult(files={"compiled": "model.bin"}, hardware_mac_share=1 - wide / total if total else 1.0)


def compile_both_ways(widening_pass, small_model_path, small_calib_path, tmp_path, backend):
    request = CompileRequest(source=str(small_model_path), target="onnxruntime", output=tmp_path / "bundle",
                             calibration=str(small_calib_path), pipeline=[*CANONICALIZE, widening_pass])
    source = compiler.import_source(request)
    prepared = compiler.run_target_pipeline(request, source)
    linted = compiler.lint_prepared(request, prepared)
    stage = tmp_path / "stage"
    stage.mkdir()
    emitted = compiler.emit_segments(linted.model, linted.host_nodes, prepared.calibration, backend, request, stage)
    return prepared, compiler.weigh_mac_growth(request, source, prepared, linted, emitted, backend, stage), stage


def test_a_growth_over_a_quarter_is_weighed_against_compiling_without_it(widening_pass, small_model_path,
                                                                         small_calib_path, tmp_path):
    grown, (prepared, linted, emitted), stage = compile_both_ways(widening_pass, small_model_path,
                                                                  small_calib_path, tmp_path, WideKernelsInSoftware())
    assert grown.macs.growth == {widening_pass: 16 * 13_824 // 9}  # the 3x3 conv's 13,824 MACs, now 5x5
    # with the wide kernel most MACs run in software; without the pass none: the compile without it is kept
    assert prepared is not grown and prepared.macs.growth == {} and emitted.plan.total_macs == 13_864
    choice = [d for d in prepared.context.diagnostics if d.code == "MAC002"]
    assert len(choice) == 1 and choice[0].message == (
        f"compiled without the rewrites: without '{widening_pass}' (+24.6 k MACs), 0 MACs run off the device "
        "hardware, with them 38.4 k")  # the 5x5 conv, in software
    assert sorted(p.name for p in stage.iterdir()) == ["model.bin"]  # the kept compile's files only
    partition = compiler.partition_record(emitted, prepared.macs)
    assert partition.device_mac_share == 1.0 and partition.total_macs == grown.macs.total


def test_the_grown_compile_is_kept_when_it_runs_no_more_off_the_device(widening_pass, small_model_path,
                                                                       small_calib_path, tmp_path):
    grown, (prepared, _, emitted), stage = compile_both_ways(
        widening_pass, small_model_path, small_calib_path, tmp_path, compiler.get_target("onnxruntime").load_backend())
    assert prepared is grown and emitted.plan.total_macs == 13_864 + 16 * 13_824 // 9
    assert [d.message for d in prepared.context.diagnostics if d.code == "MAC002"] == [
        f"kept the rewrites: with '{widening_pass}' (+24.6 k MACs), no MACs run off the device hardware"]
    assert not (stage / ".without-growth").exists()


def test_shapes_for_counting_come_from_a_skeleton_without_weight_data():
    # weights reach shape inference as typed inputs (no data copied); a Reshape's integer target keeps its
    # value, so the shapes after it, and the Gemm MACs they give, are those of the full model
    model = regnet_like()
    head = model.graph.node[-1]
    assert head.op_type == "Gemm"
    flat = head.input[0]
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape"))
    model.graph.node.insert(len(model.graph.node) - 1,
                            helper.make_node("Reshape", [flat, "flat_shape"], ["flat_reshaped"], name="reshape"))
    head.input[0] = "flat_reshaped"
    skeleton = model_summary.shape_skeleton(model)
    kept = {i.name for i in skeleton.graph.initializer}
    large = {i.name for i in model.graph.initializer if np.prod(i.dims) > model_summary.SKELETON_MIN_ELEMENTS}
    assert large and not kept & large and "flat_shape" in kept
    assert large <= {i.name for i in skeleton.graph.input}
    full = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in full.graph.value_info}
    assert model_summary.infer_shapes(model)["flat_reshaped"] == shapes["flat_reshaped"]
    assert macs_by_node(model)[head.name] > 0
