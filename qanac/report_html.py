"""report.html: a bundle as a page to look at, self-contained (inline CSS and SVG, nothing fetched).

The page shows the float reference model as a graph whose boxes are coloured by where each layer runs
(``PLACEMENTS``): in hardware on the device, in the device backend's software fallback, or in a host
segment; each box names the layer, its op, its MACs (``qanac.model_summary.macs_by_node``) and, when the
backend reports them, its processing units. Edges that cross segments are the transfers, drawn dashed and
listed. Then the segments, the passes that changed the model with their counts, the diagnostics grouped by
code, and, once ``qanac verify`` or ``qanac eval`` ran, their results (agreement per output, warnings,
confusion matrices).

Where a layer runs: a node belongs to the segment whose outputs it computes from that segment's inputs.
A device segment's backend may list its layers in its report (``report.json``: ``segments[i].backend``,
a ``layers`` list at its top or one record down), each with ``name``, ``backend`` (``Hardware`` or
``Software``), ``sequence`` and ``nps`` (processing units by type); a node without a layer of its name
runs where the node it reads from in the same segment runs (fused into that layer).

Everything is read from the bundle directory: the manifest, ``report.json``, ``reference.onnx``, the host
segments' models and ``results.json`` (what ``update_report`` recorded from verify and eval). Files are
read through the bundle's own checks (no link followed, size limits); both written files are replaced
atomically (a temporary file in the bundle, then a rename).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qanac import __version__
from qanac.atomic import replaced_atomically
from qanac.bundle import MAX_MANIFEST_BYTES, REPORT, Bundle, json_text, read_bundle_file
from qanac.diagnostics import UsageError
from qanac.execution import bundle_model_bytes
from qanac.graph import lookup_source, source_names_of
from qanac.manifest import HOST, REFERENCE_ROLE
from qanac.model_summary import format_macs, format_share, infer_shapes, macs_by_node

REPORT_HTML = "report.html"
RESULTS = "results.json"

HARDWARE, SOFTWARE, HOST_PLACEMENT, UNPLACED = "hardware", "software", "host", "unplaced"
# placement -> (legend text, fill colour)
PLACEMENTS = {
    HARDWARE: ("device, in a hardware sequence", "#2e7d32"),
    SOFTWARE: ("device, software fallback", "#ef6c00"),
    HOST_PLACEMENT: ("host segment (ONNX Runtime)", "#1565c0"),
    UNPLACED: ("in no segment", "#9e9e9e"),
}

BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN, SKIP_BULGE = 210, 42, 24, 34, 16, 18


@dataclasses.dataclass
class Layer:
    """One node of the reference model, where it runs, and its place in the drawing."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    segment: str | None = None
    placement: str = UNPLACED
    macs: int = 0
    units: dict[str, int] = dataclasses.field(default_factory=dict)
    sequence: str | None = None
    fused_into: str | None = None
    source: str = ""
    reason: str | None = None
    rank: int = 0
    x: float = 0.0
    y: float = 0.0


@dataclasses.dataclass
class Transfer:
    tensor: str
    source: str
    destination: str
    shape: list[int] | None

    @property
    def bytes(self) -> int | None:
        return None if self.shape is None else 4 * int(np.prod(self.shape))


@dataclasses.dataclass
class ReportData:
    manifest: dict[str, Any]
    report: dict[str, Any]
    results: dict[str, Any]
    layers: list[Layer]
    transfers: list[Transfer]
    sequences: list[dict[str, Any]]
    units: dict[str, dict[str, int]]  # segment -> processing units of all its backend's layers, by type


# -- reading ------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object the bundle holds besides its manifest, or {} when it is missing or not one."""

    if not path.is_file() or path.is_symlink():
        return {}
    try:
        data = json.loads(b"".join(read_bundle_file(path, path.name, MAX_MANIFEST_BYTES)))
    except (UsageError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _backend_layers(entry: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(layers, sequences) a device segment's backend report lists, at its top or one record down."""

    backend = entry.get("backend")
    if not isinstance(backend, dict):
        return [], []
    for record in [backend, *(v for v in backend.values() if isinstance(v, dict))]:
        layers = record.get("layers")
        if isinstance(layers, list) and all(isinstance(x, dict) and "name" in x for x in layers):
            sequences = record.get("sequences")
            return layers, sequences if isinstance(sequences, list) else []
    return [], []


def _segment_nodes(model: onnx.ModelProto, names: list[str], segments: list[dict[str, Any]]) -> dict[str, str]:
    """node name -> the segment that computes it: walking back from each segment's outputs to its inputs."""

    producer = {out: index for index, node in enumerate(model.graph.node) for out in node.output}
    owner: dict[str, str] = {}
    for segment in segments:
        stops = set(segment.get("inputs", []))
        pending = list(segment.get("outputs", []))
        seen: set[str] = set()
        while pending:
            tensor = pending.pop()
            if tensor in stops or tensor in seen or tensor not in producer:
                continue
            seen.add(tensor)
            index = producer[tensor]
            if names[index] in owner:
                continue
            owner[names[index]] = segment["name"]
            pending.extend(model.graph.node[index].input)
    return owner


def collect(bundle: Bundle) -> ReportData:
    """Everything the page shows, read from ``bundle``."""

    manifest = bundle.manifest.to_dict()
    report = _read_json(bundle.path / REPORT)
    results = _read_json(bundle.path / RESULTS)
    model = onnx.load_model_from_string(bundle_model_bytes(bundle.file(REFERENCE_ROLE)))
    names = [node.name or f"{node.op_type}_{i}" for i, node in enumerate(model.graph.node)]
    shapes = infer_shapes(model)
    macs = macs_by_node(model, shapes)
    sources = source_names_of(model)
    segments = manifest.get("segments", [])
    owner = _segment_nodes(model, names, segments)
    kinds = {s["name"]: s.get("kind") for s in segments}
    entries = {e.get("name"): e for e in report.get("segments", []) if isinstance(e, dict)}
    backend_layers: dict[str, dict[str, dict[str, Any]]] = {}
    sequences: list[dict[str, Any]] = []
    units: dict[str, dict[str, int]] = {}
    for segment in segments:
        found, found_sequences = _backend_layers(entries.get(segment["name"], {}))
        backend_layers[segment["name"]] = {str(x["name"]): x for x in found}
        totals = units.setdefault(segment["name"], {})
        for entry in found:
            for kind, count in (entry.get("nps") if isinstance(entry.get("nps"), dict) else {}).items():
                totals[str(kind)] = totals.get(str(kind), 0) + int(count)
        sequences += [{**s, "segment": segment["name"]} for s in found_sequences if isinstance(s, dict)]

    layers: list[Layer] = []
    by_tensor: dict[str, Layer] = {}
    for name, node in zip(names, model.graph.node, strict=True):
        layer = Layer(name=name, op=node.op_type, inputs=[i for i in node.input if i],
                      outputs=[o for o in node.output if o], macs=macs.get(name, 0),
                      source=lookup_source(sources, name), segment=owner.get(name))
        _place(layer, kinds.get(layer.segment), backend_layers.get(layer.segment or "", {}), by_tensor)
        layers.append(layer)
        by_tensor.update((o, layer) for o in layer.outputs)
    transfers = []
    seen: set[tuple[str, str]] = set()
    for layer in layers:
        for tensor in layer.inputs:
            producer = by_tensor.get(tensor)
            if producer is None or producer.segment == layer.segment or (tensor, layer.segment or "") in seen:
                continue
            seen.add((tensor, layer.segment or ""))
            transfers.append(Transfer(tensor, producer.segment or "-", layer.segment or "-", shapes.get(tensor)))
    _layout(layers, model)
    return ReportData(manifest, report, results, layers, transfers, sequences, units)


def _place(layer: Layer, kind: str | None, backend_layers: dict[str, dict[str, Any]],
           by_tensor: dict[str, Layer]) -> None:
    """Set where ``layer`` runs from its segment's kind and its backend's layer of its name, or else the
    placement of the layer it reads from in the same segment (which it is fused into)."""

    if kind is None:
        return
    if kind == HOST:
        layer.placement = HOST_PLACEMENT
        return
    entry = backend_layers.get(layer.name)
    if entry is not None:
        layer.placement = SOFTWARE if str(entry.get("backend", "")).lower() == "software" else HARDWARE
        units = entry.get("nps")
        layer.units = {str(k): int(v) for k, v in units.items()} if isinstance(units, dict) else {}
        layer.sequence = entry.get("sequence")
        layer.reason = entry.get("software_reason")
        return
    upstream = next((by_tensor[t] for t in layer.inputs if t in by_tensor and by_tensor[t].segment == layer.segment),
                    None)
    if upstream is not None and backend_layers:
        layer.placement = upstream.placement
        layer.sequence = upstream.sequence
        layer.fused_into = upstream.fused_into or upstream.name
        return
    layer.placement = HARDWARE


def _layout(layers: list[Layer], model: onnx.ModelProto) -> None:
    """A layered layout, top to bottom: a layer's row is one below the lowest row it reads from; within a
    row, layers are ordered by the mean column of what they read (one sweep), then placed side by side,
    each row centred."""

    producer: dict[str, Layer] = {}
    for layer in layers:  # ONNX nodes are in topological order
        parents = [producer[t] for t in layer.inputs if t in producer]
        layer.rank = 1 + max((p.rank for p in parents), default=0)
        producer.update((o, layer) for o in layer.outputs)
    rows: dict[int, list[Layer]] = {}
    for layer in layers:
        rows.setdefault(layer.rank, []).append(layer)
    column: dict[str, float] = {}
    for rank in sorted(rows):
        row = rows[rank]
        for index, layer in enumerate(row):
            parents = [column[producer[t].name] for t in layer.inputs if t in producer and producer[t].name in column]
            column[layer.name] = sum(parents) / len(parents) if parents else float(index)
        row.sort(key=lambda item: column[item.name])
        for index, layer in enumerate(row):
            column[layer.name] = index - (len(row) - 1) / 2
    widest = max((len(row) for row in rows.values()), default=1)
    centre = MARGIN + widest * (BOX_W + GAP_X) / 2
    for layer in layers:
        layer.x = centre + column[layer.name] * (BOX_W + GAP_X) - BOX_W / 2
        layer.y = MARGIN + (layer.rank - 1) * (BOX_H + GAP_Y)


# -- rendering ----------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return _e(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.{digits}f}"
    return _e(value)


def _units(units: dict[str, int]) -> str:
    return ", ".join(f"{n} {t}" for t, n in units.items())


def _short(text: str, limit: int = 30) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _short_name(name: str, limit: int = 30) -> str:
    """A node name that fits a box: its end, the most specific part of a framework's scoped name."""

    return name if len(name) <= limit else "\u2026" + name[-(limit - 1):]


def render_graph(layers: list[Layer]) -> str:
    """The model as inline SVG: one box per layer, edges between them, transfers dashed."""

    if not layers:
        return "<p>The reference model has no nodes.</p>"
    width = max(layer.x for layer in layers) + BOX_W + MARGIN
    height = max(layer.y for layer in layers) + BOX_H + MARGIN
    producer = {o: layer for layer in layers for o in layer.outputs}
    edges = []
    for layer in layers:
        for tensor in dict.fromkeys(layer.inputs):
            source = producer.get(tensor)
            if source is None:
                continue
            span = layer.rank - source.rank
            if span <= 1:  # to the next row: from the bottom of one box to the top of the other
                x1, y1 = source.x + BOX_W / 2, source.y + BOX_H
                x2, y2 = layer.x + BOX_W / 2, layer.y
                bend = max(GAP_Y / 2, (y2 - y1) / 3)
                route = f"M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2:.1f}"
            else:  # past the rows between: out of the right side, around the boxes, the farther the longer
                x1, y1 = source.x + BOX_W, source.y + BOX_H / 2
                x2, y2 = layer.x + BOX_W, layer.y + BOX_H / 2
                side = max(x1, x2) + SKIP_BULGE * min(span, 8)
                width = max(width, side + MARGIN)
                route = f"M{x1:.1f},{y1:.1f} C{side:.1f},{y1:.1f} {side:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
            crossing = source.segment != layer.segment
            edges.append(
                f'<path class="edge{" transfer" if crossing else ""}" d="{route}">'
                f"<title>{_e(tensor)}: {_e(source.segment)} \u2192 {_e(layer.segment)}</title></path>"
            )
    boxes = []
    for layer in layers:
        label, fill = PLACEMENTS[layer.placement]
        details = [layer.op]
        if layer.macs:
            details.append(f"{format_macs(layer.macs)} MACs")
        if layer.units:
            details.append(_units(layer.units))
        tip = [f"{layer.name} ({layer.op})", f"runs: {label}" + (f", segment {layer.segment}" if layer.segment else "")]
        if layer.sequence:
            tip.append(f"sequence {layer.sequence}")
        if layer.fused_into:
            tip.append(f"fused into {layer.fused_into}")
        if layer.source:
            tip.append(f"source: {layer.source}")
        tip.append(f"{layer.macs:,} MACs" + (f", {_units(layer.units)}" if layer.units else ""))
        if layer.reason:
            tip.append(f"in software because: {layer.reason}")
        detail = _short(" \u00b7 ".join(details), 34)
        boxes.append(
            f'<g class="layer" data-name="{_e(layer.name)}" data-placement="{layer.placement}" '
            f'data-segment="{_e(layer.segment or "")}" transform="translate({layer.x:.1f},{layer.y:.1f})">'
            f"<title>{_e(chr(10).join(tip))}</title>"
            f'<rect width="{BOX_W}" height="{BOX_H}" rx="6" fill="{fill}"/>'
            f'<text x="8" y="17" class="name">{_e(_short_name(layer.name))}</text>'
            f'<text x="8" y="33" class="detail">{_e(detail)}</text></g>'
        )
    return (f'<svg class="graph" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'role="img" aria-label="model graph">{"".join(edges)}{"".join(boxes)}</svg>')


def _table(header: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    head = "<thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def _summary(data: ReportData) -> str:
    m = data.manifest
    partition = m.get("partition", {})
    calibration = m.get("calibration", {})
    rows = [
        ["source", _e(m.get("source", {}).get("path", "?")) + f" ({_e(m.get('source', {}).get('framework', '?'))})"],
        ["target", _e(m.get("target")) + (f", device {_e(m['device'])}" if m.get("device") else "")],
        ["calibration", f"{_e(calibration.get('num_samples'))} samples from {_e(calibration.get('source'))}"],
    ]
    rows += [[_e(k.replace("_", " ")), _partition_value(k, v)] for k, v in partition.items()]
    rows.append(["layers", f"{len(data.layers)} nodes in the reference model, "
                           f"{format_macs(sum(layer.macs for layer in data.layers))} MACs per sample"])
    warnings = [w for w in (calibration.get("warning"), data.report.get("device_share_warning")) if w]
    banner = "".join(f'<p class="warning">{_e(w)}</p>' for w in warnings)
    return banner + _table(None, rows, "summary")


def _partition_value(key: str, value: Any) -> str:
    if isinstance(value, float) and "share" in key:
        return format_share(value)
    if isinstance(value, int) and "macs" in key:
        return f"{value:,} ({format_macs(value)})"
    if isinstance(value, dict):
        return _e(", ".join(f"{k}: {v}" for k, v in value.items()) or "-")
    return _number(value)


def _legend(layers: list[Layer]) -> str:
    counts = {key: sum(1 for layer in layers if layer.placement == key) for key in PLACEMENTS}
    items = [f'<span class="key"><span class="swatch" style="background:{fill}"></span>{_e(label)} '
             f"({counts[key]})</span>" for key, (label, fill) in PLACEMENTS.items() if counts[key]]
    return '<p class="legend">' + "".join(items) + '<span class="key"><span class="swatch dashed"></span>' \
        "transfer between segments</span></p>"


def _segments(data: ReportData) -> str:
    rows = []
    for s in data.manifest.get("segments", []):
        units = data.units.get(s["name"], {})
        where = "host (ONNX Runtime)" if s.get("kind") == HOST else f"{s.get('target')} {s.get('device') or ''}"
        rows.append([_e(s["name"]), _e(where), _e(s.get("nodes")), f"{s.get('macs', 0):,}", _e(_units(units) or "-"),
                     _e(", ".join(s.get("inputs", []))), _e(", ".join(s.get("outputs", [])))])
    text = _table(["segment", "runs on", "nodes", "MACs", "processing units", "reads", "writes"], rows)
    if data.sequences:
        seq_rows = [[_e(s.get("segment")), _e(s.get("name")), _e(s.get("backend")), _e(s.get("passes")),
                     _e(_units(s.get("nps") or {}) or "-"), _e(len(s.get("layers", [])))] for s in data.sequences]
        text += "<h3>Device sequences</h3>" + _table(["segment", "sequence", "backend", "passes", "processing units",
                                                      "layers"], seq_rows)
    if data.transfers:
        rows = [[_e(t.tensor), f"{_e(t.source)} \u2192 {_e(t.destination)}", _e(t.shape or "?"),
                 "?" if t.bytes is None else f"{t.bytes:,}"] for t in data.transfers]
        text += "<h3>Transfers</h3>" + _table(["tensor", "from \u2192 to", "shape", "bytes per sample (float32)"], rows)
    else:
        text += "<p>No transfers: the model runs in one segment.</p>"
    return text


def _passes(data: ReportData) -> str:
    applied = data.manifest.get("passes_applied", [])
    if not applied:
        return "<p>No pass changed the model.</p>"
    rows = []
    for p in applied:
        counts = ", ".join(f"{k} \u00d7{v}" for k, v in p.get("counts", {}).items())
        change = p.get("max_abs_change")
        kind = "exact" if p.get("exact", True) else "approximate" + (f", max output change {change:.3g}"
                                                                      if isinstance(change, float) else "")
        rows.append([_e(p.get("pass")), _e(counts or "-"), _e(sum(p.get("counts", {}).values())), _e(kind),
                     _number(p.get("seconds"), 3)])
    return _table(["pass", "rewrites", "count", "kind", "seconds"], rows)


def _diagnostics(data: ReportData) -> str:
    found = [d for d in data.report.get("diagnostics", []) if isinstance(d, dict)]
    if not found:
        return "<p>No diagnostics.</p>"
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for d in found:
        groups.setdefault((str(d.get("code")), str(d.get("level"))), []).append(d)
    parts = []
    for (code, level), items in groups.items():
        entries = "".join(
            f"<li>{_e(d.get('message'))}" + (f" <span class=\"nodes\">[{_e(', '.join(map(str, d['nodes'])))}]</span>"
                                              if d.get("nodes") else "")
            + (f"<br><em>hint: {_e(d['hint'])}</em>" if d.get("hint") else "") + "</li>" for d in items)
        first = _e(_short(str(items[0].get("message", "")), 120))
        parts.append(f'<details class="diag level-{_e(level)}"><summary><b>{_e(code)}</b> {_e(level)} '
                     f"\u00d7{len(items)}: {first}</summary><ul>{entries}</ul></details>")
    return "".join(parts)


def _verification(result: dict[str, Any]) -> str:
    verdict = "PASSED" if result.get("passed") else "FAILED"
    thresholds = result.get("thresholds", {})
    passing = result.get("passing_thresholds") or {}
    lines = [f'<p class="verdict {verdict.lower()}">{verdict} on {_e(result.get("samples"))} samples '
             f"(top-1 agreement \u2265 {_e(thresholds.get('min_top1_agreement'))}, SQNR \u2265 "
             f"{_e(thresholds.get('min_sqnr_db'))} dB)</p>"]
    if passing:
        lines.append(f"<p>Strictest thresholds that pass: top-1 agreement {_number(passing.get('min_top1_agreement'))}"
                     f", SQNR {_number(passing.get('min_sqnr_db'))} dB</p>")
    rows = []
    for model, comparisons in result.get("comparisons", {}).items():
        for c in comparisons:
            agreement = c.get("top1_agreement") if c.get("top1_agreement") is not None else c.get("cell_agreement")
            rows.append([_e(model), _e(c.get("name")), _e(c.get("kind", "")), _number(agreement),
                         _number(c.get("near_tie_share")), _number(c.get("decisive_agreement")),
                         _number(c.get("sqnr_db"), 2), _number(c.get("max_abs_error"))])
    lines.append(_table(["float vs", "output", "kind", "agreement (top-1 or per cell)", "near-tie share",
                         "decisive agreement", "SQNR dB", "max abs error"], rows))
    lines += [f'<p class="warning">{_e(w)}</p>' for w in result.get("warnings", [])]
    lines += [f'<p class="failure">{_e(f)}</p>' for f in result.get("failures", [])]
    if result.get("label_accuracy"):
        lines.append("<p>Accuracy on labels: " + ", ".join(
            f"{_e(k)} {_number(v)}" for k, v in result["label_accuracy"].items()) + "</p>")
    return "".join(lines)


def _confusion(matrix: list[list[int]], names: list[str], title: str) -> str:
    cells = np.asarray(matrix, dtype=np.float64)
    rows_sum = cells.sum(axis=1, keepdims=True)
    share = np.divide(cells, rows_sum, out=np.zeros_like(cells), where=rows_sum > 0)
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    body = ""
    for i, name in enumerate(names):
        tds = "".join(
            f'<td style="background:rgba(21,101,192,{share[i, j]:.3f});color:{"#fff" if share[i, j] > 0.5 else "#000"}"'
            f' title="true {_e(name)}, predicted {_e(names[j])}: {int(cells[i, j])}">{int(cells[i, j])}</td>'
            for j in range(len(names)))
        body += f"<tr><th>{_e(name)}</th>{tds}</tr>"
    return (f'<div class="confusion"><h4>{_e(title)}</h4><table class="matrix"><thead><tr><th>true \\ predicted</th>'
            f"{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _evaluation(result: dict[str, Any]) -> str:
    ref, comp = result.get("float", {}), result.get("compiled", {})
    rows = [[_e(key.replace("_", " ")), _number(ref.get(key)), _number(comp.get(key))]
            for key in ("top1", "macro_f1", "balanced_accuracy")]
    text = f"<p>{_e(result.get('samples'))} labelled samples from {_e(result.get('data'))}</p>"
    text += _table(["metric", "float", "compiled"], rows)
    for drop in result.get("recall_drops", []):
        text += (f"<p class=\"warning\">recall of class '{_e(drop.get('class'))}' drops by "
                 f"{_number(drop.get('drop'), 3)} after compilation</p>")
    names = ref.get("class_names") or []
    if ref.get("confusion_matrix") and comp.get("confusion_matrix"):
        text += '<div class="matrices">' + _confusion(ref["confusion_matrix"], names, "float reference") + \
            _confusion(comp["confusion_matrix"], names, "compiled") + "</div>"
    return text


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
header{background:#263238;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cfd8dc}main{padding:8px 24px 40px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:8px;padding:12px 16px;margin:14px 0}
h2{font-size:17px;margin:4px 0 10px}h3{font-size:15px;margin:14px 0 6px}h4{margin:6px 0}
table{border-collapse:collapse;margin:4px 0}td,th{border:1px solid #e0e0e0;padding:3px 8px;text-align:left;
vertical-align:top}thead th{background:#eceff1}table.summary td:first-child{font-weight:600;color:#455a64}
.graph-box{overflow:auto;max-height:80vh;border:1px solid #e0e0e0;border-radius:6px;background:#fff}
svg.graph .edge{fill:none;stroke:#90a4ae;stroke-width:1.4}
svg.graph .edge.transfer{stroke:#c62828;stroke-width:2.4;stroke-dasharray:6 4}
svg.graph text{fill:#fff;font:11px system-ui,sans-serif}svg.graph text.name{font-weight:600}
svg.graph .layer:hover rect{stroke:#000;stroke-width:2}
.legend .key{margin-right:18px;white-space:nowrap}.swatch{display:inline-block;width:14px;height:14px;
border-radius:3px;vertical-align:-2px;margin-right:5px}.swatch.dashed{height:0;border-top:3px dashed #c62828;
width:22px;border-radius:0;vertical-align:4px}
.warning{background:#fff3e0;border-left:4px solid #ef6c00;padding:6px 10px;margin:6px 0}
.failure{background:#ffebee;border-left:4px solid #c62828;padding:6px 10px;margin:6px 0}
.verdict{font-weight:700;font-size:15px}.verdict.passed{color:#2e7d32}.verdict.failed{color:#c62828}
details.diag{margin:4px 0}details.diag.level-error summary b{color:#c62828}
details.diag.level-warning summary b{color:#ef6c00}
.nodes{color:#546e7a;font-family:monospace}.matrices{display:flex;flex-wrap:wrap;gap:24px}
table.matrix td{text-align:right;min-width:28px}
"""


def render(data: ReportData) -> str:
    """The whole page."""

    m = data.manifest
    title = f"qanac report: {Path(str(m.get('source', {}).get('path', 'model'))).name} for {m.get('target')}"
    sections = [
        ("Summary", _summary(data)),
        ("Model graph", _legend(data.layers) + '<div class="graph-box">' + render_graph(data.layers) + "</div>"),
        ("Segments", _segments(data)),
        ("Passes that changed the model", _passes(data)),
        ("Diagnostics", _diagnostics(data)),
    ]
    if isinstance(data.results.get("verify"), dict):
        sections.append(("Verification (qanac verify)", _verification(data.results["verify"])))
    if isinstance(data.results.get("eval"), dict):
        sections.append(("Evaluation (qanac eval)", _evaluation(data.results["eval"])))
    body = "".join(f'<section id="{_e(name.split(" ")[0].lower())}"><h2>{_e(name)}</h2>{content}</section>'
                   for name, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body><header><h1>{_e(title)}</h1><p>written by qanac {_e(__version__)}; "
            "hover a layer for its details</p></header>"
            f"<main>{body}</main></body></html>\n")


# -- writing ------------------------------------------------------------------------------------------


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by all (the bundle is shared like any folder)."""

    with replaced_atomically(path, mode=0o644) as out:
        out.write(text.encode("utf-8"))


def write_report(directory: str | Path) -> Path:
    """Render the bundle in ``directory`` (a bundle, or a compile's staging directory) to its report.html."""

    bundle = Bundle.open(directory, verify_checksums=False)
    path = bundle.path / REPORT_HTML
    _replace(path, render(collect(bundle)))
    return path


def update_report(bundle: Bundle, name: str, result: dict[str, Any]) -> str | None:
    """Record ``result`` as ``name`` (``verify``, ``eval``) in the bundle's results.json and render
    report.html again; a sentence saying why not when the bundle cannot be written, else None."""

    results = _read_json(bundle.path / RESULTS)
    results[name] = result
    try:
        _replace(bundle.path / RESULTS, json_text(results) + "\n")
        write_report(bundle.path)
    except OSError as exc:
        return f"report.html not updated: cannot write in {bundle.path} ({exc.strerror or exc})"
    return None
