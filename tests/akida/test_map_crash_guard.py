"""akida's mapper kills the process on some graphs; qanac maps in a child first and never dies with it.

The graph (found on a ShuffleNetV2 unit, reproduced here with akida layers built in code): a layer feeding
two branches of two layers each (stride-2 depthwise then pointwise, and 3x3 stride-2 then pointwise)
joined by a Concatenate, then a pointwise Conv. ``Model.map`` segfaults in ``_map_search`` on it
(akida 2.19); the same graph with one layer less in a branch maps on hardware.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from qanac.backends.akida.backend import check_mapping_survives
from qanac.diagnostics import UnsupportedModelError

pytestmark = pytest.mark.slow


def two_branch_concat(second_branch: tuple[str, ...]):
    import akida

    relu = akida.ActivationType.ReLU

    def layer(kind: str, name: str, stride: int):
        if kind == "dw":
            return akida.DepthwiseConv2D(kernel_size=3, kernel_stride=stride, activation=relu, name=name)
        if kind == "c3":
            return akida.Conv2D(filters=24, kernel_size=3, kernel_stride=stride, activation=relu, name=name)
        return akida.Conv2D(filters=24, kernel_size=1, activation=relu, name=name)

    model = akida.Model()
    model.add(akida.InputData((16, 16, 24), input_bits=8, name="input"))
    model.add(layer("dw", "head", 1))
    head = model.layers[-1]
    ends = []
    for branch, kinds in (("a", ("dw", "pw")), ("b", second_branch)):
        current = head
        for index, kind in enumerate(kinds):
            model.add(layer(kind, f"{branch}{index}", 2 if index == 0 else 1), [current])
            current = model.layers[-1]
        ends.append(current)
    model.add(akida.Concatenate(name="concat"), ends)
    model.add(akida.Conv2D(filters=48, kernel_size=1, activation=relu, name="after"))
    return model


def test_the_graph_kills_a_process_that_maps_it(tmp_path):
    path = tmp_path / "model.fbz"
    two_branch_concat(("c3", "pw")).save(str(path))
    script = ("import sys, akida\nfrom qanac.backends.akida.devices import virtual_device\n"
              "m = akida.Model(sys.argv[1])\nm.map(virtual_device('SixNodesIPv2', m), hw_only=False)")
    completed = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, timeout=300)
    assert completed.returncode == -11  # SIGSEGV: what the guard exists for


def test_a_mapper_crash_is_a_refusal_naming_the_signal():
    with pytest.raises(UnsupportedModelError) as raised:
        check_mapping_survives(two_branch_concat(("c3", "pw")), "SixNodesIPv2")
    assert "killed by SIGSEGV" in raised.value.message
    assert [d.code for d in raised.value.diagnostics] == ["AKM210"]
    assert raised.value.diagnostics[0].nodes == []  # the whole segment goes to the host


def test_a_graph_the_mapper_survives_passes_and_maps_in_process():
    from qanac.backends.akida.mapping import map_on_device

    model = two_branch_concat(("c3",))
    check_mapping_survives(model, "SixNodesIPv2")
    assert map_on_device(model, "SixNodesIPv2")["hardware_mac_share"] == 1.0
