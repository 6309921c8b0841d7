"""How the pass pipeline's cost grows with the model: pipeline wall time against the time inside passes.

Builds two families of nets in code with onnx.helper, at several sizes (in nodes):

- chain: ``Conv 3x3 -> BatchNormalization -> Relu`` repeated (3 nodes a layer);
- residual: ``Conv-BN-Relu-Conv-BN``, ``Add`` with the block input, ``Relu`` repeated (7 nodes a block).

Every BatchNormalization reads the same four parameter initializers, as exporters that deduplicate equal
constants produce. Each net goes through ``run_pipeline`` with a target's pipeline (akida unless
``--target`` says otherwise) and random calibration data (as ``qanac compile --calib random`` does). A
first run on a tiny net, not shown, absorbs what the passes import on first use (the akida pipeline's
rule table imports quantizeml, and through it TensorFlow). Per size the table shows the nodes, the
pipeline's wall time, the time inside passes (the sum of ``PassRecord.seconds``) and their ratio; per
family, the growth exponent ``k`` of ``pipeline seconds ~ nodes^k`` fitted by least squares on
log-log. ``--resnet18`` adds torchvision's ResNet-18 (random weights, 1x3x64x64, exported through
qanac's torch frontend; needs torch and torchvision).

    python bench/pipeline_scaling.py [--quick] [--sizes 50,200,800] [--families chain,residual]
                                     [--target akida] [--repeats 1] [--resnet18]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZES = (50, 100, 200, 400, 800, 1600, 3200)
QUICK_SIZES = (50, 100, 200)
CHANNELS = 8
SPATIAL = 8
CALIBRATION_SAMPLES = 32


def _conv(prefix: str, x: str, inits: list[onnx.TensorProto], rng: np.random.Generator) -> onnx.NodeProto:
    weight = rng.standard_normal((CHANNELS, CHANNELS, 3, 3)).astype(np.float32) * 0.2
    inits.append(numpy_helper.from_array(weight, f"{prefix}.weight"))
    return helper.make_node("Conv", [x, f"{prefix}.weight"], [f"{prefix}.out"], name=prefix, pads=[1, 1, 1, 1])


def _bn(prefix: str, x: str) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization", [x, "bn.scale", "bn.bias", "bn.mean", "bn.var"], [f"{prefix}.out"], name=prefix
    )


def _shared_bn_parameters() -> list[onnx.TensorProto]:
    ones, zeros = np.ones(CHANNELS, np.float32), np.zeros(CHANNELS, np.float32)
    return [
        numpy_helper.from_array(ones, "bn.scale"),
        numpy_helper.from_array(zeros, "bn.bias"),
        numpy_helper.from_array(zeros, "bn.mean"),
        numpy_helper.from_array(ones, "bn.var"),
    ]


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], last: str, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, CHANNELS, SPATIAL, SPATIAL])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, CHANNELS, SPATIAL, SPATIAL])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def chain_net(num_nodes: int, seed: int = 0) -> onnx.ModelProto:
    """``num_nodes // 3`` (at least 1) Conv-BN-Relu layers."""

    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits = _shared_bn_parameters()
    x = "input"
    for i in range(max(1, num_nodes // 3)):
        conv = _conv(f"conv{i}", x, inits, rng)
        bn = _bn(f"bn{i}", conv.output[0])
        relu = helper.make_node("Relu", [bn.output[0]], [f"relu{i}.out"], name=f"relu{i}")
        nodes += [conv, bn, relu]
        x = relu.output[0]
    return _model(nodes, inits, x, "chain")


def residual_net(num_nodes: int, seed: int = 0) -> onnx.ModelProto:
    """``num_nodes // 7`` (at least 1) residual blocks Conv-BN-Relu-Conv-BN + input, Relu."""

    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits = _shared_bn_parameters()
    x = "input"
    for i in range(max(1, num_nodes // 7)):
        conv_a = _conv(f"block{i}.conv_a", x, inits, rng)
        bn_a = _bn(f"block{i}.bn_a", conv_a.output[0])
        relu_a = helper.make_node("Relu", [bn_a.output[0]], [f"block{i}.relu_a.out"], name=f"block{i}.relu_a")
        conv_b = _conv(f"block{i}.conv_b", relu_a.output[0], inits, rng)
        bn_b = _bn(f"block{i}.bn_b", conv_b.output[0])
        add = helper.make_node("Add", [bn_b.output[0], x], [f"block{i}.add.out"], name=f"block{i}.add")
        relu = helper.make_node("Relu", [add.output[0]], [f"block{i}.relu.out"], name=f"block{i}.relu")
        nodes += [conv_a, bn_a, relu_a, conv_b, bn_b, add, relu]
        x = relu.output[0]
    return _model(nodes, inits, x, "residual")


FAMILIES: dict[str, Callable[[int], onnx.ModelProto]] = {"chain": chain_net, "residual": residual_net}


def resnet18_model() -> onnx.ModelProto:
    """torchvision ResNet-18 with random weights at 1x3x64x64, through qanac's torch frontend."""

    import torch

    from qanac.frontends import import_model

    torch.manual_seed(0)
    return import_model("torchvision.models:resnet18", "1,3,64,64").model


def measure(model: onnx.ModelProto, repeats: int = 1, target: str = "akida") -> dict[str, float]:
    """Best-of-``repeats`` pipeline and in-pass seconds for ``model`` through ``target``'s pipeline."""

    from qanac.calibration import load_data
    from qanac.graph import CompilationModel, input_specs
    from qanac.pipeline import PassContext, run_pipeline
    from qanac.registry import load_passes
    from qanac.targets import get_target

    load_passes()
    pipeline = list(get_target(target).pipeline)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibration = load_data("random", input_specs(model), num_random=CALIBRATION_SAMPLES)
    best: dict[str, float] | None = None
    for _ in range(repeats):
        compilation = CompilationModel.from_onnx(model)
        ctx = PassContext(target=target, calibration=calibration)
        started = time.perf_counter()
        report = run_pipeline(compilation, pipeline, ctx)
        total = time.perf_counter() - started
        inside = sum(r.seconds for r in report.records)
        if best is None or total < best["pipeline"]:
            best = {"nodes": len(model.graph.node), "pipeline": total, "passes": inside, "ratio": total / inside}
    assert best is not None
    return best


def growth_exponent(rows: list[dict[str, float]], key: str = "pipeline") -> float | None:
    """Slope of log(``key``) against log(nodes), least squares; None with fewer than two sizes."""

    if len({r["nodes"] for r in rows}) < 2:
        return None
    x = np.log([r["nodes"] for r in rows])
    y = np.log([max(r[key], 1e-9) for r in rows])
    return float(np.polyfit(x, y, 1)[0])


def format_rows(family: str, rows: list[dict[str, float]]) -> str:
    lines = [f"{family}", f"  {'nodes':>6}  {'pipeline s':>10}  {'in passes s':>11}  {'ratio':>6}"]
    for r in rows:
        lines.append(f"  {r['nodes']:>6}  {r['pipeline']:>10.3f}  {r['passes']:>11.3f}  {r['ratio']:>6.2f}")
    k, k_passes = growth_exponent(rows), growth_exponent(rows, "passes")
    if k is not None:
        lines.append(f"  growth exponent: pipeline n^{k:.2f}, in passes n^{k_passes:.2f}")
    return "\n".join(lines)


def run(sizes: list[int], families: list[str], repeats: int, target: str) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {}
    for family in families:
        rows = [measure(FAMILIES[family](n), repeats, target) for n in sizes]
        results[family] = rows
        print(format_rows(family, rows), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {','.join(map(str, QUICK_SIZES))} only")
    parser.add_argument("--sizes", help="comma-separated node counts (overrides --quick)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="chain, residual or both")
    parser.add_argument("--target", default="akida", help="whose pipeline to run (default akida)")
    parser.add_argument("--repeats", type=int, default=1, help="best of N runs per size")
    parser.add_argument("--resnet18", action="store_true", help="also torchvision ResNet-18 at 64x64")
    args = parser.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    measure(chain_net(12), target=args.target)  # first use imports what the passes need; not a row
    print(f"pipeline of target {args.target}; best of {args.repeats} run(s) per size", flush=True)
    run(sizes, families, args.repeats, args.target)
    if args.resnet18:
        row = measure(resnet18_model(), args.repeats, args.target)
        print(format_rows("resnet18 (1x3x64x64)", [row]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
