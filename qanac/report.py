"""Human-readable compile reports (the text ``qanac compile`` prints)."""

from __future__ import annotations

from typing import Any

from qanac.compiler import CompileResult


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
    manifest, report = result.manifest, result.report
    model = report["model"]
    lines = [
        f"bundle      {result.output}",
        f"target      {manifest['target']}" + (f" (device {manifest['device']})" if manifest.get("device") else ""),
        f"model       {model['parameters']:,} parameters, {model['macs']:,} MACs/sample, "
        f"{sum(model['ops'].values())} nodes",
        f"calibration {manifest['calibration']['num_samples']} samples from {manifest['calibration']['source']}",
    ]
    if manifest["calibration"].get("warning"):
        lines.append(f"WARNING     {manifest['calibration']['warning']}")
    if manifest.get("post_processing"):
        steps = ", ".join(f"{s['op']} on {s['output']}" for s in manifest["post_processing"])
        lines.append(f"host post-processing: {steps}")
    lines.append(f"pipeline    {len(result.pipeline.pipeline)} passes, {result.pipeline.iterations} sweep(s):")
    lines += format_pass_table(totals, time_passes)
    backend_text = report["backend"].get("text")
    if backend_text:
        lines.append(backend_text)
    for d in report["diagnostics"]:
        lines.append(("  " if d["level"] == "info" else "") + f"{d['level']}: {d['code']}: {d['message']}")
    seconds = result.seconds
    lines.append(
        "time        " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
    )
    return "\n".join(lines)
