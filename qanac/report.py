"""Human-readable reports: what ``qanac compile`` prints, and the pass reference (docs/passes.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qanac.diagnostics import Diagnostic, format_grouped
from qanac.manifest import PartitionRecord
from qanac.model_summary import format_macs, format_share
from qanac.registry import PassInfo
from qanac.targets import all_targets

if TYPE_CHECKING:
    from qanac.compiler import CompileResult, EmittedPlan


def format_pass_table(totals: dict[str, dict[str, Any]], with_time: bool) -> list[str]:
    lines = []
    width = max((len(name) for name in totals), default=10)
    for name, info in totals.items():
        counts = ", ".join(f"{k} x{v}" for k, v in info["counts"].items()) or "-"
        timing = f"{info['seconds'] * 1000:9.1f} ms  " if with_time else ""
        kind = "" if info["exact"] else "  (approximate"
        if not info["exact"]:
            change = info.get("max_abs_change")
            kind += f", max output change {change:.4g})" if change is not None else ")"
        lines.append(f"  {name:<{width}}  {timing}{counts}{kind}")
    return lines


def format_compile_result(result: CompileResult, time_passes: bool = False) -> str:
    totals = result.pipeline.totals()
    if result.stopped_after is not None:
        lines = [f"stopped after pass '{result.stopped_after}'; model written to {result.output / 'model.onnx'}"]
        lines += format_pass_table(totals, time_passes)
        return "\n".join(lines)
    manifest, report = result.bundle_manifest, result.report
    model = report["model"]
    lines = [
        f"bundle      {result.output}",
        f"target      {manifest.target}" + (f" (device {manifest.device})" if manifest.device else ""),
        f"model       {format_macs(model['macs'])} MACs/sample ({model['macs']:,}); as compiled: "
        f"{sum(model['ops'].values())} nodes, {model['parameters']:,} parameters",
    ]
    lines += format_mac_growth(model)
    lines.append(f"calibration {manifest.calibration.num_samples} samples from {manifest.calibration.source}")
    if manifest.calibration.warning:
        lines.append(f"WARNING     {manifest.calibration.warning}")
    if manifest.post_processing:
        steps = ", ".join(f"{s.op} on {s.output}" for s in manifest.post_processing)
        lines.append(f"host post-processing: {steps}")
    lines.append(f"pipeline    {len(result.pipeline.pipeline)} passes, {result.pipeline.iterations} sweep(s):")
    lines += format_pass_table(totals, time_passes)
    if report.get("backend_summary"):
        lines.append(report["backend_summary"])
    partition = manifest.partition
    lines.append(f"on device   {format_share(partition.device_mac_share)} of the model's "
                 f"{format_macs(partition.total_macs)} MACs run on the device hardware")
    lines += format_grouped(Diagnostic.from_dict(d) for d in report["diagnostics"])
    seconds = result.seconds
    lines.append(
        "time        " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
    )
    if report.get("device_share_warning"):
        lines.append(f"WARNING     {report['device_share_warning']}")
    return "\n".join(lines)


def format_mac_growth(model: dict[str, Any]) -> list[str]:
    """The MACs each pass added to the source model's (the count every share is taken of), and the total
    compiled; nothing when legalization left the count as it was."""

    growth = {name: added for name, added in model.get("mac_growth", {}).items() if added}
    if not growth:
        return []
    lines = [f"            {name}: {'+' if added > 0 else '-'}{format_macs(abs(added))} MACs"
             for name, added in growth.items()]
    return lines + [f"            {format_macs(model['legalized_macs'])} MACs/sample as compiled; shares below are "
                    "of the source's MACs"]


def format_segments(target: str, emitted: EmittedPlan, partition: PartitionRecord) -> str:
    """What the backend made of the model: its summary for a one-segment bundle; otherwise the partition,
    then each segment (a host segment's nodes and MACs, a device segment's backend summary)."""

    only = emitted.segments[0].emitted if len(emitted.segments) == 1 else None
    if only is not None:
        return only.summary
    lines = [
        f"partition: {partition.segments} segments ({partition.device_segments} on {target}), "
        f"{partition.transfers} host<->device transfers, {format_share(partition.device_mac_share)} of the "
        f"model's MACs on the device hardware; {emitted.attempts} plan(s) tried, {emitted.backend_calls} device "
        "segment(s) compiled"
    ]
    for s in emitted.segments:
        nodes, macs = s.segment.nodes, s.segment.macs
        if s.emitted is None:
            lines.append(f"  {s.name} host (ONNX Runtime): {len(nodes)} nodes, {macs:,} MACs as compiled, "
                         f"'{nodes[0]}' .. '{nodes[-1]}'")
        else:
            lines.append(f"  {s.name} {target}: {len(nodes)} nodes, {macs:,} MACs as compiled\n"
                         + "\n".join("    " + line for line in s.emitted.summary.splitlines()))
    return "\n".join(lines)


def format_pass_reference(infos: list[PassInfo]) -> str:
    """The pass reference in Markdown, as docs/passes.md holds it (regenerate with `qanac passes --markdown`)."""

    lines = [
        "# Pass reference",
        "",
        "Generated by `qanac passes --markdown` from the pass registry; a test keeps this file in sync.",
        "Exact passes preserve outputs up to float rounding (`--verify-each` checks it); approximate passes run",
        "only when enabled with `--approx NAME` and are always reported with their measured deviation.",
        "",
        "## Pipelines",
        "",
    ]
    for target in all_targets().values():
        lines.append(f"- `{target.name}`: " + " -> ".join(f"`{p}`" for p in target.pipeline))
    lines.append("")
    for info in infos:
        kind = "exact" if info.exact else "approximate (opt-in)"
        lines += [f"## {info.name}", "", f"*{kind}; targets: {', '.join(sorted(info.targets))}*", ""]
        lines += [info.to_dict()["doc"], ""]
        if info.options:
            keys = ", ".join(f"`{key}`" for key in info.options)
            lines += [f"Options (`--pass-option {info.name}.KEY=VALUE`): {keys}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def format_rules_reference(target_name: str, rules) -> str:
    """A target's lint rules in Markdown (regenerate with `qanac rules TARGET --markdown`)."""

    lines = [
        "| code | level | rule | what the toolchain does | way out |",
        "|---|---|---|---|---|",
    ]
    for rule in rules:
        fix = rule.fix + (f" (pass `{rule.fixed_by}`)" if rule.fixed_by else "")
        lines.append(f"| {rule.code} | {rule.level.value} | {rule.title} | {rule.consequence} | {fix} |")
    return "\n".join(lines) + "\n"
