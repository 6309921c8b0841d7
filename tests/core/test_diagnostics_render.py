"""Diagnostics people can read: human output groups findings by code (count, the first nodes with their
source-framework names, one line of advice) while JSON keeps every finding."""

from __future__ import annotations

from qanac import compiler
from qanac.compiler import CompileRequest
from qanac.diagnostics import SHOWN_KINDS, SHOWN_NODES, Diagnostic, Level, format_grouped
from qanac.report import format_compile_result


def software_layers(count: int) -> list[Diagnostic]:
    return [Diagnostic(Level.WARNING, "AKM201", f"in software on SixNodesIPv2: Not enough CNP1 (Conv2D layer, "
                                                f"{1000 + i:,} MACs as mapped)",
                       nodes=[f"conv{i}"], sources=[f"features.{i}.conv"], rule="akida-hardware-mapping",
                       hint="a larger device (--device auto)")
            for i in range(count)]


def test_twenty_findings_of_one_code_render_as_one_group():
    other = Diagnostic(Level.INFO, "PART002", "on the host: too small", nodes=["relu9"], rule="partition")
    lines = format_grouped([*software_layers(20), other])
    assert lines[0] == ("warning: AKM201 x20, the first: in software on SixNodesIPv2: Not enough CNP1 "
                        "(Conv2D layer, 1,000 MACs as mapped)")
    shown = ", ".join(f"conv{i} <- features.{i}.conv" for i in range(SHOWN_NODES))
    assert lines[1] == f"    nodes: {shown}, +{20 - SHOWN_NODES} more"
    assert lines[2] == "    fix:  a larger device (--device auto)"
    # a code found once is that finding, as before
    assert lines[3:] == ["info: PART002 [relu9]: on the host: too small", "    rule: partition"]
    assert sum(1 for line in lines if "AKM201" in line) == 1


def test_a_group_names_every_kind_of_message_not_only_the_first():
    # PART001 x2 with two reasons: the second reason must be visible without --json
    refusals = [
        Diagnostic(Level.INFO, "PART001", "on the host: AK1109 padding (node 'conv0')", nodes=["conv0"]),
        Diagnostic(Level.INFO, "PART001", "on the host: AK1109 padding (2 nodes from 'conv3')",
                   nodes=["conv3", "conv4"]),
        Diagnostic(Level.INFO, "PART001", "on the host: AK1104 unbounded ReLU (node 'relu1')", nodes=["relu1"]),
    ]
    lines = format_grouped(refusals)
    assert lines[0] == "info: PART001 x3, the first: on the host: AK1109 padding (node 'conv0')"
    # the second finding differs from the first only in its parenthesised node names: not a kind of its own
    assert lines[1] == "    also: on the host: AK1104 unbounded ReLU (node 'relu1')"
    assert lines[2].startswith("    nodes: conv0, conv3, conv4, relu1")

    many = [Diagnostic(Level.INFO, "PART001", f"on the host: reason {chr(97 + i)}", nodes=[f"n{i}"])
            for i in range(SHOWN_KINDS + 3)]
    also = [line for line in format_grouped(many) if line.startswith("    also:")]
    assert also == [f"    also: on the host: reason {chr(97 + i)}" for i in range(1, SHOWN_KINDS + 1)] + [
        "    also: +2 other messages"]


def test_a_finding_with_many_nodes_names_the_first_few():
    finding = Diagnostic(Level.WARNING, "PART004", "moved to the host: refused", nodes=[f"n{i}" for i in range(11)])
    assert finding.format().splitlines()[0] == (
        "warning: PART004 [n0, n1, n2, n3, n4, +6 more]: moved to the host: refused")
    assert len(finding.to_dict()["nodes"]) == 11


def test_the_compile_output_groups_and_the_report_keeps_every_finding(small_model_path, small_calib_path,
                                                                      tmp_path):
    request = CompileRequest(source=str(small_model_path), target="onnxruntime", output=tmp_path / "bundle",
                             calibration=str(small_calib_path))
    result = compiler.compile_model(request)
    result.report["diagnostics"] = [d.to_dict() for d in software_layers(20)]
    text = format_compile_result(result)
    assert text.count("AKM201") == 1 and "warning: AKM201 x20, the first: " in text
    assert len(result.report["diagnostics"]) == 20
    assert [Diagnostic.from_dict(d) for d in result.report["diagnostics"]] == software_layers(20)
